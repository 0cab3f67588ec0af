"""`python -m lgd_ray.prepare CONFIG [key=value ...]`: an ImageFolder tree -> uint8 shards at data.image_size, once.

Under `data.prepared` (a folder or a store URI):

    train/shard-000000.npz   images uint8 (N, 3, S, S) and labels int64 (N,), the split's files in a seeded random order
    train/labels.npy         every label of the split, in shard order
    test/...                 the same for the test split (data.test_split)
    by-class-<P>px/c00000.npz one object per class: its train images at P px and their train indices (--by-class P)
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
from lgd_ray.data import PREPARED_INDEX, by_class_dir, by_class_name, decode_image, image_files, read_classlist
from lgd_ray.seeding import generator
from lgd_ray.storage import Location, as_location


def split_order(cfg: Config, split: str) -> list[tuple[str, int]]:
    """(file, label) of one split of the ImageFolder tree, in the split's seeded random order (the shards' order)."""
    folder = cfg.data.train_split if split == "train" else cfg.data.test_split
    classes = read_classlist(cfg.data.classes)
    files = image_files(as_location(cfg.data.root) / folder, classes)
    if not files:
        raise ConfigError(f"prepare: no image files under {as_location(cfg.data.root) / folder}")
    empty = sorted(set(range(len(classes))) - {y for _, y in files})
    if split == "train" and empty:  # a class the student and the reference would never see
        raise ConfigError(f"prepare: class {classes[empty[0]]} has no image files under "
                          f"{as_location(cfg.data.root) / folder / classes[empty[0]]} ({len(empty)} such classes); "
                          "add its images or drop it from data.classes")
    order = torch.randperm(len(files), generator=generator(cfg.seed, "prepare", split)).tolist()
    return [(str(files[i][0]), files[i][1]) for i in order]


def plan_shards(cfg: Config, split: str, files: list[tuple[str, int]], shard_images: int) -> list[dict]:
    """The shards of one split: its files (in the split's order) cut into runs of shard_images."""
    out_dir = as_location(cfg.data.prepared) / split
    return [{"split": split, "shard": k, "target": str(out_dir / f"shard-{k:06d}.npz"), "size": cfg.data.image_size,
             "files": [f for f, _ in files[i:i + shard_images]], "labels": [y for _, y in files[i:i + shard_images]]}
            for k, i in enumerate(range(0, len(files), shard_images))]


def plan_by_class(cfg: Config, files: list[tuple[str, int]], size: int, per_class: int) -> list[dict]:
    """The class-sorted copy of train (its files in train order) at `size` px: one object per class holding its images
    (the first `per_class` in train order, 0 = all) and their indices in the train split."""
    out_dir = by_class_dir(as_location(cfg.data.prepared), size)
    members = [[] for _ in read_classlist(cfg.data.classes)]
    for i, (_, y) in enumerate(files):
        members[y].append(i)
    items = []
    for c, index in enumerate(members):
        index = index[:per_class or None]
        items.append({"split": f"by-class-{size}", "shard": c, "target": str(out_dir / by_class_name(c)), "size": size,
                      "files": [files[i][0] for i in index], "labels": [c] * len(index), "index": index})
    return items


def decode_file(path: str, size: int) -> np.ndarray:
    """One image file at `size` px; a file that does not decode is one line naming it."""
    try:
        return decode_image(Location(path).read_bytes(), size).numpy()
    except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated or not an image (UnidentifiedImageError)
        raise ConfigError(f"prepare: cannot decode {path} ({str(e).splitlines()[0]}); remove or replace the file") \
            from None


def make_shard(item: dict) -> dict:
    """Decode and resize one shard's files, write it as one object; returns its index row."""
    images = np.stack([decode_file(f, item["size"]) for f in item["files"]])
    buf = io.BytesIO()
    arrays = {"images": images, "labels": np.asarray(item["labels"], dtype=np.int64)}
    if "index" in item:
        arrays["index"] = np.asarray(item["index"], dtype=np.int64)
    np.savez(buf, **arrays)
    data = buf.getvalue()
    Location(item["target"]).write_bytes(data)
    return {"split": item["split"], "shard": item["shard"], "path": Location(item["target"]).name,
            "count": len(images), "sha256": hashlib.sha256(data).hexdigest()}


def _made_for(index: dict, cfg: Config) -> bool:
    """Whether an existing index holds the shards this config would make (same source, classes, size and seed)."""
    return (index.get("source"), index.get("classes"), index.get("image_size"), index.get("seed")) == (
        str(as_location(cfg.data.root)), read_classlist(cfg.data.classes), cfg.data.image_size, cfg.seed)


def prepare(cfg: Config, shard_images: int = 1000, by_class: tuple[int, ...] = (), per_class: int = 0) -> dict:
    """Prepare both splits of the config's ImageFolder data set, and the class-sorted copies of train at the sizes
    `by_class` (what methods random, dds and mgd3 read); returns the index (also written to index.json).

    Parts an existing index already holds for the same source, classes, size and seed are kept, not made again.
    """
    d = cfg.data
    if d.name != "folder" or not d.root or not d.prepared:
        raise ConfigError("prepare: needs data.name=folder with data.root (the ImageFolder tree) and data.prepared "
                          "(where the shards go)")
    start = time.time()
    root = as_location(d.prepared)
    old = json.loads((root / PREPARED_INDEX).read_text()) if (root / PREPARED_INDEX).exists() else {}
    keep = _made_for(old, cfg)
    have = old.get("by_class", {}) if keep else {}
    sizes = [s for s in by_class if have.get(str(s), {}).get("per_class") != per_class]
    train = split_order(cfg, "train") if sizes or not keep else []
    items = [] if keep else plan_shards(cfg, "train", train, shard_images) + plan_shards(
        cfg, "test", split_order(cfg, "test"), shard_images)
    for size in sizes:
        items += plan_by_class(cfg, train, size, per_class)
    n_images = sum(len(i["files"]) for i in items)
    print(f"prepare: {n_images} images of {d.root} in {len(items)} objects at {d.image_size} px"
          + (f" and class-sorted at {', '.join(map(str, by_class))} px" if by_class else "") + f" -> {d.prepared}"
          + (" (the splits are already there)" if keep else ""), flush=True)
    if not items:
        return old
    if cfg.ray.enabled:
        # the Ray layer only when Ray is on: a ray.enabled=false run never imports ray
        import ray

        from lgd_ray.cluster import connect, remote_cause

        connect(cfg)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        try:
            rows = ds.map(make_shard, num_cpus=1).take_all()  # a task per object, one decoding thread each
        except Exception as e:  # Ray Data wraps the task's error: a bad file is still one line
            cause = remote_cause(e, ConfigError)
            if cause is None:
                raise
            raise ConfigError(str(cause)) from None
    else:
        rows = [make_shard(i) for i in tqdm(items, desc="prepare", disable=None)]
    index = old if keep else {"classes": read_classlist(d.classes), "image_size": d.image_size,
                              "source": str(as_location(d.root)), "seed": cfg.seed, "splits": {}}
    for split in () if keep else ("train", "test"):
        mine = sorted((r for r in rows if r["split"] == split), key=lambda r: r["shard"])
        labels = np.concatenate([np.asarray(i["labels"], dtype=np.int64)
                                 for i in sorted((i for i in items if i["split"] == split), key=lambda i: i["shard"])])
        buf = io.BytesIO()
        np.save(buf, labels)
        (root / split / "labels.npy").write_bytes(buf.getvalue())
        index["splits"][split] = {"count": int(len(labels)), "shards": [
            {k: r[k] for k in ("path", "count", "sha256")} for r in mine]}
    index["by_class"] = dict(have)
    for size in by_class:
        mine = sorted((r for r in rows if r["split"] == f"by-class-{size}"), key=lambda r: r["shard"])
        if mine:
            index["by_class"][str(size)] = {"per_class": per_class, "count": sum(r["count"] for r in mine), "shards": [
                {k: r[k] for k in ("path", "count", "sha256")} for r in mine]}
    seconds = time.time() - start
    index["seconds"] = round(seconds, 1)
    (root / PREPARED_INDEX).write_text(json.dumps(index, indent=1))  # last: its presence means the shards are complete
    print(f"prepare: {n_images} images in {seconds:.1f} s ({n_images / seconds:.1f} images/s) -> {root}", flush=True)
    return index


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def main(argv: list[str]):
    def flags(parser: argparse.ArgumentParser):
        parser.add_argument("--shard-images", type=positive, default=1000, help="images per shard (default 1000)")
        parser.add_argument("--by-class", type=int, nargs="*", default=[], metavar="SIZE",
                            help="also write a class-sorted copy of train at each SIZE px: method random reads it at "
                                 "data.image_size, dds and mgd3 at the prior's resolution (256 for DiT-XL/2-256)")
        parser.add_argument("--per-class", type=int, default=0, help="images per class in those copies (0 = all)")

    run_cli("lgd_ray.prepare", "Decode an ImageFolder data set once into uint8 shards (Ray Data).", argv,
            lambda cfg, args: prepare(cfg, args.shard_images, tuple(args.by_class), args.per_class), flags)


if __name__ == "__main__":
    main(sys.argv[1:])
