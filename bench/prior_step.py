"""Cost of a prior fit's step on this machine, variants side by side in one run: the config's recipe, torch.compile,
larger batches, and wider / deeper / finer-patched DiTs; or configs side by side (--configs: the pixel and the latent
Fashion-MNIST priors' steps, for a fit budget of equal CPU time).

    python bench/prior_step.py fashion-mnist [key=value ...] [--steps 30] [--variants base compile batch-256 ...]
    python bench/prior_step.py fashion-mnist --configs fashion-mnist-latent --variants base

A latent config's DiT steps on the train split's cached latents under its cached VAE (fitted first if the cache
lacks it: the VAE's one-off fit is not in the step time).

Each variant runs the real fit (lgd_ray.prior_fit.fit_prior, in this process) for WARM + --steps steps and times
the last --steps (without start-up, compilation and the fit's closing loss evaluation). Prints one JSON line per variant: seconds a step, steps/s, images/s and the ratio of images/s to
the first variant's, and the DiT's parameters. Stop other work on the machine first: the ratios are what counts.
"""
import argparse
import itertools
import json
import sys
import time
from dataclasses import replace

import torch

from lgd_ray.config import load_config
from lgd_ray.data import load_split, num_classes
from lgd_ray.prior_fit import fit_prior
from lgd_ray.finetune import read_latents
from lgd_ray.prior_make import latent_data, project_job
from lgd_ray.train import in_process_fitter

WARM = 5
VARIANTS = {  # name: overrides of the config's prior
    "base": [],
    "compile": ["prior.compile=true"],
    "batch-256": ["prior.batch_size=256"],
    "wide": ["prior.head_dim=64"],
    "deep": ["prior.depth=8"],
    "patch-2": ["prior.patch_size=2"],
}


class StepClock:
    """A fit's progress bar that records when each step ended."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        self.times = []

    def update(self, n: int):
        self.times.append(time.perf_counter())

    def set_description(self, desc: str):
        pass

    def close(self):
        pass


def seconds_per_step(cfg, steps: int) -> float:
    """One fit of WARM + steps steps; the seconds of the last `steps` (after start-up and compilation)."""
    data = (read_latents(latent_data(cfg, in_process_fitter())[1]) if cfg.prior.latent_channels
            else load_split(cfg.data, "train"))
    job = replace(project_job(cfg, lambda: data, num_classes(cfg.data)), checkpoints="",
                  prior=replace(cfg.prior, train_steps=WARM + steps, checkpoint_steps=WARM + steps))
    clocks = []
    fit_prior(job, bar=lambda *a: clocks.append(StepClock(*a)) or clocks[-1])
    times = clocks[0].times
    return (times[-1] - times[WARM - 1]) / steps


def main(argv):
    parser = argparse.ArgumentParser(prog="bench/prior_step.py")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--configs", nargs="+", default=[], help="more configs, each with every variant")
    args = parser.parse_intermixed_args(argv)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps}))
    first = None
    for config, name in itertools.product([args.config] + args.configs, args.variants):
        cfg = load_config(config, args.overrides + VARIANTS[name])
        s = seconds_per_step(cfg, args.steps)
        images = cfg.prior.batch_size / s
        first = first or images
        params = sum(t.numel() for t in project_job(cfg, None, num_classes(cfg.data)).build().parameters())
        print(json.dumps({"config": config, "variant": name, "overrides": VARIANTS[name],
                          "params_M": round(params / 1e6, 2), "batch": cfg.prior.batch_size, "s_per_step": round(s, 4),
                          "steps_per_s": round(1 / s, 3), "images_per_s": round(images, 1),
                          "images_per_s_vs_first": round(images / first, 3)}), flush=True)

if __name__ == "__main__":
    main(sys.argv[1:])
