"""The EMA decay of a finished prior fit, chosen after the fit: post-hoc EMAs of its raw-weight checkpoints, each
saved as a prior and measured by bench/prior_fidelity.py beside the fit's own EMA.

    python bench/prior_ema.py CONFIG CHECKPOINT_DIR... [key=value ...] --out runs/ema --decays 0 0.9995 0.9999 \
        [--cfg-scale 1.5] [--per-class 50]

CHECKPOINT_DIR: checkpoint_NNNNNN folders of one fit of CONFIG with these overrides, evenly spaced (every
prior.checkpoint_steps). The EMA of decay b at the last checkpoint's step S is approximated with each checkpoint's
raw weights held over the steps since the one before: weight b^(S - s_k) - b^(S - s_(k-1)) for the checkpoint at s_k,
normalised over the checkpoints given (so give enough of them: a horizon of 1 / (1 - b) steps). Decay 0 is the last
checkpoint's raw weights. The first row is the fit's own EMA (prior.ema_decay) at the same checkpoint.
Writes OUT/decay-D/ and OUT/fit-ema/ (the priors) and OUT/ema.json.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lgd_ray.prior import PIPELINE_MARKER

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prior_curve import checkpoint_parser, measure, parse_checkpoint_args, print_rows, save_weights  # noqa: E402


def ema_weights(steps: list[int], decay: float) -> list[float]:
    """The weight of each checkpoint (at `steps`, ascending) in the EMA of `decay` at the last step; sums to 1."""
    last = steps[-1]
    if decay == 0:
        return [0.0] * (len(steps) - 1) + [1.0]
    before = [2 * steps[0] - steps[1]] + steps[:-1]  # the first checkpoint holds over one spacing
    w = [decay ** (last - s) - decay ** (last - b) for s, b in zip(steps, before)]
    return [x / sum(w) for x in w]


def export(cfg, checkpoints: list[Path], decay: float | None, out: Path) -> Path:
    """The post-hoc EMA of `decay` over the checkpoints' raw weights (None: the last checkpoint's own EMA), saved as a
    prior folder under `out` (once)."""
    folder = out / ("fit-ema" if decay is None else f"decay-{decay}")
    if (folder / PIPELINE_MARKER).exists():
        return folder
    steps = [torch.load(c / "train_state.pt", weights_only=True)["step"] for c in checkpoints]
    if decay is None:
        state = load_file(str(checkpoints[-1] / "ema.safetensors"))
    else:
        state = {}
        for w, c in zip(ema_weights(steps, decay), checkpoints):
            if w > 1e-6:
                for k, v in load_file(str(c / "model.safetensors")).items():
                    state[k] = state.get(k, 0) + w * v.double()
        state = {k: v.float() for k, v in state.items()}
    info = {"steps": steps[-1], "ema_decay": cfg.prior.ema_decay if decay is None else decay,
            "post_hoc": decay is not None, "checkpoints": len(steps)}
    save_weights(cfg, state, info, folder)
    return folder


def main(argv):
    parser = checkpoint_parser("bench/prior_ema.py")
    parser.add_argument("--decays", type=float, nargs="+", required=True)
    args, overrides, checkpoints, cfg, out = parse_checkpoint_args(parser, argv)
    priors = [(f"the fit's EMA {cfg.prior.ema_decay}", export(cfg, checkpoints, None, out))]
    priors += [(f"post-hoc {d}", export(cfg, checkpoints, d, out)) for d in args.decays]
    rows, floors = [], []
    for name, folder in priors:
        floors, row = measure(args, overrides, folder, cfg.prior.scheduler)
        rows.append({"weights": name, "prior": str(folder), **row})
    (out / "ema.json").write_text(json.dumps({"floors": floors, "rows": rows}, indent=1))
    print_rows(floors + rows, "weights")
    return rows

if __name__ == "__main__":
    main(sys.argv[1:])
