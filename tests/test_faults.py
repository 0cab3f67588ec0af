"""A run that survives a real cluster: a multi-node Ray on this machine (`ray.cluster_utils.Cluster`, a head with no
CPUs, small worker nodes, logical GPUs), nodes removed without warning and added back, chunks that raise, requests
no node can hold. Images are compared with the same run made in one process (CPU: bit for bit)."""
import json
import os
import subprocess
import sys
import threading
import time
from functools import partial

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from conftest import new_bucket, s3_cache_of, s3_uri
from lgd_ray import storage
from lgd_ray.actors import SamplerPool
from lgd_ray.config import ConfigError, load_config
from lgd_ray.data import load_split
from lgd_ray.distill import distill
from lgd_ray.data import class_chunks
from lgd_ray.methods import ChunkMaker, stage_plan
from lgd_ray.plan import ChunkTask
from lgd_ray.ray_tasks import map_jobs
from lgd_ray.ray_train import ray_fitter
from lgd_ray.reference import fit_job
from lgd_ray.resources import ResourceError, train_resources
from lgd_ray.stages import run_stages
from lgd_ray.storage import Location
from lgd_ray.timeline import read_timeline

pytestmark = pytest.mark.slow  # a simulated cluster losing nodes

# Node death is noticed in about a second (Ray's own fault-tolerance tests set these the same way).
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 250, "health_check_failure_threshold": 4}
RUN = ["distill.stages=1", "distill.classes_per_chunk=1", "ray.actors=2", "ray.num_cpus_per_actor=1",
       "ray.train_cpus_per_worker=1", "ray.checkpoint_every=5", "ray.schedule_timeout_s=120"]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH})
    for _ in range(2):  # small nodes: one actor or one Ray Train worker each
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def single_process_run(trained, tiny_overrides, tmp_path_factory):
    """The run in this process without Ray, one torch thread as each actor and Train worker uses: the images to match."""
    out = tmp_path_factory.mktemp("one-process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifest = run_stages(load_config("digits", tiny_overrides + RUN + ["ray.enabled=false", f"out={out}"]), out,
                              log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    return _hashes(manifest)


def _hashes(manifest):
    return {r["path"]: r["sha256"] for r in manifest["shards"]}


def _keys_once(manifest):
    keys = [k for r in manifest["shards"] for k in r["keys"]]
    return len(keys) == len(set(keys)) == 40


def _on_cluster(cfg, out, runner=None, fitter=None):
    pool = runner or SamplerPool(cfg, out)
    return run_stages(cfg, out, runner=pool, fitter=fitter or ray_fitter(cfg, out), log=lambda _: None)


def _remove(c: Cluster, node_id: str) -> float:
    """Remove a worker node without warning (its processes die); returns when."""
    c.remove_node(next(n for n in c.worker_nodes if n.node_id == node_id), allow_graceful=False)
    return time.time()


def test_small_nodes_on_s3_finish_with_the_single_process_images(cluster, single_process_run, tiny_cfg,
                                                                  tiny_overrides, s3_endpoint):
    """Two 1-CPU nodes, the run and cache on the S3 server: two actors fill the nodes and stay from stage to stage;
    one of them fits each one-worker student (no Ray Train worker to make room for: no deadlock); both nodes make
    chunks, the head none; the actors are gone when the run ends."""
    out = Location(s3_uri(s3_endpoint, new_bucket(s3_endpoint), "run"))
    cfg = load_config("digits", tiny_overrides + RUN + [f"out={out}", f"cache={s3_cache_of(tiny_cfg, s3_endpoint)}"])
    start = time.time()
    manifest = distill(cfg)
    print(f"\ndigits run on 2 one-CPU worker nodes + S3: {time.time() - start:.1f} s")
    assert _hashes(manifest) == single_process_run and _keys_once(manifest)
    assert {r["node"] for r in manifest["shards"]} == {n.node_id for n in cluster.worker_nodes}
    assert (out / "stage-01" / "student.safetensors").exists() and not (out / "train").iterdir()
    fits = [r for r in read_timeline(out) if r["phase"] == "fit" and r["stage"] is not None]
    assert len(fits) == 2 and all(r["who"].startswith("actor-") for r in fits)
    assert {r["node"] for r in fits} <= {n.node_id for n in cluster.worker_nodes}
    assert not [a for a in list_actors(filters=[("class_name", "=", "SamplerActor"), ("state", "=", "ALIVE")])]


def test_node_lost_while_sampling_and_while_training(cluster, single_process_run, tiny_overrides, tmp_path, capsys):
    """A node removed under a busy actor, then one under the student's Train worker; capacity comes back each time.
    The run finishes by itself, every key once, the same images."""
    cfg = load_config("digits", tiny_overrides + RUN + [f"out={tmp_path}", "ray.max_restarts=2"])
    pool, fitter = SamplerPool(cfg, tmp_path), ray_fitter(cfg, tmp_path)
    events = {}

    def runner(tasks, state, previous):
        for row in pool(tasks, state, previous):
            if "lost" in events and "continued" not in events:
                events["continued"] = time.time()
            if row["stage"] == 1 and "lost" not in events:
                busy = pool.running()
                if busy:
                    node = list_actors(filters=[("actor_id", "=", busy[0]._actor_id.hex())])[0].node_id
                    events["lost"] = _remove(cluster, node)
                    cluster.add_node(num_cpus=1)  # capacity comes back (Cluster.add_node: from this thread only)
            yield row

    def kill_a_train_worker(name):
        deadline = time.time() + 120
        while time.time() < deadline:  # once Ray Train has registered a checkpoint, remove the node of its worker
            snapshots = list((tmp_path / "train").glob(f"{name}-*/checkpoint_manager_snapshot.json"))
            if snapshots and json.loads(snapshots[0].read_text() or "{}").get("checkpoint_results"):
                workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                events["train_lost"] = _remove(cluster, workers[0].node_id)
                return
            time.sleep(0.05)

    def fit(job):
        if job.name.startswith("stage-01") and "train_lost" not in events:
            killer = threading.Thread(target=kill_a_train_worker, args=(job.name,))
            killer.start()
            try:
                return fitter(job)  # the worker group restarts on the other node, from the last checkpoint
            finally:
                killer.join()
                cluster.add_node(num_cpus=1)
        return fitter(job)

    manifest = _on_cluster(cfg, tmp_path, runner, fit)
    assert "lost" in events and "train_lost" in events and pool.resubmitted >= 1
    out = capsys.readouterr().out
    assert "stage-01-student" in out.split("recovered from a failure")[0].splitlines()[-1]
    print(f"\nnode lost while sampling: the next chunk came in {events['continued'] - events['lost']:.1f} s later")
    assert _hashes(manifest) == single_process_run and _keys_once(manifest)
    assert manifest["stages"]["1"]["trained"]


def test_io_errors_are_retried_and_code_errors_end_the_run_at_once(cluster, trained, tiny_overrides, tmp_path):
    class FlakyMaker(ChunkMaker):  # defined here, so that Ray ships it by value to the actors
        def make(self, task, student_state, previous_shards):
            mark = self.run_dir / f"tried-{task.chunk}"
            if self.cfg.name == "always" or not mark.exists():
                mark.write_text("1")
                raise OSError(f"injected fault in chunk {task.chunk}")
            return super().make(task, student_state, previous_shards)

    cfg = load_config("digits", tiny_overrides + RUN + ["ray.chunk_retries=2"])
    tasks = [ChunkTask(stage_plan(cfg)[0], i, c) for i, c in enumerate(class_chunks(10, 5))]
    pool = SamplerPool(cfg, tmp_path / "flaky", FlakyMaker)
    rows = list(pool(tasks, None, lambda t: []))
    assert sorted(r["chunk"] for r in rows) == [0, 1] and pool.retried == 2
    cfg.name = "always"
    pool = SamplerPool(cfg, tmp_path / "always", FlakyMaker)
    start = time.time()
    with pytest.raises(OSError, match="injected fault in chunk"):
        list(pool(tasks, None, lambda t: []))
    assert 2 <= pool.retried <= 4  # each chunk is tried 3 times; the first to use up its 2 retries ends the run
    assert time.time() - start < 60  # back-off 1 s + 2 s, bounded

    class BuggyMaker(ChunkMaker):  # a code error happens again every time: not retried
        def make(self, task, student_state, previous_shards):
            raise TypeError(f"injected bug in chunk {task.chunk}")

    pool = SamplerPool(load_config("digits", tiny_overrides + RUN + ["ray.chunk_retries=2"]), tmp_path / "buggy",
                     BuggyMaker)
    with pytest.raises(TypeError, match="injected bug in chunk"):
        list(pool(tasks, None, lambda t: []))
    assert pool.retried == 0


@pytest.mark.parametrize("rule", [["ray.chunk_timeout_s=5"],  # a set deadline; and the default, where the hung chunk
                                  ["ray.actors=1", "ray.chunk_timeout_floor_s=5", "storage.retry_s=2"]])  # is the first
def test_a_chunk_past_its_deadline_is_rescheduled(cluster, trained, tiny_overrides, tmp_path, capsys, rule):
    """A chunk that hangs is given up after ray.chunk_timeout_s, or with none set after the dry-run's estimate at a slow
    rate (at least ray.chunk_timeout_floor_s), even as the stage's first chunk on its only actor: its actor restarts
    and the chunk runs again; the stage finishes with every chunk."""
    class HangingMaker(ChunkMaker):  # defined here: Ray ships it by value
        def make(self, task, student_state, previous_shards):  # chunk 0's first try hangs for ten minutes
            mark = self.run_dir / f"hung-{task.chunk}"
            if task.chunk == 0 and not mark.exists():
                mark.write_text("1")
                time.sleep(600)
            return super().make(task, student_state, previous_shards)

    cfg = load_config("digits", tiny_overrides + RUN + rule)
    tasks = [ChunkTask(stage_plan(cfg)[0], i, c) for i, c in enumerate(class_chunks(10, 5))]
    pool = SamplerPool(cfg, tmp_path / "hung", HangingMaker)
    start = time.time()
    rows = list(pool(tasks, None, lambda t: []))
    assert sorted(r["chunk"] for r in rows) == [0, 1] and pool.resubmitted == 1
    assert time.time() - start < 120
    said = [line for line in capsys.readouterr().out.splitlines() if "past its deadline" in line]
    if cfg.ray.chunk_timeout_s:
        assert said == [said[0]] and "(ray.chunk_timeout_s)" in said[0]
    else:
        assert len(said) == 1 and ("the slow-rate estimate" in said[0] and "at least ray.chunk_timeout_floor_s" in said[0])


def test_ray_tasks_that_stop_finishing_are_given_up(cluster, tiny_overrides):
    """map_jobs (evaluation repeats, redundancy rows) with a task that hangs: cancelled after ray.chunk_timeout_s."""
    def _sleep_if_two(i: int) -> int:  # defined here: Ray ships it by value
        if i == 2:
            time.sleep(600)
        return i

    # 20 s: the two quick tasks must finish first, and a cold Ray worker (importing torch) takes over 4 s on a slow host
    cfg = load_config("digits", tiny_overrides + RUN + ["ray.chunk_timeout_s=20"])
    start = time.time()
    with pytest.raises(RuntimeError, match=r"^hang: no task finished for \d+ s, past 20 s \(ray.chunk_timeout_s\): "
                                           r"1 hung task\(s\) cancelled$"):
        map_jobs(cfg, _sleep_if_two, [0, 1, 2], "hang", expected_s=lambda: 1.0)
    assert time.time() - start < 120  # not the 600-s sleep
    assert map_jobs(cfg, _sleep_if_two, [0, 1], "fine", expected_s=lambda: 1.0) == [0, 1]
    # no ray.chunk_timeout_s, and the only task hangs: the estimate (at least the floor) bounds even the first wait
    cfg = load_config("digits", tiny_overrides + RUN + ["ray.chunk_timeout_floor_s=3", "storage.retry_s=2"])
    start = time.time()
    with pytest.raises(RuntimeError, match=r"^hang: no task finished for \d+ s, past 5 s \(the slow-rate estimate "
                                           r"\(1 s\), at least ray.chunk_timeout_floor_s, \+ storage.retry_s; "):
        map_jobs(cfg, _sleep_if_two, [2], "hang", expected_s=lambda: 1.0)
    assert time.time() - start < 60


def test_requests_no_node_can_hold_fail_at_once_and_a_group_too_large_in_the_configured_time(
        cluster, trained, tiny_overrides, tmp_path):
    """A bundle larger than every node (1-CPU workers, no autoscaler) is refused at once, naming the largest node;
    a group of bundles that each fit but not all at once waits ray.schedule_timeout_s, then says so."""
    cfg = load_config("digits", tiny_overrides + RUN + ["ray.num_cpus_per_actor=4", "ray.schedule_timeout_s=300"])
    start = time.time()
    with pytest.raises(ResourceError, match=r"^ray: 2 sampler actors \(4 CPU each\) fit on no node: the largest of the "
                                            r"3 alive has 1 CPU.*, and no autoscaler can add another; lower "):
        list(SamplerPool(cfg, tmp_path)([ChunkTask(stage_plan(cfg)[0], 0, (0,))], None, lambda t: []))
    cfg = load_config("digits", tiny_overrides + RUN + ["ray.train_workers=2", "ray.train_cpus_per_worker=2",
                                                        "ray.schedule_timeout_s=300"])
    with pytest.raises(ResourceError, match=r"2 Ray Train workers \(2 CPU each\) fit on no node"):
        ray_fitter(cfg, tmp_path)(fit_job(cfg, "student", 10, partial(load_split, cfg.data, "train"), seed=0))
    assert time.time() - start < 10  # not the 300 s of ray.schedule_timeout_s
    cfg = load_config("digits", tiny_overrides + RUN + ["ray.train_workers=4", "ray.schedule_timeout_s=3"])
    with pytest.raises(ResourceError, match=r"4 Ray Train workers \(1 CPU each\) could not be placed within 3 s "
                                            r"\(ray\.schedule_timeout_s\); the cluster's 3 nodes have 2 CPU in all"):
        ray_fitter(cfg, tmp_path)(fit_job(cfg, "student", 10, partial(load_split, cfg.data, "train"), seed=0))


def test_gpu_placement_and_a_gpu_torch_cannot_see(cluster, trained, tiny_overrides, tmp_path):
    """Logical GPUs: two 1-GPU nodes of type H100. Each actor gets a whole GPU on its own node; there, torch (a CPU
    build on this machine) sees none: the run stops with one line naming torch's CUDA build."""
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        cfg = load_config("digits", tiny_overrides + RUN + ["ray.num_gpus_per_actor=1", "ray.accelerator_type=H100"])
        with pytest.raises(ConfigError, match=r"device: Ray gave this process GPU 0 on node .*, but torch .* sees no "
                                              r"GPU; install a torch CUDA build") as e:
            list(SamplerPool(cfg, tmp_path)([ChunkTask(stage_plan(cfg)[0], i, (i,)) for i in range(2)], None,
                                          lambda t: []))
        assert "\n" not in str(e.value)
        actors = list_actors(filters=[("class_name", "=", "SamplerActor")], detail=True, limit=1000)
        placed = [a.node_id for a in actors if a.required_resources.get("GPU") == 1 and a.node_id]
        # the first error ends the call and kills both actors: the second may not have been placed yet
        assert placed and len(set(placed)) == len(placed) and set(placed) <= {n.node_id for n in nodes}
    finally:
        for n in nodes:
            cluster.remove_node(n)


def test_config_checks_for_gpu_clusters(tiny_overrides):
    with pytest.raises(ConfigError, match=r"'ray.train_gpus_per_worker' is 0.5 with 2 NCCL workers: NCCL refuses two "
                                          r"ranks on one GPU"):
        load_config("digits", ["ray.train_use_gpu=true", "ray.train_workers=2", "ray.train_gpus_per_worker=0.5"])
    with pytest.raises(ConfigError, match=r"'student.train.batch_size' 30 is not a multiple of ray.train_workers 4"):
        load_config("digits", ["ray.train_workers=4", "student.train.batch_size=30", "reference.train.batch_size=64"])
    cfg = load_config("imagenet1k", ["ray.accelerator_type=H100"])
    assert train_resources(cfg) == {"CPU": 4, "GPU": 1, "accelerator_type:H100": 0.001}


def test_storage_retry_s_reaches_every_process_of_the_run(cluster, tmp_path):
    """A driver joining the cluster with storage.retry_s=7 (as `ray job submit` does): its tasks, actors and Ray Data
    tasks on the worker nodes retry the store for 7 s, not the default: the run's config, not a module global."""
    script = tmp_path / "driver.py"
    script.write_text(f'''
import ray
from lgd_ray import storage
from lgd_ray.cli import run_cli
from lgd_ray.cluster import connect

def work(cfg, args):
    connect(cfg)
    probe = lambda *_: storage.retry_s()
    task = ray.remote(num_cpus=1)(probe)
    actor = ray.remote(num_cpus=1)(type("Probe", (), {{"get": probe}})).remote()
    data = ray.data.range(2).map(lambda row: {{"retry_s": storage.retry_s()}}).take_all()
    print("seen", ray.get(task.remote()), ray.get(actor.get.remote()), *[r["retry_s"] for r in data])

run_cli("probe", "", ["digits", "ray.address={cluster.address}", "storage.retry_s=7"], work)
''')
    env = {k: v for k, v in os.environ.items() if k != storage.RETRY_ENV}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seen 7.0 7.0 7.0 7.0" in done.stdout, done.stdout[-2000:]


def test_a_lost_head_is_one_line(trained, tiny_overrides, tmp_path):
    """A driver that joined a cluster (ray.address, as from another machine) whose head's GCS dies mid-run: it stops
    within HEAD_LOST_S with one line saying to --resume, before Ray's core worker would end it without a word."""
    from lgd_ray.cluster import HEAD_LOST_S

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lgd_ray.distill", "digits", *tiny_overrides, f"ray.address={c.address}",
            "ray.actors=1", "ray.num_cpus_per_actor=1", "ray.train_cpus_per_worker=1", "student.train.epochs=3000",
            f"out={out}"]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "manifest.json").exists():
            assert driver.poll() is None and time.time() < deadline, driver.communicate()[1][-3000:]
            time.sleep(0.5)
        killed = time.time()
        c.head_node.kill_gcs_server()
        stdout, stderr = driver.communicate(timeout=HEAD_LOST_S + 60)
        took = time.time() - killed
    finally:
        driver.kill()
        c.shutdown()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert driver.returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "head" in errors[0] and "stopped answering" in errors[0] and "--resume" in errors[0], errors
    assert HEAD_LOST_S - 3 <= took < HEAD_LOST_S + 30  # its last answer came up to one 2-s probe before the kill
    assert not (out / "lease.json").exists()  # released on the way out: --resume may start at once
