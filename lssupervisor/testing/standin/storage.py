"""Storage backends of the stand-in (simpleblob v1 ``fs``, ``memory`` and ``s3``).

``fs`` follows simpleblob v1 ``backends/fs/fs.go``: ``root_path`` is the only option (strict: any
other key is an error when the backend is created), the root is created with ``MkdirAll``,
``List`` returns regular files whose name has no ``/``, does not start with ``.`` and does not end
in ``.tmp``, sorted by name; ``Store`` writes ``<name>.tmp``, fsyncs it and the directory, then
renames. ``memory`` lives in the process only. ``azure`` passes config validation but cannot be
created here.

``s3`` follows ``backends/s3/s3.go``: the options are decoded strictly (yaml.v2 ``UnmarshalStrict``
into ``s3.Options``), defaulted (region ``us-east-1``, endpoint ``https://s3.amazonaws.com``,
secrets refresh 15s...) and checked with simpleblob's messages; ``global_prefix`` is prepended to
every name as is and stripped from listed names; ``List`` is recursive (unless ``hide_folders``/
``prefix_folders``), skips the update marker and sorts; ``create_bucket`` creates the bucket at
start (already owning it is fine); ``use_update_marker`` writes ``<global_prefix>update-marker``
after every store and delete (the listing cache it enables is not reproduced: every list lists).
Requests go through MinIO's Python client (minio-go's sibling), never hand-signed. Errors are
``OSError`` with the S3 error's message (``The specified bucket does not exist``), a missing object
on load ``FileNotFoundError``, as the sync loop expects.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

IGNORE_SUFFIX = ".tmp"


class StorageError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Blob:
    name: str
    size: int


class Backend(Protocol):
    def list(self, prefix: str) -> list[Blob]: ...
    def load(self, name: str) -> bytes: ...
    def store(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...


def _allowed(name: str) -> bool:
    return "/" not in name and not name.startswith(".") and not name.endswith(IGNORE_SUFFIX)


class FSBackend:
    def __init__(self, root_path: str) -> None:
        self.root = root_path

    def list(self, prefix: str) -> list[Blob]:
        blobs = []
        with os.scandir(self.root) as it:
            for e in it:
                if not e.is_file(follow_symlinks=False):
                    continue
                name = e.name
                if not _allowed(name) or not name.startswith(prefix):
                    continue
                try:
                    size = e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # removed in the meantime
                blobs.append(Blob(name, size))
        blobs.sort(key=lambda b: b.name)
        return blobs

    def load(self, name: str) -> bytes:
        if not _allowed(name):
            raise FileNotFoundError(name)
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()

    def store(self, name: str, data: bytes) -> None:
        if not _allowed(name):
            raise PermissionError(name)
        full = os.path.join(self.root, name)
        tmp = full + IGNORE_SUFFIX  # hidden from list()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.rename(tmp, full)

    def delete(self, name: str) -> None:
        if not _allowed(name):
            raise PermissionError(name)
        try:
            os.remove(os.path.join(self.root, name))
        except FileNotFoundError:
            pass


class MemoryBackend:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}

    def list(self, prefix: str) -> list[Blob]:
        with self._lock:
            return sorted(
                (Blob(n, len(d)) for n, d in self._blobs.items() if n.startswith(prefix)),
                key=lambda b: b.name,
            )

    def load(self, name: str) -> bytes:
        with self._lock:
            if name not in self._blobs:
                raise FileNotFoundError(name)
            return self._blobs[name]

    def store(self, name: str, data: bytes) -> None:
        with self._lock:
            self._blobs[name] = bytes(data)

    def delete(self, name: str) -> None:
        with self._lock:
            self._blobs.pop(name, None)


def _yaml_line_of(options: dict[str, Any], key: str) -> int:
    # yaml.v2 Marshal of a map sorts the keys; the error line is the key's line in that dump.
    line = 1
    import yaml

    for k in sorted(options, key=str):
        if k == key:
            return line
        line += yaml.safe_dump({k: options[k]}, default_flow_style=False).count("\n")
    return line


def get_backend(type_name: str, options: dict[str, Any]) -> Backend:
    """simpleblob ``GetBackend``: raises StorageError with simpleblob's wording."""
    if type_name == "":
        raise StorageError("no storage.type configured")
    if type_name == "fs":
        unknown = sorted(str(k) for k in options if k != "root_path")
        if unknown:
            lines = [
                f"line {_yaml_line_of(options, k)}: field {k} not found in type fs.Options" for k in unknown
            ]
            raise StorageError("yaml: unmarshal errors:\n  " + "\n  ".join(lines))
        root = options.get("root_path")
        root = "" if root is None else (str(root).lower() if isinstance(root, bool) else str(root))
        if root == "":
            raise StorageError("options.root_path must be set for the fs backend")
        try:
            os.makedirs(root, 0o755, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"mkdir {root}: {exc.strerror}") from None
        return FSBackend(root)
    if type_name == "memory":
        return MemoryBackend()
    if type_name == "s3":
        return S3Backend(_s3_options(options))
    if type_name == "azure":
        raise StorageError(f"storage.type {type_name!r} is not supported by the stand-in (fs, memory, s3)")
    raise StorageError(f'storage.type "{type_name}" not found or registered')


