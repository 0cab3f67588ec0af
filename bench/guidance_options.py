"""Measure 9: the cheaper guidance options against the paper's exact path, on a real run's models.

    python bench/guidance_options.py RUN_DIR [SLOTS_PER_CLASS] [STAGE]     (defaults: 2 slots a class, stage 1)

Uses the run's config, prior, reference and the student of stage STAGE-1 (e.g. runs/ablation-fashion-mnist-exact
from docs/ablation_guidance.sh); every option samples the same (class, slot, candidate) noise with the run's kappa,
steps, CFG and window, interleaved. Per option: seconds per kept image and the speed-up over the exact path, the
mean S of the kept images (guidance's aim: higher is what the student has not learned yet), the share of slots
that keep the same candidate as the exact path, and the speed-up `distill --dry-run` counts in FLOPs for this
stage, with the GPU-hours it prints for ImageNet-1K IPC 50 (DiT-XL/2-256, TF32 at 30 %).
"""
import sys
from dataclasses import replace
from pathlib import Path

import torch

from lgd_ray.config import from_dict, load_config
from lgd_ray.data import num_classes
from lgd_ray.guidance import Guide, Scorer
from lgd_ray.methods import stage_plan
from lgd_ray.plan import PEAK_TFLOPS, gpu_hours, make_plan
from lgd_ray.prior import load_prior, prior_id
from lgd_ray.reference import ensure_reference, new_classifier
from lgd_ray.sampler import generate
from lgd_ray.shards import read_manifest, stage_dir
from lgd_ray.train import load_classifier
from parts import interleaved, machine

OPTIONS = {  # name: guidance keys changed from the run's
    "exact": {},
    "every 2": {"every": 2},
    "select_after 20": {"select_after": 20},
    "decoder path": {"through": "decoder"},
    "every 2 + select_after 20": {"every": 2, "select_after": 20},
    "every 2 + select_after 20 + decoder": {"every": 2, "select_after": 20, "through": "decoder"},
}


def main(argv):
    run = Path(argv[0])
    per_class = int(argv[1]) if len(argv) > 1 else 2
    stage_index = int(argv[2]) if len(argv) > 2 else 1
    cfg = from_dict(read_manifest(run)["config"])
    n = num_classes(cfg.data)
    prior = load_prior(prior_id(cfg), cfg.prior.scheduler, dtype=cfg.prior.dtype)
    reference, _ = ensure_reference(cfg, n)
    student, _ = load_classifier(new_classifier(cfg, "student", n), run / stage_dir(stage_index - 1) / "student.safetensors")
    scorer = Scorer(student.requires_grad_(False), reference.requires_grad_(False), cfg.guidance.omega)
    stage = stage_plan(cfg)[stage_index]
    items = [(c, s) for c in range(n) for s in range(stage.slot0, stage.slot0 + per_class)]
    outputs = {}

    def run_option(name, keys):
        g = replace(cfg.guidance, **keys)
        guide = Guide(scorer, g.lambda_, g.gamma, tuple(g.window), g.through, g.norm_scale, cfg.data.image_size,
                      batch=g.batch, every=g.every)

        def sample():
            outputs[name] = generate(prior, items, run_seed=cfg.seed, stage=stage_index, num_steps=cfg.prior.num_steps,
                                     cfg_scale=cfg.prior.cfg_scale, batch_size=cfg.distill.sample_batch,
                                     image_size=cfg.data.image_size, kappa=stage.kappa, scorer=scorer, guide=guide,
                                     select_after=g.select_after)
        return sample

    print(f"# measure 9: guidance options vs the exact path ({machine()})")
    print(f"{run}, stage {stage_index}: {len(items)} slots x kappa {stage.kappa}, {cfg.prior.num_steps} "
          f"{cfg.prior.scheduler} steps, window {cfg.guidance.window}, CFG {cfg.prior.cfg_scale}, lambda "
          f"{cfg.guidance.lambda_}, omega {cfg.guidance.omega}")
    med = interleaved({name: run_option(name, keys) for name, keys in OPTIONS.items()}, repeats=2)
    exact_flops = make_plan(cfg)["stages"][stage_index]["sample_flops"]
    print(f"{'option':<36} {'s/image':>8} {'speed-up':>8} {'FLOPs':>6} {'mean S':>7} {'same pick':>9} {'ImageNet GPU-h':>14}")
    for name, keys in OPTIONS.items():
        over = [f"guidance.{k}={v}" for k, v in keys.items()]
        flops = make_plan(replace(cfg, guidance=replace(cfg.guidance, **keys)))["stages"][stage_index]["sample_flops"]
        hours = gpu_hours(make_plan(load_config("imagenet1k", over))["total_flops"], PEAK_TFLOPS["float32"])
        out = outputs[name]
        same = sum(a.candidate == b.candidate for a, b in zip(out, outputs["exact"])) / len(out)
        print(f"{name:<36} {med[name] / len(items):8.3f} {med['exact'] / med[name]:7.2f}x {exact_flops / flops:5.2f}x "
              f"{sum(o.score for o in out) / len(out):7.3f} {same:9.0%} {hours:14.1f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1:])
