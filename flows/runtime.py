"""Run-time pieces shared by flows: the Prefect API, the Dask task runner (TLS, plaintext policy), the key, the
store lock held by a flow run (killed runs marked Crashed), progress over mapped futures. See docs/cluster.md."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, cast
from uuid import UUID

from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner
from prefect_dask import DaskTaskRunner
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medpipe.deid import DeidKey, MissingKeyError, resolve_key
from medpipe.errors import UserError
from medpipe.ingest.lock import StoreLock, acquire_lock, new_run_id, release_lock
from medpipe.preflight import SCHEDULER_ENV, check_scheduler_transport, scheduler_address

if TYPE_CHECKING:
    from distributed import Client
    from distributed.security import Security
    from prefect.server.api.server import SubprocessASGIServer

__all__ = ["SCHEDULER_ENV", "TLS_ENVS", "DaskTlsError", "crash_stale_run", "dask_client", "dask_security",
           "dask_task_runner", "gather", "held_lock", "load_key", "shared_api_server", "stop_api_server",
           "warm_api_server"]

TLS_ENVS = ("MEDPIPE_DASK_TLS_CA", "MEDPIPE_DASK_TLS_CERT", "MEDPIPE_DASK_TLS_KEY")
TLS_SCHEMES = ("tls://", "wss://")


class DaskTlsError(UserError):
    """A tls:// scheduler without usable client certificates."""


@contextmanager
def shared_api_server() -> Iterator[str]:
    """One Prefect API for the flows of this process and their Dask worker processes; yields its URL.

    Without a configured PREFECT_API_URL, Prefect starts a temporary (embedded) server per process, so every Dask
    worker would start its own (~5 s each) and report task runs to a different database. We start the embedded
    server once per process (`warm_api_server`), keep it for every later flow, and export its URL, which worker
    processes inherit; it stops at interpreter exit (or `stop_api_server`). A configured API (a real server, or the
    test harness) is exported as it is for the duration of the block. SIGTERM unwinds the block like Ctrl-C."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with _sigterm_unwinds():
        url = warm_api_server()
        previous = os.environ.get("PREFECT_API_URL")  # after the start: the embedded URL stays exported
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
        finally:
            _restore_api_url(previous)


@dataclass
class _Embedded:
    """This process's embedded Prefect server, the $PREFECT_API_URL it replaced and whether it holds the SIGTERM
    handler (module state, guarded by `_EMBEDDED_LOCK`)."""

    server: SubprocessASGIServer | None = None
    previous_url: str | None = None
    sigterm_held: bool = False


_EMBEDDED = _Embedded()
_EMBEDDED_LOCK = threading.Lock()


def warm_api_server() -> str:
    """The Prefect API URL for this process: the configured one, else the embedded server's, started now if it is
    not running (~5 s, once per process) and exported in $PREFECT_API_URL for Dask workers started later.

    Call it ahead of time (a benchmark, a long-lived process) so that no flow pays the start. The embedded server is
    kept until interpreter exit or `stop_api_server()`; meanwhile SIGTERM unwinds the process like Ctrl-C (main
    thread, default handler only), so that it is stopped on `kill` as well."""
    from prefect.settings import get_current_settings

    with _EMBEDDED_LOCK:
        server = _EMBEDDED.server
        embedded_url = server.api_url if server is not None and _alive(server) else None
        configured = get_current_settings().api.url
        if configured and configured != embedded_url:
            return configured
        if embedded_url:
            return embedded_url
        return _start_embedded()


def _start_embedded() -> str:
    """Start the embedded server (caller holds `_EMBEDDED_LOCK`), export its URL, arrange its stop at exit."""
    from prefect.server.api.server import SubprocessASGIServer

    if _EMBEDDED.server is not None:  # its process died: clear Prefect's record of it before a new start
        _EMBEDDED.server.stop()
        _restore_api_url(_EMBEDDED.previous_url)
        _release_sigterm_exit(_EMBEDDED.sigterm_held)
        _EMBEDDED.server, _EMBEDDED.sigterm_held = None, False
    held = _hold_sigterm_exit()
    try:
        server = SubprocessASGIServer()
        server.start()
    except BaseException:
        _release_sigterm_exit(held)
        raise
    _EMBEDDED.sigterm_held = held
    _EMBEDDED.server = server
    _EMBEDDED.previous_url = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    atexit.unregister(stop_api_server)
    atexit.register(stop_api_server)  # runs before Prefect's own atexit stop (registered earlier, in start)
    return server.api_url


def _alive(server: SubprocessASGIServer) -> bool:
    process = server.server_process
    return server.running and process is not None and process.poll() is None


def stop_api_server() -> bool:
    """Stop this process's embedded Prefect server (after sending queued logs and events) and restore
    $PREFECT_API_URL and the SIGTERM handler; False when none was running. Also run at interpreter exit."""
    with _EMBEDDED_LOCK:
        server = _EMBEDDED.server
        if server is None:
            return False
        try:
            if _alive(server):
                _drain_prefect_services()
            server.stop()
        finally:
            _restore_api_url(_EMBEDDED.previous_url)
            _release_sigterm_exit(_EMBEDDED.sigterm_held)
            _EMBEDDED.server, _EMBEDDED.sigterm_held = None, False
        return True


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


_sigterm_holders = 0  # blocks and the embedded server relying on `_exit_on_signal` (main thread only)


def _hold_sigterm_exit() -> bool:
    """Make SIGTERM raise SystemExit(143) until the matching `_release_sigterm_exit`: main thread, and only over the
    default handler (or ours, already held); True when held."""
    global _sigterm_holders
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_signal)
    elif current is not _exit_on_signal:
        return False
    _sigterm_holders += 1
    return True


def _release_sigterm_exit(held: bool) -> None:
    """Undo one `_hold_sigterm_exit`; the last holder puts the default handler back (when ours is still there)."""
    global _sigterm_holders
    if not held or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_holders = max(0, _sigterm_holders - 1)
    if _sigterm_holders == 0 and signal.getsignal(signal.SIGTERM) is _exit_on_signal:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM unwinds this process like Ctrl-C (SystemExit 143), so that `finally` blocks run: the store lock is
    released and the embedded server stopped (at exit). (Inside a flow Prefect's own handler raises
    TerminationSignal and marks the run Crashed, then re-sends the signal to the handler it found: this one.) Main
    thread, default handler only: a handler someone else installed is left alone."""
    held = _hold_sigterm_exit()
    try:
        yield
    finally:
        _release_sigterm_exit(held)


