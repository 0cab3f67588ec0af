"""The storage layer and the shards on it, each test on a local folder and on a real S3 server (moto, loopback)."""
import json
import threading
import time
from dataclasses import replace

import pytest
import ray
import torch
import webdataset as wds

from conftest import TcpProxy, gs_uri, new_bucket, new_gs_bucket, s3_uri
from lgd_ray import storage
from lgd_ray.distill import distill
from lgd_ray.shards import read_shards, sample_key, shard_sha256, shard_urls, write_shard
from lgd_ray.storage import Location, StorageError, check_writable, local_copy


def _samples(n, channels=1, size=8):
    g = torch.Generator().manual_seed(0)
    return [{"key": sample_key(c % 3, c), "image": torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8),
             "cls": c % 3, "meta": {"stage": 1, "S": 0.5 * c}} for c in range(n)]


def test_files_and_folders(store, tmp_path):
    (store / "a" / "x.json").write_text('{"v": 1}')
    (store / "a" / "b" / "y.bin").write_bytes(b"\0" * 10)
    assert (store / "a" / "x.json").read_text() == '{"v": 1}' and (store / "a").is_dir()
    assert [c.name for c in (store / "a").iterdir()] == ["b", "x.json"] and [c.name for c in (store / "a").files()] == ["x.json"]
    assert (store / "missing").iterdir() == [] and not (store / "missing").exists()
    with pytest.raises(FileNotFoundError):
        (store / "missing").read_bytes()
    (store / "a" / "x.json").write_text("{}")  # replaced whole
    assert (store / "a" / "x.json").read_text() == "{}"
    # a folder goes up as a whole, its marker last; a node-local copy comes back byte for byte
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"weights")
    (src / "model_index.json").write_text("{}")
    (store / "pipe").upload_dir(src, last="model_index.json")
    copy = local_copy(store / "pipe", str(tmp_path / "node"), "model_index.json")
    assert (copy / "sub" / "w.bin").read_bytes() == b"weights" and (copy / "model_index.json").exists()
    assert local_copy(store / "pipe", str(tmp_path / "node"), "model_index.json") == copy
    # the folder re-made at the same URI (new weights): copied again, the old copy gone
    time.sleep(0.01)
    (src / "sub" / "w.bin").write_bytes(b"weights, made again")
    (store / "pipe").upload_dir(src, last="model_index.json")
    again = local_copy(store / "pipe", str(tmp_path / "node"), "model_index.json")
    assert (again != copy) == (not store.is_local) and (again / "sub" / "w.bin").read_bytes() == b"weights, made again"
    assert copy.exists() == store.is_local  # a local folder is used where it is
    (store / "a").delete()
    assert not (store / "a").exists()
    if store.is_local:
        assert not [p for p in store.local_path.rglob("*") if ".tmp" in p.name]  # temporary names renamed away
    check_writable(store)


def test_shards_round_trip_with_plain_webdataset(store):
    for channels in (1, 3):
        samples = _samples(7, channels)
        row = write_shard(store, f"stage-01/shard-00000{channels}.tar", samples)
        assert row["count"] == 7 and row["keys"] == [s["key"] for s in samples] and shard_sha256(store, row) == row["sha256"]
        back = read_shards(store, [row])
        assert [b["key"] for b in back] == row["keys"] and [b["cls"] for b in back] == [s["cls"] for s in samples]
        assert all(torch.equal(b["image"], s["image"]) for b, s in zip(back, samples))  # lossless PNG
        assert back[3]["meta"]["S"] == 1.5
        # plain webdataset with its own decoders: a local path, or a pipe: URL through the store for s3://
        raw = list(wds.WebDataset(shard_urls(store, [row["path"]]), shardshuffle=False).decode("l" if channels == 1 else "rgb8"))
        assert [r["__key__"] for r in raw] == row["keys"] and int(raw[0]["cls"]) == 0 and raw[0]["json"]["stage"] == 1
        assert raw[0]["png"].shape[:2] == (8, 8)


def test_same_samples_same_bytes_and_damage_detected(store):
    row = write_shard(store, "stage-00/shard-000000.tar", _samples(5))
    again = write_shard(store, "stage-00/shard-000001.tar", _samples(5))
    assert row["sha256"] == again["sha256"] == (store / row["path"]).sha256()  # fixed mtime: same chunk, same bytes
    shard = store / row["path"]
    shard.write_bytes(shard.read_bytes()[:-1024])  # truncated
    assert shard_sha256(store, row) != row["sha256"]
    shard.delete()
    assert shard_sha256(store, row) != row["sha256"]


