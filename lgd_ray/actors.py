"""The Ray layer of generation: a pool of SamplerActors, each a ChunkMaker, for one stage's chunks at a time.

A run's pool (`keep`) lives from stage to stage: each actor loads the prior and theta* once, gets the student's
weights once per stage, and fits the students (`SamplerPool.fit`: the slots that sampled train, DDP over as many
actors as the fit has workers; no Ray Train start-up, the prior stays loaded). A fit the actors cannot hold (more
workers than actors, GPU actors sharing a GPU) goes to Ray Train after the actors are released, so that it gets every
CPU and GPU; the next stage starts them again (the prior from the node's local copy).

Chunks go to whichever actor is free; everything is awaited with one `ray.wait` (chunk results and actor start-ups),
so a dead or restarting actor never blocks the others. Output does not depend on which actor ran a chunk, so a chunk
is simply run again: after its actor died (on another actor; the dead one restarts up to max_restarts times or is
replaced), or after it raised an error that may pass (an I/O or network error, up to chunk_retries times with back-off;
a CUDA error on a fresh actor); any other error, which would come again every time, stops the run at once.
"""
from __future__ import annotations

import socket
import sys
import time
from collections import deque
from datetime import timedelta
from typing import Callable, Iterator

import ray
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lgd_ray.config import Config, from_dict, to_dict
from lgd_ray.cost import chunk_flops, slow_seconds
from lgd_ray.errors import UserError
from lgd_ray.methods import ChunkMaker
from lgd_ray.plan import ChunkTask
from lgd_ray.ray_train import rank_bar
from lgd_ray.resources import actor_resources, check_placeable, deadline_s, ray_options, resolve_auto, shortage
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


FIT_COLLECTIVE_TIMEOUT_S = 600  # a DDP rank waiting this long on a collective (its peer died) gives up


