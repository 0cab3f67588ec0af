"""What the run asks of a Ray cluster, and a bounded wait for it: never a silent hang on resources no node can give."""
from __future__ import annotations

import math
from dataclasses import replace

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from lgd_ray.config import AUTO, Config, auto_keys, build_config, to_dict
from lgd_ray.gpu_memory import size_guidance_batch
from lgd_ray.errors import UserError


class ResourceError(UserError):
    """The cluster did not give what the config asks within ray.schedule_timeout_s (one line)."""


def actor_resources(cfg: Config) -> dict:
    """What one sampler actor asks for."""
    r = cfg.ray
    return {"CPU": r.num_cpus_per_actor, **({"GPU": r.num_gpus_per_actor} if r.num_gpus_per_actor else {}),
            **accelerator(cfg)}


def train_resources(cfg: Config) -> dict:
    """What one Ray Train worker asks for."""
    r = cfg.ray
    return {"CPU": r.train_cpus_per_worker, **({"GPU": r.train_gpus_per_worker} if r.train_use_gpu else {}),
            **accelerator(cfg)}


def ray_options(resources: dict) -> dict:
    """{"CPU": c, "GPU": g, custom: x} -> the num_cpus / num_gpus / resources options of a Ray task or actor."""
    rest = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0), "resources": rest or None}


def accelerator(cfg: Config) -> dict:
    """The custom resource Ray gives nodes of an accelerator type (a tiny share of it pins a process to them)."""
    return {f"accelerator_type:{cfg.ray.accelerator_type}": 0.001} if cfg.ray.accelerator_type else {}


def deadline_s(cfg: Config, slowest: float, expected: float) -> tuple[float, str]:
    """How long one piece of Ray work (a chunk, an evaluation task) may run before it is taken for hung, and the rule
    that said so: ray.chunk_timeout_s if set; else 10x the slowest piece finished so far or, before any has, the
    `expected` seconds at a slow rate (cost.slow_seconds), at least ray.chunk_timeout_floor_s, plus storage.retry_s
    (the piece may be waiting out a store outage)."""
    r = cfg.ray
    if r.chunk_timeout_s:
        return r.chunk_timeout_s, "ray.chunk_timeout_s"
    base = f"10x the slowest so far ({slowest:.0f} s)" if slowest else f"the slow-rate estimate ({expected:.0f} s)"
    return (max(r.chunk_timeout_floor_s, 10 * slowest if slowest else expected) + cfg.storage.retry_s,
            f"{base}, at least ray.chunk_timeout_floor_s, + storage.retry_s; or set ray.chunk_timeout_s")


def describe(resources: dict) -> str:
    """{"CPU": 4, "GPU": 1, "memory": ...} -> "4 CPU, 1 GPU" (Ray's bookkeeping keys left out)."""
    keys = [k for k in resources if not k.startswith(("node:", "object_store_memory", "memory"))
            and not (k.startswith("accelerator_type:") and resources[k] >= 1)]
    return ", ".join(f"{resources[k]:g} {k}" for k in sorted(keys, key=lambda k: (k != "CPU", k != "GPU", k))) or "nothing"


