"""`prepare`: an ImageFolder tree (JPEG and PNG, odd sizes, a class list not in directory order) into uint8 shards on
a real S3 server through Ray Data; the readers (DDP shares, the test split, a reference fit) use them."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lgd_ray.config import ConfigError, load_config
from lgd_ray.data import PreparedSplit, decode_image, load_split
from lgd_ray.prepare import prepare
from lgd_ray.train import rank_slice

WNIDS = ["n03888257", "n01440764", "n02102040"]  # not sorted: label = position in the list
SIZES = [(37, 23), (20, 41), (64, 64), (33, 30), (50, 17)]


def _tree(root):
    """train: 5 images per class, val: 2; alternating JPEG and PNG of odd sizes, every image different."""
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 5), ("val", 2)):
        for label, w in enumerate(WNIDS + ["n09999999"]):  # a class on disk but not in the list is ignored
            (root / split / w).mkdir(parents=True)
            for j in range(n):
                img = Image.fromarray(rng.integers(0, 256, SIZES[j][::-1] + (3,), dtype=np.uint8))
                path = root / split / w / f"{w}_{j}.{'JPEG' if j % 2 == 0 else 'png'}"
                img.save(path, quality=95) if j % 2 == 0 else img.save(path)
                if label < len(WNIDS):
                    files.setdefault(split, []).append((path, label))
    return files


def _cfg(root, classes, prepared, *more):
    return load_config("imagenette", [f"data.root={root}", f"data.classes={classes}", "data.image_size=16",
                                      f"data.prepared={prepared}", "reference.model=convnet2", "student.model=convnet2",
                                      *more])


def test_prepare_on_s3_holds_every_image_once(local_ray, tmp_path, s3_root):
    files = _tree(tmp_path / "data")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WNIDS) + "\n")
    cfg = _cfg(tmp_path / "data", classes, s3_root / "prepared")
    index = prepare(cfg, shard_images=4)
    assert index["classes"] == WNIDS and index["splits"]["train"]["count"] == 15 and index["splits"]["test"]["count"] == 6
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [4, 4, 4, 3]
    for split, source in (("train", files["train"]), ("test", files["val"])):
        whole = PreparedSplit(s3_root / "prepared", split, index).share()
        expected = {decode_image(p.read_bytes(), 16).numpy().tobytes(): label for p, label in source}
        got = [(img.numpy().tobytes(), int(y)) for img, y in zip(whole.images, whole.labels)]
        assert len(got) == len(expected) and dict(got) == expected  # every image once, label = position in the list
        assert whole.images.shape[1:] == (3, 16, 16) and whole.images.dtype == torch.uint8
    # the readers: load_split gives the lazy train split and the test split in memory; DDP ranks get equal shares
    train = load_split(cfg.data, "train")
    assert isinstance(train, PreparedSplit) and len(train) == 15 and train.labels.tolist() == whole_labels(train)
    shares = [rank_slice(train, r, 2, seed=0) for r in range(2)]
    assert [len(s) for s in shares] == [7, 7]
    assert torch.equal(torch.cat([s.images for s in shares]), train.share().images[:14])
    assert len(load_split(cfg.data, "test")) == 6
    # a config asking for another size is refused with one line
    with pytest.raises(ConfigError, match="prepared for 3 classes at 16 px.*32 px"):
        load_split(_cfg(tmp_path / "data", classes, s3_root / "prepared", "data.image_size=32").data, "test")


def whole_labels(split: PreparedSplit) -> list[int]:
    return [int(split[i][1]) for i in range(len(split))]


def test_prepared_split_holds_the_jpeg_paths_images_and_trains(tmp_path):
    """Without Ray, on a local folder: the shards hold exactly the images the JPEG path decodes; a fit reads them."""
    from functools import partial

    from lgd_ray.reference import fit_job
    from lgd_ray.train import fit

    _tree(tmp_path / "data")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WNIDS) + "\n")
    cfg = _cfg(tmp_path / "data", classes, tmp_path / "prepared", "ray.enabled=false", "reference.train.epochs=2")
    prepare(cfg, shard_images=6)
    jpeg = load_config("imagenette", [f"data.root={tmp_path / 'data'}", f"data.classes={classes}", "data.image_size=16",
                                      "reference.model=convnet2", "student.model=convnet2"])
    a = load_split(cfg.data, "train").share()
    b = load_split(jpeg.data, "train")
    assert sorted(x.numpy().tobytes() for x in a.images) == sorted(b[i][0].numpy().tobytes() for i in range(len(b)))
    model = fit(fit_job(cfg, "reference", 3, partial(load_split, cfg.data, "train"), seed=0))
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_class_sorted_copies_feed_random_dds_and_mgd3(tmp_path, s3_root):
    """`prepare --by-class`: one object per class at the classifiers' and the prior's size, added to prepared splits
    without remaking them; methods random, dds and mgd3 read them (a missing copy is one line before any work)."""
    from lgd_ray.methods import check_real_images
    from lgd_ray.prior import random_pipeline
    from lgd_ray.shards import read_shards
    from lgd_ray.stages import run_stages

    files = _tree(tmp_path / "data")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WNIDS) + "\n")
    prior = tmp_path / "pixel-dit-32"  # a 3-class pixel DiT at 32 px: the prior's resolution is twice image_size
    random_pipeline(dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3, num_layers=1,
                         sample_size=32, patch_size=4, num_embeds_ada_norm=3, norm_num_groups=1)).save_pretrained(prior)
    run = ["ray.enabled=false", "reference.train.epochs=1", "student.model=convnet2", "student.train.epochs=1",
           f"prior.model_id={prior}",
           "prior.num_steps=4", "distill.seed_ipc=1", "distill.ipc_per_stage=1", "distill.stages=1",
           "distill.sample_batch=4", "dds.candidates=2", "dds.timesteps=[300]", "guidance.mode_stop=2",
           f"cache={s3_root / 'cache'}"]
    cfg = _cfg(tmp_path / "data", classes, s3_root / "prepared", *run)
    first = prepare(cfg, shard_images=4)
    with pytest.raises(ConfigError, match=r"no class-sorted copy of train at 16 px \(has: none\).*--by-class 16"):
        check_real_images(_cfg(tmp_path / "data", classes, s3_root / "prepared", *run, "distill.method=random"))
    index = prepare(cfg, shard_images=4, by_class=(16, 32))
    assert index["splits"] == first["splits"]  # the splits were kept, only the copies made
    assert {k: v["count"] for k, v in index["by_class"].items()} == {"16": 15, "32": 15}
    train = load_split(cfg.data, "train")
    for c in range(len(WNIDS)):
        idx, images = train.class_images(c, 32, lambda n: list(range(n)))
        expected = sorted(decode_image(p.read_bytes(), 32).numpy().tobytes() for p, y in files["train"] if y == c)
        assert sorted(x.numpy().tobytes() for x in images) == expected and images.shape[1:] == (3, 32, 32)
        assert all(int(train.labels[i]) == c for i in idx)
        idx, images = train.class_images(c, 16, lambda n: [n - 1, 0])
        assert all(torch.equal(x, train[i][0]) for i, x in zip(idx, images))  # indices point into the train split
    assert prepare(cfg, shard_images=4, by_class=(32,), per_class=2)["by_class"]["32"]["count"] == 6
    for method in ("dds", "mgd3"):
        check_real_images(_cfg(tmp_path / "data", classes, s3_root / "prepared", *run, f"distill.method={method}"))
    with pytest.raises(ConfigError, match="at 8 px"):  # a prior at 8 px needs its own copy
        random_pipeline(dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3, num_layers=1,
                             sample_size=8, patch_size=4, num_embeds_ada_norm=3, norm_num_groups=1)).save_pretrained(
            tmp_path / "dit-8")
        check_real_images(_cfg(tmp_path / "data", classes, s3_root / "prepared", *run, "distill.method=dds",
                               f"prior.model_id={tmp_path / 'dit-8'}"))
    for method in ("random", "dds", "mgd3"):
        out = s3_root / f"run-{method}"
        mcfg = _cfg(tmp_path / "data", classes, s3_root / "prepared", *run, f"distill.method={method}", f"out={out}")
        manifest = run_stages(mcfg, out, log=lambda _: None)
        samples = read_shards(out, manifest["shards"])
        assert len(samples) == 2 * len(WNIDS) and all(s["image"].shape == (3, 16, 16) for s in samples)
        if method != "mgd3":
            assert all(int(train.labels[s["meta"]["real_index"]]) == s["cls"] for s in samples)


@pytest.mark.parametrize("with_ray", [False, True])
def test_a_corrupt_image_is_named_and_a_class_without_train_images_refused(local_ray, tmp_path, with_ray):
    """prepare stops in one line naming the file that does not decode (in this process, and through Ray Data's
    tasks) and refuses a class whose train folder is empty; no index is written."""
    files = _tree(tmp_path / "data")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WNIDS) + "\n")
    bad = next(p for p, _ in files["train"] if p.suffix == ".JPEG")
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    cfg = _cfg(tmp_path / "data", classes, tmp_path / "prepared", f"ray.enabled={str(with_ray).lower()}")
    with pytest.raises(ConfigError, match=rf"prepare: cannot decode {bad}.*remove or replace the file, or skip such "
                                          r"files with prepare.bad_images=skip$") as e:
        prepare(cfg, shard_images=4)
    assert "\n" not in str(e.value) and not (tmp_path / "prepared" / "index.json").exists()
    # skipped instead: listed beside the index, and in no split, share or class-sorted copy
    index = prepare(_cfg(tmp_path / "data", classes, tmp_path / "prepared", f"ray.enabled={str(with_ray).lower()}",
                         "prepare.bad_images=skip"), shard_images=4, by_class=(16,))
    assert index["skipped"] == [str(bad)] and (tmp_path / "prepared" / "bad_images.txt").read_text() == f"{bad}\n"
    train = load_split(cfg.data, "train")
    assert len(train) == index["splits"]["train"]["count"] == 14 and len(train.labels) == 14
    assert whole_labels(train) == train.labels.tolist()
    rows = [train.class_images(c, 16, lambda n: list(range(n))) for c in range(3)]
    assert sum(len(i) for i, _ in rows) == 14 and sorted(j for i, _ in rows for j in i) == list(range(14))
    assert all(int(train.labels[j]) == c for c, (i, _) in enumerate(rows) for j in i)
    bad.unlink()
    for p in (tmp_path / "data" / "train" / WNIDS[1]).iterdir():
        p.unlink()
    with pytest.raises(ConfigError, match=rf"prepare: class {WNIDS[1]} has no image files under .*train/{WNIDS[1]}"):
        prepare(_cfg(tmp_path / "data", classes, tmp_path / "fresh", f"ray.enabled={str(with_ray).lower()}"),
                shard_images=4)


def test_prepare_again_switches_generations_at_the_index_and_reads_check_sha256(tmp_path):
    """A second prepare into the same folder (another seed: other shards) writes a fresh generation and switches at
    the index; one that fails half-way leaves the previous index and every object it lists whole. A damaged object
    is refused on its first read, in one line."""
    import json

    files = _tree(tmp_path / "data")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WNIDS) + "\n")
    prepared = tmp_path / "prepared"
    (prepared / "notes").mkdir(parents=True)  # something of the user's in the folder: never touched
    cfg = _cfg(tmp_path / "data", classes, prepared, "ray.enabled=false")
    first = prepare(cfg, shard_images=4)
    (gen,) = {r["path"].split("/")[0] for r in first["splits"]["train"]["shards"]}
    before = whole_labels(load_split(cfg.data, "train"))
    bad = next(p for p, _ in files["val"] if p.suffix == ".JPEG")  # the test split (val) is made after train
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    other = _cfg(tmp_path / "data", classes, prepared, "ray.enabled=false", "seed=1")
    with pytest.raises(ConfigError, match="cannot decode"):
        prepare(other, shard_images=4)
    assert json.loads((prepared / "index.json").read_text()) == first  # the old index, and what it lists:
    assert whole_labels(load_split(cfg.data, "train")) == before
    bad.write_bytes(good)
    second = prepare(other, shard_images=4)
    (new,) = {r["path"].split("/")[0] for r in second["splits"]["train"]["shards"]}
    assert new != gen and not (prepared / gen).exists() and (prepared / "notes").is_dir()
    assert sorted(p.name for p in prepared.iterdir()) == sorted([new, ".locks", "index.json", "notes"])
    shard = prepared / second["splits"]["train"]["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    train = load_split(other.data, "train")
    train[0]  # the first shard is whole
    with pytest.raises(ConfigError, match=rf"^data: {shard} has sha256 \w{{12}}, not the \w{{12}} of {prepared}/index.json: "
                                          r"the prepared set is damaged; run prepare again$"):
        train[4]


def test_an_index_from_before_generations_is_still_read(tmp_path):
    """Prepared sets written before generation folders (paths relative to their split's folder) load unchanged."""
    import json
    import shutil

    _tree(tmp_path / "data")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WNIDS) + "\n")
    prepared = tmp_path / "prepared"
    cfg = _cfg(tmp_path / "data", classes, prepared, "ray.enabled=false")
    index = prepare(cfg, shard_images=4, by_class=(16,))
    expected = whole_labels(load_split(cfg.data, "train"))
    (gen,) = {r["path"].split("/")[0] for r in index["splits"]["train"]["shards"]}
    for part in ("train", "test", "by-class-16px"):  # the layout of then
        shutil.move(prepared / gen / part, prepared / part)
    old = json.loads(json.dumps(index))
    del old["layout"]
    for split, part in old["splits"].items():
        del part["labels"]
        for row in part["shards"]:
            row["path"] = row["path"].rsplit("/", 1)[1]
    for row in old["by_class"]["16"]["shards"]:
        row["path"] = row["path"].rsplit("/", 1)[1]
    (prepared / "index.json").write_text(json.dumps(old))
    train = load_split(cfg.data, "train")
    assert whole_labels(train) == expected and len(train.class_images(2, 16, lambda n: [0])[0]) == 1
    again = prepare(cfg, shard_images=4, by_class=(16, 8))  # adds a copy; the old objects are kept and listed
    assert again["splits"]["train"]["shards"][0]["path"] == "train/shard-000000.npz"
    assert whole_labels(load_split(cfg.data, "train")) == expected


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels and whose data is empty: PIL reads the size, no more."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_a_bad_image(tmp_path):
    """A file claiming 20000 x 20000 pixels (PIL refuses past twice its MAX_IMAGE_PIXELS) is a file that does not
    decode: one line naming it, which prepare.bad_images=skip skips, never an escaping DecompressionBombError."""
    from lgd_ray.prepare import decode_file

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(ConfigError, match=rf"prepare: cannot decode {bomb} \(Image size \(400000000 pixels\) exceeds"):
        decode_file(str(bomb), 16)


