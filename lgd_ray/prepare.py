"""`python -m lgd_ray.prepare CONFIG [key=value ...]`: an ImageFolder tree -> uint8 shards at data.image_size, once.

Under `data.prepared` (a folder or a store URI), each call's objects in a fresh generation folder `gen-<id>/`:

    gen-<id>/train/shard-000000.npz   images uint8 (N, 3, S, S) and labels int64 (N,), the split's files in a seeded
                                      random order
    gen-<id>/train/labels.npy         every label of the split, in shard order
    gen-<id>/test/...                 the same for the test split (data.test_split)
    gen-<id>/by-class-<P>px/c00000.npz one object per class: its train images at P px and their train indices
                                      (--by-class P)
    index.json                        classes, image size, per split the objects (path, count, sha256), the files
                                      skipped; written last, so a crash leaves the previous index and its objects whole
    bad_images.txt                    the files that did not decode, with prepare.bad_images=skip

Readers check each object's sha256 against the index when they first read it.

Decoding runs as a Ray Data pipeline across the cluster, one task per shard (read the files, decode, resize, write one
object); without Ray (`ray.enabled=false`) the shards are made one by one here. Afterwards reference training,
evaluation and the per-stage tests read the shards (`data.prepared=...`), each Ray Train rank only its share.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
import uuid
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lgd_ray.cli import run_cli
from lgd_ray.config import Config, ConfigError
from lgd_ray.data import (BAD_IMAGES, PREPARED_INDEX, by_class_name, decode_image, image_files, read_classlist,
                          root_relative)
from lgd_ray.errors import UserError
from lgd_ray.lease import cache_lock
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


def plan_shards(cfg: Config, gen: str, split: str, files: list[tuple[str, int]], shard_images: int) -> list[dict]:
    """The shards of one split: its files (in the split's order) cut into runs of shard_images."""
    return [{"split": split, "shard": k, "path": f"{gen}/{split}/shard-{k:06d}.npz", "size": cfg.data.image_size,
             "files": [f for f, _ in files[i:i + shard_images]], "labels": [y for _, y in files[i:i + shard_images]]}
            for k, i in enumerate(range(0, len(files), shard_images))]


def plan_by_class(cfg: Config, gen: str, files: list[tuple[str, int]], size: int, per_class: int) -> list[dict]:
    """The class-sorted copy of train (its files in train order) at `size` px: one object per class holding its images
    (the first `per_class` in train order, 0 = all) and their indices in the train split."""
    members = [[] for _ in read_classlist(cfg.data.classes)]
    for i, (_, y) in enumerate(files):
        members[y].append(i)
    items = []
    for c, index in enumerate(members):
        index = index[:per_class or None]
        items.append({"split": f"by-class-{size}", "shard": c, "path": f"{gen}/by-class-{size}px/{by_class_name(c)}",
                      "size": size, "files": [files[i][0] for i in index], "labels": [c] * len(index), "index": index})
    return items


def decode_file(path: str, size: int) -> np.ndarray:
    """One image file at `size` px; a file that does not decode is one line naming it."""
    try:
        return decode_image(Location(path).read_bytes(), size).numpy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL: truncated, not an image
        # (UnidentifiedImageError), or more pixels than PIL decodes (a decompression bomb)
        raise ConfigError(f"prepare: cannot decode {path} ({str(e).splitlines()[0]}); remove or replace the file, or "
                          "skip such files with prepare.bad_images=skip") from None


def make_shard(item: dict) -> dict:
    """Decode and resize one shard's files, write it as one object under item["root"]; returns its index row (with
    the labels it holds and the files skipped when item["skip"]: those that do not decode)."""
    images, labels, index, skipped = [], [], [], []
    for k, f in enumerate(item["files"]):
        try:
            images.append(decode_file(f, item["size"]))
        except ConfigError:
            if not item["skip"]:
                raise
            skipped.append(f)
            continue
        labels.append(item["labels"][k])
        if "index" in item:
            index.append(item["index"][k])
    buf = io.BytesIO()
    arrays = {"images": np.stack(images) if images else np.zeros((0, 3, item["size"], item["size"]), np.uint8),
              "labels": np.asarray(labels, dtype=np.int64)}
    if "index" in item:
        arrays["index"] = np.asarray(index, dtype=np.int64)
    np.savez(buf, **arrays)
    data = buf.getvalue()
    (Location(item["root"]) / item["path"]).write_bytes(data)
    return {"split": item["split"], "shard": item["shard"], "path": item["path"], "count": len(images),
            "sha256": hashlib.sha256(data).hexdigest(), "labels": labels, "skipped": skipped}


def _made_for(index: dict, cfg: Config) -> bool:
    """Whether an existing index holds the shards this config would make (same source, classes, size and seed)."""
    return (index.get("source"), index.get("classes"), index.get("image_size"), index.get("seed")) == (
        str(as_location(cfg.data.root)), read_classlist(cfg.data.classes), cfg.data.image_size, cfg.seed)


def _make(cfg: Config, items: list[dict]) -> list[dict]:
    """Every item's object (Ray Data tasks across the cluster, or here one by one); their index rows."""
    if not items:
        return []
    if not cfg.ray.enabled:
        return [make_shard(i) for i in tqdm(items, desc="prepare", disable=None)]
    # the Ray layer only when Ray is on: a ray.enabled=false run never imports ray
    import ray

    from lgd_ray.cluster import connect, remote_cause

    connect(cfg)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    try:
        return ds.map(make_shard, num_cpus=1).take_all()  # a task per object, one decoding thread each
    except Exception as e:  # Ray Data wraps the task's error: a bad file is still one line
        cause = remote_cause(e, UserError)
        if cause is None:
            raise
        raise ConfigError(str(cause)) from None


def _rows(rows: list[dict], split: str) -> list[dict]:
    return sorted((r for r in rows if r["split"] == split), key=lambda r: r["shard"])


def _entries(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("path", "count", "sha256")} for r in rows]


