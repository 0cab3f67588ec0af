"""The run's timeline: every phase of every process with its node, its resources and its start and end; and what the
run held and kept busy.

A span is one JSON row: {"phase", "stage", "who", "node", "resources": {"CPU": c, "GPU": g}, "start", "end"} (Unix
seconds). Sampler actors and Ray Train workers time their own phases and hand them back with their results; the driver
writes them, with its own, as new objects `timeline/part-NNNNNN.jsonl` of the run folder (append-only on any store;
`pandas.DataFrame(read_timeline(run))` reads them). Rows of phase "node" give each node's resources and when the run
saw it up.

Held is what a cloud bills: each node's resource (GPUs; CPUs where the cluster has none) times the time it was up.
Busy is the part of that in which some span of a BUSY phase used it (capped at the node's amount, so overlapping spans
count once); start-up, loading, waiting and the driver's own work are held, not busy. Clocks of several machines are
compared as they are (NTP-synchronised on a cloud cluster).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterable

from lgd_ray.storage import as_location

FOLDER = "timeline"
BUSY = ("chunk", "fit", "test")  # a slot doing the run's work; every other phase is held but idle
LOCAL_NODE = "local"  # the node of a run without Ray


def node_id() -> str:
    """This process's Ray node id, or LOCAL_NODE outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return LOCAL_NODE
    return ray.get_runtime_context().get_node_id()


def span(phase: str, start: float, end: float, *, who: str, stage: int | None = None, node: str | None = None,
         resources: dict | None = None) -> dict:
    """One row; resources keeps CPU and GPU only (Ray's custom resources are not what is billed)."""
    res = {k: v for k, v in (resources or {}).items() if k in ("CPU", "GPU") and v}
    return {"phase": phase, "stage": stage, "who": who, "node": node or node_id(), "resources": res,
            "start": round(start, 4), "end": round(end, 4)}


@contextmanager
def timed(record: Callable[[list[dict]], None], phase: str, **fields):
    """Hand the span of the block to `record` (e.g. a list's extend), also when the block raises."""
    start = time.time()
    try:
        yield
    finally:
        record([span(phase, start, time.time(), **fields)])


class Timeline:
    """The spans of one run, collected in the driver (from any of its threads) and written as append-only parts of
    run_dir/timeline/. local_slot: what a run without Ray holds (its one process: a CPU, or a GPU)."""

    def __init__(self, run_dir, local_slot: dict | None = None):
        self.folder = as_location(run_dir) / FOLDER
        self.local_slot = local_slot or {"CPU": 1}
        self.pending: list[dict] = []
        self._lock = threading.Lock()
        self._part = len(self.folder.files(".jsonl"))  # a resumed run adds parts after the earlier ones

    def add(self, rows: Iterable[dict]):
        with self._lock:
            self.pending.extend(rows)

    def phase(self, phase: str, stage: int | None = None, who: str = "driver", resources: dict | None = None):
        """A block of the driver's (or of work it runs in-line): `with timeline.phase("setup"): ...`."""
        return timed(self.add, phase, who=who, stage=stage, resources=resources)

    def nodes(self):
        """A "node" row per alive Ray node (its CPUs and GPUs, seen now); outside Ray: this process's slot."""
        now = time.time()
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            self.add([span("node", now, now, who=LOCAL_NODE, node=LOCAL_NODE, resources=self.local_slot)])
            return
        self.add(span("node", now, now, who=n["NodeID"], node=n["NodeID"], resources=n["Resources"])
                 for n in ray.nodes() if n["Alive"])

    def flush(self):
        """Write the pending spans as the next part (nothing if there are none)."""
        with self._lock:
            rows, self.pending = self.pending, []
            if rows:
                (self.folder / f"part-{self._part:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                self._part += 1


def read_timeline(run_dir) -> list[dict]:
    """Every span of the run, in the order written."""
    rows = []
    for part in (as_location(run_dir) / FOLDER).files(".jsonl"):  # sorted by name: the order written
        rows += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    return rows


def node_intervals(rows: list[dict]) -> dict[str, tuple[dict, float, float]]:
    """node -> (its resources, first seen up, last seen up)."""
    out = {}
    for r in rows:
        if r["phase"] == "node":
            res, first, last = out.get(r["node"], (r["resources"], r["start"], r["end"]))
            out[r["node"]] = (r["resources"], min(first, r["start"]), max(last, r["end"]))
    return out


def billed_resource(rows: list[dict]) -> str:
    """"GPU" if any node of the run has GPUs, else "CPU"."""
    return "GPU" if any(r["resources"].get("GPU") for r in rows if r["phase"] == "node") else "CPU"


def _busy_seconds(spans: list[dict], resource: str, cap: float, lo: float, hi: float) -> float:
    """Integral over [lo, hi] of min(cap, the resource used by overlapping spans)."""
    events = []
    for s in spans:
        a, b, amount = max(lo, s["start"]), min(hi, s["end"]), s["resources"].get(resource, 0)
        if b > a and amount:
            events += [(a, amount), (b, -amount)]
    events.sort()
    total, level, t = 0.0, 0.0, lo
    for when, delta in events:
        total += min(cap, level) * (when - t)
        level, t = level + delta, when
    return total


def usage(rows: list[dict], lo: float | None = None, hi: float | None = None) -> dict:
    """{"resource", "wall_s", "held", "busy", "busy_share"} over [lo, hi] (default: the whole run); held and busy in
    resource-hours. A node's up time is from its first to its last "node" row, at least the window's bounds when it
    was seen before and after them."""
    driver = [r for r in rows if r["who"] == "driver"]
    lo = min(r["start"] for r in driver) if lo is None else lo
    hi = max(r["end"] for r in driver) if hi is None else hi
    resource = billed_resource(rows)
    run_lo, run_hi = min(r["start"] for r in driver), max(r["end"] for r in driver)
    held = busy = 0.0
    for node, (res, first, last) in node_intervals(rows).items():
        # a node seen at the run's first and last check was up the whole run
        up_lo = run_lo if first <= run_lo + 60 else first
        up_hi = run_hi if last >= run_hi - 60 else last
        a, b, cap = max(lo, up_lo), min(hi, up_hi), res.get(resource, 0)
        if b <= a or not cap:
            continue
        held += cap * (b - a)
        busy += _busy_seconds([r for r in rows if r["node"] == node and r["phase"] in BUSY], resource, cap, a, b)
    return {"resource": resource, "wall_s": hi - lo, "held": held / 3600, "busy": busy / 3600,
            "busy_share": busy / held if held else 0.0}


def stage_windows(rows: list[dict]) -> dict[int, tuple[float, float]]:
    """stage -> (start, end) of the driver's phases of that stage."""
    out = {}
    for r in rows:
        if r["who"] == "driver" and r["stage"] is not None:
            a, b = out.get(r["stage"], (r["start"], r["end"]))
            out[r["stage"]] = (min(a, r["start"]), max(b, r["end"]))
    return out


def usage_table(rows: list[dict]) -> str:
    """Markdown: per stage and in all, wall time, resource-hours held and busy, busy/held."""
    res = billed_resource(rows)
    lines = [f"| stage | wall (s) | {res}-h held | {res}-h busy | busy / held |", "|---|---|---|---|---|"]
    windows = sorted(stage_windows(rows).items())
    for name, (lo, hi) in [(str(k), w) for k, w in windows] + [("all", (None, None))]:
        u = usage(rows, lo, hi)
        lines.append(f"| {name} | {u['wall_s']:.1f} | {u['held']:.4g} | {u['busy']:.4g} | {100 * u['busy_share']:.1f} % |")
    return "\n".join(lines)
