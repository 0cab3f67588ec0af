"""Fidelity of a config's prior: the reference model's accuracy on its samples, per scheduler and CFG scale.

    python bench/prior_fidelity.py CONFIG [key=value ...]

Samples 10 images per class (the first 10 classes) from the same seeds for DDIM and DDPM at CFG 1, 2 and 4, and
prints theta*'s accuracy on them (a proxy for class fidelity) and their mean pixel next to the real data's.
"""
import sys
import time

import torch

from lgd_ray.config import load_config
from lgd_ray.data import load_split, num_classes, to_float
from lgd_ray.prior import ensure_prior, load_prior
from lgd_ray.reference import ensure_reference
from lgd_ray.sampler import generate


def main(argv):
    cfg = load_config(argv[0], argv[1:])
    reference, info = ensure_reference(cfg, num_classes(cfg.data))
    items = [(c, s) for c in range(min(10, num_classes(cfg.data))) for s in range(10)]
    print(f"{cfg.name}: reference test accuracy {100 * info['test_acc']:.1f}%; real mean pixel "
          f"{to_float(load_split(cfg.data, 'train').images[:2000]).mean():.2f}")
    for scheduler in ("ddim", "ddpm"):
        prior = load_prior(ensure_prior(cfg), scheduler, dtype=cfg.prior.dtype)
        for cfg_scale in (1.0, 2.0, 4.0):
            start = time.time()
            out = generate(prior, items, run_seed=123, stage=0, num_steps=cfg.prior.num_steps, cfg_scale=cfg_scale,
                           batch_size=len(items), image_size=cfg.data.image_size)
            x, y = to_float(torch.stack([o.image for o in out])), torch.tensor([o.cls for o in out])
            with torch.no_grad():
                acc = (reference(x).argmax(1) == y).float().mean().item()
            print(f"{scheduler} CFG {cfg_scale}: reference accuracy on {len(items)} samples {100 * acc:.1f}%, "
                  f"mean pixel {x.mean():.2f} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
