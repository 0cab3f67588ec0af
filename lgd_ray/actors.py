"""The Ray layer of generation: a pool of SamplerActors, each a ChunkMaker loaded once for the whole run.

Chunks are handed out as actors free up. A chunk whose actor died is resubmitted (the actor itself restarts, up
to max_restarts); output does not depend on which actor ran a chunk, so a resubmitted chunk writes the same bytes.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import ray
import torch

from lgd_ray.config import Config, ConfigError, from_dict, to_dict
from lgd_ray.methods import ChunkMaker, ChunkTask
from lgd_ray.storage import Location, as_location

MAX_ATTEMPTS = 4  # per chunk, across actor deaths


@ray.remote
class SamplerActor:
    """Holds the DiT prior (+ VAE) and the reference model; makes chunks with the stage's student weights."""

    def __init__(self, cfg_tree: dict, run_dir: Location, num_threads: int):
        torch.set_num_threads(num_threads)
        self.maker, self.error = None, None
        try:
            self.maker = ChunkMaker(from_dict(cfg_tree), run_dir)
        except ConfigError as e:  # a missing prior or reference: said by the first call, in one line, not retried
            self.error = e

    def make(self, task: ChunkTask, weights: dict | None, previous_shards: list[str]) -> dict:
        if self.error is not None:
            raise self.error
        # weights: {name: numpy array} from the object store (read-only, zero-copy); torch needs writable memory
        state = None if weights is None else {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
        row = self.maker.make(task, state, previous_shards)
        row["node"] = ray.get_runtime_context().get_node_id()
        return row

    def ping(self) -> bool:
        return True


class ActorPool:
    """A fixed pool of SamplerActors with dynamic chunk dispatch; call it as a stage loop ChunkRunner."""

    def __init__(self, cfg: Config, run_dir: Location):
        self.cfg, self.run_dir = cfg, as_location(run_dir)
        self.actors: list = []  # started on first use, after the driver has made sure prior and reference exist
        self.inflight: dict = {}
        self.resubmitted = 0

    def start(self):
        r = self.cfg.ray
        options = dict(num_cpus=r.num_cpus_per_actor, num_gpus=r.num_gpus_per_actor, max_restarts=r.max_restarts,
                       max_task_retries=0)
        tree = to_dict(self.cfg)
        self.actors = [SamplerActor.options(**options).remote(tree, self.run_dir, max(1, round(r.num_cpus_per_actor)))
                       for _ in range(r.actors)]

    def __call__(self, tasks: list[ChunkTask], student_state: dict | None, previous_shards) -> Iterator[dict]:
        if not self.actors:
            self.start()
        # One copy of the student in the object store for all actors (numpy arrays: zero-copy reads).
        weights = None if student_state is None else ray.put({k: v.numpy() for k, v in student_state.items()})
        pending, attempts = deque(tasks), {t: 0 for t in tasks}
        inflight = self.inflight = {}  # result ref -> (actor, chunk task)
        idle, alive = deque(self.actors), list(self.actors)
        while pending or inflight:
            while pending and idle:
                actor, task = idle.popleft(), pending.popleft()
                attempts[task] += 1
                inflight[actor.make.remote(task, weights, previous_shards(task))] = (actor, task)
            (ready,), _ = ray.wait(list(inflight), num_returns=1)
            actor, task = inflight.pop(ready)
            try:
                row = ray.get(ready)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, ConfigError):
                    raise e.cause from None
                raise
            except ray.exceptions.RayActorError as e:
                if attempts[task] >= MAX_ATTEMPTS:
                    raise RuntimeError(f"chunk {task} failed {attempts[task]} times; last error: {e}") from e
                self.resubmitted += 1
                pending.appendleft(task)
                if isinstance(e, ray.exceptions.ActorDiedError) and not _restarts(actor):
                    alive.remove(actor)  # gone for good: no restarts left
                    if not alive:
                        raise RuntimeError("every sampler actor died") from e
                    continue
                idle.append(actor)
                continue
            idle.append(actor)
            yield row

    def shutdown(self):
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _restarts(actor) -> bool:
    """Whether a dead-looking actor comes back (it answers a ping after its restart)."""
    try:
        return ray.get(actor.ping.remote(), timeout=120)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
