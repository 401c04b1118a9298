"""Checks run by the CLI before any work starts: before Prefect's server, before Dask, before any retry.

Each check raises a `UserError` subclass with a one-line message, or returns None. They are cheap: the path checks
touch only the local disk (URLs are compared as text), the storage check makes one small request with short
timeouts and no retries, the scheduler check opens one TCP connection.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import fsspec

from medpipe.errors import UserError

if TYPE_CHECKING:
    from distributed import Client

SCHEDULER_ENV = "MEDPIPE_DASK_SCHEDULER"  # as in flows.runtime (not imported here: that imports Prefect)
LOCAL_PROTOCOLS = ("", "file", "local")
DEFAULT_SCHEDULER_PORT = 8786
ALLOW_PLAINTEXT_ENV = "MEDPIPE_ALLOW_PLAINTEXT_DASK"  # "1": allow tcp:// to another host (a trusted network)
PLAINTEXT_SCHEMES = ("", "tcp", "ws", "ucx")  # Dask transports without encryption ("" = bare host:port = tcp)
S3_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
WORKER_CHECK_TIMEOUT_S = 120.0
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


class PlaintextSchedulerError(PreflightError):
    """An unencrypted scheduler address on another host: the key would cross the network in clear."""


class WorkerAccessError(PreflightError):
    """A Dask worker cannot reach SOURCE or STORE, or lacks the storage settings in its own environment."""


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


def _loopback(host: str) -> bool:
    """True for localhost names and loopback IP addresses (compared as text: no DNS lookup)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plaintext_allowed() -> bool:
    """True when the user opted in to unencrypted Dask traffic ($MEDPIPE_ALLOW_PLAINTEXT_DASK=1)."""
    return os.environ.get(ALLOW_PLAINTEXT_ENV, "").strip().lower() in ("1", "true", "yes")


def check_scheduler_transport(address: str) -> None:
    """Refuse an unencrypted scheduler address (tcp://, bare host:port, ws://, ucx://) on a non-loopback host.

    Every Dask task of an ingest carries the de-identification key as an argument: on a plain transport it would
    cross the network in clear. tls:// (and wss://) pass; so does any address with $MEDPIPE_ALLOW_PLAINTEXT_DASK=1.
    """
    scheme = _protocol(address)
    if scheme not in PLAINTEXT_SCHEMES or plaintext_allowed():
        return
    try:
        host = urlsplit(address if scheme else f"tcp://{address}").hostname or ""
    except ValueError:
        return  # a malformed address is reported by check_scheduler_reachable or by Dask itself
    if host and not _loopback(host):
        raise PlaintextSchedulerError(
            f"refusing the unencrypted Dask scheduler address {address}: the de-identification key travels to every "
            f"worker as a task argument and would cross the network in clear; use a tls:// scheduler (docs/cluster.md) "
            f"or set {ALLOW_PLAINTEXT_ENV}=1 if this network is trusted")


def check_scheduler_reachable(address: str, timeout: float = 5.0) -> None:
    """A tcp:// or tls:// (or bare host:port) Dask scheduler must accept a TCP connection within `timeout` s.

    An unencrypted address on another host is refused first (`check_scheduler_transport`). On tcp:// the scheduler
    must also greet like Dask (a scheduler writes its handshake first: an 8-byte frame length), so a port held by
    something else (a proxy, a web server) fails here too. Other transports (inproc://, ucx://, …) are not probed.
    """
    check_scheduler_transport(address)
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


def s3_endpoint() -> str | None:
    """The S3 endpoint this process is configured with (env or fsspec config), None for AWS's default."""
    for name in S3_ENDPOINT_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    conf = fsspec.config.conf.get("s3", {})
    return conf.get("endpoint_url") or (conf.get("client_kwargs") or {}).get("endpoint_url") or None


def _has_s3_credentials() -> bool:
    """Whether botocore finds credentials here (env, profile, config file, instance role) or fsspec says anon."""
    conf = fsspec.config.conf.get("s3", {})
    if conf.get("anon") or conf.get("key"):
        return True
    import botocore.session

    try:
        return botocore.session.Session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile counts as no credentials
        return False


