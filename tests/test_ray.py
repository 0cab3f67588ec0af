"""The Ray layer on a real local Ray: actor pool, pool-size independence, actor death, driver death + resume."""
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import webdataset as wds

from lgd_ray.config import load_config
from lgd_ray.distill import distill
from lgd_ray.shards import read_manifest, sha256_file


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(overrides, out, *more):
    return load_config("digits", overrides + [f"out={out}", *more])


def _hashes(manifest):
    return {r["path"]: r["sha256"] for r in manifest["shards"]}


@pytest.fixture(scope="module")
def two_actor_run(trained, tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray2")
    return out, distill(_cfg(tiny_overrides, out, "ray.actors=2"))


def test_two_actors_give_every_sample_once(two_actor_run):
    out, manifest = two_actor_run
    paths = [str(out / r["path"]) for r in manifest["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(paths, shardshuffle=False)]
    assert len(keys) == 10 * 6 == len(set(keys))
    rows = ray.data.read_webdataset(paths).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)


def test_output_does_not_depend_on_pool_size(two_actor_run, tiny_overrides, tmp_path):
    _, two = two_actor_run
    one = distill(_cfg(tiny_overrides, tmp_path, "ray.actors=1"))
    assert _hashes(one) == _hashes(two)
    assert one["stages"]["2"]["student_acc"] == two["stages"]["2"]["student_acc"]


def test_killed_actor_loses_nothing(two_actor_run, tiny_overrides, tmp_path):
    from lgd_ray.actors import ActorPool
    from lgd_ray.stages import run_stages

    _, undisturbed = two_actor_run
    cfg = _cfg(tiny_overrides, tmp_path, "ray.actors=2", "ray.max_restarts=1")
    pool = ActorPool(cfg, tmp_path)

    def runner(tasks, state, previous):
        for i, row in enumerate(pool(tasks, state, previous)):
            if row["stage"] == 1 and i == 0:  # the other actor is busy with a chunk of this stage: kill it
                ray.kill(pool.actors[1], no_restart=False)
            yield row

    manifest = run_stages(cfg, tmp_path, runner=runner, log=lambda _: None)
    pool.shutdown()
    assert pool.resubmitted >= 1
    assert _hashes(manifest) == _hashes(undisturbed)
    assert len(manifest["shards"]) == len(undisturbed["shards"])


@pytest.mark.slow
def test_killed_driver_resumes(trained, tiny_overrides, tmp_path, two_actor_run):
    _, undisturbed = two_actor_run
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lgd_ray.distill", "digits", *tiny_overrides, f"out={out}", "ray.actors=1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait until stage 0 is trained and a chunk of stage 1 is written
            m = read_manifest(out) if (out / "manifest.json").exists() else None
            if m and "0" in m["stages"] and any(r["stage"] == 1 for r in m["shards"]):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the driver made no progress")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = read_manifest(out)
    kept = {r["path"]: (out / r["path"]).stat().st_mtime_ns for r in before["shards"]}
    assert "2" not in before["stages"]
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    after = read_manifest(out)
    assert _hashes(after) == _hashes(undisturbed)
    assert all((out / p).stat().st_mtime_ns == t for p, t in kept.items())  # completed chunks were not redone
    assert "stage 0/2" not in r.stdout  # the trained stage was loaded, not retrained
