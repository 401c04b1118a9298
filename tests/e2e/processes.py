"""Real components as separate processes on loopback, each on a free port, stopped by process group.

Every component starts its processes in their own session (`start_new_session`), logs to a file in the run
folder, and stops with SIGTERM to the group (and every descendant), then SIGKILL after a grace period. A `Stack`
holds them: leaving it (also by an exception) stops everything in reverse order and, on failure, prints the tail
of every log; an atexit hook stops whatever is still running if the interpreter exits first.

    with Stack(run_dir) as stack:
        server, s3 = stack.start(PrefectServer(run_dir), MotoS3(run_dir))
        cluster = stack.start(DaskCluster(2, "1GiB", run_dir, env=s3.env()))[0]
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import httpx
import psutil

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's console scripts: prefect, dask, moto_server
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
NO_ANALYTICS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
C = TypeVar("C", bound="Component")


class StartupError(RuntimeError):
    """A component did not become ready in time (or its process exited)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it: bind port 0)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def s3_env(endpoint: str) -> dict[str, str]:
    """What a remote process needs to reach an S3 endpoint: its URL (botocore reads both names) and credentials."""
    return {**FAKE_AWS, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


def http_ok(url: str) -> bool:
    """True when GET url answers 2xx."""
    try:
        return httpx.get(url, timeout=2.0).is_success
    except httpx.HTTPError:
        return False


def wait_until(ready: Callable[[], bool], timeout: float, what: str,
               processes: Iterable[ManagedProcess] = (), interval: float = 0.2) -> None:
    """Poll `ready` until it is true; StartupError after `timeout` s, or at once when one of `processes` exits."""
    watched = list(processes)
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        dead = [p for p in watched if not p.alive()]
        if dead:
            raise StartupError(f"{what}: {dead[0].name} exited with {dead[0].returncode()} (log: {dead[0].log})")
        if time.monotonic() > deadline:
            raise StartupError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def _clean_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """This process's environment without Prefect's API/home, AWS settings, the scheduler or the key (each
    component gets its own in `extra`: never the caller's credentials), + extra."""
    own = ("PREFECT_API_URL", "PREFECT_HOME", "MEDPIPE_DASK_SCHEDULER", "MEDPIPE_DEID_KEY")
    env = {k: v for k, v in os.environ.items() if k not in own and not k.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(NO_ANALYTICS)
    env.update(extra or {})
    return env


class ManagedProcess:
    """One command in its own process group, output to `log`; stop() ends the group and all descendants."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None,
                 cwd: Path = REPO) -> None:
        self.name, self.argv, self.cwd = name, argv, cwd
        self.env = _clean_env(env)
        self.log = Path(log_dir) / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self._proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, not a shutdown)."""
        self._signal(signal.SIGKILL, self._family())
        if self._proc is not None:
            self._proc.wait(timeout=30)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group and descendants, SIGKILL what is left after `grace` s."""
        if self._proc is None:
            return
        family = self._family()
        self._signal(signal.SIGTERM, family)
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _, left = psutil.wait_procs(family, timeout=max(0.1, grace / 5))
        self._signal(signal.SIGKILL, left)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _family(self) -> list[psutil.Process]:
        """The process and its descendants (a served flow run may sit in a session of its own)."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, RuntimeError):
            return []

    def _signal(self, sig: signal.Signals, family: list[psutil.Process]) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                pass
        for proc in family:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass


class Component:
    """Processes that make one service; `launch` starts them without waiting, `wait_ready` blocks until usable."""

    name = "component"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.processes: list[ManagedProcess] = []

    def launch(self) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float) -> None:
        raise NotImplementedError

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.run_dir / "logs", env).start()
        self.processes.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def tails(self, lines: int = 30) -> str:
        return "\n".join(f"----- {p.name} ({p.log}) -----\n{p.tail(lines)}" for p in self.processes)


