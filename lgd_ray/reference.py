"""The reference model theta*: trained once on the full real train split, cached by its config, test accuracy kept."""
from __future__ import annotations

import dataclasses
import time
from functools import partial

import torch

from lgd_ray.config import Config, ConfigError, config_hash
from lgd_ray.data import load_split
from lgd_ray.lease import cache_lock
from lgd_ray.seeding import derive_seed
from lgd_ray.storage import Location
from lgd_ray.train import FitJob, Fitter, in_process_fitter, load_classifier, save_classifier


def reference_path(cfg: Config) -> Location:
    data = dataclasses.asdict(cfg.data)
    del data["prepared"]  # the same images, JPEG or prepared shards
    key = {"data": data, "reference": dataclasses.asdict(cfg.reference), "seed": cfg.seed,
           "train_workers": cfg.ray.train_workers}
    return Location(cfg.cache).resolve() / f"reference-{cfg.data.name}-{cfg.reference.model}-{config_hash(key)}.safetensors"


def fit_job(cfg: Config, role: str, num_classes: int, load_data, seed: int, init_state=None, name=None,
            test: bool = False) -> FitJob:
    """The FitJob of the reference ("reference") or the student ("student"), sized for the configured data set;
    test: the job also tests the model on the real test split, read where it trains (metrics["test_acc"])."""
    section = getattr(cfg, role)
    return FitJob(model=section.model, channels=cfg.data.channels, image_size=cfg.data.image_size,
                  num_classes=num_classes, init_seed=derive_seed(cfg.seed, "init", role), train=section.train,
                  load_data=load_data, seed=seed, init_state=init_state, name=name or role,
                  checkpoint_every=cfg.ray.checkpoint_every,
                  load_test=partial(load_split, cfg.data, "test") if test else None)


def new_classifier(cfg: Config, role: str, num_classes: int) -> torch.nn.Module:
    """A freshly initialised reference or student (the same init as its FitJob)."""
    return fit_job(cfg, role, num_classes, None, 0).build()


def load_reference(cfg: Config, num_classes: int) -> tuple[torch.nn.Module, dict]:
    """(theta* in eval mode, its info) for a process that only loads it (a sampler actor, an evaluation task)."""
    path = reference_path(cfg)
    if not path.exists():
        raise ConfigError(f"reference: no theta* at {path}; the driver of `python -m lgd_ray.distill "
                          f"{cfg.name or 'CONFIG'}` trains it before any actor starts")
    return load_classifier(new_classifier(cfg, "reference", num_classes), path)


def ensure_reference(cfg: Config, num_classes: int, device="cpu", fitter: Fitter | None = None) -> tuple[torch.nn.Module, dict]:
    """(theta* in eval mode, its info {test_acc, seconds, ...}); trained (by `fitter`) and saved first if not cached.

    Called by the driver only (actors call `load_reference`)."""
    path = reference_path(cfg)
    model = new_classifier(cfg, "reference", num_classes)
    if path.exists():
        return load_classifier(model, path)
    with cache_lock(cfg.cache, path.name, cfg.storage.lease_s, cfg.storage.retry_s) as lease:
        if path.exists():  # made by another driver while this one waited
            return load_classifier(model, path)
        print(f"reference: training {cfg.reference.model} on the real train split -> {path}", flush=True)
        start = time.time()
        job = fit_job(cfg, "reference", num_classes, partial(load_split, cfg.data, "train"),
                      derive_seed(cfg.seed, "reference"), test=True)
        state, metrics = lease.fenced(fitter or in_process_fitter(device))(job)
        model.load_state_dict(state)
        info = {"model": cfg.reference.model, "test_acc": metrics["test_acc"], "seconds": round(time.time() - start, 1)}
        save_classifier(model, path, info)
    print(f"reference: test accuracy {100 * info['test_acc']:.2f}% ({info['seconds']} s)", flush=True)
    return model.eval(), info
