"""`python -m lgd_ray.evaluate RUN_DIR [key=value ...]`: train fresh classifiers on a distilled set, test on real data.

The protocol (docs/DESIGN.md section 5) is the config's `evaluate` section: SGD, MultiStepLR, RandomResizedCrop + flip
(+ CutMix), epochs by IPC, hard labels or a teacher's soft labels. `repeats` fresh models differ only by seed and
run in parallel as Ray tasks. Both the last-epoch and the best test accuracy are reported; "best" is the maximum
over the tests every `eval_every` epochs, so it selects on the test set (as the papers' numbers do).

`python -m lgd_ray.evaluate --full CONFIG` gives the upper bar: the same model trained on the whole real train
split with the reference model's recipe (`reference.train`).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import yaml

from lgd_ray.cli import Parser, one_line_errors
from lgd_ray.config import (Config, ConfigError, RdedConfig, TrainConfig, apply_overrides, build_config, config_hash,
                            from_dict, load_config, resolve_path, run_identity, to_dict)
from lgd_ray.cost import classifier_fit_flops, slow_seconds
from lgd_ray.data import load_split, num_classes, split_size
from lgd_ray.models import build_classifier
from lgd_ray.pooling import labels_of
from lgd_ray.ray_tasks import map_jobs
from lgd_ray.report import write_report
from lgd_ray.seeding import derive_seed
from lgd_ray.shards import load_tensor_set, read_manifest, trained_increments
from lgd_ray.storage import Location, as_location
from lgd_ray.teachers import check_teacher, load_teacher
from lgd_ray.train import accuracy, process_device, train_classifier


@dataclass(kw_only=True)
class EvalJob:
    """One fresh classifier to train and test (picklable, for a Ray task)."""

    model: str
    channels: int
    image_size: int
    num_classes: int
    train: TrainConfig
    load_train: Callable
    load_test: Callable
    seed: int
    eval_every: int
    device: str = "auto"
    teacher: Callable | None = None  # builds the soft-label teacher
    temperature: float = 4.0
    rded: RdedConfig | None = None  # the RDED protocol's recipe (evaluate.labels rded)
    extra_tests: dict | None = None  # name -> loader of further sets to test the final model on (redundancy)


def run_eval_job(job: EvalJob) -> dict:
    """Train the job's classifier; returns last and best test accuracy, the test curve and the extra tests."""
    device = process_device(job.device)
    train_set, test_set = job.load_train(), job.load_test()
    model = build_classifier(job.model, job.channels, job.image_size, job.num_classes, seed=job.seed)
    curve = []

    def on_epoch(epoch, _stats, _state):
        if (epoch + 1) % job.eval_every == 0 or epoch + 1 == job.train.epochs:
            curve.append((epoch + 1, accuracy(model, test_set, device)))

    start = time.time()
    teacher = job.teacher() if job.teacher else None
    train_classifier(model, train_set, job.train, job.seed, device, on_epoch=on_epoch, desc=f"eval seed {job.seed}",
                     teacher=teacher, temperature=job.temperature, rded=job.rded)
    best_epoch, best = max(curve, key=lambda c: c[1])
    extra = {name: accuracy(model, load(), device) for name, load in (job.extra_tests or {}).items()}
    return {"seed": job.seed, "last": curve[-1][1], "best": best, "best_epoch": best_epoch, "curve": curve,
            "train_images": len(train_set), "seconds": round(time.time() - start, 1), "extra": extra}


def epochs_for(cfg: Config, ipc: int) -> int:
    e = cfg.evaluate
    if not e.epochs_by_ipc:
        return e.train.epochs
    for limit, epochs in zip(e.ipc_breaks, e.epochs_by_ipc):
        if ipc <= limit:
            return int(epochs)
    return int(e.epochs_by_ipc[-1])


LOCATION_KEYS = (("data", "root"), ("data", "prepared"), ("cache",), ("local_cache",))  # where data and models are read


