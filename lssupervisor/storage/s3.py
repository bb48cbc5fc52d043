"""The s3 backend, through the MinIO Python client (LS's simpleblob uses minio-go: same endpoint
handling, path-style requests to non-AWS endpoints, static V4 credentials, ListObjectsV2).

A version location is the key prefix ``global_prefix`` rendered for N: ``head + N + tail``. One
recursive listing of ``head`` finds every version at once. Credentials are LS's (``access_key`` /
``secret_key``, or ``access_key_file`` / ``secret_key_file`` read as LS reads them); they are held in
the client only and never appear in a message, a log line or a repr. Every request is bounded by
``timeout`` (connect and read), with no retries beyond one on a dropped connection, so a probe or a
listing never hangs.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error

from lssupervisor.errors import ConfigError, StorageError
from lssupervisor.storage.backend import MAX_BATCH, BatchResult, Listing, StoredObject

DEFAULT_ENDPOINT = "https://s3.amazonaws.com"  # simpleblob DefaultEndpointURL
DEFAULT_REGION = "us-east-1"  # simpleblob DefaultRegion
_VERSION = r"(0|[1-9][0-9]*)"

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


def _str_option(options: Mapping[str, Any], key: str) -> str:
    value = options.get(key)
    if value is None:
        return ""
    if isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if not isinstance(value, str):
        raise ConfigError(f"storage.options.{key}: expected a string")
    return value


def _read_secret(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()  # as LS: the file's bytes, not stripped
    except OSError as exc:
        raise StorageError(f"storage.options.{key} {path}: cannot read: {exc.strerror}") from None


class S3Backend:
    def __init__(self, options: Mapping[str, Any], head: str, tail: str, *, timeout: float) -> None:
        self.bucket = _str_option(options, "bucket")
        if not self.bucket:
            raise ConfigError("storage.options.bucket: must be set for the s3 backend")
        self.endpoint_url = _str_option(options, "endpoint_url") or DEFAULT_ENDPOINT
        self.region = _str_option(options, "region") or DEFAULT_REGION
        url = urllib.parse.urlsplit(self.endpoint_url)
        if url.scheme not in ("http", "https"):
            raise ConfigError(
                f"storage.options.endpoint_url {self.endpoint_url!r}: use an http:// or https:// URL "
                "(as LS requires)"
            )
        if url.username or url.password:
            # Never echo it: the userinfo is a credential.
            raise ConfigError("storage.options.endpoint_url: must not carry credentials (user:pass@)")
        access = _str_option(options, "access_key")
        secret = _str_option(options, "secret_key")
        access_file = _str_option(options, "access_key_file")
        secret_file = _str_option(options, "secret_key_file")
        if access_file and secret_file:
            access, secret = _read_secret(access_file, "access_key_file"), _read_secret(
                secret_file, "secret_key_file"
            )
        elif not (access and secret):
            raise ConfigError(
                "storage.options: s3 credentials are required: access_key and secret_key (usually "
                "${AWS_ACCESS_KEY_ID} and ${AWS_SECRET_ACCESS_KEY}, set in the environment LS gets), or "
                "access_key_file and secret_key_file"
            )
        self.head, self.tail = head, tail
        tail_re = re.escape(tail) if tail else r"(?=[^0-9])"
        self._pattern = re.compile(re.escape(head) + _VERSION + tail_re + r"(.+)", re.DOTALL)
        self.timeout = timeout
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=urllib3.Retry(total=1, connect=1, read=0, redirect=0, status=0, backoff_factor=0),
            maxsize=4,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
        self._http = http
        try:
            self._client = Minio(
                url.netloc,
                access_key=access,
                secret_key=secret,
                secure=url.scheme == "https",
                region=self.region,
                http_client=http,
            )
        except ValueError as exc:
            raise ConfigError(f"storage.options.endpoint_url {self.endpoint_url!r}: {exc}") from None

    # -- messages ----------------------------------------------------------------------------------

    def describe(self, version: int | None = None) -> str:
        prefix = f"{self.head}<N>{self.tail}" if version is None else self.prefix(version)
        return f"s3 bucket {self.bucket} at {self.endpoint_url}, prefix {prefix!r}"

    def prefix(self, version: int) -> str:
        return f"{self.head}{version}{self.tail}"

    def _fail(self, what: str, exc: BaseException) -> NoReturn:
        where = f"storage s3 bucket {self.bucket} at {self.endpoint_url}"
        if isinstance(exc, S3Error):
            code = exc.code or "error"
            if code == "NoSuchBucket":
                raise StorageError(
                    f"{where}: the bucket does not exist; create it, or fix storage.options.bucket / "
                    "endpoint_url (LS would retry listing it every second, forever)"
                ) from None
            if code in _CREDENTIAL_CODES:
                raise StorageError(
                    f"{where}: {what}: the credentials were refused ({code}); check the access key and "
                    "secret LS gets (storage.options.access_key/secret_key, usually AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY in lssupervisor's environment)"
                ) from None
            if code == "AccessDenied":
                raise StorageError(
                    f"{where}: {what}: access denied; the credentials need the S3 permission for it "
                    "(docs/operations-migrations.md lists them per command)"
                ) from None
            raise StorageError(f"{where}: {what}: {code}: {exc.message}") from None
        if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
            exc = exc.reason
        if isinstance(exc, urllib3.exceptions.TimeoutError):
            raise StorageError(
                f"{where}: {what}: no answer within {self.timeout:g}s; check endpoint_url and the network"
            ) from None
        if isinstance(exc, urllib3.exceptions.NewConnectionError | ConnectionError):
            raise StorageError(
                f"{where}: {what}: cannot connect ({_reason(exc)}); check storage.options.endpoint_url "
                "and that the S3 service is up"
            ) from None
        raise StorageError(f"{where}: {what}: {_reason(exc)}") from None

    # -- operations --------------------------------------------------------------------------------

    def probe(self) -> str:
        try:
            # One ListObjectsV2 page of the version prefixes: NoSuchBucket, refused credentials and a
            # missing s3:ListBucket all show here, and nothing is written.
            for _ in self._client.list_objects(self.bucket, prefix=self.head, recursive=True):
                break
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            self._fail("listing", exc)
        return (
            f"s3 bucket {self.bucket} at {self.endpoint_url}: exists, credentials accepted, "
            f"listing {self.head!r} allowed"
        )

    def list_versions(self) -> Listing:
        versions: dict[int, list[StoredObject]] = {}
        try:
            for obj in self._client.list_objects(self.bucket, prefix=self.head, recursive=True):
                key = obj.object_name or ""
                m = self._pattern.fullmatch(key)
                if m is None:
                    continue
                modified = obj.last_modified.timestamp() if obj.last_modified is not None else 0.0
                versions.setdefault(int(m.group(1)), []).append(
                    StoredObject(m.group(2), int(obj.size or 0), modified)
                )
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            self._fail(f"listing {self.head!r}", exc)
        for objs in versions.values():
            objs.sort(key=lambda o: o.name)
        return Listing(dict(sorted(versions.items())))

    def delete(self, version: int, names: Sequence[str]) -> BatchResult:
        if len(names) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} names per batch")
        prefix = self.prefix(version)
        failed: dict[str, str] = {}
        try:
            for err in self._client.remove_objects(self.bucket, [DeleteObject(prefix + n) for n in names]):
                name = (err.name or "")[len(prefix) :]
                failed[name] = f"{err.code}: {err.message}"
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            self._fail(f"deleting under {prefix!r}", exc)
        return BatchResult(
            tuple(n for n in names if n not in failed), tuple((n, failed[n]) for n in names if n in failed)
        )

    def close(self) -> None:
        self._http.clear()

    def __repr__(self) -> str:  # never the client (it holds the credentials)
        return f"S3Backend({self.describe()})"


def _reason(exc: BaseException) -> str:
    text = str(exc)
    # urllib3 puts the pool object's repr first ("<...HTTPConnection object at 0x..>: Failed to ..."):
    return re.sub(r"^<[^>]*>:\s*", "", text) or type(exc).__name__
