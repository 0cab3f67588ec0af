"""Bad input, as a new user gives it: each is one line on stderr naming the file, key or class and the fix, exit
status 2, no traceback; and nothing valid is overwritten."""
import json
import shutil

import pytest
import torch

from lgd_ray import distill, evaluate, prepare, report
from lgd_ray.config import AUTO, ConfigError, load_config
from lgd_ray.shards import write_shard
from lgd_ray.stages import run_stages
from lgd_ray.storage import Location


def one_line(capsys, main, argv: list[str]) -> str:
    """Run a command's main(argv); it must exit 2 with exactly one line on stderr (returned)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("argv, words", [
    (["digits", "guidance.window=[10,"], ["override 'guidance.window=[10,'", "not YAML"]),
    (["digits", "data.image_size=4", "student.model=convnet3"], ["'student.model'", "halves the image 3 times",
                                                                 "at least 8"]),
    (["digits", "evaluate.ipc_breaks=[10]", "evaluate.epochs_by_ipc=[0,0]"], ["'evaluate.epochs_by_ipc'", ">= 1"]),
    (["digits", "sweep.omega=[]", "sweep.search=random"], ["'sweep.omega'", "must not be empty"]),
    (["digits", "ray.schedule_timeout_s=.nan"], ["'ray.schedule_timeout_s'", "finite"]),
    (["digits", "guidance.lambda=.inf"], ["'guidance.lambda'", "finite"]),
    (["digits", "ray.enabled=false", "out=memory://x?foo=1"], ["memory://x", "inside one process"]),
])
def test_bad_keys_are_one_line(capsys, argv, words):
    line = one_line(capsys, distill.main, argv + ["--dry-run"] if "out=" not in argv[-1] else argv)
    assert all(w in line for w in words), line


def test_malformed_files_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nguidance: {lambda: [1,\n")
    line = one_line(capsys, distill.main, [str(bad), "--dry-run"])
    assert str(bad) in line and "not valid YAML" in line and "line" in line
    folder = tmp_path / "classes"
    folder.mkdir()
    line = one_line(capsys, distill.main, ["folder", f"data.root={tmp_path}", f"data.classes={folder}",
                                           "ray.enabled=false"])
    assert "'data.classes'" in line and "is a folder" in line


def test_command_line_flags_are_one_line(capsys, tmp_path):
    line = one_line(capsys, prepare.main, ["imagenette", f"data.root={tmp_path}", "--shard-images", "0"])
    assert "--shard-images" in line and "must be an integer >= 1" in line
    line = one_line(capsys, report.main, [])
    assert "RUN_DIR" in line
    line = one_line(capsys, report.main, [str(tmp_path)])  # an empty folder: no run to report
    assert str(tmp_path) in line and "holds no run" in line
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0 and "RUN_DIR" in capsys.readouterr().out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny digits run that a test may damage, with its config pointing at the copy."""
    cfg, out, manifest, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return cfg, copy, manifest


