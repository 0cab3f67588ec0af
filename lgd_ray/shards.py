"""WebDataset increments and the run manifest (docs/DESIGN.md section 4).

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
import re
import shlex
import sys
import tarfile

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from lgd_ray.config import ConfigError
from lgd_ray.data import TensorSet
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
    """PNG bytes (nothing else: no other format is tried) -> uint8 (C, H, W); at most MAX_PIXELS pixels."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        if im.width * im.height > MAX_PIXELS or im.mode not in ("L", "RGB"):
            raise ValueError(f"a {im.width}x{im.height} {im.mode} image (shards hold L or RGB, <= {MAX_PIXELS} px)")
        arr = np.asarray(im)
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


def read_shards(run_dir: Location, rows: list[dict]) -> list[dict]:
    """Samples of the given manifest rows' shards, in order: {key, image, cls, meta}. Each shard is read whole and its
    sha256 checked against its row before any byte of it is parsed; then it must be a plain tar of the members
    write_shard makes (`<key>.png|cls|json`, PNG images). Anything else is one line naming the shard."""
    run_dir = as_location(run_dir)
    out = []
    for row in rows:
        loc = run_dir / check_row_path(row["path"])
        if not loc.exists():
            raise ConfigError(f"run folder: {loc}, listed in {run_dir / MANIFEST}, is missing; `python -m "
                              "lgd_ray.distill CONFIG out=RUN --resume` makes it again")
        data = loc.read_bytes()
        found = hashlib.sha256(data).hexdigest()
        if found != row["sha256"]:
            raise not_as_recorded(run_dir, row, found)
        try:
            out += _parse_shard(data)
        except (tarfile.TarError, ValueError, KeyError, OSError, Image.DecompressionBombError) as e:
            raise ConfigError(f"run folder: {loc} is not a shard of lgd_ray ({type(e).__name__}: {e})") from None
    return out


def _parse_shard(data: bytes) -> list[dict]:
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:  # "r:": an uncompressed tar only
        for m in tar:
            key, _, ext = m.name.partition(".")
            if not m.isfile() or not KEY.fullmatch(key) or ext not in ("png", "cls", "json"):
                raise ValueError(f"member {m.name!r}")
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [{"key": key, "image": decode_png(f["png"]), "cls": int(f["cls"]), "meta": json.loads(f["json"])}
            for key, f in members.items()]


def shard_urls(run_dir: Location, rel_paths: list[str]) -> list[str]:
    """URLs that plain `webdataset.WebDataset` opens: local paths, or `pipe:` through this package for a store."""
    if run_dir.is_local:
        return [(run_dir / p).path for p in rel_paths]
    return [f"pipe:{shlex.quote(sys.executable)} -m lgd_ray.storage cat {shlex.quote(str(run_dir / p))}" for p in rel_paths]


def load_tensor_set(run_dir: Location, rows: list[dict], num_classes: int, shape: tuple[int, int, int]) -> TensorSet:
    """The samples of the given manifest rows' shards as an in-memory training set: images of `shape` (C, H, W: the
    config's data.channels and data.image_size) and labels below num_classes, or one line."""
    samples = read_shards(run_dir, rows)
    if not samples:
        raise ValueError(f"no samples in {len(rows)} shards under {run_dir}")
    shapes = {tuple(s["image"].shape) for s in samples}
    labels = torch.tensor([s["cls"] for s in samples])
    if shapes != {tuple(shape)} or labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"run folder: the shards under {run_dir} hold images of shapes {sorted(shapes)} and labels "
                          f"{labels.min()}..{labels.max()}: images of {tuple(shape)} (data.channels, data.image_size) "
                          f"and labels below {num_classes} expected")
    return TensorSet(torch.stack([s["image"] for s in samples]), labels, num_classes)


def check_shards(run_dir: Location, manifest: dict):
    """Every shard of the manifest is there with its recorded sha256, or one line naming the first that is not."""
    for row in in_order(manifest["shards"]):
        found = shard_sha256(run_dir, row)
        if found != row["sha256"]:
            raise not_as_recorded(run_dir, row, found)


def not_as_recorded(run_dir: Location, row: dict, found: str | None) -> ConfigError:
    """The one line for a shard whose bytes (sha256 `found`; None: gone) are not the ones its row recorded."""
    run_dir = as_location(run_dir)
    return ConfigError(f"run folder: {run_dir / row['path']} "
                       + (f"has sha256 {found[:12]}, not the {row['sha256'][:12]}" if found else "is missing, listed")
                       + f" of {run_dir / MANIFEST}: it was replaced or damaged; `python -m lgd_ray.distill CONFIG "
                       "out=RUN --resume` makes it again")


