"""Object storage for every pipeline step: one interface, an S3 bucket or a local directory.

``open_store(uri)`` picks the implementation from the URI:

* ``s3://bucket/prefix`` -> :class:`S3Store` (boto3, any S3-compatible endpoint);
* ``file:///abs/dir`` or a plain path -> :class:`FileStore` (the embedded default).

Keys are ``/``-separated paths relative to the store's root. S3 settings come from the
environment (or a mounted Kubernetes secret), never from pipeline parameters; see
:meth:`S3Settings.from_env`.

Directories are published atomically with a manifest: :func:`publish_dir` uploads every file
and writes ``MANIFEST.json`` (sizes, sha256) last, so a directory without a manifest is
incomplete and invisible to :func:`fetch_dir` and :func:`latest_complete`.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "mixgrpo-manifest/1"
SECRET_DIR_ENV = "MIXGRPO_S3_SECRET_DIR"
ENDPOINT_ENVS = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
_MB = 1024 * 1024
_HASH_CHUNK = 1 * _MB
_TMP_MARK = ".mixgrpo-tmp-"

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class StorageError(RuntimeError):
    """An object-store operation failed; the message names the URI, endpoint and the fix."""


class NotFoundError(StorageError):
    """The bucket, object or manifest does not exist."""


class BucketNotFoundError(NotFoundError):
    """The bucket of an ``s3://`` URI does not exist."""


