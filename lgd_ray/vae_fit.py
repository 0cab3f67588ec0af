"""Training the VAE of the project's latent prior (prior.latent_channels > 0): a diffusers AutoencoderKL fitted to the
train split, step by step and resumable like the DiT's fit (lgd_ray/prior_fit.py), then saved with save_pretrained
beside a scaling factor measured on the data, so that its latents have unit variance as DiT-XL/2's VAE's roughly do.

The loss is the squared error of the reconstruction plus prior.vae_kl times the posterior's KL, both summed per image
(Stable Diffusion's KL-f8 weighs them 1 : 1e-6, with a perceptual and an adversarial term this fit does without).
"""
from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL

from lgd_ray.config import Config, PriorConfig, config_hash
from lgd_ray.data import TensorSet, load_split, to_float
from lgd_ray.prior import prior_seed, project_configs
from lgd_ray.prior_fit import after_step, descend, warmup_cosine
from lgd_ray.seeding import derive_seed, generator
from lgd_ray.storage import Location, as_location
from lgd_ray.train import Bar, Fitter, rank_slice, terminal_bar, to_cpu

VAE_MARKER = "vae_info.json"  # written last: a VAE folder (vae/ of save_pretrained) is complete when it is there
SCALE_IMAGES = 4096  # train images whose latents' standard deviation sets the scaling factor
EVAL_IMAGES = 512  # fixed train images of the reconstruction error recorded after the fit


class _Reconstruction(torch.nn.Module):
    """The fit's forward as one module (what DDP wraps): a posterior draw decoded, and the posterior's KL."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample(generator=gen)).sample, posterior.kl()


@dataclass(kw_only=True)
class VaeJob:
    """One VAE fit, picklable for a Ray Train worker; the same protocol as PriorJob (run, rounds, checkpoints)."""

    prior: PriorConfig
    build: Callable[[], AutoencoderKL]
    load_data: Callable[[], TensorSet]
    seed: int
    checkpoints: str = ""
    name: str = "vae"
    output: str = "model"
    checkpoint_every: int = 1

    @property
    def rounds(self) -> int:
        return math.ceil(self.prior.vae_steps / self.prior.checkpoint_steps)

    def run(self, device="cpu", rank: int = 0, world: int = 1, wrap=None, on_round=None, resume=None,
            bar: Bar = terminal_bar):
        return fit_vae(self, device, rank, world, wrap, on_round, resume, bar)


def fit_vae(job: VaeJob, device="cpu", rank: int = 0, world: int = 1, wrap=None,
            on_round: Callable[[int, dict, Callable[[], dict]], None] | None = None,
            resume: dict | None = None, bar: Bar = terminal_bar) -> tuple[dict, dict]:
    """Fit the job's VAE with AdamW (warm-up, cosine decay, clipping); every step's batch and posterior draw come from
    a generator seeded by (job seed, step, rank), so a resumed fit continues as the uninterrupted one (bit for bit on
    the CPU). on_round and resume as in prior_fit.fit_prior. Returns (weights on the CPU, metrics)."""
    p = job.prior
    if p.batch_size % world:
        raise ValueError(f"prior.batch_size {p.batch_size} is not a multiple of the {world} workers")
    device = torch.device(device)
    torch.manual_seed(job.seed)  # the same initial weights on every rank
    vae = job.build().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_lr, weight_decay=0.0)
    sched = warmup_cosine(opt, p.vae_steps)
    first, before = 0, 0.0
    if resume is not None:
        vae.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        first, before = resume["step"], float(resume["seconds"])
    net = _Reconstruction(vae)
    net = wrap(net) if wrap else net
    data = rank_slice(job.load_data(), rank, world, job.seed)
    batch, losses, start = p.batch_size // world, [], time.time()

    def state(step: int) -> dict:
        return {"step": step, "seconds": before + time.time() - start, "model": to_cpu(vae.state_dict()),
                "optimizer": to_cpu(opt.state_dict()), "scheduler": to_cpu(sched.state_dict())}

    progress = bar(p.vae_steps, job.name, first)
    for step in range(first, p.vae_steps):
        gen = generator(job.seed, "step", step, rank)
        x = to_float(data.images[torch.randint(len(data.labels), (batch,), generator=gen)]).to(device)
        recon, kl = net(x, gen)
        loss = ((recon - x).pow(2).sum(dim=(1, 2, 3)) + p.vae_kl * kl).mean() / x[0].numel()
        descend(loss, vae.parameters(), opt, sched)
        losses.append(loss.detach())
        after_step(job.name, step + 1, p.vae_steps, p.checkpoint_steps, losses, progress, on_round, state, digits=5)
    progress.close()
    vae.eval()
    metrics = {"step": p.vae_steps, "workers": world, "seconds": round(before + time.time() - start, 1),
               "params": sum(t.numel() for t in vae.parameters()),
               "final_loss": torch.stack(losses[-100:]).mean().item() if losses else float("nan"),
               "eval_mse": reconstruction_mse(vae, data.images[:EVAL_IMAGES])}
    return to_cpu(vae.state_dict()), metrics


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> float:
    """Mean squared error (images in [-1, 1]) of decoding the posterior means of uint8 `images`."""
    device, total = vae.device, 0.0
    for x in images.split(batch):
        x = to_float(x).to(device)
        total += (vae.decode(vae.encode(x).latent_dist.mean).sample - x).pow(2).mean(dim=(1, 2, 3)).sum().item()
    return total / len(images)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> float:
    """1 / the standard deviation of the posterior means of uint8 `images`: latents times it have unit variance."""
    z = torch.cat([vae.encode(to_float(x).to(vae.device)).latent_dist.mean for x in images.split(batch)])
    return 1.0 / z.float().std().item()


def build_vae(cfg: Config) -> AutoencoderKL:
    """The project VAE of `cfg`, randomly initialised."""
    return AutoencoderKL(**project_configs(cfg)[1])


def vae_dir(cfg: Config) -> Location:
    """Where the project VAE of `cfg` lives in the cache: keyed by the data set, the prior's seed and the VAE keys."""
    p = cfg.prior
    key = {"data": dataclasses.asdict(cfg.data), "seed": prior_seed(cfg),
           "vae": {k: getattr(p, k) for k in ("latent_channels", "vae_channels", "vae_steps", "vae_lr", "vae_kl",
                                               "batch_size")}}
    return Location(cfg.cache).resolve() / f"vae-{cfg.data.name}-{config_hash(key)}"