class PrefectServer(Component):
    """`prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME (its own SQLite database), no analytics.

    `settings` go into the server's environment (e.g. PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS)."""

    name = "prefect-server"

    def __init__(self, run_dir: Path, settings: Mapping[str, str] | None = None) -> None:
        super().__init__(run_dir)
        self.port = free_port()
        self.home = self.run_dir / "prefect-home"
        self.settings = dict(settings or {})

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api"

    def client_env(self) -> dict[str, str]:
        """Environment of a process that talks to this server (CLI, served flows, the test itself)."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home), **NO_ANALYTICS}

    def launch(self) -> None:
        env = {"PREFECT_HOME": str(self.home), "PREFECT_SERVER_UI_ENABLED": "false", **self.settings}
        self._spawn(self.name, [str(BIN / "prefect"), "server", "start", "--host", LOOPBACK, "--port", str(self.port),
                                "--no-ui", "--analytics-off"], env)

    def wait_ready(self, timeout: float) -> None:
        wait_until(lambda: http_ok(f"{self.api_url}/health"), timeout, self.name, self.processes, interval=0.5)


class MotoS3(Component):
    """A moto S3 server (`moto_server -H 127.0.0.1 -p P`); `env()` is what its clients need."""

    name = "moto-s3"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.port = free_port()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def launch(self) -> None:
        self._spawn(self.name, [str(BIN / "moto_server"), "-H", LOOPBACK, "-p", str(self.port)])

    def wait_ready(self, timeout: float) -> None:
        wait_until(lambda: http_ok(f"{self.endpoint}/moto-api/"), timeout, self.name, self.processes)

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server, straight (not through a proxy, not from the environment)."""
        return {"key": FAKE_AWS["AWS_ACCESS_KEY_ID"], "secret": FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": self.endpoint}}

    def filesystem(self) -> Any:
        """An s3fs filesystem on this server (see storage_options)."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options())


class DaskCluster(Component):
    """`dask scheduler` + `n_workers` × `dask worker --nworkers 1 --nthreads 1 --memory-limit M`, all on 127.0.0.1.

    Workers get `env` (their own S3 endpoint and credentials, as a remote worker would have)."""

    name = "dask"

    def __init__(self, n_workers: int, memory_limit: str, run_dir: Path, env: Mapping[str, str] | None = None,
                 preload: Iterable[str] = ()) -> None:
        super().__init__(run_dir)
        self.n_workers, self.memory_limit, self.env = n_workers, memory_limit, dict(env or {})
        self.preload = list(preload)  # modules each worker imports at start (`--preload`), e.g. "tasks.ingest"
        self.port = free_port()
        self.workers: list[ManagedProcess] = []
        self.killed: list[int] = []

    @property
    def address(self) -> str:
        return f"tcp://{LOOPBACK}:{self.port}"

    @property
    def worker_pids(self) -> list[int]:
        """PID of each `dask worker` process (the nanny; its worker process is in the same process group)."""
        return [w.pid for w in self.workers]

    def launch(self) -> None:
        self._spawn("dask-scheduler", [str(BIN / "dask"), "scheduler", "--host", LOOPBACK, "--port", str(self.port),
                                       "--dashboard-address", f"{LOOPBACK}:0"], self.env)
        for i in range(self.n_workers):
            self.workers.append(self._spawn(f"dask-worker-{i}", [
                str(BIN / "dask"), "worker", self.address, "--name", f"w{i}", "--host", LOOPBACK, "--nworkers", "1",
                "--nthreads", "1", "--memory-limit", self.memory_limit, "--no-dashboard",
                "--local-directory", str(self.run_dir / f"dask-w{i}"),
                *[arg for module in self.preload for arg in ("--preload", module)]], self.env))

    def wait_ready(self, timeout: float) -> None:
        wait_until(lambda: self._scheduler_reachable(), timeout, "dask scheduler", self.processes[:1])
        with self.client() as client:
            client.wait_for_workers(self.n_workers, timeout=timeout)

    def client(self) -> Any:
        """A distributed.Client on the scheduler (use as a context manager)."""
        from distributed import Client

        return Client(self.address, timeout=30, set_as_default=False)

    def busy_workers(self) -> list[int]:
        """Indices of the workers processing a task right now."""
        with self.client() as client:
            info = client.scheduler_info(n_workers=-1)["workers"]
            processing = client.processing()
        names = {addr: str(w.get("name")) for addr, w in info.items()}
        return sorted(int(names[a][1:]) for a, keys in processing.items() if keys and names.get(a, "").startswith("w"))

    def kill_worker(self, i: int) -> int:
        """SIGKILL worker i's process group (nanny and worker: a lost machine); returns its PID."""
        worker = self.workers[i]
        worker.kill()
        self.killed.append(i)
        return worker.pid

    def _scheduler_reachable(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1):
                return True
        except OSError:
            return False


class ServedFlows(Component):
    """A process that serves deployments (`deployments/serve.py`, or any script calling `serve`) against a Prefect
    server; ready when every deployment in `deployments` ("flow-name/deployment-name") exists in the API."""

    name = "served-flows"

    def __init__(self, run_dir: Path, argv: list[str], env: Mapping[str, str], api_url: str,
                 deployments: Iterable[str]) -> None:
        super().__init__(run_dir)
        self.argv, self.env, self.api_url, self.deployments = argv, dict(env), api_url, list(deployments)

    def launch(self) -> None:
        self._spawn(self.name, self.argv, self.env)

    def wait_ready(self, timeout: float) -> None:
        wait_until(lambda: all(deployment_exists(self.api_url, d) for d in self.deployments), timeout, self.name,
                   self.processes, interval=0.5)


def deployment_exists(api_url: str, name: str) -> bool:
    """True when the deployment "flow/deployment" is registered."""
    try:
        return httpx.get(f"{api_url}/deployments/name/{name}", timeout=5).is_success
    except httpx.HTTPError:
        return False


class Stack:
    """Components started together and stopped together (reverse order), also on failure and at exit."""

    def __init__(self, run_dir: Path, quiet: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.components: list[Component] = []
        self._stoppers: list[Callable[[], None]] = []
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self._launched: dict[str, float] = {}
        atexit.register(self.stop)

    def start(self, *components: C, timeout: float = 120.0) -> list[C]:
        """Launch all (in parallel), then wait until each is ready."""
        self.launch(*components)
        self.wait(*components, timeout=timeout)
        return list(components)

    def launch(self, *components: Component) -> None:
        """Start the components' processes without waiting for them."""
        for component in components:
            self.components.append(component)
            self._stoppers.append(component.stop)
            self._launched[component.name] = time.monotonic()
            component.launch()

    def wait(self, *components: Component, timeout: float = 120.0) -> None:
        """Wait until each launched component is ready; seconds from its launch are kept in `timings`."""
        begin = time.monotonic()
        for component in components:
            component.wait_ready(max(1.0, timeout - (time.monotonic() - begin)))
            self.timings[f"start {component.name}"] = time.monotonic() - self._launched[component.name]

    def on_stop(self, stop: Callable[[], None]) -> None:
        """Also call `stop` when the stack stops (in reverse order with the components), e.g. an in-process proxy."""
        self._stoppers.append(stop)

    def stop(self) -> None:
        while self._stoppers:
            stop = self._stoppers.pop()
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - stop the rest anyway
                print(f"stopping {stop}: {type(exc).__name__}: {exc}", file=sys.stderr)

    def tails(self, lines: int = 30) -> str:
        return "\n".join(c.tails(lines) for c in self.components)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None and not self.quiet:
                print(f"\n===== logs of the failed run ({self.run_dir}) =====\n{self.tails()}", file=sys.stderr)
        finally:
            self.stop()
            atexit.unregister(self.stop)
