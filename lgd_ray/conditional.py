"""Conditional writes on object stores, for the run folder's lease (lgd_ray/lease.py; docs/DESIGN.md section 8).

Each store names an object's version and honours a put made only if the object is absent or still at a version:

    s3://   boto3: version = ETag; If-None-Match: * / If-Match: ETAG (pyarrow's S3 filesystem has neither)
    gs://   google-cloud-storage: version = generation; ifGenerationMatch=0 / ifGenerationMatch=GENERATION

A put whose condition fails raises Conflict. Each client's time-outs are the caller's (well under a third of the lease,
so that a renewal never outlives it) and it does not retry by itself: the lease retries what `transient` says may
pass, for storage.retry_s.
"""
from __future__ import annotations

from urllib.parse import parse_qsl

from lgd_ray.storage import Location, StorageError, endpoint_url, gcs_bucket


class Conflict(Exception):
    """A conditional put or delete refused: the object is not absent, or not at the version given."""


class S3Objects:
    """The objects of one S3 bucket (AWS or an S3-compatible store named by endpoint_override)."""

    def __init__(self, loc: Location, timeout_s: float):
        import boto3
        from botocore.config import Config

        p = loc._parts
        q = dict(parse_qsl(p.query))
        self.bucket = p.netloc
        self.client = boto3.client("s3", endpoint_url=endpoint_url(q, loc.uri), region_name=q.get("region"),
                                   config=Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                                                 retries={"max_attempts": 2, "mode": "standard"}))

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
        except self.client.exceptions.NoSuchKey:
            return None
        return obj["Body"].read(), obj["ETag"]

    def version(self, key: str) -> str | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)["ETag"]
        except self.client.exceptions.ClientError as e:
            if _status(e) == 404:
                return None
            raise

    def put(self, key: str, data: bytes, version: str | None) -> str:
        """Write `key` only if it is at `version` (None: only if absent); its new version."""
        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)["ETag"]
        except self.client.exceptions.ClientError as e:
            if _status(e) in (409, 412):  # 409: a concurrent conditional put won the race
                raise Conflict(key) from None
            raise

    def delete(self, key: str, version: str | None):
        """Remove `key` (only if at `version`, when given); no error if it is gone."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, **({"IfMatch": version} if version else {}))
        except self.client.exceptions.ClientError as e:
            if _status(e) in (409, 412):
                raise Conflict(key) from None
            if _status(e) != 404:
                raise

    @staticmethod
    def transient(e: Exception) -> bool:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        return isinstance(e, (ConnectionError, HTTPClientError)) or isinstance(e, ClientError) and _status(e) >= 500


class GcsObjects:
    """The objects of one Google Cloud Storage bucket (application default credentials; or an emulator named by
    endpoint_override, with anonymous=true)."""

    def __init__(self, loc: Location, timeout_s: float):
        p = loc._parts
        self.bucket, self.timeout_s = gcs_bucket(p.netloc, p.query), timeout_s

    def get(self, key: str) -> tuple[bytes, str] | None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        while True:  # the metadata, then the bytes of that generation (replaced in between: read again)
            blob = self.bucket.get_blob(key, timeout=self.timeout_s, retry=None)
            if blob is None:
                return None
            generation = blob.generation  # (a download may reset it from the reply's headers)
            try:
                return blob.download_as_bytes(if_generation_match=generation, timeout=self.timeout_s,
                                              retry=None), str(generation)
            except (NotFound, PreconditionFailed):
                continue

    def version(self, key: str) -> str | None:
        blob = self.bucket.get_blob(key, timeout=self.timeout_s, retry=None)
        return None if blob is None else str(blob.generation)

    def put(self, key: str, data: bytes, version: str | None) -> str:
        """Write `key` only if it is at `version` (None: only if absent); its new version."""
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(key)
        try:
            blob.upload_from_string(data, if_generation_match=int(version or 0), timeout=self.timeout_s, retry=None)
        except PreconditionFailed:
            raise Conflict(key) from None
        return str(blob.generation)

    def delete(self, key: str, version: str | None):
        """Remove `key` (only if at `version`, when given); no error if it is gone."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self.bucket.blob(key).delete(if_generation_match=int(version) if version else None,
                                         timeout=self.timeout_s, retry=None)
        except PreconditionFailed:
            raise Conflict(key) from None
        except NotFound:
            pass

    @staticmethod
    def transient(e: Exception) -> bool:
        from google.api_core.exceptions import GoogleAPICallError, TooManyRequests
        from requests.exceptions import ConnectionError, Timeout

        return (isinstance(e, (ConnectionError, Timeout, TooManyRequests))
                or isinstance(e, GoogleAPICallError) and (e.code or 0) >= 500)


STORES = {"s3": S3Objects, "gs": GcsObjects, "gcs": GcsObjects}


def objects_for(loc: Location, timeout_s: float) -> S3Objects | GcsObjects | None:
    """The conditional client of the store that holds `loc`; None for a local folder or another store."""
    kind = STORES.get(loc._parts.scheme) if not loc.is_local else None
    if kind is None:
        return None
    try:
        return kind(loc, timeout_s)
    except Exception as e:  # no credentials found (google.auth), a malformed endpoint ...
        if isinstance(e, StorageError):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        raise StorageError(f"storage: no client for {loc}: {type(e).__name__}: {first}") from e


def key_of(loc: Location) -> str:
    """The object key of `loc` in its bucket."""
    return loc._parts.path.lstrip("/")


def _status(error) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