@ray.remote
class SamplerActor:
    """Holds the DiT prior (+ VAE) and the reference model; makes chunks with the stage's student weights."""

    def __init__(self, maker: type, cfg_tree: dict, run_dir: Location, num_threads: int, node_check=None,
                 resources: dict | None = None, holder: str = ""):
        torch.set_num_threads(num_threads)
        self.maker, self.error = None, None
        self.who = f"actor-{ray.get_runtime_context().get_actor_id()[:8]}"
        self.resources = resources
        self.spans = []  # timeline spans not yet handed back: they go with the next chunk's row
        try:
            with timed(self.spans.extend, "actor_start", who=self.who, resources=resources):  # the prior's load included
                if node_check is not None:  # every node, one that joined after the start-up check too
                    node_check.verify()
                self.maker = maker(from_dict(cfg_tree), run_dir, holder=holder)
        except UserError as e:  # a missing prior or reference, a GPU torch cannot see: said by the first call
            self.error = e

    def make(self, task: ChunkTask, weights: dict | None, previous_shards: list[dict]) -> dict:
        if self.error is not None:
            raise self.error
        with timed(self.spans.extend, "chunk", who=self.who, stage=task.stage.index, resources=self.resources):
            # weights: {name: numpy array} from the object store (read-only, zero-copy); torch needs writable memory
            state = None if weights is None else {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
            row = self.maker.make(task, state, previous_shards)
        row["node"] = ray.get_runtime_context().get_node_id()
        row["spans"], self.spans = self.spans, []
        return row

    def rendezvous(self) -> str:
        """tcp://IP:PORT on this actor's node, a port free now: where a fit's DDP ranks meet (this actor: rank 0)."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            return f"tcp://{ray.util.get_node_ip_address()}:{probe.getsockname()[1]}"

    def fit(self, job, threads: int, rank: int = 0, world: int = 1, init_method: str = "",
            progress: bool = False) -> tuple[dict, dict]:
        """Train a FitJob here as DDP rank `rank` of `world` (one: no DDP), on this actor's CPU or GPU, with `threads`
        torch threads (a Ray Train worker's count: the same arithmetic), its bar on the driver's terminal with
        `progress`; returns (weights, metrics with the fit's timeline spans)."""
        if self.error is not None:
            raise self.error
        before, start = torch.get_num_threads(), time.time()
        torch.set_num_threads(threads)
        device, wrap = process_device(), None
        if world > 1:  # gloo on the CPU, NCCL on GPUs (one whole GPU per actor), as Ray Train's workers use
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                                    world_size=world, timeout=timedelta(seconds=FIT_COLLECTIVE_TIMEOUT_S))
            wrap = (lambda m: DDP(m.to(device), device_ids=[torch.cuda.current_device()])) if device.type == "cuda" \
                else DDP
        try:
            state, metrics = job.run(device, rank, world, wrap=wrap, bar=rank_bar(rank, progress))
        finally:
            torch.set_num_threads(before)
            if world > 1:
                dist.destroy_process_group()
        metrics["spans"] = job_spans(metrics, start, time.time(), self.who, self.resources)
        return state, metrics

    def ping(self) -> bool:
        return True


class SamplerPool:
    """SamplerActors with dynamic chunk dispatch; call it as a stage loop ChunkRunner.

    maker: the ChunkMaker class the actors hold (a subclass may add behaviour, e.g. faults in tests); node_check: the
    run's cluster.NodeCheck, which every actor runs on its node before its first chunk. keep: the actors live from
    stage to stage with their prior loaded (replaced only when they die) and fit the students (`fit`) until
    `shutdown()`; else they are released when a stage's last chunk is in.
    """

    def __init__(self, cfg: Config, run_dir: Location, maker: type = ChunkMaker, node_check=None, keep: bool = False,
                 holder: str = ""):
        self.cfg, self.run_dir, self.maker, self.node_check = resolve_auto(cfg), as_location(run_dir), maker, node_check
        self.keep, self.holder = keep, holder  # holder: the driver's lease holder (its chunks' shards are fenced by it)
        self.actors: list = []
        self._inflight: dict = {}  # chunk result ref -> (actor, chunk task)
        self.resubmitted = 0  # chunks run again because their actor died
        self.retried = 0  # chunks run again after an error that may pass (I/O, network, CUDA)
        self._chunk_flops = None  # per stage, for the first deadline

    def _launch(self, starting: dict):
        r = self.cfg.ray
        actor = SamplerActor.options(
            **ray_options(actor_resources(self.cfg)), max_restarts=r.max_restarts,
            max_task_retries=0,  # a chunk goes to the next free actor, not back to this one
        ).remote(self.maker, to_dict(self.cfg), self.run_dir, max(1, round(r.num_cpus_per_actor)), self.node_check,
                 actor_resources(self.cfg), self.holder)
        self.actors.append(actor)
        starting[actor.ping.remote()] = actor

    def __call__(self, tasks: list[ChunkTask], student_state: dict | None,
                 shards_before: Callable[[ChunkTask], list[dict]]) -> Iterator[dict]:
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
        expected = self._expected_chunk_s(tasks[0].stage.index) if tasks else 0.0
        started, slowest, given_up = {}, 0.0, set()  # chunk ref -> when it went out; the slowest chunk done
        try:
            while pending or later or inflight:
                now = time.time()
                pending.extend(t for due, t in later if due <= now)
                later = [(due, t) for due, t in later if due > now]
                while pending and idle:
                    actor, task = idle.popleft(), pending.popleft()
                    ref = actor.make.remote(task, weights, shards_before(task))
                    inflight[ref], started[ref] = (actor, task), now
                if not inflight and not idle and now - waiting_since > r.schedule_timeout_s:
                    raise shortage(f"{r.actors} sampler actors", actor_resources(self.cfg), r.schedule_timeout_s)
                deadline, rule = deadline_s(self.cfg, slowest, expected)
                for ref, (actor, task) in inflight.items():  # a chunk past its deadline: its actor is restarted
                    if ref not in given_up and now - started[ref] > deadline:
                        given_up.add(ref)
                        print(f"sampler: chunk {task.chunk} of stage {task.stage.index} ran {now - started[ref]:.0f} s, "
                              f"past its deadline of {deadline:.0f} s ({rule}): its actor is restarted "
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
                    if isinstance(e.cause, UserError):
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

    def _expected_chunk_s(self, stage: int) -> float:
        """A chunk of `stage` by the dry-run's count at a slow rate (cost.slow_seconds): the stage's deadline until
        one of its chunks has finished."""
        if self._chunk_flops is None:
            self._chunk_flops = chunk_flops(self.cfg)
        r = self.cfg.ray
        flops = self._chunk_flops[stage] if stage < len(self._chunk_flops) else 0.0
        return slow_seconds(flops, r.num_gpus_per_actor, max(1, round(r.num_cpus_per_actor)))

    def start(self):
        """Start the actors now, without waiting for them (they load the prior while the driver sets up); the first
        stage takes them as they become ready."""
        for _ in range(self.cfg.ray.actors - len(self.actors)):
            self._launch({})

    def can_fit(self, workers: int) -> bool:
        """Whether a fit of `workers` DDP workers may run on the pool's actors: the pool is kept, it has that many
        actors, they have the device (CPU or GPU) the config gives Ray Train workers, and for DDP on GPUs a whole GPU
        each (NCCL refuses two ranks on one GPU)."""
        r = self.cfg.ray
        gpu = r.num_gpus_per_actor > 0
        return (self.keep and workers <= r.actors and gpu == bool(r.train_use_gpu)
                and (workers == 1 or not gpu or r.num_gpus_per_actor >= 1))

    def fit(self, job, workers: int = 1) -> tuple[dict, dict]:
        """Train a FitJob on `workers` actors of the pool (DDP when more than one; started if the pool has fewer),
        with no Ray Train start-up and the prior left loaded; fitted again if an actor dies (the result is a function
        of the job and the number of workers alone). Returns rank 0's weights and metrics, with every rank's spans."""
        r, last = self.cfg.ray, None
        threads = max(1, round(r.train_cpus_per_worker))
        for _ in range(r.max_restarts + 2):
            actors = self._ready_actors(workers)
            init = ray.get(actors[0].rendezvous.remote()) if workers > 1 else ""
            refs = [a.fit.remote(job, threads, rank, workers, init, sys.stderr.isatty()) for rank, a in enumerate(actors)]
            try:
                results = ray.get(refs)
            except ray.exceptions.RayActorError as e:
                last = e
                for actor in actors:  # ranks waiting on the dead one's collectives: restarted, not left hanging
                    ray.kill(actor, no_restart=False)
                print(f"{job.name}: an actor of its fit died ({str(e).splitlines()[0]}): fitted again", flush=True)
                continue
            state, metrics = results[0]
            metrics["spans"] = [s for _, m in results for s in m["spans"]]
            return state, metrics
        raise RuntimeError(f"{job.name}: the fit lost an actor {r.max_restarts + 2} times; last: {last}")

    def _ready_actors(self, n: int) -> list:
        """`n` actors that answer: kept ones first (a dead one dropped), new ones for the rest (each start bounded by
        ray.schedule_timeout_s)."""
        r = self.cfg.ray
        for actor in list(self.actors):
            try:
                ray.get(actor.ping.remote(), timeout=r.schedule_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(actor, no_restart=True)
                self.actors.remove(actor)
        starting = {}
        if len(self.actors) < n:
            check_placeable(actor_resources(self.cfg), "a sampler actor")
        for _ in range(n - len(self.actors)):
            self._launch(starting)
        ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=r.schedule_timeout_s)
        if len(ready) < len(starting):
            raise shortage(f"{n} sampler actors", actor_resources(self.cfg), r.schedule_timeout_s)
        ray.get(ready)
        return self.actors[:n]

    def running(self) -> list:
        """The actors running a chunk now (its result not in yet)."""
        return [actor for ref, (actor, _) in list(self._inflight.items()) if not ray.wait([ref], timeout=0)[0]]

    def shutdown(self):
        """Kill the actors (no restart): their CPUs and GPUs go back to the cluster (a kept pool starts new ones
        when it is next called)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
