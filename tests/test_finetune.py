"""A user's own folder data set: a pretrained 1000-class latent DiT pipeline fine-tuned on its classes with Ray Train
(latents cached once), then `distill` on it end to end; labels follow the class list, not the folders' order."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_latent_pipeline
from lgd_ray.config import ConfigError, load_config
from lgd_ray.data import read_classlist
from lgd_ray.distill import distill
from lgd_ray.finetune import class_rows, latent_dir, read_latents
from lgd_ray.prior import load_prior, prior_class_map, prior_dir
from lgd_ray.prior_make import ensure_prior
from lgd_ray.ray_train import ray_fitter
from lgd_ray.shards import in_order, read_shards
from lgd_ray.storage import Location
from lgd_ray.vae_fit import vae_dir

CLASSES = ["zebra", "n01440764", "apple"]  # the class list; the folders sort as apple, n01440764, zebra
COLOURS = {"zebra": (220, 30, 30), "n01440764": (30, 200, 40), "apple": (40, 60, 230)}
PER_CLASS = {"zebra": 6, "n01440764": 4, "apple": 5}  # train images: 3 x this; val: this


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]  # Ray Train fits


def _folder_data(root: Path):
    rng = np.random.default_rng(0)
    for split, times in (("train", 3), ("val", 1)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(PER_CLASS[name] * times):
                x = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(x).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def test_finetune_on_own_classes_then_distill(tmp_path):
    _folder_data(tmp_path / "data")
    base = tiny_latent_pipeline()
    base.save_pretrained(tmp_path / "base")
    overrides = [
        "data.name=folder", f"data.root={tmp_path / 'data'}", f"data.classes={tmp_path / 'data' / 'classes.txt'}",
        "data.image_size=16", f"prior.base={tmp_path / 'base'}", "prior.train_steps=60", "prior.batch_size=16",
        "prior.checkpoint_steps=30", "prior.lr=1e-3", "prior.num_steps=6", "prior.cfg_scale=2.0",
        "guidance.window=[0,5]", "reference.train.epochs=4", "student.train.epochs=4", "distill.seed_ipc=2",
        "distill.ipc_per_stage=1", "distill.stages=1", "distill.classes_per_chunk=2", "distill.sample_batch=4",
        f"cache={tmp_path / 'cache'}", f"out={tmp_path / 'run'}"]
    cfg = load_config("digits", overrides)
    # `python -m lgd_ray.prior` with Ray: latents encoded by Ray tasks, the fine-tune a Ray Train fit
    assert ensure_prior(cfg, fitter=ray_fitter(cfg, Location(cfg.cache))) == str(prior_dir(cfg))
    manifest = distill(replace(cfg, ray=replace(cfg.ray, enabled=False)))  # the rest in this process (the test's time)

    # the latent cache and the fine-tuned label table follow the class list
    latents = read_latents(latent_dir(cfg, cfg.prior.base))
    assert latents.labels.bincount().tolist() == [3 * PER_CLASS[c] for c in CLASSES]
    assert read_classlist(cfg.data.classes) == CLASSES and manifest["classes"] == CLASSES
    prior = load_prior(str(prior_dir(cfg)), "ddim")
    assert prior.num_classes == 3 and prior.vae is not None and manifest["prior"] == str(prior_dir(cfg))
    assert class_rows(1000, CLASSES) == [None, 0, None]  # n01440764 (tench) is ImageNet-1K's class 0
    for tuned, old in zip(prior.transformer.transformer_blocks, base.transformer.transformer_blocks):
        new_rows = tuned.norm1.emb.class_embedder.embedding_table.weight
        old_rows = old.norm1.emb.class_embedder.embedding_table.weight
        nearest = torch.cdist(new_rows.detach(), old_rows.detach()).argmin(1).tolist()
        assert nearest == [1000, 0, 1000, 1000]  # zebra, tench, apple, null: each still nearest to its start row
    info = json.loads((prior_dir(cfg) / "train_info.json").read_text())
    assert info["steps"] == 60

    # distilled shards: 16 px RGB images, labels 0..2 with the configured images per class
    samples = read_shards(Location(cfg.out), in_order(manifest["shards"]))
    labels = sorted(s["cls"] for s in samples)
    assert labels == sorted([c for c in range(3)] * (cfg.distill.seed_ipc + cfg.distill.ipc_per_stage))
    assert all(s["image"].shape == (3, 16, 16) for s in samples)


def test_folder_classes_a_hub_dit_does_not_know_are_refused(tmp_path):

    (tmp_path / "classes.txt").write_text("zebra\nn01440764\n")
    cfg = load_config("digits", ["data.name=folder", f"data.root={tmp_path}", f"data.classes={tmp_path / 'classes.txt'}",
                                 "prior.model_id=facebook/DiT-XL-2-256"])
    with pytest.raises(ConfigError, match=r"ImageNet classes, data.classes of folder: 1 not ImageNet wnids \(first: zebra\); fine-tune a DiT"):
        prior_class_map(cfg, load_prior(str(_base(tmp_path)), "ddim"))
    with pytest.raises(ConfigError, match="'prior.base' .* needs data.name=folder"):
        load_config("digits", [f"prior.base={tmp_path}"])


def _base(tmp_path: Path) -> Path:
    tiny_latent_pipeline().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_latent_cache_key_follows_the_vae_not_the_cache_mount(tmp_path):
    """The project VAE's latents keep their key when the cache is mounted elsewhere; a hub id keys by the id."""
    keys = []
    for root, steps in ((tmp_path / "a" / "cache", 2500), (tmp_path / "b" / "cache", 2500), (tmp_path, 100)):
        cfg = load_config("fashion-mnist-latent", [f"cache={root}", f"prior.vae_steps={steps}"])
        own, hub = latent_dir(cfg, str(vae_dir(cfg))), latent_dir(cfg, "stabilityai/sd-vae-ft-ema")
        assert own.relative_to(Location(str(root))) == own.name  # in the cache it is keyed in
        keys.append((own.name, hub.name))
    assert keys[0] == keys[1]  # the same VAE, the cache mounted elsewhere
    assert keys[2][0] != keys[0][0] and keys[2][1] == keys[0][1]  # another VAE; the same hub id
