"""The stage loop: seed increment I_0 (unguided) + K guided increments, the student retrained on D_i each stage.

    D_0 = I_0
    for i = 1..K:  theta_{i-1} = train(theta_{i-2}, D_{i-1});  I_i = generate(guided by S_i);  D_i = D_{i-1} + I_i
    theta_K = train(theta_{K-1}, D_K)

Work is cut into fixed class chunks (one shard each), made by a `ChunkRunner` (in this process, or a pool of Ray
actors). The loop skips chunks whose shard is in the manifest with a matching sha256 and stages already trained, so
rerunning a stopped run redoes only what is missing. The run folder is a storage Location (a folder or a URI).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterable

from tqdm.auto import tqdm

from lgd_ray.config import Config, ConfigError, config_hash, from_dict, run_identity, to_dict
from lgd_ray.cost import run_cost, stage_cost
from lgd_ray.data import check_data, class_chunks, class_names, num_classes
from lgd_ray.gpu_memory import size_guidance_batch
from lgd_ray.lease import Lease
from lgd_ray.methods import ChunkMaker, method_of, stage_plan
from lgd_ray.plan import ChunkTask, fit_workers
from lgd_ray.prior import prior_weights_sha256
from lgd_ray.prior_make import ensure_prior
from lgd_ray.reference import ensure_reference, fit_job, new_classifier, reference_path
from lgd_ray.report import write_report
from lgd_ray.seeding import derive_seed
from lgd_ray.shards import (MANIFEST, in_order, load_tensor_set, manifest_bytes, read_manifest, record, shard_sha256,
                            shards_through, stage_dir, stage_rows)
from lgd_ray.storage import Location, as_location
from lgd_ray.timeline import Timeline, span, timed
from lgd_ray.tiny_fit import ensure_tiny
from lgd_ray.train import Fitter, in_process_fitter, load_classifier, process_device, save_classifier


def check_run_folder(run_dir: Location, resume: bool) -> dict | None:
    """The run folder's manifest (None: a new run), or one line if the folder cannot be (re)started: a damaged
    manifest, stage folders without one, a run there without --resume. Needs no config: said before Ray starts."""
    existing = read_manifest(run_dir)
    if existing is None and any(loc.name.startswith("stage-") for loc in run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} holds stage folders but no {MANIFEST}: nothing says what made "
                          "them; set out=NEW_DIR (or restore the manifest to --resume)")
    if existing is not None and not resume:
        raise ConfigError(f"run folder {run_dir} already holds a run: pass --resume to continue it, or set out=NEW_DIR")
    return existing


def open_manifest(run_dir: Location, cfg: Config, resume: bool) -> dict:
    """The run's manifest: new, or (resume) the existing one if it was made by the same config."""
    existing = check_run_folder(run_dir, resume)
    if existing is None:
        return {"config": to_dict(cfg), "config_hash": config_hash(run_identity(cfg)), "stages": {}, "shards": []}
    # the stored config read with today's keys: a key added since then takes its default, as it did before it existed
    stored, current = run_identity(from_dict(existing["config"])), run_identity(cfg)
    stored["out"] = current["out"]  # where a run lives is not what made it: a run copied or moved elsewhere resumes
    if config_hash(stored) != config_hash(current):
        diff = _differing_keys(stored, current)
        raise ConfigError(f"--resume: {run_dir} was made by another config (differs in: {', '.join(diff)})")
    return existing


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _differing_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys


def check_models(manifest: dict, found: dict):
    """Record the prior's and theta*'s sha256; on resume, refuse models other than the ones the stages were made with."""
    for key, sha in found.items():
        made_with = manifest.get(key)
        if manifest["shards"] and made_with and sha and made_with != sha:
            what = "prior" if key.startswith("prior") else "reference model theta*"
            raise ConfigError(f"--resume: the {what} in the cache (sha256 {sha[:12]}) is not the one this run's stages "
                              f"were made with ({made_with[:12]}): restore it, or start anew with out=NEW_DIR")
        manifest[key] = sha


def kept(run_dir: Location, row: dict, log: Callable[[str], None]) -> bool:
    """Whether a shard row's object is there with its sha256; what is not is said, with both sha256s."""
    found = shard_sha256(run_dir, row)
    if found != row["sha256"]:
        log(f"resume: {row['path']}: expected sha256 {row['sha256'][:12]}, found "
            + (f"{found[:12]}" if found else "no object") + ": made again")
    return found == row["sha256"]


def student_kept(ckpt: Location, info: dict, log: Callable[[str], None]) -> bool:
    """Whether a trained stage's student is there with the sha256 the manifest recorded (older runs: present)."""
    found = ckpt.sha256() if ckpt.exists() else None
    expected = info.get("student_sha256", found)
    if found is None or found != expected:
        log(f"resume: {ckpt.name} of {ckpt.path.rsplit('/', 2)[-2]}: expected sha256 {str(expected)[:12]}, found "
            + (f"{found[:12]}" if found else "no object") + ": trained again")
        return False
    return True


