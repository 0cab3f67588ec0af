"""`python -m lgd_ray.prepare CONFIG [key=value ...]`: an ImageFolder tree -> uint8 shards at data.image_size, once.

Under `data.prepared` (a folder or a store URI):

    train/shard-000000.npz   images uint8 (N, 3, S, S) and labels int64 (N,), the split's files in a seeded random order
    train/labels.npy         every label of the split, in shard order
    test/...                 the same for the test split (data.test_split)
    index.json               classes, image size, per split the shards (path, count, sha256); written last

Decoding runs as a Ray Data pipeline across the cluster, one task per shard (read the files, decode, resize, write one
object); without Ray (`ray.enabled=false`) the shards are made one by one here. Afterwards reference training,
evaluation and the per-stage tests read the shards (`data.prepared=...`), each Ray Train rank only its share.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from lgd_ray.cli import run_cli
from lgd_ray.config import Config, ConfigError
from lgd_ray.data import PREPARED_INDEX, decode_image, image_files, read_classlist
from lgd_ray.seeding import generator
from lgd_ray.storage import Location, as_location


def plan_shards(cfg: Config, split: str, shard_images: int) -> list[dict]:
    """The shards of one split: the ImageFolder's files in a seeded random order, cut into runs of shard_images."""
    folder = cfg.data.train_split if split == "train" else cfg.data.test_split
    files = image_files(as_location(cfg.data.root) / folder, read_classlist(cfg.data.classes))
    if not files:
        raise ConfigError(f"prepare: no image files under {as_location(cfg.data.root) / folder}")
    order = torch.randperm(len(files), generator=generator(cfg.seed, "prepare", split)).tolist()
    out_dir = as_location(cfg.data.prepared) / split
    return [{"split": split, "shard": k, "target": str(out_dir / f"shard-{k:06d}.npz"), "size": cfg.data.image_size,
             "files": [str(files[i][0]) for i in chunk], "labels": [files[i][1] for i in chunk]}
            for k, chunk in enumerate(order[i:i + shard_images] for i in range(0, len(order), shard_images))]


def make_shard(item: dict) -> dict:
    """Decode and resize one shard's files, write it as one object; returns its index row."""
    images = np.stack([decode_image(Location(f).read_bytes(), item["size"]).numpy() for f in item["files"]])
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=np.asarray(item["labels"], dtype=np.int64))
    data = buf.getvalue()
    Location(item["target"]).write_bytes(data)
    return {"split": item["split"], "shard": item["shard"], "path": Location(item["target"]).name,
            "count": len(images), "sha256": hashlib.sha256(data).hexdigest()}


def prepare(cfg: Config, shard_images: int = 1000) -> dict:
    """Prepare both splits of the config's ImageFolder data set; returns the index (also written to index.json)."""
    d = cfg.data
    if d.name != "imagenet" or not d.root or not d.prepared:
        raise ConfigError("prepare: needs data.name=imagenet with data.root (the ImageFolder tree) and data.prepared "
                          "(where the shards go)")
    start = time.time()
    items = plan_shards(cfg, "train", shard_images) + plan_shards(cfg, "test", shard_images)
    n_images = sum(len(i["files"]) for i in items)
    print(f"prepare: {n_images} images of {d.root} in {len(items)} shards at {d.image_size} px -> {d.prepared}", flush=True)
    if cfg.ray.enabled:
        import ray

        if not ray.is_initialized():
            ray.init(address=cfg.ray.address or None)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        rows = ds.map(make_shard, num_cpus=1).take_all()  # a task per shard, one decoding thread each
    else:
        rows = [make_shard(i) for i in tqdm(items, desc="prepare", disable=None)]
    root = as_location(d.prepared)
    index = {"classes": read_classlist(d.classes), "image_size": d.image_size, "source": str(as_location(d.root)),
             "seed": cfg.seed, "splits": {}}
    for split in ("train", "test"):
        mine = sorted((r for r in rows if r["split"] == split), key=lambda r: r["shard"])
        labels = np.concatenate([np.asarray(i["labels"], dtype=np.int64)
                                 for i in sorted((i for i in items if i["split"] == split), key=lambda i: i["shard"])])
        buf = io.BytesIO()
        np.save(buf, labels)
        (root / split / "labels.npy").write_bytes(buf.getvalue())
        index["splits"][split] = {"count": int(len(labels)), "shards": [
            {k: r[k] for k in ("path", "count", "sha256")} for r in mine]}
    seconds = time.time() - start
    index["seconds"] = round(seconds, 1)
    (root / PREPARED_INDEX).write_text(json.dumps(index, indent=1))  # last: its presence means the shards are complete
    print(f"prepare: {n_images} images in {seconds:.1f} s ({n_images / seconds:.1f} images/s) -> {root}", flush=True)
    return index


def main(argv: list[str]):
    def flags(parser: argparse.ArgumentParser):
        parser.add_argument("--shard-images", type=int, default=1000, help="images per shard (default 1000)")

    run_cli("lgd_ray.prepare", "Decode an ImageFolder data set once into uint8 shards (Ray Data).", argv,
            lambda cfg, args: prepare(cfg, args.shard_images), flags)


if __name__ == "__main__":
    main(sys.argv[1:])
