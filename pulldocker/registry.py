"""A pull-only client for one repository of an OCI distribution registry.

Every request goes through ``_request``, which adds ``Authorization`` and,
after a 401 or 403, lets the authenticator fetch a fresh token and retries
once. Blobs are streamed to a file in 1 MiB chunks while their size and
digest are checked. A dropped connection resumes with ``Range`` from the
bytes already written.
"""

from __future__ import annotations

import hashlib
import logging
from typing import BinaryIO

import requests

from .auth import Authenticator
from .errors import IntegrityError, NetworkError, RegistryResponseError
from .manifest import MANIFEST_ACCEPT, Descriptor, Manifest, parse_manifest
from .progress import ProgressListener
from .reference import Reference
from .transport import Transport, error_from_response

__all__ = ["RegistryClient"]

logger = logging.getLogger(__name__)

MANIFEST_LIMIT = 4 << 20
RESUME_ATTEMPTS = 5


class RegistryClient:
    """Fetch manifests and blobs of one repository."""

    def __init__(
        self, reference: Reference, transport: Transport, auth: Authenticator
    ) -> None:
        self.reference = reference
        self.transport = transport
        self.auth = auth
        self.host = reference.api_host
        self.scopes: tuple[str, ...] = (reference.scope(),)
        self._pinged = False

    def ping(self) -> None:
        """Learn the scheme and the auth challenges of the registry.

        Raises:
            NetworkError: the registry cannot be reached.
            RegistryError: ``/v2/`` returned an unexpected status.
        """
        response = self.transport.ping_response(self.host)
        response.close()
        if response.status_code == 401:
            self.auth.remember(self.host, response)
        elif response.status_code >= 300 and response.status_code != 403:
            raise error_from_response(response, f"registry {self.host} /v2/")
        self._pinged = True

    def head_manifest(self, identifier: str) -> str | None:
        """Return the digest the registry reports for a tag, if it sends one."""
        response = self._request(
            "HEAD", f"manifests/{identifier}", {"Accept": MANIFEST_ACCEPT}
        )
        response.close()
        if response.status_code != 200:
            return None
        return response.headers.get("Docker-Content-Digest") or None

    def fetch_manifest(self, identifier: str) -> Manifest:
        """Fetch a manifest or index by tag or digest and verify its digest.

        Raises:
            NotFoundError: the tag or digest does not exist.
            IntegrityError: the body does not match the digest.
            UnsupportedError: the manifest is schema1 or of an unknown type.
        """
        context = f"{self.reference.name}:{identifier}"
        if identifier.count(":") == 1 and "sha" in identifier.split(":")[0]:
            context = f"{self.reference.name}@{identifier}"
        response = self._request(
            "GET", f"manifests/{identifier}", {"Accept": MANIFEST_ACCEPT}
        )
        if response.status_code != 200:
            raise error_from_response(response, f"manifest {context}")
        raw = self.transport.read_body(response, MANIFEST_LIMIT, f"manifest {context}")
        expected = identifier if ":" in identifier else None
        if expected is None:
            # By tag, the header digest is checked against the body; the
            # client still computes its own rather than trusting it.
            expected = response.headers.get("Docker-Content-Digest") or None
        return parse_manifest(
            raw,
            response.headers.get("Content-Type", ""),
            expected_digest=expected,
            context=context,
        )

    def fetch_blob_bytes(self, descriptor: Descriptor, limit: int) -> bytes:
        """Fetch a small blob such as a config into memory and verify it.

        Raises:
            IntegrityError: the size or digest does not match.
            LimitExceededError: the blob is larger than ``limit``.
        """
        response = self._request("GET", f"blobs/{descriptor.digest}", _IDENTITY)
        if response.status_code != 200:
            raise error_from_response(response, f"blob {descriptor.digest}")
        data = self.transport.read_body(response, limit, f"blob {descriptor.digest}")
        _verify(descriptor, len(data), hashlib.new(_algorithm(descriptor), data))
        return data

    def download_blob(
        self,
        descriptor: Descriptor,
        target: BinaryIO,
        progress: ProgressListener,
    ) -> None:
        """Stream a blob into ``target`` (opened ``w+b``) and verify it.

        After a dropped connection the download resumes from the bytes
        already written, up to five times while each try makes progress.

        Raises:
            IntegrityError: the size or digest does not match.
            NetworkError: the connection failed and could not be resumed.
        """
        attempts = 0
        state = _Download(hashlib.new(_algorithm(descriptor)))
        while True:
            have = target.tell()
            try:
                self._stream_from(descriptor, target, state, progress)
            except NetworkError as exc:
                attempts += 1
                made_progress = target.tell() > have
                if attempts >= RESUME_ATTEMPTS or not made_progress:
                    raise
                logger.warning(
                    "resuming blob %s at byte %d after: %s",
                    descriptor.digest, target.tell(), exc,
                )  # fmt: skip
                continue
            break
        target.flush()
        _verify(descriptor, target.tell(), state.digest)

    def _stream_from(
        self,
        descriptor: Descriptor,
        target: BinaryIO,
        state: _Download,
        progress: ProgressListener,
    ) -> None:
        """Append the rest of a blob to ``target``, hashing what is written."""
        offset = target.tell()
        headers = dict(_IDENTITY)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = self._request("GET", f"blobs/{descriptor.digest}", headers)
        status = response.status_code
        if offset and status == 416:
            response.close()
            return  # every byte is already there; the caller verifies
        if offset and status == 206:
            _check_content_range(response, offset, descriptor)
        elif status == 200:
            if offset:
                logger.warning(
                    "registry ignored the range request for %s; restarting",
                    descriptor.digest,
                )
                progress.advance(descriptor.digest, -offset)
            target.seek(0)
            target.truncate()
            state.digest = hashlib.new(_algorithm(descriptor))
        else:
            raise error_from_response(response, f"blob {descriptor.digest}")
        written = target.tell()
        for chunk in self.transport.iter_body(response):
            written += len(chunk)
            if written > descriptor.size:
                response.close()
                raise IntegrityError(
                    f"size mismatch for blob {descriptor.digest}: expected "
                    f"{descriptor.size} bytes, the registry sent more"
                )
            target.write(chunk)
            state.digest.update(chunk)
            progress.advance(descriptor.digest, len(chunk))
        if written < descriptor.size:
            raise NetworkError(
                f"blob {descriptor.digest} ended after {written} of "
                f"{descriptor.size} bytes"
            )

    def _request(
        self, method: str, path: str, headers: dict[str, str]
    ) -> requests.Response:
        if not self._pinged:
            self.ping()
        base = self.transport.base_url(self.host)
        url = f"{base}/v2/{self.reference.path}/{path}"
        scopes = self.scopes
        for attempt in range(2):
            sent = dict(headers)
            value = self.auth.authorization(self.host, scopes)
            if value:
                sent["Authorization"] = value
            response = self.transport.send(method, url, headers=sent)
            if response.status_code not in (401, 403) or attempt == 1:
                return response
            retry_scopes = self.auth.handle_unauthorized(
                self.host, response, scopes, value
            )
            if retry_scopes is None:
                return response
            logger.debug("retrying %s %s with a fresh token", method, path)
            response.close()
            # Keep a widened scope so later requests reuse the same token.
            scopes = self.scopes = retry_scopes
        raise AssertionError("unreachable")  # pragma: no cover


