"""A run's units of work: a stage (what it makes, how many images per class, with how many candidates, guided or not;
each method's plan of them is `lgd_ray.methods.stage_plan`), a chunk of it, and the workers of a student's fit."""
from __future__ import annotations

from dataclasses import dataclass

from lgd_ray.config import Config


@dataclass(frozen=True, kw_only=True)
class Stage:
    index: int
    ipc: int  # images per class generated in this stage
    slot0: int  # first slot of this stage: slots are numbered across the whole run, so keys are unique
    method: str  # what makes this stage's images: random | dit | mgd3 | dds | lgd (lgd's seed stage is dit, or
    #              random with distill.seed_from real)
    kappa: int  # candidates per slot (rank selection by S keeps the best)
    gradient: bool  # the sampler follows grad S (and the deviation gradient) inside the guidance window


@dataclass(frozen=True)
class ChunkTask:
    """One shard's work: the classes of one chunk in one stage."""

    stage: Stage
    chunk: int
    classes: tuple[int, ...]


def fit_workers(cfg: Config, images: int) -> int:
    """DDP workers of a student fit on `images` images: the most, up to ray.train_workers, that divide the batch and
    leave each worker at least ray.min_worker_batch images of every step's batch and of the data."""
    r, batch = cfg.ray, cfg.student.train.batch_size
    workers = max(1, min(r.train_workers or 1, batch // r.min_worker_batch, images // r.min_worker_batch))
    while batch % workers:
        workers -= 1
    return workers
