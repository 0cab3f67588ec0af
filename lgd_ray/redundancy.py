"""`python -m lgd_ray.redundancy RUN_DIR [key=value ...]`: how much the increments of a run teach the same thing.

Row i: a fresh classifier (the evaluate protocol, epochs by the increment's IPC) trained on increment I_i only;
column j: its accuracy on the images of I_j. The mean off-diagonal accuracy is the redundancy (the LGD paper's
analysis: high when later increments repeat what earlier ones hold). Rows run in parallel as Ray tasks.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import replace
from functools import partial

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from lgd_ray.cli import Parser, one_line_errors
from lgd_ray.config import ConfigError
from lgd_ray.data import num_classes
from lgd_ray.evaluate import eval_jobs, expected_job_s, load_run, run_eval_job
from lgd_ray.ray_tasks import map_jobs
from lgd_ray.report import save_figure, write_report
from lgd_ray.shards import load_tensor_set, trained_increments
from lgd_ray.storage import Location, as_location


def redundancy_of(matrix: torch.Tensor) -> float:
    """Mean off-diagonal entry of a square matrix."""
    n = len(matrix)
    if n < 2:
        raise ValueError("redundancy needs at least two increments")
    return ((matrix.sum() - matrix.diagonal().sum()) / (n * n - n)).item()


def heatmap(matrix: torch.Tensor, stages: list[int], title: str, loc: Location):
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(stages), 1 + 0.7 * len(stages)))
    im = ax.imshow(100 * matrix.numpy(), vmin=0, vmax=100, cmap="viridis")
    for i in range(len(stages)):
        for j in range(len(stages)):
            v = 100 * matrix[i, j].item()
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set_xticks(range(len(stages)), [f"I_{s}" for s in stages])
    ax.set_yticks(range(len(stages)), [f"I_{s}" for s in stages])
    ax.set_xlabel("tested on the images of")
    ax.set_ylabel("trained on")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    save_figure(fig, loc)


def redundancy(run_dir: Location, overrides: list[str] = ()) -> dict:
    """Compute the run's increment matrix; writes run_dir/redundancy/{matrix.csv, matrix.png, redundancy.json}."""
    run_dir = as_location(run_dir)
    cfg, manifest = load_run(run_dir, overrides)
    parts = trained_increments(manifest)
    if len(parts) < 2:
        raise ConfigError("redundancy: the run needs at least two finished stages")
    n = num_classes(cfg.data)
    loaders = {f"I_{s}": partial(load_tensor_set, run_dir, shards, n, cfg.data.shape) for s, _, shards in parts}
    jobs = []
    for stage, ipc, _ in parts:
        job = eval_jobs(replace(cfg, evaluate=replace(cfg.evaluate, repeats=1)), loaders[f"I_{stage}"], ipc,
                        f"redundancy-{stage}")[0]
        jobs.append(replace(job, extra_tests=loaders))
    biggest = max(ipc for _, ipc, _ in parts) * n  # each row also tests on every increment: as a test split's worth
    rows = map_jobs(cfg, run_eval_job, jobs, "redundancy", lambda: max(expected_job_s(cfg, j, biggest) for j in jobs))
    stages = [s for s, _, _ in parts]
    matrix = torch.tensor([[r["extra"][f"I_{s}"] for s in stages] for r in rows])
    out = run_dir / "redundancy"
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["trained_on"] + [f"I_{s}" for s in stages] + ["real_test"])
    for s, r, row in zip(stages, rows, matrix):
        w.writerow([f"I_{s}"] + [f"{100 * v:.2f}" for v in row.tolist()] + [f"{100 * r['last']:.2f}"])
    (out / "matrix.csv").write_text(f.getvalue())
    value = redundancy_of(matrix)
    result = {"method": cfg.distill.method, "model": jobs[0].model, "epochs": [j.train.epochs for j in jobs],
              "stages": stages, "matrix": matrix.tolist(), "redundancy": value,
              "real_test": [r["last"] for r in rows], "seeds": [j.seed for j in jobs]}
    (out / "redundancy.json").write_text(json.dumps(result, indent=1))
    heatmap(matrix, stages, f"{cfg.distill.method}: redundancy {100 * value:.1f}%", out / "matrix.png")
    print(f"redundancy: {cfg.distill.method}, {len(stages)} increments, mean off-diagonal accuracy "
          f"{100 * value:.2f}% -> {out}", flush=True)
    write_report(run_dir)
    return result


def main(argv: list[str]):
    parser = Parser(prog="python -m lgd_ray.redundancy", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="evaluate keys (model=..., eval_every=...)")
    args = parser.parse_args(argv)
    one_line_errors(lambda: redundancy(args.run_dir, args.overrides))


if __name__ == "__main__":
    main(sys.argv[1:])
