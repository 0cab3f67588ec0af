"""The FLOP/s a run's chunks reach on this machine, one torch thread: the dry-run's count of each chunk (lgd_ray.cost)
over the seconds its manifest row records. What cost.SLOW_CPU_FLOPS_PER_THREAD (the first-chunk deadline's rate)
is set well under.

    python bench/chunk_rate.py [CONFIG] [key=value ...]      (default: digits; the prior and reference from the cache)

The run goes to a temporary folder, in this process (ray.enabled=false).
"""
import sys
import tempfile

import torch

from lgd_ray.config import load_config
from lgd_ray.cost import run_cost
from lgd_ray.stages import run_stages


def main(argv: list[str]):
    name, overrides = (argv[0], argv[1:]) if argv and "=" not in argv[0] else ("digits", argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(name, overrides + [f"out={out}", "ray.enabled=false"])
        manifest = run_stages(cfg, out, log=lambda _: None)
    plan = run_cost(cfg)
    for s in plan["stages"]:
        per_class = s["sample_flops"] / plan["classes"]
        rates = [per_class * len(r["classes"]) / r["seconds"] / 1e9 for r in manifest["shards"] if r["stage"] == s["stage"]]
        print(f"{name} stage {s['stage']}: {len(rates)} chunks, {min(rates):.1f}-{max(rates):.1f} GFLOP/s on one thread")


if __name__ == "__main__":
    main(sys.argv[1:])
