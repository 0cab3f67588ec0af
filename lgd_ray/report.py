"""A run folder's report: image grids per stage, student accuracy per stage, histograms of S, report.md.

Written by the stage loop after every stage; `evaluate` and `redundancy` add their tables when they finish.
`python -m lgd_ray.report RUN_DIR ...` prints one markdown table of the results of several runs, and, for runs made
with several seeds, their results pooled over seeds with paired differences (lgd_ray.pooling).
"""
from __future__ import annotations

import io
import json
import sys
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid

from lgd_ray import timeline
from lgd_ray.cli import Parser, one_line_errors
from lgd_ray.config import ConfigError
from lgd_ray.methods import METHODS
from lgd_ray.pooling import METHOD_ORDER, labels_of, seeds_tables, stages_table
from lgd_ray.shards import MANIFEST, check_shards, in_order, read_manifest, read_shards, stage_rows
from lgd_ray.storage import Location, as_location

GRID_CLASSES = 10  # rows of an image grid: the first classes
GRID_IMAGES = 10  # columns: the first images of the stage per class


def save_figure(fig, loc: Location, write: Callable[[Location, bytes], None] = Location.write_bytes):
    """A matplotlib figure as PNG to a Location (one write(location, bytes), atomic by default), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write(loc, buf.getvalue())


def stage_grid(run_dir: Location, manifest: dict, stage: int):
    """A figure: the grid of a stage's images: one row per class (the first GRID_CLASSES), GRID_IMAGES columns."""
    rows = [r for r in stage_rows(manifest, stage) if min(r["classes"]) < GRID_CLASSES]
    samples = sorted(read_shards(run_dir, in_order(rows)), key=lambda s: (s["cls"], s["key"]))
    by_class: dict[int, list] = {}
    for s in samples:
        if s["cls"] < GRID_CLASSES:
            by_class.setdefault(s["cls"], []).append(s["image"])
    cols = min(GRID_IMAGES, max(len(v) for v in by_class.values()))
    blank = torch.zeros_like(samples[0]["image"])
    tiles = [(by_class[c] + [blank] * cols)[:cols] for c in sorted(by_class)]
    grid = make_grid(torch.stack([t for row in tiles for t in row]), nrow=cols, padding=1, pad_value=255)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * cols, 0.6 * len(tiles) + 0.6))
    ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=255)
    ax.set_yticks([(i + 0.5) * (grid.shape[1] / len(tiles)) for i in range(len(tiles))], [str(c) for c in sorted(by_class)])
    ax.set_xticks([])
    ax.set_title(f"stage {stage}: rows = classes")
    fig.tight_layout()
    return fig


def accuracy_plot(manifest: dict):
    """A figure: the student's test accuracy per stage, against images per class."""
    stages = sorted(manifest["stages"].items(), key=lambda kv: int(kv[0]))
    ipc = [info["total_images"] / manifest.get("num_classes", 1) for _, info in stages]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ipc, [100 * info["student_acc"] for _, info in stages], "o-", label="student theta_i")
    if manifest.get("reference"):
        ax.axhline(100 * manifest["reference"]["test_acc"], color="grey", ls="--", label="reference theta* (full data)")
    ax.set_xlabel("images per class (D_i)")
    ax.set_ylabel("real test accuracy (%)")
    ax.set_title(f"{manifest['config']['distill']['method']}: incremental student")
    ax.legend()
    fig.tight_layout()
    return fig


def scores_plot(manifest: dict):
    """A figure: the histogram of S of the chosen images per stage; None when no stage has scores."""
    per_stage = {}
    for r in manifest["shards"]:
        if r.get("S"):
            per_stage.setdefault(r["stage"], []).extend(r["S"])
    if not per_stage:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for stage in sorted(per_stage):
        ax.hist(per_stage[stage], bins=30, histtype="step", label=f"stage {stage}")
    ax.set_xlabel("learnability S = CE(student) - omega CE(reference)")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    return fig


def _eval_table(run_dir: Location) -> list[str]:
    results = sorted((json.loads(p.read_text()) for p in (run_dir / "eval").files(".json")),
                     key=lambda r: (r["model"], labels_of(r), str(r["ipc"])))
    if not results:
        return []
    lines = ["## Evaluation (fresh models on the distilled set, real test split)", "",
             "| model | IPC | labels | epochs | repeats | last-epoch acc (%) | best acc (%) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['ipc']} | {labels_of(r)} | {r['epochs']} | {len(r['repeats'])} | "
                     f"{r['last_mean']:.2f} ± {r['last_std']:.2f} | {r['best_mean']:.2f} ± {r['best_std']:.2f} |")
    return lines + ["", "Best = the highest of the tests every `evaluate.eval_every` epochs (selected on the test set).", ""]