def forget_stage(manifest: dict, index: int, redone: int, log: Callable[[str], None]):
    """Drop a stage made from the student of a stage that was made again (its shards and student are made anew)."""
    if str(index) in manifest["stages"] or stage_rows(manifest, index):
        log(f"resume: stage {index} rests on stage {redone}'s old student: made again")
    manifest["stages"].pop(str(index), None)
    manifest["shards"] = [r for r in manifest["shards"] if r["stage"] != index]


# a runner: (tasks, student state, shards_before: a task -> the shards of D_{i-1} holding its classes) -> rows
ChunkRunner = Callable[[list[ChunkTask], dict | None, Callable[[ChunkTask], list[dict]]], Iterable[dict]]


def in_process_runner(maker_factory: Callable[[], ChunkMaker], slot: dict) -> ChunkRunner:
    """Run chunks one after another in this process (the Ray layer runs them on a pool of actors instead); each row
    carries its timeline spans (the maker's start with the first chunk) in row["spans"], as an actor's does."""
    holder, spans = [], []

    def run(tasks, student_state, shards_before):
        if not holder:
            with timed(spans.extend, "actor_start", who="in-process", resources=slot):
                holder.append(maker_factory())
        for task in tasks:
            with timed(spans.extend, "chunk", who="in-process", stage=task.stage.index, resources=slot):
                row = holder[0].make(task, student_state, shards_before(task))
            row["spans"] = spans[:]
            spans.clear()
            yield row

    return run


def recording(fitter: Fitter, timeline: Timeline, stage: list) -> Fitter:
    """The fitter, its jobs' spans added to the timeline under the stage in stage[0] (None: set-up)."""
    def fit_recorded(job):
        state, metrics = fitter(job)
        timeline.add(dict(s, stage=stage[0]) for s in metrics.pop("spans", []))
        return state, metrics

    return fit_recorded