def ensure_vae(cfg: Config, fitter: Fitter) -> Location:
    """The folder of the config's VAE (vae/ of save_pretrained, vae_info.json last): fitted with `fitter` and saved
    first if it is not there. Called under the prior's cache lock."""
    out = vae_dir(cfg)
    if (out / VAE_MARKER).exists():
        return out
    p = cfg.prior
    print(f"prior: training a VAE ({p.latent_channels} latent channels) on {cfg.data.name} ({p.vae_steps} steps) "
          f"-> {out}", flush=True)
    checkpoints = Location(cfg.cache).resolve() / f"{out.name}-checkpoints"
    job = VaeJob(prior=p, build=partial(build_vae, cfg), load_data=partial(load_split, cfg.data, "train"),
                 seed=derive_seed(prior_seed(cfg), "vae"), checkpoints=str(checkpoints))
    weights, metrics = fitter(job)
    vae = build_vae(cfg)
    vae.load_state_dict(weights)
    vae.eval().requires_grad_(False)
    train = load_split(cfg.data, "train")
    scale = latent_scale(vae, train.images[:SCALE_IMAGES])
    vae.register_to_config(scaling_factor=scale)
    info = {"steps": metrics["step"], "scaling_factor": scale,
            **{k: metrics[k] for k in ("workers", "seconds", "params", "final_loss", "eval_mse")}}
    with tempfile.TemporaryDirectory() as tmp:
        vae.save_pretrained(Path(tmp) / "vae")
        (Path(tmp) / VAE_MARKER).write_text(json.dumps(info, indent=1))
        as_location(out).upload_dir(Path(tmp), last=VAE_MARKER)
    checkpoints.delete()
    print(f"prior: VAE {info['params'] / 1e6:.2f} M params, reconstruction MSE {info['eval_mse']:.5f} "
          f"(images in [-1, 1]), latent scale {scale:.4f}, {info['seconds']} s", flush=True)
    return out
