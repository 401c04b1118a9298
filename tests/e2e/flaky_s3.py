"""Transient S3 faults: a loopback HTTP reverse proxy in front of an S3 endpoint (moto) that answers some requests
with 503 SlowDown / 500 InternalError instead of forwarding them, and forwards the rest unchanged.

Clients point at `FlakyS3Proxy.endpoint` instead of the real endpoint. Requests are forwarded byte for byte
(headers kept, the signing headers included; bodies streamed in both directions, chunked request bodies relayed
as they are), except `Expect: 100-continue`, which the proxy answers itself. Which requests fail is decided by a
`FaultPlan`: every Nth request, or a seeded random fraction, at most `max_faults` in all (so a client's retries
always get through). `faults` counts what was injected.

`hold(pattern)` makes requests whose "METHOD path" matches a regular expression wait (before their body is read)
until `release()`, so a test can act while a step is provably in flight, e.g. kill a Dask worker while its archive
writes are pending. A held request waits at most `max_hold_s`.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from tests.e2e.processes import s3_env

CHUNK = 1 << 16
ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "upgrade", "te"}


@dataclass
class FaultPlan:
    """Which requests fail: every `every`-th one (when set) or each with probability `rate` (seeded), never more
    than `max_faults`; the status of each fault is drawn (seeded) from `statuses`."""

    every: int | None = None
    rate: float = 0.0
    max_faults: int = 20
    seed: int = 0
    statuses: tuple[int, ...] = (503, 500)
    _rng: random.Random = field(init=False, repr=False)
    _seen: int = field(default=0, init=False)
    _injected: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 2:
            raise ValueError("every must be >= 2 (every request failing would never get through)")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError("rate must be in [0, 1)")
        if any(s not in ERRORS for s in self.statuses):
            raise ValueError(f"statuses must be among {sorted(ERRORS)}")
        self._rng = random.Random(self.seed)

    def next(self) -> int | None:
        """The status to answer the next request with, or None to forward it."""
        with self._lock:
            self._seen += 1
            if self._injected >= self.max_faults:
                return None
            hit = self._seen % self.every == 0 if self.every else self._rng.random() < self.rate
            if not hit:
                return None
            self._injected += 1
            return self._rng.choice(self.statuses)


class FlakyS3Proxy:
    """A threaded reverse proxy on 127.0.0.1 (free port) in front of `upstream` (http://host:port)."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None, max_hold_s: float = 60.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.plan = plan or FaultPlan()
        self.max_hold_s = max_hold_s
        self.requests = 0
        self.faults: dict[int, int] = {}
        self.faulted: list[str] = []  # "METHOD path" of every injected fault
        self._count_lock = threading.Lock()
        self._hold: re.Pattern[str] | None = None
        self._held = threading.Event()  # set when a request matched the hold pattern
        self._released = threading.Event()
        self._released.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-s3", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Environment of a client that goes through this proxy (endpoint and fake credentials)."""
        return s3_env(self.endpoint)

    @property
    def injected(self) -> int:
        """Faults injected so far."""
        return sum(self.faults.values())

    def start(self) -> FlakyS3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FlakyS3Proxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def hold(self, pattern: str) -> threading.Event:
        """Hold requests whose "METHOD path" matches `pattern` until release(); the event is set at the first."""
        self._held.clear()
        self._released.clear()
        self._hold = re.compile(pattern)
        return self._held

    def release(self) -> None:
        self._hold = None
        self._released.set()

    def _decide(self, method: str, path: str) -> int | None:
        """Wait if held; then the fault to inject (or None), counted."""
        target = f"{method} {path}"
        hold = self._hold
        if hold is not None and hold.search(target):
            self._held.set()
            self._released.wait(self.max_hold_s)
        status = self.plan.next()
        with self._count_lock:
            self.requests += 1
            if status is not None:
                self.faults[status] = self.faults.get(status, 0) + 1
                self.faulted.append(target)
        return status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: the counts are the record

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _proxy(self) -> None:
        proxy: FlakyS3Proxy = self.server.proxy  # type: ignore[attr-defined]
        self.close_connection = True  # one request per connection: clients reconnect, nothing is half-read
        try:
            status = proxy._decide(self.command, self.path)
            if status is not None:
                self._drain_body()
                self._fail(status)
            else:
                self._forward(proxy.upstream)
        except (ConnectionError, TimeoutError, OSError):
            pass  # the client went away (e.g. a killed worker): nothing to answer

    def _forward(self, upstream: tuple[str, int]) -> None:
        conn = http.client.HTTPConnection(*upstream, timeout=120)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.endheaders()
            self._relay_body(conn.send)
            response = conn.getresponse()
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "transfer-encoding":
                    self.send_header(name, value)
            chunked = response.getheader("transfer-encoding", "").lower() == "chunked"
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            while block := response.read(CHUNK):
                self.wfile.write(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            conn.close()

    def _relay_body(self, send: Any) -> None:
        """Stream the request body to `send`: Content-Length bytes, or the chunked encoding as it is."""
        length = self.headers.get("Content-Length")
        if length is not None:
            left = int(length)
            while left > 0:
                block = self.rfile.read(min(CHUNK, left))
                if not block:
                    raise ConnectionError("client closed the body early")
                send(block)
                left -= len(block)
        elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline()
                send(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (trailer := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                        send(trailer)
                    send(b"\r\n")
                    return
                send(self.rfile.read(size + 2))  # the chunk and its CRLF

    def _drain_body(self) -> None:
        self._relay_body(lambda _block: None)

    def _fail(self, status: int) -> None:
        code, message = ERRORS[status]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>flaky-s3</RequestId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
