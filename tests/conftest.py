"""Shared fixtures: a tiny digits configuration whose prior and reference are trained once per session."""
from __future__ import annotations

import pytest
import torch
from diffusers import DiTPipeline

from lgd_ray.config import load_config
from lgd_ray.prior import random_pipeline

torch.set_num_threads(2)

TINY = [
    "prior.train_steps=300", "prior.depth=2", "prior.num_heads=2", "prior.head_dim=32", "prior.num_steps=10",
    "prior.batch_size=64", "prior.cfg_scale=2.0", "guidance.window=[0,9]",
    "reference.train.epochs=8", "student.train.epochs=30",
    "distill.seed_ipc=2", "distill.ipc_per_stage=2", "distill.stages=2", "distill.classes_per_chunk=4",
    "distill.sample_batch=16",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_overrides(cache_dir):
    """Overrides that make the digits config a seconds-long run, sharing one trained prior and reference."""
    return TINY + [f"cache={cache_dir}"]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    return load_config("digits", tiny_overrides)


@pytest.fixture(scope="session")
def trained(tiny_cfg):
    """(prior, reference, real train split, real test split) of the tiny digits config."""
    from lgd_ray.data import load_split
    from lgd_ray.prior import ensure_prior, load_prior
    from lgd_ray.reference import ensure_reference

    prior = load_prior(ensure_prior(tiny_cfg), tiny_cfg.prior.scheduler)
    reference, _ = ensure_reference(tiny_cfg, 10)
    return prior, reference.requires_grad_(False), load_split(tiny_cfg.data, "train"), load_split(tiny_cfg.data, "test")


def tiny_latent_pipeline(num_classes: int = 1000, learned_sigma: bool = True) -> DiTPipeline:
    """A DiT-XL/2-shaped pipeline at toy size: 1000-class latent DiT (learned sigma), tiny AutoencoderKL, DDIM."""
    return random_pipeline(
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8 if learned_sigma else 4,
             num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=1),
        dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
             up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
             norm_num_groups=4, sample_size=16))


@pytest.fixture(scope="session")
def latent_pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-dit-256")
    tiny_latent_pipeline().save_pretrained(path)
    return path