def _restore_api_url(previous: str | None) -> None:
    if previous is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = previous


def _drain_prefect_services() -> None:
    """Send queued logs and events before the embedded server stops (else they retry for a minute at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


def dask_task_runner(scheduler: str | None = None, workers: int = 2) -> TaskRunner[Any]:
    """An existing scheduler when an address is given (or $MEDPIPE_DASK_SCHEDULER), else a LocalCluster.

    Decided when called: flows call it at run time from their own parameters. A tls:// address gets the client
    certificates of `dask_security`; an unencrypted address on another host is refused (UserError, one line)
    unless $MEDPIPE_ALLOW_PLAINTEXT_DASK=1: every task carries the de-identification key."""
    address = scheduler_address(scheduler)
    if address:
        check_scheduler_transport(address)
        security = dask_security(address)
        return DaskTaskRunner(address=address, client_kwargs={"security": security} if security else None)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def dask_security(address: str) -> Security | None:
    """Client credentials for a tls:// (or wss://) scheduler, None for other addresses.

    From $MEDPIPE_DASK_TLS_CA / _CERT / _KEY (PEM files) when any is set, else from dask's config
    (`distributed.comm.tls.ca-file`, `.client.cert`, `.client.key`; also DASK_DISTRIBUTED__COMM__TLS__* env).
    Encryption is required either way; missing certificates raise DaskTlsError (one line)."""
    if not address.lower().startswith(TLS_SCHEMES):
        return None
    from distributed.security import Security

    ca, cert, key = (os.environ.get(name) or None for name in TLS_ENVS)
    if ca or cert or key:
        for name, value in zip(TLS_ENVS, (ca, cert, key)):
            if value and not Path(value).expanduser().is_file():
                raise DaskTlsError(f"${name} names no file: {value}")
        if not (ca and cert):
            raise DaskTlsError(f"a tls:// scheduler needs ${TLS_ENVS[0]} and ${TLS_ENVS[1]} (and ${TLS_ENVS[2]} "
                               "unless the certificate file holds the key)")
        return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)
    security = Security(require_encryption=True)
    if not (getattr(security, "tls_ca_file", None) and getattr(security, "tls_client_cert", None)):
        raise DaskTlsError(f"the Dask scheduler {address} uses TLS but no client certificate is configured: set "
                           f"${TLS_ENVS[0]}, ${TLS_ENVS[1]} and ${TLS_ENVS[2]}, or dask config "
                           "distributed.comm.tls.ca-file / .client.cert / .client.key (docs/cluster.md)")
    return security


def dask_client() -> Client:
    """The Dask client of the running flow's DaskTaskRunner (started on first use)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = context.task_runner if context is not None else None
    if not isinstance(runner, DaskTaskRunner):
        raise RuntimeError("dask_client() needs a flow running on a DaskTaskRunner")
    return runner.client


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("medpipe")


