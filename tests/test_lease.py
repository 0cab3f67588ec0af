"""One driver per run folder (lgd_ray/lease.py), on a local folder and on the S3 server: a second driver is refused
in one line, a live driver's lease is renewed, a dead driver's lease lapses and is taken over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lgd_ray.lease import LEASE, Lease, LeaseError
from lgd_ray.storage import Location


def test_a_held_folder_is_refused_renewed_and_released(store):
    run = store / "run"
    with Lease(run, ttl_s=1) as first:
        with pytest.raises(LeaseError, match=rf"held by another driver \({first.holder}\) until .* UTC .*lease_s 1\)"):
            Lease(run, ttl_s=1).acquire()
        time.sleep(1.5)  # longer than the lease: its holder renewed it
        with pytest.raises(LeaseError, match="held by another driver"):
            Lease(run, ttl_s=1).acquire()
        first.check()
    assert not (run / LEASE).exists()  # released
    with Lease(run, ttl_s=2):
        pass


def test_a_lapsed_lease_is_taken_over(store):
    """A crashed driver's lease.json stays behind with its expiry passed: the next driver takes the folder over."""
    run = store / "run"
    (run / LEASE).write_text(json.dumps({"holder": "host:1:dead", "expires": time.time() - 1}))
    with Lease(run, ttl_s=2) as lease:
        assert json.loads((run / LEASE).read_text())["holder"] == lease.holder


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_on_one_run_folder(where, trained, tiny_overrides, tmp_path, s3_root):
    """A driver started on a folder another driver is writing exits 2 in one line; after `kill -9` of the first and
    the lapse of its lease, `--resume` finishes the run."""
    out = str(tmp_path / "run") if where == "local" else str(s3_root / "run")
    args = [sys.executable, "-m", "lgd_ray.distill", "digits", *tiny_overrides, "distill.stages=1", "ray.enabled=false",
            "storage.lease_s=2", f"out={out}"]
    lease = (tmp_path / "run" / LEASE) if where == "local" else None
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (Location(out) / "manifest.json").exists():
            assert first.poll() is None and time.time() < deadline, "the first driver made no progress"
            time.sleep(0.25)
        second = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1 and "held by another driver" in err[0], second.stderr[-2000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lease is None or lease.exists()  # the killed driver's lease is left behind ...
    time.sleep(3)  # ... and lapses
    third = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "distill: done" in third.stdout, third.stderr[-2000:]


@pytest.mark.parametrize("form", ["{host}&scheme=http", "http://{host}", "http://{host}/&scheme=https"])
def test_every_endpoint_form_pyarrow_takes_works_for_the_lease(form, s3_endpoint):
    """endpoint_override as HOST:PORT with scheme, or as a full URL (which pyarrow also accepts): the lease's boto3
    client reaches the same server as the run's reads and writes (issue 42's regression)."""
    from conftest import new_bucket

    bucket = new_bucket(s3_endpoint)
    run = Location(f"s3://{bucket}/run?endpoint_override=" + form.format(host=s3_endpoint))
    (run / "probe.txt").write_text("written by pyarrow")
    with Lease(run, ttl_s=2) as lease:
        assert json.loads((run / LEASE).read_text())["holder"] == lease.holder
    assert not (run / LEASE).exists() and (run / "probe.txt").read_text() == "written by pyarrow"


def test_a_malformed_endpoint_is_one_line(s3_endpoint):
    from lgd_ray.storage import StorageError

    for bad in (f"ftp://{s3_endpoint}", f"http://{s3_endpoint}/path", "http://"):
        with pytest.raises(StorageError, match=r"endpoint_override=.*give HOST:PORT"):
            Lease(Location(f"s3://b/run?endpoint_override={bad}"), ttl_s=2)
