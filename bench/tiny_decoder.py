"""The guided step with the full VAE decoder against the tiny guidance decoder (guidance.decoder=tiny), side by side:
seconds per trajectory-step at the shape of configs/fashion-mnist-latent.yaml on this machine (random weights: the
time depends on shapes only), and the dry-run's GFLOPs per image at that shape and at DiT-XL/2-256 (imagenet1k).

    python bench/tiny_decoder.py [--batch 16] [--repeats 5]

Goals (issue 41): the imagenet1k guided step with the tiny decoder at most 0.6x the full one's FLOPs.
"""
from __future__ import annotations

import argparse

import torch

from lgd_ray.config import load_config
from lgd_ray.cost import run_cost
from lgd_ray.guidance import Guide
from lgd_ray.prior import project_configs
from lgd_ray.tiny_decoder import build_tiny
from parts import interleaved, machine, saved_prior, scorer_for, verdict


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    cfg = load_config("fashion-mnist-latent")
    dit, vae = project_configs(cfg)
    _, prior = saved_prior(dit, vae)
    scorer = scorer_for(prior, cfg.student.model, cfg.data.image_size, cfg.guidance.omega)
    tiny = build_tiny(prior.transformer.config, prior.vae.config, cfg.guidance.tiny_width).eval().requires_grad_(False)
    guides = {"full": Guide.from_config(cfg, scorer), "tiny": Guide.from_config(cfg, scorer, decoder=tiny)}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, *prior.latent_shape, generator=gen)
    classes = [k % prior.num_classes for k in range(a.batch)]
    prior.scheduler.set_timesteps(cfg.prior.num_steps)
    t = prior.scheduler.timesteps[len(prior.scheduler.timesteps) // 2]
    secs = interleaved({k: (lambda g=g: g.eps(prior, x, t, classes, cfg.prior.cfg_scale)) for k, g in guides.items()},
                       a.repeats)
    print(machine())
    print(f"fashion-mnist-latent shape (VAE {cfg.prior.vae_channels}, {prior.latent_shape} latents, tiny width "
          f"{cfg.guidance.tiny_width}: {sum(p.numel() for p in tiny.parameters()) / 1e3:.0f} k params), guided step "
          f"of {a.batch} trajectories:")
    for k, s in secs.items():
        print(f"  {k}: {1e3 * s / a.batch:.2f} ms per trajectory-step")
    print(f"  tiny / full seconds: {secs['tiny'] / secs['full']:.2f}x")
    for name in ("fashion-mnist-latent", "imagenet1k"):
        full, small = (run_cost(load_config(name, [f"guidance.decoder={d}"])) for d in ("full", "tiny"))
        ratio = small["guided_step_gflops"] / full["guided_step_gflops"]
        print(f"{name} dry-run guided step: full {full['guided_step_gflops']:.2f}, tiny {small['guided_step_gflops']:.2f}"
              f" GFLOPs per image: " + (verdict(ratio, 0.6, higher=False) if name == "imagenet1k" else f"{ratio:.2f}x"))


if __name__ == "__main__":
    main()
