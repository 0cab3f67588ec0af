"""The one door to Ray (`connect`), and the check before any work on a cluster of several nodes: every node must
reach the run's storage and data.

A relative path is refused at once (under `ray job submit --working-dir` each node has its own copy of the working
folder). Then the driver writes a marker named by the run under `out` and `cache`, and one small task pinned to each
alive node reads both back and checks the data set: a node-local folder, a mount missing on one node or a store a node
cannot reach fails the run in seconds with the node's address and the path. Nodes that join later (the autoscaler's)
run the same check when they first take work (a sampler actor or a Ray Train worker starting there).
"""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lgd_ray import storage
from lgd_ray.config import Config, ConfigError
from lgd_ray.data import check_data
from lgd_ray.errors import UserError
from lgd_ray.storage import Location, StorageError, no_retry

MARKER = ".lgd_ray-node-check"


def joins_a_cluster(cfg: Config) -> bool:
    """Whether Ray is a cluster given by address (ray.address, or RAY_ADDRESS under `ray job submit`), not a local
    Ray this process starts."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def connect(cfg: Config):
    """Join Ray once per process: the cluster at ray.address, or RAY_ADDRESS (set under `ray job submit`), else a new
    local Ray. Every command that uses Ray comes through here."""
    if ray.is_initialized():
        return
    # every process of the job (actors, Train workers, tasks) retries the store for the run's storage.retry_s
    runtime_env = {"env_vars": {storage.RETRY_ENV: repr(float(cfg.storage.retry_s))}}
    if not joins_a_cluster(cfg):
        # a local Ray on this machine: no node of it can be preempted, so Ray Train's preemption watcher (an actor per
        # fit, and a warning line each) has nothing to watch
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # and the job's processes that look Ray up by address (Ray Train's placement-group cleaner, the state API)
        # must find this one, not fail on "multiple active Ray instances" when another runs on the machine
        runtime_env["worker_process_setup_hook"] = "lgd_ray.cluster.pin_ray_address"
        # Ray's own start-up lines (token auth on, dashboard) said once, in the project's words
        # address "local": a new instance of its own, never another Ray that happens to run on the machine
        context = ray.init(address="local", runtime_env=runtime_env, logging_level=logging.ERROR)
        auth = "off" if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" else "on"
        print(f"ray: started a local Ray instance on this machine (token auth {auth}; dashboard on "
              f"http://{context.dashboard_url or '127.0.0.1:8265'}, this machine only)", flush=True)
        return
    ray.init(address=cfg.ray.address or None, runtime_env=runtime_env)


def pin_ray_address():
    """A worker process's setup (runtime_env): RAY_ADDRESS is the cluster it belongs to."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


HEAD_LOST_S = 20.0  # the head's GCS unreachable this long: the run stops (Ray's own driver exit comes at ~60 s)


def watch_head(cfg: Config, on_lost: Callable[[], None]):
    """For a driver that joined a cluster: a daemon thread that connects to the head's GCS port every 2 s; once no
    connection succeeds for HEAD_LOST_S it calls `on_lost()` (the driver's clean-up), says so in one line on stderr
    and ends the process with exit status 2, from that thread: the main thread may be blocked in a Ray call that
    waits for the head, and Ray's core worker would end the process about 60 s after the loss without a word."""
    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")

    def watch():
        last_ok = time.monotonic()
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                last_ok = time.monotonic()
            except OSError:
                if time.monotonic() - last_ok > HEAD_LOST_S:
                    break
            time.sleep(2.0)
        try:
            on_lost()
        finally:
            print(f"error: ray: the cluster's head ({host}:{port}) stopped answering for {HEAD_LOST_S:.0f} s; the run "
                  "stopped with every finished chunk and stage kept in its folder: once the head is back, `python -m "
                  f"lgd_ray.distill {cfg.name or 'CONFIG'} ... --resume` continues it (at once, or after "
                  f"storage.lease_s {cfg.storage.lease_s:g} s from another host)", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)

    threading.Thread(target=watch, daemon=True, name="lgd_ray-head-watch").start()


