"""Shared fixtures: a tiny digits configuration whose prior and reference are trained once per session, and a real
S3-compatible server (moto's server mode, as Ray's own tests use) on a free loopback port."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch
from diffusers import DiTPipeline

from lgd_ray.config import load_config
from lgd_ray.prior import random_pipeline
from lgd_ray.storage import Location

torch.set_num_threads(2)
# The test S3 server takes any key; these dummies (set before any Ray process starts, so Ray workers inherit them)
# keep the AWS SDK from probing the EC2 metadata service for credentials.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "lgd-ray-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "lgd-ray-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Every Ray here runs on this one machine, whose nodes no cloud preempts: as `connect` does for a local Ray, no
# preemption watcher (an actor per Ray Train fit).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def load_bench(name: str):
    """A script of bench/ as a module (bench/ on the path for its shared `parts`)."""
    folder = Path(__file__).resolve().parents[1] / "bench"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for the tests of one module (2 CPUs, no dashboard), as Ray's own tests start one."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """host:port of an S3-compatible server (moto) running in this process for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


def new_bucket(endpoint: str) -> str:
    """Create a fresh bucket on the test server; returns its name."""
    import boto3

    name = f"lgd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1").create_bucket(Bucket=name)
    return name


def s3_uri(endpoint: str, bucket: str, path: str = "") -> str:
    return f"s3://{bucket}/{path}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture
def s3_root(s3_endpoint) -> Location:
    """An empty prefix of a fresh bucket on the test S3 server."""
    return Location(s3_uri(s3_endpoint, new_bucket(s3_endpoint), "root"))


class TcpProxy:
    """A TCP proxy on a fixed loopback port in front of another loopback port: stop() closes the port and cuts every
    connection through it (an outage: clients are refused), start() opens the same port again."""

    def __init__(self, target_port: int):
        self.target = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.conns, self.lock, self.listener = [], threading.Lock(), None

    def start(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener):
        while self.listener is listener:
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        listener, self.listener = self.listener, None
        listener.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        if self.listener is not None:
            self.stop()


