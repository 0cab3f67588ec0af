"""Measure 4: images per second of one guided stage with 1 and with 2 sampler actors on local Ray, side by side.

    python bench/actors.py [CONFIG] [key=value ...]      (default: digits; the prior/reference come from the cache)

Each timed call starts its actors and kills them at the end, as every stage of a run does (the prior and reference
are loaded from the cache each time); one untimed call per pool first warms the caches. The runs alternate 1, 2,
1, 2 ... and the median of each is reported with the ratio (goal >= 1.7x).
"""
import sys
import tempfile
from pathlib import Path

import ray

from lgd_ray.actors import SamplerPool
from lgd_ray.config import load_config
from lgd_ray.data import num_classes
from lgd_ray.methods import stage_plan
from lgd_ray.prior_make import ensure_prior
from lgd_ray.reference import ensure_reference, new_classifier
from lgd_ray.data import class_chunks
from lgd_ray.plan import ChunkTask
from parts import interleaved, machine, verdict

REPEATS = 3


def main(argv):
    name, overrides = (argv[0], argv[1:]) if argv and "=" not in argv[0] else ("digits", argv)
    cfg = load_config(name, overrides + ["distill.classes_per_chunk=1"])
    n = num_classes(cfg.data)
    ensure_prior(cfg)
    ensure_reference(cfg, n)
    student = {k: v for k, v in new_classifier(cfg, "student", n).state_dict().items()}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tasks = [ChunkTask(stage_plan(cfg)[1], i, c) for i, c in enumerate(class_chunks(n, 1))]
    images = len(tasks) * cfg.distill.ipc_per_stage
    pools = {}

    def run(k):
        rows = list(pools[k](tasks, student, lambda t: []))
        assert sum(r["count"] for r in rows) == images

    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 2):
            pools[k] = SamplerPool(load_config(name, overrides + [f"ray.actors={k}", "distill.classes_per_chunk=1"]),
                                 Path(tmp) / f"pool{k}")
            list(pools[k](tasks[:k], student, lambda t: []))  # warm the caches (files, imports)
        med = interleaved({1: lambda: run(1), 2: lambda: run(2)}, repeats=REPEATS, warmup=0)
    print(f"# measure 4: 1 vs 2 sampler actors on local Ray, 1 CPU each ({machine()})")
    for k in (1, 2):
        print(f"{k} actor(s): {images / med[k]:.1f} images/s (median of {REPEATS}: {med[k]:.2f} s for {images} images, "
              f"kappa {cfg.guidance.kappa}, {cfg.prior.num_steps} steps, through {cfg.guidance.through})")
    print(f"speed-up 2 vs 1 actors: {verdict(med[1] / med[2], 1.7)}")
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
