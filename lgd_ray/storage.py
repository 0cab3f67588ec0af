"""One storage layer for run folders, caches, priors and data: a local path or a URI, read and written through pyarrow.

    runs/x  /mnt/fsx/runs/x  file:///mnt/fsx/runs/x            local or mounted disk
    s3://bucket/runs/x                                           AWS S3 (credentials: environment or instance profile)
    s3://bucket/runs/x?endpoint_override=HOST:PORT&scheme=http   an S3-compatible store (MinIO, Ceph, moto ...)
    gs://bucket/runs/x                                           Google Cloud Storage (application default credentials)
    gs://bucket/runs/x?endpoint_override=HOST:PORT&scheme=http&anonymous=true   a GCS emulator
    other://...                                                  any fsspec protocol (through pyarrow's FSSpecHandler)

A `Location` is a URI string (picklable, so it travels to Ray actors and tasks unchanged). Writes are atomic: on a
local disk a temporary name is renamed; on an object store each object is one complete upload (objects appear
whole or not at all), and a folder's completion marker is written last. Credentials never appear in a URI.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from lgd_ray.errors import UserError

S3_QUERY_KEYS = {"endpoint_override", "scheme", "region"}  # what an s3:// URI may carry besides bucket and key
GS_QUERY_KEYS = {"endpoint_override", "scheme", "anonymous"}  # and a gs:// URI (anonymous=true: an emulator)
SECRET_KEYS = {"access_key", "secret_key", "session_token"}
_READ_TRIES = 8  # reads of an object that keeps being replaced before giving up
_retry = threading.local()  # this thread's retry budget while no_retry() holds


# storage.retry_s of the run, in the environment: set by the command (configure) and carried by Ray's runtime_env
# to every process of the run's Ray job (actors, Train workers, tasks, Ray Data tasks: cluster.connect)
RETRY_ENV = "LGD_STORAGE_RETRY_S"
RETRY_DEFAULT_S = 120.0  # storage.retry_s's default


def configure(retry_s: float):
    """How long this process (and what it starts) retries a store's transient errors (storage.retry_s)."""
    os.environ[RETRY_ENV] = repr(float(retry_s))


def retry_s() -> float:
    """This process's storage.retry_s (configure, or the environment it was started with)."""
    return float(os.environ.get(RETRY_ENV, RETRY_DEFAULT_S))


@contextlib.contextmanager
def no_retry():
    """Transient errors fail at once in this block (the start-up check: a wrong endpoint is said in seconds)."""
    _retry.off = True
    try:
        yield
    finally:
        _retry.off = False


PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
TRANSIENT_SIGNS = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Connection refused",
                   "Connection reset", "connection was reset", "timed out", "Timeout was reached", "SLOW_DOWN",
                   "SlowDown", "INTERNAL_FAILURE", "InternalError", "SERVICE_UNAVAILABLE", "ServiceUnavailable",
                   "RequestTimeout", "Throttl", "HTTP response code 500", "HTTP response code 502",
                   "HTTP response code 503", "HTTP response code 504", "HTTP response code 429")


def transient(e: OSError) -> bool:
    """Whether a store's error may pass by itself (docs/DESIGN.md section 8): refused or reset connections, time-outs,
    HTTP 5xx and throttling; not a missing object, refused credentials or a missing bucket."""
    if isinstance(e, PERMANENT):
        return False
    return isinstance(e, (ConnectionError, TimeoutError)) or any(sign in str(e) for sign in TRANSIENT_SIGNS)


class StorageError(UserError):
    """A store that cannot be used as configured; the message is one line naming the URI and the fix."""


def endpoint_url(params: dict, uri: str) -> str | None:
    """The endpoint URL of an s3:// or gs:// URI's query, for clients other than pyarrow (boto3, google-cloud-storage):
    `endpoint_override` as HOST:PORT (with `scheme`, default https) or as a full http(s)://HOST:PORT URL, both of which
    pyarrow accepts; None: the cloud's own."""
    endpoint = params.get("endpoint_override")
    if endpoint is None:
        return None
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = params.get("scheme", "https"), endpoint
    if scheme not in ("http", "https") or not rest or "/" in rest.rstrip("/"):
        raise StorageError(f"storage: endpoint_override={endpoint!r} in {uri}: give HOST:PORT (with scheme=http or "
                           "https) or http(s)://HOST:PORT")
    return f"{scheme}://{rest.rstrip('/')}"


