"""Independent jobs (evaluation repeats, redundancy rows) run in parallel as Ray tasks, or one by one without Ray."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from lgd_ray.config import Config
from lgd_ray.errors import UserError


def _run_with_threads(fn: Callable, item, num_threads: int):
    torch.set_num_threads(num_threads)
    return fn(item)


def map_jobs(cfg: Config, fn: Callable, items: Sequence, desc: str, expected_s: Callable[[], float]) -> list:
    """[fn(item) for item in items]: as Ray tasks with a Train worker's resources if cfg.ray.enabled, in order
    (a task lost with its node is run again, up to ray.max_restarts times). When no task finishes within the
    deadline (resources.deadline_s: before the first, `expected_s()`, one task at a slow rate, counted on the Ray
    path only), a task hangs: the rest are cancelled, one line."""
    if not cfg.ray.enabled:
        return [fn(item) for item in tqdm(items, desc=desc, disable=None)]
    # the Ray layer only when Ray is on: a ray.enabled=false run never imports ray
    import ray

    from lgd_ray.cluster import connect, remote_cause
    from lgd_ray.resources import deadline_s, ray_options, resolve_auto, train_resources, wait_for_resources

    connect(cfg)
    cfg = resolve_auto(cfg)  # a config of this machine's with `auto` keys (evaluate --full)
    r = cfg.ray
    resources = train_resources(cfg)
    wait_for_resources([resources], r.schedule_timeout_s, f"{desc}: a task")  # never a silent hang
    task = ray.remote(**ray_options(resources), max_retries=r.max_restarts)(_run_with_threads)
    refs = [task.remote(fn, item, max(1, round(r.train_cpus_per_worker))) for item in items]
    expected, (pending, last, longest) = expected_s(), (list(refs), time.monotonic(), 0.0)
    with tqdm(total=len(refs), desc=desc, disable=None) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            now = time.monotonic()
            if done:
                longest, last = max(longest, now - last), now
                bar.update(len(done))
                continue
            limit, rule = deadline_s(cfg, longest, expected)
            if now - last > limit:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise RuntimeError(f"{desc}: no task finished for {now - last:.0f} s, past {limit:.0f} s ({rule}): "
                                   f"{len(pending)} hung task(s) cancelled")
    try:
        return ray.get(refs, timeout=60)  # all finished: their results are in
    except ray.exceptions.RayTaskError as e:  # a task's bad input (a missing shard...) is one line, as here
        cause = remote_cause(e, UserError)
        if cause is None:
            raise
        raise cause from None
