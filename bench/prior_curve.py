"""Fidelity of one prior fit along its checkpoints: each checkpoint's EMA weights saved as a prior (a DiTPipeline
folder, loaded as any prior.model_id) and measured by bench/prior_fidelity.py at one scheduler and CFG scale.

    python bench/prior_curve.py CONFIG CHECKPOINT_DIR... [key=value ...] --out runs/curve [--cfg-scale 1] [--per-class 50]

CHECKPOINT_DIR: checkpoint_NNNNNN folders of the fit of CONFIG with these overrides (its prior.* keys decide the DiT's
shape). Writes OUT/step-N/ (the priors), OUT/curve.json (one row per checkpoint and the floors) and OUT/curve.png;
a checkpoint OUT/curve.json already holds at the same setting is not measured again.
The checkpoints of one fit are mid-schedule: a fit of N steps anneals its learning rate by step N, so its prior is
better than the checkpoint at step N of a longer fit.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib
import torch
from safetensors.torch import load_file

from lgd_ray.config import load_config
from lgd_ray.data import num_classes
from lgd_ray.finetune import base_vae
from lgd_ray.prior import PIPELINE_MARKER
from lgd_ray.prior_fit import save_prior
from lgd_ray.prior_make import project_job
from lgd_ray.storage import Location
from lgd_ray.vae_fit import VAE_MARKER, vae_dir

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import prior_fidelity  # noqa: E402  (bench/ is not a package)


def export(cfg, checkpoint: Path, out: Path) -> tuple[int, Path]:
    """The checkpoint's EMA weights as a prior folder under `out` (once); its step."""
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    folder = out / f"step-{state['step']:06d}"
    if not (folder / PIPELINE_MARKER).exists():
        info = {"steps": state["step"], "checkpoint": str(checkpoint), "mid_schedule_of": cfg.prior.train_steps}
        save_weights(cfg, load_file(str(checkpoint / "ema.safetensors")), info, folder)
    return state["step"], folder


def save_weights(cfg, state: dict, info: dict, folder: Path):
    """DiT weights of cfg.prior's shape saved as a prior folder (a DiTPipeline, loaded by prior.model_id); a latent
    prior's with the config's fitted VAE (from the cache, where its fit put it)."""
    vae = base_vae(str(vae_dir(cfg)), cfg.local_cache, VAE_MARKER) if cfg.prior.latent_channels else None
    save_prior(project_job(cfg, None, num_classes(cfg.data)), state, info, Location(str(folder)), vae=vae)


def checkpoint_parser(prog: str) -> argparse.ArgumentParser:
    """The arguments of a bench on one fit's checkpoints: CONFIG CHECKPOINT_DIR... [key=value ...] --out DIR."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("config")
    parser.add_argument("items", nargs="+", help="checkpoint folders, then key=value overrides")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--per-class", type=int, default=50)
    return parser


def parse_checkpoint_args(parser: argparse.ArgumentParser, argv):
    """(args, overrides, checkpoint folders in order, the config, the --out folder (made))."""
    args = parser.parse_intermixed_args(argv)
    overrides = [i for i in args.items if "=" in i]
    checkpoints = sorted(Path(i) for i in args.items if "=" not in i)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, overrides, checkpoints, load_config(args.config, overrides), out


def measure(args, overrides: list[str], folder: Path, scheduler: str) -> tuple[list[dict], dict]:
    """bench/prior_fidelity.py on the prior in `folder` at `scheduler` and --cfg-scale: (the floors: real, and a
    latent prior's VAE round trip; its row)."""
    *floors, row = prior_fidelity.main([args.config, *overrides, f"prior.model_id={folder}", "--per-class",
                                        str(args.per_class), "--schedulers", scheduler, "--cfg-scales",
                                        str(args.cfg_scale)])
    return floors, row


def print_rows(rows: list[dict], first: str):
    """One line per row: `first`, the setting and the fidelity measures."""
    for r in rows:
        print(" | ".join(f"{k} {r[k]}" for k in (first, "setting", "reference_acc", "fd", "precision", "recall")
                         if k in r))


def plot(rows: list[dict], floors: list[dict], path: Path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["steps"] for r in rows]
    for ax, key, label in zip(axes, ("fd", "recall", "reference_acc"), ("FD (lower is better)", "recall",
                                                                         "theta* accuracy on samples")):
        ax.plot(steps, [r[key] for r in rows], "o-", label="prior checkpoint")
        for floor, style in zip(floors, ("--", ":")):
            ax.axhline(floor[key], ls=style, c="grey", label=floor["setting"])
        ax.set_xlabel("prior fit steps")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    parser = checkpoint_parser("bench/prior_curve.py")
    parser.add_argument("--scheduler", default="ddpm")
    args, overrides, checkpoints, cfg, out = parse_checkpoint_args(parser, argv)
    setting = f"{args.scheduler} CFG {args.cfg_scale}"
    earlier = json.loads((out / "curve.json").read_text()) if (out / "curve.json").exists() else {"rows": []}
    n = min(10, num_classes(cfg.data)) * args.per_class  # prior_fidelity's samples: the first 10 classes at most
    done = {r["steps"]: r for r in earlier["rows"] if (r["setting"], r["n"]) == (setting, n)}
    rows, floors = [], earlier.get("floors", [earlier["floor"]] if "floor" in earlier else [])
    for checkpoint in checkpoints:
        step, folder = export(cfg, checkpoint, out)
        if step in done:  # measured by an earlier call with the same setting (the same seeded samples)
            rows.append(done[step])
            continue
        floors, row = measure(args, overrides, folder, args.scheduler)
        rows.append({"steps": step, "prior": str(folder), **row})
    listed = {r["steps"] for r in rows}
    rows += [r for step, r in done.items() if step not in listed]  # earlier checkpoints not named this time
    rows.sort(key=lambda r: r["steps"])
    (out / "curve.json").write_text(json.dumps({"floors": floors, "rows": rows}, indent=1))
    plot(rows, floors, out / "curve.png")
    print_rows(floors + rows, "steps")

if __name__ == "__main__":
    main(sys.argv[1:])
