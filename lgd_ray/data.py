"""Real labelled image sets with explicit train/test splits: digits, Fashion-MNIST (idx), ImageNet (ImageFolder).

Small sets load whole into memory as uint8 tensors (N, C, H, W); ImageNet reads files lazily, or the uint8 shards
made once by `python -m lgd_ray.prepare`. Roots are paths or store URIs (lgd_ray.storage).
Label index = position in the class list, never directory order.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from lgd_ray.config import ConfigError, DataConfig
from lgd_ray.storage import Location

CLASSLIST_DIR = Path(__file__).resolve().parent / "classlists"
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DIGITS_TRAIN = 1347  # digits has no official split: the first 1347 images (sklearn order) train, the last 450 test
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
PREPARED_INDEX = "index.json"  # written last by `prepare`: its presence means every shard is there
BAD_IMAGES = "bad_images.txt"  # beside the index: the files prepare skipped (prepare.bad_images=skip)
Choose = Callable[[int], list[int]]  # class_images: given a class's n images, the positions (0..n-1) to read


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

    def class_images(self, c: int, size: int, choose: Choose) -> tuple[list[int], torch.Tensor]:
        """Class c's images chosen by `choose` (positions among them, in index order) at `size` px: (indices, uint8)."""
        idx = _class_members(self.labels, c, choose)
        return idx, resize_uint8(self.images[idx], size)


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Image file bytes -> uint8 (3, size, size): short side resized to `size` (bicubic), centre crop.

    JPEGs are decoded at the smallest DCT scale that still covers `size` (PIL's draft): 2-4x faster on large photos.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
        s = size / min(im.size)
        im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def image_files(root: Location, wnids: list[str]) -> list[tuple[Location, int]]:
    """(file, label) of an ImageFolder tree (root/<wnid>/*.JPEG), label = position of the wnid in the class list."""
    check_classes_present(root, wnids)
    return [(f, label) for label, wnid in enumerate(wnids) for f in (root / wnid).files()
            if Path(f.name).suffix.lower() in IMAGE_SUFFIXES]


class ImageFolderSet(torch.utils.data.Dataset):
    """ImageFolder layout (root/<wnid>/*.JPEG, a folder or a store URI) read lazily, at `image_size` (decode_image)."""

    def __init__(self, root: Location, wnids: list[str], image_size: int):
        self.image_size = image_size
        self.num_classes = len(wnids)
        self.files = image_files(root, wnids)
        self.labels = torch.tensor([label for _, label in self.files], dtype=torch.int64)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        loc, label = self.files[i]
        return decode_image(loc.read_bytes(), self.image_size), torch.tensor(label)

    def class_images(self, c: int, size: int, choose: Choose) -> tuple[list[int], torch.Tensor]:
        """Class c's images chosen by `choose`, decoded from their files at `size` px: (indices, uint8)."""
        idx = _class_members(self.labels, c, choose)
        return idx, torch.stack([decode_image(self.files[i][0].read_bytes(), size) for i in idx])


class PreparedSplit(torch.utils.data.Dataset):
    """A split prepared by `python -m lgd_ray.prepare`: uint8 shards (N, C, H, W) in a seeded random order.

    Items are read shard by shard (the last shard is kept); `share(rank, world)` reads only the shards holding one
    rank's contiguous, equal share, so every DDP rank gets the same number of images.
    """

    def __init__(self, root: Location, split: str, index: dict):
        self.root, self.split = root, split
        self.by_class = index.get("by_class", {})  # str(size) -> the class-sorted copy of train at that size
        part = index["splits"][split]
        self.shards = part["shards"]
        self.num_classes = len(index["classes"])
        self.offsets = np.cumsum([0] + [s["count"] for s in self.shards])
        self.labels = torch.from_numpy(np.load(io.BytesIO((root / part["labels"]).read_bytes())))
        self._cached = (-1, None)
        self._verified: set[str] = set()

    def __len__(self):
        return int(self.offsets[-1])

    def _read(self, row: dict) -> bytes:
        """An object of the index, its sha256 checked on this process's first read of it."""
        data = (self.root / row["path"]).read_bytes()
        if row["path"] not in self._verified:
            found = hashlib.sha256(data).hexdigest()
            if found != row["sha256"]:
                raise ConfigError(f"data: {self.root / row['path']} has sha256 {found[:12]}, not the "
                                  f"{row['sha256'][:12]} of {self.root / PREPARED_INDEX}: the prepared set is damaged; "
                                  "run prepare again")
            self._verified.add(row["path"])
        return data

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached[0] != k:
            with np.load(io.BytesIO(self._read(self.shards[k]))) as z:
                self._cached = (k, (z["images"], z["labels"]))
        return self._cached[1]

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        images, labels = self._shard(k)
        return torch.from_numpy(images[i - self.offsets[k]].copy()), torch.tensor(int(labels[i - self.offsets[k]]))

    def share(self, rank: int = 0, world: int = 1) -> TensorSet:
        """Rows [rank * n, (rank + 1) * n) with n = len // world, in memory."""
        per = len(self) // world
        return self.rows(rank * per, (rank + 1) * per)

    def rows(self, lo: int, hi: int) -> TensorSet:
        """Rows [lo, hi), in memory (only the shards that hold them are read)."""
        parts = []
        for k in range(len(self.shards)):
            a, b = max(lo, self.offsets[k]), min(hi, self.offsets[k + 1])
            if a < b:
                images, labels = self._shard(k)
                parts.append((images[a - self.offsets[k]:b - self.offsets[k]], labels[a - self.offsets[k]:b - self.offsets[k]]))
        return TensorSet(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                         torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64)), self.num_classes)

    def require_by_class(self, size: int):
        """A missing class-sorted copy at `size` px is one line naming the command that makes it."""
        if self.split != "train" or str(size) not in self.by_class:
            have = ", ".join(f"{s} px" for s in self.by_class) or "none"
            raise ConfigError(f"data: {self.root} has no class-sorted copy of train at {size} px (has: {have}); make it: "
                              f"`python -m lgd_ray.prepare CONFIG data.prepared={self.root} --by-class {size}`")

    def class_images(self, c: int, size: int, choose: Choose) -> tuple[list[int], torch.Tensor]:
        """Class c's images chosen by `choose`, read from the class's one object in the copy at `size` px (made by
        `prepare --by-class SIZE`): (indices in this split, uint8)."""
        self.require_by_class(size)
        with np.load(io.BytesIO(self._read(self.by_class[str(size)]["shards"][c]))) as z:
            pos = choose(len(z["index"]))
            return z["index"][pos].tolist(), torch.from_numpy(z["images"][pos])


