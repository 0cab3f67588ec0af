"""Classifiers by name: convnet<D> (ConvNet-D), resnetap10, resnet18 (timm, GroupNorm). Inputs in [-1, 1]."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn


def instance_norm(channels: int, **kwargs) -> nn.GroupNorm:
    """Instance norm with affine parameters, written as GroupNorm(C, C) as in the dataset-distillation papers."""
    return nn.GroupNorm(channels, channels, affine=True, **kwargs)


class ConvNet(nn.Module):
    """ConvNet-D: [conv3x3(width) -> instance norm -> ReLU -> AvgPool2] x depth -> linear."""

    def __init__(self, channels: int, image_size: int, num_classes: int, depth: int, width: int = 128):
        super().__init__()
        layers, c, size = [], channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), instance_norm(width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * size * size, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class BasicBlockAP(nn.Module):
    """ResNet basic block whose downsampling is an average pool instead of a strided convolution."""

    def __init__(self, c_in: int, c_out: int, downsample: bool):
        super().__init__()
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = instance_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = instance_norm(c_out)
        self.shortcut = nn.Identity()
        if downsample or c_in != c_out:
            self.shortcut = nn.Sequential(nn.AvgPool2d(2) if downsample else nn.Identity(),
                                          nn.Conv2d(c_in, c_out, 1, bias=False), instance_norm(c_out))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(self.pool(x))))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNetAP10(nn.Module):
    """ResNetAP-10: BasicBlocks [1, 1, 1, 1], width 64, instance norm, average-pool downsampling (IDC)."""

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 64):
        super().__init__()
        big = image_size >= 128  # ImageNet-sized inputs get the strided 7x7 stem + max pool
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 7 if big else 3, stride=2 if big else 1, padding=3 if big else 1, bias=False),
            instance_norm(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1) if big else nn.Identity())
        widths = [width, width * 2, width * 4, width * 8]
        blocks, c, size = [], width, image_size // 4 if big else image_size
        for i, w in enumerate(widths):
            down = i > 0 and size >= 4  # instance norm needs more than one value per channel: stop at 2x2
            blocks.append(BasicBlockAP(c, w, downsample=down))
            c, size = w, size // 2 if down else size
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def resnet18_gn(channels: int, image_size: int, num_classes: int) -> nn.Module:
    """timm ResNet-18 with instance-norm GroupNorm; small inputs get a 3x3 stride-1 stem and no max pool."""
    import timm  # here, not at the top: timm (with torchvision) adds ~1.4 s to every process that imports the config

    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=channels,
                              norm_layer=instance_norm)
    if image_size < 128:
        model.conv1 = nn.Conv2d(channels, 64, 3, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


# The classifier registry: name -> constructor(channels, image_size, num_classes)
CLASSIFIERS = {
    **{f"convnet{d}": partial(ConvNet, depth=d) for d in range(1, 10)},
    "resnetap10": ResNetAP10,
    "resnet18": resnet18_gn,
}


def check_model_name(name: str) -> str | None:
    """None if `name` is a known classifier, else what is allowed."""
    if name in CLASSIFIERS:
        return None
    return f"must be convnet<D> (D = 1..9), resnetap10 or resnet18, got {name!r}"


def check_model_input(name: str, image_size: int) -> str | None:
    """None if the classifier `name` takes images of image_size px, else why not (ConvNet-D halves them D times)."""
    depth = CLASSIFIERS[name].keywords["depth"] if name.startswith("convnet") else 0
    if image_size >> depth < 1:
        return f"{name} halves the image {depth} times: data.image_size {image_size} is too small (at least {1 << depth})"
    return None


def build_classifier(name: str, channels: int, image_size: int, num_classes: int, seed: int | None = None) -> nn.Module:
    """A freshly initialised classifier of the registry for inputs (N, channels, image_size, image_size).

    With `seed`, the initialisation draws from its own generator state (the global one is left as it was).
    """
    problem = check_model_name(name)
    if problem:
        raise ValueError(f"classifier {problem}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_classifier(name, channels, image_size, num_classes)
    problem = check_model_input(name, image_size)
    if problem:
        raise ValueError(problem)
    return CLASSIFIERS[name](channels, image_size, num_classes)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the model's last Linear layer (its feature vector) for a batch."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats = []
    handle = last.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].flatten(1)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return feats[0]
