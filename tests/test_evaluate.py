"""The evaluation protocol and the redundancy analysis on a tiny real run (3 increments of real generated images)."""
import csv
import json
from dataclasses import replace
from functools import partial

import pytest
import torch

from lgd_ray.config import ConfigError, load_config
from lgd_ray.evaluate import evaluate_full, evaluate_run, eval_jobs, run_eval_job
from lgd_ray.redundancy import redundancy, redundancy_of
from lgd_ray.shards import load_tensor_set

FAST = ["repeats=2", "epochs_by_ipc=[]", "train.epochs=12", "eval_every=4", "ray.enabled=false"]


@pytest.fixture
def run(tiny_run):
    return tiny_run[:3]


def test_protocol_writes_last_and_best_for_each_repeat(run):
    cfg, out, manifest = run
    result = evaluate_run(out, FAST)
    assert result["ipc"] == 6 and result["method"] == "lgd" and result["model"] == "convnet2"
    assert result["config_hash"] == manifest["config_hash"] and result["epochs"] == 12
    reps = result["repeats"]
    assert len(reps) == 2 and reps[0]["seed"] != reps[1]["seed"]
    for r in reps:
        assert [e for e, _ in r["curve"]] == [4, 8, 12]  # tested every 4 epochs and after the last
        assert r["last"] == r["curve"][-1][1] and r["best"] == max(a for _, a in r["curve"]) >= r["last"]
        assert 0.1 < r["last"] <= 1 and r["train_images"] == 60
    assert abs(result["last_mean"] - 50 * (reps[0]["last"] + reps[1]["last"])) < 1e-9
    saved = json.loads((out / "eval" / "convnet2-ipc6-hard.json").read_text())
    assert saved["last_mean"] == result["last_mean"] and saved["evaluate"]["repeats"] == 2
    rows = list(csv.DictReader(open(out / "eval" / "convnet2-ipc6-hard.csv")))
    assert [r["seed"] for r in rows][-2:] == ["mean", "std"] and float(rows[-2]["best_acc"]) == pytest.approx(result["best_mean"], abs=0.01)
    report = (out / "report.md").read_text()
    assert "## Evaluation" in report and f"{result['last_mean']:.2f} ± {result['last_std']:.2f}" in report


def test_repeats_differ_only_by_seed(run):
    cfg, out, manifest = run
    cfg = replace(cfg, evaluate=replace(cfg.evaluate, repeats=2, eval_every=5))
    shards = sorted(manifest["shards"], key=lambda r: r["path"])
    jobs = [replace(j, train=replace(j.train, epochs=5))
            for j in eval_jobs(cfg, partial(load_tensor_set, out, shards, 10, cfg.data.shape), 6, "eval")]
    assert jobs[0].seed != jobs[1].seed and replace(jobs[0], seed=0) == replace(jobs[1], seed=0)
    a, b, a2 = run_eval_job(jobs[0]), run_eval_job(jobs[1]), run_eval_job(jobs[0])
    assert a["curve"] == a2["curve"]  # the same seed gives the same numbers
    assert a["seed"] == jobs[0].seed and b["seed"] == jobs[1].seed


def test_prefix_ipc_soft_labels_and_other_model(run):
    cfg, out, _ = run
    keys = FAST[1:] + ["repeats=1", "ipc=2", "labels=soft", "model=convnet3", "train.cutmix=1.0"]
    with pytest.raises(ConfigError, match="labels=soft needs the run's reference model at .*runs/cache/reference-"):
        evaluate_run(out, keys)  # the teacher is read from this machine's cache, never from one the manifest names
    result = evaluate_run(out, keys + [f"cache={cfg.cache}"])
    assert result["ipc"] == 2 and result["labels"] == "soft" and result["model"] == "convnet3"
    assert result["repeats"][0]["train_images"] == 20 and (out / "eval" / "convnet3-ipc2-soft.json").exists()
    with pytest.raises(ConfigError, match="stage boundary"):
        evaluate_run(out, FAST + ["ipc=3"])
    with pytest.raises(ConfigError, match="evaluate.model"):
        evaluate_run(out, FAST + ["model=convnet99x"])


def test_full_data_upper_bar(tiny_overrides, tmp_path):
    cfg = load_config("digits", tiny_overrides + [f"out={tmp_path}", "reference.train.epochs=2", "repeats=1",
                                                  "ray.enabled=false"], "evaluate")
    result = evaluate_full(cfg)
    assert result["ipc"] == "full" and result["repeats"][0]["train_images"] == 1347 and result["last_mean"] > 50
    assert (tmp_path / "eval" / "convnet2-full-hard.csv").exists()


def test_redundancy_matrix(run):
    cfg, out, manifest = run
    result = redundancy(out, ["epochs_by_ipc=[]", "train.epochs=15", "eval_every=15", "ray.enabled=false"])
    m = torch.tensor(result["matrix"])
    assert m.shape == (3, 3) and result["stages"] == [0, 1, 2]
    # diagonal: a model tested on the increment it was trained on fits it better than the other increments
    assert m.diagonal().mean() > 0.8 and m.diagonal().mean() > result["redundancy"]
    assert result["redundancy"] == pytest.approx(redundancy_of(m))
    assert redundancy_of(torch.tensor([[1.0, 0.2, 0.4], [0.6, 1.0, 0.8], [0.0, 0.0, 1.0]])) == pytest.approx(2.0 / 6)
    rows = list(csv.reader(open(out / "redundancy" / "matrix.csv")))
    assert rows[0] == ["trained_on", "I_0", "I_1", "I_2", "real_test"] and len(rows) == 4
    assert (out / "redundancy" / "matrix.png").stat().st_size > 1000
    assert "## Redundancy" in (out / "report.md").read_text()


def test_run_folder_report(run):
    _, out, manifest = run
    for name in ("accuracy.png", "scores.png", "stage0.png", "stage1.png", "stage2.png"):
        assert (out / "report" / name).stat().st_size > 1000, name
    report = (out / "report.md").read_text()
    for i in range(3):
        assert f"report/stage{i}.png" in report
    assert f"{100 * manifest['stages']['2']['student_acc']:.2f}" in report


def test_the_rded_protocol(run):
    """labels=rded: RDED's recipe (its epochs, its batch rule, AdamW, KD at its temperature on CutMix batches, patch
    shuffling) with the reference as teacher; the same seed gives the same result, the result is recorded as rded."""
    cfg, out, _ = run
    keys = ["repeats=1", "ipc=2", "labels=rded", "rded.epochs=4", "rded.factor=2", "eval_every=2", "ray.enabled=false",
            f"cache={cfg.cache}"]
    jobs = eval_jobs(load_config("digits", [f"evaluate.{k}" for k in keys[:5]]), lambda: None, 2, "eval")
    assert (jobs[0].train.epochs, jobs[0].train.batch_size, jobs[0].temperature) == (4, 20, 20.0)  # 50, capped at 2 x 10
    assert jobs[0].rded.factor == 2 and jobs[0].teacher is not None
    result = evaluate_run(out, keys)
    assert result["labels"] == "rded" and result["epochs"] == 4 and (out / "eval" / "convnet2-ipc2-rded.json").exists()
    assert [e for e, _ in result["repeats"][0]["curve"]] == [2, 4]
    again = evaluate_run(out, keys)
    assert again["repeats"][0]["curve"] == result["repeats"][0]["curve"]