def test_a_reader_racing_a_writer_gets_whole_versions(store):
    """The manifest is replaced while others read it (a resumed driver, report, a test polling a run): every read
    is one whole version, also on S3, where the client's size and bytes come from two requests."""
    versions = [json.dumps(list(range((n * 37) % 300))) for n in range(1, 120)]  # grows and shrinks
    loc = store / "manifest.json"
    loc.write_text(versions[0])
    writer = threading.Thread(target=lambda: [loc.write_text(v) for v in versions])
    writer.start()
    reads = []
    while writer.is_alive():
        reads.append(loc.read_text())
    writer.join()
    assert reads and all(r in versions for r in reads)


def test_ray_data_reads_shards_on_the_store(store):
    row = write_shard(store, "stage-00/shard-000000.tar", _samples(6))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        loc = store / row["path"]
        rows = ray.data.read_webdataset(loc.path, filesystem=loc.fs).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["__key__"] for r in rows) == sorted(row["keys"])


def test_bad_stores_fail_in_seconds_with_one_line(s3_endpoint):
    start = time.time()
    dead = Location("s3://bucket/run?endpoint_override=127.0.0.1:1&scheme=http")
    with pytest.raises(StorageError, match=r"cannot write s3://bucket/run/\.lgd_ray-probe-\w+\?endpoint_override=127\.0\.0\.1:1.*endpoint does not answer"):
        check_writable(dead)
    assert time.time() - start < 30
    with pytest.raises(StorageError, match="nobucket.*bucket does not exist"):
        check_writable(Location(f"s3://nobucket/run?endpoint_override={s3_endpoint}&scheme=http"))
    with pytest.raises(StorageError, match="credentials do not belong in a URI"):
        Location(f"s3://b/run?endpoint_override={s3_endpoint}&secret_key=x").exists()
    with pytest.raises(StorageError, match="unknown option 'endpoint'"):
        Location(f"s3://b/run?endpoint={s3_endpoint}").exists()
    for bad in (dead, Location(f"s3://nobucket/run?endpoint_override={s3_endpoint}&scheme=http")):
        assert "\n" not in str(pytest.raises(StorageError, check_writable, bad).value)


def test_refused_credentials_are_named(tmp_path):
    """A second S3 server that checks signatures (moto with IAM auth on) refuses this process's unknown key."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.time() < deadline and server.poll() is None, "the S3 server did not start"
            time.sleep(0.2)
        loc = Location(f"s3://bucket/run?endpoint_override=127.0.0.1:{port}&scheme=http")
        with pytest.raises(StorageError, match=r"cannot write s3://bucket/run/.*access denied: no or wrong credentials"):
            check_writable(loc)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_store_outage_shorter_than_retry_s_is_waited_out_and_a_longer_one_is_one_line(s3_endpoint):
    """The S3 server behind a TCP proxy that is cut: a write during a 3-s outage waits it out (storage.retry_s 20);
    with the proxy down for longer than storage.retry_s (2) it fails in one line, and nothing half-written is left.
    The start-up check does not retry at all."""
    with TcpProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        root = Location(s3_uri(f"127.0.0.1:{proxy.port}", new_bucket(s3_endpoint), "outage"))
        (root / "before").write_bytes(b"1")
        try:
            storage.configure(20)
            proxy.stop()
            threading.Timer(3.0, proxy.start).start()
            start = time.time()
            (root / "during").write_bytes(b"2")
            assert 2.5 < time.time() - start < 15 and (root / "during").read_bytes() == b"2"
            storage.configure(2)
            proxy.stop()
            with pytest.raises(StorageError,
                               match=r"cannot write .*/never\?.*does not answer.*\(retried for \d+ s: storage.retry_s 2\)$"):
                (root / "never").write_bytes(b"3")
            start = time.time()
            with pytest.raises(StorageError, match="does not answer"):
                check_writable(root)
            assert time.time() - start < 10
        finally:
            storage.configure(120)
            if proxy.listener is None:
                proxy.start()
        assert not (root / "never").exists() and [p.name for p in root.iterdir()] == ["before", "during"]


def test_a_run_on_gcs_makes_the_local_runs_images_and_resumes(tiny_run, gcs_endpoint):
    """The tiny digits distillation with its run folder on the GCS server (lease by generation preconditions, folders
    implied by object names) writes the shards the local run wrote, byte for byte, and --resume makes nothing again."""
    cfg, _, local, _ = tiny_run
    out = gs_uri(gcs_endpoint, new_gs_bucket(gcs_endpoint), "runs/digits")
    cfg = replace(cfg, ray=replace(cfg.ray, enabled=False))  # in this process: no Ray left running after the test
    manifest = distill(replace(cfg, out=out))
    shas = lambda m: sorted((r["path"], r["sha256"]) for r in m["shards"])
    assert shas(manifest) == shas(local)
    assert [c.name for c in Location(out).iterdir()] == ["manifest.json", "report", "report.md", "stage-00", "stage-01",
                                                         "stage-02", "timeline"]
    again = distill(replace(cfg, out=out), resume=True)
    assert shas(again) == shas(local) and again["stages"] == manifest["stages"]