class IntegrityError(StorageError):
    """A downloaded file does not match its manifest (size, sha256 or missing)."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient errors (connection errors, 5xx, throttling)."""

    max_attempts: int = 5  # total tries, the first included
    base_delay_s: float = 0.5  # delay before the 2nd try; doubles each time
    max_delay_s: float = 8.0  # cap on one delay

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError(f"invalid RetryPolicy {self}: max_attempts >= 1, delays >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based), with jitter."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class TransferSettings:
    """Multipart transfers. Memory in flight is at most about chunk_mb * max_concurrency."""

    chunk_mb: int = 64  # multipart part size and threshold, MiB
    max_concurrency: int = 4  # parts in flight per file (threads and buffered parts)

    def __post_init__(self) -> None:
        if self.chunk_mb < 5 or self.max_concurrency < 1:
            raise ValueError(f"invalid TransferSettings {self}: chunk_mb >= 5 (S3 minimum part), max_concurrency >= 1")

    def boto_config(self) -> Any:
        """The boto3 ``TransferConfig`` with bounded buffering."""
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(
            multipart_threshold=self.chunk_mb * _MB,
            multipart_chunksize=self.chunk_mb * _MB,
            max_concurrency=self.max_concurrency,
            preferred_transfer_client="classic",
        )
        # s3transfer buffers up to 10 parts by default; keep it to what runs concurrently.
        cfg.max_in_memory_upload_chunks = self.max_concurrency
        cfg.max_in_memory_download_chunks = self.max_concurrency
        return cfg


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach S3, resolved once (see :meth:`from_env`)."""

    endpoint_url: str | None  # None: AWS S3 itself
    region: str
    access_key_id: str | None = None  # None: boto3's default chain (~/.aws, AWS_PROFILE, roles)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    credentials_source: str = "S3Settings arguments"  # named in access-denied errors
    retry: RetryPolicy = RetryPolicy()
    transfer: TransferSettings = TransferSettings()
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Resolve settings from environment variables and an optional secret directory.

        Endpoint: MLFLOW_S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL (first set wins),
        then files of the same names in ``$MIXGRPO_S3_SECRET_DIR``. Region: AWS_REGION,
        AWS_DEFAULT_REGION, the secret directory, ~/.aws/config, else us-east-1.
        Credentials: the files AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY [/ AWS_SESSION_TOKEN]
        of ``$MIXGRPO_S3_SECRET_DIR`` when it is set, else the same environment variables,
        else boto3's default chain. Tuning: MIXGRPO_S3_MAX_ATTEMPTS, MIXGRPO_S3_CHUNK_MB,
        MIXGRPO_S3_CONCURRENCY.
        """
        env = dict(os.environ if environ is None else environ)
        secret = _read_secret_dir(env.get(SECRET_DIR_ENV))
        endpoint = _first(env, ENDPOINT_ENVS) or _first(secret, ENDPOINT_ENVS)
        region = _first(env, REGION_ENVS) or _first(secret, REGION_ENVS) or _config_region() or "us-east-1"
        if env.get(SECRET_DIR_ENV):
            creds, source = secret, f"secret directory {env[SECRET_DIR_ENV]}"
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if not creds.get(name):
                    raise StorageError(
                        f"{SECRET_DIR_ENV}={env[SECRET_DIR_ENV]} has no non-empty file {name}: "
                        "mount a secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY keys or unset the variable"
                    )
        elif env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            creds, source = env, "environment variables AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        else:
            creds, source = {}, "boto3 default chain (~/.aws/credentials, AWS_PROFILE, instance role)"
        defaults = (RetryPolicy(), TransferSettings())
        return cls(
            endpoint_url=endpoint or None,
            region=region,
            access_key_id=creds.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=creds.get("AWS_SESSION_TOKEN") or None,
            credentials_source=source,
            retry=RetryPolicy(max_attempts=_env_int(env, "MIXGRPO_S3_MAX_ATTEMPTS", defaults[0].max_attempts)),
            transfer=TransferSettings(
                chunk_mb=_env_int(env, "MIXGRPO_S3_CHUNK_MB", defaults[1].chunk_mb),
                max_concurrency=_env_int(env, "MIXGRPO_S3_CONCURRENCY", defaults[1].max_concurrency),
            ),
        )


def _first(values: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((values[n] for n in names if values.get(n)), None)


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise StorageError(f"environment variable {name}={raw!r} is not an integer: fix or unset it") from None


def _read_secret_dir(path: str | None) -> dict[str, str]:
    """Files of a mounted Kubernetes secret, name -> stripped content (empty if no dir given)."""
    if not path:
        return {}
    root = Path(path)
    if not root.is_dir():
        raise StorageError(f"{SECRET_DIR_ENV}={path} is not a directory: mount the S3 secret there or unset it")
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", *ENDPOINT_ENVS, *REGION_ENVS)
    return {n: (root / n).read_text().strip() for n in names if (root / n).is_file()}


def _config_region() -> str | None:
    """The region of ~/.aws/config (or AWS_PROFILE's), if any."""
    import boto3

    try:
        return boto3.session.Session().region_name
    except Exception:  # a broken ~/.aws/config must not hide the real error later
        return None


# --------------------------------------------------------------------------- interface


class ObjectStore(abc.ABC):
    """A flat key -> bytes store rooted at a URI; keys are ``/``-separated relative paths."""

    @abc.abstractmethod
    def uri_for(self, key: str = "") -> str:
        """The absolute URI of ``key`` (the root when empty)."""

    @abc.abstractmethod
    def put_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        """Upload one local file (multipart with bounded memory for big files)."""

    @abc.abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Download one object to a local file (written whole or not at all)."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The content of ``key``; :class:`NotFoundError` if absent."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object ``key`` exists."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix, as in S3)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under ``prefix``; returns how many were removed."""
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def put_dir(self, local_dir: str | os.PathLike[str], prefix: str = "") -> list[str]:
        """Upload a directory tree under ``prefix``; returns the keys written."""
        keys = []
        for rel, path in _walk_files(local_dir):
            key = _join(prefix, rel)
            self.put_file(path, key)
            keys.append(key)
        return keys

    def get_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> list[Path]:
        """Download every key under the directory ``prefix`` into ``local_dir``."""
        base = prefix.strip("/")
        paths = []
        for key in self.list(base + "/" if base else ""):
            dest = Path(local_dir, key[len(base) :].lstrip("/"))
            self.get_file(key, dest)
            paths.append(dest)
        return paths


def open_store(uri: str | os.PathLike[str], settings: S3Settings | None = None) -> ObjectStore:
    """The store for ``s3://bucket/prefix``, ``file:///abs/dir`` or a local path."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"S3 URI {text!r} has no bucket: use s3://BUCKET/PREFIX")
        return S3Store(parsed.netloc, parsed.path, settings or S3Settings.from_env())
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {text!r} names host {parsed.netloc!r}: use file:///ABSOLUTE/PATH")
        return FileStore(unquote(parsed.path))
    if parsed.scheme == "":
        return FileStore(text)
    raise StorageError(f"unsupported storage URI {text!r}: use s3://BUCKET/PREFIX, file:///PATH or a local path")


def _check_key(key: str, *, allow_empty: bool = False) -> str:
    """Validate a relative key; returns it unchanged."""
    if not key and allow_empty:
        return key
    if "\\" in key or any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageError(
            f"invalid object key {key!r}: use a relative path like 'dir/file.bin' without '.', '..' or '//'"
        )
    return key


def _join(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix and key else prefix or key


def _walk_files(local_dir: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under ``local_dir``, sorted."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"local directory {root} does not exist or is not a directory")
    return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())


def _tmp_path(dest: Path) -> Path:
    return dest.with_name(f"{dest.name}{_TMP_MARK}{os.getpid()}-{random.randrange(1 << 30):x}")


# --------------------------------------------------------------------------- local directory


class FileStore(ObjectStore):
    """A local directory behind the store interface; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def uri_for(self, key: str = "") -> str:
        _check_key(key, allow_empty=True)
        return (self.root / key).as_uri() if key else self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _missing(self, key: str) -> NotFoundError:
        return NotFoundError(f"no object at {self.uri_for(key)}: check the key, or whether it was ever written")

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        src = Path(local_path)
        if not src.is_file():
            raise StorageError(f"cannot upload {src}: no such local file")
        self._write(key, lambda tmp: shutil.copyfile(src, tmp))

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        src = self._path(key)
        if not src.is_file():
            raise self._missing(key)
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(dest)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _check_key(prefix.rstrip("/"), allow_empty=True)
        if not self.root.is_dir():
            return []
        # Walk only the directory that can contain matches.
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in start.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and _TMP_MARK not in k)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop directories left empty, as S3 has no directories.
        for parent in path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def _write(self, key: str, write: Callable[[Path], object]) -> None:
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StorageError(f"cannot write {self.uri_for(key)}: a parent path is an existing file") from None
        tmp = _tmp_path(dest)
        try:
            write(tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            raise StorageError(f"cannot write {self.uri_for(key)}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- S3


_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
               "RequestThrottled", "RequestTimeout", "InternalError", "ServiceUnavailable"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
           "AllAccessDisabled", "InvalidSecurity"}


def _unwrap(exc: BaseException) -> BaseException:
    """The underlying error of s3transfer's wrappers."""
    return getattr(exc, "last_exception", None) or exc


def _http_status(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """Connection errors, timeouts, 5xx and throttling are worth retrying; 4xx are not."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, SSLError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    exc = _unwrap(exc)
    if isinstance(exc, SSLError):
        return False
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return True
    if isinstance(exc, ClientError):
        code, status = _http_status(exc)
        return status >= 500 or status == 429 or code in _THROTTLING
    return False


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix`` on any S3-compatible endpoint."""

    def __init__(self, bucket: str, prefix: str, settings: S3Settings) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings
        self.client = _make_client(settings)
        self._bucket_checked = False

    def __repr__(self) -> str:
        return f"S3Store({self.uri_for()!r}, endpoint={self.endpoint_label!r})"

    @property
    def endpoint_label(self) -> str:
        return self.settings.endpoint_url or f"AWS S3 ({self.settings.region})"

    def uri_for(self, key: str = "") -> str:
        _check_key(key, allow_empty=True)
        return f"s3://{self.bucket}/{_join(self.prefix, key)}".rstrip("/")

    def _key(self, key: str) -> str:
        return _join(self.prefix, _check_key(key))

    # -- operations

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        src = Path(local_path)
        if not src.is_file():
            raise StorageError(f"cannot upload {src}: no such local file")
        self._ensure_bucket()
        full = self._key(key)
        self._call("upload", key, lambda: self._transfer(lambda tm: tm.upload(str(src), self.bucket, full)))

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        full = self._key(key)
        # s3transfer writes a temporary file and renames it, so dest is whole or untouched.
        self._call("download", key, lambda: self._transfer(lambda tm: tm.download(self.bucket, full, str(dest))))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket()
        full = self._key(key)
        self._call("put", key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data))

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)
        return self._call("get", key, lambda: self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read())

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        full = self._key(key)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=full)
                return True
            except ClientError as exc:
                if _http_status(exc)[1] == 404:
                    return False
                raise

        found = self._call("head", key, head)
        if not found and not self._bucket_exists():
            raise self._no_bucket()
        return found

    def list(self, prefix: str = "") -> list[str]:
        _check_key(prefix.rstrip("/"), allow_empty=True)
        full = _join(self.prefix, prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0

        def list_all() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            return [obj["Key"][strip:] for page in pages for obj in page.get("Contents", [])]

        return sorted(self._call("list", prefix, list_all))

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    # -- plumbing

    def _transfer(self, start: Callable[[Any], Any]) -> None:
        from boto3.s3.transfer import create_transfer_manager

        with create_transfer_manager(self.client, self.settings.transfer.boto_config()) as manager:
            start(manager).result()

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on transient errors; translate failures to StorageError."""
        policy = self.settings.retry
        for attempt in range(1, policy.max_attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised as StorageError
                if not is_transient(exc) or attempt == policy.max_attempts:
                    raise self._translate(_unwrap(exc), what, key, attempt) from exc
                delay = policy.delay(attempt)
                log.warning("S3 %s %s failed (%s); retry %d/%d in %.2f s",
                            what, self.uri_for(key), _unwrap(exc), attempt + 1, policy.max_attempts, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _translate(self, exc: BaseException, what: str, key: str, attempts: int) -> StorageError:
        from botocore.exceptions import ClientError, NoCredentialsError

        where = self.uri_for(key.rstrip("/"))
        at = f"at endpoint {self.endpoint_label}"
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, NoCredentialsError):
            return StorageError(
                f"no S3 credentials found for {what} {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"point {SECRET_DIR_ENV} at a mounted secret, or configure ~/.aws/credentials"
            )
        if is_transient(exc) and not isinstance(exc, ClientError):
            return StorageError(
                f"cannot reach S3 endpoint {self.endpoint_label} ({what} {where}, {attempts} attempt(s)): {exc}. "
                f"Check {' / '.join(ENDPOINT_ENVS)} and that the server is running"
            )
        if isinstance(exc, ClientError):
            code, status = _http_status(exc)
            message = exc.response.get("Error", {}).get("Message", "")
            if code == "NoSuchBucket" or (status == 404 and not self._bucket_exists()):
                return self._no_bucket()
            if status == 404:
                return NotFoundError(f"no object at {where} {at}: check the key, or whether it was ever written")
            if status == 403 or code in _DENIED:
                return StorageError(
                    f"access denied ({code or status}) for {what} {where} {at}: check AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY (credentials from {self.settings.credentials_source}) "
                    "and the bucket policy"
                )
            return StorageError(
                f"S3 {what} {where} failed {at} after {attempts} attempt(s): {code} (HTTP {status}) {message}"
            )
        return StorageError(f"S3 {what} {where} failed {at}: {exc!r}")

    def _no_bucket(self) -> BucketNotFoundError:
        return BucketNotFoundError(
            f"bucket {self.bucket!r} does not exist at endpoint {self.endpoint_label}: "
            f"create it or fix the URI {self.uri_for()}"
        )

    def _bucket_exists(self) -> bool:
        """False only when the endpoint says the bucket is missing (404)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - only a definite 404 counts as missing
            return _http_status(exc)[1] != 404
        return True

    def _ensure_bucket(self) -> None:
        """Check once that the bucket exists before writing (some servers create it on write)."""
        if self._bucket_checked:
            return
        from botocore.exceptions import ClientError

        def head() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _http_status(exc)[1] == 404:
                    raise self._no_bucket() from exc
                if _http_status(exc)[1] != 403:  # may lack s3:ListBucket yet be allowed to write
                    raise

        self._call("check bucket", "", head)
        self._bucket_checked = True


def _make_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
    )
    config = Config(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},  # S3Store._call retries
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
        max_pool_connections=max(10, settings.transfer.max_concurrency + 2),
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class FileEntry:
    """One file of a published directory."""

    path: str  # relative posix path
    size: int  # bytes
    sha256: str  # hex digest


