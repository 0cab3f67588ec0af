"""`python -m lgd_ray.sweep CONFIG [key=value ...]`: Ray Tune over the guidance weights omega and lambda.

Each trial is a small distillation (the config with `sweep.stages` guided stages) run in the trial's own process,
without nested Ray Train or actors (a TorchTrainer inside an ASHA-stopped trial can leave its placement group
behind). After every stage it reports the incremental student's real test accuracy; ASHA (time = stage) stops
weak trials early. Writes the results table (CSV) and the best setting as a complete config YAML that
`python -m lgd_ray.distill BEST.yaml` accepts unchanged.
"""
from __future__ import annotations

import copy
import csv
import io
import sys

import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from lgd_ray.cli import run_cli
from lgd_ray.cluster import connect
from lgd_ray.config import Config, apply_overrides, build_config, config_hash, run_identity, to_dict
from lgd_ray.data import num_classes
from lgd_ray.prior_make import ensure_prior
from lgd_ray.ray_train import ray_fitter
from lgd_ray.reference import ensure_reference
from lgd_ray.resources import resolve_auto
from lgd_ray.stages import run_stages
from lgd_ray.storage import Location, as_location
from lgd_ray.train import process_device


def trial_config(base: dict, omega: float, lambda_: float, out: str) -> Config:
    """The base config with this trial's omega and lambda, its stage count and run folder, without Ray."""
    tree = apply_overrides(copy.deepcopy(base), [
        f"guidance.omega={omega}", f"guidance.lambda={lambda_}", f"distill.stages={base['sweep']['stages']}",
        "ray.enabled=false", f"out={out}"])
    return build_config(tree)


def _trial(params: dict, base: dict, root: str):
    # the trial id in the folder: repeated grid points (sweep.num_samples > 1) are other trials, other folders
    trial = tune.get_context().get_trial_id()
    cfg = trial_config(base, params["omega"], params["lambda"],
                       str(Location(root) / f"omega{params['omega']:g}-lambda{params['lambda']:g}-{trial}"))
    run_stages(cfg, Location(cfg.out), resume=True, log=lambda _: None,
               on_stage=lambda i, info: tune.report({"stage": i, "student_acc": info["student_acc"],
                                                     "mean_S": info["mean_S"]}))


def sweep(cfg: Config) -> dict:
    """Run the sweep; returns {"rows": [...], "best": {...}, "best_config": path}."""
    s = cfg.sweep
    root = as_location(cfg.out or f"runs/sweep-{cfg.name}-{config_hash(run_identity(cfg))}")
    connect(cfg)
    cfg = resolve_auto(cfg)  # the trials get the sizes, as distill's run would
    base = to_dict(cfg)
    base["cache"] = str(as_location(cfg.cache))  # trials run in their own working folders
    for key in ("root", "prepared"):
        if base["data"][key]:
            base["data"][key] = str(as_location(base["data"][key]))
    # the prior and the reference are made once, before the trials (which only load them from the cache), with Ray
    # Train as in `distill` and `python -m lgd_ray.prior` (GPU workers when configured), not on this process's CPU
    ensure_prior(cfg, process_device(cfg.device), ray_fitter(cfg, Location(cfg.cache)))
    ensure_reference(cfg, num_classes(cfg.data), fitter=ray_fitter(cfg, root))
    if s.search == "grid":
        space = {"omega": tune.grid_search(s.omega), "lambda": tune.grid_search(s.lambda_)}
    else:
        space = {"omega": tune.uniform(min(s.omega), max(s.omega)), "lambda": tune.uniform(min(s.lambda_), max(s.lambda_))}
    scheduler = ASHAScheduler(time_attr="stage", max_t=s.stages, grace_period=s.grace_period,
                              reduction_factor=s.reduction_factor)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, base=base, root=str(root)),
                            {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="student_acc", mode="max", scheduler=scheduler, num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent),
        run_config=tune.RunConfig(name="tune", storage_path=root.path, verbose=1,
                                  storage_filesystem=None if root.is_local else root.fs))
    results = tuner.fit()
    rows = []
    for r in results:
        if r.error:
            raise RuntimeError(f"sweep: a trial failed: {r.error}")
        hist = r.metrics_dataframe
        rows.append({"omega": r.config["omega"], "lambda": r.config["lambda"], "stages_run": int(hist["stage"].max()),
                     "student_acc": float(hist["student_acc"].iloc[-1]),
                     "acc_per_stage": [round(float(a), 4) for a in hist["student_acc"]]})
    rows.sort(key=lambda r: (-r["stages_run"], -r["student_acc"]))
    best = rows[0]  # among the trials that ran every stage, the highest final accuracy
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=list(best))
    w.writeheader()
    w.writerows(rows)
    (root / "results.csv").write_text(f.getvalue())
    best_cfg = build_config(apply_overrides(to_dict(cfg), [f"guidance.omega={best['omega']}",
                                                           f"guidance.lambda={best['lambda']}"]))
    path = root / "best.yaml"
    path.write_text(f"# best of the sweep in {root}: omega {best['omega']:g}, lambda {best['lambda']:g}, "
                    f"student acc {100 * best['student_acc']:.2f}% after {best['stages_run']} guided stages\n"
                    + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
    print("omega    lambda   stages  student acc per stage (%)")
    for r in rows:
        print(f"{r['omega']:<8.4g} {r['lambda']:<8.4g} {r['stages_run']:>6}  "
              + " ".join(f"{100 * a:.2f}" for a in r["acc_per_stage"]))
    print(f"sweep: best omega {best['omega']:g}, lambda {best['lambda']:g} -> {path}", flush=True)
    return {"rows": rows, "best": best, "best_config": path}


def main(argv: list[str]):
    run_cli("lgd_ray.sweep", "Ray Tune over omega and lambda with ASHA.", argv, lambda cfg, _: sweep(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
