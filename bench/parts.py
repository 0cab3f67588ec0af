"""What the benchmarks share: the interleaved timing loop, and the random-weight models they time.

Timings depend on shapes, not weights, so the models are random (`lgd_ray.prior.random_pipeline`) and need no
training or download.
"""
from __future__ import annotations

import atexit
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from lgd_ray.config import load_config
from lgd_ray.guidance import Guide, Scorer
from lgd_ray.models import build_classifier
from lgd_ray.prior import Prior, load_prior, random_pipeline

# A small 1000-class latent DiT (learned sigma, like DiT-XL/2) with a small VAE: 4x16x16 latents -> 64 px images.
LATENT_DIT = dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4,
                  sample_size=16, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1)
LATENT_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64], latent_channels=4,
                  norm_num_groups=16, sample_size=64)
# The pixel DiT of configs/fashion-mnist.yaml (28x28 grey, patch 4, 4 blocks of 4 x 32 heads), 10 classes.
PIXEL_DIT = dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=4,
                 sample_size=28, patch_size=4, num_embeds_ada_norm=10, norm_num_groups=1)


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def saved_prior(transformer: dict, vae: dict | None = None) -> tuple[Path, Prior]:
    """A random-weight pipeline saved to a temporary folder and loaded back through `load_prior`, as a real one is."""
    folder = Path(tempfile.mkdtemp(prefix="lgd-bench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    random_pipeline(transformer, vae).save_pretrained(folder)
    return folder, load_prior(str(folder))


def latent_prior() -> Prior:
    return saved_prior(LATENT_DIT, LATENT_VAE)[1]


def pixel_prior() -> Prior:
    return saved_prior(PIXEL_DIT)[1]


def scorer_for(prior: Prior, model: str = "convnet3", size: int | None = None, omega: float = 1.0) -> Scorer:
    """A student and a reference of the same architecture (random weights) at the prior's image size."""
    size = size or prior.image_size
    channels = prior.vae.config.out_channels if prior.vae is not None else prior.latent_shape[0]
    nets = [build_classifier(model, channels, size, prior.num_classes, seed=s).eval().requires_grad_(False)
            for s in (1, 2)]
    return Scorer(*nets, omega=omega)


def bench_guide(scorer: Scorer, image_size: int, steps: int, through: str = "denoiser") -> Guide:
    """The guide of the benchmarks: lambda 0.05 (no deviation term) on every one of `steps` steps, built from a config
    as the sampler actors build theirs."""
    cfg = load_config("digits", ["guidance.lambda=0.05", "guidance.gamma=0", f"guidance.window=[0,{steps - 1}]",
                                 f"guidance.through={through}", "guidance.norm_scale=1.0", "guidance.every=1",
                                 "guidance.augment=0", "guidance.batch=0", f"data.image_size={image_size}"])
    return Guide.from_config(cfg, scorer)


def priors_with_scorers():
    """(name, prior, scorer) for the two priors the sampler benchmarks time."""
    for name, make in (("pixel DiT (fashion-mnist)", pixel_prior), ("latent DiT + VAE", latent_prior)):
        prior = make()
        yield name, prior, scorer_for(prior)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of each function; after `warmup` untimed rounds the calls alternate a, b, a, b ..."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def verdict(ratio: float, goal: float, higher: bool = True) -> str:
    met = ratio >= goal if higher else ratio <= goal
    return f"{ratio:.2f}x (goal {'>=' if higher else '<='} {goal}x: {'met' if met else 'MISSED'})"