def test_a_damaged_manifest_is_one_line_in_every_command(capsys, run_copy):
    cfg, run, _ = run_copy
    text = (run / "manifest.json").read_text()
    (run / "manifest.json").write_text(text[:len(text) // 2])  # cut short
    for main, argv in ((evaluate.main, [str(run), "ray.enabled=false"]), (report.main, [str(run)]),
                       (distill.main, ["digits", *cfg_overrides(cfg, run), "--resume"])):  # Ray not started
        line = one_line(capsys, main, argv)
        assert str(run / "manifest.json") in line and "not whole JSON" in line, line
    broken = json.loads(text)
    del broken["shards"][1]["sha256"]
    (run / "manifest.json").write_text(json.dumps(broken))
    line = one_line(capsys, evaluate.main, [str(run), "ray.enabled=false"])
    assert "shards[1] lacks 'sha256'" in line


def test_a_shard_gone_missing_is_one_line(capsys, run_copy):
    _, run, manifest = run_copy
    victim = sorted(r["path"] for r in manifest["shards"])[2]
    (run / victim).unlink()
    line = one_line(capsys, evaluate.main, [str(run), "ray.enabled=false", "train.epochs=1", "epochs_by_ipc=[]"])
    assert victim in line and "is missing" in line and "--resume" in line


def test_stage_files_without_a_manifest_are_refused_and_a_moved_run_resumes(run_copy, tmp_path):
    cfg, run, manifest = run_copy
    orphan = tmp_path / "orphan"
    shutil.copytree(run, orphan)
    (orphan / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="holds stage folders but no manifest.json"):
        run_stages(load_config("digits", cfg_overrides(cfg, orphan)), Location(str(orphan)))
    assert sorted(p.name for p in orphan.iterdir()) == sorted(p.name for p in run.iterdir() if p.name != "manifest.json")
    # the copy resumes where it lives: nothing is made again
    stored = json.loads((run / "manifest.json").read_text())["stages"]  # the copy's own (the fixture's run is shared)
    mtimes = {r["path"]: (run / r["path"]).stat().st_mtime_ns for r in manifest["shards"]}
    again = run_stages(load_config("digits", cfg_overrides(cfg, run)), Location(str(run)), resume=True,
                       log=lambda _: None)
    assert {p: (run / p).stat().st_mtime_ns for p in mtimes} == mtimes
    assert again["stages"] == stored


def cfg_overrides(cfg, out) -> list[str]:
    """The tiny run's overrides (from its stored config) with another run folder."""
    from conftest import TINY

    return TINY + [f"cache={cfg.cache}", f"out={out}"]


def test_evaluation_never_connects_where_a_manifest_says(run_copy):
    """A run folder (perhaps in a shared bucket) decides neither where evaluate and redundancy connect nor what they
    ask of the cluster: this machine's config of the run's name and the command line do."""
    _, run, _ = run_copy
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["ray"].update(address="203.0.113.7:6379", accelerator_type="H100", num_gpus_per_actor=8)
    (run / "manifest.json").write_text(json.dumps(manifest))
    cfg, _ = evaluate.load_run(Location(str(run)))
    assert cfg.ray.address == "" and cfg.ray.accelerator_type == "" and cfg.ray.num_gpus_per_actor is AUTO
    assert cfg.ray == load_config("digits").ray  # configs/digits.yaml's own
    cfg, _ = evaluate.load_run(Location(str(run)), ["ray.address=127.0.0.1:6379"])  # the command line's own
    assert cfg.ray.address == "127.0.0.1:6379"



@pytest.mark.parametrize("path, words", [
    ("/dev/zero", ["shards[0].path '/dev/zero' is not stage 0's chunk 0"]),
    ("../../other-bucket/stage-00/shard-000000.tar", ["shards[0].path '../../other-bucket/"]),
    ("stage-01/shard-000000.tar", ["shards[0].path 'stage-01/shard-000000.tar' is not stage 0's chunk 0"]),
])
def test_crafted_shard_rows_are_refused_by_every_reader(capsys, run_copy, path, words):
    """A manifest row naming a file outside the run's layout (a device, another bucket, another stage's shard) is
    refused before anything is read, in one line, by evaluate, report and distill --resume."""
    cfg, run, _ = run_copy
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["shards"].sort(key=lambda r: (r["stage"], r["chunk"]))
    manifest["shards"][0]["path"] = path
    (run / "manifest.json").write_text(json.dumps(manifest))
    for main, argv in ((evaluate.main, [str(run), "ray.enabled=false"]), (report.main, [str(run)]),
                       (distill.main, ["digits", *cfg_overrides(cfg, run), "--resume"])):
        line = one_line(capsys, main, argv)
        assert all(w in line for w in words) and "not written by lgd_ray" in line, line


@pytest.mark.parametrize("content, words", [
    (b'{"config": {}, "stages": {}, "shards": [\xff]}', ["is not JSON of lgd_ray (UnicodeDecodeError)"]),
    (b"[" * 100_000 + b"]" * 100_000, ["is not JSON of lgd_ray (RecursionError)"]),
    (b'{"config": [], "stages": {}, "shards": []}', ["has a 'config' that is not a JSON dict"]),
    (b'{"config": {}, "stages": {}, "shards": [{"path": "stage-00/shard-000000.tar", "stage": "0", "chunk": 0, '
     b'"classes": [0], "count": 1, "sha256": "00"}]}', ["shards[0].stage is not an int"]),
])
def test_manifests_of_wrong_bytes_types_or_depth_are_one_line(capsys, run_copy, content, words):
    _, run, _ = run_copy
    (run / "manifest.json").write_bytes(content)
    line = one_line(capsys, evaluate.main, [str(run), "ray.enabled=false"])
    assert all(w in line for w in words) and str(run / "manifest.json") in line, line


def test_a_replaced_shard_is_refused_by_readers_and_made_again_by_resume(capsys, run_copy):
    """A shard whose bytes are not the ones its row recorded (another shard's, here: a valid tar of valid images) is
    refused by evaluate (before any of it is parsed) and report (which checks every shard of the runs it pools);
    --resume makes it again."""
    cfg, run, manifest = run_copy
    first, second = sorted(r["path"] for r in manifest["shards"])[:2]
    (run / first).write_bytes((run / second).read_bytes())
    for main, argv in ((evaluate.main, [str(run), "ray.enabled=false", "train.epochs=1", "epochs_by_ipc=[]"]),
                       (report.main, [str(run)])):
        line = one_line(capsys, main, argv)
        assert f"{run / first} has sha256" in line and "replaced or damaged" in line and "--resume" in line, line
    said = []
    run_stages(load_config("digits", cfg_overrides(cfg, run)), Location(str(run)), resume=True, log=said.append)
    assert any(line.startswith(f"resume: {first}: expected sha256") for line in said), said
    assert (run / first).read_bytes() != (run / second).read_bytes()


def test_evaluation_reads_data_and_models_where_this_machine_says(capsys, run_copy):
    """Locations recorded in a run folder (data root, prepared copy, caches: perhaps with an endpoint of someone
    else's) are replaced by this machine's config of the run's name, and the difference is said."""
    _, run, _ = run_copy
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["cache"] = "s3://elsewhere/cache?endpoint_override=203.0.113.7:9000"
    manifest["config"]["data"]["prepared"] = "s3://elsewhere/prepared?endpoint_override=203.0.113.7:9000"
    (run / "manifest.json").write_text(json.dumps(manifest))
    cfg, _ = evaluate.load_run(Location(str(run)))
    local = load_config("digits")
    assert (cfg.cache, cfg.data.prepared, cfg.data.root) == (local.cache, local.data.prepared, local.data.root)
    out = capsys.readouterr().out
    assert "evaluate: cache is 'runs/cache' by this machine's config digits, not the run's recorded 's3://elsewhere" in out
    assert "evaluate: data.prepared is ''" in out
    cfg, _ = evaluate.load_run(Location(str(run)), ["cache=/somewhere/else"])  # the command line's own
    assert cfg.cache == "/somewhere/else"


def test_shards_of_another_image_size_are_one_line(capsys, run_copy):
    """A shard re-made with images of another size (its sha256 recorded, so it passes the byte check) is refused
    by evaluate against data.image_size before any training."""
    _, run, manifest = run_copy
    row = sorted(manifest["shards"], key=lambda r: r["path"])[0]
    samples = [{"key": k, "image": torch.zeros(1, 12, 12, dtype=torch.uint8), "cls": 0, "meta": {"S": None}}
               for k in row["keys"]]
    made = write_shard(Location(str(run)), row["path"], samples)
    text = json.loads((run / "manifest.json").read_text())
    next(r for r in text["shards"] if r["path"] == row["path"])["sha256"] = made["sha256"]
    (run / "manifest.json").write_text(json.dumps(text))
    line = one_line(capsys, evaluate.main, [str(run), "ray.enabled=false", "train.epochs=1", "epochs_by_ipc=[]"])
    assert "images of shapes [(1, 8, 8), (1, 12, 12)]" in line and "(1, 8, 8) (data.channels, data.image_size)" in line, line
