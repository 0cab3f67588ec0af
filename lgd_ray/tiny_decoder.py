"""A tiny guidance decoder (guidance.decoder: tiny): a small convolutional network, TAESD-like, fitted to reproduce a
latent prior's VAE decoder, used only inside lgd's guided step (the student's and the reference's losses and their
gradient). Selection scores and the written images keep the full decoder.

Fitted by lgd_ray/tiny_fit.py; its weights are cached by the sha256 of the prior's VAE, the data set and its keys.
"""
from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load
from torch import nn

from lgd_ray.config import Config, ConfigError, config_hash
from lgd_ray.prior import Prior
from lgd_ray.storage import Location

VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus the input, then ReLU (TAESD's block)."""

    def __init__(self, width: int):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x):
        return torch.relu(self.convs(x) + x)


class TinyDecoder(nn.Module):
    """Scaled latents (as the DiT samples them) -> images in about [-1, 1]: a block at the latent size, then per
    doubling an upsample, a convolution and a block."""

    def __init__(self, latent_channels: int, out_channels: int, doublings: int, width: int):
        super().__init__()
        layers = [nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU(), Block(width)]
        for _ in range(doublings):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1, bias=False), Block(width)]
        layers.append(nn.Conv2d(width, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def build_tiny(prior_config: dict, vae_config: dict, width: int) -> TinyDecoder:
    """The tiny decoder of a pipeline's transformer and VAE configs."""
    return TinyDecoder(prior_config["in_channels"], vae_config["out_channels"],
                       len(vae_config["block_out_channels"]) - 1, width)


def tiny_path(cfg: Config, prior_id: str) -> Location:
    """Where the tiny decoder of this prior (by its VAE's sha256), data set and keys is cached."""
    g = cfg.guidance
    key = {"vae": (Location(prior_id) / VAE_WEIGHTS).sha256(), "data": dataclasses.asdict(cfg.data), "seed": cfg.seed,
           "sampling": [cfg.prior.num_steps, cfg.prior.cfg_scale, cfg.prior.scheduler, g.window, g.every],
           "tiny": [g.tiny_width, g.tiny_steps, g.tiny_lr, g.tiny_trajectories]}
    return Location(cfg.cache).resolve() / f"tiny-decoder-{cfg.data.name}-{config_hash(key)}.safetensors"


def load_tiny(cfg: Config, prior: Prior, prior_id: str) -> TinyDecoder:
    """The cached tiny decoder of the prior (made by the driver's ensure_tiny), in eval mode, frozen."""
    path = tiny_path(cfg, prior_id)
    if not path.exists():
        raise ConfigError(f"guidance: no tiny decoder at {path}; the driver of `python -m lgd_ray.distill "
                          f"{cfg.name or 'CONFIG'}` fits it before any actor starts")
    tiny = build_tiny(prior.transformer.config, prior.vae.config, cfg.guidance.tiny_width)
    tiny.load_state_dict(load(path.read_bytes()))
    return tiny.to(prior.device).eval().requires_grad_(False)
