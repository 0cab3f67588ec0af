
import ray
import torch
import webdataset as wds

from lgd_ray.shards import read_shards, sample_key, sha256_file, shard_ok, write_shard


def _samples(n, channels=1, size=8):
    g = torch.Generator().manual_seed(0)
    return [{"key": sample_key(c % 3, c), "image": torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8),
             "cls": c % 3, "meta": {"stage": 1, "S": 0.5 * c}} for c in range(n)]


def test_round_trip_with_plain_webdataset(tmp_path):
    for channels in (1, 3):
        samples = _samples(7, channels)
        row = write_shard(tmp_path, f"stage-01/shard-00000{channels}.tar", samples)
        assert row["count"] == 7 and row["keys"] == [s["key"] for s in samples] and shard_ok(tmp_path, row)
        back = read_shards(tmp_path, [row["path"]])
        assert [b["key"] for b in back] == row["keys"]
        assert [b["cls"] for b in back] == [s["cls"] for s in samples]
        assert all(torch.equal(b["image"], s["image"]) for b, s in zip(back, samples))  # lossless PNG
        assert back[3]["meta"]["S"] == 1.5
        # plain webdataset with its own decoders sees the same keys and fields
        raw = list(wds.WebDataset(str(tmp_path / row["path"]), shardshuffle=False).decode("l" if channels == 1 else "rgb8"))
        assert [r["__key__"] for r in raw] == row["keys"] and int(raw[0]["cls"]) == 0 and raw[0]["json"]["stage"] == 1
        assert raw[0]["png"].shape[:2] == (8, 8)


def test_same_samples_same_bytes_and_truncation_detected(tmp_path):
    row = write_shard(tmp_path, "a/shard-000000.tar", _samples(5))
    again = write_shard(tmp_path, "b/shard-000000.tar", _samples(5))
    assert row["sha256"] == again["sha256"]  # fixed mtime: a rerun of a chunk writes the same bytes
    path = tmp_path / row["path"]
    path.write_bytes(path.read_bytes()[:-1024])
    assert not shard_ok(tmp_path, row) and sha256_file(path) != row["sha256"]
    (tmp_path / row["path"]).unlink()
    assert not shard_ok(tmp_path, row)
    assert not list(tmp_path.glob("**/*.tmp*"))  # temporary names are renamed away


def test_ray_data_reads_shards(tmp_path):
    row = write_shard(tmp_path, "stage-00/shard-000000.tar", _samples(6))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset(str(tmp_path / row["path"])).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["__key__"] for r in rows) == sorted(row["keys"])
