"""Results over run seeds: runs that differ only in `seed` form a group; a group's accuracy is pooled over its seeds
x evaluation models, and two groups run with the same seeds are compared by the per-seed difference of their mean
accuracies, with a 95 % t interval over seeds (a paired comparison: the same seed gives both the same prior, reference
and real subset draws).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from itertools import combinations, groupby

from scipy.stats import t as student_t

from lgd_ray.config import build_config, config_hash, run_identity
from lgd_ray.methods import stage_plan
from lgd_ray.shards import read_manifest
from lgd_ray.storage import as_location

NOT_IDENTITY = ("seed", "out", "cache", "device", "name")  # what may differ between the runs of one group
METHOD_ORDER = {"full": 0, "random": 1, "dit": 2, "mgd3": 3, "dds": 4, "lgd": 5}  # tables list methods in this order


@dataclass
class Group:
    """The evaluations of one configuration (less its seed) with one evaluation model, labels and IPC."""

    data: str
    method: str
    ipc: str
    model: str
    labels: str
    config: dict  # the flattened run identity, seed excluded
    label: str = ""  # method plus the keys that set this group apart from the others of its method
    by_seed: dict = field(default_factory=dict)  # run seed -> list of evaluation-model accuracies (last, best), %

    def pooled(self, key: int) -> tuple[float, float]:
        """Mean and sample std over seeds x evaluation models; key 0 = last epoch, 1 = best."""
        values = [r[key] for rows in self.by_seed.values() for r in rows]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def seed_means(self, key: int) -> dict:
        return {s: statistics.fmean(r[key] for r in rows) for s, rows in self.by_seed.items()}


@dataclass
class Stages:
    """The incremental student of one configuration (less its seed), stage by stage, by run seed."""

    data: str
    method: str
    config: dict
    label: str = ""
    by_seed: dict = field(default_factory=dict)  # run seed -> [(student acc %, mean S or None) per trained stage]
    redundancy: dict = field(default_factory=dict)  # run seed -> mean off-diagonal accuracy (%), where computed

    def stage_count(self) -> int:
        """The stages every seed has (runs of one group plan the same stages; dds's have one)."""
        return min(map(len, self.by_seed.values()))


def paired(a: dict, b: dict) -> tuple[float, float, float, int] | None:
    """Mean of a[s] - b[s] over the seeds both have, with its 95 % t interval: (mean, low, high, n); None if n < 2."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, half = statistics.fmean(d), student_t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mean, mean - half, mean + half, len(d)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


def _runs(runs: list):
    """(manifest, config, identity less the seed) of each run folder that holds a run."""
    for run in map(as_location, runs):
        manifest = read_manifest(run)
        if manifest is None:
            continue
        cfg = build_config(manifest["config"])  # today's keys: runs made before a key existed group with later ones
        yield run, manifest, cfg, {k: v for k, v in run_identity(cfg).items() if k not in NOT_IDENTITY}


PLAN = ("distill.seed_ipc", "distill.stages", "distill.ipc_per_stage")  # labelled together as the stage plan


def _labelled(groups: list) -> list:
    """Each group's label: its method plus the keys in which the method's groups of the same data set differ; the
    stage plan's keys, where one of them differs, as one `stages=SEED+STAGESxIPC` (e.g. stages=4+3x2)."""
    for g in groups:
        peers = [h for h in groups if (h.data, h.method) == (g.data, g.method)]
        varying = sorted(k for k in g.config if len({h.config.get(k) for h in peers}) > 1)
        words = [f"{k}={json.loads(g.config[k])}" for k in varying if k not in PLAN]
        if any(k in PLAN for k in varying):
            seed, stages, per_stage = (json.loads(g.config[k]) for k in PLAN)
            words.insert(0, f"stages={seed}+{stages}x{per_stage}")
        g.label = " ".join([g.method] + words)
    return groups


def labels_of(result: dict) -> str:
    """An evaluation's labels as tables name them: hard | soft | rded, with a teacher other than the run's reference
    after them (soft (resnet18.tv_in1k))."""
    teacher = result.get("teacher", "reference")
    return result["labels"] + ("" if teacher == "reference" else f" ({teacher.split('@')[0]})")


def collect(runs: list) -> list[Group]:
    """The groups of the runs' evaluations (run folders, paths or URIs); evaluations on the full data set excluded."""
    groups: dict[tuple, Group] = {}
    for run, _, cfg, identity in _runs(runs):
        for p in (run / "eval").files(".json"):
            r = json.loads(p.read_text())
            key = (config_hash(identity), str(r["ipc"]), r["model"], labels_of(r))
            g = groups.setdefault(key, Group(cfg.data.name, r["method"], str(r["ipc"]), r["model"], labels_of(r),
                                             _flat(identity)))
            g.by_seed[cfg.seed] = [(100 * x["last"], 100 * x["best"]) for x in r["repeats"]]
    return _labelled(list(groups.values()))


def collect_stages(runs: list) -> list[Stages]:
    """The incremental student's real test accuracy and mean S per stage, and the redundancy of the increments where
    `python -m lgd_ray.redundancy` ran, grouped as `collect` groups; runs with a stage not yet trained are left out."""
    groups: dict[str, Stages] = {}
    for run, manifest, cfg, identity in _runs(runs):
        stages = [manifest["stages"][k] for k in sorted(manifest.get("stages", {}), key=int)]
        rows = [(100 * s["student_acc"], s.get("mean_S")) for s in stages if s.get("trained")]
        if len(rows) == len(stage_plan(cfg)):
            g = groups.setdefault(config_hash(identity), Stages(cfg.data.name, cfg.distill.method, _flat(identity)))
            g.by_seed[cfg.seed] = rows
            if (path := run / "redundancy" / "redundancy.json").exists():
                g.redundancy[cfg.seed] = 100 * json.loads(path.read_text())["redundancy"]
    return _labelled(list(groups.values()))


def stages_table(runs: list) -> str:
    """Markdown: the incremental student after each stage (mean ± std over seeds), the mean S of each stage's chosen
    images (mean over seeds; – where a stage has none, as unguided ones) and the redundancy (mean ± std over the
    seeds that have it), for groups with two or more seeds."""
    groups = [g for g in collect_stages(runs) if len(g.by_seed) > 1]
    if not groups:
        return ""
    groups.sort(key=lambda g: (g.data, METHOD_ORDER.get(g.method, 9), g.label))
    n = max(g.stage_count() for g in groups)
    lines = ["| data | method | seeds | " + " | ".join(f"student after stage {i} (%)" for i in range(n))
             + " | " + " | ".join(f"mean S, stage {i}" for i in range(n)) + " | redundancy (%) |",
             "|---|---|---|" + "---|" * (2 * n + 1)]
    for g in groups:
        k, seeds = g.stage_count(), sorted(g.by_seed)
        accs = [[g.by_seed[s][i][0] for s in seeds] for i in range(k)]
        scores = [[g.by_seed[s][i][1] for s in seeds] for i in range(k)]
        acc_cells = [f"{statistics.fmean(a):.2f} ± {statistics.stdev(a):.2f}" for a in accs] + [""] * (n - k)
        s_cells = ["–" if None in v else f"{statistics.fmean(v):.3f}" for v in scores] + [""] * (n - k)
        r = list(g.redundancy.values())
        red = (f"{statistics.fmean(r):.2f} ± {statistics.stdev(r):.2f} ({len(r)} seeds)" if len(r) > 1
               else f"{r[0]:.2f} (1 seed)" if r else "–")
        lines.append(f"| {g.data} | {g.label} | {','.join(map(str, seeds))} | " + " | ".join(acc_cells + s_cells)
                     + f" | {red} |")
    lines += ["", "From the runs' manifests: the student each stage trains (continued from the stage before) on the "
              "set so far, tested on the real test split; mean ± sample std over run seeds. Redundancy: the mean "
              "off-diagonal accuracy of `python -m lgd_ray.redundancy` (a classifier trained on one increment, tested "
              "on another)."]
    return "\n".join(lines)


def seeds_tables(runs: list) -> str:
    """Markdown: per data set, evaluation model and labels (a protocol), the pooled table of its groups and the paired
    differences of the groups run with the same seeds at the same IPC. Empty when no group has two seeds."""
    groups = collect(runs)
    if not any(len(g.by_seed) > 1 for g in groups):
        return ""
    groups.sort(key=lambda g: (g.data, g.model, g.labels, int(g.ipc) if g.ipc.isdigit() else 10**9,
                               METHOD_ORDER.get(g.method, 9), g.label))
    lines = []
    for (data, model, labels), members in groupby(groups, key=lambda g: (g.data, g.model, g.labels)):
        members = list(members)
        lines += [f"### {data}: {model}, {labels} labels", "",
                  "| IPC | method | seeds | models per seed | last-epoch acc (%) | best acc (%) |", "|---|---|---|---|---|---|"]
        for g in members:
            (lm, ls), (bm, bs) = g.pooled(0), g.pooled(1)
            lines.append(f"| {g.ipc} | {g.label} | {','.join(map(str, sorted(g.by_seed)))} "
                         f"| {len(next(iter(g.by_seed.values())))} | {lm:.2f} ± {ls:.2f} | {bm:.2f} ± {bs:.2f} |")
        rows = []
        for b, a in combinations(members, 2):  # A - B: the later (in METHOD_ORDER) minus the earlier
            if a.ipc != b.ipc:
                continue
            means = [(a.seed_means(k), b.seed_means(k)) for k in (0, 1)]  # (A, B) by seed: last, best
            diffs = [paired(ma, mb) for ma, mb in means]
            if diffs[0] is None:
                continue
            (last_a, last_b), _ = means
            per_seed = ", ".join(f"{last_a[s] - last_b[s]:+.2f}" for s in sorted(set(last_a) & set(last_b)))
            cells = [f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" for m, lo, hi, _ in diffs]
            rows.append(f"| {a.ipc} | {a.label} | {b.label} | {diffs[0][3]} | {per_seed} | {cells[0]} | {cells[1]} |")
        if rows:
            lines += ["", "| IPC | A | B | seeds | A - B per seed, last epoch | A - B, last epoch (95 % CI) | "
                      "A - B, best (95 % CI) |", "|---|---|---|---|---|---|---|"] + rows
        lines.append("")
    lines += ["Pooled over run seeds x evaluation models (mean ± sample std). Paired over the seeds both groups have "
              "(in seed order): the mean of the per-seed differences of the mean accuracy over evaluation models, "
              "with a 95 % t interval (n - 1 degrees of freedom)."]
    return "\n".join(lines)