def remote_cause(error: BaseException, kind: type) -> BaseException | None:
    """The first exception of `kind` in the chain of an error that Ray brought back from a task (RayTaskError.cause,
    __cause__, __context__), else None."""
    seen, text = set(), str(error)
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kind) and not isinstance(error, ray.exceptions.RayTaskError):
            return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    # Ray Data wraps a task's error in its UserCodeException, whose own cause does not travel: only the remote
    # traceback's text names it ("lgd_ray.errors.ConfigError: <its one line>"), of `kind` or a kind of it
    kinds, todo = {}, [kind]
    while todo:
        k = todo.pop()
        kinds[f"{k.__module__}.{k.__qualname__}"] = k
        todo += k.__subclasses__()
    for name, message in re.findall(r"^([\w.]+): (.+)$", text, re.MULTILINE):
        if name in kinds:
            return kinds[name](message)
    return None


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def shared_paths(cfg: Config) -> dict[str, str]:
    """The config's keys that every node must see the same way, with their values ("" where unset)."""
    return {"out": cfg.out, "cache": cfg.cache, "data.root": cfg.data.root, "data.prepared": cfg.data.prepared}


def refuse_relative(cfg: Config, n_nodes: int):
    for key, value in shared_paths(cfg).items():
        if key == "out" and not value:
            value = "runs/<config>-<hash>"  # the default run folder is relative
        if value and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            raise ConfigError(f"config: '{key}' = {value!r} is a relative path, private to each node of the cluster "
                              f"({n_nodes} alive now); set {key}= to a store URI (s3://BUCKET/PATH, gs://...) or a "
                              "folder mounted on every node")


@dataclass(frozen=True)
class NodeCheck:
    """The run's markers (each location with the token the driver wrote there) and its data set, for a node to check
    that it sees them as the driver does."""
    markers: tuple[tuple[Location, str], ...]
    data: object  # DataConfig

    def problem(self) -> str:
        """'' if this node reads every marker and finds the data, else the reason."""
        for loc, token in self.markers:
            try:
                found = loc.read_text() if loc.exists() else None
            except StorageError as e:
                return str(e)
            if found != token:
                return f"cannot read {loc} (written by the driver): this node does not share that folder"
        try:
            check_data(self.data)
        except UserError as e:
            return str(e)
        return ""

    def verify(self):
        """Raise StorageError, naming this node, unless it sees the run's storage and data (run where work starts)."""
        problem = self.problem()
        if problem:
            node = ray.get_runtime_context().get_node_id()
            raise StorageError(f"storage: node {ray.util.get_node_ip_address()} ({node[:8]}), which joined the run "
                               f"later: {problem}")

    def remove(self):
        """Delete the markers, at once or not at all: a marker left behind (the store gone at the end of a failed
        run) is harmless, and the run's own error must not wait for it or be hidden by it."""
        with no_retry():
            for loc, _ in self.markers:
                try:
                    loc.delete()
                except StorageError:
                    return


def check_cluster_storage(cfg: Config, out: Location, cache: Location, timeout_s: float = 60.0,
                          while_checking: Callable[[NodeCheck], None] | None = None) -> NodeCheck | None:
    """On a cluster joined by address, or any cluster of several alive nodes, fail fast unless every node reaches out,
    cache and the data (relative paths are refused before anything is written). A cluster file's head starts alone
    (workers come with the autoscaler), so one alive node is no sign of a single machine. Returns the check for nodes
    that join later (its markers stay until remove()), or None when Ray is this machine alone. while_checking(check)
    runs while the nodes check (the driver starts its actors then)."""
    nodes = alive_nodes()
    if len(nodes) < 2 and not joins_a_cluster(cfg):
        return None
    refuse_relative(cfg, len(nodes))
    token = uuid.uuid4().hex
    check = NodeCheck(tuple((loc / f"{MARKER}-{token[:12]}", token) for loc in (out, cache)), cfg.data)
    for loc, _ in check.markers:
        loc.write_text(token)
    task = ray.remote(num_cpus=0, max_retries=0)(NodeCheck.problem)
    here = ray.get_runtime_context().get_node_id()  # the driver's node: it wrote the markers and found the data
    try:
        refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            check): n for n in nodes if n["NodeID"] != here}
        if while_checking is not None:
            while_checking(check)
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            problem = ray.get(ref)
            if problem:
                raise StorageError(f"storage: node {refs[ref]['NodeManagerAddress']} ({refs[ref]['NodeID'][:8]}): {problem}")
        if late:
            raise StorageError(f"storage: node {refs[late[0]]['NodeManagerAddress']} did not answer the storage check "
                               f"within {timeout_s:.0f} s")
    except BaseException:
        check.remove()
        raise
    return check