@lru_cache(maxsize=None)
def gcs_bucket(netloc: str, query: str):
    """The google-cloud-storage bucket of a gs:// URI (application default credentials; anonymous=true: an emulator at
    endpoint_override), for what pyarrow's GCS filesystem lacks: listings with a delimiter, generation preconditions."""
    from google.cloud import storage

    params = dict(parse_qsl(query))
    options = {"api_endpoint": endpoint_url(params, f"gs://{netloc}")} if params.get("endpoint_override") else None
    if params.get("anonymous") == "true":
        from google.auth.credentials import AnonymousCredentials

        client = storage.Client(project="anonymous", credentials=AnonymousCredentials(), client_options=options)
    else:
        client = storage.Client(client_options=options)
    return client.bucket(netloc)


def check_query(scheme: str, netloc: str, params: dict, allowed: set[str]):
    """A store URI's options: known keys, a well-formed endpoint, or one line."""
    unknown = set(params) - allowed
    if unknown:
        raise StorageError(f"storage: unknown option {sorted(unknown)[0]!r} in {scheme}://{netloc} "
                           f"(allowed: {', '.join(sorted(allowed))})")
    if params.get("anonymous", "true") not in ("true", "false"):
        raise StorageError(f"storage: anonymous={params['anonymous']!r} in {scheme}://{netloc}: true or false")
    endpoint_url(params, f"{scheme}://{netloc}")  # a malformed endpoint is said here, in one line


