"""Fine-tuning a pretrained latent DiT pipeline on a folder data set's own classes (as MinimaxDiffusion adapts
DiT-XL/2): the transformer gets a label table for the data set's classes plus the null class, the VAE stays frozen,
the train split is encoded to latents once (cached per class in the store), and the DiT is fine-tuned on them.

`python -m lgd_ray.prior CONFIG prior.base=HUB_ID_OR_URI data.name=folder data.root=... data.classes=FILE` runs it;
`distill` with the same config then samples from the fine-tuned pipeline.
"""
from __future__ import annotations

import dataclasses
import io
import json
from functools import partial

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel

from lgd_ray.config import Config, ConfigError, config_hash
from lgd_ray.cost import slow_seconds, step_costs
from lgd_ray.data import TensorSet, by_class_name, class_chunks, class_names, load_split, read_classlist, split_size, to_float
from lgd_ray.prior import PIPELINE_MARKER, image_size_of, local_model, prior_checkpoints, prior_seed
from lgd_ray.prior_fit import PriorJob, train_prior
from lgd_ray.ray_tasks import map_jobs
from lgd_ray.seeding import derive_seed
from lgd_ray.storage import Location
from lgd_ray.train import Fitter, process_device

LATENT_INDEX = "index.json"  # written last: the latent cache is complete when it is there
CLASSES_PER_TASK = 10


def class_rows(base_classes: int, classes: list[str]) -> list[int | None]:
    """For each class of the data set, the row of the base DiT's label table it starts from: its ImageNet-1K index when
    the base has ImageNet-1K's 1000 classes and the class folder is an ImageNet wnid, else None (the null row: the
    class starts from the unconditional model)."""
    imagenet = read_classlist("imagenet1k") if base_classes == 1000 else []
    return [imagenet.index(c) if c in imagenet else None for c in classes]


def with_classes(transformer: DiTTransformer2DModel, rows: list[int | None]) -> DiTTransformer2DModel:
    """Give every block's label table len(rows) classes plus the null class (the last row): class i starts from the
    old table's row rows[i] (None: the old null row), the null class from the old null row."""
    old = transformer.config.num_embeds_ada_norm
    src = torch.tensor([old if r is None else r for r in rows] + [old])
    for block in transformer.transformer_blocks:
        embedder = block.norm1.emb.class_embedder
        table = torch.nn.Embedding(len(src), embedder.embedding_table.embedding_dim)
        table.weight.data.copy_(embedder.embedding_table.weight.data[src])
        embedder.embedding_table, embedder.num_classes = table, len(rows)
    transformer.register_to_config(num_embeds_ada_norm=len(rows))
    return transformer


def base_transformer(base: str, rows: list[int | None], local_cache: str) -> DiTTransformer2DModel:
    """The base pipeline's transformer in float32 with the data set's label table."""
    return with_classes(DiTTransformer2DModel.from_pretrained(local_model(base, local_cache), subfolder="transformer"),
                        rows)


def base_vae(base: str, local_cache: str, marker: str = PIPELINE_MARKER) -> AutoencoderKL:
    """The VAE (vae/ subfolder) of a pipeline, or of a folder whose completion marker is `marker`, frozen."""
    return AutoencoderKL.from_pretrained(local_model(base, local_cache, marker), subfolder="vae").eval().requires_grad_(False)


def latent_dir(cfg: Config, vae: str) -> Location:
    """The latent cache of the train split under the VAE of `vae` (a model id): keyed by the data set and it, a VAE in
    the cache by its entry's name (the same key wherever the cache is mounted)."""
    data = dataclasses.asdict(cfg.data)
    del data["prepared"]  # the same images, files or prepared shards
    cache = Location(cfg.cache).resolve()
    try:
        base = "cache:" + Location(vae).resolve().relative_to(cache)
    except ValueError:
        base = vae
    return cache / f"latents-{config_hash({'data': data, 'base': base})}"


