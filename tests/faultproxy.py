"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a real registry.

The proxy forwards every request to ``upstream`` and streams the response back,
unless a ``Fault`` matches the request first. Faults drop the connection
after some body bytes, stall, return an error status, flip a body byte,
return 401 ``invalid_token`` as if a token expired early, or redirect to
another origin. Each fault fires ``times`` times (None: always). The proxy
records every request it saw, with its headers, for the tests to inspect.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host"}
_CHUNK = 64 * 1024


@dataclass
class Fault:
    """One fault: which requests it hits, what it does and how often.

    ``kind`` is one of ``drop``, ``stall``, ``status``, ``flip``, ``expire``
    and ``redirect``. ``after`` is the number of body bytes sent before a
    drop, stall or flip. ``status`` and ``headers`` shape a ``status`` response;
    ``location`` is the redirect target prefix, to which the request path and
    ``query`` (such as a presigned-URL signature) are appended.
    """

    kind: str
    path: str = r"/v2/.+/blobs/"
    method: str = "GET"
    times: int | None = 1
    after: int = 4096
    seconds: float = 30.0
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    location: str = ""
    query: str = ""
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        return method == self.method and re.search(self.path, path) is not None


@dataclass
class Seen:
    """A request as the proxy received it."""

    method: str
    path: str
    headers: dict[str, str]
    fault: str | None


class FaultProxy:
    """A threaded proxy; use as a context manager, or call ``close``."""

    def __init__(
        self,
        upstream: str,
        *,
        upstream_headers: dict[str, str] | None = None,
        strip_prefix: str = "",
        reject_authorization: bool = False,
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.upstream_headers = upstream_headers or {}
        self.strip_prefix = strip_prefix
        self.reject_authorization = reject_authorization
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.stop_stalling = threading.Event()
        handler = type("Handler", (_Handler,), {"proxy": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.fired += 1
                    return fault
        return None

    def close(self) -> None:
        self.stop_stalling.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def _handle(self, method: str) -> None:
        proxy = self.proxy
        headers = {k: v for k, v in self.headers.items()}
        fault = proxy.take_fault(method, self.path)
        with proxy.lock:
            proxy.seen.append(
                Seen(method, self.path, headers, fault.kind if fault else None)
            )
        if proxy.reject_authorization and "Authorization" in self.headers:
            self._answer(400, {}, b"request carries two auth mechanisms\n")
            return
        if fault is not None and fault.kind == "status":
            body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'
            self._answer(fault.status, fault.headers, body if method == "GET" else b"")
            return
        if fault is not None and fault.kind == "redirect":
            location = fault.location + self.path + fault.query
            self._answer(307, {"Location": location}, b"")
            return
        if fault is not None and fault.kind == "expire":
            challenge = fault.headers.get("WWW-Authenticate", "")
            self._answer(401, {"WWW-Authenticate": challenge}, b"")
            return
        self._forward(method, fault)

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _forward(self, method: str, fault: Fault | None) -> None:
        proxy = self.proxy
        path = self.path
        if proxy.strip_prefix and path.startswith(proxy.strip_prefix):
            path = path[len(proxy.strip_prefix) :].split("?", 1)[0]
        connection = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=60
        )
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS
        }
        headers.update(proxy.upstream_headers)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            self.send_response(response.status)
            length = None
            for key, value in response.getheaders():
                if key.lower() in _HOP_HEADERS:
                    continue
                if key.lower() == "location" and value.startswith("http"):
                    value = re.sub(r"^https?://[^/]+", proxy.url, value)
                if key.lower() == "content-length":
                    length = int(value)
                self.send_header(key, value)
            if length is None:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if method == "HEAD":
                return
            self._stream_body(response, fault)
        finally:
            connection.close()

    def _stream_body(
        self, response: http.client.HTTPResponse, fault: Fault | None
    ) -> None:
        sent = 0
        while chunk := response.read(_CHUNK):
            if fault is not None and sent + len(chunk) > fault.after:
                cut = fault.after - sent
                if fault.kind == "flip":
                    flipped = bytearray(chunk)
                    flipped[cut] ^= 0xFF
                    self.wfile.write(bytes(flipped))
                    sent += len(chunk)
                    fault = None
                    continue
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                if fault.kind == "stall":
                    deadline = time.monotonic() + fault.seconds
                    while time.monotonic() < deadline:
                        if self.proxy.stop_stalling.wait(0.1):
                            break
                self.close_connection = True
                self.connection.close()
                return
            self.wfile.write(chunk)
            sent += len(chunk)
