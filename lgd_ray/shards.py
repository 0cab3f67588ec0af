"""WebDataset increments and the run manifest (DESIGN.md section 4).

    OUT/manifest.json            config, its hash, stages done, one row per shard (path, count, sha256)
    OUT/stage-00/shard-000000.tar

Each sample: key c{class:04d}-s{slot:05d}, png (lossless), cls (label), json (stage, seed, S, losses, ...).
OUT is a `Location` (a local folder or a store URI). A shard is built in memory and written as one atomic object;
tar headers carry a fixed mtime, so the same chunk always gives the same bytes (and the same sha256). The manifest
is written after the shards it lists.
"""
from __future__ import annotations

import hashlib
import io
import json
import shlex
import sys

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from lgd_ray.config import ConfigError, from_dict
from lgd_ray.data import TensorSet
from lgd_ray.plan import stage_plan
from lgd_ray.storage import Location, as_location

MANIFEST = "manifest.json"


def sample_key(cls: int, slot: int) -> str:
    return f"c{cls:04d}-s{slot:05d}"


def sample_record(cls: int, slot: int, image: torch.Tensor, **meta) -> dict:
    """One sample as write_shard takes it: its key, uint8 image, label and json metadata."""
    return {"key": sample_key(cls, slot), "image": image, "cls": cls, "meta": meta}


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


def write_shard(run_dir: Location, rel_path: str, samples: list[dict]) -> dict:
    """Write samples ({key, image, cls, meta}) as one tar object; returns its manifest row (path, count, sha256, keys)."""
    run_dir = as_location(run_dir)
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0.0) as sink:
        for s in samples:
            sink.write({"__key__": s["key"], "png": encode_png(s["image"]), "cls": int(s["cls"]), "json": s["meta"]})
    data = buf.getvalue()
    (run_dir / rel_path).write_bytes(data)
    return {"path": rel_path, "count": len(samples), "sha256": hashlib.sha256(data).hexdigest(),
            "keys": [s["key"] for s in samples]}


def read_shards(run_dir: Location, rel_paths: list[str]) -> list[dict]:
    """Samples of the given shards, in order, parsed by webdataset's tar reader: {key, image, cls, meta}."""
    run_dir = as_location(run_dir)
    out = []
    for p in rel_paths:
        loc = run_dir / p
        if not loc.exists():
            raise ConfigError(f"run folder: {loc}, listed in {run_dir / MANIFEST}, is missing; `python -m "
                              "lgd_ray.distill CONFIG out=RUN --resume` makes it again")
        with loc.open() as stream:
            files = wds.tariterators.tar_file_expander([{"url": str(loc), "stream": stream}])
            for s in wds.tariterators.group_by_keys(files):
                out.append({"key": s["__key__"], "image": decode_png(s["png"]), "cls": int(s["cls"]),
                            "meta": json.loads(s["json"])})
    return out


def shard_urls(run_dir: Location, rel_paths: list[str]) -> list[str]:
    """URLs that plain `webdataset.WebDataset` opens: local paths, or `pipe:` through this package for a store."""
    if run_dir.is_local:
        return [(run_dir / p).path for p in rel_paths]
    return [f"pipe:{shlex.quote(sys.executable)} -m lgd_ray.storage cat {shlex.quote(str(run_dir / p))}" for p in rel_paths]


def load_tensor_set(run_dir: Location, rel_paths: list[str], num_classes: int) -> TensorSet:
    """The samples of the given shards as an in-memory training set."""
    samples = read_shards(run_dir, rel_paths)
    if not samples:
        raise ValueError(f"no samples in {len(rel_paths)} shards under {run_dir}")
    return TensorSet(torch.stack([s["image"] for s in samples]), torch.tensor([s["cls"] for s in samples]), num_classes)


def shard_sha256(run_dir: Location, row: dict) -> str | None:
    """The sha256 of a manifest row's shard as it is now (None if the object is gone)."""
    loc = as_location(run_dir) / row["path"]
    return loc.sha256() if loc.exists() else None


MANIFEST_KEYS = ("config", "stages", "shards")
ROW_KEYS = ("path", "stage", "chunk", "classes", "count", "sha256")


def read_manifest(run_dir: Location) -> dict | None:
    """The run folder's manifest (None if it has none); a manifest that is not whole is one line naming it."""
    run_dir = as_location(run_dir)
    loc = run_dir / MANIFEST
    if not loc.exists():
        return None
    fix = ("it was not written by lgd_ray, or was cut short or edited: restore it, or start the run anew in an "
           "empty folder (out=NEW_DIR)")
    try:
        manifest = json.loads(loc.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"run folder: {loc} is not whole JSON ({e.msg} at line {e.lineno}); {fix}") from None
    missing = [k for k in MANIFEST_KEYS if k not in manifest] if isinstance(manifest, dict) else ["a JSON object"]
    if not missing:
        missing = [f"shards[{i}].{k}" for i, row in enumerate(manifest["shards"]) for k in ROW_KEYS if k not in row][:1]
    if missing:
        raise ConfigError(f"run folder: {loc} lacks {missing[0]!r}; {fix}")
    return manifest


def write_manifest(run_dir: Location, manifest: dict):
    """Atomic replace: a crash leaves the old manifest or the new one, never half of one."""
    run_dir = as_location(run_dir)
    (run_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


# -- the manifest's shard rows, asked by name --------------------------------------------------------------------
def stage_rows(manifest: dict, stage: int) -> list[dict]:
    """The shard rows of one stage's increment I_stage."""
    return [r for r in manifest["shards"] if r["stage"] == stage]


def shards_through(manifest: dict, stage: int) -> list[dict]:
    """The shard rows of D_stage: every increment up to and including `stage`."""
    return [r for r in manifest["shards"] if r["stage"] <= stage]


def record(manifest: dict, row: dict):
    """Add a shard row, replacing an earlier row of the same path (a regenerated chunk)."""
    manifest["shards"] = [r for r in manifest["shards"] if r["path"] != row["path"]] + [row]


def paths(rows: list[dict]) -> list[str]:
    """The rows' shard paths in a fixed (sorted) order."""
    return sorted(r["path"] for r in rows)


def trained_increments(manifest: dict) -> list[tuple[int, int, list[str]]]:
    """(stage, images per class of the stage, its shard paths) of every trained stage, in stage order."""
    out = []
    for stage in stage_plan(from_dict(manifest["config"])):
        info = manifest["stages"].get(str(stage.index))
        if not info or not info.get("trained"):
            break
        out.append((stage.index, stage.ipc, paths(stage_rows(manifest, stage.index))))
    if not out:
        raise ConfigError("the run has no finished stage yet")
    return out
