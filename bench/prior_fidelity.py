"""Fidelity of a config's prior: the reference model's accuracy on its samples, and the distance between real and
generated sets in the reference's penultimate feature space (Fréchet distance, k-NN precision / recall; overall and
mean per class), per scheduler and CFG scale.

    python bench/prior_fidelity.py CONFIG [key=value ...] [--per-class 50] [--schedulers ddpm] [--cfg-scales 1 2 4]

Samples --per-class images of every class (at most the first 10 classes) from the same seeds for each setting and
compares them with as many real test images per class. The first row, real train vs real test, is the floor of each
metric at that sample size; for a latent prior the next, the same train images encoded and decoded by its VAE, is
the floor its samples can reach. Prints one JSON line per setting (and the prior's train_info.json).
"""
import argparse
import json
import sys
import time

import torch

from lgd_ray.config import load_config
from lgd_ray.data import load_split, num_classes, to_float, to_uint8
from lgd_ray.fidelity import features, fidelity
from lgd_ray.prior import configured_prior
from lgd_ray.prior_make import ensure_prior
from lgd_ray.reference import ensure_reference
from lgd_ray.sampler import generate
from lgd_ray.storage import Location


def per_class(data, classes: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of each class (float) and their labels."""
    idx = torch.cat([(data.labels == c).nonzero().squeeze(1)[:n] for c in range(classes)])
    return to_float(data.images[idx]), data.labels[idx]


def main(argv):
    parser = argparse.ArgumentParser(prog="bench/prior_fidelity.py")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--schedulers", nargs="+", default=["ddim", "ddpm"])
    parser.add_argument("--cfg-scales", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    classes = min(10, num_classes(cfg.data))
    reference, info = ensure_reference(cfg, num_classes(cfg.data))
    model_id = ensure_prior(cfg)
    train_info = Location(model_id) / "train_info.json"
    print(json.dumps({"config": cfg.name, "prior": model_id, "reference_test_acc": round(info["test_acc"], 4),
                      "train_info": json.loads(train_info.read_text()) if train_info.exists() else None}))
    real_x, real_y = per_class(load_split(cfg.data, "test"), classes, args.per_class)
    real = features(reference, real_x)
    rows = []

    def report(setting: dict, x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            acc = (reference(x).argmax(1) == y).float().mean().item()
        f = fidelity(real, real_y, features(reference, x), y)
        row = {**setting, "n": len(y), "reference_acc": round(acc, 4), "mean_pixel": round(x.mean().item(), 3),
               **{k: round(v, 4) for k, v in f.items() if k != "per_class"}}
        rows.append(row)
        print(json.dumps(row), flush=True)

    train_x, train_y = per_class(load_split(cfg.data, "train"), classes, args.per_class)
    report({"setting": "real train vs real test"}, train_x, train_y)
    priors = {s: configured_prior(cfg, model_id, scheduler=s) for s in args.schedulers}
    prior = next(iter(priors.values()))
    if prior.vae is not None:  # a latent prior's samples can be no closer than its VAE's round trip of real images
        with torch.no_grad():
            round_trip = to_float(to_uint8(prior.decode(prior.encode(train_x))))
        report({"setting": "real train through the VAE vs real test"}, round_trip, train_y)
    items = [(c, s) for c in range(classes) for s in range(args.per_class)]
    for scheduler, prior in priors.items():
        for cfg_scale in args.cfg_scales:
            start = time.time()
            out = generate(prior, items, run_seed=123, stage=0, num_steps=cfg.prior.num_steps, cfg_scale=cfg_scale,
                           batch_size=min(len(items), 256), image_size=cfg.data.image_size)
            x, y = to_float(torch.stack([o.image for o in out])), torch.tensor([o.cls for o in out])
            report({"setting": f"{scheduler} CFG {cfg_scale}", "seconds": round(time.time() - start, 1)}, x, y)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