def by_class_name(c: int) -> str:
    return f"c{c:05d}.npz"


def _class_members(labels: torch.Tensor, c: int, choose: Choose) -> list[int]:
    idx = (labels == c).nonzero().squeeze(1)
    return idx[choose(len(idx))].tolist()


def root_relative(index: dict) -> dict:
    """A prepared index with every object's path relative to data.prepared (indexes written before generation
    folders named them relative to their split's folder)."""
    if index.get("layout") == "root-relative":
        return index
    for split, part in index.get("splits", {}).items():
        part["labels"] = f"{split}/labels.npy"
        for row in part["shards"]:
            row["path"] = f"{split}/{row['path']}"
    for size, part in index.get("by_class", {}).items():
        for row in part["shards"]:
            row["path"] = f"by-class-{size}px/{row['path']}"
    return {**index, "layout": "root-relative"}


def open_prepared(cfg: DataConfig, split: str) -> PreparedSplit:
    """The prepared split of the config's class list and image size (refused if it was made for others)."""
    root = Location(cfg.prepared)
    index_loc = root / PREPARED_INDEX
    if not index_loc.exists():
        raise ConfigError(f"data: no prepared data at {root} (no {PREPARED_INDEX}); make it with "
                          f"`python -m lgd_ray.prepare CONFIG data.prepared={root}`")
    try:
        index = root_relative(json.loads(index_loc.read_text()))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"data: {index_loc} is damaged ({type(e).__name__}: {e}); run prepare again") from None
    if index["image_size"] != cfg.image_size or index["classes"] != read_classlist(cfg.classes):
        raise ConfigError(f"data: {root} was prepared for {len(index['classes'])} classes at {index['image_size']} px, "
                          f"the config asks {num_classes(cfg)} classes at {cfg.image_size} px: run prepare again")
    return PreparedSplit(root, split, index)


def check_classes_present(root: Location, wnids: list[str]):
    """Every class of the list must have its folder under root."""
    present = {c.name for c in root.iterdir()}
    missing = [w for w in wnids if w not in present]
    if missing:
        raise ConfigError(f"data: {len(missing)} classes of the class list are missing under {root} (first: {missing[0]})")


