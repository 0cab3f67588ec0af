"""The Ray layer on a real local Ray: actor pool, pool-size independence, actor death, driver death + resume; the same
run with out= and cache= on a real S3 server (moto, loopback): equal images, resume from the store, every reader, and a
bad store or a missing model said in one line."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from pathlib import Path

import pytest
import ray
import torch
import webdataset as wds

from conftest import TcpProxy, new_bucket, s3_cache_of, s3_uri, wait_until
from lgd_ray.config import ConfigError, load_config
from lgd_ray.distill import distill
from lgd_ray.shards import read_manifest, shard_urls
from lgd_ray.storage import Location
from lgd_ray.timeline import read_timeline
from test_timeline import check_timeline


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]  # Ray Train fits


# Every Ray Train fit costs ~15 s of start-up here: keep their number small. One class per chunk: 10 chunks a stage.
ONE_STAGE = ["distill.stages=1", "distill.classes_per_chunk=1"]
# the full-run outage test (seconds): a short outage within the lease (renewed every third of it), a long one past
# storage.retry_s
RETRY_S, LEASE_S, SHORT_OUTAGE_S = 8, 8, 4


def _cfg(overrides, out, *more):
    return load_config("digits", overrides + ONE_STAGE + [f"out={out}", *more])


def _hashes(manifest):
    return {r["path"]: r["sha256"] for r in manifest["shards"]}


@pytest.fixture(scope="module")
def two_actor_run(trained, tiny_overrides, tmp_path_factory):
    """The digits run on 2 actors, its driver on a machine that seems to have a GPU: torch here claims one, and any
    CUDA initialisation in this process fails the run. The driver of a Ray run never touches CUDA (its fits and
    chunks run in Ray's processes, which the claim does not reach)."""
    out = tmp_path_factory.mktemp("ray2")
    start = time.time()
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda._lazy_init", side_effect=AssertionError("the driver initialised CUDA")):
        manifest = distill(_cfg(tiny_overrides, out, "ray.actors=2", "device=auto"))
    WALL["two_actor_run"] = time.time() - start
    print(f"\ndigits run, 2 actors, local Ray, local folder: {WALL['two_actor_run']:.1f} s")
    return out, manifest


WALL = {}  # seconds a fixture's run took, from the outside


@pytest.fixture(scope="module")
def s3_run(trained, tiny_cfg, tiny_overrides, s3_endpoint):
    """The run of two_actor_run with one actor instead of two, and out= and cache= on the S3 server (the cache a staged
    copy of the local one): neither the store nor the number of actors may change a byte."""
    cache = s3_cache_of(tiny_cfg, s3_endpoint)
    out = Location(s3_uri(s3_endpoint, new_bucket(s3_endpoint), "run"))
    start = time.time()
    manifest = distill(_cfg(tiny_overrides, out, "ray.actors=1", f"cache={cache}"))
    print(f"\ndigits run, 1 actor, local Ray, S3 server: {time.time() - start:.1f} s")
    return out, manifest


def _pngs(run: Location, manifest) -> dict:
    """PNG bytes per sample key, read with plain webdataset (no decoding)."""
    urls = shard_urls(run, sorted(r["path"] for r in manifest["shards"]))
    return {s["__key__"]: s["png"] for s in wds.WebDataset(urls, shardshuffle=False)}


def test_two_actors_give_every_sample_once(two_actor_run):
    out, manifest = two_actor_run
    paths = [str(out / r["path"]) for r in manifest["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(paths, shardshuffle=False)]
    assert len(keys) == 10 * 4 == len(set(keys))
    rows = ray.data.read_webdataset(paths).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)


def test_the_run_s_timeline_covers_its_wall_time_and_the_actors_do_the_work(two_actor_run):
    """Every phase on record: the driver's phases cover the run's wall time (within 5 %, none counted twice); the
    kept actors sample, fit and test every stage (the test split is read there, not in the driver)."""
    out, manifest = two_actor_run
    u = check_timeline(Location(str(out)), WALL["two_actor_run"], len(manifest["stages"]), "actor-")
    actors = {r["who"] for r in read_timeline(out) if r["phase"] == "actor_start"}
    assert len(actors) == 2  # started once for the run, not once per stage
    assert u["resource"] == "CPU" and u["busy_share"] > 0


def test_a_run_on_an_empty_cache_makes_its_models_on_ray_train_then_fits_students_on_the_actors(
        trained, tiny_overrides, tmp_path):
    """`make demo` on a fresh clone: the prior and theta* are trained first (on Ray Train: the actors need them to
    start), then the kept actors sample and fit the students."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    manifest = distill(_cfg(tiny_overrides, out, "ray.actors=2", f"cache={cache}"))
    rows = read_timeline(out)
    setup_fits = [r for r in rows if r["phase"] == "fit" and r["stage"] is None]
    assert len(setup_fits) == 2 and all(r["who"] == "worker0" for r in setup_fits)  # prior, then theta*
    assert all(r["who"].startswith("actor-") for r in rows if r["phase"] == "fit" and r["stage"] is not None)
    made = sorted(p.name.split("-")[0] for p in cache.iterdir() if not p.name.startswith("."))  # .locks: cache_lock's
    assert made == ["prior", "reference", "reference"] and len(manifest["stages"]) == 2  # weights + info JSON


def test_evaluation_repeats_as_ray_tasks(two_actor_run):
    from lgd_ray.evaluate import evaluate_run

    out, manifest = two_actor_run
    keys = ["repeats=2", "epochs_by_ipc=[]", "train.epochs=6", "eval_every=3"]
    on_ray = evaluate_run(out, keys)
    local = evaluate_run(out, keys + ["ray.enabled=false"])
    assert [r["seed"] for r in on_ray["repeats"]] == [r["seed"] for r in local["repeats"]]
    assert all(len(r["curve"]) == 2 for r in on_ray["repeats"])
    # a task runs 1 torch thread, this process 2: float sums may differ, the accuracies barely
    assert all(abs(a["last"] - b["last"]) < 0.03 for a, b in zip(on_ray["repeats"], local["repeats"]))
    assert on_ray["config_hash"] == manifest["config_hash"]


def test_sweep_tiny_grid(trained, tiny_overrides, tmp_path):
    import yaml

    from lgd_ray.sweep import sweep

    cfg = load_config("digits", tiny_overrides + [f"out={tmp_path}", "sweep.omega=[0.5,1.0]", "sweep.lambda=[0.05]",
                                                  "sweep.stages=2", "sweep.grace_period=1", "sweep.max_concurrent=2"])
    result = sweep(cfg)
    rows = result["rows"]
    assert sorted(r["omega"] for r in rows) == [0.5, 1.0] and all(r["lambda"] == 0.05 for r in rows)
    assert rows[0]["stages_run"] == 2 and len(rows[0]["acc_per_stage"]) == 3  # seed stage + 2 guided stages
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
    trials = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("omega"))  # a folder per trial, by its id
    assert [t.rsplit("-", 1)[0] for t in trials] == ["omega0.5-lambda0.05", "omega1-lambda0.05"]
    assert len({t.rsplit("-", 1)[1] for t in trials}) == 2
    best = load_config(str(result["best_config"]))  # distill accepts the best setting unchanged
    assert best.guidance.omega == rows[0]["omega"] and best.guidance.lambda_ == 0.05
    assert best.distill.stages == cfg.distill.stages and yaml.safe_load(result["best_config"].read_text())["seed"] == 0


def test_ray_train_ddp_two_workers(trained, tiny_overrides, tmp_path):
    from functools import partial

    from lgd_ray.data import load_split
    from lgd_ray.ray_train import ray_fitter
    from lgd_ray.reference import fit_job, new_classifier
    from lgd_ray.train import accuracy

    cfg = load_config("digits", tiny_overrides + ["ray.train_workers=2", "ray.train_cpus_per_worker=1",
                                                  "reference.train.epochs=3", "ray.checkpoint_every=1"])
    job = fit_job(cfg, "reference", 10, partial(load_split, cfg.data, "train"), seed=0)
    state, _ = ray_fitter(cfg, tmp_path)(job)
    model = new_classifier(cfg, "reference", 10)
    model.load_state_dict(state)
    assert accuracy(model, load_split(cfg.data, "test")) > 0.8
    (run,) = (tmp_path / "train").iterdir()  # the Ray Train run and its checkpoints are kept in the run folder,
    assert len(list(run.glob("checkpoint_*/"))) == 2  # the newest two of the three (one an epoch)
    # the same two-worker fit as DDP over a run's kept sampler actors (no Ray Train): the same weights
    from lgd_ray.actors import SamplerPool

    run_cfg = load_config("digits", tiny_overrides + ["ray.train_cpus_per_worker=1"])  # a run's, whose models exist
    pool = SamplerPool(run_cfg, tmp_path / "pool", keep=True)
    try:
        assert pool.can_fit(2) and not pool.can_fit(3)
        job.workers = 2  # as the stage loop sizes a student fit
        on_actors, metrics = ray_fitter(run_cfg, tmp_path / "pool", pool=pool)(job)
        assert {s["who"] for s in metrics["spans"]} == {f"actor-{a._actor_id.hex()[:8]}" for a in pool.actors}
    finally:
        pool.shutdown()
    assert not (tmp_path / "pool" / "train").exists()
    assert all(torch.equal(on_actors[k], state[k]) for k in state)


def test_killed_actor_loses_nothing(two_actor_run, tiny_overrides, tmp_path):
    from lgd_ray.actors import SamplerPool
    from lgd_ray.ray_train import ray_fitter
    from lgd_ray.stages import run_stages

    _, undisturbed = two_actor_run
    cfg = _cfg(tiny_overrides, tmp_path, "ray.actors=2", "ray.max_restarts=1")
    from lgd_ray.methods import ChunkMaker

    class SlowMaker(ChunkMaker):  # chunks of ~0.5 s: both actors are mid-chunk while rows come in
        def make(self, task, student_state, previous_shards):
            time.sleep(0.5)
            return super().make(task, student_state, previous_shards)

    # as distill's pool: kept from stage to stage, fitting the students
    pool = SamplerPool(cfg, tmp_path, SlowMaker, keep=True)
    fit_on_pool = ray_fitter(cfg, tmp_path, pool=pool)

    def fitter(job):  # before each student fit, an actor of the kept pool dies: one for good, then one restarting
        if pool.actors:
            ray.kill(pool.actors[0], no_restart=not fit_kills)
            fit_kills.append(job.name)
        return fit_on_pool(job)

    killed, fit_kills = [], []

    def runner(tasks, state, previous):
        for row in pool(tasks, state, previous):
            if row["stage"] == 0 and not killed:  # kill an actor whose chunk is still being made (both start now)
                busy = pool.running()
                if busy:
                    ray.kill(busy[0], no_restart=False)
                    killed.append(busy[0])
            yield row

    manifest = run_stages(cfg, tmp_path, runner=runner, fitter=fitter, log=lambda _: None)
    pool.shutdown()
    assert killed and pool.resubmitted >= 1 and len(fit_kills) == 2
    assert _hashes(manifest) == _hashes(undisturbed)
    assert [manifest["stages"][k]["student_sha256"] for k in "01"] == [undisturbed["stages"][k]["student_sha256"]
                                                                      for k in "01"]
    assert len(manifest["shards"]) == len(undisturbed["shards"])
    keys = [k for r in manifest["shards"] for k in r["keys"]]
    assert len(keys) == len(set(keys)) == 40


def test_s3_run_with_one_actor_gives_the_images_of_the_local_run_with_two(two_actor_run, s3_run):
    (local, lm), (remote, rm) = two_actor_run, s3_run
    local = Location(str(local))
    assert _hashes(rm) == _hashes(lm) and len(rm["shards"]) == 20
    local_png, remote_png = _pngs(local, lm), _pngs(remote, rm)
    assert len(remote_png) == 40 and remote_png == local_png  # PNG bytes per key
    assert rm["stages"]["1"]["student_acc"] == lm["stages"]["1"]["student_acc"]
    assert (remote / "stage-01" / "student.safetensors").exists() and (remote / "report.md").exists()
    # the one-worker student fits ran on the kept sampler actor, beside its resident prior: no Ray Train start-up
    fits = [r for r in read_timeline(remote) if r["phase"] == "fit" and r["stage"] is not None]
    assert len(fits) == 2 and all(r["who"].startswith("actor-") for r in fits)
    assert not (remote / "train").iterdir()
    assert not Path("s3:").exists()  # no local folder named after the URI


def test_readers_on_the_s3_run(s3_run):
    from lgd_ray.evaluate import evaluate_run
    from lgd_ray.redundancy import redundancy
    from lgd_ray.report import compare

    remote, manifest = s3_run
    loc = remote / manifest["shards"][0]["path"]
    rows = ray.data.read_webdataset([(remote / r["path"]).path for r in manifest["shards"]], filesystem=loc.fs).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(k for r in manifest["shards"] for k in r["keys"])
    keys = ["repeats=1", "epochs_by_ipc=[]", "train.epochs=3", "eval_every=3"]
    result = evaluate_run(str(remote), keys)
    name = f"{result['model']}-ipc{result['ipc']}-hard"
    assert (remote / "eval" / f"{name}.json").exists() and (remote / "eval" / f"{name}.csv").exists()
    red = redundancy(str(remote), keys)
    assert len(red["matrix"]) == 2 and (remote / "redundancy" / "matrix.png").exists()
    report = (remote / "report.md").read_text()
    assert "## Evaluation" in report and "## Redundancy" in report and (remote / "report" / "stage1.png").exists()
    assert f"{result['last_mean']:.2f}" in compare([str(remote)])


def test_actors_only_load_and_say_what_is_missing(tiny_overrides, s3_endpoint):
    from lgd_ray.actors import SamplerPool
    from lgd_ray.methods import stage_plan
    from lgd_ray.plan import ChunkTask

    bucket = new_bucket(s3_endpoint)
    for method, missing in (("dit", r"prior: no DiT pipeline at s3://.*make it first: `python -m lgd_ray\.prior digits`"),
                            ("random", r"reference: no theta\* at s3://.*`python -m lgd_ray\.distill digits`")):
        cfg = load_config("digits", tiny_overrides + [f"cache={s3_uri(s3_endpoint, bucket, 'empty')}",
                                                      f"distill.method={method}", "ray.actors=1"])
        pool = SamplerPool(cfg, Location(s3_uri(s3_endpoint, bucket, "run")))
        try:
            with pytest.raises(ConfigError, match=missing) as e:
                list(pool([ChunkTask(stage_plan(cfg)[0], 0, (0,))], None, lambda t: []))
            assert "\n" not in str(e.value)
        finally:
            pool.shutdown()
    assert not Location(s3_uri(s3_endpoint, bucket, "empty")).iterdir()  # nothing was trained by an actor


def test_cli_refuses_a_missing_bucket_in_one_line(tiny_overrides, s3_endpoint):
    out = f"s3://no-such-bucket/run?endpoint_override={s3_endpoint}&scheme=http"
    r = subprocess.run([sys.executable, "-m", "lgd_ray.distill", "digits", *tiny_overrides, f"out={out}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "error: storage: cannot write s3://no-such-bucket/run/" in r.stderr and "bucket does not exist" in r.stderr


def test_store_outages_mid_run_then_resume(two_actor_run, tiny_overrides, s3_endpoint):
    """The run on the S3 server behind a TCP proxy: an outage shorter than storage.retry_s while stage 0's chunks are
    written is waited out by the driver and the actors alike; one that outlasts it once stage 1 has started ends the
    run by itself in one line, the manifest listing only objects that exist, with their sha256. --resume then keeps
    every listed shard and gives the undisturbed images (a damaged shard's resume: tests/test_stages.py)."""
    _, undisturbed = two_actor_run
    with TcpProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        out = Location(s3_uri(f"127.0.0.1:{proxy.port}", new_bucket(s3_endpoint), "run"))
        # the driver joins this module's Ray (as `ray job submit` joins a cluster) instead of starting its own
        args = [sys.executable, "-m", "lgd_ray.distill", "digits", *tiny_overrides, *ONE_STAGE, f"out={out}",
                "ray.actors=1", f"ray.address={ray.get_runtime_context().gcs_address}", f"storage.lease_s={LEASE_S}",
                f"storage.retry_s={RETRY_S}"]
        rows = lambda stage: [r for r in (read_manifest(out) or {"shards": []})["shards"] if r["stage"] == stage]
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_until(lambda: rows(0), proc, log, "no chunk of stage 0")
                proxy.stop()  # 1. shorter than storage.retry_s: waited out
                time.sleep(SHORT_OUTAGE_S)
                proxy.start()
                wait_until(lambda: rows(1), proc, log, "no chunk of stage 1 after the short outage")
                proxy.stop()  # 2. for good: the run ends by itself once storage.retry_s has passed
                assert proc.wait(timeout=RETRY_S + 120) == 2
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                if proxy.listener is None:
                    proxy.start()
            log.seek(0)
            text = log.read().decode(errors="replace")
        said = [line for line in text.splitlines() if "yet: the endpoint does not answer" in line]
        assert said and all(f"retrying for up to {RETRY_S} s (storage.retry_s)" in line for line in said)
        last = text.strip().splitlines()[-1]
        assert last.startswith("error: storage: cannot") and f"storage.retry_s {RETRY_S})" in last, text[-3000:]
        assert "Traceback" not in text.split("error: storage:")[-1]
        before = read_manifest(out)
        assert "0" in before["stages"] and "1" not in before["stages"]
        assert all((out / r["path"]).sha256() == r["sha256"] for r in before["shards"])  # listed = written, whole
        mtime = lambda loc: loc.fs.get_file_info(loc.path).mtime
        kept = {r["path"]: mtime(out / r["path"]) for r in before["shards"]}
        time.sleep(LEASE_S)  # the lease of a driver that could not reach the store to release it lapses
        r = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        after = read_manifest(out)
        assert _hashes(after) == _hashes(undisturbed)
        assert all(mtime(out / p) == t for p, t in kept.items())  # what the failed run listed was kept, not redone
    assert "stage 0/1" not in r.stdout and "stage 1/1" in r.stdout  # stage 0 was trained before the outage


def test_storage_check_runs_on_a_cluster_joined_by_address_even_with_one_node(tiny_overrides, tmp_path):
    """A cluster file's head starts alone: joined by address, a relative `out` is refused with one node alive."""
    from lgd_ray.cluster import check_cluster_storage
    from lgd_ray.storage import Location

    address = ray.get_runtime_context().gcs_address
    cfg = load_config("digits", tiny_overrides + [f"ray.address={address}", "out=runs/x"])
    with pytest.raises(ConfigError, match=r"'out' = 'runs/x' is a relative path.*\(1 alive now\)"):
        check_cluster_storage(cfg, Location("runs/x"), Location(cfg.cache))
    local = load_config("digits", tiny_overrides + ["out=runs/x"])  # a local Ray of one node: nothing to check
    check_cluster_storage(local, Location(str(tmp_path / "x")), Location(local.cache))


def test_a_task_s_bad_input_is_one_line(two_actor_run, tmp_path, capsys):
    """evaluate's repeats run as Ray tasks: a shard gone missing, found inside a task, is still one line (exit 2)."""
    import shutil

    from lgd_ray import evaluate

    out, manifest = two_actor_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    victim = sorted(r["path"] for r in manifest["shards"])[1]
    (run / victim).unlink()
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run), "train.epochs=1", "epochs_by_ipc=[]", "repeats=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: run folder: ") and victim in err[-1]
    assert not any("Traceback" in line for line in err)
