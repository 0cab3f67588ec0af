"""Training a class-conditional DiT prior in plain PyTorch, step by step and resumable: the project's pixel DiT from
scratch, or a pretrained latent DiT fine-tuned on a data set's own classes (on cached latents).

Every step draws its batch, noise, timesteps and label dropout from a generator seeded by (job seed, step, rank), so a
fit resumed from a checkpoint continues exactly as the uninterrupted fit would (bit for bit on the CPU). With `world`
DDP ranks each rank takes batch_size / world samples a step from its own share of the data.
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.utils import logging as diffusers_logging

from lgd_ray.config import PriorConfig
from lgd_ray.data import TensorSet, to_float
from lgd_ray.prior import PIPELINE_MARKER
from lgd_ray.seeding import generator
from lgd_ray.storage import Location, as_location
from lgd_ray.train import Bar, Fitter, rank_slice, terminal_bar, to_cpu

EVAL_SAMPLES = 512  # fixed draws of the unweighted denoising loss recorded after the fit


@dataclass(kw_only=True)
class PriorJob:
    """One prior fit, picklable so that a Ray Train worker can run it as well as this process.

    build() gives the transformer to train (its label table must have the data's classes plus the null class);
    load_data() the training inputs (uint8 pixels, or float latents already scaled) with labels; noise: the DDPMScheduler
    config of the training noise. checkpoints: a folder (path or URI) of this prior's own: a fit continues from the
    newest checkpoint found there, so a crashed driver's fit resumes when run again.
    """

    prior: PriorConfig
    build: Callable[[], DiTTransformer2DModel]
    load_data: Callable[[], TensorSet]
    noise: dict
    seed: int
    checkpoints: str = ""
    name: str = "prior"
    output: str = "ema"  # the state returned: the EMA of the weights
    checkpoint_every: int = 1  # rounds between checkpoints (a round is prior.checkpoint_steps steps)

    @property
    def rounds(self) -> int:
        return math.ceil(self.prior.train_steps / self.prior.checkpoint_steps)

    def run(self, device="cpu", rank: int = 0, world: int = 1, wrap=None, on_round=None, resume=None,
            bar: Bar = terminal_bar):
        return fit_prior(self, device, rank, world, wrap, on_round, resume, bar)


def loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of the epsilon loss, min(SNR, gamma) / SNR (Hang et al. 2023); ones when gamma is 0."""
    if gamma <= 0:
        return torch.ones(len(t), device=t.device)
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


def vlb_bits(noise_sched: DDPMScheduler, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             v: torch.Tensor) -> torch.Tensor:
    """Per sample, in bits per dimension, the VLB term that trains a learned-sigma DiT's variance (Nichol & Dhariwal
    2021, as DiT trains it): KL(q(x_t-1 | x_t, x0) || p(x_t-1 | x_t)) for t > 0, the Gaussian NLL of x0 at t = 0.
    The model's variance interpolates log beta_t and the clipped log posterior variance by (v + 1) / 2; its mean
    comes from `eps` (pass it detached: the term then trains only the variance)."""
    shape = (-1, 1, 1, 1)
    betas = noise_sched.betas.to(x0.device, torch.float32)
    abar = noise_sched.alphas_cumprod.to(x0.device, torch.float32)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped: the variance at t = 0 is 0
    coef_x0 = (betas * abar_prev.sqrt() / (1 - abar))[t].view(shape)
    coef_xt = ((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar))[t].view(shape)
    a = abar[t].view(shape)
    x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    mean_model, mean_true = coef_x0 * x0_hat + coef_xt * x_t, coef_x0 * x0 + coef_xt * x_t
    frac = (v + 1) / 2
    log_var = frac * betas.log()[t].view(shape) + (1 - frac) * post_log[t].view(shape)
    true_log = post_log[t].view(shape)
    kl = 0.5 * (-1 + log_var - true_log + (true_log - log_var).exp() + (mean_true - mean_model).pow(2) * (-log_var).exp())
    nll = 0.5 * (math.log(2 * math.pi) + log_var + (x0 - mean_model).pow(2) * (-log_var).exp())
    return torch.where((t == 0).view(shape), nll, kl).mean(dim=(1, 2, 3)) / math.log(2)


def _step_inputs(data: TensorSet, batch: int, null: int, dropout: float, timesteps: int, gen: torch.Generator, device):
    idx = torch.randint(len(data.labels), (batch,), generator=gen)
    x0 = data.images[idx.to(data.images.device)]
    x0 = to_float(x0) if x0.dtype == torch.uint8 else x0.float()  # pixels, or (float16) latents
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(timesteps, (batch,), generator=gen)
    drop = torch.rand(batch, generator=gen) < dropout
    y = torch.where(drop, null, data.labels[idx.to(data.labels.device)].cpu())
    return x0.to(device), noise.to(device), t.to(device), y.to(device)


def denoising_loss(model, data: TensorSet, noise_sched: DDPMScheduler, seed: int, n: int = EVAL_SAMPLES,
                   batch: int = 128) -> float:
    """The unweighted epsilon MSE of `model` on n fixed draws (images, noise, timesteps; labels kept): comparable
    across recipes and fits, whatever their loss weighting."""
    device, total = next(model.parameters()).device, 0.0
    gen = generator(seed, "eval-loss")
    with torch.no_grad():
        for i in range(0, n, batch):
            x0, noise, t, y = _step_inputs(data, min(batch, n - i), 0, 0.0, noise_sched.config.num_train_timesteps,
                                           gen, device)
            pred = model(noise_sched.add_noise(x0, noise, t), timestep=t, class_labels=y).sample[:, :x0.shape[1]]
            total += (pred - noise).pow(2).mean(dim=(1, 2, 3)).sum().item()
    return total / n


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The fits' learning-rate schedule: linear warm-up over steps / 20, then cosine decay to 0 at `steps`."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))


def descend(loss: torch.Tensor, params, opt: torch.optim.Optimizer, sched):
    """One optimiser step on `loss`, its gradient clipped to norm 1, then the schedule's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def after_step(name: str, done: int, steps: int, every: int, losses: list, progress, on_round, state, digits: int = 4):
    """After step `done` of `steps`: the bar advanced (its loss every 50 steps), and every `every` steps and at the
    end on_round(round, {step, loss}, state) (state() builds the checkpoint, only when called)."""
    progress.update(1)
    if done % 50 == 0:
        progress.set_description(f"{name} loss {torch.stack(losses[-50:]).mean().item():.{digits}f}")
    if on_round and (done % every == 0 or done == steps):
        on_round(math.ceil(done / every) - 1, {"step": done, "loss": torch.stack(losses[-every:]).mean().item()},
                 lambda: state(done))


def fit_prior(job: PriorJob, device="cpu", rank: int = 0, world: int = 1, wrap=None,
              on_round: Callable[[int, dict, Callable[[], dict]], None] | None = None,
              resume: dict | None = None, bar: Bar = terminal_bar) -> tuple[dict, dict]:
    """Train the job's DiT with the epsilon MSE (min-SNR-gamma weighted if prior.min_snr_gamma > 0), label dropout,
    AdamW with warm-up and cosine decay, gradient clipping and an EMA of the weights (with warm-up).

    on_round(round, metrics, state) after every prior.checkpoint_steps steps; state() is what resumes the fit (weights,
    EMA, optimizer, scheduler, step, seconds so far; CPU tensors); bar: the progress bar of the steps (with the loss).
    Returns (EMA state dict on the CPU, metrics); metrics' seconds count every sitting of a resumed fit.
    """
    p = job.prior
    if p.batch_size % world:
        raise ValueError(f"prior.batch_size {p.batch_size} is not a multiple of the {world} workers")
    device = torch.device(device)
    torch.manual_seed(job.seed)  # the same initial weights on every rank
    model = job.build()
    null = model.config.num_embeds_ada_norm
    # diffusers gives every block its own label embedder, each dropping labels independently in train mode;
    # drop them here instead, once per sample, so all blocks see the same (possibly null) label.
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    model.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if p.checkpointing:  # after the copy: the EMA model never runs a backward
        model.enable_gradient_checkpointing()
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.autocast == "bfloat16")
    noise_sched = DDPMScheduler.from_config(job.noise)
    alphas = noise_sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, p.train_steps)
    first, before = 0, 0.0  # before: seconds the fit ran in earlier sittings
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        first, before = resume["step"], float(resume.get("seconds", 0.0))  # (checkpoints before 2026-11-30 lack it)
    net = wrap(model) if wrap else model
    if p.compile:
        net = torch.compile(net)
    data = rank_slice(job.load_data(), rank, world, job.seed)
    data = TensorSet(data.images.to(device), data.labels.to(device), data.num_classes)
    batch, losses, start = p.batch_size // world, [], time.time()

    def state(step: int) -> dict:
        return {"step": step, "seconds": before + time.time() - start, "model": to_cpu(model.state_dict()),
                "ema": to_cpu(ema.state_dict()), "optimizer": to_cpu(opt.state_dict()),
                "scheduler": to_cpu(sched.state_dict())}

    progress = bar(p.train_steps, job.name, first)
    for step in range(first, p.train_steps):
        x0, noise, t, y = _step_inputs(data, batch, null, p.label_dropout, noise_sched.config.num_train_timesteps,
                                       generator(job.seed, "step", step, rank), device)
        x_t = noise_sched.add_noise(x0, noise, t)
        with autocast():
            out = net(x_t, timestep=t, class_labels=y).sample.float()
        pred = out[:, :x0.shape[1]]
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weights(alphas, t, p.min_snr_gamma)).mean()
        if out.shape[1] == 2 * x0.shape[1]:  # learned sigma: its channels trained by the VLB
            loss = loss + vlb_bits(noise_sched, x0, x_t, t, pred.detach(), out[:, x0.shape[1]:]).mean()
        descend(loss, model.parameters(), opt, sched)
        with torch.no_grad():  # EMA with warm-up, so the random init does not linger in the average
            decay = min(p.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.detach())
        after_step(job.name, step + 1, p.train_steps, p.checkpoint_steps, losses, progress, on_round, state)
    progress.close()
    metrics = {"step": p.train_steps, "workers": world, "seconds": round(before + time.time() - start, 1),
               "params": sum(x.numel() for x in model.parameters()),
               "final_loss": torch.stack(losses[-100:]).mean().item() if losses else float("nan"),
               "eval_loss": denoising_loss(ema, data, noise_sched, job.seed)}
    return {k: v.detach().cpu() for k, v in ema.state_dict().items()}, metrics


def train_prior(job: PriorJob, out: Location, fitter: Fitter, vae: AutoencoderKL | None = None) -> dict:
    """Fit the job's DiT (with `fitter`: in this process or on Ray Train) and save its EMA weights (save_prior);
    returns the fit's info."""
    weights, metrics = fitter(job)
    info = {"steps": metrics["step"], **{k: metrics[k] for k in ("workers", "seconds", "params", "final_loss",
                                                                  "eval_loss")}}
    save_prior(job, weights, info, out, vae)
    if job.checkpoints:
        Location(job.checkpoints).delete()
    return info


def save_prior(job: PriorJob, weights: dict, info: dict, out: Location, vae: AutoencoderKL | None = None):
    """The job's DiT with `weights` as a DiTPipeline with `vae` and the training noise schedule, in `out`
    (model_index.json last), beside train_info.json (`info`)."""
    torch.manual_seed(job.seed)
    transformer = job.build()
    transformer.load_state_dict(weights)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=DDPMScheduler.from_config(job.noise))
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # a pixel DiT has no VAE, which diffusers warns "cannot be saved"
        try:
            pipe.save_pretrained(tmp)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        (Path(tmp) / "train_info.json").write_text(json.dumps(info, indent=1))
        as_location(out).upload_dir(Path(tmp), last=PIPELINE_MARKER)
