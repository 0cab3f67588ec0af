"""The Ray layer of training: a classifier fit (reference or student) as a Ray Train TorchTrainer run.

Each worker runs the plain `train.fit` on its equal share of the data with the model wrapped in DDP (gloo on CPU,
NCCL on GPU), taking batch_size / workers images a step. Every `ray.checkpoint_every` epochs rank 0 reports a
checkpoint (weights, optimizer, scheduler); a fit that loses a worker (a node) is restarted by Ray Train up to
`ray.max_restarts` times and resumes from its last checkpoint. The final checkpoint holds the trained weights.
"""
from __future__ import annotations

import logging
import tempfile
import uuid
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution import context as train_context
from safetensors.torch import load_file, save_file

from lgd_ray.config import Config
from lgd_ray.resources import train_resources, wait_for_resources
from lgd_ray.storage import Location, as_location
from lgd_ray.train import FitJob, Fitter, fit, process_device

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"  # epoch, optimizer and scheduler state (torch.load with weights_only=True)


def _write_checkpoint(folder: Path, state: dict):
    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(folder / WEIGHTS))
    torch.save({k: state[k] for k in ("epoch", "optimizer", "scheduler")}, folder / TRAIN_STATE)


def _read_checkpoint(folder: Path) -> dict:
    state = torch.load(folder / TRAIN_STATE, weights_only=True)
    return {**state, "model": load_file(str(folder / WEIGHTS))}


def _report(metrics: dict, state: dict | None):
    """ray.train.report is a barrier: every rank calls it, rank 0 with the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None:
            _write_checkpoint(Path(tmp), state)
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _worker_loop(config: dict):
    job: FitJob = config["job"]
    torch.set_num_threads(config["threads"])
    # Ray Train logs each report at INFO under its module's file name, which LoggingConfig does not reach
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resume, checkpoint = None, ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure: continue after the last reported epoch
        with checkpoint.as_directory() as d:
            resume = _read_checkpoint(Path(d))
    last, every = job.train.epochs - 1, config["checkpoint_every"]

    def on_epoch(epoch: int, metrics: dict, state):
        latest[:] = [metrics, state]
        if epoch < last and (epoch + 1) % every == 0:
            _report({"epoch": epoch, **metrics}, state() if rank == 0 else None)

    latest = [{}, None]
    device = process_device()  # fails fast when Ray gave GPUs that torch cannot see
    device = ray.train.torch.get_device() if device.type == "cuda" else device  # this rank's GPU among the node's
    fit(job, device, rank, world, wrap=ray.train.torch.prepare_model, on_epoch=on_epoch, resume=resume)
    done = {"epoch": last, "resumed_after": resume["epoch"] if resume else -1, **latest[0]}
    _report(done, latest[1]() if rank == 0 and latest[1] else None)


def ray_fitter(cfg: Config, run_dir: Location) -> Fitter:
    """A Fitter that trains each job with TorchTrainer (workers, GPU or CPU from cfg.ray); runs and checkpoints are kept
    in run_dir/train, on the run's own store (a shared folder or an object store: every node reaches it)."""
    r = cfg.ray
    storage = as_location(run_dir) / "train"
    resources = train_resources(cfg)

    def fit_on_ray(job: FitJob) -> dict:
        # Ray Train waits for a worker group without end; say within the configured time if the cluster cannot give it
        wait_for_resources([resources] * r.train_workers, r.schedule_timeout_s, f"{r.train_workers} Ray Train workers")
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"job": job, "threads": max(1, round(r.train_cpus_per_worker)),
                               "checkpoint_every": r.checkpoint_every},
            scaling_config=ScalingConfig(num_workers=r.train_workers, use_gpu=r.train_use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if r.train_use_gpu else "gloo"),
            # a fresh name per fit: a stage retrained after a crash starts from theta_{i-1}, not from a stale run
            run_config=RunConfig(name=f"{job.name}-{uuid.uuid4().hex[:8]}", storage_path=storage.path,
                                 storage_filesystem=None if storage.is_local else storage.fs,
                                 failure_config=FailureConfig(max_failures=r.max_restarts,
                                                              controller_failure_limit=r.max_restarts),
                                 # Ray Train's INFO lines go to its log files; warnings and errors reach the console
                                 logging_config=LoggingConfig(log_level="WARNING")),
        )
        result = trainer.fit()
        if result.metrics.get("resumed_after", -1) >= 0:
            print(f"{job.name}: recovered from a failure (resumed after epoch {result.metrics['resumed_after']})",
                  flush=True)
        with result.checkpoint.as_directory() as d:
            return load_file(str(Path(d) / WEIGHTS))

    return fit_on_ray
