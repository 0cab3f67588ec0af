import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from safetensors.torch import load_file

from lgd_ray.config import ConfigError, load_config
from lgd_ray.cost import run_cost
from lgd_ray.methods import stage_plan
from lgd_ray.reference import new_classifier
from lgd_ray.shards import read_manifest, write_manifest
from lgd_ray.storage import Location
from lgd_ray.data import class_chunks
from lgd_ray.stages import run_stages


def test_class_chunks_cover_every_class_once():
    for n, k in ((10, 4), (1000, 7), (3, 5)):
        chunks = class_chunks(n, k)
        flat = [c for ch in chunks for c in ch]
        assert flat == list(range(n)) and all(len(ch) <= k for ch in chunks)


def test_stage_plan_slots_are_disjoint(tiny_cfg):
    plan = stage_plan(tiny_cfg)
    assert [(s.index, s.ipc, s.slot0) for s in plan] == [(0, 2, 0), (1, 2, 2), (2, 2, 4)]


@pytest.fixture
def run(tiny_run):
    return tiny_run


def test_run_writes_every_increment(run):
    cfg, out, manifest, lines = run
    assert len(lines) == 3 and "student test acc" in lines[-1]
    assert set(manifest["stages"]) == {"0", "1", "2"}
    assert all(0.1 < s["student_acc"] <= 1 for s in manifest["stages"].values())
    assert manifest["stages"]["0"]["mean_S"] is None and manifest["stages"]["2"]["mean_S"] is not None
    assert manifest["config"]["guidance"]["lambda"] == cfg.guidance.lambda_ and manifest["reference"]["test_acc"] > 0.5
    # each stage's cost: the dry-run's counts, the chunks' actor-seconds, an H100 estimate of the same work
    plan = run_cost(cfg)["stages"]
    for i, st in manifest["stages"].items():
        c = st["cost"]
        assert (c["trajectories"], c["guided_steps"], c["unguided_steps"]) == tuple(
            plan[int(i)][k] for k in ("trajectories", "guided_steps", "unguided_steps"))
        rows = [r for r in manifest["shards"] if r["stage"] == int(i)]
        assert c["actor_seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=0.02)
        assert c["images_per_actor_second"] > 0 and c["h100_gpu_hours"] > 0
    assert manifest["stages"]["2"]["cost"]["guided_steps"] > 0 == manifest["stages"]["0"]["cost"]["guided_steps"]
    from lgd_ray.report import compare

    table = compare([str(out)])  # the cost table of `python -m lgd_ray.report`: the run's totals
    total = sum(st["cost"]["guided_steps"] for st in manifest["stages"].values())
    assert f"| lgd | through denoiser, every 1, select_after 0 | 60 | {total} |" in table
    # 10 classes x (2 + 2 + 2) images, one shard per chunk of 4 classes, keys unique, readable by plain webdataset
    assert len(manifest["shards"]) == 3 * 3
    samples = list(wds.WebDataset([str(out / r["path"]) for r in manifest["shards"]], shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == 60 == len(set(keys))
    per_class = {c: sum(1 for k in keys if k.startswith(f"c{c:04d}")) for c in range(10)}
    assert set(per_class.values()) == {6}
    meta = json.loads(samples[-1]["json"])
    assert meta["stage"] == 2 and meta["params"]["method"] == "lgd" and len(meta["candidate_S"]) == cfg.guidance.kappa
    assert meta["params"]["lambda"] == cfg.guidance.lambda_ and "lambda_" not in meta["params"]  # spelled as in YAML
    saved = load_file(str(out / "stage-02" / "student.safetensors"))
    assert set(saved) == set(new_classifier(cfg, "student", 10).state_dict())


def test_rerun_refuses_and_resume_checks_config(run, tiny_overrides):
    cfg, out, _, _ = run
    with pytest.raises(ConfigError, match="--resume"):
        run_stages(cfg, out)
    other = load_config("digits", tiny_overrides + [f"out={out}", "guidance.omega=0.3"])
    with pytest.raises(ConfigError, match=r"differs in: guidance\.omega"):
        run_stages(other, out, resume=True)
    # a run made before a config key existed resumes (the key takes its default, as it did then); nothing is redone
    made = read_manifest(out)
    older = json.loads(json.dumps(made))
    del older["config"]["guidance"]["checkpointing"]
    older["config_hash"] = "made-by-an-older-version"
    write_manifest(out, older)
    try:
        again = run_stages(cfg, out, resume=True)
        assert again["stages"] == made["stages"] and again["shards"] == made["shards"]
    finally:
        write_manifest(out, made)


def test_resume_refuses_a_prior_or_reference_other_than_the_stages_were_made_with(run):
    """The cache's prior or theta* is not the one recorded (re-made after it went missing, or replaced): one line
    naming which, with both sha256s; nothing in the run folder is touched."""
    cfg, out, _, _ = run
    made = read_manifest(out)
    files = {p: p.stat().st_mtime_ns for p in Path(str(out)).rglob("*") if p.is_file()}
    try:
        for key, what in (("prior_sha256", "prior"), ("reference_sha256", r"reference model theta\*")):
            other = {**made, key: "0" * 64}  # as if the stages had been made with another one
            write_manifest(out, other)
            files[Path(str(out)) / "manifest.json"] = (Path(str(out)) / "manifest.json").stat().st_mtime_ns
            with pytest.raises(ConfigError, match=rf"^--resume: the {what} in the cache \(sha256 "
                                                  rf"{made[key][:12]}\) is not the one this run's stages were made "
                                                  r"with \(000000000000\): restore it, or start anew with out=NEW_DIR$"):
                run_stages(cfg, out, resume=True)
            assert {p: p.stat().st_mtime_ns for p in Path(str(out)).rglob("*") if p.is_file()} == files
    finally:
        write_manifest(out, made)


def test_resume_redoes_a_corrupted_shard_its_stage_and_every_later_stage(run):
    """A damaged shard of stage 1 is said (with both sha256s) and made again; stage 1's student is trained again, and
    stage 2, built from the old one, is made again; stage 0 is kept. On the CPU everything comes out the same bytes."""
    cfg, out, manifest, _ = run
    rows = {r["path"]: r for r in manifest["shards"]}
    mtimes = {p: (out / p).stat().st_mtime_ns for p in rows}
    victim = "stage-01/shard-000001.tar"
    (out / victim).write_bytes((out / victim).read_bytes()[:500])
    damaged = Location(str(out / victim)).sha256()
    lines = []
    again = run_stages(cfg, out, resume=True, log=lines.append)
    assert lines[0] == (f"resume: {victim}: expected sha256 {rows[victim]['sha256'][:12]}, found {damaged[:12]}: "
                        "made again")
    assert "resume: stage 2 rests on stage 1's old student: made again" in lines
    assert all(Location(str(out / p)).sha256() == r["sha256"] for p, r in rows.items())  # the same bytes (CPU)
    changed = {p for p in rows if (out / p).stat().st_mtime_ns != mtimes[p]}
    assert changed == {victim} | {p for p in rows if p.startswith("stage-02/")}
    assert [again["stages"][k]["student_acc"] for k in "012"] == [manifest["stages"][k]["student_acc"] for k in "012"]
    assert again["stages"]["1"]["student_sha256"] == manifest["stages"]["1"]["student_sha256"]


def test_cli_runs_the_digits_config(trained, tiny_overrides, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lgd_ray.distill", "digits", *tiny_overrides, "distill.stages=1",
                        "distill.method=dit", "ray.enabled=false", f"out={tmp_path / 'cli'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stage 1/1" in r.stdout and "distill: done" in r.stdout
    assert read_manifest(tmp_path / "cli")["stages"]["1"]["mean_S"] is not None  # dit records S too, unguided
