"""Measure 10: the fixed cost of a Ray Train fit against the same fit in this process, side by side.

    python bench/train_fixed_cost.py [REPEATS]      (default 3)

The job is a stage's student fit of the digits demo (ConvNet-2 on 50 images, 100 epochs: about 2 s of training).
Each repeat runs it in this process, then through `ray_fitter` (one CPU worker, the demo's resources) on a local Ray
started once; the difference is what a fit pays for Ray Train (controller, worker group, placement, reports,
checkpoints). Both give the same weights (one thread each).
"""
import sys
import tempfile
import time
from functools import partial

import ray
import torch

from lgd_ray.config import load_config
from lgd_ray.data import TensorSet, load_split
from lgd_ray.ray_train import ray_fitter
from lgd_ray.reference import fit_job
from lgd_ray.train import in_process_fitter
from parts import machine


def demo_student_set(cfg) -> TensorSet:
    """50 real digits (5 per class): the size of the demo's seed increment."""
    train = load_split(cfg.data, "train")
    idx = torch.cat([(train.labels == c).nonzero().squeeze(1)[:5] for c in range(10)])
    return TensorSet(train.images[idx], train.labels[idx], 10)


def main(argv):
    repeats = int(argv[0]) if argv else 3
    cfg = load_config("digits")
    job = fit_job(cfg, "student", 10, partial(demo_student_set, cfg), seed=0)
    torch.set_num_threads(max(1, round(cfg.ray.train_cpus_per_worker)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = {"in process": [], "Ray Train": []}
    with tempfile.TemporaryDirectory() as tmp:
        fitters = {"in process": in_process_fitter(), "Ray Train": ray_fitter(cfg, tmp)}
        weights = {}
        for _ in range(repeats):
            for name, fitter in fitters.items():
                start = time.perf_counter()
                weights[name] = fitter(job)[0]
                rows[name].append(time.perf_counter() - start)
    ray.shutdown()
    same = all(torch.equal(weights["in process"][k], weights["Ray Train"][k]) for k in weights["in process"])
    med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    print(f"# measure 10: a Ray Train fit's fixed cost ({machine()})")
    print(f"student fit of the digits demo ({job.train.epochs} epochs on 50 images), median of {repeats}: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in med.items()))
    print(f"fixed cost of Ray Train: {med['Ray Train'] - med['in process']:.1f} s a fit "
          f"({med['Ray Train'] / med['in process']:.1f}x the fit in process); same weights: {same}")
    print("all runs (s): " + "; ".join(f"{k} " + ", ".join(f"{t:.1f}" for t in v) for k, v in rows.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