_IDENTITY = {"Accept-Encoding": "identity"}


class _Download:
    """The running digest of the bytes of a blob written so far."""

    def __init__(self, digest: hashlib._Hash) -> None:
        self.digest = digest


def _algorithm(descriptor: Descriptor) -> str:
    return descriptor.digest.partition(":")[0]


def _verify(descriptor: Descriptor, size: int, digest: hashlib._Hash) -> None:
    if size != descriptor.size:
        raise IntegrityError(
            f"size mismatch for blob {descriptor.digest}: expected "
            f"{descriptor.size} bytes, got {size}"
        )
    actual = f"{_algorithm(descriptor)}:{digest.hexdigest()}"
    if actual != descriptor.digest:
        raise IntegrityError(
            f"digest mismatch for blob {descriptor.digest}: got {actual}"
        )


def _check_content_range(
    response: requests.Response, offset: int, descriptor: Descriptor
) -> None:
    value = response.headers.get("Content-Range", "")
    unit, _, spec = value.partition(" ")
    first = spec.partition("-")[0]
    if unit != "bytes" or not first.isdigit() or int(first) != offset:
        response.close()
        raise RegistryResponseError(
            f"blob {descriptor.digest}: invalid Content-Range {value!r} for "
            f"a resume from byte {offset}",
            status=206,
        )
