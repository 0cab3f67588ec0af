"""`python -m lgd_ray.distill CONFIG [key=value ...] [--resume]`: distil a data set into WebDataset increments."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from lgd_ray.cli import run_cli
from lgd_ray.config import AUTO, Config, run_dir
from lgd_ray.cost import (PEAK_TFLOPS, UTILISATION, cluster_cost, cluster_gpus_of, format_cluster_cost, format_cost,
                           run_cost)
from lgd_ray.data import check_data
from lgd_ray.errors import UserError
from lgd_ray.lease import Lease
from lgd_ray.gpu_memory import (actor_memory, check_fit_fits, check_fits, format_fit_memory, format_memory,
                            prior_fit_memory, size_guidance_batch)
from lgd_ray.methods import check_real_images, method_of
from lgd_ray.prior import PIPELINE_MARKER, prior_dir
from lgd_ray.reference import reference_path
from lgd_ray.stages import check_run_folder, open_manifest, run_stages
from lgd_ray.storage import as_location, check_writable
from lgd_ray.train import pick_device


def distill(cfg: Config, resume: bool = False) -> dict:
    """Run the stage loop into the config's run folder; returns the manifest."""
    out = run_dir(cfg)
    start = time.time()
    print(f"distill: {cfg.name} ({cfg.distill.method}), {cfg.distill.seed_ipc} + {cfg.distill.stages} x "
          f"{cfg.distill.ipc_per_stage} images per class -> {out}", flush=True)
    method_of(cfg).check(cfg)  # what the method cannot run (lgd_ray/methods.py)
    check_data(cfg.data)  # before Ray starts: a missing data set is one line, not a cluster start-up
    check_real_images(cfg)  # prepared data: the class-sorted copies the method reads
    check_fits(cfg)  # GPU actors: the sampler's memory (meta-device count) fits the actor's GPU share (auto: once sized)
    cache = as_location(cfg.cache)
    for where in (out, cache):
        if not where.is_local:
            check_writable(where)  # an unreachable endpoint, a missing bucket, refused credentials: one line, in seconds
    check_run_folder(out, resume)  # a run folder that cannot be (re)started: one line, before Ray starts
    if cfg.ray.enabled:
        # the Ray layer only when Ray is on: a ray.enabled=false run never imports ray
        from lgd_ray.cluster import connect
        from lgd_ray.resources import resolve_auto

        connect(cfg)
        sized_now = cfg.ray.num_gpus_per_actor is AUTO or cfg.guidance.batch is AUTO
        cfg = resolve_auto(cfg)  # the `auto` keys sized from the cluster, once: before the run folder is opened (the
        #                          sizes are part of its config), for the actors and the fits
        if sized_now:
            check_fits(cfg)  # the sized GPU share and guidance batch
    elif cfg.guidance.batch is AUTO:  # the sampler is this process: sized for its device
        cfg = size_guidance_batch(cfg, 1.0 if pick_device(cfg.device).type == "cuda" else 0.0)
    open_manifest(out, cfg, resume)  # --resume: the run folder was made by this config
    pool = fitter = None
    lease = Lease(out, cfg.storage.lease_s, cfg.storage.retry_s)  # one driver per run folder: held from run_stages on
    if cfg.ray.enabled:
        # the Ray layer only when Ray is on: a ray.enabled=false run never imports ray
        from lgd_ray.actors import SamplerPool
        from lgd_ray.cluster import check_cluster_storage, joins_a_cluster, watch_head
        from lgd_ray.ray_train import ray_fitter

        def start_actors(check):  # stage to stage, prior loaded; with nothing to train first they start now, while
            nonlocal pool  # the nodes check the store (each actor checks its own node too)
            pool = SamplerPool(cfg, out, node_check=check, keep=True, holder=lease.holder)
            if models_ready(cfg):
                pool.start()

        try:  # relative paths, node-local folders, nodes without the data: now, and on nodes that join later
            node_check = check_cluster_storage(cfg, out, cache, while_checking=start_actors)
        except BaseException:
            if pool is not None:
                pool.shutdown()
            raise
        if pool is None:  # Ray is this machine alone: nothing was checked
            start_actors(None)
        fitter = ray_fitter(cfg, out, node_check, pool)
        if joins_a_cluster(cfg):  # a head on another machine may go away: said in one line, not a silent exit 1
            watch_head(cfg, lease.release)  # the lease released: --resume may start at once
    try:
        with lease:
            if lease.took_over:
                print(f"lease: took over the run folder from {lease.took_over}", flush=True)
            manifest = run_stages(cfg, out, resume=resume, runner=pool, fitter=fitter,
                                  log=lambda line: print(line, flush=True), lease=lease, started=start)
    finally:
        if pool is not None:
            pool.shutdown()
            if pool.node_check is not None:
                pool.node_check.remove()
    final = manifest["stages"][max(manifest["stages"], key=int)]
    print(f"distill: done in {time.time() - start:.0f} s: {final['total_images']} images, "
          f"student test acc {100 * final['student_acc']:.2f}% (reference {100 * manifest['reference']['test_acc']:.2f}%)"
          f" -> {out}", flush=True)
    return manifest


