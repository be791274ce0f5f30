"""Find registry credentials the way docker and skopeo do.

Explicit credentials win. Otherwise the first auth file that exists is read:
``--authfile``, ``$REGISTRY_AUTH_FILE``, ``${XDG_RUNTIME_DIR}/containers/
auth.json``, then ``$DOCKER_CONFIG/config.json`` (default
``~/.docker/config.json``). Within a file, ``credHelpers[host]`` beats
``credsStore``, which beats ``auths[host]``. Docker Hub is stored under
``https://index.docker.io/v1/``; other ``auths`` keys may be full URLs and
are matched by their ``host[:port]``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import AuthenticationError, UsageError

__all__ = [
    "DOCKER_HUB_AUTH_KEY",
    "Credentials",
    "find_credentials",
    "parse_creds_option",
]

logger = logging.getLogger(__name__)

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_HUB_DOMAINS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HELPER_TIMEOUT = 60
_HELPER_NOT_FOUND = "credentials not found"


@dataclass(frozen=True)
class Credentials:
    """Secrets for one registry; empty strings mean "not set"."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @property
    def has_basic(self) -> bool:
        """Tell whether a username and password are present."""
        return bool(self.username and self.password)


def parse_creds_option(text: str) -> tuple[str, str | None]:
    """Split ``--creds USER[:PASS]`` at the first colon.

    The password is None when the option has no colon, so the caller can
    ask for it.

    Raises:
        UsageError: the username is empty.
    """
    username, sep, password = text.partition(":")
    if not username:
        raise UsageError("invalid --creds value: expected USER[:PASSWORD]")
    return username, password if sep else None


def find_credentials(
    domain: str,
    *,
    username: str | None = None,
    password: str | None = None,
    authfile: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Credentials:
    """Return the credentials for ``domain``, or empty ones for anonymous.

    Raises:
        UsageError: an explicit auth file is missing or not valid JSON.
        AuthenticationError: a credential helper failed.
    """
    if username:
        return Credentials(username=username, password=password or "")
    env = os.environ if environ is None else environ
    key = _auth_key(domain)
    for path in _auth_files(authfile, env):
        config = _read_auth_file(path, explicit=path == authfile)
        if config is None:
            continue
        found = _lookup(config, key, domain)
        if found is not None:
            logger.debug("using credentials for %s from %s", key, path)
            return found
    return Credentials()


def _auth_key(domain: str) -> str:
    if domain in _HUB_DOMAINS:
        return DOCKER_HUB_AUTH_KEY
    return domain


def _auth_files(authfile: Path | None, env: Mapping[str, str]) -> list[Path]:
    if authfile is not None:
        return [authfile]
    paths: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        paths.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    if env.get("DOCKER_CONFIG"):
        paths.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    elif env.get("HOME"):
        paths.append(Path(env["HOME"]) / ".docker" / "config.json")
    return paths


def _read_auth_file(path: Path, *, explicit: bool) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if explicit:
            raise UsageError(
                f"auth file {str(path)!r} does not exist; check --authfile"
            ) from None
        return None
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(
            f"cannot read auth file {str(path)!r}: {exc}; fix or remove it"
        ) from exc
    return data if isinstance(data, dict) else None


def _lookup(config: Mapping[str, Any], key: str, domain: str) -> Credentials | None:
    helpers = config.get("credHelpers") or {}
    helper = helpers.get(key) or helpers.get(domain)
    if helper:
        return _run_helper(str(helper), key)
    if config.get("credsStore"):
        found = _run_helper(str(config["credsStore"]), key)
        if found is not None:
            return found
    auths = config.get("auths") or {}
    entry = auths.get(key)
    if entry is None:
        wanted = _host_of(key)
        for entry_key, value in auths.items():
            if _host_of(entry_key) == wanted:
                entry = value
                break
    if not isinstance(entry, dict):
        return None
    return _parse_auth_entry(entry, key)


def _host_of(key: str) -> str:
    if "://" not in key:
        key = "//" + key
    host = urlsplit(key).netloc
    return _auth_key(host)


def _parse_auth_entry(entry: Mapping[str, Any], key: str) -> Credentials | None:
    username = str(entry.get("username") or "")
    password = str(entry.get("password") or "")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=False).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise UsageError(
                f"invalid 'auth' value for {key!r} in the auth file: "
                "expected base64 of USER:PASSWORD"
            ) from None
        username, _, password = decoded.rstrip("\0").partition(":")
    identity = str(entry.get("identitytoken") or "")
    registry_token = str(entry.get("registrytoken") or "")
    if not (username or identity or registry_token):
        return None
    return Credentials(username, password, identity, registry_token)


def _run_helper(name: str, key: str) -> Credentials | None:
    program = f"docker-credential-{name}"
    try:
        result = subprocess.run(
            [program, "get"],
            input=key,
            capture_output=True,
            text=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise AuthenticationError(
            f"credential helper {program!r} not found; install it or remove "
            "it from the auth file"
        ) from None
    except subprocess.TimeoutExpired:
        raise AuthenticationError(
            f"credential helper {program!r} timed out after {_HELPER_TIMEOUT} s"
        ) from None
    if result.returncode != 0:
        if _HELPER_NOT_FOUND in (result.stdout + result.stderr).lower():
            return None
        raise AuthenticationError(
            f"credential helper {program!r} failed for {key!r} "
            f"(exit {result.returncode}): {result.stderr.strip()[:200]}"
        )
    try:
        data = json.loads(result.stdout)
        username, secret = str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError):
        raise AuthenticationError(
            f"credential helper {program!r} returned invalid output for {key!r}"
        ) from None
    if username == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username, secret)
