"""The Ray layer of training: a fit (a classifier's FitJob or a prior's PriorJob) as a Ray Train TorchTrainer run.

Each worker runs the plain job (`FitJob.run`, `PriorJob.run`) on its equal share of the data with the model wrapped in
DDP (gloo on CPU, NCCL on GPU), taking batch_size / workers samples a step. Every `job.checkpoint_every` rounds (epochs;
a prior's checkpoint_steps steps) rank 0 reports a checkpoint (lgd_ray.checkpoints); a fit that loses a worker (a node)
is restarted by Ray Train up to `ray.max_restarts` times and resumes from its last checkpoint. A job with its own
`checkpoints` folder also starts from the newest checkpoint an earlier fit left there (a driver that crashed).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import ray.train
import ray.train.torch
import torch
from ray.experimental import tqdm_ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution import context as train_context
from safetensors.torch import load_file
from tqdm.auto import tqdm

from lgd_ray.checkpoints import latest_checkpoint, load_from, read_checkpoint, write_checkpoint
from lgd_ray.config import Config
from lgd_ray.resources import resolve_auto, train_resources, wait_for_resources
from lgd_ray.storage import Location, as_location
from lgd_ray.train import Fitter, job_spans, process_device


def _report(metrics: dict, state: dict | None, round_: int):
    """ray.train.report is a barrier: every rank calls it, rank 0 with the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None:
            write_checkpoint(Path(tmp), state, round_)
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def rank_bar(rank: int, progress: bool) -> Callable:
    """A fit's bar on rank `rank`: rank 0 draws on the driver's console when the driver has a terminal (`progress`:
    sys.stderr.isatty() there; in a log Ray's bars would be one line of carriage returns per fit), the others none."""
    return driver_bar if rank == 0 and progress else silent_bar


def driver_bar(total: int, desc: str, initial: int = 0):
    """Rank 0's progress, drawn on the driver's console by Ray's distributed tqdm (when the driver logs its workers)."""
    bar = tqdm_ray.tqdm(total=total, desc=desc)
    bar.n = initial
    return bar


def silent_bar(total: int, desc: str, initial: int = 0):
    return tqdm(total=total, disable=True)


def _progress(state: dict) -> str:
    return f"epoch {state['epoch']}" if "epoch" in state else f"step {state['step']}"


def _worker_loop(config: dict):
    job = config["job"]
    if config["node_check"] is not None:  # every node, one that joined after the start-up check too
        config["node_check"].verify()
    torch.set_num_threads(config["threads"])
    # Ray Train logs each report at INFO under its module's file name, which LoggingConfig does not reach
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resume, checkpoint = None, ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure: continue after the last reported round
        with checkpoint.as_directory() as d:
            resume = read_checkpoint(Path(d))
    elif config["start_from"]:  # an earlier fit's newest checkpoint (as Ray Train V2 advises, read by the loop)
        resume = load_from(Location(config["start_from"]))
    last = job.rounds - 1

    def on_round(round_: int, metrics: dict, state):
        latest[:] = [round_, state]
        if round_ < last and (round_ + 1) % job.checkpoint_every == 0:
            _report({"round": round_, **metrics}, state() if rank == 0 else None, round_)

    latest = [last, None]
    device = process_device()  # fails fast when Ray gave GPUs that torch cannot see
    if device.type == "cuda":
        device, wrap = ray.train.torch.get_device(), ray.train.torch.prepare_model  # this rank's GPU among the node's
    else:  # a CPU worker, perhaps on a GPU node: plain DDP (Ray Train's prepare_model would call cuda.set_device there)
        wrap = torch.nn.parallel.DistributedDataParallel if world > 1 else None
    start = time.time()
    _, metrics = job.run(device, rank, world, wrap=wrap, on_round=on_round, resume=resume,
                         bar=rank_bar(rank, config["progress"]))
    spans = job_spans(metrics, start, time.time(), f"worker{rank}", config["resources"])
    if world > 1:  # every rank's spans, for rank 0's report (a collective: every rank calls it)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, spans)
        spans = [s for rank_spans in gathered for s in rank_spans]
    done = {"round": last, "resumed_after": _progress(resume) if resume else "", **metrics, "spans": spans}
    _report(done, latest[1]() if rank == 0 and latest[1] else None, last)


def ray_fitter(cfg: Config, run_dir: Location, node_check=None, pool=None) -> Fitter:
    """A Fitter that trains each job with TorchTrainer (job.workers workers, else ray.train_workers; GPU or CPU from
    cfg.ray); runs and checkpoints are kept in the job's `checkpoints` folder, else in run_dir/train, on a store every
    node reaches (a shared folder or an object store). node_check: the run's cluster.NodeCheck, run by every worker
    before it trains. pool: the run's kept SamplerPool: a student's fit (job.workers set by the stage loop) that its actors
    can hold runs on them (DDP over as many as it has workers; no Ray Train start-up); the prior's and theta*'s fits,
    which the actors need to start, and the fits they cannot hold run on Ray Train, the actors released first."""
    cfg = resolve_auto(cfg)  # a no-op for a run's config (sized before its folder was opened)
    r = cfg.ray
    resources = train_resources(cfg)

    # Read by Ray Train from this process's environment at each fit (and passed on to its controller and workers):
    # - every ray.train.report waits for the controller's next poll of the workers, every 2 s by default: a 2-second
    #   fit with ten checkpoints took 33 s (bench/train_fixed_cost.py); polled every 0.2 s it takes 15 s;
    # - Ray's distributed tqdm prints its bar states from the workers: not through Ray Train's print-to-logger patch.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    def fit_on_ray(job) -> tuple[dict, dict]:
        workers = getattr(job, "workers", 0) or r.train_workers
        # a student's fit (sized by the stage loop); the set-up's fits make the models the actors need to start
        if pool is not None and getattr(job, "workers", 0) and not job.checkpoints and pool.can_fit(workers):
            return pool.fit(job, workers)
        if pool is not None:
            pool.shutdown()
        storage = Location(job.checkpoints) if job.checkpoints else as_location(run_dir) / "train"
        found = latest_checkpoint(storage, job.name) if job.checkpoints else None
        # Ray Train waits for a worker group without end; say within the configured time if the cluster cannot give it
        wait_for_resources([resources] * workers, r.schedule_timeout_s, f"{workers} Ray Train workers")
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"job": job, "threads": max(1, round(r.train_cpus_per_worker)),
                               "start_from": str(found) if found else "", "node_check": node_check,
                               "resources": resources, "progress": sys.stderr.isatty()},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=r.train_use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if r.train_use_gpu else "gloo"),
            # a fresh name per fit: a stage retrained after a crash starts from theta_{i-1}, not from a stale run
            run_config=RunConfig(name=f"{job.name}-{uuid.uuid4().hex[:8]}", storage_path=storage.path,
                                 storage_filesystem=None if storage.is_local else storage.fs,
                                 failure_config=FailureConfig(max_failures=r.max_restarts,
                                                              controller_failure_limit=r.max_restarts),
                                 # the newest two only: a resumed fit needs the last (a prior's is ~4x its weights)
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 # Ray Train's INFO lines go to its log files; warnings and errors reach the console
                                 logging_config=LoggingConfig(log_level="WARNING")),
        )
        result = trainer.fit()
        if result.metrics.get("resumed_after"):
            why = "continued an earlier fit" if found else "recovered from a failure"
            print(f"{job.name}: {why} (resumed after {result.metrics['resumed_after']})", flush=True)
        with result.checkpoint.as_directory() as d:
            return load_file(str(Path(d) / f"{job.output}.safetensors")), result.metrics

    return fit_on_ray
