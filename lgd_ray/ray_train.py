"""The Ray layer of training: a classifier fit (reference or student) as a Ray Train TorchTrainer run.

Each worker runs the plain `train.fit` on its equal share of the data with the model wrapped in DDP (gloo on
CPU), reports metrics every epoch, and rank 0 reports the trained weights as a checkpoint at the end.
"""
from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import load_file, save_file

from lgd_ray.config import Config
from lgd_ray.storage import Location, as_location
from lgd_ray.train import FitJob, Fitter, fit

WEIGHTS = "model.safetensors"
MAX_REPORTS = 5


def _worker_loop(config: dict):
    job: FitJob = config["job"]
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Every ray.train.report is a barrier costing ~2 s here: report at most MAX_REPORTS times per fit.
    last, every = job.train.epochs - 1, -(-job.train.epochs // MAX_REPORTS)

    def report(epoch: int, metrics: dict):
        if epoch < last and (epoch + 1) % every == 0:
            ray.train.report({"epoch": epoch, **metrics})

    model = fit(job, ray.train.torch.get_device(), rank, world, wrap=ray.train.torch.prepare_model, on_epoch=report)
    # ray.train.report is a barrier: every rank reports, rank 0 with the weights.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            module = model.module if hasattr(model, "module") else model
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(Path(tmp) / WEIGHTS))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report({"epoch": last}, checkpoint=checkpoint)


def ray_fitter(cfg: Config, run_dir: Location) -> Fitter:
    """A Fitter that trains each job with TorchTrainer (workers, GPU or CPU from cfg.ray); runs and checkpoints are kept
    in run_dir/train, on the run's own store (a shared folder or an object store: every node reaches it)."""
    r = cfg.ray
    storage = as_location(run_dir) / "train"
    resources = {"CPU": r.train_cpus_per_worker, **({"GPU": r.train_gpus_per_worker} if r.train_use_gpu else {})}

    def fit_on_ray(job: FitJob) -> dict:
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"job": job, "threads": max(1, round(r.train_cpus_per_worker))},
            scaling_config=ScalingConfig(num_workers=r.train_workers, use_gpu=r.train_use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if r.train_use_gpu else "gloo"),
            # a fresh name per fit: a stage retrained after a crash starts from theta_{i-1}, not from a stale run
            run_config=RunConfig(name=f"{job.name}-{uuid.uuid4().hex[:8]}", storage_path=storage.path,
                                 storage_filesystem=None if storage.is_local else storage.fs),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            return load_file(str(Path(d) / WEIGHTS))

    return fit_on_ray
