"""The teacher of soft-label evaluation (evaluate.labels soft | rded): the run's reference model theta*, or a named
ImageNet classifier of timm (the papers' teacher for ImageNet subsets: torchvision's ResNet-18, `resnet18.tv_in1k`).

`evaluate.teacher`: `reference`; `NAME` (a timm model, its pretrained weights from the Hugging Face hub, as timm loads
them); or `NAME@WEIGHTS` (the same model with a safetensors file: a path or a store URI, for nodes without the hub).
"""
from __future__ import annotations

import timm
import torch
from safetensors.torch import load
from torch import nn

from lgd_ray.config import Config, ConfigError
from lgd_ray.data import imagenet_indices
from lgd_ray.reference import new_classifier, reference_path
from lgd_ray.storage import as_location
from lgd_ray.train import load_classifier


class ImageNetTeacher(nn.Module):
    """A 1000-class ImageNet classifier as the teacher of a data set of ImageNet classes: the project's images
    ([-1, 1]) normalised as the model was trained, its logits those of the data set's classes, in their order."""

    def __init__(self, model: nn.Module, classes: list[int]):
        super().__init__()
        self.model = model
        cfg = model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, -1, 1, 1))
        self.register_buffer("classes", torch.tensor(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(((x + 1) / 2 - self.mean) / self.std)[:, self.classes]


def check_teacher(cfg: Config):
    """Refuse, in one line, a teacher that cannot teach this data set (before any work)."""
    e = cfg.evaluate
    if e.labels == "hard" or e.teacher == "reference":
        return
    name = e.teacher.split("@", 1)[0]
    if not timm.is_model(name):
        raise ConfigError(f"config: 'evaluate.teacher' {e.teacher!r} is neither 'reference' nor a timm model name "
                          "(e.g. resnet18.tv_in1k, optionally @WEIGHTS.safetensors)")
    if cfg.data.channels != 3:
        raise ConfigError(f"config: 'evaluate.teacher' {name} is an ImageNet model: it needs RGB data, "
                          f"{cfg.data.name} has {cfg.data.channels} channel(s); use evaluate.teacher=reference")
    try:
        imagenet_indices(cfg.data)
    except ConfigError as e:
        raise ConfigError(f"config: 'evaluate.teacher' {name} labels ImageNet's classes, {str(e).removeprefix('config: ')}"
                          "; use evaluate.teacher=reference") from None


def load_teacher(cfg: Config, num_classes: int) -> nn.Module:
    """The evaluation's teacher, in eval mode (its weights read here: on the node that trains)."""
    e = cfg.evaluate
    if e.teacher == "reference":
        path = reference_path(cfg)
        if not path.exists():
            raise ConfigError(f"evaluate: labels={e.labels} needs the run's reference model at {path}: set cache= to "
                              "the cache the run used")
        return load_classifier(new_classifier(cfg, "reference", num_classes), path)[0]
    check_teacher(cfg)
    name, _, weights = e.teacher.partition("@")
    try:
        model = timm.create_model(name, pretrained=not weights, num_classes=1000)
    except Exception as err:  # no hub (offline, no credentials), a name without pretrained weights
        raise ConfigError(f"evaluate: the teacher {name} could not be loaded from the hub ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); give its weights as evaluate.teacher={name}@FILE.safetensors"
                          ) from None
    if weights:
        try:
            model.load_state_dict(load(as_location(weights).read_bytes()))
        except RuntimeError as err:
            raise ConfigError(f"evaluate: {weights} does not hold {name}'s weights ({str(err).splitlines()[0][:200]})"
                              ) from None
    return ImageNetTeacher(model, imagenet_indices(cfg.data)).eval().requires_grad_(False)
