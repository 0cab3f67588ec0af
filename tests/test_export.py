"""`python -m lgd_ray.export`: a run's distilled set as an ImageFolder tree, read back by torchvision with the same
images and labels as the shards, on a local folder and on the S3 server."""
import json

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from lgd_ray import export
from lgd_ray.data import FASHION_MNIST_CLASSES
from lgd_ray.shards import in_order, read_shards
from lgd_ray.storage import Location


def test_class_folders_keep_the_label_order_for_torchvision():
    assert export.class_folders([str(d) for d in range(10)]) == [str(d) for d in range(10)]
    assert export.class_folders(["n01440764", "n02102040"]) == ["n01440764", "n02102040"]  # ImageNet's wnids
    folders = export.class_folders(FASHION_MNIST_CLASSES)
    assert folders[0] == "0000-T-shirt_top" and sorted(folders) == folders and "/" not in "".join(folders)


def test_an_export_round_trips_through_torchvision(tiny_run, tmp_path, s3_root, capsys):
    cfg, run, manifest, _ = tiny_run
    dest = tmp_path / "export"
    summary = export.export(Location(str(run)), Location(str(dest)), ipc=2, models=True, overrides=[f"cache={cfg.cache}"])
    assert summary == {"images": 20, "ipc": 2, "classes": 10, "dest": str(dest)}
    folder = ImageFolder(str(dest / "train"))
    assert folder.classes == [str(d) for d in range(10)]
    seed_rows = in_order(r for r in manifest["shards"] if r["stage"] == 0)
    shards = {s["key"]: s for s in read_shards(Location(str(run)), seed_rows)}
    assert len(folder.samples) == len(shards) == 20
    for path, label in folder.samples:
        s = shards[path.rsplit("/", 1)[1].removesuffix(".png")]
        with Image.open(path) as im:
            image = torch.from_numpy(np.array(im)).reshape(s["image"].shape[1], s["image"].shape[2], -1)
        assert label == s["cls"] and torch.equal(image.permute(2, 0, 1), s["image"])
    meta = [json.loads(line) for line in (dest / "metadata.jsonl").read_text().splitlines()]
    assert sorted(m["file_name"] for m in meta) == sorted(p[len(str(dest)) + 1:] for p, _ in folder.samples)
    assert all(m["stage"] == 0 and "seed" in m for m in meta)
    card = (dest / "README.md").read_text()
    assert "2 images per class distilled by lgd_ray (lgd)" in card and manifest["prior_sha256"] in card
    assert "| 0 | 2 |" in card and "| 1 | 2 |" not in card  # the exported stages only (stage, images per class)
    assert (dest / "models" / "reference.safetensors").exists() and (dest / "models" / "student-stage0.safetensors").exists()
    assert json.loads(json.dumps(__import__("yaml").safe_load((dest / "config.yaml").read_text()))) == manifest["config"]
    # the whole set, to a store URI
    remote = s3_root / "export"
    assert export.export(Location(str(run)), remote)["images"] == 60  # 2 + 2 + 2 per class
    assert len((remote / "metadata.jsonl").read_text().splitlines()) == 60 and (remote / "README.md").exists()
