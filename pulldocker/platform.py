"""Platforms (os/arch/variant) and choosing an image manifest from an index.

Names are normalised the way containerd's platforms package does it, so that
``aarch64``, ``arm64`` and ``arm64/v8`` are one platform and ``x86_64`` is
``amd64``. An ARM variant falls back to older variants of the same
architecture (``arm/v7`` accepts ``arm/v6`` and ``arm/v5``) but never to a
newer one, because a newer variant may use instructions the host lacks.
Attestation manifests (platform ``unknown/unknown``) are never chosen.
"""

from __future__ import annotations

import platform as _host
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import PlatformNotFoundError, UsageError

__all__ = [
    "IMAGE_MANIFEST_TYPES",
    "INDEX_TYPES",
    "Platform",
    "host_platform",
    "is_attestation",
    "select_manifests",
]

INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
IMAGE_MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "i386": "386",
    "i686": "386",
    "armhf": "arm",
    "armel": "arm",
    "armv7l": "arm",
    "armv6l": "arm",
    "ppc64el": "ppc64le",
}
_ARCH_DEFAULT_VARIANT = {"armhf": "v7", "armel": "v6", "armv7l": "v7", "armv6l": "v6"}
_OS_ALIASES = {"macos": "darwin"}


@dataclass(frozen=True, order=True)
class Platform:
    """An operating system, CPU architecture and optional variant."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]`` such as ``linux/arm64/v8``.

        Raises:
            UsageError: the text does not have two or three parts.
        """
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(
                f"invalid platform {text!r}: expected os/arch[/variant], "
                "for example linux/amd64 or linux/arm64/v8"
            )
        variant = parts[2] if len(parts) == 3 else ""
        return cls(parts[0], parts[1], variant).normalized()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        """Build a platform from an index descriptor's or a config's fields."""
        return cls(
            str(data.get("os") or ""),
            str(data.get("architecture") or ""),
            str(data.get("variant") or ""),
        ).normalized()

    def normalized(self) -> Platform:
        """Return the canonical spelling of this platform."""
        os_name = self.os.lower()
        os_name = _OS_ALIASES.get(os_name, os_name)
        raw_arch = self.architecture.lower()
        arch = _ARCH_ALIASES.get(raw_arch, raw_arch)
        variant = self.variant.lower() or _ARCH_DEFAULT_VARIANT.get(raw_arch, "")
        if arch == "amd64" and variant == "v1":
            variant = ""
        elif arch == "arm64":
            if variant in ("8", "v8", "v8.0"):
                variant = ""
            elif variant in ("9", "v9.0"):
                variant = "v9"
        elif arch == "arm":
            if variant in ("", "7"):
                variant = "v7"
            elif variant in ("5", "6", "8"):
                variant = "v" + variant
        return Platform(os_name, arch, variant)

    def accepts(self, offered: Platform) -> bool:
        """Tell whether an image built for ``offered`` runs on this platform."""
        offered = offered.normalized()
        if offered.os != self.os or offered.architecture != self.architecture:
            return False
        if offered.variant == self.variant:
            return True
        return _variant_rank(offered) < _variant_rank(self)

    def __str__(self) -> str:
        if self.variant:
            return f"{self.os}/{self.architecture}/{self.variant}"
        return f"{self.os}/{self.architecture}"


def _variant_rank(platform: Platform) -> float:
    """Order variants of one architecture; unknown variants rank highest."""
    variant = platform.variant
    if not variant:
        # arm64 with no variant is v8; amd64 with no variant is v1.
        return 8.0 if platform.architecture == "arm64" else 1.0
    try:
        return float(variant.lstrip("v"))
    except ValueError:
        return float("inf")


def host_platform() -> Platform:
    """Return linux with the host's CPU architecture, also on macOS.

    Container images almost always target linux, so a macOS host requests
    ``linux/arm64`` rather than ``darwin/arm64``.
    """
    return Platform("linux", _host.machine() or "amd64").normalized()


def is_attestation(descriptor: Mapping[str, Any]) -> bool:
    """Tell whether an index entry is a BuildKit attestation manifest."""
    annotations = _mapping(descriptor.get("annotations"))
    if annotations.get("vnd.docker.reference.type") == "attestation-manifest":
        return True
    platform = _mapping(descriptor.get("platform"))
    return platform.get("os") == "unknown" or platform.get("architecture") == "unknown"


def _mapping(value: object) -> Mapping[str, Any]:
    """Return ``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def select_manifests(
    descriptors: Iterable[Mapping[str, Any]], requested: Platform, context: str
) -> Mapping[str, Any]:
    """Choose the index entry whose platform best matches ``requested``.

    An exact match wins; otherwise the closest older variant; among equals the
    first in index order. Nested indexes without a platform are returned so the
    caller can descend into them. When no entry states a platform, the first
    image manifest is returned and the caller checks its config.

    Raises:
        PlatformNotFoundError: nothing matches; the message lists what exists.
    """
    requested = requested.normalized()
    best: Mapping[str, Any] | None = None
    best_rank = -1.0
    available: list[str] = []
    nested: list[Mapping[str, Any]] = []
    unlabelled: list[Mapping[str, Any]] = []
    for descriptor in descriptors:
        if not isinstance(descriptor, Mapping):
            continue  # untrusted JSON: an index entry that is not an object
        media_type = descriptor.get("mediaType")
        if not isinstance(media_type, str):
            continue
        if media_type in INDEX_TYPES and not descriptor.get("platform"):
            nested.append(descriptor)
            continue
        if media_type not in IMAGE_MANIFEST_TYPES or is_attestation(descriptor):
            continue
        if not _mapping(descriptor.get("platform")):
            unlabelled.append(descriptor)
            continue
        offered = Platform.from_json(_mapping(descriptor.get("platform")))
        available.append(str(offered))
        if not requested.accepts(offered):
            continue
        rank = _variant_rank(offered)
        if offered.variant == requested.variant:
            rank = float("inf")
        if rank > best_rank:
            best, best_rank = descriptor, rank
    if best is not None:
        return best
    if len(nested) == 1 and not available:
        return nested[0]
    if unlabelled and not available:
        # Indexes written into OCI layouts often omit platforms; the caller
        # checks the chosen image's config against ``requested``.
        return unlabelled[0]
    listing = ", ".join(sorted(set(available))) or "none"
    raise PlatformNotFoundError(
        f"no image for platform {str(requested)!r} in {context} "
        f"(available: {listing}); choose one with --platform"
    )
