"""`python -m lgd_ray.export RUN_DIR DEST [--ipc N] [--models]`: a distilled set in the field's formats.

    DEST/train/<class>/<key>.png   an ImageFolder tree (torchvision's ImageFolder, the RDED / SRe2L / DD-Ranking
                                   evaluation code, `datasets.load_dataset("imagefolder")`)
    DEST/metadata.jsonl            one row per image: file_name, label, class, stage, and the sample's own record
                                   (seed, S, losses, candidate rank ...)
    DEST/config.yaml               the run's whole config: `python -m lgd_ray.distill DEST/config.yaml out=NEW` remakes it
    DEST/README.md                 the dataset card: method, IPC, stages, student accuracy per stage, models' sha256,
                                   evaluations of the run, how to remake and evaluate it
    DEST/models/                   with --models: theta* (the reference) and the last exported stage's student

Class folders are the class names where their sorted order is the label order (torchvision numbers folders in
sorted order), else `NNNN-<name>`; characters a path cannot hold become `_`. DEST is a folder or a store URI.
"""
from __future__ import annotations

import json
import re
import sys

import yaml

from lgd_ray.cli import Parser, one_line_errors
from lgd_ray.config import ConfigError, from_dict
from lgd_ray.evaluate import load_run, prefix_shards
from lgd_ray.methods import stage_plan
from lgd_ray.reference import reference_path
from lgd_ray.shards import encode_png, read_shards, stage_dir
from lgd_ray.storage import Location, as_location


def class_folders(names: list[str]) -> list[str]:
    """A folder name per label whose sorted order is the label order."""
    safe = [re.sub(r"[^\w.+-]+", "_", n).strip("._") or "class" for n in names]
    if sorted(safe) == safe and len(set(safe)) == len(safe):
        return safe
    return [f"{i:04d}-{n}" for i, n in enumerate(safe)]


