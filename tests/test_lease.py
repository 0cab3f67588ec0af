"""One driver per run folder (lgd_ray/lease.py), on a local folder and on the S3 server: a second driver is refused
in one line, a live driver's lease is renewed, a dead driver's lease lapses and is taken over."""
import json
import os
import signal
import socket
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
@pytest.mark.parametrize("where", ["local", "s3", "gs"])
def test_two_drivers_on_one_run_folder(where, trained, tiny_overrides, tmp_path, request):
    """A driver started on a folder another driver is writing (stopped with SIGSTOP, so that it cannot finish first
    on a loaded machine; its lease of 30 s holds) exits 2 in one line; after `kill -9` of the first, `--resume` at
    once takes its lease over (its process on this host is gone) and finishes the run."""
    if where == "local":
        out = str(tmp_path / "run")
    elif where == "s3":
        out = str(request.getfixturevalue("s3_root") / "run")
    else:
        from conftest import gs_uri, new_gs_bucket

        endpoint = request.getfixturevalue("gcs_endpoint")
        out = gs_uri(endpoint, new_gs_bucket(endpoint), "run")
    args = [sys.executable, "-m", "lgd_ray.distill", "digits", *tiny_overrides, "distill.stages=1", "ray.enabled=false",
            "storage.lease_s=30", f"out={out}"]
    lease = (tmp_path / "run" / LEASE) if where == "local" else None
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (Location(out) / "manifest.json").exists():
            assert first.poll() is None and time.time() < deadline, "the first driver made no progress"
            time.sleep(0.25)
        os.killpg(first.pid, signal.SIGSTOP)
        second = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1 and "held by another driver" in err[0], second.stderr[-2000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lease is None or lease.exists()  # the killed driver's lease is left behind, unexpired: on this host, its
    third = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)  # process is provably gone
    assert third.returncode == 0 and "distill: done" in third.stdout, third.stderr[-2000:]
    took = [line for line in third.stdout.splitlines() if line.startswith("lease:")]
    assert took == [f"lease: took over the run folder from {socket.gethostname()}:{first.pid}:" + took[0].split(":")[3]
                    + f": process {first.pid} of this host ({socket.gethostname()}) no longer exists"], third.stdout


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


def test_a_store_that_refuses_the_leases_requests_is_one_line(s3_endpoint, gcs_endpoint):
    """A bucket that is not there (or credentials it refuses) on S3 or GCS: one line naming the run folder."""
    from conftest import gs_uri, s3_uri
    from lgd_ray.storage import StorageError

    for uri in (s3_uri(s3_endpoint, "no-such-bucket", "run"), gs_uri(gcs_endpoint, "no-such-bucket", "run")):
        with pytest.raises(StorageError, match=rf"^storage: cannot take the lease of {uri.split('?')[0]}\?.*: \w+"):
            Lease(Location(uri), ttl_s=2).acquire()


CHILD = """
import sys, time
from lgd_ray.lease import Lease, LeaseError
from lgd_ray.storage import Location
lease = Lease(Location(sys.argv[1]), ttl_s=1, wait_s=30).acquire()
with open(sys.argv[2], "a") as log:
    while True:
        try:
            lease.check()
        except LeaseError as e:
            print(e, file=sys.stderr)
            sys.exit(3)
        log.write(f"{time.time()}\\n")  # the time its check passed
        log.flush()
        time.sleep(0.05)
"""


