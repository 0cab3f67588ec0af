"""Measure 9: the cheaper guidance options against the paper's exact path, on a real run's models.

    python bench/guidance_options.py RUN_DIR [--slots 2] [--stage 1] [--options "every 2,bf16 weights"] [--repeats 2]

Uses the run's config, prior, reference and the student of stage STAGE-1 (e.g. runs/ablation-fashion-mnist-exact
from docs/ablation_guidance.sh); every option samples the same (class, slot, candidate) noise with the run's kappa,
steps, CFG and window, interleaved. Per option: seconds per kept image and the speed-up over the exact path, the
mean S of the kept images (guidance's aim: higher is what the student has not learned yet), the share of slots
that keep the same candidate as the exact path, and the speed-up `distill --dry-run` counts in FLOPs for this
stage, with the GPU-hours it prints for ImageNet-1K IPC 50 (DiT-XL/2-256 at 30 % of the H100 peak of the option's
dtype: TF32 for float32). On a CPU without bfloat16 units, the bf16 row's seconds say nothing about a GPU.
"""
import argparse
import copy
from pathlib import Path

import torch

from lgd_ray.config import apply_overrides, build_config, load_config
from lgd_ray.data import num_classes
from lgd_ray.guidance import Guide, Scorer
from lgd_ray.cost import PEAK_TFLOPS, UTILISATION, gpu_hours, run_cost
from lgd_ray.methods import stage_plan
from lgd_ray.prior import configured_prior, prior_id
from lgd_ray.reference import ensure_reference, new_classifier
from lgd_ray.sampler import generate
from lgd_ray.shards import read_manifest, stage_dir
from lgd_ray.train import load_classifier
from parts import interleaved, machine

OPTIONS = {  # name: keys changed from the run's config
    "exact": [],
    "every 2": ["guidance.every=2"],
    "select_after 20": ["guidance.select_after=20"],
    "decoder path": ["guidance.through=decoder"],
    "every 2 + select_after 20": ["guidance.every=2", "guidance.select_after=20"],
    "every 2 + select_after 20 + decoder": ["guidance.every=2", "guidance.select_after=20", "guidance.through=decoder"],
    "bf16 weights": ["prior.dtype=bfloat16"],
}


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--slots", type=int, default=2, help="slots a class")
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--options", default=",".join(OPTIONS), help="comma list of: " + ", ".join(OPTIONS))
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds after one untimed round")
    a = ap.parse_args(argv)
    names = ["exact"] + [n for n in a.options.split(",") if n != "exact"]
    if unknown := [n for n in names if n not in OPTIONS]:
        ap.error(f"unknown options {unknown}; choose from {list(OPTIONS)}")
    run = a.run
    base = read_manifest(run)["config"]
    cfgs = {n: build_config(apply_overrides(copy.deepcopy(base), OPTIONS[n])) for n in names}
    cfg = cfgs["exact"]
    n = num_classes(cfg.data)
    priors = {d: configured_prior(cfg, prior_id(cfg), dtype=d) for d in {c.prior.dtype for c in cfgs.values()}}
    reference, _ = ensure_reference(cfg, n)
    student, _ = load_classifier(new_classifier(cfg, "student", n), run / stage_dir(a.stage - 1) / "student.safetensors")
    scorer = Scorer(student.requires_grad_(False), reference.requires_grad_(False), cfg.guidance.omega)
    stage = stage_plan(cfg)[a.stage]
    items = [(c, s) for c in range(n) for s in range(stage.slot0, stage.slot0 + a.slots)]
    outputs = {}

    def run_option(name):
        c = cfgs[name]
        guide = Guide.from_config(c, scorer, stage=a.stage)

        def sample():
            outputs[name] = generate(priors[c.prior.dtype], items, run_seed=c.seed, stage=a.stage,
                                     num_steps=c.prior.num_steps, cfg_scale=c.prior.cfg_scale,
                                     batch_size=c.distill.sample_batch, image_size=c.data.image_size, kappa=stage.kappa,
                                     scorer=scorer, guide=guide, select_after=c.guidance.select_after)
        return sample

    print(f"# measure 9: guidance options vs the exact path ({machine()})")
    print(f"{run}, stage {a.stage}: {len(items)} slots x kappa {stage.kappa}, {cfg.prior.num_steps} "
          f"{cfg.prior.scheduler} steps, window {cfg.guidance.window}, CFG {cfg.prior.cfg_scale}, lambda "
          f"{cfg.guidance.lambda_}, omega {cfg.guidance.omega}, prior weights {cfg.prior.dtype}")
    med = interleaved({name: run_option(name) for name in names}, repeats=a.repeats)
    exact_flops = run_cost(cfg)["stages"][a.stage]["sample_flops"]
    print(f"{'option':<36} {'s/image':>8} {'speed-up':>8} {'FLOPs':>6} {'mean S':>7} {'same pick':>9} {'ImageNet GPU-h':>14}")
    for name in names:
        flops = run_cost(cfgs[name])["stages"][a.stage]["sample_flops"]
        imagenet = load_config("imagenet1k", OPTIONS[name])
        hours = gpu_hours(run_cost(imagenet)["total_flops"], PEAK_TFLOPS[imagenet.prior.dtype],
                          UTILISATION[imagenet.prior.dtype])
        out = outputs[name]
        same = sum(x.candidate == y.candidate for x, y in zip(out, outputs["exact"])) / len(out)
        print(f"{name:<36} {med[name] / len(items):8.3f} {med['exact'] / med[name]:7.2f}x {exact_flops / flops:5.2f}x "
              f"{sum(o.score for o in out) / len(out):7.3f} {same:9.0%} {hours:14.1f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(None)