def _redundancy_section(run_dir: Location) -> list[str]:
    path = run_dir / "redundancy" / "redundancy.json"
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    epochs = ", ".join(str(e) for e in r["epochs"])
    return ["## Redundancy", "", (f"Train on increment i, test on the images of increment j ({r['model']}, "
            f"epochs per row {epochs}). Mean off-diagonal accuracy (the redundancy): **{100 * r['redundancy']:.2f}%**."), "",
            "![redundancy](redundancy/matrix.png)", "", "[matrix as CSV](redundancy/matrix.csv)", ""]


PHASE_COLOURS = {"setup": "#bbbbbb", "sample": "#d1e5f0", "train": "#d9f0d3", "report": "#999999",
                 "actor_start": "#f4a582", "chunk": "#2166ac", "fit": "#1b7837", "test": "#762a83"}


def gantt_chart(rows: list[dict]):
    """A figure: one row per process (the driver, each actor, each Train worker slot), its spans coloured by phase."""
    spans = [r for r in rows if r["phase"] != "node"]
    t0 = min(r["start"] for r in spans)
    lanes = sorted({(r["node"], r["who"]) for r in spans},
                   key=lambda k: (not k[1].startswith("driver"), k[1].startswith("worker"), k[1], k[0]))
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.3 * len(lanes)))
    for i, lane in enumerate(lanes):
        for r in spans:
            if (r["node"], r["who"]) == lane:
                ax.barh(i, r["end"] - r["start"], left=r["start"] - t0, height=0.8,
                        color=PHASE_COLOURS.get(r["phase"], "#000000"), label=r["phase"])
    handles = {h.get_label(): h for h in ax.containers}
    ax.legend([handles[k] for k in handles], list(handles), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    ax.set_yticks(range(len(lanes)), [f"{who} @ {node[:8]}" for node, who in lanes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started")
    u = timeline.usage(rows)
    ax.set_title(f"{u['resource']} busy {100 * u['busy_share']:.0f} % of held ({u['busy']:.3g} of {u['held']:.3g} "
                 f"{u['resource']}-h)", fontsize=9)
    fig.tight_layout()
    return fig


def _timeline_section(run_dir: Location, write: Callable[[Location, bytes], None]) -> list[str]:
    rows = timeline.read_timeline(run_dir)
    if not any(r["phase"] == "node" for r in rows):
        return []
    save_figure(gantt_chart(rows), run_dir / "report" / "timeline.png", write)
    return ["## Where the time went", "", "Resource-hours held (every up node's slots) and busy (sampling, fitting, "
            "testing), from timeline/:", "", timeline.usage_table(rows), "", "![timeline](report/timeline.png)", ""]


def write_report(run_dir: Location, write: Callable[[Location, bytes], None] = Location.write_bytes):
    """(Re)write run_dir/report.md and its figures under run_dir/report/ from the manifest and the results; each file
    by write(location, bytes) (a driver's: through its lease)."""
    run_dir = as_location(run_dir)
    manifest = read_manifest(run_dir)
    if not manifest or not manifest["stages"]:
        return
    figs = run_dir / "report"
    cfg = manifest["config"]
    d = cfg["distill"]
    lines = [f"# {cfg['name']}: {d['method']}", "",
             f"Data {cfg['data']['name']}, {d['seed_ipc']} + {d['stages']} x {d['ipc_per_stage']} images per class; "
             f"config hash `{manifest['config_hash']}` (the whole config is in manifest.json).", ""]
    if manifest.get("reference"):
        lines += [f"Reference theta* ({cfg['reference']['model']}, full real train split): "
                  f"{100 * manifest['reference']['test_acc']:.2f}% test accuracy.", ""]
    lines += ["## Stages", "", "| stage | new images | images | student test acc (%) | mean S | sampling (s) | training (s) "
              "| trajectories | guided / unguided steps | images per actor-s | H100 GPU-h (estimate) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, info in sorted(manifest["stages"].items(), key=lambda kv: int(kv[0])):
        s = f"{info['mean_S']:.3f}" if info.get("mean_S") is not None else "–"
        c = info.get("cost") or {}
        cost = (f"{c['trajectories']} | {c['guided_steps']} / {c['unguided_steps']} | {c['images_per_actor_second'] or '–'} | "
                f"{c['h100_gpu_hours']:.4g}" if c else "– | – | – | –")
        lines.append(f"| {key} | {info['images']} | {info['total_images']} | {100 * info['student_acc']:.2f} | {s} | "
                     f"{info['sample_seconds']} | {info['train_seconds']} | {cost} |")
    lines += ["", "![student accuracy](report/accuracy.png)", ""]
    save_figure(accuracy_plot(manifest), figs / "accuracy.png", write)
    scores = scores_plot(manifest)
    if scores is not None:
        save_figure(scores, figs / "scores.png", write)
        lines += ["![S per stage](report/scores.png)", ""]
    lines += ["## Images", ""]
    for key in sorted(manifest["stages"], key=int):
        grid = figs / f"stage{key}.png"
        if not grid.exists():  # a finished stage's images do not change
            save_figure(stage_grid(run_dir, manifest, int(key)), grid, write)
        lines += [f"![stage {key}](report/stage{key}.png)", ""]
    lines += _timeline_section(run_dir, write) + _eval_table(run_dir) + _redundancy_section(run_dir)
    write(run_dir / "report.md", "\n".join(lines).encode())


def compare(runs: list) -> str:
    """A markdown table of every evaluation and redundancy result under the given run folders (paths or URIs)."""
    rows, red = [], []
    for run in map(as_location, runs):
        for p in (run / "eval").files(".json"):
            r = json.loads(p.read_text())
            rows.append((r["method"], str(r["ipc"]), r["model"], labels_of(r), r["epochs"], len(r["repeats"]),
                         f"{r['last_mean']:.2f} ± {r['last_std']:.2f}", f"{r['best_mean']:.2f} ± {r['best_std']:.2f}",
                         f"{r['seconds']:.0f}", str(run)))
        path = run / "redundancy" / "redundancy.json"
        if path.exists():
            r = json.loads(path.read_text())
            red.append(f"| {r['method']} | {len(r['stages'])} | {100 * r['redundancy']:.2f} | "
                       f"{100 * sum(r['real_test']) / len(r['real_test']):.2f} | {run} |")
    rows.sort(key=lambda r: (r[2], r[3], int(r[1]) if r[1].isdigit() else 10**9, METHOD_ORDER.get(r[0], 9), r[0]))
    lines = ["| method | IPC | model | labels | epochs | repeats | last-epoch acc (%) | best acc (%) | eval s | run |",
             "|---|---|---|---|---|---|---|---|---|---|"] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    if red:
        lines += ["", "| method | increments | redundancy: mean off-diagonal acc (%) | mean real test acc of a row (%) | run |",
                  "|---|---|---|---|---|"] + red
    costs = [cost_row(run, m) for run in map(as_location, runs) if (m := read_manifest(run)) and m.get("stages")]
    if any(costs):
        lines += ["", "| method | guidance | images | guided steps | sampling actor-s | images per actor-s | "
                  "mean S (guided stages) | H100 GPU-h (estimate) | run |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [c for c in costs if c]
    pooled = seeds_tables(runs)
    if pooled:
        lines += ["", "## Over run seeds", "", pooled]
    staged = stages_table(runs)
    if staged:
        lines += ["", "### The incremental student over run seeds", "", staged]
    return "\n".join(lines)


def cost_row(run: Location, manifest: dict) -> str | None:
    """One run's sampling cost over all its stages (from each stage's `cost`), with its guidance options."""
    stages = [info for info in manifest["stages"].values() if info.get("cost")]
    if not stages:
        return None
    g, method = manifest["config"]["guidance"], manifest["config"]["distill"]["method"]
    options = (f"through {g['through']}, every {g.get('every', 1)}, select_after {g.get('select_after', 0)}"
               + (", checkpointing" if g.get("checkpointing") else "")) if METHODS[method].guided else "–"
    seconds = sum(i["cost"]["actor_seconds"] for i in stages)
    images = sum(i["images"] for i in stages)
    scores = [(i["mean_S"], i["images"]) for i in stages if i["cost"]["guided_steps"] and i["mean_S"] is not None]
    mean_s = f"{sum(s * n for s, n in scores) / sum(n for _, n in scores):.3f}" if scores else "–"
    return (f"| {method} | {options} | {images} | {sum(i['cost']['guided_steps'] for i in stages)} | {seconds:.1f} | "
            f"{images / seconds:.2f} | {mean_s} | {sum(i['cost']['h100_gpu_hours'] for i in stages):.4g} | {run} |")


def main(argv: list[str]):
    parser = Parser(prog="python -m lgd_ray.report", description="One markdown table of several "
                                     "runs' evaluations, redundancy and cost; runs of several seeds pooled, with paired "
                                     "differences.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (paths or URIs)")
    args = parser.parse_args(argv)

    def work():
        for run in map(as_location, args.runs):  # the results reported are of the shards the manifests list
            manifest = read_manifest(run)
            if manifest is None:
                raise ConfigError(f"report: {run} holds no run (no {MANIFEST}): give run folders made by "
                                  "`python -m lgd_ray.distill`")
            check_shards(run, manifest)
        print(compare(args.runs))

    one_line_errors(work)


if __name__ == "__main__":
    main(sys.argv[1:])
