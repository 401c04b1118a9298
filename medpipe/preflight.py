"""Checks run by the CLI before any work starts: before Prefect's server, before Dask, before any retry.

Each check raises a `UserError` subclass with a one-line message, or returns None. They are cheap: the path checks
touch only the local disk (URLs are compared as text), the storage check makes one small request with short
timeouts and no retries, the scheduler check opens one TCP connection.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec

from medpipe.errors import UserError

SCHEDULER_ENV = "MEDPIPE_DASK_SCHEDULER"  # as in flows.runtime (not imported here: that imports Prefect)
LOCAL_PROTOCOLS = ("", "file", "local")
DEFAULT_SCHEDULER_PORT = 8786
MAX_HANDSHAKE_BYTES = 1 << 24  # a Dask handshake message is a few hundred bytes
# One try, short timeouts: an unreachable endpoint must fail in seconds, not after minutes of retries.
S3_CHECK_CONFIG: dict[str, Any] = {"connect_timeout": 3, "read_timeout": 10,
                                   "retries": {"max_attempts": 1, "mode": "standard"}}


class PreflightError(UserError):
    """An input that cannot work, found before any work started."""


class SourceNotFoundError(PreflightError, FileNotFoundError):
    """SOURCE does not exist."""


class SourceNotAFolderError(PreflightError, NotADirectoryError):
    """SOURCE exists but is not a folder."""


class StorePathError(PreflightError):
    """STORE cannot be used as a store path (a regular file, inside SOURCE, around SOURCE)."""


class ConfigFileError(PreflightError):
    """The --config file is missing, unreadable or not a YAML mapping."""


class StorageUnreachableError(PreflightError):
    """Remote storage cannot be reached or refuses us (endpoint, credentials, permissions)."""


class SchedulerUnreachableError(PreflightError):
    """The Dask scheduler address does not accept connections."""


def _protocol(url: str) -> str:
    """The URL scheme ("" for a plain path; one-letter schemes are Windows drive letters, not URLs)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return "" if len(scheme) == 1 else scheme


def is_local(url: str) -> bool:
    """True for a plain path or a file:// URL."""
    return _protocol(url) in LOCAL_PROTOCOLS


def _local_path(url: str) -> Path:
    if "://" in url and _protocol(url):
        url = url.split("://", 1)[1]
    return Path(url).expanduser().resolve()


def _remote_key(url: str) -> tuple[str, list[str]]:
    """(scheme, [bucket, *prefix parts]) of a URL, with s3a/s3n spelled s3."""
    scheme = _protocol(url)
    scheme = "s3" if scheme in ("s3a", "s3n") else scheme
    return scheme, [part for part in url.split("://", 1)[1].split("/") if part]


def _bucket(url: str) -> str:
    """scheme://bucket of a URL: what a message may name (the rest of a key can hold patient names)."""
    scheme, parts = _remote_key(url)
    return f"{scheme}://{parts[0]}" if parts else f"{scheme}://"


def check_source_folder(source: str) -> None:
    """A local SOURCE must be an existing folder (remote sources are checked by `check_storage_reachable`)."""
    if not is_local(source):
        return
    path = _local_path(source)
    if not path.exists():
        raise SourceNotFoundError(f"SOURCE not found: {source}")
    if not path.is_dir():
        raise SourceNotAFolderError(f"SOURCE {source} is not a folder; give the folder (or bucket prefix) that "
                                    "holds the images")


def check_store_path(store: str) -> None:
    """A local STORE must not be an existing regular file."""
    if is_local(store) and _local_path(store).is_file():
        raise StorePathError(f"STORE {store} is a file; give a folder path or URL for the Zarr store")


def _inside(inner: list[str], outer: list[str]) -> bool:
    return len(inner) >= len(outer) and inner[: len(outer)] == outer


def _hidden_below(inner: list[str], outer: list[str]) -> bool:
    """True when `inner` lies in a hidden file or folder under `outer`: discovery skips those."""
    return any(part.startswith(".") for part in inner[len(outer):])


def check_ingest_paths(source: str, store: str) -> None:
    """SOURCE an existing folder, STORE not a file, and neither inside the other.

    Local paths are compared resolved (symlinks followed); URLs of the same scheme and bucket by key prefix. A STORE
    in a hidden folder of SOURCE (`SOURCE/.cache/s.zarr`) is allowed: discovery skips hidden files and folders.
    """
    check_source_folder(source)
    check_store_path(store)
    if is_local(source) != is_local(store):
        return
    if is_local(source):
        src, dst = list(_local_path(source).parts), list(_local_path(store).parts)
    else:
        (src_scheme, src), (dst_scheme, dst) = _remote_key(source), _remote_key(store)
        if src_scheme != dst_scheme or not src or not dst or src[0] != dst[0]:
            return
    if _inside(dst, src) and not _hidden_below(dst, src):
        raise StorePathError(f"STORE {store} is inside SOURCE {source}: ingest would ingest the store's own files "
                             "on every rerun; put the store outside SOURCE")
    if _inside(src, dst):
        raise StorePathError(f"SOURCE {source} is inside STORE {store}: ingest writes into STORE and would ingest "
                             "the store's own files on every rerun; put the store elsewhere")


