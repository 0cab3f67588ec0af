"""Measure 13: where a run's time goes on a 3-node Ray cluster: resource-hours held and busy, from its timeline.

    python bench/timeline.py [CONFIG] [key=value ...]      (default: digits; prior and reference made first, untimed)

The run goes to a temporary folder, or to `out=DIR` if given (kept, with its report.md and timeline chart).

`ray.cluster_utils.Cluster`: a head with no CPUs (the driver's node) and two 1-CPU worker nodes, on this machine's
cores; sampler actors and Ray Train workers take 1 CPU each, so each phase can use every worker slot, as on a GPU
cluster. Printed: the run's wall time, and per stage and in all the CPU-hours held (every node's CPUs while up) and
busy (sampling, fitting, testing), read back from the run folder's timeline/ (lgd_ray.timeline).
"""
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from cluster import LAYOUT, prepared
from lgd_ray.config import load_config
from lgd_ray.distill import distill
from lgd_ray.timeline import read_timeline, usage, usage_table
from parts import machine

def main(argv):
    name, overrides = prepared(argv)  # the layout of measure 8: 1-CPU actors and Train workers, a class a chunk
    with tempfile.TemporaryDirectory() as tmp:
        out = load_config(name, overrides).out or str(Path(tmp) / "run")
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        start = time.time()
        manifest = distill(load_config(name, overrides + LAYOUT + [f"out={out}"]))
        wall = time.time() - start
        ray.shutdown()
        c.shutdown()
        rows = read_timeline(out)
    u = usage(rows)
    images = sum(r["count"] for r in manifest["shards"])
    print(f"# measure 13: the {name} run ({images} images, {len(manifest['stages'])} stages) on a 3-node cluster "
          f"(0-CPU head + 2 x 1-CPU workers; {machine()})")
    print(f"wall {wall:.1f} s (driver's phases {u['wall_s']:.1f} s); CPU busy {100 * u['busy_share']:.1f} % of held "
          f"({3600 * u['busy']:.1f} of {3600 * u['held']:.1f} CPU-s)")
    print(usage_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
