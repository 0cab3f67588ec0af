"""Fitting the tiny guidance decoder (lgd_ray/tiny_decoder.py) to a latent prior's VAE decoder, in this process or
on Ray Train (checkpointed, resumable like the prior's fit), on the train split's latents and the x0^ of unguided
trajectories at the guided steps (the two kinds of latents the guided step decodes), the full decoder's images as
targets; made by the driver before any actor starts.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from safetensors.torch import save

from lgd_ray.config import Config, ConfigError, GuidanceConfig
from lgd_ray.data import TensorSet, num_classes
from lgd_ray.finetune import base_vae, cache_latents, read_latents
from lgd_ray.guidance import guided_steps
from lgd_ray.lease import cache_lock
from lgd_ray.prior import Prior, configured_prior
from lgd_ray.prior_fit import after_step, descend, warmup_cosine
from lgd_ray.sampler import sample
from lgd_ray.seeding import derive_seed, generator
from lgd_ray.storage import Location
from lgd_ray.tiny_decoder import VAE_WEIGHTS, TinyDecoder, build_tiny, tiny_path
from lgd_ray.train import Bar, Fitter, info_location, rank_slice, terminal_bar, to_cpu


@dataclass(kw_only=True)
class TinyJob:
    """One tiny-decoder fit, picklable for a Ray Train worker; the protocol of PriorJob (run, rounds, checkpoints)."""

    guidance: GuidanceConfig
    prior_id: str  # the latent prior (its VAE decodes the targets)
    local_cache: str
    build: Callable[[], TinyDecoder]
    load_data: Callable[[], TensorSet]  # the latents to decode (labels unused)
    seed: int
    batch_size: int
    checkpoint_steps: int
    checkpoints: str = ""
    name: str = "tiny-decoder"
    output: str = "model"
    checkpoint_every: int = 1

    @property
    def rounds(self) -> int:
        return math.ceil(self.guidance.tiny_steps / self.checkpoint_steps)

    def run(self, device="cpu", rank: int = 0, world: int = 1, wrap=None, on_round=None, resume=None,
            bar: Bar = terminal_bar):
        return fit_tiny(self, device, rank, world, wrap, on_round, resume, bar)


def fit_tiny(job: TinyJob, device="cpu", rank: int = 0, world: int = 1, wrap=None,
             on_round: Callable[[int, dict, Callable[[], dict]], None] | None = None,
             resume: dict | None = None, bar: Bar = terminal_bar) -> tuple[dict, dict]:
    """Fit the tiny decoder to the full decoder's images (mean squared error) with AdamW, warm-up and cosine decay;
    each step's batch drawn from (job seed, step, rank), so a resumed fit continues as the uninterrupted one."""
    steps = job.guidance.tiny_steps
    if job.batch_size % world:
        raise ValueError(f"batch {job.batch_size} is not a multiple of the {world} workers")
    device = torch.device(device)
    torch.manual_seed(job.seed)
    tiny = job.build().to(device).train()
    vae = base_vae(job.prior_id, job.local_cache).to(device)  # the VAE alone: the DiT is not needed here
    opt = torch.optim.AdamW(tiny.parameters(), lr=job.guidance.tiny_lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    first, before = 0, 0.0
    if resume is not None:
        tiny.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        first, before = resume["step"], float(resume["seconds"])
    net = wrap(tiny) if wrap else tiny
    data = rank_slice(job.load_data(), rank, world, job.seed)
    batch, losses, start = job.batch_size // world, [], time.time()

    def decode(z):
        with torch.no_grad():
            return vae.decode(z / vae.config.scaling_factor).sample

    def state(step: int) -> dict:
        return {"step": step, "seconds": before + time.time() - start, "model": to_cpu(tiny.state_dict()),
                "optimizer": to_cpu(opt.state_dict()), "scheduler": to_cpu(sched.state_dict())}

    progress = bar(steps, job.name, first)
    for step in range(first, steps):
        z = data.images[torch.randint(len(data.images), (batch,), generator=generator(job.seed, "step", step, rank))]
        z = z.float().to(device)
        loss = (net(z) - decode(z)).pow(2).mean()
        descend(loss, tiny.parameters(), opt, sched)
        losses.append(loss.detach())
        after_step(job.name, step + 1, steps, job.checkpoint_steps, losses, progress, on_round, state, digits=5)
    progress.close()
    tiny.eval()
    with torch.no_grad():
        held = data.images[-512:].float().to(device)  # the last latents: trajectories' x0^ (see tiny_data)
        mse = (tiny(held) - decode(held)).pow(2).mean().item()
    metrics = {"step": steps, "workers": world, "seconds": round(before + time.time() - start, 1),
               "params": sum(t.numel() for t in tiny.parameters()),
               "final_loss": torch.stack(losses[-100:]).mean().item() if losses else float("nan"), "x0_mse": mse}
    return to_cpu(tiny.state_dict()), metrics


@torch.no_grad()
def trajectory_latents(prior: Prior, cfg: Config, per_class: int, seed: int) -> torch.Tensor:
    """x0^ of unguided trajectories (per_class per class of the data set, the config's steps and CFG) at every guided
    step index."""
    n_classes, steps = num_classes(cfg.data), cfg.prior.num_steps
    guided = set(guided_steps(tuple(cfg.guidance.window), cfg.guidance.every, steps))
    out = []
    for c in range(n_classes):
        labels = torch.full((per_class,), c)
        x = None
        gens = [generator(seed, "tiny-trajectory", c, i) for i in range(per_class)]
        for index in reversed(range(steps)):
            x, x0 = sample(prior, labels, gens, steps, cfg.prior.cfg_scale, x=x, first=index, last=index)
            if index in guided:
                out.append(x0.cpu())
    return torch.cat(out)


def tiny_data(cfg: Config, prior_id: str, latents_id: str, seed: int) -> TensorSet:
    """The fit's latents: the train split's cached latents, then the trajectories' x0^ (last)."""
    data = read_latents(Location(latents_id))
    prior = configured_prior(cfg, prior_id, dtype="float32")  # trajectories in float32, whatever cfg.prior.dtype is
    x0 = trajectory_latents(prior, cfg, cfg.guidance.tiny_trajectories, seed)
    return TensorSet(torch.cat([data.images.float(), x0]), torch.zeros(len(data.images) + len(x0), dtype=torch.long),
                     data.num_classes)


def ensure_tiny(cfg: Config, prior_id: str, fitter: Fitter) -> dict:
    """Fit and cache the tiny decoder of a latent prior if it is not there (the driver, under the entry's lease; the
    train split encoded with the prior's VAE first, once); returns its info."""
    if not (Location(prior_id) / VAE_WEIGHTS).exists():
        raise ConfigError(f"config: 'guidance.decoder' tiny stands in for a latent prior's VAE decoder; {prior_id} "
                          "has no VAE (a pixel DiT): set guidance.decoder=full")
    path = tiny_path(cfg, prior_id)
    info_loc = info_location(path)
    if path.exists():
        return json.loads(info_loc.read_text())
    with cache_lock(cfg.cache, path.name, cfg.storage.lease_s, cfg.storage.retry_s) as lease:
        if path.exists():
            return json.loads(info_loc.read_text())
        g = cfg.guidance
        print(f"guidance: fitting a tiny decoder to {prior_id}'s VAE decoder ({g.tiny_steps} steps) -> {path}",
              flush=True)
        vae_config = json.loads((Location(prior_id) / "vae" / "config.json").read_text())
        size = vae_config["sample_size"]
        latents_id = str(cache_latents(cfg, size if isinstance(size, int) else size[0], prior_id))
        configs = {k: json.loads((Location(prior_id) / k / "config.json").read_text()) for k in ("transformer", "vae")}
        seed = derive_seed(cfg.seed, "tiny-decoder")
        job = TinyJob(guidance=g, prior_id=prior_id, local_cache=cfg.local_cache,
                      build=partial(build_tiny, configs["transformer"], configs["vae"], g.tiny_width),
                      load_data=partial(tiny_data, cfg, prior_id, latents_id, seed), seed=seed,
                      batch_size=cfg.prior.batch_size, checkpoint_steps=cfg.prior.checkpoint_steps,
                      checkpoints=Location(path.uri.replace(".safetensors", "-checkpoints")).uri)
        state, metrics = lease.fenced(fitter)(job)
        info = {k: metrics[k] for k in ("step", "workers", "seconds", "params", "final_loss", "x0_mse")}
        info_loc.write_text(json.dumps(info, indent=1))
        path.write_bytes(save(state))
        Location(job.checkpoints).delete()
    print(f"guidance: tiny decoder {info['params'] / 1e3:.0f} k params, x0^ MSE to the full decoder "
          f"{info['x0_mse']:.5f}, {info['seconds']} s", flush=True)
    return info