def test_a_stopped_driver_whose_lease_was_taken_stops_at_its_next_check(store, tmp_path):
    """Driver A is stopped (SIGSTOP) past its lease; B takes the run folder over; A, continued, finds its lease run
    out by the clock, waits for its renewal, sees B and stops in one line: no check of A passes after B took over."""
    run, log = store / "run", tmp_path / "a.log"
    (tmp_path / "a.py").write_text(CHILD)
    a = subprocess.Popen([sys.executable, str(tmp_path / "a.py"), str(run), str(log)], stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.time() + 60
        while not (log.exists() and log.read_text().count("\n") > 3):
            assert a.poll() is None and time.time() < deadline, a.stderr.read() if a.poll() is not None else "slow"
            time.sleep(0.1)
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(2.5)  # past A's 1-s lease
        with Lease(run, ttl_s=1) as b:
            taken = time.time()
            os.kill(a.pid, signal.SIGCONT)
            assert a.wait(timeout=30) == 3
            b.check()
        err = a.stderr.read().strip().splitlines()
        assert len(err) == 1 and f"lost its lease (lease.json now names {b.holder})" in err[0], err
        assert max(map(float, log.read_text().split())) < taken
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()


def test_an_outage_longer_than_the_lease_is_ridden_out(s3_endpoint):
    """The S3 server cut off (TCP proxy) for 1.5x the lease: the holder's check waits and then passes once the store
    answers (the lease, still its own, is taken back); with a wait shorter than the outage it stops in one line."""
    from conftest import TcpProxy, new_bucket, s3_uri

    bucket = new_bucket(s3_endpoint)
    with TcpProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        run = Location(s3_uri(f"127.0.0.1:{proxy.port}", bucket, "run"))
        with Lease(run, ttl_s=2, wait_s=30) as lease:
            proxy.stop()
            time.sleep(3)
            proxy.start()
            lease.check()
            assert lease.lost is None and json.loads((run / LEASE).read_text())["holder"] == lease.holder
        with Lease(run, ttl_s=2, wait_s=0.5) as lease:
            proxy.stop()
            time.sleep(3)
            with pytest.raises(LeaseError, match=r"lease ran out at .* and was not renewed within 0.5 s"):
                lease.check()
            proxy.start()


def test_a_holder_of_this_host_whose_process_is_gone_is_taken_over_at_once(store):
    run = store / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run / LEASE).write_text(json.dumps({"holder": f"{socket.gethostname()}:{gone.pid}:dead",
                                         "expires": time.time() + 600}))
    with Lease(run, ttl_s=2) as lease:
        assert lease.took_over == (f"{socket.gethostname()}:{gone.pid}:dead: process {gone.pid} of this host "
                                   f"({socket.gethostname()}) no longer exists")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live process of this host, or a holder on another host, keeps its lease until it lapses
        for holder in (f"{socket.gethostname()}:{alive.pid}:live", f"elsewhere:{gone.pid}:other"):
            (run / LEASE).write_text(json.dumps({"holder": holder, "expires": time.time() + 600}))
            with pytest.raises(LeaseError, match="held by another driver"):
                Lease(run, ttl_s=2).acquire()
    finally:
        alive.kill()


def test_a_holder_whose_ray_job_has_ended_is_taken_over_at_once(local_ray, store):
    """A driver of this Ray cluster (as a driver on another host would be: its process still there) whose Ray job has
    ended gives its lease up at once to a driver of the same cluster; one whose job runs keeps it."""
    import ray

    run = store / "run"
    script = f"""
import sys, time, ray
from lgd_ray.lease import Lease
from lgd_ray.storage import Location
ray.init(address={ray.get_runtime_context().gcs_address!r}, log_to_driver=False)
lease = Lease(Location({run.uri!r}), ttl_s=600).acquire()
lease._stop.set()  # no renewals: the lease stays as written
print(lease.holder, ray.get_runtime_context().get_job_id(), flush=True)
sys.stdin.readline()
ray.shutdown()  # the Ray job ends; the process lives on
print("shut", flush=True)
time.sleep(600)
"""
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder, job = other.stdout.readline().split()
        assert json.loads((run / LEASE).read_text())["ray_job"].endswith(f"/{job}")
        with pytest.raises(LeaseError, match="held by another driver"):  # its job runs
            Lease(run, ttl_s=2).acquire()
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "shut"
        deadline = time.time() + 30
        while True:  # the GCS marks the job dead once its driver has disconnected
            try:
                lease = Lease(run, ttl_s=2).acquire()
                break
            except LeaseError:
                assert time.time() < deadline, "the ended job's lease was not taken over"
                time.sleep(0.5)
        lease.release()
        assert other.poll() is None and lease.took_over.startswith(f"{holder}: its Ray job {job} on this cluster (session_")
        assert lease.took_over.endswith(") has ended")
    finally:
        other.kill()
        other.wait()


