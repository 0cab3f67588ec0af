"""A real multi-node Ray on this machine (`ray.cluster_utils.Cluster`: a head with no CPUs and two worker nodes) with
the run's storage on the S3 server: the nodes share this machine's disk, so only a store proves that nothing relies
on a node-local path. A worker node in its own mount namespace (a tmpfs over the run folder) is a node with a
private disk: the start-up check names it."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lgd_ray.cluster import check_cluster_storage
from lgd_ray.config import ConfigError, load_config
from lgd_ray.distill import distill
from lgd_ray.storage import Location, StorageError

pytestmark = pytest.mark.slow  # a simulated 3-node cluster

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [c.add_node(num_cpus=3) for _ in range(2)]  # an actor (2 CPUs) and a Ray Train worker (1) per node
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, {w.node_id for w in workers}
    ray.shutdown()
    c.shutdown()


def test_relative_paths_are_refused_before_any_work(cluster, tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("out=runs/x", "cache=runs/cache"):
        cfg = load_config("digits", tiny_overrides + [f"out={tmp_path / 'abs'}", key])
        with pytest.raises(ConfigError, match=rf"'{key.split('=')[0]}' = 'runs/\w+' is a relative path, private to "
                                              r"each node of the cluster \(3 alive now\).*store URI"):
            distill(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "abs").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
def test_a_node_with_a_private_disk_fails_the_run_in_seconds(cluster, tiny_overrides, trained, tmp_path):
    """A node that joins after the start-up check (as the autoscaler's do) and cannot see the run folder: a sampler
    actor started there says so before its first chunk; a start-up check with it alive names it."""
    from lgd_ray.actors import SamplerActor
    from lgd_ray.config import to_dict
    from lgd_ray.methods import ChunkMaker
    from lgd_ray.methods import stage_plan
    from lgd_ray.plan import ChunkTask

    c, _ = cluster
    shared = tmp_path / "shared"
    shared.mkdir()
    cfg = load_config("digits", tiny_overrides + [f"out={shared / 'run'}"])
    run = Location(str(shared / "run"))
    check = check_cluster_storage(cfg, run, Location(cfg.cache))  # the 3 nodes of now share `shared`
    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # a fourth node whose view of `shared` is its own empty tmpfs: a folder that is not on a shared mount
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {shared} && exec {RAY} start "
                             f"--address={c.address} --num-cpus=1 --block"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 4:
            assert time.time() < deadline and node.poll() is None, "the extra node did not join"
            time.sleep(0.5)
        (late,) = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
        actor = SamplerActor.options(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(late, soft=False)
                                     ).remote(ChunkMaker, to_dict(cfg), run, 1, check)
        with pytest.raises(StorageError, match=rf"storage: node [\d.]+ \({late[:8]}\), which joined the run later: "
                                               rf"cannot read {shared}/run/\.lgd_ray-node-check-\w+ .*does not share"):
            ray.get(actor.make.remote(ChunkTask(stage_plan(cfg)[0], 0, (0,)), None, []), timeout=120)
        ray.kill(actor)
        start = time.time()
        with pytest.raises(StorageError, match=rf"node [\d.]+ \(\w+\): cannot read {shared}/run/\.lgd_ray-node-check"
                                               r".*does not share that folder"):
            check_cluster_storage(cfg, run, Location(cfg.cache))
        assert time.time() - start < 75  # 21 s alone; 60 s once with a prior training beside it on the 2 cores
        # a run: its sampler actors start while the nodes check; the failed check stops them (their CPUs come back)
        with pytest.raises(StorageError, match=r"cannot read .*does not share that folder"):
            distill(cfg)
        deadline = time.time() + 30
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
            assert time.time() < deadline, "the run's sampler actors outlived its failed storage check"
            time.sleep(0.5)
    finally:
        check.remove()
        os.killpg(node.pid, 15)
        node.wait(timeout=60)
    assert not list(Path(shared / "run").glob(".lgd_ray-node-check*"))  # the markers go with the check
