"""Measure 9: the cheaper guidance options against the paper's exact path, per kept image.

    python bench/guidance_options.py [SLOTS]      (default 8 slots of one guided stage)

The pixel DiT of configs/fashion-mnist.yaml (random weights: time depends on shapes) sampled as that config's
guided stages are: DDPM 50 steps, CFG 2, window [10, 45], kappa 3 candidates per slot, ConvNet-3 student and
reference. Each option runs the same slots, interleaved; beside each measured ratio to the exact path, the ratio
`distill --dry-run` counts in FLOPs for a guided stage (fashion-mnist), and the GPU-hours it prints for ImageNet-1K
IPC 50 (DiT-XL/2-256, TF32 at 30 %).
"""
import sys

import torch
from diffusers import DDPMScheduler

from lgd_ray.config import load_config
from lgd_ray.guidance import Guide
from lgd_ray.plan import PEAK_TFLOPS, gpu_hours, make_plan
from lgd_ray.sampler import generate
from parts import interleaved, machine, pixel_prior, scorer_for

OPTIONS = {  # name: config overrides of the guidance section
    "exact": [],
    "every 2": ["guidance.every=2"],
    "select_after 20": ["guidance.select_after=20"],
    "decoder path": ["guidance.through=decoder"],
    "every 2 + select_after 20": ["guidance.every=2", "guidance.select_after=20"],
    "every 2 + select_after 20 + decoder": ["guidance.every=2", "guidance.select_after=20", "guidance.through=decoder"],
}


def main(argv):
    slots = int(argv[0]) if argv else 8
    print(f"# measure 9: guidance options vs the exact path, per kept image ({machine()})")
    prior = pixel_prior()
    prior.scheduler = DDPMScheduler.from_config(prior.scheduler.config)  # the config's sampler
    scorer = scorer_for(prior)
    base = load_config("fashion-mnist")
    items = [(i % prior.num_classes, i) for i in range(slots)]

    def run(overrides):
        g = load_config("fashion-mnist", overrides).guidance
        guide = Guide(scorer, g.lambda_, g.gamma, tuple(g.window), g.through, g.norm_scale, prior.image_size, every=g.every)
        return lambda: generate(prior, items, run_seed=0, stage=1, num_steps=base.prior.num_steps,
                                cfg_scale=base.prior.cfg_scale, batch_size=64, image_size=prior.image_size,
                                kappa=g.kappa, scorer=scorer, guide=guide, select_after=g.select_after)

    torch.manual_seed(0)
    med = interleaved({name: run(o) for name, o in OPTIONS.items()}, repeats=3)
    print(f"{slots} slots x kappa {base.guidance.kappa}, {base.prior.num_steps} steps, window {base.guidance.window}, "
          f"CFG {base.prior.cfg_scale}; seconds per kept image, ratio to exact; FLOP ratio of a guided stage "
          "(dry-run, fashion-mnist); ImageNet-1K IPC 50 GPU-hours (dry-run)")
    flops = {}
    for name, overrides in OPTIONS.items():
        stage = make_plan(load_config("fashion-mnist", overrides))["stages"][1]
        imagenet = make_plan(load_config("imagenet1k", overrides))
        flops[name] = stage["sample_flops"]
        hours = gpu_hours(imagenet["total_flops"], PEAK_TFLOPS["float32"])
        print(f"  {name:<36} {med[name] / slots:6.3f} s/image  {med['exact'] / med[name]:5.2f}x faster  "
              f"FLOPs {flops['exact'] / flops[name]:5.2f}x fewer  ImageNet-1K {hours:5.1f} GPU-h")


if __name__ == "__main__":
    main(sys.argv[1:])