def prepare(cfg: Config, shard_images: int = 1000, by_class: tuple[int, ...] = (), per_class: int = 0) -> dict:
    """Prepare both splits of the config's ImageFolder data set, and the class-sorted copies of train at the sizes
    `by_class` (what methods random, dds and mgd3 read); returns the index (also written to index.json).

    Parts an existing index already holds for the same source, classes, size and seed are kept, not made again; new
    objects go to a fresh generation folder, and the index, written last, is the switch from the old ones to them.
    """
    d = cfg.data
    if d.name != "folder" or not d.root or not d.prepared:
        raise ConfigError("prepare: needs data.name=folder with data.root (the ImageFolder tree) and data.prepared "
                          "(where the shards go)")
    root = as_location(d.prepared)
    # one prepare per target at a time: a second one waits, then keeps what the first made
    with cache_lock(root, "prepare", cfg.storage.lease_s, cfg.storage.retry_s, "prepare") as lease:
        return _prepare(cfg, root, shard_images, by_class, per_class, lease.check)


def _prepare(cfg: Config, root: Location, shard_images: int, by_class: tuple[int, ...], per_class: int,
             check: Callable[[], None]) -> dict:
    """prepare() under the target's lease; check() before the index, the switch, is written."""
    d = cfg.data
    start = time.time()
    old = root_relative(json.loads((root / PREPARED_INDEX).read_text())) if (root / PREPARED_INDEX).exists() else {}
    keep = _made_for(old, cfg)
    gone = _missing(root, old) if keep else []
    if gone:
        print(f"prepare: {root / PREPARED_INDEX} lists {len(gone)} objects that are gone (the first: {gone[0]}): "
              "made again", flush=True)
        keep = False
    have = old.get("by_class", {}) if keep else {}
    sizes = [s for s in by_class if have.get(str(s), {}).get("per_class") != per_class]
    gen, skip = f"gen-{uuid.uuid4().hex[:8]}", cfg.prepare.bad_images == "skip"
    print(f"prepare: {d.root} at {d.image_size} px"
          + (f" and class-sorted at {', '.join(map(str, by_class))} px" if by_class else "") + f" -> {root}/{gen}"
          + (" (the splits are already there)" if keep else ""), flush=True)
    if keep and not sizes:
        return old
    index = old if keep else {"layout": "root-relative", "classes": read_classlist(d.classes),
                              "image_size": d.image_size, "source": str(as_location(d.root)), "seed": cfg.seed,
                              "splits": {}, "skipped": []}
    index.setdefault("skipped", [])
    train = split_order(cfg, "train")
    n_images = 0
    if not keep:  # the splits, then (below) the class-sorted copies of what train holds
        items = [dict(i, root=str(root), skip=skip) for i in plan_shards(cfg, gen, "train", train, shard_images)
                 + plan_shards(cfg, gen, "test", split_order(cfg, "test"), shard_images)]
        rows = _make(cfg, items)
        n_images += sum(len(i["files"]) for i in items)
        for split in ("train", "test"):
            mine = _rows(rows, split)
            buf = io.BytesIO()
            np.save(buf, np.asarray([y for r in mine for y in r["labels"]], dtype=np.int64))
            (root / gen / split / "labels.npy").write_bytes(buf.getvalue())
            index["splits"][split] = {"count": sum(r["count"] for r in mine), "labels": f"{gen}/{split}/labels.npy",
                                      "shards": _entries(mine)}
        index["skipped"] = sorted(f for r in rows for f in r["skipped"])
    skipped = set(index.get("skipped", []))
    kept_train = [(f, y) for f, y in train if f not in skipped]  # the train split's files, in its order
    items = [dict(i, root=str(root), skip=False) for size in sizes
             for i in plan_by_class(cfg, gen, kept_train, size, per_class)]
    rows = _make(cfg, items)
    n_images += sum(len(i["files"]) for i in items)
    index["by_class"] = dict(have)
    for size in sizes:
        mine = _rows(rows, f"by-class-{size}")
        index["by_class"][str(size)] = {"per_class": per_class, "count": sum(r["count"] for r in mine),
                                        "shards": _entries(mine)}
    seconds = time.time() - start
    index["seconds"] = round(seconds, 1)
    if index["skipped"]:
        (root / BAD_IMAGES).write_text("".join(f"{f}\n" for f in index["skipped"]))
        print(f"prepare: skipped {len(index['skipped'])} files that do not decode (prepare.bad_images=skip), listed "
              f"in {root / BAD_IMAGES}", flush=True)
    check()  # a prepare whose lease ran out (stopped, cut off) leaves the index to the one that holds it now
    (root / PREPARED_INDEX).write_text(json.dumps(index, indent=1))  # last: the switch to the new objects
    _drop_unlisted(root, index)
    print(f"prepare: {n_images} images in {seconds:.1f} s ({n_images / seconds:.1f} images/s) -> {root}", flush=True)
    return index


def _listed(index: dict) -> list[str]:
    """Every object an index names (labels and shards of the splits and the class-sorted copies)."""
    return [path for part in [*index.get("splits", {}).values(), *index.get("by_class", {}).values()]
            for path in [part.get("labels", ""), *(r["path"] for r in part["shards"])] if path]


def _missing(root: Location, index: dict) -> list[str]:
    """The objects an index names that are not in the folder (one listing)."""
    there = {path for path, _, _ in root.listing()}
    return [path for path in _listed(index) if path not in there]


def _drop_unlisted(root: Location, index: dict):
    """Delete the folders of earlier generations (and of the layout before them) that the index no longer lists;
    nothing else in the folder is touched."""
    listed = {path.split("/")[0] for path in _listed(index)}
    for child in root.iterdir():
        if child.name not in listed and re.fullmatch(r"gen-[0-9a-f]{8}|train|test|by-class-\d+px", child.name):
            child.delete()


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
