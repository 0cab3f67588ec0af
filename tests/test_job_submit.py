"""`ray job submit` of the digits config against a local `ray start --head` with token auth, as on a cluster."""
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lgd_ray.shards import read_manifest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_with_token_auth(trained, tiny_overrides, tmp_path):
    token = tmp_path / "auth_token"  # as the cluster files hand it to nodes: a file, mode 600, RAY_AUTH_TOKEN_PATH
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN", None)
    port, dash = _free_port(), _free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--include-dashboard=true"], env=env, check=True, capture_output=True,
                   timeout=120)
    try:
        # strangers reach the port: one with a wrong token, one with none; the job API refuses both
        for stranger, said in (({**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}, "Invalid authentication token"),
                               ({**env, "RAY_AUTH_MODE": "disabled"}, "Authentication")):
            r = subprocess.run([RAY, "job", "list", f"--address=http://127.0.0.1:{dash}"], env=stranger,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode != 0 and said in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
        out = tmp_path / "job-run"
        entry = [sys.executable, "-m", "lgd_ray.distill", "digits", *tiny_overrides, "distill.stages=0",
                 "ray.actors=1", f"out={out}"]
        r = subprocess.run([RAY, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                            "--runtime-env-json", '{"excludes": [".venv", "runs", ".git"]}', "--", *entry],
                           env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert "succeeded" in r.stdout + r.stderr and "Connecting to existing Ray cluster" in r.stdout + r.stderr
        manifest = read_manifest(out)
        assert manifest["stages"]["0"]["trained"] and sum(s["count"] for s in manifest["shards"]) == 20
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


OTHER_RAY = """
import sys
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
print(c.address, flush=True)
sys.stdin.read()  # until the test closes it
c.shutdown()
"""


@pytest.mark.slow
def test_a_run_beside_another_ray_instance_says_nothing_of_it(trained, tiny_overrides, cache_dir, tmp_path):
    """Another Ray instance runs on the machine (started first): a run on its own local Ray fits theta* on Ray Train
    (a cache with the prior but no reference) and none of its processes (Ray Train's placement-group cleaner, which
    looks Ray up by address) fails on "multiple active Ray instances"."""
    import shutil

    cache = tmp_path / "cache"
    cache.mkdir()
    for prior in Path(cache_dir).glob("prior-*"):
        shutil.copytree(prior, cache / prior.name)
    other = subprocess.Popen([sys.executable, "-c", OTHER_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip()  # its address: it is up
        r = subprocess.run([sys.executable, "-m", "lgd_ray.distill", "digits", *tiny_overrides, "distill.stages=0",
                            "ray.actors=1", f"cache={cache}", f"out={tmp_path / 'run'}"],
                           capture_output=True, text=True, timeout=600)
    finally:
        other.stdin.close()
        other.wait(timeout=120)
    said = r.stdout + r.stderr
    assert r.returncode == 0 and "reference: training" in said, said[-3000:]
    assert "multiple active Ray instances" not in said and "Traceback" not in said, said[-3000:]
