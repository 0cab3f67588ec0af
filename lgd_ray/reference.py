"""The reference model theta*: trained once on the full real train split, cached by its config, test accuracy kept."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from lgd_ray.config import Config, config_hash
from lgd_ray.data import load_split
from lgd_ray.models import build_classifier
from lgd_ray.seeding import derive_seed
from lgd_ray.train import accuracy, load_classifier, save_classifier, train_classifier


def reference_path(cfg: Config) -> Path:
    key = {"data": dataclasses.asdict(cfg.data), "reference": dataclasses.asdict(cfg.reference), "seed": cfg.seed}
    return Path(cfg.cache) / f"reference-{cfg.data.name}-{cfg.reference.model}-{config_hash(key)}.safetensors"


def new_classifier(cfg: Config, model: str, num_classes: int, role: str) -> torch.nn.Module:
    """A fresh classifier of the registry sized for the configured data set, its init seeded by (run seed, role)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init", role))
        return build_classifier(model, cfg.data.channels, cfg.data.image_size, num_classes)


def ensure_reference(cfg: Config, num_classes: int, device="cpu") -> tuple[torch.nn.Module, dict]:
    """(theta* in eval mode, its info {test_acc, seconds, ...}); trained and saved first if not cached."""
    path = reference_path(cfg)
    model = new_classifier(cfg, cfg.reference.model, num_classes, "reference")
    if path.exists():
        return load_classifier(model, path)
    train_set, test_set = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    print(f"reference: training {cfg.reference.model} on {len(train_set)} real images -> {path}", flush=True)
    start = time.time()
    train_classifier(model, train_set, cfg.reference.train, derive_seed(cfg.seed, "reference"), device, desc="reference")
    info = {"model": cfg.reference.model, "test_acc": accuracy(model, test_set, device),
            "seconds": round(time.time() - start, 1), "train_images": len(train_set)}
    save_classifier(model, path, info)
    print(f"reference: test accuracy {100 * info['test_acc']:.2f}% ({info['seconds']} s)", flush=True)
    return model.eval(), info