def shard_sha256(run_dir: Location, row: dict) -> str | None:
    """The sha256 of a manifest row's shard as it is now (None if the object is gone)."""
    loc = as_location(run_dir) / check_row_path(row["path"])
    return loc.sha256() if loc.exists() else None


MANIFEST_KEYS = {"config": dict, "stages": dict, "shards": list}
ROW_KEYS = {"path": str, "stage": int, "chunk": int, "classes": list, "count": int, "sha256": str}
ROW_PATH = re.compile(r"stage-\d{2}/shard-\d{6}\.tar")  # shard_path's layout: nothing outside the run folder
KEY = re.compile(r"c\d{4}-s\d{5}")  # sample_key's
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_PIXELS = 4096 * 4096


def check_row_path(path: str) -> str:
    """A manifest row's shard path, if it has the layout shard_path writes (so it stays inside the run folder)."""
    if not isinstance(path, str) or not ROW_PATH.fullmatch(path):
        raise ConfigError(f"run folder: the manifest lists a shard at {path!r}, not a path of the form "
                          "stage-NN/shard-NNNNNN.tar inside the run folder; it was not written by lgd_ray")
    return path


def _row_problem(i: int, row) -> str | None:
    """What is wrong with the i-th shard row, or None."""
    if not isinstance(row, dict):
        return f"shards[{i}] is not an object"
    for key, kind in ROW_KEYS.items():
        if key not in row:
            return f"shards[{i}] lacks {key!r}"
        if not isinstance(row[key], kind) or isinstance(row[key], bool):
            return f"shards[{i}].{key} is not a{'n' if kind is int else ''} {kind.__name__}"
    if not ROW_PATH.fullmatch(row["path"]) or row["path"] != shard_path(row["stage"], row["chunk"]):
        return f"shards[{i}].path {row['path']!r} is not stage {row['stage']}'s chunk {row['chunk']} in the run folder"
    if not SHA256.fullmatch(row["sha256"]) or not all(isinstance(c, int) for c in row["classes"]):
        return f"shards[{i}] has a malformed sha256 or class list"
    return None


def read_manifest(run_dir: Location) -> dict | None:
    """The run folder's manifest (None if it has none); a manifest that is not whole is one line naming it."""
    run_dir = as_location(run_dir)
    loc = run_dir / MANIFEST
    if not loc.exists():
        return None
    fix = ("it was not written by lgd_ray, or was cut short or edited: restore it, or start the run anew in an "
           "empty folder (out=NEW_DIR)")
    try:
        manifest = json.loads(loc.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"run folder: {loc} is not whole JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"run folder: {loc} is not JSON of lgd_ray ({type(e).__name__}); {fix}") from None
    if not isinstance(manifest, dict):
        problem = "is not a JSON object"
    else:
        problem = next((f"lacks {k!r}" if k not in manifest else f"has a {k!r} that is not a JSON {kind.__name__}"
                        for k, kind in MANIFEST_KEYS.items() if not isinstance(manifest.get(k), kind)), None)
        problem = problem or next(filter(None, (_row_problem(i, r) for i, r in enumerate(manifest["shards"]))), None)
    if problem:
        raise ConfigError(f"run folder: {loc} {problem}; {fix}")
    return manifest


def manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1).encode()


def write_manifest(run_dir: Location, manifest: dict):
    """Atomic replace: a crash leaves the old manifest or the new one, never half of one (a driver writes it through
    its lease instead: Lease.write)."""
    run_dir = as_location(run_dir)
    (run_dir / MANIFEST).write_bytes(manifest_bytes(manifest))


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


def in_order(rows) -> list[dict]:
    """The shard rows in a fixed order (by path)."""
    return sorted(rows, key=lambda r: r["path"])


def trained_increments(manifest: dict) -> list[tuple[int, int, list[dict]]]:
    """(stage, images per class of the stage, its shard rows) of every trained stage, in stage order."""
    out = []
    for index in range(len(manifest["stages"])):
        info = manifest["stages"].get(str(index))
        if not info or not info.get("trained"):
            break
        out.append((index, info["images"] // manifest["num_classes"], in_order(stage_rows(manifest, index))))
    if not out:
        raise ConfigError("the run has no finished stage yet")
    return out
