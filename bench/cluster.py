"""Measure 8: the digits run on one local Ray node vs a 3-node Ray cluster, and the time from a node loss to the run
going on.

    python bench/cluster.py [CONFIG] [key=value ...]      (default: digits; prior and reference made first, untimed)

One node: a local Ray with 2 CPUs. Cluster: `ray.cluster_utils.Cluster`, a head with no CPUs and two 1-CPU worker
nodes (the nodes share this machine's 2 cores). The two runs must give the same images. Then the cluster run again
with the node under a busy sampler actor removed without warning in stage 1 and a fresh node added: reported are
the seconds from the loss to the next finished chunk, and the run's wall time.
"""
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from lgd_ray.actors import SamplerPool
from lgd_ray.config import load_config
from lgd_ray.data import num_classes
from lgd_ray.distill import distill
from lgd_ray.prior_make import ensure_prior
from lgd_ray.ray_train import ray_fitter
from lgd_ray.reference import ensure_reference
from lgd_ray.stages import run_stages
from parts import machine

LAYOUT = ["ray.actors=2", "ray.num_cpus_per_actor=1", "ray.train_cpus_per_worker=1", "distill.classes_per_chunk=1"]


def hashes(manifest) -> dict:
    return {r["path"]: r["sha256"] for r in manifest["shards"]}


def timed_run(cfg) -> tuple[float, dict]:
    start = time.time()
    manifest = distill(cfg)
    return time.time() - start, manifest


def run_with_node_loss(c: Cluster, cfg, out: Path) -> tuple[float, float, dict]:
    pool, events = SamplerPool(cfg, out), {}

    def runner(tasks, state, previous):
        for row in pool(tasks, state, previous):
            if "lost" in events and "next" not in events:
                events["next"] = time.time()
            if row["stage"] == 1 and "lost" not in events:
                busy = pool.running()
                if busy:
                    node = list_actors(filters=[("actor_id", "=", busy[0]._actor_id.hex())])[0].node_id
                    c.remove_node(next(n for n in c.worker_nodes if n.node_id == node), allow_graceful=False)
                    events["lost"] = time.time()
                    c.add_node(num_cpus=1)
            yield row

    start = time.time()
    manifest = run_stages(cfg, out, runner=runner, fitter=ray_fitter(cfg, out), log=lambda _: None)
    return time.time() - start, events["next"] - events["lost"], manifest


def prepared(argv) -> tuple[str, list[str]]:
    """[CONFIG] [key=value ...] -> (config name, overrides), the config's prior and reference made (untimed)."""
    name, overrides = (argv[0], argv[1:]) if argv and "=" not in argv[0] else ("digits", argv)
    base = load_config(name, overrides + LAYOUT)
    ensure_prior(base)
    ensure_reference(base, num_classes(base.data))
    return name, overrides


def main(argv):
    name, overrides = prepared(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = lambda out: load_config(name, overrides + LAYOUT + [f"out={Path(tmp) / out}"])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        one, m1 = timed_run(cfg("one-node"))
        ray.shutdown()
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
            "health_check_initial_delay_ms": 0, "health_check_period_ms": 250, "health_check_failure_threshold": 4}})
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        three, m3 = timed_run(cfg("cluster"))
        lossy, gap, m4 = run_with_node_loss(c, cfg("node-loss"), Path(tmp) / "node-loss")
        ray.shutdown()
        c.shutdown()
    images = sum(r["count"] for r in m1["shards"])
    print(f"# measure 8: the {name} run ({images} images, {len(m1['stages'])} stages) on 1 node vs a 3-node cluster "
          f"({machine()})")
    print(f"1 node (local Ray, 2 CPUs): {one:.1f} s")
    print(f"3 nodes (0-CPU head + 2 x 1-CPU workers): {three:.1f} s; same images: {hashes(m3) == hashes(m1)}")
    print(f"3 nodes, a worker node lost in stage 1 and one added: {lossy:.1f} s; next chunk {gap:.1f} s after the "
          f"loss; same images: {hashes(m4) == hashes(m1)}")


if __name__ == "__main__":
    main(sys.argv[1:])