def load_run(run_dir: Location, overrides: list[str] = ()) -> tuple[Config, dict]:
    """(the run's config with overrides applied, its manifest); bare keys (`repeats=5`) mean `evaluate.<key>`.

    Where to connect and read (`ray.*` less the address, the data's root and prepared copy, the caches) come from this
    machine's config of the run's name and this command line (`ray.address=`, RAY_ADDRESS, `cache=`...), never from
    the run folder: a manifest perhaps in a shared bucket, written by someone else, chooses no endpoint and no file. A
    location the run recorded otherwise is said in one line."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise ConfigError(f"evaluate: {run_dir} holds no run (no manifest.json)")
    tree = copy.deepcopy(manifest["config"])
    name = tree.get("name", "")
    yaml_tree = _local_tree(name)
    try:  # this machine's config of that name, every key filled (the defaults where it has none)
        local_tree = to_dict(build_config(copy.deepcopy(yaml_tree)))
    except ConfigError:
        local_tree = to_dict(build_config({}))
    tree["ray"] = {k: v for k, v in (yaml_tree.get("ray") or {}).items() if k != "address"}
    for key in LOCATION_KEYS:
        *parents, last = key
        ours, theirs = local_tree, tree
        for part in parents:
            ours, theirs = ours[part], theirs.setdefault(part, {})
        if isinstance(theirs, dict):
            if theirs.get(last, ours[last]) != ours[last]:
                print(f"evaluate: {'.'.join(key)} is {ours[last]!r} by this machine's config {name or '(defaults)'}, "
                      f"not the run's recorded {theirs.get(last)!r}; set {'.'.join(key)}= to read elsewhere", flush=True)
            theirs[last] = ours[last]
    return build_config(apply_overrides(tree, overrides, "evaluate")), manifest


def _local_tree(name: str) -> dict:
    """This machine's YAML config `name` as a tree ({} if there is none, or it does not parse)."""
    try:
        tree = yaml.safe_load(resolve_path(name).read_text()) if name else {}
    except (ConfigError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def prefix_shards(manifest: dict, ipc: int) -> tuple[int, list[dict]]:
    """(IPC, shard rows) of the first stages holding `ipc` images per class (0: all finished stages)."""
    total, shards = 0, []
    for _, stage_ipc, stage_rows in trained_increments(manifest):
        if ipc and total + stage_ipc > ipc:
            break
        total, shards = total + stage_ipc, shards + stage_rows
    if ipc and total != ipc:
        raise ConfigError(f"evaluate: 'ipc' {ipc} is not a stage boundary of the run (finished stages reach "
                          f"{', '.join(str(t) for t in _boundaries(manifest))})")
    return total, shards


def _boundaries(manifest: dict) -> list[int]:
    out, total = [], 0
    for _, ipc, _ in trained_increments(manifest):
        total += ipc
        out.append(total)
    return out


def _teacher(cfg_tree: dict, n: int):
    return load_teacher(from_dict(cfg_tree), n)


def eval_jobs(cfg: Config, load_train: Callable, ipc: int, tag: str, train: TrainConfig | None = None) -> list[EvalJob]:
    """The `repeats` jobs of one evaluation; seeds from (run seed, tag, model, ipc, repeat)."""
    e, n = cfg.evaluate, num_classes(cfg.data)
    check_teacher(cfg)
    model = e.model or cfg.student.model
    rded = e.rded if e.labels == "rded" else None
    if rded is not None:  # RDED's epochs and batch (its rule: by IPC and classes) in place of this protocol's
        batch = rded.batch_size or (50 if ipc <= 10 else 100) * (2 if n >= 100 else 1)
        train = replace(train or e.train, epochs=rded.epochs, batch_size=min(batch, ipc * n))
    train = train or replace(e.train, epochs=epochs_for(cfg, ipc))
    teacher = partial(_teacher, to_dict(cfg), n) if e.labels in ("soft", "rded") else None
    load_test = partial(load_split, cfg.data, "test")
    return [EvalJob(model=model, channels=cfg.data.channels, image_size=cfg.data.image_size, num_classes=n, train=train,
                    load_train=load_train, load_test=load_test, seed=derive_seed(cfg.seed, tag, model, ipc, r),
                    eval_every=e.eval_every, device=cfg.device, teacher=teacher,
                    temperature=rded.temperature if rded else e.temperature, rded=rded)
            for r in range(e.repeats)]


def expected_job_s(cfg: Config, job: EvalJob, images: int) -> float:
    """One job's training on `images` and its tests, at the slow rate (cost.slow_seconds): map_jobs' first deadline."""
    tests = job.train.epochs // max(1, job.eval_every) + 1
    flops = classifier_fit_flops(job.model, job.channels, job.image_size, job.num_classes, images, job.train.epochs,
                                 split_size(cfg.data, "test"), tests)
    r = cfg.ray
    return slow_seconds(flops, r.train_gpus_per_worker if r.train_use_gpu else 0, round(r.train_cpus_per_worker))


def summarise(rows: list[dict]) -> dict:
    """Mean and (sample) std of last and best accuracy over repeats, in percent."""
    out = {}
    for key in ("last", "best"):
        values = [100 * r[key] for r in rows]
        out[f"{key}_mean"] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def write_results(folder: Location, name: str, result: dict):
    """result as JSON and its repeats (+ mean and std rows) as CSV, under folder/name.{json,csv}."""
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1))
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["method", "model", "ipc", "labels", "config_hash", "seed", "last_acc", "best_acc", "best_epoch"])
    head = [result["method"], result["model"], result["ipc"], result["labels"], result["config_hash"]]
    for r in result["repeats"]:
        w.writerow(head + [r["seed"], f"{100 * r['last']:.2f}", f"{100 * r['best']:.2f}", r["best_epoch"]])
    w.writerow(head + ["mean", f"{result['last_mean']:.2f}", f"{result['best_mean']:.2f}", ""])
    w.writerow(head + ["std", f"{result['last_std']:.2f}", f"{result['best_std']:.2f}", ""])
    (folder / f"{name}.csv").write_text(f.getvalue())


