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