def crash_stale_run(lock: StoreLock) -> None:
    """`on_stale` hook of the store lock: mark the flow run that held a stale lock Crashed through the Prefect API,
    with the subflow task and parent flow runs above it that are not finished either (a killed process cannot
    report its end). Best effort: a run that is gone or an API error is logged, never fatal."""
    if not lock.flow_run_id:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    message = (f"marked Crashed by medpipe: a later run took over its store lock because {lock.stale_reason()} "
               "(the run was killed before it could report its end)")
    marked = []
    try:
        with get_client(sync_client=True) as client:
            flow_run_id: UUID | None = UUID(lock.flow_run_id)
            while flow_run_id is not None:
                run = client.read_flow_run(flow_run_id)
                if run.state is None or not run.state.is_final():
                    client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                    marked.append(str(flow_run_id)[:8])
                flow_run_id = None
                if run.parent_task_run_id is not None:  # a subflow: its task in the parent, then the parent
                    parent_task = client.read_task_run(run.parent_task_run_id)
                    if parent_task.state is None or not parent_task.state.is_final():
                        client.set_task_run_state(parent_task.id, Crashed(message=message), force=True)
                    flow_run_id = parent_task.flow_run_id
    except Exception as exc:  # noqa: BLE001 - the new run must go on; the old one stays as it was
        _logger().warning("could not mark the killed run (flow run %s) as crashed: %s", lock.flow_run_id[:8],
                          type(exc).__name__)
        return
    if marked:
        _logger().warning("the store's previous run was killed (%s): flow run(s) %s marked Crashed",
                          lock.stale_reason(), ", ".join(marked))


@contextmanager
def held_lock(url: str, run_id: str | None = None) -> Iterator[str]:
    """Hold the store lock (`medpipe.ingest.lock`) on `url` for the running flow; yields the lock's run id.

    The lock records the flow run id, so that the run that takes over the lock of a killed run marks that run
    Crashed (`crash_stale_run`); the lock is released on every exit, including SIGTERM/SIGINT, which Prefect and
    `shared_api_server` turn into exceptions. Refused in one line (StoreLockedError) while another run holds it."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    flow_run = context.flow_run if context is not None else None
    run_id = run_id or new_run_id()
    acquire_lock(url, run_id, flow_run_id=str(flow_run.id) if flow_run is not None else None,
                 on_stale=crash_stale_run)
    try:
        yield run_id
    finally:
        release_lock(url, run_id)


def load_key(key_secret: str | None = None) -> DeidKey:
    """The de-identification key from a Prefect Secret block (when named) or $MEDPIPE_DEID_KEY."""
    if key_secret:
        from prefect.blocks.system import Secret

        try:
            secret = cast(Secret, Secret.load(key_secret))  # called from sync code: the sync variant of load
        except ValueError as exc:  # Prefect: no block of that name
            raise MissingKeyError(f"no Prefect Secret block named {key_secret!r} ({type(exc).__name__})") from None
        return resolve_key(str(secret.get()))
    return resolve_key()


def gather(futures: Iterable[PrefectFuture], label: str, show: bool) -> list[Any]:
    """Results of mapped futures in submission order, with a progress bar on the terminal when `show`."""
    futures = list(futures)
    if show and futures:
        columns = (TextColumn(f"{label:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=False) as bar:
            task_id = bar.add_task(label, total=len(futures))
            for _ in as_completed(futures):
                bar.advance(task_id)
    return [f.result() for f in futures]
