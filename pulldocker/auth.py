"""Registry authentication: challenges, bearer tokens and Basic credentials.

A registry answers ``GET /v2/`` or a resource request with 401 and one or
more ``WWW-Authenticate`` challenges, for example::

    Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"

For ``Bearer`` the client asks the realm for a token covering the scopes it
needs (GET with Basic credentials, or an OAuth2 POST with a refresh token)
and sends it as ``Authorization: Bearer``. For ``Basic`` the credentials go
on every request. Tokens are cached per (realm, service, scopes) until
shortly before they expire. After a 401 the token is dropped and the request
is retried once, as the distribution token spec and containerd do.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import requests

from .credentials import Credentials
from .errors import AuthenticationError
from .transport import Transport, error_from_response

__all__ = [
    "Authenticator",
    "Challenge",
    "challenges_from_response",
    "parse_challenges",
]

logger = logging.getLogger(__name__)

CLIENT_ID = "pulldocker"
TOKEN_BODY_LIMIT = 1 << 20
MIN_TOKEN_LIFETIME = 60
# Refetch a token this many seconds before its expiry, so a request never
# starts with a token about to run out.
TOKEN_MARGIN = 5.0
_POST_FALLBACK_STATUSES = frozenset({400, 401, 404, 405})


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a lowercase scheme and its params."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def scopes(self) -> tuple[str, ...]:
        """Return the space-separated ``scope`` parameter as a tuple."""
        return tuple(self.params.get("scope", "").split())


def parse_challenges(lines: Iterable[str]) -> list[Challenge]:
    """Parse every challenge in the given header lines.

    A line may hold several challenges: a bare token that is not followed
    by ``=`` starts a new one (RFC 7235). Values are tokens or quoted strings
    with backslash escapes, and commas inside quotes are data.
    """
    found: list[Challenge] = []
    for line in lines:
        found.extend(_parse_line(line))
    return found


def challenges_from_response(response: requests.Response) -> list[Challenge]:
    """Return the challenges in every ``WWW-Authenticate`` header line."""
    # requests joins repeated headers with ", ", which breaks the grammar,
    # so read the separate lines from urllib3.
    raw_headers = getattr(response.raw, "headers", None)
    if raw_headers is not None and hasattr(raw_headers, "getlist"):
        lines = list(raw_headers.getlist("WWW-Authenticate"))
    else:
        value = response.headers.get("WWW-Authenticate")
        lines = [value] if value else []
    return parse_challenges(lines)


class Authenticator:
    """Produce ``Authorization`` values for registry requests, per host."""

    def __init__(
        self,
        transport: Transport,
        credentials: Credentials,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.credentials = credentials
        self.clock = clock
        self._identity_token = credentials.identity_token
        self._challenges: dict[str, list[Challenge]] = {}
        self._tokens: dict[tuple[str, str, tuple[str, ...]], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def remember(self, host: str, response: requests.Response) -> bool:
        """Store the challenges of a 401 response; tell whether it had any."""
        challenges = challenges_from_response(response)
        if challenges:
            with self._lock:
                self._challenges[host] = challenges
        return bool(challenges)

    def authorization(self, host: str, scopes: Iterable[str]) -> str | None:
        """Return the ``Authorization`` value for a request, if one is needed.

        Raises:
            AuthenticationError: the token server rejected the credentials.
        """
        if self.credentials.registry_token:
            return f"Bearer {self.credentials.registry_token}"
        challenge = self._preferred(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic() if self.credentials.has_basic else None
        return f"Bearer {self._token(challenge, scopes)}"

    def handle_unauthorized(
        self,
        host: str,
        response: requests.Response,
        scopes: tuple[str, ...],
        sent: str | None,
    ) -> tuple[str, ...] | None:
        """Update state after a 401 or 403 and return scopes for one retry.

        The cached token is dropped if it is the one ``sent``; when another
        thread has already replaced it, the new one is kept. An
        ``insufficient_scope`` challenge adds its scope. None means a retry
        cannot help.
        """
        requested = scopes
        fresh = challenges_from_response(response)
        bearer = next((c for c in fresh if c.scheme == "bearer"), None)
        if bearer is not None and bearer.params.get("error") == "insufficient_scope":
            requested = tuple(dict.fromkeys(requested + bearer.scopes))
        with self._lock:
            if fresh:
                self._challenges[host] = fresh
            challenge = self._preferred_locked(host)
            if challenge is not None and challenge.scheme == "bearer":
                for key in (
                    _token_key(challenge, requested),
                    _token_key(challenge, scopes),
                ):
                    cached = self._tokens.get(key)
                    if cached is not None and f"Bearer {cached[0]}" == sent:
                        del self._tokens[key]
        if challenge is None:
            return None
        if challenge.scheme == "basic" and not self.credentials.has_basic:
            return None
        return requested

    def _preferred(self, host: str) -> Challenge | None:
        with self._lock:
            return self._preferred_locked(host)

    def _preferred_locked(self, host: str) -> Challenge | None:
        challenges = self._challenges.get(host, [])
        for scheme in ("bearer", "basic"):
            for challenge in challenges:
                if challenge.scheme == scheme:
                    return challenge
        return None

    def _basic(self) -> str:
        pair = f"{self.credentials.username}:{self.credentials.password}"
        return "Basic " + base64.b64encode(pair.encode()).decode()

    def _token(self, challenge: Challenge, scopes: Iterable[str]) -> str:
        scope_tuple = tuple(sorted(set(scopes)))
        key = _token_key(challenge, scope_tuple)
        with self._lock:
            cached = self._tokens.get(key)
        if cached is not None and cached[1] > self.clock():
            return cached[0]
        token, lifetime = self._fetch_token(challenge, scope_tuple)
        expiry = self.clock() + max(lifetime - TOKEN_MARGIN, 0.0)
        with self._lock:
            self._tokens[key] = (token, expiry)
        return token

    def _fetch_token(
        self, challenge: Challenge, scopes: tuple[str, ...]
    ) -> tuple[str, float]:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthenticationError(
                "the registry sent a Bearer challenge without a realm"
            )
        logger.debug("requesting a token from %s for %s", realm, " ".join(scopes))
        response: requests.Response | None = None
        if self._identity_token:
            response = self._post_refresh(realm, challenge, scopes)
            if response.status_code in _POST_FALLBACK_STATUSES:
                response.close()
                response = None
        if response is None:
            response = self._get_token(realm, challenge, scopes)
        if response.status_code == 401:
            response.close()
            user = self.credentials.username or "anonymous"
            raise AuthenticationError(
                f"token server {realm} rejected the credentials of {user!r}; "
                "check --creds or the auth file"
            )
        if response.status_code >= 300:
            raise error_from_response(response, f"token request to {realm}")
        body = self.transport.read_body(response, TOKEN_BODY_LIMIT, "token response")
        return self._parse_token(body, realm)

    def _get_token(
        self, realm: str, challenge: Challenge, scopes: tuple[str, ...]
    ) -> requests.Response:
        query: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        query += [("scope", scope) for scope in scopes]
        headers: dict[str, str] = {}
        if self.credentials.has_basic:
            query.append(("account", self.credentials.username))
            headers["Authorization"] = self._basic()
        separator = "&" if "?" in realm else "?"
        url = realm + (separator + urlencode(query) if query else "")
        return self.transport.send("GET", url, headers=headers)

    def _post_refresh(
        self, realm: str, challenge: Challenge, scopes: tuple[str, ...]
    ) -> requests.Response:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self._identity_token,
            "client_id": CLIENT_ID,
            "scope": " ".join(scopes),
        }
        if challenge.params.get("service"):
            form["service"] = challenge.params["service"]
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return self.transport.send("POST", realm, headers=headers, data=form)

    def _parse_token(self, body: bytes, realm: str) -> tuple[str, float]:
        try:
            data: Any = json.loads(body)
            token = data.get("token") or data.get("access_token")
            lifetime = float(data.get("expires_in") or MIN_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError, RecursionError) as exc:
            raise AuthenticationError(
                f"token server {realm} returned an invalid response"
            ) from exc
        if not isinstance(token, str) or not token:
            raise AuthenticationError(f"token server {realm} returned no token")
        refresh = data.get("refresh_token")
        if isinstance(refresh, str) and refresh:
            self._identity_token = refresh
        return token, max(lifetime, MIN_TOKEN_LIFETIME)


def _token_key(
    challenge: Challenge, scopes: tuple[str, ...]
) -> tuple[str, str, tuple[str, ...]]:
    return (
        challenge.params.get("realm", ""),
        challenge.params.get("service", ""),
        tuple(sorted(set(scopes))),
    )


def _parse_line(line: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    position = 0
    scheme: str | None = None
    params: dict[str, str] = {}
    while position < len(line):
        position = _skip(line, position, " \t,")
        if position >= len(line):
            break
        token, position = _read_token(line, position)
        if not token:
            position += 1  # skip a stray character
            continue
        after = _skip(line, position, " \t")
        if after < len(line) and line[after] == "=" and scheme is not None:
            value, position = _read_value(line, _skip(line, after + 1, " \t"))
            params[token.lower()] = value
            continue
        if scheme is not None:
            challenges.append(Challenge(scheme, params))
        scheme, params = token.lower(), {}
    if scheme is not None:
        challenges.append(Challenge(scheme, params))
    return challenges


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position


def _read_token(text: str, position: int) -> tuple[str, int]:
    start = position
    while position < len(text) and text[position] not in ' \t,="':
        position += 1
    return text[start:position], position


def _read_value(text: str, position: int) -> tuple[str, int]:
    if position >= len(text) or text[position] != '"':
        return _read_token(text, position)
    chars: list[str] = []
    position += 1
    while position < len(text):
        char = text[position]
        if char == "\\" and position + 1 < len(text):
            chars.append(text[position + 1])
            position += 2
            continue
        if char == '"':
            return "".join(chars), position + 1
        chars.append(char)
        position += 1
    return "".join(chars), position