def test_prepare_waits_for_another_on_its_target_and_remakes_an_index_whose_objects_are_gone(tmp_path, capsys):
    """A prepare started while another holds the target's lease waits (one line), then keeps what that one made; an
    index some of whose objects were deleted is not kept: the data set is made again."""
    import threading

    from lgd_ray.lease import cache_lock

    _tree(tmp_path / "data")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WNIDS) + "\n")
    prepared = tmp_path / "prepared"
    cfg = _cfg(tmp_path / "data", classes, prepared, "ray.enabled=false", "storage.lease_s=6")
    done = []
    with cache_lock(str(prepared), "prepare", 6, 10):  # another prepare, in the middle of its work
        waiting = threading.Thread(target=lambda: done.append(prepare(cfg, shard_images=4)))
        waiting.start()
        deadline = time.time() + 30
        while "prepare: waiting for another driver to make" not in capsys.readouterr().out:
            assert time.time() < deadline and not done
            time.sleep(0.1)
        assert not done and not (prepared / "index.json").exists()
    waiting.join(timeout=120)
    first = done[0]
    assert prepare(cfg, shard_images=4) == first  # kept
    capsys.readouterr()
    gone = prepared / first["splits"]["test"]["shards"][0]["path"]
    gone.unlink()
    again = prepare(cfg, shard_images=4)
    assert f"lists 1 objects that are gone (the first: {first['splits']['test']['shards'][0]['path']}): made again" \
        in capsys.readouterr().out
    assert again["splits"]["test"]["shards"][0]["path"] != first["splits"]["test"]["shards"][0]["path"]
    assert len(whole_labels(load_split(cfg.data, "test"))) == first["splits"]["test"]["count"]  # every image read
    assert all((prepared / r["path"]).exists() for part in again["splits"].values() for r in part["shards"])