def shortage(what: str, asked: dict, timeout_s: float) -> ResourceError:
    """The one line: what was asked, for how long, what the cluster has in all and free now."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return ResourceError(f"ray: {what} ({describe(asked)} each) could not be placed within {timeout_s:g} s "
                         f"(ray.schedule_timeout_s); the cluster's {len(nodes)} nodes have {describe(ray.cluster_resources())} "
                         f"in all, {describe(ray.available_resources())} free now")


def _node_types() -> list[tuple[dict, int]]:
    """(resources, max_workers) of each node type the autoscaler may add; [] on a cluster without one (Ray's own
    bookkeeping: no public API gives the node types' limits)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        return [(dict(g.resources), g.max_count) for g in (config.node_group_configs if config else []) if g.max_count]
    except Exception:  # an older or newer Ray without it: the alive nodes decide
        return []


def check_placeable(asked: dict, what: str):
    """Refuse at once (one line) a request that no alive node and no node type the autoscaler can add could hold:
    waiting ray.schedule_timeout_s for it would only end in the same error."""
    def holds(resources: dict) -> bool:
        return all(resources.get(k, 0) >= v for k, v in asked.items() if v)

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    types = [res for res, _ in _node_types()]
    if not any(map(holds, nodes + types)):
        largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        raise ResourceError(f"ray: {what} ({describe(asked)} each) fit on no node: the largest of the {len(nodes)} "
                            f"alive has {describe(largest)}"
                            + (", and no node type of the autoscaler holds it either" if types else
                               ", and no autoscaler can add another")
                            + "; lower ray.train_cpus_per_worker / ray.num_cpus_per_actor (or the GPU keys)")


def wait_for_resources(bundles: list[dict], timeout_s: float, what: str):
    """Block until the cluster can hold all bundles at once (as Ray Train's worker group will), at most timeout_s;
    a bundle that no node can hold is refused at once."""
    check_placeable(bundles[0], what)
    pg = placement_group([{k: v for k, v in b.items() if v} for b in bundles], strategy="PACK")
    try:
        if not pg.wait(timeout_seconds=timeout_s):
            raise shortage(what, bundles[0], timeout_s)
    finally:
        remove_placement_group(pg)


def cluster_gpus(accelerator_type: str = "") -> tuple[float, str]:
    """GPUs the cluster has (alive nodes of the accelerator type, if one is set) or, with an autoscaler, can scale to
    (its node types' max_workers x GPUs); the larger, and which it is."""
    alive = sum(n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"] and (
        not accelerator_type or f"accelerator_type:{accelerator_type}" in n["Resources"]))
    scalable = sum(count * res.get("GPU", 0) for res, count in _node_types()
                   if not accelerator_type or f"accelerator_type:{accelerator_type}" in res)
    return (scalable, "the autoscaler can scale to") if scalable > alive else (alive, "the cluster has")


def resolve_auto(cfg: Config) -> Config:
    """The config with its `auto` ray keys sized from the cluster's GPUs (G): ray.num_gpus_per_actor an equal share
    of them, at most 1 (0 without GPUs); ray.train_use_gpu G > 0 (ray.train_gpus_per_worker at most G);
    ray.actors one per ray.num_gpus_per_actor (CPU actors: 2); ray.train_workers one per ray.train_gpus_per_worker
    (CPU: 1), as many as divide every global batch. Said in one line; the sized config is checked as any other."""
    autos = [k for k in auto_keys(cfg) if k.startswith("ray.")]
    if not autos:
        return size_guidance_batch(cfg, cfg.ray.num_gpus_per_actor)
    r = cfg.ray
    gpus, where = cluster_gpus(r.accelerator_type)
    share = r.num_gpus_per_actor
    if share is AUTO:  # sampler actors never run beside a Train fit: the actors split the GPUs between them
        share = min(1.0, gpus / (r.actors or max(1, math.floor(gpus)))) if gpus else 0.0
    actors = r.actors or (max(1, math.floor(gpus / share + 1e-9)) if share else 2)
    use_gpu, train_share = r.train_use_gpu, r.train_gpus_per_worker
    if use_gpu is AUTO:
        use_gpu, train_share = gpus > 0, min(train_share, gpus) if gpus else train_share
    workers = r.train_workers or (max(1, math.floor(gpus / train_share + 1e-9)) if use_gpu and train_share else 1)
    batches = (cfg.reference.train.batch_size, cfg.student.train.batch_size, cfg.prior.batch_size)
    while r.train_workers is AUTO and workers > 1 and any(b % workers for b in batches):
        workers -= 1  # each DDP worker takes an equal part of every global batch
    sized = replace(r, actors=actors, train_workers=workers, num_gpus_per_actor=share, train_use_gpu=use_gpu,
                    train_gpus_per_worker=train_share)
    print(f"ray: {where} {gpus:g} GPU{' of type ' + r.accelerator_type if r.accelerator_type else ''}: "
          + ", ".join(f"{key} auto -> {str(v).lower() if isinstance(v := getattr(sized, key[4:]), bool) else f'{v:g}'}"
                      for key in autos), flush=True)
    return size_guidance_batch(build_config(to_dict(replace(cfg, ray=sized))), share)