def export(run_dir: Location, dest: Location, ipc: int = 0, models: bool = False, overrides=()) -> dict:
    """Write the run's first stages holding `ipc` images per class (0: every trained stage) to `dest`; returns a
    summary {images, ipc, classes, dest}."""
    run_dir, dest = as_location(run_dir), as_location(dest)
    cfg, manifest = load_run(run_dir, overrides)
    total, rows = prefix_shards(manifest, ipc)
    folders = class_folders(manifest.get("classes") or [str(c) for c in range(manifest["num_classes"])])
    stage_of = {r["path"]: r["stage"] for r in rows}
    lines = []
    for row in rows:
        for s in read_shards(run_dir, [row]):
            name = f"train/{folders[s['cls']]}/{s['key']}.png"
            (dest / name).write_bytes(encode_png(s["image"]))
            lines.append(json.dumps({"file_name": name, "label": s["cls"], "class": folders[s["cls"]],
                                     "stage": stage_of[row["path"]], **s["meta"]}))
    (dest / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (dest / "config.yaml").write_text(yaml.safe_dump(manifest["config"], sort_keys=False))
    ipcs = _ipcs(manifest)
    last = max(s for s in range(len(ipcs)) if sum(ipcs[:s + 1]) <= total)  # the exported stages are 0..last
    if models:
        ref = reference_path(cfg)
        if not ref.exists():
            raise ConfigError(f"export: --models needs the run's reference at {ref}: set cache= to the run's cache")
        (dest / "models" / "reference.safetensors").write_bytes(ref.read_bytes())
        student = run_dir / stage_dir(last) / "student.safetensors"
        (dest / "models" / f"student-stage{last}.safetensors").write_bytes(student.read_bytes())
    (dest / "README.md").write_text(card(run_dir, manifest, total, len(lines), folders, last, models))
    print(f"export: {len(lines)} images ({total} per class, {len(folders)} classes, stages 0-{last}) -> {dest}",
          flush=True)
    return {"images": len(lines), "ipc": total, "classes": len(folders), "dest": str(dest)}


def _ipcs(manifest: dict) -> list[int]:
    """Images per class of each stage of the run's plan, in stage order."""
    return [st.ipc for st in stage_plan(from_dict(manifest["config"]))]


def card(run_dir: Location, manifest: dict, ipc: int, images: int, folders: list[str], last: int, models: bool) -> str:
    """The dataset card (README.md) of an export."""
    c = manifest["config"]
    d, g = c["distill"], c["guidance"]
    lines = [f"# {c['data']['name']}: {ipc} images per class distilled by lgd_ray ({d['method']})", "",
             f"{images} images, {len(folders)} classes, {c['data']['image_size']} px, in an ImageFolder tree "
             "(`train/<class>/<key>.png`) with `metadata.jsonl` (label, stage, seed, learnability score S and the "
             "sample's record per image).", "",
             "## How it was made", "",
             f"- method `{d['method']}`, run seed {c['seed']}, seed increment {d['seed_ipc']} IPC "
             f"({d['seed_from']}) + {d['ipc_per_stage']} IPC a stage; stages 0-{last} of this run are here",
             f"- guidance: lambda {g['lambda']}, omega {g['omega']}, kappa {g['kappa']}, gamma {g['gamma']}, "
             f"window {g['window']}, through {g['through']}",
             f"- prior: `{c['prior']['model_id'] or 'the project pixel DiT'}` (transformer sha256 "
             f"{manifest.get('prior_sha256') or '-'}), {c['prior']['num_steps']} {c['prior']['scheduler']} steps, "
             f"CFG {c['prior']['cfg_scale']}",
             f"- reference theta*: {c['reference']['model']} (sha256 {manifest.get('reference_sha256') or '-'}, test "
             f"accuracy {100 * manifest.get('reference', {}).get('test_acc', float('nan')):.2f} %)",
             f"- config hash {manifest.get('config_hash', '-')}; the whole config is "
             "`config.yaml`: `python -m lgd_ray.distill config.yaml out=NEW_DIR` makes the same images (bit for bit on "
             "the CPU)", "",
             "| stage | images per class | student accuracy (%) | mean S |", "|---|---|---|---|"]
    ipcs = _ipcs(manifest)
    for s in range(last + 1):
        info = manifest["stages"].get(str(s), {})
        mean_s = info.get("mean_S")
        lines.append(f"| {s} | {ipcs[s]} | {100 * info.get('student_acc', float('nan')):.2f} | "
                     + (f"{mean_s:.3f}" if mean_s is not None else "-") + " |")
    lines += ["", "## Evaluation", "",
              "Protocol: fresh classifiers trained on this set with the config's `evaluate` section (docs/DESIGN.md "
              "section 5 of lgd_ray), tested on the real test split; `python -m lgd_ray.evaluate RUN_DIR` runs it. "
              "Results of the run:", ""]
    evals = sorted((run_dir / "eval").files(".json"), key=str) if (run_dir / "eval").exists() else []
    rows = [json.loads(p.read_text()) for p in evals]
    rows = [r for r in rows if r.get("ipc") == ipc]
    if rows:
        lines += ["| model | labels | epochs | repeats | last (%) | best (%) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['labels']} | {r['epochs']} | {len(r['repeats'])} | {r['last_mean']:.2f} ± "
                  f"{r['last_std']:.2f} | {r['best_mean']:.2f} ± {r['best_std']:.2f} |" for r in rows]
    else:
        lines.append(f"(none at IPC {ipc} yet)")
    lines += ["", "Not held by the ImageFolder format: the soft labels of a teacher (evaluate labels=soft computes "
              "them from `models/reference.safetensors`) and the stage order (in `metadata.jsonl`).", ""]
    if models:
        lines += ["## Models", "", "`models/reference.safetensors` (theta*) and "
                  f"`models/student-stage{last}.safetensors`: safetensors state dicts of lgd_ray.models classifiers "
                  f"({c['reference']['model']}, {c['student']['model']}).", ""]
    return "\n".join(lines)


def main(argv: list[str]):
    parser = Parser(prog="python -m lgd_ray.export", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("run_dir")
    parser.add_argument("dest", help="a folder or a store URI")
    parser.add_argument("--ipc", type=int, default=0, help="the first stages holding this many images per class "
                                                          "(default: every trained stage)")
    parser.add_argument("--models", action="store_true", help="also theta* and the last stage's student")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="cache=... (where the run's models are)")
    args = parser.parse_intermixed_args(argv)
    one_line_errors(lambda: export(args.run_dir, args.dest, args.ipc, args.models, args.overrides))


if __name__ == "__main__":
    main(sys.argv[1:])
