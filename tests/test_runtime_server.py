"""One Prefect API per process (flows/runtime.py): without a configured API the embedded server starts once, every
later flow (nested blocks, Dask worker processes) reports to it, and it stops at `stop_api_server()`, at interpreter
exit and on SIGTERM; a configured API is used as it is and nothing is started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 180  # upper bound for a subprocess to reach a state; never a speed assertion

# Counts real server launches (a process started), whatever calls `start`.
COUNT_LAUNCHES = """
import json, os, sys, time
from prefect.server.api.server import SubprocessASGIServer
import flows.runtime as runtime

launches = []
_launch = SubprocessASGIServer._run_uvicorn_command

def _counting(self):
    process = _launch(self)
    launches.append(process.pid)
    return process

SubprocessASGIServer._run_uvicorn_command = _counting

def report(**values):
    print("REPORT " + json.dumps(values), flush=True)
"""

TWO_FLOWS = COUNT_LAUNCHES + """
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.settings import get_current_settings


@task
def worker_api_url() -> str:
    return os.environ.get("PREFECT_API_URL", "")


@flow(name="first")
def first() -> str:
    return get_current_settings().api.url


@flow(name="second")
def second() -> str:
    return worker_api_url.submit().result()


if __name__ == "__main__":
    with runtime.shared_api_server() as a:
        in_first = first()
    between = os.environ.get("PREFECT_API_URL")
    with runtime.shared_api_server() as b:
        with runtime.shared_api_server() as c:
            in_worker = second.with_options(task_runner=runtime.dask_task_runner(workers=1))()
        with get_client(sync_client=True) as client:
            names = sorted(client.read_flow(run.flow_id).name for run in client.read_flow_runs())
    report(urls=[a, b, c, in_first, between, in_worker], launches=list(launches), flows=names)
    stopped = runtime.stop_api_server()
    report(stopped=stopped, env_after_stop=os.environ.get("PREFECT_API_URL"), stopped_again=runtime.stop_api_server())
    url = runtime.warm_api_server()
    with runtime.shared_api_server() as d:
        report(url=url, same=url == d, launches=list(launches))
"""

SIGNALLED = COUNT_LAUNCHES + """
if __name__ == "__main__":
    where, marker = sys.argv[1], sys.argv[2]
    url = runtime.warm_api_server()
    if where == "between flows":
        report(url=url, launches=list(launches))
        time.sleep(600)
    with runtime.shared_api_server():
        try:
            report(url=url, launches=list(launches))
            time.sleep(600)
        finally:
            open(marker, "w").write("unwound")
"""


def _env(tmp_path: Path) -> dict[str, str]:
    """No configured API (an embedded server is started), a fresh Prefect home, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and not k.startswith("PYTEST")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=str(WAIT_S), PREFECT_LOGGING_LEVEL="WARNING",
               PYTHONPATH=str(REPO))
    return env


def _script(tmp_path: Path, text: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


def _reports(output: str) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith("REPORT ")]


def _serving(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _gone(pid: int) -> bool:
    """The process has exited (a zombie, not yet reaped by its new parent, counts as exited)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (ProcessLookupError, FileNotFoundError):
        return True


def test_flows_of_one_process_share_one_embedded_server(tmp_path):
    done = subprocess.run([sys.executable, _script(tmp_path, TWO_FLOWS)], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shared, stopped, restarted = _reports(done.stdout)

    url = shared["urls"][0]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    assert shared["urls"] == [url] * 6  # both blocks, the nested one, the flows, between blocks, the Dask worker
    assert len(shared["launches"]) == 1  # one start for two blocks, a nested block and two flows
    assert shared["flows"] == ["first", "second"]  # both flow runs in the same API's database

    assert stopped == {"stopped": True, "env_after_stop": None, "stopped_again": False}
    assert _gone(shared["launches"][0])

    assert restarted["same"] and restarted["url"].startswith("http://127.0.0.1:")
    assert len(restarted["launches"]) == 2  # started again after an explicit stop, once
    assert _gone(restarted["launches"][1]) and not _serving(restarted["url"])  # stopped at interpreter exit


@pytest.mark.parametrize("where", ["inside a block", "between flows"])
def test_sigterm_stops_the_embedded_server(tmp_path, where):
    marker = tmp_path / "unwound"
    proc = subprocess.Popen([sys.executable, _script(tmp_path, SIGNALLED), where, str(marker)], cwd=REPO,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # until the server is up and the script waits
            lines.append(line)
            if line.startswith("REPORT "):
                break
        reports = _reports("".join(lines))
        assert reports, "".join(lines)[-3000:]
        ready = reports[0]
        assert len(ready["launches"]) == 1 and _serving(ready["url"])
        os.kill(proc.pid, signal.SIGTERM)  # the process only, as a supervisor (or `kill`) does
        proc.wait(timeout=WAIT_S)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=WAIT_S)
    assert proc.returncode == 128 + signal.SIGTERM
    assert _gone(ready["launches"][0]) and not _serving(ready["url"])
    assert marker.exists() == (where == "inside a block")  # `finally` blocks run


def test_a_configured_api_is_used_as_it_is(prefect_api, monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    from flows import runtime

    def refuse(self, timeout=None):
        raise AssertionError("no embedded server may start when an API is configured")

    monkeypatch.setattr(SubprocessASGIServer, "start", refuse)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/before")
    configured = PREFECT_API_URL.value()
    handler = signal.getsignal(signal.SIGTERM)
    with runtime.shared_api_server() as url:
        assert url == configured == os.environ["PREFECT_API_URL"] == runtime.warm_api_server()
        with runtime.shared_api_server() as inner:
            assert inner == url
        if handler is signal.SIG_DFL:  # SIGTERM unwinds the outer block still
            assert signal.getsignal(signal.SIGTERM) is runtime._exit_on_signal
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/before"
    assert signal.getsignal(signal.SIGTERM) is handler
    assert runtime.stop_api_server() is False  # none was started