class HttpProxy:
    """An HTTP proxy on a loopback port in front of an HTTP server (host:port): each request goes through
    `intercept`, which may answer it itself (status, body) or let it through (None), its headers as `forwarded` says."""

    def __init__(self, endpoint: str):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        target, proxy = endpoint.removeprefix("http://"), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:  # one request at a time: an interception and the request it lets through are atomic
                    answer = proxy.intercept(self.command, self.path, body)
                    if answer is None:
                        conn = http.client.HTTPConnection(target, timeout=30)
                        conn.request(self.command, self.path, body=body, headers=proxy.forwarded(dict(self.headers)))
                        reply = conn.getresponse()
                        status, headers, data = reply.status, reply.getheaders(), reply.read()
                        conn.close()
                    else:
                        status, data = answer
                        headers = [("Content-Type", "application/json")]
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _forward

            def log_message(self, *args):
                pass

        self.target, self.lock = target, threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def intercept(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        return None

    def forwarded(self, headers: dict) -> dict:
        return headers

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class UnconditionalS3(HttpProxy):
    """In front of the S3 server, drops If-None-Match and If-Match from every request: an S3-compatible store that
    ignores conditional writes (as older MinIO and some Ceph gateways do)."""

    def forwarded(self, headers: dict) -> dict:
        return {k: v for k, v in headers.items() if k.lower() not in ("if-none-match", "if-match")}


class GenerationGcs(HttpProxy):
    """In front of a GCS emulator (gcp-storage-emulator, which keeps generations but ignores preconditions), answers
    as Google Cloud Storage does: a request with ifGenerationMatch=N (0: the object must not exist) on an object of
    another generation gets 412, atomically with the request it lets through."""

    def intercept(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        import http.client
        from urllib.parse import parse_qs, quote, unquote, urlsplit

        url = urlsplit(path)
        query = parse_qs(url.query)
        if "ifGenerationMatch" not in query:
            return None
        parts = url.path.split("/")  # [/upload|/download]/storage/v1/b/BUCKET/o[/OBJECT]
        bucket = parts[parts.index("b") + 1]
        if "o" in parts and parts.index("o") + 1 < len(parts):
            name = unquote("/".join(parts[parts.index("o") + 1:]))
        elif "name" in query:  # a media upload
            name = query["name"][0]
        else:  # a multipart upload: the name is in its JSON part
            name = json.loads(re.search(rb"\{.*?\}\r?\n", body).group(0))["name"]
        conn = http.client.HTTPConnection(self.target, timeout=30)
        conn.request("GET", f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}")
        reply = conn.getresponse()
        meta = reply.read()
        conn.close()
        generation = json.loads(meta)["generation"] if reply.status == 200 else "0"
        if str(generation) == query["ifGenerationMatch"][0]:
            return None
        return 412, json.dumps({"error": {"code": 412, "message": "At least one of the pre-conditions you specified "
                                          "did not hold.", "errors": [{"reason": "conditionNotMet"}]}}).encode()


@pytest.fixture(scope="session")
def gcs_endpoint():
    """host:port of a Google Cloud Storage server with generation preconditions (a GCS emulator behind
    GenerationGcs) running in this process for the whole session."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    proxy = GenerationGcs(f"127.0.0.1:{port}")
    yield proxy.endpoint
    proxy.close()
    server.stop()


def gs_uri(endpoint: str, bucket: str, path: str = "") -> str:
    return f"gs://{bucket}/{path}?endpoint_override={endpoint}&scheme=http&anonymous=true"


def new_gs_bucket(endpoint: str) -> str:
    """Create a fresh bucket on the test GCS server; returns its name."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    name = f"lgd-{uuid.uuid4().hex[:12]}"
    storage.Client(project="anonymous", credentials=AnonymousCredentials(),
                   client_options={"api_endpoint": f"http://{endpoint}"}).create_bucket(name)
    return name


@pytest.fixture(params=["local", "s3", "gs"])
def store(request, tmp_path) -> Location:
    """The same test on a local folder, on the S3 server and on the GCS server (as Ray's test_persistence
    parametrises its storage)."""
    if request.param == "local":
        return Location(str(tmp_path / "store"))
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        return Location(s3_uri(endpoint, new_bucket(endpoint), "store"))
    endpoint = request.getfixturevalue("gcs_endpoint")
    return Location(gs_uri(endpoint, new_gs_bucket(endpoint), "store"))

TINY = [  # patch 2: the suite's tolerances were set on this tiny prior (the digits config's own has patch 4)
    "prior.train_steps=300", "prior.patch_size=2", "prior.depth=2", "prior.num_heads=2", "prior.head_dim=32",
    "prior.num_steps=10", "prior.batch_size=64", "prior.cfg_scale=2.0", "guidance.window=[0,9]",
    "reference.train.epochs=8", "student.train.epochs=30",
    "distill.seed_ipc=2", "distill.ipc_per_stage=2", "distill.stages=2", "distill.classes_per_chunk=4",
    "distill.sample_batch=16",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The session's model cache; LGD_TEST_CACHE=DIR keeps the tiny prior and reference between runs (development
    only: CI and a fresh checkout start from an empty one)."""
    kept = os.environ.get("LGD_TEST_CACHE")
    return Path(kept) if kept else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_overrides(cache_dir):
    """Overrides that make the digits config a seconds-long run, sharing one trained prior and reference."""
    return TINY + [f"cache={cache_dir}"]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    return load_config("digits", tiny_overrides)


@pytest.fixture(scope="session")
def trained(tiny_cfg):
    """(prior, reference, real train split, real test split) of the tiny digits config."""
    from lgd_ray.data import load_split
    from lgd_ray.prior import load_prior
    from lgd_ray.prior_make import ensure_prior
    from lgd_ray.reference import ensure_reference

    prior = load_prior(ensure_prior(tiny_cfg), tiny_cfg.prior.scheduler)
    reference, _ = ensure_reference(tiny_cfg, 10)
    return prior, reference.requires_grad_(False), load_split(tiny_cfg.data, "train"), load_split(tiny_cfg.data, "test")


@pytest.fixture(scope="session")
def tiny_run(trained, tiny_overrides, tmp_path_factory):
    """(config, run folder, manifest, log lines) of one tiny digits run in this process, shared by the stage-loop,
    evaluation and report tests (a test that damages it restores it)."""
    from lgd_ray.stages import run_stages

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = load_config("digits", tiny_overrides + [f"out={out}"])
    lines = []
    manifest = run_stages(cfg, out, log=lines.append)
    return cfg, out, manifest, lines


def tiny_latent_pipeline(num_classes: int = 1000, learned_sigma: bool = True) -> DiTPipeline:
    """A DiT-XL/2-shaped pipeline at toy size: 1000-class latent DiT (learned sigma), tiny AutoencoderKL, DDIM."""
    return random_pipeline(
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8 if learned_sigma else 4,
             num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=1),
        dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
             up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
             norm_num_groups=4, sample_size=16))


@pytest.fixture(scope="session")
def latent_pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-dit-256")
    tiny_latent_pipeline().save_pretrained(path)
    return path


def s3_cache_of(cfg, endpoint: str) -> Location:
    """A cache on the S3 server holding a copy of the local cache's prior and reference of `cfg` (staged as a user
    stages a hub DiT: `python -m lgd_ray.prior stage`), so runs on S3 use the very same models as local runs."""
    from dataclasses import replace

    from lgd_ray.prior import prior_dir
    from lgd_ray.prior_make import stage_prior
    from lgd_ray.reference import reference_path
    from lgd_ray.train import info_location

    cache = Location(s3_uri(endpoint, new_bucket(endpoint), "cache"))
    remote = replace(cfg, cache=str(cache))
    stage_prior(prior_dir(cfg).path, str(prior_dir(remote)))
    for src, dst in ((reference_path(cfg), reference_path(remote)),
                     (info_location(reference_path(cfg)), info_location(reference_path(remote)))):
        dst.write_bytes(src.read_bytes())
    return cache


def wait_until(ready, proc, log, what: str, timeout: float = 600):
    """Poll ready() until true; fail with the tail of the process's output if it exits first or ready() stays false
    for `timeout` seconds (generous: 2 shared cores are slow)."""
    import time

    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            why = f"exited with {proc.returncode}" if proc.returncode is not None else f"not in {timeout:.0f} s"
            pytest.fail(f"the driver made no progress ({what}; {why}):\n{tail}")
        time.sleep(0.25)


def kill_when(args: list[str], ready, what: str, timeout: float = 600):
    """Start `args` in its own session, SIGKILL it (and its children) once ready() is true (see wait_until)."""
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(ready, proc, log, what, timeout)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