@lru_cache(maxsize=None)
def _filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    params = dict(parse_qsl(query))
    if set(params) & SECRET_KEYS:
        raise StorageError(f"storage: credentials do not belong in a URI ({scheme}://{netloc}...): use the environment "
                           "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), an instance profile or a service account")
    if scheme == "s3":
        check_query(scheme, netloc, params, S3_QUERY_KEYS)
        # The endpoint comes from the URI only: pyarrow ignores AWS_ENDPOINT_URL (apache/arrow#49643).
        return pafs.S3FileSystem(endpoint_override=params.get("endpoint_override"), scheme=params.get("scheme", "https"),
                                 region=params.get("region"), connect_timeout=5, request_timeout=120,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
    if scheme == "memory":
        raise StorageError(f"storage: memory://{netloc} lives inside one process: what is written there is gone when "
                           "it exits and no Ray worker can read it; use a folder or an object store (s3://, gs://)")
    if scheme in ("gs", "gcs"):
        check_query(scheme, netloc, params, GS_QUERY_KEYS)
        scheme_, _, host = (endpoint_url(params, f"{scheme}://{netloc}?{query}") or "https://").partition("://")
        return pafs.GcsFileSystem(anonymous=params.get("anonymous") == "true", endpoint_override=host or None,
                                  scheme=scheme_, retry_time_limit=timedelta(seconds=30))
    import fsspec

    try:
        fs = fsspec.filesystem(scheme, **params)
    except (ImportError, ValueError) as e:
        raise StorageError(f"storage: no filesystem for {scheme}:// ({e})") from e
    except TypeError as e:  # an option the filesystem does not take
        raise StorageError(f"storage: {scheme}://{netloc}?{query}: {scheme}:// does not take these options "
                           f"({str(e).splitlines()[0]})") from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


@dataclass(frozen=True)
class Location:
    """A file or folder on a local disk or in a store, named by a path or a URI (see the module docstring)."""

    uri: str

    def __post_init__(self):
        if not self.uri:
            raise StorageError("storage: empty path")
        if self.uri.startswith("file://"):
            object.__setattr__(self, "uri", urlsplit(self.uri).path)

    # -- names -----------------------------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    @property
    def _parts(self):
        return urlsplit(self.uri)

    @property
    def path(self) -> str:
        """The path inside the filesystem: an absolute local path, or bucket/key for a store."""
        if self.is_local:
            return str(Path(self.uri).expanduser().absolute())
        p = self._parts
        return (p.netloc + p.path).rstrip("/")

    @property
    def fs(self) -> pafs.FileSystem:
        if self.is_local:
            return pafs.LocalFileSystem()
        p = self._parts
        return _filesystem(p.scheme, p.netloc, p.query)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def __truediv__(self, rel: str) -> "Location":
        if self.is_local:
            return Location(str(Path(self.uri) / rel))
        p = self._parts
        base = f"{p.scheme}://{p.netloc}{p.path.rstrip('/')}/{rel}"
        return Location(base + (f"?{p.query}" if p.query else ""))

    def relative_to(self, folder: "Location") -> str:
        """This location's path below `folder` (a ValueError if it is not below it)."""
        return PurePosixPath(self.path).relative_to(PurePosixPath(folder.path)).as_posix()

    def resolve(self) -> "Location":
        """Local paths made absolute (so that Ray workers with another working folder find them)."""
        return Location(self.path) if self.is_local else self

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise StorageError(f"storage: {self} is not on a local disk")
        return Path(self.path)

    def __str__(self) -> str:
        return self.uri

    # -- reading ---------------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self._call("look up", lambda: self.fs.get_file_info(self.path).type != pafs.FileType.NotFound)

    def is_dir(self) -> bool:
        return self._call("look up", lambda: self.fs.get_file_info(self.path).type == pafs.FileType.Directory)

    def read_bytes(self) -> bytes:
        """The whole file. An object replaced while it is read is read again: the S3 client takes the size from one
        request and the bytes from another, so a reader racing a writer can get the new object cut at the old size."""
        def read():
            for attempt in range(_READ_TRIES):
                with self.fs.open_input_stream(self.path, compression=None) as f:
                    data = f.read()
                if self.is_local or len(data) == self.fs.get_file_info(self.path).size:
                    return data
                time.sleep(0.01 * 2 ** attempt)  # let a writer replacing it back to back finish (2.6 s in all)
            raise StorageError(f"storage: {self} changed during each of {_READ_TRIES} reads")

        return self._call("read", read)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def open(self):
        """A binary stream for reading (a shard, an idx file)."""
        return self._call("read", lambda: self.fs.open_input_stream(self.path, compression=None))

    def iterdir(self) -> list["Location"]:
        """The entries of a folder, sorted by name ([] if the folder does not exist); on GCS its implied folders too
        (a listing with a delimiter: pyarrow's lists only folders that have a marker object)."""
        p = self._parts
        if p.scheme in ("gs", "gcs"):
            prefix = p.path.strip("/") + "/" if p.path.strip("/") else ""

            def children():
                bucket = gcs_bucket(p.netloc, p.query)
                page = bucket.client.list_blobs(bucket, prefix=prefix, delimiter="/", timeout=60)
                names = [blob.name for blob in page]  # the prefixes are known once the pages are read
                return sorted({n[len(prefix):].rstrip("/") for n in [*names, *page.prefixes]} - {""})

            return [self / name for name in self._call("list", children)]
        infos = self._call("list", lambda: self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)))
        return sorted((self / PurePosixPath(i.path).name for i in infos), key=lambda loc: loc.name)

    def files(self, suffix: str = "") -> list["Location"]:
        return [c for c in self.iterdir() if c.name.endswith(suffix) and not c.is_dir()]

    def listing(self) -> list[tuple[str, int, int]]:
        """(path under this folder, size, modification time in ns) of every file below it, sorted."""
        def walk():
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=True))
            return sorted((PurePosixPath(i.path).relative_to(PurePosixPath(self.path)).as_posix(), i.size,
                           i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File)

        return self._call("list", walk)

    def sha256(self) -> str:
        def digest():
            h = hashlib.sha256()
            with self.fs.open_input_stream(self.path, compression=None) as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            return h.hexdigest()

        return self._call("read", digest)

    # -- writing ---------------------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes):
        """Atomic: local files go to a temporary name and are renamed; an object is one complete upload."""
        if not self.is_local:
            def upload():
                with self.fs.open_output_stream(self.path, compression=None) as f:
                    f.write(data)

            return self._call("write", upload)
        path = Path(self.path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}")

        def write():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the bytes on disk before the name: a crash leaves the old file or the new, whole
            tmp.replace(path)

        try:
            self._call("write", write)
        finally:
            tmp.unlink(missing_ok=True)  # after a failed write (a full disk): no stray temporary file

    def write_text(self, text: str):
        self.write_bytes(text.encode())

    def delete(self):
        """Remove a file or a whole folder (no error if absent)."""
        def delete():
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.Directory and not self.is_local:  # its objects, then a marker where one is
                for f in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True)):
                    if f.type == pafs.FileType.File:
                        self.fs.delete_file(f.path)
                if self.fs.get_file_info(self.path).type == pafs.FileType.Directory:  # not on GCS without a marker
                    self.fs.delete_dir(self.path)
            elif info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)

        self._call("delete", delete)

    def upload_dir(self, local: Path, last: str):
        """Copy a local folder here as a whole: on a local disk a temporary folder renamed; in a store file by file,
        the file `last` (the completion marker) after all others."""
        files = sorted((p for p in Path(local).rglob("*") if p.is_file()),
                       key=lambda p: (p.relative_to(local).as_posix() == last, p.as_posix()))
        if not files or files[-1].relative_to(local).as_posix() != last:
            raise ValueError(f"{local} has no {last}")
        if self.is_local:
            target = self.local_path
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(local, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            return
        for p in files:
            self._call("write", lambda p=p: pafs.copy_files(
                str(p), (self / p.relative_to(local).as_posix()).path, source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs))

    def download_dir(self, local: Path, listing: list[tuple[str, int, int]] | None = None):
        """Copy this folder into a local folder, file by file (on GCS its folders are implied: no marker objects for
        pyarrow's folder copy to find); `listing`: its listing() if the caller has it (no second list request)."""
        for name, _, _ in listing if listing is not None else self.listing():
            target = Path(local) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call("read", lambda name=name, target=target: pafs.copy_files(
                (self / name).path, str(target), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem()))

    # -- errors ----------------------------------------------------------------------------------------------------
    def _call(self, action: str, fn):
        """fn(), its transient errors retried (with_retries); any other error, or one that lasts longer, is one line
        (StorageError). A missing file stays FileNotFoundError."""
        try:
            return with_retries(fn, f"{action} {self}", lambda e: isinstance(e, OSError) and transient(e), _reason)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(f"storage: cannot {action} {self}: {_reason(e)}") from e


def with_retries(fn, what: str, is_transient: Callable[[Exception], bool], reason: Callable[[Exception], str]):
    """fn(), retried with exponential back-off (0.5 s, doubling, at most 30 s) while its error is transient, for up to
    storage.retry_s (said once on stderr, so that a long wait is not silent); then one line (StorageError) naming
    `what` could not be done. Any other error is raised as it is."""
    start, wait, said = time.monotonic(), 0.5, False
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            waited = time.monotonic() - start
            budget = 0.0 if getattr(_retry, "off", False) else retry_s()
            if waited + wait > budget:
                tried = f" (retried for {waited:.0f} s: storage.retry_s {budget:g})" if budget else ""
                raise StorageError(f"storage: cannot {what}: {reason(e)}{tried}") from e
            if not said:
                print(f"storage: cannot {what} yet: {reason(e)}; retrying for up to {budget:g} s (storage.retry_s)",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(wait)
            wait = min(2 * wait, 30.0)


def as_location(where) -> Location:
    """A Location from a Location, a path or a URI string; local paths made absolute."""
    return (where if isinstance(where, Location) else Location(str(where))).resolve()


def _reason(e: OSError) -> str:
    """The cause of a pyarrow I/O error in a few words, with the fix."""
    text = str(e)
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Couldn't connect" in text:
        return ("the endpoint does not answer (an S3-compatible store is named in the URI: "
                "s3://BUCKET/PATH?endpoint_override=HOST:PORT&scheme=http)")
    if "NO_SUCH_BUCKET" in text or "bucket does not exist" in text:
        return "the bucket does not exist (create it first)"
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId",
                               "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "HTTP response code 403",
                               "credentials")):
        return ("access denied: no or wrong credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "an instance profile, or a service account with storage access)")
    return text.splitlines()[0] if text else type(e).__name__