@torch.no_grad()
def encode_classes(cfg: Config, size: int, out: Location, vae_id: tuple[str, str], classes: tuple[int, ...]) -> int:
    """Encode the train images of `classes` at `size` px with the VAE of vae_id (model id, completion marker):
    posterior mean x scaling factor, one float16 object per class; returns the number of images."""
    device = process_device(cfg.device)
    vae = base_vae(vae_id[0], cfg.local_cache, vae_id[1]).to(device)
    train, n = load_split(cfg.data, "train"), 0
    for c in classes:
        _, images = train.class_images(c, size, lambda k: list(range(k)))
        latents = [vae.encode(to_float(x).to(device)).latent_dist.mean * vae.config.scaling_factor
                   for x in images.split(32)]
        buf = io.BytesIO()
        np.savez(buf, latents=torch.cat(latents).half().cpu().numpy())
        (out / by_class_name(c)).write_bytes(buf.getvalue())
        n += len(images)
    return n


def cache_latents(cfg: Config, size: int, vae: str, marker: str = PIPELINE_MARKER) -> Location:
    """The train split's latents at `size` px under the VAE of `vae` (a pipeline, or a folder complete when `marker`
    is in it), encoded once (as Ray tasks with ray.enabled, CLASSES_PER_TASK classes each) and kept in the store;
    index.json is written last."""
    out = latent_dir(cfg, vae)
    if (out / LATENT_INDEX).exists():
        return out
    classes = class_names(cfg.data)
    print(f"prior: encoding the train split of {len(classes)} classes at {size} px with {vae}'s VAE -> {out}",
          flush=True)

    def expected() -> float:  # a task's seconds: its images through the VAE (the decoder's count bounds the encoder's)
        per_task = split_size(cfg.data, "train") / len(classes) * CLASSES_PER_TASK
        r = cfg.ray
        return slow_seconds(per_task * step_costs(cfg).decoder * 1e9, r.train_gpus_per_worker if r.train_use_gpu else 0,
                            round(r.train_cpus_per_worker))

    counts = map_jobs(cfg, partial(encode_classes, cfg, size, out, (vae, marker)), class_chunks(len(classes), CLASSES_PER_TASK),
                      "latents", expected)
    (out / LATENT_INDEX).write_text(json.dumps({"classes": classes, "image_size": size, "base": vae,
                                                "images": sum(counts)}))
    return out


def read_latents(latents: Location) -> TensorSet:
    """The cached latents (float16) with their labels (the class list's order)."""
    index = json.loads((latents / LATENT_INDEX).read_text())
    xs, ys = [], []
    for c in range(len(index["classes"])):
        with np.load(io.BytesIO((latents / by_class_name(c)).read_bytes())) as z:
            xs.append(torch.from_numpy(z["latents"]))
        ys.append(torch.full((len(xs[-1]),), c, dtype=torch.int64))
    return TensorSet(torch.cat(xs), torch.cat(ys), len(index["classes"]))


def finetune_job(cfg: Config, latents: Location) -> PriorJob:
    """The fit: the base's transformer with the data set's label table, on the cached latents, the base's noise."""
    base = local_model(cfg.prior.base, cfg.local_cache)
    rows = class_rows(DiTTransformer2DModel.load_config(base, subfolder="transformer")["num_embeds_ada_norm"],
                      read_classlist(cfg.data.classes))
    noise = DDPMScheduler.from_config(DDPMScheduler.load_config(base, subfolder="scheduler"))
    return PriorJob(prior=cfg.prior, build=partial(base_transformer, cfg.prior.base, rows, cfg.local_cache),
                    load_data=partial(read_latents, latents), noise=dict(noise.config),
                    seed=derive_seed(prior_seed(cfg), "prior"), checkpoints=str(prior_checkpoints(cfg)),
                    name="prior-finetune")


def finetune_prior(cfg: Config, out: Location, fitter: Fitter) -> dict:
    """Fine-tune prior.base on the config's folder data set and save the pipeline (its VAE unchanged) to `out`."""
    base = local_model(cfg.prior.base, cfg.local_cache)
    if DiffusionPipeline.load_config(base).get("vae", [None])[0] is None:
        raise ConfigError(f"prior: {cfg.prior.base} has no VAE: prior.base must be a latent DiT pipeline")
    size = image_size_of(DiTTransformer2DModel.load_config(base, subfolder="transformer"),
                         AutoencoderKL.load_config(base, subfolder="vae"))
    latents = cache_latents(cfg, size, cfg.prior.base)
    print(f"prior: fine-tuning {cfg.prior.base} on {cfg.data.name} ({cfg.prior.train_steps} steps) -> {out}",
          flush=True)
    return train_prior(finetune_job(cfg, latents), out, fitter, vae=base_vae(cfg.prior.base, cfg.local_cache))
