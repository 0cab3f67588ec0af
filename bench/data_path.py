"""Measure 7: ImageNet-style data at scale. `prepare` throughput (images/s) on 1 and 2 cores, and the reference fit's
data path: images/s fed to the model from JPEG files (decode + resize per epoch) vs from prepared uint8 shards.

    python bench/data_path.py [IMAGES] [SIZE]      (default 1000 JPEGs of 500x375 in 10 classes, prepared at 128 px)

The JPEGs are smooth random images of ImageNet's median size (upsampled noise: they compress and decode faster than
real photos, so the JPEG side is an upper bound), written once to a temporary folder.
The prepared side includes reading the shards from disk (PreparedSplit.share), then the same batches as the fit.
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from lgd_ray.config import load_config
from lgd_ray.data import load_split
from lgd_ray.prepare import prepare
from lgd_ray.train import batches
from parts import machine

WNIDS = [f"n{i:08d}" for i in range(10)]
SHARD = 500  # images per shard (the command's default is 1000)


def warm_worker(row: dict) -> dict:
    import lgd_ray.prepare  # noqa: F401  (torch, PIL and the package imported once per worker, as in a long run)

    return row


def write_jpegs(root: Path, n: int):
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(10, n // 10))):
        for i in range(count):
            w = WNIDS[i % len(WNIDS)]
            (root / split / w).mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # upsampled: JPEG sizes like photos'
            Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(root / split / w / f"{i}.JPEG", quality=90)


def feed_rate(data, batch_size: int = 256) -> float:
    """Images/s of one epoch of the fit's batches (no model)."""
    start, n = time.time(), 0
    for x, _ in batches(data, batch_size, torch.Generator().manual_seed(0), torch.device("cpu"), shuffle=True):
        n += len(x)
    return n / (time.time() - start)


def main(n: int, size: int):
    print(f"measure 7: data path, {n} JPEGs 500x375 -> {size} px; {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        root, classes = Path(tmp) / "data", Path(tmp) / "classes.txt"
        write_jpegs(root, n)
        classes.write_text("\n".join(WNIDS))
        keys = [f"data.root={root}", f"data.classes={classes}", f"data.image_size={size}"]
        rates = {}
        for cores in (0, 1, 2):  # 0: without Ray, shard after shard in this process
            if cores:  # warm-up: Ray Data started and its workers' imports done before the timed run
                ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
                ray.data.range(cores, override_num_blocks=cores).map(warm_worker, num_cpus=1).take_all()
            cfg = load_config("imagenette", keys + [f"data.prepared={tmp}/prepared{cores}", f"ray.enabled={bool(cores)}"])
            index = prepare(cfg, shard_images=SHARD)
            ray.shutdown()
            rates[cores] = (index["splits"]["train"]["count"] + index["splits"]["test"]["count"]) / index["seconds"]
        print(f"prepare (shards of {SHARD}, after a warm-up; the listing included): in-process {rates[0]:.1f} images/s; "
              f"Ray Data 1 core {rates[1]:.1f} images/s, 2 cores {rates[2]:.1f} images/s ({rates[2] / rates[1]:.2f}x)")
        jpeg = load_split(load_config("imagenette", keys).data, "train")
        start = time.time()
        prepared = load_split(load_config("imagenette", keys + [f"data.prepared={tmp}/prepared2"]).data, "train").share()
        read = time.time() - start
        a = feed_rate(jpeg)
        b = n / (read + n / feed_rate(prepared))
        print(f"reference-fit data path, one epoch (DataLoader with {min(8, torch.get_num_threads())} workers on JPEGs "
              f"vs shards read once + in-memory batches): JPEG {a:.1f} images/s, prepared {b:.0f} images/s "
              f"({b / a:.0f}x; shard read {read:.2f} s); later epochs of the prepared set: {feed_rate(prepared):.0f} images/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000, int(sys.argv[2]) if len(sys.argv) > 2 else 128)