def _result(cfg: Config, method: str, ipc: int, jobs: list[EvalJob], rows: list[dict], start: float,
            identity_hash: str) -> dict:
    e = cfg.evaluate
    return {"method": method, "model": jobs[0].model, "ipc": ipc, "labels": e.labels,
            **({"teacher": e.teacher} if e.labels != "hard" else {}),
            "config_hash": identity_hash, "epochs": jobs[0].train.epochs,
            **summarise(rows), "repeats": rows, "evaluate": to_dict(cfg.evaluate), "seconds": round(time.time() - start, 1)}


def _labels_tag(result: dict) -> str:
    """labels_of as part of a file name: soft (resnet18.tv_in1k) -> soft-resnet18.tv_in1k."""
    return re.sub(r"[^\w.]+", "-", labels_of(result)).strip("-")


def _print(result: dict, out: Location):
    print(f"evaluate: {result['method']}, {result['model']}, IPC {result['ipc']}, {labels_of(result)} labels, "
          f"{len(result['repeats'])} repeats x {result['epochs']} epochs: last {result['last_mean']:.2f} ± "
          f"{result['last_std']:.2f}%, best {result['best_mean']:.2f} ± {result['best_std']:.2f}% -> {out}", flush=True)


def evaluate_run(run_dir: Location, overrides: list[str] = ()) -> dict:
    """Evaluate a run's distilled set (or its first stages, evaluate.ipc); writes run_dir/eval/<name>.{json,csv}."""
    run_dir = as_location(run_dir)
    cfg, manifest = load_run(run_dir, overrides)
    start = time.time()
    ipc, shards = prefix_shards(manifest, cfg.evaluate.ipc)
    load_train = partial(load_tensor_set, run_dir, shards, num_classes(cfg.data), cfg.data.shape)
    jobs = eval_jobs(cfg, load_train, ipc, "eval")
    expected = partial(expected_job_s, cfg, jobs[0], ipc * num_classes(cfg.data))
    result = _result(cfg, cfg.distill.method, ipc, jobs, map_jobs(cfg, run_eval_job, jobs, "evaluate", expected), start,
                     manifest.get("config_hash") or config_hash(run_identity(cfg)))  # the run's, as it recorded it
    name = f"{result['model']}-ipc{ipc}-{_labels_tag(result)}"
    write_results(run_dir / "eval", name, result)
    _print(result, run_dir / "eval" / f"{name}.json")
    write_report(run_dir)
    return result


def evaluate_full(cfg: Config) -> dict:
    """The upper bar: the evaluation model trained on the whole real train split with `reference.train`."""
    start = time.time()
    out = as_location(cfg.out or f"runs/{cfg.name}-full")
    jobs = eval_jobs(cfg, partial(load_split, cfg.data, "train"), 0, "full", cfg.reference.train)
    rows = map_jobs(cfg, run_eval_job, jobs, "evaluate full",
                    lambda: expected_job_s(cfg, jobs[0], split_size(cfg.data, "train")))
    result = _result(cfg, "full", 0, jobs, rows, start, config_hash(run_identity(cfg)))
    result["ipc"] = "full"
    name = f"{result['model']}-full-{_labels_tag(result)}"
    write_results(out / "eval", name, result)
    _print(result, out / "eval" / f"{name}.json")
    return result


def main(argv: list[str]):
    parser = Parser(prog="python -m lgd_ray.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", metavar="RUN_DIR|key=value",
                        help="run folders, one after another (or, with --full, a config name), then evaluate keys "
                             "(repeats=5, model=resnetap10, ipc=10, labels=soft) or dotted config keys")
    parser.add_argument("--full", action="store_true", help="train on the whole real train split (the upper bar)")
    args = parser.parse_args(argv)
    override = re.compile(r"[A-Za-z_][\w.]*=")  # key=value; a URI's query (s3://b/run?scheme=http) is a target
    targets = [a for a in args.targets if not override.match(a)]
    overrides = [a for a in args.targets if override.match(a)]
    if not targets or (args.full and len(targets) > 1):
        parser.error("give one config name with --full, else one or more run folders")
    one_line_errors(lambda: evaluate_full(load_config(targets[0], overrides, "evaluate")) if args.full
                    else [evaluate_run(t, overrides) for t in targets])


if __name__ == "__main__":
    main(sys.argv[1:])
