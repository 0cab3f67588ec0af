"""The Ray layer of generation: a pool of SamplerActors, each a ChunkMaker, for one stage's chunks at a time.

A run's pool (`keep`) lives from stage to stage: each actor loads the prior and theta* once, gets the student's
weights once per stage, and fits the students that one worker should fit (`ActorPool.fit`: no Ray Train start-up,
the slot that sampled trains). A fit that needs several Ray Train workers releases the actors first, so that it
gets every CPU and GPU; the next stage starts them again (the prior from the node's local copy).

Chunks go to whichever actor is free; everything is awaited with one `ray.wait` (chunk results and actor start-ups),
so a dead or restarting actor never blocks the others. Output does not depend on which actor ran a chunk, so a chunk
is simply run again: after its actor died (on another actor; the dead one restarts up to max_restarts times or is
replaced), or after it raised an error that may pass (an I/O or network error, up to chunk_retries times with back-off;
a CUDA error on a fresh actor); any other error, which would come again every time, stops the run at once.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterator

import ray
import torch

from lgd_ray.config import Config, ConfigError, from_dict, to_dict
from lgd_ray.methods import ChunkMaker
from lgd_ray.plan import ChunkTask
from lgd_ray.resources import actor_resources, check_placeable, ray_options, resolve_auto, shortage
from lgd_ray.storage import PERMANENT, Location, as_location
from lgd_ray.timeline import timed
from lgd_ray.train import job_spans, process_device


def error_kind(error: BaseException) -> str:
    """How a chunk's error is handled: "transient" (an I/O or network error that may pass: the chunk is retried with
    back-off), "device" (a CUDA error: retried on a fresh actor) or "code" (anything else, which would happen again
    every time: the run stops at once with the remote traceback)."""
    if isinstance(error, RuntimeError) and "CUDA error" in str(error):
        return "device"
    if isinstance(error, (ConnectionError, TimeoutError)) or (
            isinstance(error, OSError) and not isinstance(error, PERMANENT)):
        return "transient"
    return "code"


@ray.remote
class SamplerActor:
    """Holds the DiT prior (+ VAE) and the reference model; makes chunks with the stage's student weights."""

    def __init__(self, maker: type, cfg_tree: dict, run_dir: Location, num_threads: int, node_check=None,
                 resources: dict | None = None):
        torch.set_num_threads(num_threads)
        self.maker, self.error = None, None
        self.who = f"actor-{ray.get_runtime_context().get_actor_id()[:8]}"
        self.resources = resources
        self.spans = []  # timeline spans not yet handed back: they go with the next chunk's row
        try:
            with timed(self.spans.extend, "actor_start", who=self.who, resources=resources):  # the prior's load included
                if node_check is not None:  # every node, one that joined after the start-up check too
                    node_check.verify()
                self.maker = maker(from_dict(cfg_tree), run_dir)
        except ConfigError as e:  # a missing prior or reference, a GPU torch cannot see: said by the first call
            self.error = e

    def make(self, task: ChunkTask, weights: dict | None, previous_shards: list[str]) -> dict:
        if self.error is not None:
            raise self.error
        with timed(self.spans.extend, "chunk", who=self.who, stage=task.stage.index, resources=self.resources):
            # weights: {name: numpy array} from the object store (read-only, zero-copy); torch needs writable memory
            state = None if weights is None else {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
            row = self.maker.make(task, state, previous_shards)
        row["node"] = ray.get_runtime_context().get_node_id()
        row["spans"], self.spans = self.spans, []
        return row

    def fit(self, job, threads: int) -> tuple[dict, dict]:
        """Train a one-worker FitJob here, on this actor's CPU or GPU, with `threads` torch threads (a Ray Train
        worker's count: the same arithmetic); returns (weights, metrics with the fit's timeline spans)."""
        if self.error is not None:
            raise self.error
        before, start = torch.get_num_threads(), time.time()
        torch.set_num_threads(threads)
        try:
            state, metrics = job.run(process_device())
        finally:
            torch.set_num_threads(before)
        metrics["spans"] = job_spans(metrics, start, time.time(), self.who, self.resources)
        return state, metrics

    def ping(self) -> bool:
        return True


class ActorPool:
    """SamplerActors with dynamic chunk dispatch; call it as a stage loop ChunkRunner.

    maker: the ChunkMaker class the actors hold (a subclass may add behaviour, e.g. faults in tests); node_check: the
    run's cluster.NodeCheck, which every actor runs on its node before its first chunk. keep: the actors live from
    stage to stage with their prior loaded (replaced only when they die) and can fit one-worker students
    (`fit`) until `shutdown()`; else they are released when a stage's last chunk is in.
    """

    def __init__(self, cfg: Config, run_dir: Location, maker: type = ChunkMaker, node_check=None, keep: bool = False):
        self.cfg, self.run_dir, self.maker, self.node_check = resolve_auto(cfg), as_location(run_dir), maker, node_check
        self.keep = keep
        self.actors: list = []
        self._inflight: dict = {}  # chunk result ref -> (actor, chunk task)
        self.resubmitted = 0  # chunks run again because their actor died
        self.retried = 0  # chunks run again after an error that may pass (I/O, network, CUDA)

    def _launch(self, starting: dict):
        r = self.cfg.ray
        actor = SamplerActor.options(
            **ray_options(actor_resources(self.cfg)), max_restarts=r.max_restarts,
            max_task_retries=0,  # a chunk goes to the next free actor, not back to this one
        ).remote(self.maker, to_dict(self.cfg), self.run_dir, max(1, round(r.num_cpus_per_actor)), self.node_check,
                 actor_resources(self.cfg))
        self.actors.append(actor)
        starting[actor.ping.remote()] = actor

    def __call__(self, tasks: list[ChunkTask], student_state: dict | None, previous_shards) -> Iterator[dict]:
        r = self.cfg.ray
        check_placeable(actor_resources(self.cfg), f"{r.actors} sampler actors")
        # One copy of the student in the object store for all actors (numpy arrays: zero-copy reads).
        weights = None if student_state is None else ray.put({k: v.numpy() for k, v in student_state.items()})
        pending, later = deque(tasks), []  # later: (not before, task) of chunks waiting out a back-off
        failures, deaths = {t: 0 for t in tasks}, {t: 0 for t in tasks}
        starting, idle = {}, deque()  # ping ref -> actor that is starting or restarting; actors ready for a chunk
        inflight = self._inflight = {}
        replacements = r.actors * (r.max_restarts + 1)  # actors that died for good may be replaced this often
        for actor in self.actors:  # kept from the last stage: ready once they answer (a dead one is replaced)
            starting[actor.ping.remote()] = actor
        for _ in range(min(r.actors, len(tasks)) - len(self.actors)):
            self._launch(starting)
        waiting_since = time.time()  # while no actor is ready: bounded by schedule_timeout_s
        started, slowest, given_up = {}, 0.0, set()  # chunk ref -> when it went out; the slowest chunk done
        try:
            while pending or later or inflight:
                now = time.time()
                pending.extend(t for due, t in later if due <= now)
                later = [(due, t) for due, t in later if due > now]
                while pending and idle:
                    actor, task = idle.popleft(), pending.popleft()
                    ref = actor.make.remote(task, weights, previous_shards(task))
                    inflight[ref], started[ref] = (actor, task), now
                if not inflight and not idle and now - waiting_since > r.schedule_timeout_s:
                    raise shortage(f"{r.actors} sampler actors", actor_resources(self.cfg), r.schedule_timeout_s)
                # 0: 10x the slowest chunk yet, and what a chunk may spend waiting out a store outage
                deadline = r.chunk_timeout_s or (10 * slowest + self.cfg.storage.retry_s if slowest else 0)
                for ref, (actor, task) in inflight.items():  # a chunk past its deadline: its actor is restarted
                    if deadline and ref not in given_up and now - started[ref] > deadline:
                        given_up.add(ref)
                        print(f"sampler: chunk {task.chunk} of stage {task.stage.index} ran {now - started[ref]:.0f} s, "
                              f"past its deadline of {deadline:.0f} s (ray.chunk_timeout_s): its actor is restarted "
                              "and the chunk goes elsewhere", flush=True)
                        ray.kill(actor, no_restart=False)
                waitable = list(inflight) + list(starting)
                if not waitable:  # every chunk waits out a back-off: sleep until the first is due
                    time.sleep(min(1.0, max(0.0, min(due for due, _ in later) - now)) if later else 1.0)
                    continue
                ready, _ = ray.wait(waitable, num_returns=1, timeout=1.0)
                if not ready:
                    continue
                ref = ready[0]
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(actor)
                    except ray.exceptions.RayActorError as e:  # gone (no restarts left, or its node is): replace it
                        ray.kill(actor, no_restart=True)
                        self.actors.remove(actor)
                        if replacements <= 0:
                            raise RuntimeError(f"sampler actors keep dying; last: {e}") from e
                        replacements -= 1
                        self._launch(starting)
                    continue
                actor, task = inflight.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, ConfigError):
                        raise e.cause from None
                    kind = error_kind(e.cause)
                    failures[task] += 1
                    if kind == "code" or failures[task] > r.chunk_retries:
                        raise  # the chunk's own error, with its remote traceback
                    self.retried += 1
                    later.append((time.time() + min(30.0, 2.0 ** (failures[task] - 1)), task))
                    if kind == "device":  # a CUDA error sticks to its process: a fresh actor takes its place
                        ray.kill(actor, no_restart=True)
                        self.actors.remove(actor)
                        self._launch(starting)
                    else:
                        idle.append(actor)
                    continue
                except ray.exceptions.RayActorError as e:
                    deaths[task] += 1
                    if deaths[task] > r.max_restarts + 1:
                        raise RuntimeError(f"chunk {task} lost its actor {deaths[task]} times; last: {e}") from e
                    self.resubmitted += 1
                    pending.appendleft(task)
                    starting[actor.ping.remote()] = actor  # back in the pool once restarted, replaced if dead
                    waiting_since = time.time()
                    continue
                idle.append(actor)
                waiting_since = time.time()
                slowest = max(slowest, waiting_since - started.pop(ref))
                yield row
        finally:
            if not self.keep:
                self.shutdown()

    def can_fit(self) -> bool:
        """Whether a one-worker fit may run on an actor: the pool is kept, and its actors have the device (CPU or
        GPU) that the config gives Ray Train workers."""
        return self.keep and (self.cfg.ray.num_gpus_per_actor > 0) == bool(self.cfg.ray.train_use_gpu)

    def fit(self, job) -> tuple[dict, dict]:
        """Train a one-worker FitJob on an actor of the pool (started if there is none), with no Ray Train start-up;
        fitted again on a fresh actor if its actor dies (the result is a function of the job alone)."""
        r, last = self.cfg.ray, None
        for _ in range(r.max_restarts + 2):
            actor = self._ready_actor()
            try:
                return ray.get(actor.fit.remote(job, max(1, round(r.train_cpus_per_worker))))
            except ray.exceptions.RayActorError as e:
                last = e
                print(f"{job.name}: its actor died ({str(e).splitlines()[0]}): fitted again", flush=True)
        raise RuntimeError(f"{job.name}: the fit lost its actor {r.max_restarts + 2} times; last: {last}")

    def _ready_actor(self):
        """An actor that answers: the first kept one, else a new one (bounded by ray.schedule_timeout_s)."""
        r = self.cfg.ray
        while self.actors:
            try:
                ray.get(self.actors[0].ping.remote(), timeout=r.schedule_timeout_s)
                return self.actors[0]
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(self.actors.pop(0), no_restart=True)
        check_placeable(actor_resources(self.cfg), "a sampler actor")
        starting = {}
        self._launch(starting)
        (ref, actor), = starting.items()
        if not ray.wait([ref], timeout=r.schedule_timeout_s)[0]:
            raise shortage("a sampler actor", actor_resources(self.cfg), r.schedule_timeout_s)
        ray.get(ref)
        return actor

    def running(self) -> list:
        """The actors running a chunk now (its result not in yet)."""
        return [actor for ref, (actor, _) in list(self._inflight.items()) if not ray.wait([ref], timeout=0)[0]]

    def shutdown(self):
        """Kill the actors (no restart): their CPUs and GPUs go back to the cluster (a kept pool starts new ones
        when it is next called)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