def check_writable(loc: Location):
    """Write, read back and delete a small object under loc: fails in seconds with one line if the store is unusable
    (no retries: at the start a store that does not answer is far more often misnamed than down)."""
    probe = loc / f".lgd_ray-probe-{uuid.uuid4().hex[:8]}"
    with no_retry():
        probe.write_bytes(b"ok")
        if probe.read_bytes() != b"ok":
            raise StorageError(f"storage: {loc} does not read back what was written")
        probe.delete()


COPY_LOCK_S = 1800.0  # longest wait for another process's copy of a prior to a node (DiT-XL/2 is ~3 GB)


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float):
    """An exclusive flock of `path`, waited for at most timeout_s (a lock held longer is a hung process: one line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(f"storage: {path} stayed locked for {timeout_s:g} s by another process: if "
                                       "none is working there, it hung; end it") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def local_copy(loc: Location, cache_root: str, marker: str) -> Path:
    """A node-local copy of a folder (a prior), made once per node per version: concurrent callers wait on a file lock.

    Local folders are used where they are. A copy is named by the URI and the folder's listing (every file's path, size
    and modification time, one list request), so a folder re-made at the same URI is copied again and the older copy
    removed; the copy is complete when `marker` exists in it.
    """
    if loc.is_local:
        return loc.local_path
    root = Path(cache_root).expanduser() / "store"
    listing = loc.listing()
    if marker not in {name for name, _, _ in listing}:
        raise StorageError(f"storage: {loc} holds no {marker}")
    uri_key = hashlib.sha256(loc.uri.encode()).hexdigest()[:16]
    target = root / f"{uri_key}-{hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}"
    with file_lock(root / f"{uri_key}.lock", COPY_LOCK_S):
        if not (target / marker).exists():
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"storage: copying {loc} -> {target} (once on this node)", file=sys.stderr, flush=True)
            loc.download_dir(tmp, listing)
            tmp.rename(target)
            for old in root.glob(f"{uri_key}-*"):  # an earlier version of this URI (loaded processes keep their weights)
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
    return target


def main(argv: list[str]):
    """`python -m lgd_ray.storage cat URI`: an object's bytes to stdout (for `pipe:` URLs of plain webdataset)."""
    if len(argv) != 2 or argv[0] != "cat":
        sys.exit("usage: python -m lgd_ray.storage cat URI")
    with Location(argv[1]).open() as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sys.stdout.buffer.write(block)


if __name__ == "__main__":
    main(sys.argv[1:])