# --------------------------------------------------------------------------------------------
# s3 (simpleblob backends/s3)

# s3.Options yaml tags -> kind. "tls" is go-tlsconfig's struct: accepted as a mapping, not applied.
_S3_FIELDS: dict[str, str] = {
    "access_key": "string",
    "secret_key": "string",
    "access_key_file": "string",
    "secret_key_file": "string",
    "secrets_refresh_interval": "duration",
    "region": "string",
    "bucket": "string",
    "storage_class": "string",
    "create_bucket": "bool",
    "global_prefix": "string",
    "prefix_folders": "bool",
    "hide_folders": "bool",
    "endpoint_url": "string",
    "disable_send_content_md5": "bool",
    "num_minio_threads": "uint",
    "tls": "map",
    "init_timeout": "duration",
    "idle_conn_timeout": "duration",
    "max_idle_conns": "int",
    "dial_timeout": "duration",
    "dial_keep_alive": "duration",
    "tls_handshake_timeout": "duration",
    "client_timeout": "duration",
    "use_update_marker": "bool",
    "update_marker_force_list_interval": "duration",
}
_GO_KIND = {"string": "string", "bool": "bool", "duration": "time.Duration", "int": "int", "uint": "uint",
            "map": "tlsconfig.Config"}
_S = 1_000_000_000
UPDATE_MARKER = "update-marker"


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """yaml.v2 ``UnmarshalStrict`` of the options map into ``s3.Options`` (zero values for the rest)."""
    from lssupervisor.testing.standin.config import GoValueError, parse_go_duration

    errors: list[str] = []
    out: dict[str, Any] = {k: {"string": "", "bool": False, "duration": 0, "int": 0, "uint": 0, "map": {}}[v]
                           for k, v in _S3_FIELDS.items()}
    for key in sorted(options, key=str):
        value = options[key]
        kind = _S3_FIELDS.get(str(key))
        line = _yaml_line_of(options, key)
        if kind is None:
            errors.append(f"line {line}: field {key} not found in type s3.Options")
            continue
        if value is None:
            continue
        bad = f"line {line}: cannot unmarshal !!{_yaml_tag(value)} `{value}` into {_GO_KIND[kind]}"
        if kind == "string":
            if isinstance(value, dict | list):
                errors.append(bad)
            else:
                out[key] = str(value).lower() if isinstance(value, bool) else str(value)
        elif kind == "bool":
            if isinstance(value, bool):
                out[key] = value
            else:
                errors.append(bad)
        elif kind in ("int", "uint"):
            if isinstance(value, int) and not isinstance(value, bool) and (kind == "int" or value >= 0):
                out[key] = value
            else:
                errors.append(bad)
        elif kind == "duration":
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = value  # a bare number is nanoseconds
            elif isinstance(value, str):
                try:
                    out[key] = parse_go_duration(value)
                except GoValueError:
                    errors.append(bad)
            else:
                errors.append(bad)
        elif isinstance(value, dict):
            out[key] = value
        else:
            errors.append(bad)
    if errors:
        raise StorageError("yaml: unmarshal errors:\n  " + "\n  ".join(errors))
    return out


def _yaml_tag(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list):
        return "seq"
    return "str"


class S3BackendError(OSError):
    pass


