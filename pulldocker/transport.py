"""HTTP transport for registries: TLS policy, retries, redirects, errors.

This is the only module that translates ``requests`` and ``urllib3``
exceptions into pulldocker errors. Requests are retried on connection errors,
429 and 5xx with exponential backoff that honours ``Retry-After`` (seconds
or an HTTP-date, capped). Redirects are followed by hand so that
``Authorization`` never reaches another origin: object stores behind blob
redirects reject a request that carries both a signed URL and a header.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from . import __version__
from .errors import (
    AuthenticationError,
    LimitExceededError,
    NetworkError,
    NotFoundError,
    PulldockerError,
    RateLimitError,
    RegistryResponseError,
    UsageError,
)

__all__ = [
    "CHUNK_SIZE",
    "RetryPolicy",
    "Transport",
    "error_from_response",
    "is_loopback",
]

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
# Connect and read timeouts in seconds. The read timeout bounds each socket
# read, not a whole blob transfer.
DEFAULT_TIMEOUT = (30.0, 120.0)
MAX_REDIRECTS = 10
ERROR_BODY_LIMIT = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_IDEMPOTENT = frozenset({"GET", "HEAD"})
_NOT_FOUND_CODES = frozenset(
    {"MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN", "NOT_FOUND"}
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a failed idempotent request."""

    attempts: int = 5
    initial_delay: float = 2.0
    max_delay: float = 60.0


def _keep_netrc_away(request: requests.PreparedRequest) -> requests.PreparedRequest:
    # A truthy auth stops requests from adding .netrc credentials for a
    # redirect target host.
    return request


