"""The cluster code path at toy size: ImageFolder data, a 1000-class latent DiT given as prior.model_id (a folder
saved with save_pretrained, loaded as facebook/DiT-XL-2-256 is), a guided stage on local Ray."""
import numpy as np
import pytest
import ray
import torch
from PIL import Image

from lgd_ray.config import load_config
from lgd_ray.data import read_classlist
from lgd_ray.prior import load_prior, prior_class_map


def _imagefolder(root, wnids, size=16):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, w in enumerate(wnids):
            (root / split / w).mkdir(parents=True)
            colour = rng.integers(0, 256, 3)
            img = np.clip(colour + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / split / w / f"{w}_0.png")


def _overrides(root, model_dir, tmp_path, classes):
    return [f"data.root={root}", f"data.classes={classes}", "data.image_size=16", f"prior.model_id={model_dir}",
            "prior.num_steps=4", "guidance.window=[0,3]", "guidance.kappa=2", "guidance.gamma=0.5",
            "reference.model=convnet2", "student.model=convnet2", "reference.train.epochs=1", "student.train.epochs=1",
            "distill.seed_ipc=1", "distill.ipc_per_stage=1", "distill.stages=1", "distill.sample_batch=256",
            "ray.actors=2", "ray.num_cpus_per_actor=0.5", "ray.num_gpus_per_actor=0", "ray.train_workers=1",
            "ray.train_use_gpu=false", "ray.train_cpus_per_worker=1", f"cache={tmp_path / 'cache'}",
            f"out={tmp_path / 'run'}"]


def test_subset_labels_map_to_imagenet_indices(latent_pipeline_dir, tmp_path):
    wnids = read_classlist("imagenette")
    _imagefolder(tmp_path / "data", wnids)
    cfg = load_config("imagenette", _overrides(tmp_path / "data", latent_pipeline_dir, tmp_path, "imagenette"))
    prior = load_prior(str(latent_pipeline_dir))
    prior.class_map = prior_class_map(cfg, prior)
    imagenet = read_classlist("imagenet1k")
    assert prior.class_map.tolist() == [imagenet.index(w) for w in wnids]
    seen = []
    hook = prior.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()),
                                                       with_kwargs=True)
    with torch.no_grad():
        prior.eps(torch.zeros(2, 4, 8, 8), torch.tensor(500), torch.tensor([0, 9]), cfg_scale=4.0)
    hook.remove()
    assert seen[0].tolist() == [imagenet.index(wnids[0]), imagenet.index(wnids[9]), 1000, 1000]  # null = 1000


@pytest.mark.slow
def test_one_guided_stage_over_1000_classes(latent_pipeline_dir, tmp_path):
    """1000 classes in 8 chunks over 2 sampler actors (the classifier fits in this process: what is tested here is
    the chunking of the classes, not Ray Train, which costs ~14 s of start-up a fit)."""
    from lgd_ray.actors import SamplerPool
    from lgd_ray.stages import run_stages

    _imagefolder(tmp_path / "data", read_classlist("imagenet1k"))
    cfg = load_config("imagenet1k", _overrides(tmp_path / "data", latent_pipeline_dir, tmp_path, "imagenet1k")
                      + ["distill.classes_per_chunk=128"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = SamplerPool(cfg, tmp_path / "run")
    try:
        manifest = run_stages(cfg, tmp_path / "run", runner=pool)
    finally:
        pool.shutdown()
        ray.shutdown()
    for stage in (0, 1):
        rows = [r for r in manifest["shards"] if r["stage"] == stage]
        assert len(rows) == 8  # ceil(1000 / 128) chunks
        classes = [c for r in rows for c in r["classes"]]
        assert sorted(classes) == list(range(1000))  # every class, no overlap
        keys = [k for r in rows for k in r["keys"]]
        assert len(keys) == 1000 == len(set(keys))
    assert manifest["stages"]["1"]["mean_S"] is not None and manifest["prior"] == str(latent_pipeline_dir)
