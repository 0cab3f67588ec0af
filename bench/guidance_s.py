"""Mean S of the final images of one stage, unguided vs learnability-guided, for a grid of lambda, window and path.

    python bench/guidance_s.py RUN_DIR [STAGE]      (default stage 1: guided by the run's theta_0)

Uses the run's config, prior, reference and the student checkpoint of stage STAGE-1; every setting samples the same
(class, slot) noise, so the rows differ only by the guidance.
"""
import sys
from dataclasses import replace
from pathlib import Path

import torch

from lgd_ray.config import from_dict
from lgd_ray.data import num_classes
from lgd_ray.guidance import Guide, Scorer
from lgd_ray.methods import stage_plan
from lgd_ray.prior import configured_prior, prior_id
from lgd_ray.reference import ensure_reference, new_classifier
from lgd_ray.sampler import generate
from lgd_ray.shards import read_manifest, stage_dir
from lgd_ray.train import load_classifier

LAMBDAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
PATHS = ("denoiser", "decoder")


def main(argv):
    run = Path(argv[0])
    stage_index = int(argv[1]) if len(argv) > 1 else 1
    cfg = from_dict(read_manifest(run)["config"])
    n = num_classes(cfg.data)
    prior = configured_prior(cfg, prior_id(cfg))
    reference, _ = ensure_reference(cfg, n)
    student, _ = load_classifier(new_classifier(cfg, "student", n), run / stage_dir(stage_index - 1) / "student.safetensors")
    scorer = Scorer(student.requires_grad_(False), reference.requires_grad_(False), cfg.guidance.omega)
    stage = stage_plan(cfg)[stage_index]
    items = [(c, s) for c in range(n) for s in range(stage.slot0, stage.slot0 + stage.ipc)]
    last = cfg.prior.num_steps - 1
    windows = (tuple(cfg.guidance.window), (0, cfg.guidance.window[1]), (0, last))

    def mean_s(guide):
        out = generate(prior, items, run_seed=cfg.seed, stage=stage_index, num_steps=cfg.prior.num_steps,
                       cfg_scale=cfg.prior.cfg_scale, batch_size=cfg.distill.sample_batch,
                       image_size=cfg.data.image_size, scorer=scorer, guide=guide)
        return [sum(getattr(o, f) for o in out) / len(out) for f in ("score", "ce_student", "ce_reference")]

    print(f"{len(items)} images, stage {stage_index}, omega {cfg.guidance.omega}, kappa 1")
    print(f"{'lambda':>6} {'window':>9} {'path':>8} {'mean S':>8} {'CE stud':>8} {'CE ref':>8}")
    print(f"{0:>6} {'-':>9} {'-':>8} " + " ".join(f"{v:8.3f}" for v in mean_s(None)))
    for lam in LAMBDAS:
        for window in windows:
            for path in PATHS:
                guide = replace(Guide.from_config(cfg, scorer, stage=stage_index), lambda_=lam, gamma=0.0,
                                window=window, through=path)
                print(f"{lam:>6} {str(list(window)):>9} {path:>8} " + " ".join(f"{v:8.3f}" for v in mean_s(guide)),
                      flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1:])
