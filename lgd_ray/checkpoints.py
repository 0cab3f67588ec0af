"""A fit's checkpoint folder, the same on a local disk, in a store and inside Ray Train: each dict of tensors ("model",
"ema") as safetensors, the rest (epoch or step, optimizer, scheduler) in train_state.pt (read with weights_only=True),
and progress.json (the fit's round: an epoch, or a prior's checkpoint_steps steps; the other files' sizes): a folder
is complete when progress.json and every file it lists are there.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

from lgd_ray.storage import Location

TRAIN_STATE = "train_state.pt"
PROGRESS = "progress.json"


def write_checkpoint(folder: Path, state: dict, round_: int):
    """Write `state` (CPU tensors), the state after round `round_`, into a local folder."""
    rest = {}
    for key, value in state.items():
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            save_file({k: v.contiguous() for k, v in value.items()}, str(folder / f"{key}.safetensors"))
        else:
            rest[key] = value
    torch.save(rest, folder / TRAIN_STATE)
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / PROGRESS).write_text(json.dumps({"round": round_, "files": files}))


def read_checkpoint(folder: Path) -> dict:
    """The state written by write_checkpoint."""
    state = torch.load(folder / TRAIN_STATE, weights_only=True)
    for path in folder.glob("*.safetensors"):
        state[path.name.removesuffix(".safetensors")] = load_file(str(path))
    return state


def latest_checkpoint(storage: Location, name: str) -> Location | None:
    """The newest complete checkpoint (highest round) of any earlier fit named `name` under `storage`: the folders
    storage/<name>-*/checkpoint*/ that Ray Train and the in-process fitter both write."""
    best, best_round = None, -1
    for run in storage.iterdir():
        if not run.name.startswith(f"{name}-"):
            continue
        for folder in run.iterdir():
            if not folder.name.startswith("checkpoint_") or folder.name.endswith(".json"):
                continue
            progress = _progress(folder)
            if progress and progress["round"] > best_round and _complete(folder, progress["files"]):
                best, best_round = folder, progress["round"]
    return best


def _progress(folder: Location) -> dict | None:
    loc = folder / PROGRESS
    return json.loads(loc.read_text()) if loc.exists() else None


def _complete(folder: Location, files: dict) -> bool:
    """Every file progress.json lists is there at its size (a store copies a folder file by file, in any order)."""
    infos = folder.fs.get_file_info([(folder / name).path for name in files])
    return all(i.type == pafs.FileType.File and i.size == size for i, size in zip(infos, files.values()))


def save_to(loc: Location, state: dict, round_: int):
    """write_checkpoint into a folder of a local disk or a store (progress.json last)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), state, round_)
        loc.upload_dir(Path(tmp), last=PROGRESS)


def load_from(loc: Location) -> dict:
    """read_checkpoint from a folder of a local disk or a store."""
    if loc.is_local:
        return read_checkpoint(loc.local_path)
    with tempfile.TemporaryDirectory() as tmp:
        loc.download_dir(Path(tmp))
        return read_checkpoint(Path(tmp))