def models_ready(cfg: Config) -> bool:
    """Whether the prior (if the method needs one) and theta* are in the cache: the run trains nothing before its
    stages, so sampler actors may start at once (a prior named by model_id is loaded by each actor)."""
    prior = (not method_of(cfg).needs_prior or bool(cfg.prior.model_id)
             or (prior_dir(cfg) / PIPELINE_MARKER).exists())
    return prior and reference_path(cfg).exists()


def dry_run(cfg: Config, tflops: float | None, utilisation: float | None, gpus: int = 0) -> dict:
    """Print the run's stages and their cost (lgd_ray.cost) without loading any model, and with `gpus` > 0 what a
    cluster of that many GPUs holds and keeps busy; returns the cost.

    tflops: peak per GPU; None = an H100 SXM's dense peak for the prior's dtype (TF32 for float32). utilisation: share
    of it reached; None = the measured one for the dtype (lgd_ray.cost.UTILISATION).
    """
    method_of(cfg).check(cfg)
    tflops = tflops or PEAK_TFLOPS[cfg.prior.dtype]
    measured = utilisation is None
    utilisation = utilisation or UTILISATION[cfg.prior.dtype]

    try:
        check_data(cfg.data)
        data = f"data: {cfg.data.name} found" + (f" at {cfg.data.root}" if cfg.data.root else "")
    except UserError as e:
        data = f"data: NOT FOUND on this machine ({e})"
    cost = run_cost(cfg)
    share = cfg.ray.num_gpus_per_actor
    cfg = size_guidance_batch(cfg, 1.0 if share is AUTO else share)  # auto: as a GPU actor of the config would
    mem = actor_memory(cfg) if method_of(cfg).needs_prior else None
    print(f"{data}\nout: {run_dir(cfg)}\n{format_cost(cfg, cost, tflops, utilisation)}", flush=True)
    if gpus:
        print(format_cluster_cost(cfg, cost, cluster_cost(cfg, cost, gpus, tflops, utilisation), tflops, utilisation,
                                  measured), flush=True)
    if mem is not None:
        print(format_memory(cfg, mem), flush=True)
        check_fits(cfg, mem)  # a config that cannot fit: one line naming the key to change, exit status 1
    if mem is not None and not cfg.prior.model_id:  # the prior is trained (or prior.base fine-tuned) by the run
        sized = not (cfg.ray.enabled and cfg.ray.train_workers is AUTO)  # auto: sized from the cluster when it runs
        workers = (cfg.ray.train_workers or 1) if cfg.ray.enabled else 1
        fit = prior_fit_memory(cfg, workers)
        print(format_fit_memory(cfg, fit, workers) + ("" if sized else " (ray.train_workers auto: at 1 worker)"),
              flush=True)
        if sized:
            check_fit_fits(cfg, workers, fit)
    return cost


def per_seed(cfg: Config, seeds: list[int] | None) -> list[Config]:
    """The config once per run seed (each its own run folder: `out`/seed<N> when `out` is set); [cfg] if no seeds."""
    if not seeds:
        return [cfg]
    return [dataclasses.replace(cfg, seed=s, out=str(as_location(cfg.out) / f"seed{s}") if cfg.out else "") for s in seeds]


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (distinct, non-negative)."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of seeds: {text!r}") from None
    if min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct and >= 0: {text!r}")
    return seeds


def _flags(parser: argparse.ArgumentParser):
    parser.add_argument("--resume", action="store_true", help="continue the run in the config's run folder")
    parser.add_argument("--seeds", type=seed_list, metavar="S,S,...",
                        help="one run per run seed, one after another (overrides `seed`), e.g. --seeds 0,1,2; "
                             "`python -m lgd_ray.report` pools them")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its cost; load no model")
    parser.add_argument("--gpu-tflops", type=float, default=None,
                        help="dry-run: peak TFLOPS per GPU (default: H100 SXM dense, 495 TF32 for a float32 prior, "
                             "989 for bfloat16 / float16)")
    parser.add_argument("--utilisation", type=float, default=None,
                        help="dry-run: share of the peak reached (default: measured, 0.25 TF32 / 0.20 bf16)")
    parser.add_argument("--gpus", type=int, default=0, metavar="N",
                        help="dry-run: wall time and GPU-hours held and busy on a cluster of N GPUs")
    parser.add_argument("--cluster", metavar="YAML", default="",
                        help="dry-run: as --gpus, with N the GPUs a Ray cluster file's worker node types scale to "
                             "(clusters/aws.yaml)")


def main(argv: list[str]):
    run_cli("lgd_ray.distill", "Distil a labelled image set with learnability-guided diffusion.", argv,
            lambda cfg, args: [dry_run(c, args.gpu_tflops, args.utilisation, args.gpus or (
                cluster_gpus_of(args.cluster, c.ray.accelerator_type) if args.cluster else 0))
                               if args.dry_run else distill(c, args.resume)
                               for c in per_seed(cfg, args.seeds)], _flags)


if __name__ == "__main__":
    main(sys.argv[1:])
