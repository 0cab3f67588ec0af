import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lgd_ray.config import ConfigError, DataConfig
from lgd_ray.data import check_data, load_split, read_classlist, read_idx
from lgd_ray.storage import Location


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_plain_and_gz(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        _write_idx(tmp_path / name, arr)
        assert np.array_equal(read_idx(Location(str(tmp_path / name))), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(Location(str(tmp_path / "bad")))


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("t10k", 7)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path), image_size=28)
    check_data(cfg)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 7 and test.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), read_idx(Location(str(tmp_path / "train-images-idx3-ubyte.gz"))))


def test_digits_split_is_explicit_and_disjoint():
    cfg = DataConfig(name="digits", image_size=8)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(train) == 1347 and len(test) == 450 and train.images.shape[1:] == (1, 8, 8)
    assert int(train.images.max()) == 255 and set(test.labels.tolist()) == set(range(10))


def _imagefolder(root, wnids, per_class=2):
    for split in ("train", "val"):
        for i, w in enumerate(wnids):
            (root / split / w).mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", (20 + j, 16), (10 * i, 5 * j, 0)).save(root / split / w / f"{w}_{j}.JPEG", quality=95)


def test_imagefolder_labels_follow_the_class_list(tmp_path):
    wnids = ["n03888257", "n01440764", "n02102040"]  # not sorted: label = position in the list
    _imagefolder(tmp_path / "data", wnids + ["n09999999"])  # an extra class on disk is ignored
    (tmp_path / "classes.txt").write_text("\n".join(wnids) + "\n")
    cfg = DataConfig(name="folder", root=str(tmp_path / "data"), classes=str(tmp_path / "classes.txt"), image_size=8)
    check_data(cfg)
    train = load_split(cfg, "train")
    assert len(train) == 6 and train.num_classes == 3
    x, y = train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    assert [int(train[i][1]) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert all(wnids[lab] in str(path) for path, lab in train.files)
    assert int(train[2][0][0, 4, 4]) == 10  # label 1 is n01440764: the second folder made, drawn with red 10


def test_imagefolder_missing_class_is_an_error(tmp_path):
    _imagefolder(tmp_path / "data", ["n01440764"])
    (tmp_path / "classes.txt").write_text("n01440764\nn02102040\n")
    cfg = DataConfig(name="folder", root=str(tmp_path / "data"), classes=str(tmp_path / "classes.txt"))
    with pytest.raises(ConfigError, match="1 classes of the class list are missing.*n02102040"):
        check_data(cfg)


def test_shipped_class_lists():
    imagenet = read_classlist("imagenet1k")
    assert len(imagenet) == 1000 == len(set(imagenet)) and imagenet[0] == "n01440764"
    for name in ("imagenette", "imagewoof"):
        subset = read_classlist(name)
        assert len(subset) == 10 and set(subset) <= set(imagenet)
    with pytest.raises(ConfigError, match="neither a known list"):
        read_classlist("imagenet2k")