def missing_s3_settings(endpoint_expected: bool) -> list[str]:
    """What this process lacks to use S3 the way the run does (names of settings only, never their values)."""
    missing = []
    if endpoint_expected and s3_endpoint() is None:
        missing.append(f"an S3 endpoint ({' or '.join(S3_ENDPOINT_ENVS)}; the run uses a custom endpoint)")
    if not _has_s3_credentials():
        missing.append("S3 credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance "
                       "role)")
    return missing


def worker_problem(source: str, store: str, endpoint_expected: bool = False, lock_path: str | None = None) \
        -> str | None:
    """Run on a Dask worker: what stops it from using SOURCE and STORE (None: nothing).

    s3:// URLs need the endpoint (when the run uses a custom one) and credentials in the worker's own environment;
    every URL must answer one cheap request; a local SOURCE must be visible there. `lock_path` (the store lock the
    run holds, a URL) must be visible too: then the worker sees the same store, not a folder of its own disk."""
    if any(_remote_key(url)[0] == "s3" for url in (source, store) if not is_local(url)):
        missing = missing_s3_settings(endpoint_expected)
        if missing:
            return "its environment has no " + " and no ".join(missing)
    try:
        check_storage_reachable(source)
        check_storage_reachable(store)
    except PreflightError as exc:
        return str(exc)
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.exists(root):
        return f"SOURCE ({_protocol(source) or 'local path'}) is not visible there: workers need the same paths " \
               "(a shared mount), or an object store URL"
    if lock_path is not None:
        lock_fs, lock_root = fsspec.core.url_to_fs(lock_path)
        if not lock_fs.exists(lock_root):
            return f"STORE ({_protocol(store) or 'local path'}) is not the same there (the worker does not see this " \
                   "run's lock file in it): workers need the same paths (a shared mount), or an object store URL"
    return None


def check_workers_access(client: Client, source: str, store: str, lock_path: str | None = None,
                         timeout: float = WORKER_CHECK_TIMEOUT_S) -> int:
    """Run `worker_problem` on EVERY worker of the cluster (one task pinned to each); returns how many answered.

    Raises WorkerAccessError naming each failing worker (address and host) and what it lacks, in one line. A
    cluster with no worker yet (an adaptive one) gets one unpinned check first, which makes it start one."""
    expected = s3_endpoint() is not None
    args = (source, store, expected, lock_path)
    tag = uuid.uuid4().hex[:8]
    if not client.scheduler_info()["workers"]:
        first = client.submit(worker_problem, *args, key=f"medpipe-worker-access-first-{tag}", pure=False)
        if not _wait_for(client, [first], timeout):
            first.cancel()
            raise WorkerAccessError(f"no Dask worker joined the cluster within {timeout:g} s: start workers "
                                    "(dask worker SCHEDULER_ADDRESS) or check the cluster's scaling")
    workers = client.scheduler_info()["workers"]
    futures = {address: client.submit(worker_problem, *args, workers=[address], allow_other_workers=False,
                                      pure=False, key=f"medpipe-worker-access-{tag}-{address}")
               for address in workers}
    _wait_for(client, list(futures.values()), timeout)
    problems = []
    for address, future in futures.items():
        where = f"Dask worker {address} (host {workers[address].get('host', '?')})"
        if not future.done():
            problems.append(f"{where}: no answer to the access check within {timeout:g} s")
        elif future.status != "finished":
            problems.append(f"{where}: the access check ended {future.status}"
                            + (f" ({type(future.exception()).__name__})" if future.status == "error" else ""))
        elif future.result():
            problems.append(f"{where}: {future.result()}")
        future.cancel()
    if problems:
        raise WorkerAccessError("; ".join(problems) + " (docs/cluster.md: what each worker's environment needs)")
    return len(futures)


def _wait_for(client: Client, futures: list[Any], timeout: float) -> bool:
    """Wait up to `timeout` s for all `futures`; True when all are done (distributed's wait raises instead)."""
    from distributed import wait

    with client.as_current():  # `wait` looks up the default client; a flow's client is not the default
        try:
            wait(futures, timeout=timeout)
        except TimeoutError:
            return False
    return True