def run_stages(cfg: Config, run_dir: Location, resume: bool = False, runner: ChunkRunner | None = None,
               fitter: Fitter | None = None, log: Callable[[str], None] = print,
               on_stage: Callable[[int, dict], None] | None = None, lease: Lease | None = None,
               timeline: Timeline | None = None, started: float | None = None) -> dict:
    """Distil: seed increment + K guided stages into `run_dir`; returns the manifest (also in manifest.json).

    runner makes chunks (default: in this process), fitter trains classifiers (default: in this process) and tests
    them where it trains them; on_stage(index, info) is called after each stage is trained (e.g. to report to Ray
    Tune); lease: the run folder's lease this driver holds (checked before every manifest write); timeline: where the
    phases go (run_dir/timeline/), its set-up phase counted from `started` (default: now).
    """
    started = started or time.time()
    run_dir = as_location(run_dir)
    device = process_device(cfg.device)  # a sweep trial: the GPU Tune gave it, or the CPU
    if runner is None:  # guidance.batch auto not sized yet (a library call): for this process's device
        cfg = size_guidance_batch(cfg, 1.0 if device.type == "cuda" else 0.0)
    slot = {"GPU": 1} if device.type == "cuda" else {"CPU": 1}  # what a run without Ray holds
    timeline = timeline or Timeline(run_dir, slot)
    method = method_of(cfg)
    method.check(cfg)  # every run (a sweep's trials, a library call) refuses what the method cannot run
    check_data(cfg.data)
    n_classes = num_classes(cfg.data)
    manifest = open_manifest(run_dir, cfg, resume)

    def put(loc: Location, data: bytes):
        """Write a file of the run folder: fenced by the lease, so that a driver that lost the run folder to another
        stops before it writes (manifest, students, report)."""
        if lease is not None:
            lease.write(loc.relative_to(run_dir), data)
        else:
            loc.write_bytes(data)

    def save(manifest: dict):
        put(run_dir / MANIFEST, manifest_bytes(manifest))

    # Set-up, here in the driver before any chunk is made: prior and reference (trained and stored if absent)
    manifest["num_classes"] = n_classes
    manifest["classes"] = class_names(cfg.data)  # label i is the i-th name
    fit_stage = [None]
    fitter = recording(fitter or in_process_fitter(device), timeline, fit_stage)
    manifest["prior"] = ensure_prior(cfg, device, fitter) if method.needs_prior else None
    if method.uses_tiny_decoder(cfg):  # the guided step's decoder, for the actors
        manifest["tiny_decoder"] = ensure_tiny(cfg, manifest["prior"], fitter)
    _, ref_info = ensure_reference(cfg, n_classes, device, fitter)
    manifest["reference"] = ref_info
    check_models(manifest, {"prior_sha256": prior_weights_sha256(manifest["prior"]),
                            "reference_sha256": reference_path(cfg).sha256()})
    save(manifest)
    holder = lease.holder if lease is not None else ""
    runner = runner or in_process_runner(lambda: ChunkMaker(cfg, run_dir, device, holder), slot)
    chunks = class_chunks(n_classes, cfg.distill.classes_per_chunk)
    student_state = None
    stages = stage_plan(cfg)
    costs = {s["stage"]: s for s in run_cost(cfg)["stages"]}  # the dry-run's counts, recorded with each stage
    redone = None  # the first stage made (again) in this call: every later stage rests on its student
    timeline.add([span("setup", started, time.time(), who="driver")])
    timeline.nodes()
    # the report of a stage is drawn in a thread of its own while the next stage samples (matplotlib: one at a time)
    reporter, report = ThreadPoolExecutor(1, thread_name_prefix="lgd_ray-report"), None
    try:
        for stage in tqdm(stages, desc="stages", disable=None):
            if redone is not None:
                forget_stage(manifest, stage.index, redone, log)
            info = manifest["stages"].get(str(stage.index), {})
            ckpt = run_dir / stage_dir(stage.index) / "student.safetensors"
            done = {r["chunk"] for r in stage_rows(manifest, stage.index) if kept(run_dir, r, log)}
            if info.get("trained") and len(done) == len(chunks) and student_kept(ckpt, info, log):
                student_state = load_classifier(new_classifier(cfg, "student", n_classes), ckpt)[0].state_dict()
                continue
            redone = fit_stage[0] = stage.index
            # Generate I_i: every chunk whose shard is missing or does not match its sha256
            start = time.time()
            todo = [ChunkTask(stage, i, c) for i, c in enumerate(chunks) if i not in done]
            earlier = shards_through(manifest, stage.index - 1)
            shards_before = lambda t: in_order(r for r in earlier if set(r["classes"]) & set(t.classes))
            with timeline.phase("sample", stage.index):
                for row in tqdm(runner(todo, student_state, shards_before), total=len(todo),
                                desc=f"stage {stage.index} chunks", leave=False, disable=None):
                    timeline.add(row.pop("spans", []))
                    record(manifest, row)
                    save(manifest)
            sample_seconds = time.time() - start
            # Train theta_i on D_i, starting from theta_{i-1}, and test it where it is trained
            start = time.time()
            with timeline.phase("train", stage.index):
                d_i = shards_through(manifest, stage.index)
                job = fit_job(cfg, "student", n_classes, partial(load_tensor_set, run_dir, in_order(d_i), n_classes, cfg.data.shape),
                              derive_seed(cfg.seed, "student", stage.index), student_state,
                              f"{stage_dir(stage.index)}-student", test=True)
                job.workers = fit_workers(cfg, sum(r["count"] for r in d_i))
                student_state, metrics = fitter(job)
                acc = metrics["test_acc"]
                student = new_classifier(cfg, "student", n_classes)
                student.load_state_dict(student_state)
                new = stage_rows(manifest, stage.index)
                total = sum(r["count"] for r in d_i)
                save_classifier(student, ckpt, {"stage": stage.index, "test_acc": acc, "train_images": total}, put)
                scores = [(r["mean_S"], r["count"]) for r in new if r["mean_S"] is not None]
                info = {"trained": True, "student_sha256": ckpt.sha256(), "images": sum(r["count"] for r in new),
                        "total_images": total,
                        "student_acc": acc, "sample_seconds": round(sample_seconds, 2),
                        "train_seconds": round(time.time() - start, 2),
                        "mean_S": sum(s * n for s, n in scores) / sum(n for _, n in scores) if scores else None,
                        "cost": stage_cost(cfg, costs[stage.index], new)}
                manifest["stages"][str(stage.index)] = info
                save(manifest)
                timeline.nodes()
                timeline.flush()
            if report is not None:
                report.result()  # the previous stage's report (its error, if any, stops the run here)
            report = reporter.submit(_report, run_dir, timeline, stage.index, put)
            s_text = f", mean S {info['mean_S']:.3f}" if info["mean_S"] is not None else ""
            log(f"stage {stage.index}/{len(stages) - 1}: {info['images']} new images ({info['total_images']} in all), "
                f"sample {info['sample_seconds']:.1f} s, train {info['train_seconds']:.1f} s, "
                f"student test acc {100 * acc:.2f}%{s_text}")
            if on_stage:
                on_stage(stage.index, info)
        with timeline.phase("report"):  # the last stage's report: nothing left to overlap it with
            if report is not None:
                report.result()
            timeline.nodes()
            timeline.flush()
            if report is not None:
                write_report(run_dir, put)  # with the last spans in its table
    finally:
        reporter.shutdown(wait=True)
        timeline.flush()
    return manifest


def _report(run_dir: Location, timeline: Timeline, stage: int, write: Callable[[Location, bytes], None]):
    with timeline.phase("report", stage, who="driver-report"):
        write_report(run_dir, write)
