"""Parse registry manifests and check their digests, without any I/O.

The media type comes from ``Content-Type`` when it names a manifest type.
Otherwise it is inferred from the body (``mediaType``, or ``schemaVersion``
with ``manifests`` or ``config``). Digests are always computed over the raw
bytes as received, never over re-serialised JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import IntegrityError, InvalidInputError, UnsupportedError
from .platform import IMAGE_MANIFEST_TYPES, INDEX_TYPES

__all__ = [
    "MANIFEST_ACCEPT",
    "SCHEMA1_TYPES",
    "Descriptor",
    "Manifest",
    "compute_digest",
    "parse_descriptor",
    "parse_manifest",
    "validate_digest",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
_GENERIC_TYPES = frozenset(
    {"", "application/json", "text/plain", "application/octet-stream"}
)
_DIGEST_PATTERN = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: media type, digest and size of a blob."""

    media_type: str
    digest: str
    size: int

    @property
    def hex(self) -> str:
        """Return the encoded part of the digest, safe as a file name."""
        return self.digest.partition(":")[2]


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as received: raw bytes, type, digest and JSON."""

    raw: bytes
    media_type: str
    digest: str
    data: dict[str, Any]

    @property
    def is_index(self) -> bool:
        """Tell whether this is an OCI index or a Docker manifest list."""
        return self.media_type in INDEX_TYPES

    @property
    def config(self) -> Descriptor:
        """Return the config descriptor of an image manifest."""
        return parse_descriptor(self.data.get("config"), "manifest config")

    @property
    def layers(self) -> list[Descriptor]:
        """Return the layer descriptors, base layer first."""
        layers = self.data.get("layers")
        if not isinstance(layers, list):
            raise InvalidInputError(f"manifest {self.digest} has no 'layers' list")
        return [parse_descriptor(item, f"layer of {self.digest}") for item in layers]


def validate_digest(digest: object, context: str) -> str:
    """Return ``digest`` if it is a sha256 or sha512 digest in OCI form.

    Raises:
        InvalidInputError: the digest is malformed or uses another algorithm.
    """
    if isinstance(digest, str):
        algorithm, _, encoded = digest.partition(":")
        pattern = _DIGEST_PATTERN.get(algorithm)
        if pattern is not None and pattern.fullmatch(encoded):
            return digest
    raise InvalidInputError(
        f"{context}: invalid digest {digest!r}, expected sha256:<64 lowercase hex>"
    )


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    """Return ``algorithm:hex`` of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def parse_descriptor(data: object, context: str) -> Descriptor:
    """Parse a descriptor object, checking its digest and size.

    Raises:
        InvalidInputError: a field is missing or has the wrong type.
    """
    if not isinstance(data, dict):
        raise InvalidInputError(f"{context}: expected a descriptor object")
    digest = validate_digest(data.get("digest"), context)
    size = data.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInputError(f"{context}: invalid size {size!r} for {digest}")
    return Descriptor(str(data.get("mediaType") or ""), digest, size)


def parse_manifest(
    raw: bytes, content_type: str, *, expected_digest: str | None, context: str
) -> Manifest:
    """Parse a manifest body and verify its digest.

    ``expected_digest`` is the digest requested, or the one the registry
    sent in ``Docker-Content-Digest`` for a tag; without one, sha256 of the
    body is the digest.

    Raises:
        IntegrityError: the body does not match the expected digest.
        UnsupportedError: the manifest is schema1 or of an unknown type.
        InvalidInputError: the body is not a JSON object.
    """
    algorithm = "sha256"
    if expected_digest:
        algorithm = validate_digest(expected_digest, context).partition(":")[0]
    digest = compute_digest(raw, algorithm)
    if expected_digest and digest != expected_digest:
        raise IntegrityError(
            f"digest mismatch for manifest of {context}: "
            f"expected {expected_digest}, got {digest}"
        )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"manifest of {context} is not valid JSON") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"manifest of {context} is not a JSON object")
    media_type = _media_type(data, content_type.split(";")[0].strip(), context)
    return Manifest(raw, media_type, digest, data)


def _media_type(data: dict[str, Any], header: str, context: str) -> str:
    body_type = data.get("mediaType")
    if header in SCHEMA1_TYPES or data.get("schemaVersion") == 1:
        raise UnsupportedError(
            f"{context} has a Docker schema1 manifest, which pulldocker does "
            "not support; push the image again with a current Docker or skopeo"
        )
    if header not in _GENERIC_TYPES:
        if isinstance(body_type, str) and body_type and body_type != header:
            raise InvalidInputError(
                f"manifest of {context}: Content-Type {header!r} disagrees "
                f"with mediaType {body_type!r}"
            )
        media_type = header
    elif isinstance(body_type, str) and body_type:
        media_type = body_type
    elif "manifests" in data:
        media_type = OCI_INDEX
    elif "config" in data:
        config = data.get("config") or {}
        is_oci = isinstance(config, dict) and config.get("mediaType") == OCI_CONFIG
        media_type = OCI_MANIFEST if is_oci else DOCKER_MANIFEST
    else:
        media_type = ""
    if media_type not in INDEX_TYPES and media_type not in IMAGE_MANIFEST_TYPES:
        raise UnsupportedError(
            f"{context} has a manifest of unsupported type {media_type!r}"
        )
    return media_type
