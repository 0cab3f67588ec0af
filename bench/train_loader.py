"""Measure 5: student training from in-memory tensors (lgd_ray.train) vs a per-file PNG loader, as the peers train.

    python bench/train_loader.py [CONFIG] [IPC] [EPOCHS]      (default fashion-mnist, IPC 50, 2 epochs)

The same IPC x classes real training images are written as PNG files in ImageFolder layout. The peers' way:
torchvision ImageFolder + RandomResizedCrop/flip/ToTensor/Normalize per image + DataLoader (2 workers). lgd_ray's
way: uint8 tensors in memory, batched crop/flip on the tensors. Same model, optimiser, batch size and epochs.
Prints the end-to-end ratio (goal >= 5x) and the ratio of the data paths alone (one epoch of batches, no model).
"""
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets, transforms

from lgd_ray.config import load_config
from lgd_ray.data import TensorSet, load_split
from lgd_ray.models import build_classifier
from lgd_ray.train import augment, batches, train_classifier
from parts import interleaved, machine, verdict

WORKERS = 2


def first_per_class(data: TensorSet, ipc: int) -> TensorSet:
    idx = torch.cat([(data.labels == c).nonzero().squeeze(1)[:ipc] for c in range(data.num_classes)])
    return TensorSet(data.images[idx], data.labels[idx], data.num_classes)


def write_pngs(data: TensorSet, root: Path):
    for i, (x, y) in enumerate(zip(data.images, data.labels.tolist())):
        (root / f"{y:04d}").mkdir(parents=True, exist_ok=True)
        arr = x.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(root / f"{y:04d}" / f"{i:06d}.png")


def peer_loader(root: Path, size: int, channels: int, t):
    tf = [transforms.Grayscale()] if channels == 1 else []
    tf += [transforms.RandomResizedCrop(size, scale=(t.crop_scale, 1.0))]
    tf += [transforms.RandomHorizontalFlip()] if t.flip else []
    tf += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transforms.Compose(tf)), batch_size=t.batch_size,
                                       shuffle=True, num_workers=WORKERS)


def peer_train(model, loader, t, epochs: int):
    """The peers' loop: per-file loader, SGD + MultiStepLR, cross-entropy."""
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, round(m * epochs)) for m in t.milestones], t.lr_decay)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()


def main(argv):
    name = argv[0] if argv else "fashion-mnist"
    ipc = int(argv[1]) if len(argv) > 1 else 50
    epochs = int(argv[2]) if len(argv) > 2 else 2
    cfg = load_config(name, [f"evaluate.train.epochs={epochs}"])
    t, d = cfg.evaluate.train, cfg.data
    data = first_per_class(load_split(d, "train"), ipc)
    model = lambda: build_classifier(cfg.student.model, d.channels, d.image_size, data.num_classes, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(data, Path(tmp))
        loader = peer_loader(Path(tmp), d.image_size, d.channels, t)
        gen = torch.Generator().manual_seed(0)
        data_only = interleaved({
            "in-memory": lambda: [augment(x, gen, t.crop_scale, t.flip) for x, _ in batches(data, t.batch_size, gen, "cpu", True)],
            "PNG files": lambda: list(loader)}, repeats=3)
        train = interleaved({
            "in-memory": lambda: train_classifier(model(), data, t, seed=0),
            "PNG files": lambda: peer_train(model(), loader, t, epochs)}, repeats=3)
    print(f"# measure 5: student training, in-memory tensors vs per-file PNG loader ({machine()})")
    print(f"{name}: {len(data)} images ({ipc} per class) at {d.image_size} px, {cfg.student.model}, batch {t.batch_size}, "
          f"{epochs} epochs; peers' DataLoader with {WORKERS} workers")
    for k in train:
        print(f"{k:>10}: training {train[k]:.2f} s, data path alone {1e3 * data_only[k]:.1f} ms/epoch (medians of 3)")
    print(f"training speed-up: {verdict(train['PNG files'] / train['in-memory'], 5.0)}")
    print(f"data path speed-up: {data_only['PNG files'] / data_only['in-memory']:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