class Transport:
    """A requests session with per-host scheme and TLS decisions."""

    def __init__(
        self,
        *,
        cert_dir: Path | None = None,
        insecure_hosts: frozenset[str] = frozenset(),
        retry: RetryPolicy | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"pulldocker/{__version__}"
        self.session.headers["Docker-Distribution-API-Version"] = "registry/2.0"
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.sleep = sleep or time.sleep
        self.insecure_hosts = insecure_hosts
        self._unverified_hosts: set[str] = set()
        self._base_urls: dict[str, str] = {}
        self._pings: dict[str, requests.Response] = {}
        self._warnings_seen: set[str] = set()
        self._tempdir: str | None = None
        self._verify: bool | str = True
        if cert_dir is not None:
            self._load_cert_dir(cert_dir)

    def close(self) -> None:
        """Close connections and remove the temporary CA bundle."""
        self.session.close()
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def base_url(self, host: str) -> str:
        """Return ``scheme://host`` for a registry, pinging it on first use.

        HTTPS comes first. Plain HTTP is tried only for loopback hosts, as
        Docker allows, and for hosts named in ``insecure_hosts``, which may
        also use TLS without verification.

        Raises:
            NetworkError: no scheme reached a registry.
        """
        if host not in self._base_urls:
            base, response = self._probe(host)
            self._base_urls[host] = base
            self._pings[host] = response
        return self._base_urls[host]

    def ping_response(self, host: str) -> requests.Response:
        """Return the closed ``GET /v2/`` response, to read its challenges."""
        self.base_url(host)
        response = self._pings.pop(host, None)
        if response is None:
            response = self.send("GET", f"{self.base_url(host)}/v2/")
            response.close()
        return response

    def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send a request, retrying and following redirects by hand.

        GET and HEAD are retried on connection errors, 408, 429 and 5xx.
        The last response is returned whatever its status, with its body
        unread: read it with ``iter_body`` or ``read_body``, or close it.

        Raises:
            NetworkError: the connection failed on every attempt.
        """
        retryable = method in _IDEMPOTENT and data is None
        attempts = self.retry.attempts if retryable else 1
        delay = self.retry.initial_delay
        for attempt in range(1, attempts + 1):
            try:
                response = self._send_following(method, url, headers, data)
            except NetworkError as exc:
                if attempt == attempts:
                    raise
                logger.warning(
                    "retrying %s %s in %.1f s (attempt %d of %d): %s",
                    method, _redact(url), delay, attempt + 1, attempts, exc,
                )  # fmt: skip
                self.sleep(delay)
            else:
                if response.status_code not in _RETRY_STATUSES or attempt == attempts:
                    return response
                wait = _retry_after(response, delay, self.retry.max_delay)
                response.close()
                logger.warning(
                    "retrying %s %s in %.1f s after HTTP %d (attempt %d of %d)",
                    method, _redact(url), wait, response.status_code,
                    attempt + 1, attempts,
                )  # fmt: skip
                self.sleep(wait)
            delay = min(delay * 2, self.retry.max_delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def iter_body(self, response: requests.Response) -> Iterator[bytes]:
        """Yield the raw body in chunks of up to 1 MiB, not decoded.

        Raises:
            NetworkError: the connection dropped or timed out mid-body.
        """
        with _translate(response.url):
            yield from response.raw.stream(CHUNK_SIZE, decode_content=False)

    def read_body(
        self, response: requests.Response, limit: int, description: str
    ) -> bytes:
        """Read a whole body of at most ``limit`` bytes.

        Raises:
            LimitExceededError: the body is larger than ``limit``.
            NetworkError: the connection dropped mid-body.
        """
        parts: list[bytes] = []
        size = 0
        for chunk in self.iter_body(response):
            size += len(chunk)
            if size > limit:
                response.close()
                raise LimitExceededError(
                    f"{description} is larger than the {limit} byte limit"
                )
            parts.append(chunk)
        return b"".join(parts)

    def _send_following(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        data: Mapping[str, str] | None,
    ) -> requests.Response:
        current = dict(headers or {})
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            started = time.monotonic()
            with _translate(url):
                response = self.session.request(
                    method,
                    url,
                    headers=current,
                    data=data,
                    stream=True,
                    allow_redirects=False,
                    timeout=self.timeout,
                    verify=self._verify_for(url),
                    auth=_keep_netrc_away,
                )
            logger.debug(
                "%s %s -> %d (%.3f s)",
                method, _redact(url), response.status_code,
                time.monotonic() - started,
            )  # fmt: skip
            self._log_warning_header(response)
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            response.close()
            url = urljoin(url, location)
            if _origin(url) != origin:
                current.pop("Authorization", None)
            if response.status_code == 303:
                method, data = "GET", None
        raise NetworkError(
            f"too many redirects (more than {MAX_REDIRECTS}) for {_redact(url)}"
        )

    def _log_warning_header(self, response: requests.Response) -> None:
        # Registries send deprecation notices as "Warning: 299 - <text>".
        # They are shown once each and change nothing.
        value = response.headers.get("Warning", "")
        if not value.startswith("299") or value in self._warnings_seen:
            return
        self._warnings_seen.add(value)
        logger.warning("registry warning: %s", value[:300])

    def _probe(self, host: str) -> tuple[str, requests.Response]:
        insecure = host in self.insecure_hosts
        candidates = [("https", True)]
        if insecure or is_loopback(host):
            candidates.append(("http", True))
        if insecure:
            candidates.append(("https", False))
        failure: NetworkError | None = None
        for scheme, verify in candidates:
            if not verify:
                # The user asked for this host to be insecure; the warning is
                # logged once above instead of on every request.
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
                self._unverified_hosts.add(host)
            try:
                response = self._send_following(
                    "GET", f"{scheme}://{host}/v2/", None, None
                )
            except NetworkError as exc:
                failure = failure or exc
                self._unverified_hosts.discard(host)
                continue
            response.close()
            if response.status_code in (200, 401, 403):
                logger.debug("registry %s uses %s", host, scheme)
                if not verify:
                    logger.warning("TLS verification is off for %s (--insecure)", host)
                return f"{scheme}://{host}", response
            if response.status_code == 400 and scheme == "http":
                continue  # a TLS server responding to plain HTTP with 400
            self._unverified_hosts.discard(host)
        if failure is not None:
            raise failure
        raise NetworkError(f"{host} does not serve the registry API at /v2/")

    def _verify_for(self, url: str) -> bool | str:
        if urlsplit(url).netloc in self._unverified_hosts:
            return False
        return self._verify

    def _load_cert_dir(self, cert_dir: Path) -> None:
        if not cert_dir.is_dir():
            raise UsageError(
                f"certificate directory {str(cert_dir)!r} does not exist; "
                "check --cert-dir"
            )
        cas = sorted(cert_dir.glob("*.crt"))
        if cas:
            self._tempdir = tempfile.mkdtemp(prefix="pulldocker-ca-")
            bundle = Path(self._tempdir) / "ca-bundle.pem"
            # The custom CAs are added to, not put in place of, the defaults.
            parts = [Path(DEFAULT_CA_BUNDLE_PATH).read_text()]
            parts += [path.read_text() for path in cas]
            bundle.write_text("\n".join(parts))
            self._verify = str(bundle)
        for cert in sorted(cert_dir.glob("*.cert")):
            key = cert.with_suffix(".key")
            if not key.exists():
                raise UsageError(
                    f"client certificate {str(cert)!r} has no matching "
                    f"{key.name!r} in --cert-dir"
                )
            self.session.cert = (str(cert), str(key))


def is_loopback(host: str) -> bool:
    """Tell whether ``host[:port]`` is localhost, 127.0.0.0/8 or ::1."""
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def error_from_response(
    response: requests.Response, description: str
) -> PulldockerError:
    """Build the error for a failed response, reading a capped JSON body."""
    status = response.status_code
    codes, detail = _parse_error_body(response)
    summary = f"{description}: HTTP {status}"
    if codes:
        summary += f" {', '.join(codes)}"
    if detail:
        summary += f": {detail}"
    if status == 429 or "TOOMANYREQUESTS" in codes:
        return RateLimitError(f"{summary}; the registry rate limit was reached")
    if status == 404 or _NOT_FOUND_CODES.intersection(codes):
        return NotFoundError(f"{summary}; check the name, tag or digest")
    if status in (401, 403):
        return AuthenticationError(
            f"{summary}; the image was not found or access was denied, "
            "check the credentials"
        )
    return RegistryResponseError(summary, status=status, codes=codes)


def _parse_error_body(response: requests.Response) -> tuple[tuple[str, ...], str]:
    try:
        body = response.raw.read(ERROR_BODY_LIMIT, decode_content=True) or b""
    except (OSError, urllib3.exceptions.HTTPError):
        body = b""
    finally:
        response.close()
    try:
        data: Any = json.loads(body)
        errors = data["errors"]
        codes = tuple(str(item.get("code") or "UNKNOWN") for item in errors)
        messages = [str(item.get("message") or "") for item in errors]
        return codes, "; ".join(m for m in messages if m)[:300]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return (), ""


def _retry_after(response: requests.Response, fallback: float, cap: float) -> float:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return fallback
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return fallback
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - datetime.now(UTC)).total_seconds()
    # A date in the past gives no usable delay, so back off as usual.
    return min(seconds, cap) if seconds > 0 else fallback


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _redact(url: str) -> str:
    """Drop the query, which may carry a signature, and any user info."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


@contextlib.contextmanager
def _translate(url: str) -> Iterator[None]:
    where = _redact(url)
    try:
        yield
    except requests.exceptions.SSLError as exc:
        raise NetworkError(
            f"TLS verification failed for {where}: {_reason(exc)}; pass the "
            "registry's CA with --cert-dir, or --insecure to skip verification"
        ) from exc
    except (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError) as exc:
        raise NetworkError(f"timed out talking to {where}") from exc
    except requests.exceptions.ConnectionError as exc:
        raise NetworkError(f"cannot connect to {where}: {_reason(exc)}") from exc
    except (
        requests.exceptions.RequestException,
        urllib3.exceptions.HTTPError,
        OSError,
    ) as exc:
        raise NetworkError(f"transfer from {where} failed: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