def test_a_renewal_whose_put_landed_but_whose_reply_was_lost_keeps_the_lease(store):
    """The put lands, its reply is lost, the client sends it again: the condition (the version read before) fails.
    The renewal reads the lease back, finds its own body and keeps the lease; another holder's would end it."""
    with Lease(store / "run", ttl_s=30) as lease:  # no renewal of its own during the test
        replace = lease._replace

        def reply_lost(body, current):
            assert replace(body, current)  # the put lands ...
            return replace(body, current)  # ... and the one sent again is refused: the version changed

        lease._replace = reply_lost
        assert lease._renew(lease._body()) is None
        lease._replace = replace
        (store / "run" / LEASE).write_text(json.dumps({"holder": "other:1:x", "expires": time.time() + 60}))
        assert lease._renew(lease._body()) == f"{LEASE} now names other:1:x"
        lease.lost = "taken in the test"  # released without deleting the other's lease


@pytest.mark.slow
def test_two_drivers_on_one_empty_cache_make_each_model_once(s3_root, tmp_path):
    """Two drivers (separate run folders, one cache on the S3 server: the shared cache of a cluster) started together:
    one fits the prior and the reference, the other waits on each cache entry's lease, says so, then uses what the
    first made; both manifests record the same sha256. (The lease's local-folder path is tested above.)"""
    from conftest import TINY

    cache = s3_root / "cache"
    runs = [str(tmp_path / f"run{i}") for i in range(2)]
    args = [sys.executable, "-m", "lgd_ray.distill", "digits", *TINY, "distill.stages=1", "ray.enabled=false",
            "storage.lease_s=3", f"cache={cache}"]
    drivers = [subprocess.Popen(args + [f"out={run}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for run in runs]
    said = [d.communicate(timeout=900) for d in drivers]
    assert all(d.returncode == 0 for d in drivers), [err[-2000:] for _, err in said]
    out = "\n".join(o for o, _ in said)
    assert out.count("prior: training a pixel DiT") == 1 and out.count("reference: training") == 1, out
    assert out.count("cache: waiting for another driver to make") >= 1, out
    manifests = [json.loads((Location(run) / "manifest.json").read_text()) for run in runs]
    for key in ("prior_sha256", "reference_sha256"):
        assert manifests[0][key] and manifests[0][key] == manifests[1][key]


def test_a_stale_drivers_chunk_writes_no_shard(store, trained, tiny_overrides):
    """Driver A's lease lapses (A stopped renewing) and driver B takes the run folder over: a chunk made for A, as
    an actor of A still would, is refused before its shard is written; B's chunk writes it."""
    from lgd_ray.config import load_config
    from lgd_ray.data import class_chunks
    from lgd_ray.methods import ChunkMaker
    from lgd_ray.methods import stage_plan
    from lgd_ray.plan import ChunkTask

    run = store / "run"
    cfg = load_config("digits", tiny_overrides + [f"out={run}"])
    task = ChunkTask(stage_plan(cfg)[0], 0, class_chunks(10, 4)[0])
    a = Lease(run, ttl_s=1).acquire()
    a._stop.set()  # A stops renewing: a SIGSTOPped driver, as far as the store can tell
    a._thread.join()
    time.sleep(1.2)
    with Lease(run, ttl_s=5) as b:
        with pytest.raises(LeaseError, match=rf"its lease names {b.holder}, not this driver \({a.holder}\): another "
                                             "driver took it over"):
            ChunkMaker(cfg, run, holder=a.holder).make(task, None, [])
        assert not (run / "stage-00" / "shard-000000.tar").exists()
        row = ChunkMaker(cfg, run, holder=b.holder).make(task, None, [])
        assert (run / row["path"]).sha256() == row["sha256"]


def test_manifest_writes_are_conditional_on_the_drivers_last_write(store):
    """Driver A writes the manifest; its lease lapses and B takes the folder over and writes; A's next write, even one
    that passed its lease check (a put already on its way when A was stopped), is refused and leaves B's bytes."""
    run = store / "run"
    a = Lease(run, ttl_s=1).acquire()
    a.write("manifest.json", b"A1")
    a.write("manifest.json", b"A2")
    a._stop.set()
    a._thread.join()
    time.sleep(1.2)
    with Lease(run, ttl_s=5) as b:
        b.write("manifest.json", b"B1")
        a.tag = (a.tag[0], time.time() + 60)  # as if A's check had passed just before it was stopped
        with pytest.raises(LeaseError, match="manifest.json was written by another driver since this one's last write"):
            a.write("manifest.json", b"A3")
        assert (run / "manifest.json").read_bytes() == b"B1"
        b.write("manifest.json", b"B2")
        assert (run / "manifest.json").read_bytes() == b"B2"


@pytest.mark.parametrize("damage", [b'{"holder": "host:1:x", "expi', b"\xff\xfe", b'["a list"]', b'{"holder": 7}'])
def test_a_damaged_lease_holds_nothing(store, damage):
    """A lease.json cut short, edited or not UTF-8 is read as lapsed: the next driver replaces it (conditionally on
    its bytes, as any lapsed lease), no traceback."""
    run = store / "run"
    (run / LEASE).write_bytes(damage)
    with Lease(run, ttl_s=2) as lease:
        assert json.loads((run / LEASE).read_text())["holder"] == lease.holder


def test_a_store_that_ignores_conditional_writes_is_refused_in_one_line(s3_endpoint):
    """Behind a proxy that drops If-None-Match / If-Match the lease would exclude no one: acquiring it is refused,
    and nothing is left in the run folder; through the server itself the same folder is leased."""
    from conftest import UnconditionalS3, new_bucket, s3_uri

    bucket, proxy = new_bucket(s3_endpoint), UnconditionalS3(s3_endpoint)
    try:
        with pytest.raises(LeaseError, match="ignores conditional writes"):
            Lease(Location(s3_uri(proxy.endpoint, bucket, "run")), ttl_s=10).acquire()
        direct = Location(s3_uri(s3_endpoint, bucket, "run"))
        assert not direct.exists() or not list(direct.iterdir())  # the probe object is gone
        with Lease(direct, ttl_s=10):
            assert (direct / LEASE).exists()
    finally:
        proxy.close()


def test_a_fenced_write_rides_out_a_short_store_outage(s3_endpoint, monkeypatch):
    """A manifest write through the lease (boto3, not pyarrow) retries a store it cannot reach for storage.retry_s,
    as every other store access does: a 3-s outage mid-run is waited out, not a crash."""
    import threading

    from conftest import TcpProxy, new_bucket, s3_uri

    monkeypatch.setenv("LGD_STORAGE_RETRY_S", "30")
    bucket = new_bucket(s3_endpoint)
    with TcpProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        with Lease(Location(s3_uri(f"127.0.0.1:{proxy.port}", bucket, "run")), ttl_s=60, wait_s=30) as lease:
            lease.write("manifest.json", b"first")
            proxy.stop()
            threading.Timer(3.0, proxy.start).start()
            start = time.monotonic()
            lease.write("manifest.json", b"second")
            assert time.monotonic() - start >= 2.5  # it waited for the store
    assert (Location(s3_uri(s3_endpoint, bucket, "run")) / "manifest.json").read_bytes() == b"second"


def test_every_file_the_driver_writes_goes_through_its_lease(store, trained, tiny_overrides):
    """The manifest, each stage's student and the report with its figures are written by the driver through its lease
    (fenced: refused once another driver wrote them); shards are the actors' (check_holder) and the timeline's parts
    are named per driver."""
    from lgd_ray.config import load_config
    from lgd_ray.stages import run_stages

    class Recorded(Lease):
        def write(self, name, data):
            self.names.append(name)
            super().write(name, data)

    run = store / "run"
    cfg = load_config("digits", tiny_overrides + ["distill.stages=1", f"out={run}"])
    with Recorded(run, ttl_s=30) as lease:
        lease.names = []
        run_stages(cfg, run, lease=lease, log=lambda _: None)
    files = {p for p, _, _ in run.listing()} - {"lease.json", ".lease.lock"}
    by_driver = {p for p in files if not p.endswith(".tar") and not p.startswith("timeline/")}
    assert {"manifest.json", "stage-00/student.safetensors", "stage-01/student.json", "report.md",
            "report/accuracy.png", "report/stage1.png"} <= by_driver
    assert by_driver == set(lease.names), by_driver ^ set(lease.names)
