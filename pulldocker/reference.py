"""Parse and normalise image references the way Docker does.

A reference is ``[domain/]path[:tag][@digest]``. The first ``/``-separated
part is a domain only when it is ``localhost`` or contains ``.``, ``:`` or an
uppercase letter. Otherwise the whole text is a Docker Hub path, and a Hub
path with one component gets ``library/``. So ``busybox`` is
``docker.io/library/busybox:latest`` and ``localhost:5000/app`` is domain
``localhost:5000``, path ``app``. With neither tag nor digest the tag is
``latest``; with both, the image is pulled by digest and the tag is dropped,
as ``docker pull`` does. The grammar follows distribution/reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError

__all__ = [
    "DOCKER_HUB_API_HOST",
    "DOCKER_HUB_DOMAIN",
    "Reference",
    "parse_reference",
]

DOCKER_HUB_DOMAIN = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])"
_DOMAIN_RE = re.compile(rf"{_HOST}(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(
    r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")
# OCI requires exactly these encodings for the registered algorithms.
_STRICT_DIGEST = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: domain, repository path, tag or digest."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """Return ``domain/path``, the canonical repository name."""
        return f"{self.domain}/{self.path}"

    @property
    def api_host(self) -> str:
        """Return the ``host[:port]`` that serves the registry API."""
        if self.domain == DOCKER_HUB_DOMAIN:
            return DOCKER_HUB_API_HOST
        return self.domain

    @property
    def identifier(self) -> str:
        """Return the digest when pinned, else the tag, for manifest URLs."""
        return self.digest or self.tag or "latest"

    @property
    def familiar_name(self) -> str:
        """Return the short repository name Docker displays (``busybox``)."""
        if self.domain != DOCKER_HUB_DOMAIN:
            return self.name
        if self.path.startswith("library/") and self.path.count("/") == 1:
            return self.path.removeprefix("library/")
        return self.path

    def scope(self, actions: str = "pull") -> str:
        """Return the token scope ``repository:<path>:<actions>``."""
        return f"repository:{self.path}:{actions}"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or 'latest'}"


def parse_reference(text: str) -> Reference:
    """Parse an image reference into its canonical form.

    Raises:
        UsageError: the text is not a valid reference; the message names the
            rule it breaks.
    """
    if not text:
        raise UsageError("invalid reference '': expected an image name")
    if _IDENTIFIER_RE.fullmatch(text):
        raise UsageError(
            f"invalid reference {text!r}: a 64-hex image ID is not a name; "
            "pull by digest with NAME@sha256:<hex>"
        )
    rest, digest = _split_digest(text)
    domain, remainder = _split_domain(rest)
    path, tag = _split_tag(remainder)
    if path != path.lower():
        raise UsageError(
            f"invalid reference {text!r}: repository name must be lowercase"
        )
    if not _PATH_RE.fullmatch(path):
        raise UsageError(
            f"invalid reference {text!r}: repository path {path!r} may only "
            "use a-z, 0-9 and the separators '.', '_', '__', '-', '/'"
        )
    if not _DOMAIN_RE.fullmatch(domain):
        raise UsageError(f"invalid reference {text!r}: invalid domain {domain!r}")
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise UsageError(
            f"invalid reference {text!r}: name is longer than "
            f"{MAX_NAME_LENGTH} characters"
        )
    if domain == DOCKER_HUB_DOMAIN and "/" not in path:
        path = f"library/{path}"
    if digest:
        # Docker pulls by digest when both are given, and ignores the tag.
        tag = None
    elif tag is None:
        tag = "latest"
    return Reference(domain, path, tag, digest)


def _split_digest(text: str) -> tuple[str, str | None]:
    rest, sep, digest = text.partition("@")
    if not sep:
        return text, None
    if not _DIGEST_RE.fullmatch(digest):
        raise UsageError(
            f"invalid reference {text!r}: invalid digest {digest!r}, "
            "expected sha256:<64 hex digits>"
        )
    algorithm, _, encoded = digest.partition(":")
    expected = _STRICT_DIGEST.get(algorithm)
    if expected and (len(encoded) != expected or encoded != encoded.lower()):
        raise UsageError(
            f"invalid reference {text!r}: {algorithm} digest must be "
            f"{expected} lowercase hex digits"
        )
    return rest, digest


def _split_domain(text: str) -> tuple[str, str]:
    first, sep, remainder = text.partition("/")
    if not sep:
        return DOCKER_HUB_DOMAIN, text
    is_domain = (
        first == "localhost" or "." in first or ":" in first or first != first.lower()
    )
    if not is_domain:
        return DOCKER_HUB_DOMAIN, text
    if first == "index.docker.io":
        first = DOCKER_HUB_DOMAIN
    return first, remainder


def _split_tag(text: str) -> tuple[str, str | None]:
    path, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        return text, None
    if not _TAG_RE.fullmatch(tag):
        raise UsageError(
            f"invalid tag {tag!r}: use up to 128 letters, digits, '_', '.' "
            "or '-', not starting with '.' or '-'"
        )
    return path, tag