def read_idx(loc: Location) -> np.ndarray:
    """Read an idx (optionally .gz) file of unsigned bytes into an array of its stored shape."""
    raw = loc.read_bytes()
    if loc.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{loc}: not an idx file of unsigned bytes (magic {zero:#x} {dtype:#x})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{loc}: holds {data.size} bytes, header says {shape}")
    return data.reshape(shape)


def read_classlist(name_or_path: str) -> list[str]:
    """Wnids of a class list: imagenette | imagewoof | imagenet1k, or a text file with one wnid a line."""
    path = CLASSLIST_DIR / f"{name_or_path}.txt"
    if not path.exists():
        path = Path(name_or_path)
    known = ", ".join(sorted(p.stem for p in CLASSLIST_DIR.glob("*.txt")))
    if not path.exists():
        raise ConfigError(f"config: 'data.classes' = {name_or_path!r} is neither a known list ({known}) nor a file")
    if path.is_dir():
        raise ConfigError(f"config: 'data.classes' = {name_or_path!r} is a folder; give a text file of class folder "
                          f"names, one a line, or a known list ({known})")
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise ConfigError(f"data: class list {path} repeats a class")
    return wnids


def imagenet_indices(data: DataConfig) -> list[int]:
    """Each class's ImageNet-1K index, for a folder data set of ImageNet classes (data.classes wnids); a one-line
    ConfigError for any other data set."""
    imagenet = read_classlist("imagenet1k")
    classes = read_classlist(data.classes) if data.name == "folder" else []
    unknown = [c for c in classes if c not in imagenet]
    if not classes or unknown:
        raise ConfigError(f"config: data.classes of {data.name}: " + (
            f"{len(unknown)} not ImageNet wnids (first: {unknown[0]})" if unknown else "not a list of ImageNet wnids"))
    return [imagenet.index(w) for w in classes]


def _idx_file(root: Location, stem: str) -> Location:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise ConfigError(
        f"data: no {stem}[.gz] in {root}; run `apt-get install dataset-fashion-mnist` or set data.root=DIR"
    )


def check_data(cfg: DataConfig):
    """Fail fast, with one line, when the data set is not where the config says."""
    if cfg.name == "fashion-mnist":
        root = Location(cfg.root or FASHION_MNIST_DEFAULT)
        for split in FASHION_MNIST_FILES.values():
            for stem in split:
                _idx_file(root, stem)
    elif cfg.name == "folder" and cfg.prepared:
        open_prepared(cfg, "test")
    elif cfg.name == "folder":
        wnids = read_classlist(cfg.classes)
        for split in (cfg.train_split, cfg.test_split):
            d = Location(cfg.root) / split
            if not d.is_dir():
                raise ConfigError(f"data: no folder {d} (data.root must hold {cfg.train_split}/ and {cfg.test_split}/)")
            check_classes_present(d, wnids)


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def class_names(cfg: DataConfig) -> list[str]:
    """The name of each label, in label order: a folder data set's class list (its folder names), else the set's own."""
    if cfg.name == "folder":
        return read_classlist(cfg.classes)
    return FASHION_MNIST_CLASSES if cfg.name == "fashion-mnist" else [str(d) for d in range(10)]


def class_chunks(n_classes: int, per_chunk: int) -> list[tuple[int, ...]]:
    """Classes 0..n-1 cut into consecutive chunks of `per_chunk` (the last may be shorter): every class once."""
    return [tuple(range(i, min(i + per_chunk, n_classes))) for i in range(0, n_classes, per_chunk)]


def num_classes(cfg: DataConfig) -> int:
    return len(class_names(cfg))


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
        root = Location(cfg.root or FASHION_MNIST_DEFAULT)
        image_stem, label_stem = FASHION_MNIST_FILES[split]
        images = read_idx(_idx_file(root, image_stem))[:, None]
        labels = read_idx(_idx_file(root, label_stem))
        return _tensor_set(images, labels, 10, cfg.image_size)
    if cfg.prepared:  # the test split is small enough to hold in memory; train is read by share (PreparedSplit)
        prepared = open_prepared(cfg, split)
        return prepared.share() if split == "test" else prepared
    folder = cfg.train_split if split == "train" else cfg.test_split
    return ImageFolderSet(Location(cfg.root) / folder, read_classlist(cfg.classes), cfg.image_size)


def split_size(cfg: DataConfig, split: str) -> int:
    """Images in a split, without decoding a folder's or a prepared set's images (its listing or its index)."""
    if cfg.prepared and cfg.name not in ("digits", "fashion-mnist"):
        return len(open_prepared(cfg, split))
    return len(load_split(cfg, split))


def _tensor_set(images: np.ndarray, labels: np.ndarray, n_classes: int, size: int) -> TensorSet:
    x = resize_uint8(torch.from_numpy(np.array(images, copy=True)), size)
    return TensorSet(x, torch.from_numpy(labels.astype(np.int64)), n_classes)


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, C, size, size), bilinear with antialiasing; unchanged when already that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


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