@dataclass(frozen=True)
class Manifest:
    """The ``MANIFEST.json`` of a published directory; its presence marks the directory complete."""

    files: tuple[FileEntry, ...]
    created: str  # ISO 8601, UTC
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "created": self.created,
            "metadata": dict(self.metadata),
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> Manifest:
        """Parse a manifest; ``source`` names it in errors."""
        try:
            doc = json.loads(data)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            files = tuple(FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in doc["files"])
            return cls(files=files, created=str(doc["created"]), metadata=dict(doc.get("metadata") or {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"malformed manifest {source}: {exc}; re-publish the directory") from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_local_dir(local_dir: str | os.PathLike[str]) -> Manifest:
    """Check a local copy of a published directory against its own ``MANIFEST.json`` (sizes, sha256).

    Raises :class:`IntegrityError` naming the first missing, truncated or altered file.
    """
    root = Path(local_dir)
    manifest = Manifest.from_json((root / MANIFEST_NAME).read_bytes(), str(root / MANIFEST_NAME))
    for entry in manifest.files:
        path = root / _check_key(entry.path)
        if not path.is_file():
            raise IntegrityError(f"{path} is listed in {root / MANIFEST_NAME} but missing: the folder is partial")
        if path.stat().st_size != entry.size:
            raise IntegrityError(f"{path}: {path.stat().st_size} bytes, {MANIFEST_NAME} says {entry.size}: "
                                 "the file is truncated or was modified")
        if sha256_file(path) != entry.sha256:
            raise IntegrityError(f"{path}: sha256 does not match {MANIFEST_NAME}: the file is corrupt or was modified")
    return manifest


def seal_local_dir(local_dir: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Manifest:
    """Write ``MANIFEST.json`` (sizes, sha256 of every other file) into a local directory, the format the
    object store's directories carry: a sealed directory is complete, and checked by :func:`verify_local_dir`."""
    root = Path(local_dir)
    entries = tuple(FileEntry(rel, path.stat().st_size, sha256_file(path))
                    for rel, path in _walk_files(root) if rel != MANIFEST_NAME)
    manifest = Manifest(files=entries, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        metadata=dict(metadata or {}))
    (root / MANIFEST_NAME).write_bytes(manifest.to_json())
    return manifest


def publish_dir(
    local_dir: str | os.PathLike[str],
    uri: str,
    *,
    metadata: Mapping[str, Any] | None = None,
    progress: Callable[[str, int], None] | None = None,
    settings: S3Settings | None = None,
) -> Manifest:
    """Upload a directory tree to ``uri`` and write ``MANIFEST.json`` last.

    An existing manifest at ``uri`` is removed first, so readers never see a mix of old and
    new files; objects under ``uri`` not in the new tree are removed before the manifest is
    written. ``progress(path, size)`` is called after each file. A top-level MANIFEST.json in
    ``local_dir`` is not uploaded (it is regenerated).
    """
    store = open_store(uri, settings)
    files = [(rel, p) for rel, p in _walk_files(local_dir) if rel != MANIFEST_NAME]
    store.delete(MANIFEST_NAME)
    entries = []
    for rel, path in files:
        entry = FileEntry(rel, path.stat().st_size, sha256_file(path))
        store.put_file(path, rel)
        entries.append(entry)
        if progress is not None:
            progress(rel, entry.size)
    wanted = {rel for rel, _ in files}
    for stale in store.list():
        if stale not in wanted and stale != MANIFEST_NAME:
            store.delete(stale)
    manifest = Manifest(
        files=tuple(entries),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        metadata=dict(metadata or {}),
    )
    store.put_bytes(MANIFEST_NAME, manifest.to_json())
    log.info("published %d files (%.1f MB) to %s", len(entries), manifest.total_bytes / 1e6, store.uri_for())
    return manifest


def read_manifest(uri: str, settings: S3Settings | None = None) -> Manifest:
    """The manifest of a published directory; :class:`NotFoundError` if it is incomplete."""
    return _read_manifest(open_store(uri, settings))


def _read_manifest(store: ObjectStore) -> Manifest:
    try:
        data = store.get_bytes(MANIFEST_NAME)
    except BucketNotFoundError:
        raise
    except NotFoundError as exc:
        raise NotFoundError(
            f"no {MANIFEST_NAME} at {store.uri_for()}: the directory is incomplete (an interrupted upload?) "
            "or the URI is wrong"
        ) from exc
    return Manifest.from_json(data, store.uri_for(MANIFEST_NAME))


def fetch_dir(
    uri: str,
    local_dir: str | os.PathLike[str],
    *,
    verify: bool = True,
    settings: S3Settings | None = None,
) -> Manifest:
    """Download a published directory and check every file against its manifest.

    Files already in ``local_dir`` with the manifest's size (and sha256 when ``verify``) are
    reused, not downloaded. Raises :class:`IntegrityError` naming the file on a missing file or
    a size / sha256 mismatch. The manifest is written to ``local_dir`` last.
    """
    store = open_store(uri, settings)
    manifest = _read_manifest(store)
    root = Path(local_dir)
    reused = 0
    for entry in manifest.files:
        dest = root / _check_key(entry.path)
        if dest.is_file() and dest.stat().st_size == entry.size and (not verify or sha256_file(dest) == entry.sha256):
            reused += 1
            continue
        _fetch_one(store, entry, dest, verify)
    (root / MANIFEST_NAME).write_bytes(manifest.to_json())
    log.info("fetched %s to %s (%d files, %d reused from cache)", store.uri_for(), root, len(manifest.files), reused)
    return manifest


def _fetch_one(store: ObjectStore, entry: FileEntry, dest: Path, verify: bool) -> None:
    """Download one manifest entry to ``dest`` via a temporary file, checking size and sha256."""
    tmp = _tmp_path(dest)
    where = store.uri_for(entry.path)
    try:
        try:
            store.get_file(entry.path, tmp)
        except NotFoundError as exc:
            raise IntegrityError(
                f"{where} is listed in {MANIFEST_NAME} but missing from the store: "
                "the directory was modified after publication; re-publish it"
            ) from exc
        size = tmp.stat().st_size
        if size != entry.size:
            raise IntegrityError(
                f"{where}: size {size} bytes does not match {MANIFEST_NAME} ({entry.size} bytes): "
                "the object was modified or truncated after publication; re-publish the directory"
            )
        if verify and (actual := sha256_file(tmp)) != entry.sha256:
            raise IntegrityError(
                f"{where}: sha256 {actual} does not match {MANIFEST_NAME} ({entry.sha256}): "
                "the object was corrupted or modified after publication; re-publish the directory"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def latest_complete(uri_prefix: str, pattern: str = "checkpoint-", settings: S3Settings | None = None) -> str | None:
    """URI of the highest-numbered ``{pattern}{N}`` directory that has a manifest, else None.

    Directories still being written (or abandoned mid-upload) have no manifest and are ignored.
    """
    store = open_store(uri_prefix, settings)
    regex = re.compile(rf"{re.escape(pattern)}(\d+)/{re.escape(MANIFEST_NAME)}")
    found = {m.group(1): int(m.group(1)) for key in store.list(pattern) if (m := regex.fullmatch(key))}
    if not found:
        return None
    return store.uri_for(f"{pattern}{max(found, key=found.__getitem__)}")  # the name as stored (zero-padded or not)


def prune_published(uri_prefix: str, keep: int, pattern: str = "checkpoint-", settings: S3Settings | None = None) -> list[str]:
    """Delete all but the ``keep`` highest-numbered complete ``{pattern}{N}`` directories; the URIs removed.

    Call it only after the newest directory's manifest is visible (:func:`read_manifest`), so a crash
    never leaves fewer than one complete directory. Each victim loses its manifest first (it turns
    incomplete, invisible to :func:`latest_complete`), then its files. Incomplete directories older
    than the oldest kept one (abandoned uploads) go too; newer incomplete ones may be uploads in flight.
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1")
    store = open_store(uri_prefix, settings)
    regex = re.compile(rf"({re.escape(pattern)}(\d+))/(.+)")
    dirs: dict[str, tuple[int, bool]] = {}
    for key in store.list(pattern):
        if m := regex.fullmatch(key):
            number, complete = int(m.group(2)), dirs.get(m.group(1), (0, False))[1] or m.group(3) == MANIFEST_NAME
            dirs[m.group(1)] = (number, complete)
    complete = sorted((number, name) for name, (number, done) in dirs.items() if done)
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep][0]
    victims = sorted(name for name, (number, _) in dirs.items() if number < oldest_kept)
    for name in victims:
        store.delete(f"{name}/{MANIFEST_NAME}")
        store.delete_prefix(f"{name}/")
        log.info("pruned %s (keeping the newest %d)", store.uri_for(name), keep)
    return [store.uri_for(name) for name in victims]