class S3Backend:
    """simpleblob's s3 ``New`` and its List/Load/Store/Delete."""

    def __init__(self, opt: dict[str, Any]) -> None:
        import urllib.parse

        # New(): defaults, then Check(), then the endpoint.
        opt["region"] = opt["region"] or "us-east-1"
        opt["init_timeout"] = opt["init_timeout"] or 20 * _S
        opt["update_marker_force_list_interval"] = opt["update_marker_force_list_interval"] or 300 * _S
        opt["endpoint_url"] = opt["endpoint_url"] or "https://s3.amazonaws.com"
        opt["secrets_refresh_interval"] = opt["secrets_refresh_interval"] or 15 * _S
        has_secrets = bool(opt["access_key_file"]) and bool(opt["secret_key_file"])
        has_static = bool(opt["access_key"]) and bool(opt["secret_key"])
        if not has_secrets and not has_static:
            raise StorageError(
                "s3 storage.options: credentials are required, fill either (access_key and secret_key) "
                "or (access_key_filename and secret_key_filename)"
            )
        if has_secrets and opt["secrets_refresh_interval"] < _S:
            raise StorageError("s3 storage.options: field secrets_refresh_interval must be at least 1s")
        if not opt["bucket"]:
            raise StorageError("s3 storage.options: bucket is required")
        url = urllib.parse.urlsplit(opt["endpoint_url"])
        if url.scheme == "":
            endpoint_url = opt["endpoint_url"]
            raise StorageError(f'no scheme provided for endpoint URL "{endpoint_url}", use http or https')
        if url.scheme not in ("http", "https"):
            raise StorageError(f'unsupported scheme for S3: "{url.scheme}", use http or https')
        access, secret = opt["access_key"], opt["secret_key"]
        if opt["access_key_file"]:
            try:
                with open(opt["access_key_file"]) as f:
                    access = f.read()
                with open(opt["secret_key_file"]) as f:
                    secret = f.read()
            except OSError as exc:
                raise StorageError(str(exc)) from None
        import urllib3
        from minio import Minio

        client_timeout = (opt["client_timeout"] or 15 * 60 * _S) / 1e9
        dial = (opt["dial_timeout"] or 10 * _S) / 1e9
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=dial, read=client_timeout),
            retries=urllib3.Retry(total=3, backoff_factor=0.1, status_forcelist=[500, 502, 503, 504]),
        )
        endpoint = opt["endpoint_url"][len(url.scheme) + 1 :].lstrip("/")
        try:
            self.client = Minio(endpoint, access_key=access, secret_key=secret, secure=url.scheme == "https",
                                region=opt["region"], http_client=self._http)
        except ValueError as exc:
            raise StorageError(str(exc)) from None
        self.bucket = opt["bucket"]
        self.prefix = opt["global_prefix"]
        self.recursive = not opt["prefix_folders"] and not opt["hide_folders"]
        self.hide_folders = opt["hide_folders"]
        self.use_marker = opt["use_update_marker"]
        self.marker_name = self.prefix + UPDATE_MARKER
        self.storage_class = opt["storage_class"]
        if opt["create_bucket"]:
            from minio.error import S3Error

            try:
                self.client.make_bucket(self.bucket, location=opt["region"])
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou",):
                    raise StorageError(exc.message or str(exc)) from None
            except Exception as exc:
                raise StorageError(str(exc)) from None

    def _error(self, exc: Exception, name: str = "") -> OSError:
        from minio.error import S3Error

        if isinstance(exc, S3Error):
            if exc.code == "NoSuchKey":
                return FileNotFoundError(f"{exc.message}: {name}")
            return S3BackendError(exc.message or exc.code)
        if isinstance(exc, OSError):
            return exc
        return S3BackendError(str(exc))

    def list(self, prefix: str) -> list[Blob]:
        n = len(self.prefix)
        blobs: list[Blob] = []
        try:
            full = self.prefix + prefix
            listed = self.client.list_objects(self.bucket, prefix=full, recursive=self.recursive)
            for obj in listed:
                key = obj.object_name or ""
                if key == self.marker_name:
                    continue
                if self.hide_folders and key.endswith("/"):
                    continue
                blobs.append(Blob(key[n:] if n else key, int(obj.size or 0)))
        except Exception as exc:
            raise self._error(exc) from None
        blobs.sort(key=lambda b: b.name)
        return blobs

    def load(self, name: str) -> bytes:
        try:
            resp = self.client.get_object(self.bucket, self.prefix + name)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()
        except Exception as exc:
            raise self._error(exc, name) from None

    def store(self, name: str, data: bytes) -> None:
        import io

        try:
            meta: dict[str, str | list[str] | tuple[str]] | None = (
                {"x-amz-storage-class": self.storage_class} if self.storage_class else None
            )
            info = self.client.put_object(
                self.bucket, self.prefix + name, io.BytesIO(data), len(data), metadata=meta
            )
            self._set_marker(self.prefix + name, info.etag or "", False)
        except Exception as exc:
            raise self._error(exc, name) from None

    def delete(self, name: str) -> None:
        try:
            self.client.remove_object(self.bucket, self.prefix + name)
            self._set_marker(self.prefix + name, "", True)
        except Exception as exc:
            raise self._error(exc, name) from None

    def _set_marker(self, name: str, etag: str, deleted: bool) -> None:
        if not self.use_marker:
            return
        import io
        import time

        text = f"{name}:{etag}:{time.time_ns()}:{'true' if deleted else 'false'}".encode()
        self.client.put_object(self.bucket, self.marker_name, io.BytesIO(text), len(text))
