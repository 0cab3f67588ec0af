"""One driver per run folder: a lease object in it (`lease.json`: holder, expiry), made only where none is, renewed by
its holder while it runs, taken over by another driver only once it has expired.

    local folder   O_EXCL creation; read, check and replace under an exclusive flock of `.lease.lock`
    s3://, gs://   conditional puts (only if absent to create, only if at the version read to renew or take over:
                   lgd_ray/conditional.py; docs/DESIGN.md section 8); a store that ignores them (a probe put twice
                   only if absent: both succeed) is refused in one line
    other stores   written, then read back after a pause: the last writer holds it (no conditional writes there)

A driver that crashed leaves its lease to lapse after `storage.lease_s`, so `--resume` after a crash needs no
clean-up; one on the same host whose process is gone, or one whose Ray job on the cluster this driver is connected
to has ended, is taken over at once. A second driver on a held folder is
refused in one line naming the holder and the expiry. The holder checks its lease by the clock before it writes
(`check`): one whose lease ran out (stopped, or cut off from the store) waits for a renewal, and stops once another
holder is seen or `storage.retry_s` has passed; a renewal that finds the lease still its own after an outage takes it
back, so an outage shorter than `storage.retry_s` never ends a run.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from lgd_ray.errors import UserError
from lgd_ray.conditional import Conflict, key_of, objects_for
from lgd_ray.storage import StorageError, as_location, file_lock, with_retries

LEASE = "lease.json"
LOCK = ".lease.lock"
LOCK_WAIT_S = 30.0  # longest wait for the local lock (held for a read and a write only)


class LeaseError(UserError):
    """Another driver holds the run folder, or this driver lost its lease (one line)."""


def _expiry(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Lease:
    """The lease of one run folder for this process; a context manager (acquire on entry, release on exit)."""

    def __init__(self, run_dir, ttl_s: float, wait_s: float = 0.0):
        self.run_dir, self.ttl_s, self.wait_s = as_location(run_dir), ttl_s, wait_s
        self.loc = self.run_dir / LEASE
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tag = None  # (our version in the store: its bytes, or its ETag on s3; its expiry), set when written
        self.lost: str | None = None  # why the lease is lost: another holder was seen
        self.took_over: str | None = None  # the holder whose lease this one replaced, and why
        self._stop = threading.Event()
        self._renewed = threading.Event()  # set by every renewal (check() waits on it while the lease has lapsed)
        self._thread = None
        self._written: dict[str, object] = {}  # name -> what this driver last wrote there (its ETag on S3)
        # s3:// and gs://: conditional puts (lgd_ray/conditional.py); a renewal that hangs must not outlive the lease:
        # time-outs well under a third of it
        self._objects = objects_for(self.loc, max(0.5, ttl_s / 6))

    def _key(self, name: str = LEASE) -> str:
        """The object key of run_dir/name (in the lease's bucket)."""
        return key_of(self.run_dir / name)

    # -- the lease -------------------------------------------------------------------------------------------------
    def acquire(self):
        """Hold the lease, or raise LeaseError naming who holds it and until when; then renew it every ttl_s / 3. A
        store that refuses the lease's requests (credentials, permissions) is one line (StorageError)."""
        try:
            self._take()
        except (LeaseError, StorageError):
            raise
        except Exception as e:
            if not self._objects:
                raise
            raise StorageError(f"storage: cannot take the lease of {self.run_dir}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from e
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="lgd_ray-lease")
        self._thread.start()
        return self

    def _take(self):
        if self._objects:
            self._probe_conditions()
        body = self._body()
        if not self._create(body):
            current = self._read()
            gone = current is not None and _holder_gone(current[0])
            if gone:
                self.took_over = f"{current[0]['holder']}: {gone}"
            elif current is not None and current[0]["holder"] != self.holder and current[0]["expires"] > time.time():
                raise LeaseError(f"run folder {self.run_dir} is held by another driver ({current[0]['holder']}) "
                                 f"until {_expiry(current[0]['expires'])} ({LEASE}, renewed while it runs): wait for "
                                 f"it to finish, or, if it died on another host, for its lease to lapse (storage.lease_s {self.ttl_s:g})")
            if not self._replace(body, current):
                raise LeaseError(f"run folder {self.run_dir}: another driver took the lapsed lease first")

    def check(self):
        """Return while this driver's lease has not run out (by the clock, less a margin); while it has (a stopped
        process, a store outage), wait up to wait_s for the renewal; raise LeaseError once another holder is seen or
        the wait is over, so that a driver whose lease ran out never writes."""
        deadline = time.time() + self.wait_s
        while True:
            if self.lost:
                raise LeaseError(f"run folder {self.run_dir}: this driver lost its lease ({self.lost}); stopped so "
                                 "that two drivers never write one run")
            if time.time() < self.tag[1] - self.ttl_s / 6:
                return
            if time.time() >= deadline:
                raise LeaseError(f"run folder {self.run_dir}: this driver's lease ran out at {_expiry(self.tag[1])} "
                                 f"and was not renewed within {self.wait_s:g} s (storage.retry_s): stopped so that "
                                 "two drivers never write one run")
            self._renewed.clear()
            self._renewed.wait(min(0.5, max(0.0, deadline - time.time())))

    def write(self, name: str, data: bytes):
        """Write run_dir/name as this driver's, fenced: only while the lease holds (check) and only if the object is
        as this driver last wrote it (before its first write: as it is now). On S3 a conditional put (If-Match on the
        ETag of our last write), so that even a put sent before this process was stopped cannot land over another
        driver's; on a local folder a compare and replace under the folder's flock; on other stores check and write.
        Raises LeaseError once another process wrote it."""
        self.check()
        loc = self.run_dir / name
        last = self._written.get(name)
        if self._objects:
            self._written[name] = with_retries(lambda: self._store_write(name, data, last), f"write {loc}",
                                               self._objects.transient, lambda e: type(e).__name__)
        elif loc.is_local:
            with self._local_lock():
                now = loc.read_bytes() if loc.exists() else None
                if last is not None and now != last:
                    raise LeaseError(f"run folder {self.run_dir}: {name} was written by another driver since this "
                                     "one's last write: stopped so that two drivers never write one run")
                loc.write_bytes(data)
            self._written[name] = data
        else:
            loc.write_bytes(data)

    def fenced(self, fn):
        """fn, whose result is handed on only while this lease holds (check() after it returns): a fit that outlived
        its lease does not get to save."""
        def run(*args, **kwargs):
            result = fn(*args, **kwargs)
            self.check()
            return result
        return run

    def release(self):
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost is None:
            with contextlib.suppress(Exception):
                self._delete()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def _body(self) -> dict:
        body = {"holder": self.holder, "expires": time.time() + self.ttl_s}
        job = _ray_job()
        if job:  # a driver of a Ray cluster: its job, so that another driver there sees when it has ended
            body["ray_job"] = job
        return body

    def _renew_loop(self):
        """Renew every ttl_s / 3 (every second while the lease has lapsed); an unreachable store is tried again, and
        the lease is lost only when the store names another holder (or none: it was taken and released)."""
        while not self._stop.wait(self.ttl_s / 3 if time.time() < self.tag[1] else min(1.0, self.ttl_s / 3)):
            try:
                self.lost = self._renew(self._body())
            except Exception:  # the store is out of reach: our lease, if it lapses, is taken back when it answers
                continue
            if self.lost:
                return
            self._renewed.set()

    def _renew(self, body: dict) -> str | None:
        """One renewal to `body`, conditional on the version read; None if it holds, else why the lease is lost."""
        current = self._read()
        if current is None or current[0]["holder"] != self.holder:
            return f"{LEASE} now names {current[0]['holder'] if current else 'nobody'}"
        if self._replace(body, current):
            return None
        now = self._read()  # the condition failed: our own write landed first (a reply lost, the put sent again)?
        if now is not None and now[0] == body:
            self.tag = (now[1], body["expires"])
            return None
        return f"{LEASE} now names {now[0]['holder'] if now else 'nobody'}"

    # -- the backends ----------------------------------------------------------------------------------------------
    def _create(self, body: dict) -> bool:
        """Write the lease where none is; False if one is there."""
        data = json.dumps(body).encode()
        if self._objects:
            return self._put(data, body, None)
        if self.loc.is_local:
            with self._local_lock():
                try:
                    fd = os.open(self.loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            self.tag = (data, body["expires"])
            return True
        if self.loc.exists():
            return False
        return self._write_and_read_back(data, body)

    def _read(self) -> tuple[dict, object] | None:
        """(the lease, what identifies this version of it), or None if there is none."""
        if self._objects:
            got = self._objects.get(self._key())
            return None if got is None else (_parse(got[0]), got[1])
        if not self.loc.exists():
            return None
        data = self.loc.read_bytes()
        return _parse(data), data

    def _replace(self, body: dict, current: tuple[dict, object] | None) -> bool:
        """Write our lease over the version `current` read; False if another driver changed it since."""
        data = json.dumps(body).encode()
        if self._objects:
            return self._put(data, body, current[1] if current else None)
        if self.loc.is_local:
            with self._local_lock():
                now = self._read()
                if (now[1] if now else None) != (current[1] if current else None):
                    return False
                self.loc.write_bytes(data)
            self.tag = (data, body["expires"])
            return True
        return self._write_and_read_back(data, body)

    def _store_write(self, name: str, data: bytes, last: str | None) -> str:
        """Put run_dir/name if it is at the version `last` (None: as it is now); its new version. A put refused for
        its condition whose bytes are there anyway was this driver's own (a retry after a lost reply)."""
        key = self._key(name)
        if last is None:  # the first write of this driver: over whatever is there now
            last = self._objects.version(key)
        try:
            return self._objects.put(key, data, last)
        except Conflict:
            now = self._objects.get(key)
            if now is not None and now[0] == data:
                return now[1]
            raise LeaseError(f"run folder {self.run_dir}: {name} was written by another driver since this one's "
                             "last write: stopped so that two drivers never write one run") from None

    def _probe_conditions(self):
        """Refuse a store that ignores conditional puts (older MinIO, some Ceph gateways): there the lease excludes
        no one. A probe object beside the lease is put twice only if absent; the second put must be refused."""
        probe = self._key(f".lease-probe-{uuid.uuid4().hex[:8]}")
        self._objects.put(probe, b"", None)
        try:
            self._objects.put(probe, b"", None)
            honoured = False
        except Conflict:
            honoured = True
        finally:
            self._objects.delete(probe, None)
        if not honoured:
            raise LeaseError(f"storage: the store of {self.run_dir} ignores conditional writes (a put only if absent "
                             "over an existing object succeeded), so its lease could not keep a second driver out: use "
                             "a store that honours them (AWS S3 and Google Cloud Storage do), or a local or shared folder")

    def _put(self, data: bytes, body: dict, version: str | None) -> bool:
        """The lease put only if at `version` (None: only if absent); False if the condition failed."""
        try:
            self.tag = (self._objects.put(self._key(), data, version), body["expires"])
        except Conflict:
            return False
        return True

    def _write_and_read_back(self, data: bytes, body: dict) -> bool:
        """Stores without conditional writes: write, wait, read back; whoever wrote last holds the lease."""
        self.loc.write_bytes(data)
        time.sleep(2.0)
        now = self._read()
        if now is None or now[0]["holder"] != self.holder:
            return False
        self.tag = (data, body["expires"])
        return True

    def _delete(self):
        if self._objects:
            self._objects.delete(self._key(), self.tag[0])
        elif self.loc.is_local:
            with self._local_lock():
                now = self._read()
                if now and now[0]["holder"] == self.holder:
                    os.unlink(self.loc.path)
        else:
            now = self._read()
            if now and now[0]["holder"] == self.holder:
                self.loc.delete()

    def _local_lock(self):
        return file_lock(Path(self.run_dir.path) / LOCK, LOCK_WAIT_S)


def check_holder(run_dir, holder: str):
    """Raise LeaseError unless the run folder's lease names `holder`: what an actor or a fit of a driver checks
    before it writes into the run folder, so that a driver's processes stop writing once another driver took the
    folder over (the driver itself stops at its next check())."""
    loc = as_location(run_dir) / LEASE
    try:
        now = json.loads(loc.read_bytes()).get("holder") if loc.exists() else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        now = "a damaged lease"
    if now != holder:
        raise LeaseError(f"run folder {as_location(run_dir)}: its lease names {now or 'nobody'}, not this driver "
                         f"({holder}): another driver took it over, so nothing more is written for this one")


@contextlib.contextmanager
def cache_lock(cache, name: str, ttl_s: float, wait_s: float, what: str = "cache"):
    """Hold the lease of the entry `name` of a folder (a cache; `what` names it in the one line said while waiting):
    `CACHE/.locks/<name>/lease.json`, while this process makes it. A second driver on the same folder waits, saying
    so once, until the first releases it (or its lease lapses, or its process is gone), then finds the entry made.
    Yields the Lease (check() it before writing)."""
    entry = as_location(cache) / name
    lease = Lease(as_location(cache) / ".locks" / name, ttl_s, wait_s)
    if lease.run_dir.is_local:
        Path(lease.run_dir.path).mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        try:
            lease.acquire()
            break
        except LeaseError as e:
            if not said:
                print(f"{what}: waiting for another driver to make {entry} ({e})", flush=True)
                said = True
            time.sleep(min(5.0, ttl_s / 6))
    try:
        yield lease
    finally:
        lease.release()


def _parse(data: bytes) -> dict:
    """A lease's body; one that is not whole JSON of a holder and an expiry (cut short, edited) holds nothing: it is
    read as lapsed, and replaced conditionally on its bytes like any lapsed lease."""
    try:
        body = json.loads(data)
        if isinstance(body, dict) and isinstance(body.get("holder"), str) and isinstance(body.get("expires"), (int, float)):
            return body
    except (ValueError, RecursionError):
        pass
    return {"holder": f"nobody ({LEASE} was damaged)", "expires": 0.0}


def _holder_gone(lease: dict) -> str:
    """Why the lease's holder (host:pid:tag) is provably not running ("" if it may be): a process of this host that
    no longer exists, or a driver whose Ray job on the cluster this process is connected to has ended. A pid reused by
    another process counts as running: the lease then lapses as usual."""
    host, _, rest = lease["holder"].partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return f"process {pid} of this host ({host}) no longer exists"
        except PermissionError:  # it exists, another user's
            pass
    return _ray_job_ended(lease.get("ray_job"))


def _ray_job() -> str:
    """`SESSION/JOB_ID` of this driver's Ray job ("" when this process is not connected to Ray: Ray is not imported
    here, so a run with ray.enabled=false never loads it)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    ctx = ray.get_runtime_context()
    return f"{ctx.get_session_name()}/{ctx.get_job_id()}"


def _ray_job_ended(job) -> str:
    """Why the Ray job `SESSION/JOB_ID` has provably ended ("" if it may still run, or is of another cluster, or the
    job table cannot be read): the cluster's job table (GCS) marks a job dead once its driver is gone."""
    mine = _ray_job()
    if not isinstance(job, str) or not mine or job.partition("/")[0] != mine.partition("/")[0] or job == mine:
        return ""
    session, _, job_id = job.partition("/")
    try:
        from ray._private.state import jobs  # the GCS job table (what `ray list jobs` reads, without a dashboard)

        dead = any(j["JobID"] == job_id and j["IsDead"] for j in jobs())
    except Exception:  # an API of another Ray version: no proof, the lease lapses as usual
        return ""
    return f"its Ray job {job_id} on this cluster ({session}) has ended" if dead else ""
