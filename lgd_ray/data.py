"""Real labelled image sets with explicit train/test splits: digits, Fashion-MNIST (idx), ImageNet (ImageFolder).

Small sets load whole into memory as uint8 tensors (N, C, H, W); ImageNet reads files lazily.
Label index = position in the class list, never directory order.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lgd_ray.config import ConfigError, DataConfig

CLASSLIST_DIR = Path(__file__).resolve().parent / "classlists"
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DIGITS_TRAIN = 1347  # digits has no official split: the first 1347 images (sklearn order) train, the last 450 test
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


@dataclass
class TensorSet(torch.utils.data.Dataset):
    """An in-memory labelled set: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class ImageFolderSet(torch.utils.data.Dataset):
    """ImageFolder layout (root/<wnid>/*.JPEG) read lazily, resized (short side) and centre-cropped to size."""

    def __init__(self, root: Path, wnids: list[str], image_size: int):
        self.image_size = image_size
        self.num_classes = len(wnids)
        check_classes_present(root, wnids)
        self.files = [
            (p, label)
            for label, wnid in enumerate(wnids)
            for p in sorted((root / wnid).iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
        self.labels = torch.tensor([label for _, label in self.files], dtype=torch.int64)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            s = self.image_size / min(im.size)
            im = im.resize((max(self.image_size, round(im.width * s)), max(self.image_size, round(im.height * s))), Image.BICUBIC)
            left, top = (im.width - self.image_size) // 2, (im.height - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), torch.tensor(label)


def check_classes_present(root: Path, wnids: list[str]):
    """Every class of the list must have its folder under root."""
    missing = [w for w in wnids if not (root / w).is_dir()]
    if missing:
        raise ConfigError(f"data: {len(missing)} classes of the class list are missing under {root} (first: {missing[0]})")


def read_idx(path: Path) -> np.ndarray:
    """Read an idx (optionally .gz) file of unsigned bytes into an array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {zero:#x} {dtype:#x})")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: holds {data.size} bytes, header says {shape}")
    return data.reshape(shape)


def read_classlist(name_or_path: str) -> list[str]:
    """Wnids of a class list: imagenette | imagewoof | imagenet1k, or a text file with one wnid a line."""
    path = CLASSLIST_DIR / f"{name_or_path}.txt"
    if not path.exists():
        path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CLASSLIST_DIR.glob("*.txt")))
        raise ConfigError(f"config: 'data.classes' = {name_or_path!r} is neither a known list ({known}) nor a file")
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise ConfigError(f"data: class list {path} repeats a class")
    return wnids


def _idx_file(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise ConfigError(
        f"data: no {stem}[.gz] in {root}; run `apt-get install dataset-fashion-mnist` or set data.root=DIR"
    )


def check_data(cfg: DataConfig):
    """Fail fast, with one line, when the data set is not where the config says."""
    if cfg.name == "fashion-mnist":
        root = Path(cfg.root or FASHION_MNIST_DEFAULT)
        for split in FASHION_MNIST_FILES.values():
            for stem in split:
                _idx_file(root, stem)
    elif cfg.name == "imagenet":
        wnids = read_classlist(cfg.classes)
        for split in (cfg.train_split, cfg.test_split):
            d = Path(cfg.root) / split
            if not d.is_dir():
                raise ConfigError(f"data: no folder {d} (data.root must hold {cfg.train_split}/ and {cfg.test_split}/)")
            check_classes_present(d, wnids)


def num_classes(cfg: DataConfig) -> int:
    return len(read_classlist(cfg.classes)) if cfg.name == "imagenet" else 10


def load_split(cfg: DataConfig, split: str) -> torch.utils.data.Dataset:
    """The real `train` or `test` split of the configured data set."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]
        sl = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
        return _tensor_set(images[sl], d.target[sl], 10, cfg.image_size)
    if cfg.name == "fashion-mnist":
        root = Path(cfg.root or FASHION_MNIST_DEFAULT)
        image_stem, label_stem = FASHION_MNIST_FILES[split]
        images = read_idx(_idx_file(root, image_stem))[:, None]
        labels = read_idx(_idx_file(root, label_stem))
        return _tensor_set(images, labels, 10, cfg.image_size)
    folder = cfg.train_split if split == "train" else cfg.test_split
    return ImageFolderSet(Path(cfg.root) / folder, read_classlist(cfg.classes), cfg.image_size)


def _tensor_set(images: np.ndarray, labels: np.ndarray, n_classes: int, size: int) -> TensorSet:
    x = torch.from_numpy(np.array(images, copy=True))
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return TensorSet(x, torch.from_numpy(labels.astype(np.int64)), n_classes)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the convention of every model here."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def as_tensor_set(ds: torch.utils.data.Dataset, batch_size: int = 256) -> TensorSet:
    """Materialise any labelled set in memory (small sets are returned as they are)."""
    if isinstance(ds, TensorSet):
        return ds
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=0)
    xs, ys = zip(*loader)
    return TensorSet(torch.cat(xs), torch.cat(ys), ds.num_classes)