def check_config_file(path: str | Path | None) -> None:
    """A --config file must exist and hold a YAML mapping (None: no file, nothing to check)."""
    if path is None:
        return
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigFileError(f"config file not found: {path}" if not file.exists()
                              else f"config {path} is not a file")
    try:
        loaded = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigFileError(f"config {path} cannot be read as YAML{at} ({type(exc).__name__})") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigFileError(f"config {path} must hold a mapping (key: value lines), not a {type(loaded).__name__}")


def check_storage_reachable(url: str) -> None:
    """For a remote URL (s3://, gs://, …): one cheap request to its root, with short timeouts and no retries.

    A missing object or prefix is fine (a new store); no endpoint, no credentials, a refused connection or access
    denied raise `StorageUnreachableError` naming only scheme://bucket and the exception class. Local paths pass.
    """
    if is_local(url):
        return
    import fsspec

    scheme = _remote_key(url)[0]
    options: dict[str, Any] = {"skip_instance_cache": True}
    if scheme == "s3":
        options["config_kwargs"] = S3_CHECK_CONFIG
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
        if scheme == "s3":
            fs.retries = 1  # s3fs's own retry loop, on top of botocore's
        fs.info(root.rstrip("/") or root)
    except (FileNotFoundError, NotADirectoryError):
        return
    except ImportError as exc:
        raise StorageUnreachableError(f"cannot open {_bucket(url)}: no filesystem for {scheme}:// is installed "
                                      f"({type(exc).__name__}: {exc})") from exc
    except PermissionError as exc:
        raise StorageUnreachableError(f"access denied to {_bucket(url)} ({type(exc).__name__}); check the "
                                      "credentials and the bucket policy") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of one probe request means the storage is unusable
        hint = "; set AWS_ENDPOINT_URL / credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)" \
            if scheme == "s3" else "; check the endpoint and credentials"
        raise StorageUnreachableError(f"cannot reach storage {_bucket(url)} ({type(exc).__name__}){hint}") from exc


def scheduler_address(address: str | None) -> str | None:
    """The scheduler a run will use: the given address, else $MEDPIPE_DASK_SCHEDULER, else None (LocalCluster)."""
    return address or os.environ.get(SCHEDULER_ENV) or None


def check_scheduler_reachable(address: str, timeout: float = 5.0) -> None:
    """A tcp:// or tls:// (or bare host:port) Dask scheduler must accept a TCP connection within `timeout` s.

    On tcp:// it must also greet like Dask (a scheduler writes its handshake first: an 8-byte frame length), so a
    port held by something else (a proxy, a web server) fails here too. Other transports (inproc://, ucx://, …)
    are not checked.
    """
    scheme = _protocol(address)
    if scheme not in ("", "tcp", "tls"):
        return
    try:
        parts = urlsplit(address if scheme else f"tcp://{address}")
        host, port = parts.hostname, parts.port or DEFAULT_SCHEDULER_PORT
    except ValueError as exc:
        raise SchedulerUnreachableError(f"bad Dask scheduler address {address!r} ({exc}); use tcp://host:port") \
            from exc
    if not host:
        raise SchedulerUnreachableError(f"bad Dask scheduler address {address!r}; use tcp://host:port")
    where = f"cannot reach Dask scheduler at {host}:{port}"
    hint = f"check --scheduler / ${SCHEDULER_ENV}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            if scheme != "tls":  # TLS would need the certificates: the TCP connection is all we check there
                problem = _dask_greeting_problem(conn, timeout)
                if problem:
                    raise SchedulerUnreachableError(f"{where} ({problem}); {hint}")
    except OSError as exc:
        reason = exc.strerror or str(exc) or "timed out"
        raise SchedulerUnreachableError(f"{where} ({type(exc).__name__}: {reason}); {hint}") from exc


def _dask_greeting_problem(conn: socket.socket, timeout: float) -> str | None:
    """None when the peer's first 8 bytes read as a Dask frame header (little-endian length), else what is wrong."""
    conn.settimeout(timeout)
    head = b""
    try:
        while len(head) < 8:
            chunk = conn.recv(8 - len(head))
            if not chunk:
                return "the connection was closed without a Dask handshake"
            head += chunk
    except TimeoutError:
        return f"connected, but no Dask handshake within {timeout:g} s: is it a Dask scheduler?"
    if not 0 < struct.unpack("<Q", head)[0] < MAX_HANDSHAKE_BYTES:
        return "connected, but it does not speak the Dask protocol"
    return None


def check_worker_access(source: str, store: str) -> None:
    """Run on a Dask worker before the store is touched: SOURCE and STORE must be reachable from there as well
    (a remote worker needs the same mounted paths, or an object store URL with its own endpoint and credentials)."""
    check_storage_reachable(source)
    check_storage_reachable(store)
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.exists(root):
        raise SourceNotFoundError(f"SOURCE ({_protocol(source)}) is not visible from the Dask worker "
                                  f"{socket.gethostname()}: workers need the same paths, or an object store URL")
