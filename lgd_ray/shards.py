"""WebDataset increments and the run manifest (DESIGN.md section 4).

    OUT/manifest.json            config, its hash, stages done, one row per shard (path, count, sha256)
    OUT/stage-00/shard-000000.tar

Each sample: key c{class:04d}-s{slot:05d}, png (lossless), cls (label), json (stage, seed, S, losses, ...).
Shards are written under a temporary name and renamed when complete; tar headers carry a fixed mtime, so the
same chunk always gives the same bytes (and the same sha256).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from lgd_ray.data import TensorSet

MANIFEST = "manifest.json"


def sample_key(cls: int, slot: int) -> str:
    return f"c{cls:04d}-s{slot:05d}"


def stage_dir(stage: int) -> str:
    return f"stage-{stage:02d}"


def shard_path(stage: int, chunk: int) -> str:
    """The shard of a chunk, relative to the run folder."""
    return f"{stage_dir(stage)}/shard-{chunk:06d}.tar"


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 (C, H, W) with C = 1 or 3 -> PNG bytes (grey or RGB)."""
    arr = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="png", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 (C, H, W)."""
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(run_dir: Path, rel_path: str, samples: list[dict]) -> dict:
    """Write samples ({key, image, cls, meta}) as one tar; returns its manifest row (path, count, sha256, keys)."""
    path = Path(run_dir) / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with wds.TarWriter(str(tmp), mtime=0.0) as sink:
        for s in samples:
            sink.write({"__key__": s["key"], "png": encode_png(s["image"]), "cls": int(s["cls"]), "json": s["meta"]})
    tmp.replace(path)
    return {"path": rel_path, "count": len(samples), "sha256": sha256_file(path), "keys": [s["key"] for s in samples]}


def read_shards(run_dir: Path, rel_paths: list[str]) -> list[dict]:
    """Samples of the given shards, in order, read with plain webdataset: {key, image, cls, meta}."""
    urls = [str(Path(run_dir) / p) for p in rel_paths]
    if not urls:
        return []
    out = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        out.append({"key": s["__key__"], "image": decode_png(s["png"]), "cls": int(s["cls"]),
                    "meta": json.loads(s["json"])})
    return out


def load_tensor_set(run_dir: Path, rel_paths: list[str], num_classes: int) -> TensorSet:
    """The samples of the given shards as an in-memory training set."""
    samples = read_shards(run_dir, rel_paths)
    if not samples:
        raise ValueError(f"no samples in {len(rel_paths)} shards under {run_dir}")
    return TensorSet(torch.stack([s["image"] for s in samples]), torch.tensor([s["cls"] for s in samples]), num_classes)


def shard_ok(run_dir: Path, row: dict) -> bool:
    """Whether the shard exists and its sha256 matches the manifest row."""
    path = Path(run_dir) / row["path"]
    return path.exists() and sha256_file(path) == row["sha256"]


def read_manifest(run_dir: Path) -> dict | None:
    path = Path(run_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def write_manifest(run_dir: Path, manifest: dict):
    """Atomic replace: a crash leaves the old manifest or the new one, never half of one."""
    path = Path(run_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
