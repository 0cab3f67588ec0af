"""The stage plan: which stages a run has, and what each makes (docs/DESIGN.md sections 1-2). Read by the stage loop
(lgd_ray/stages.py), the methods (lgd_ray/methods.py), the cost model (lgd_ray/cost.py) and the run-folder queries
(lgd_ray/shards.py); it loads no model."""
from __future__ import annotations

from dataclasses import dataclass

from lgd_ray.config import Config


@dataclass(frozen=True)
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


def stage_plan(cfg: Config) -> list[Stage]:
    """The stages: seed increment + K increments; method dds selects all IPC at once (one increment)."""
    d, g = cfg.distill, cfg.guidance
    if d.method == "dds":
        return [Stage(0, d.total_ipc, 0, "dds", 1, False)]
    lgd = d.method == "lgd"
    seed = Stage(0, d.seed_ipc, 0, "random" if d.seed_from == "real" else "dit" if lgd else d.method, 1, False)
    return [seed] + [Stage(i, d.ipc_per_stage, d.seed_ipc + (i - 1) * d.ipc_per_stage, d.method, g.kappa if lgd else 1,
                           lgd and g.active)
                     for i in range(1, d.stages + 1)]


def fit_workers(cfg: Config, images: int) -> int:
    """DDP workers of a student fit on `images` images: the most, up to ray.train_workers, that divide the batch and
    leave each worker at least ray.min_worker_batch images of every step's batch and of the data."""
    r, batch = cfg.ray, cfg.student.train.batch_size
    workers = max(1, min(r.train_workers, batch // r.min_worker_batch, images // r.min_worker_batch))
    while batch % workers:
        workers -= 1
    return workers
