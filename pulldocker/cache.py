"""The local image cache: a docker-archive laid out as a directory.

Layout, with every path in ``manifest.json`` relative to the cache root::

    manifest.json        [{"Config": "blobs/sha256/<hex>",
                           "RepoTags": ["busybox:latest", ...],
                           "Layers": ["blobs/sha256/<hex>", ...]}, ...]
    blobs/sha256/<hex>   configs, manifests and layers, content-addressed
    lock                 flock(2) target guarding manifest.json updates

Images share layers because blobs are named by digest. Layers are stored
uncompressed and named by their diff_id, as ``docker save`` does, because
the flattener then copies member data straight out of the file. The
compressed form is kept only with ``layer_storage="compressed"``. Every write
goes to a temporary file in the same directory, is verified, and then
renamed into place, so a blob that fails its digest never enters the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from .errors import IntegrityError, InvalidInputError
from .layers import DEFAULT_MAX_EXPANDED, decompress_to_file, detect_compression
from .manifest import compute_digest, validate_digest

__all__ = ["ImageCache", "LayerStorage"]

logger = logging.getLogger(__name__)

LayerStorage = Literal["uncompressed", "compressed"]
CHUNK_SIZE = 1 << 20
MANIFEST_NAME = "manifest.json"
BLOB_DIR = "blobs/sha256"


class ImageCache:
    """A content-addressed blob store with a docker-archive ``manifest.json``."""

    def __init__(
        self,
        root: Path,
        *,
        layer_storage: LayerStorage = "uncompressed",
        max_expanded: int = DEFAULT_MAX_EXPANDED,
    ):
        self.root = root
        self.blob_dir = root / BLOB_DIR
        self.layer_storage = layer_storage
        self.max_expanded = max_expanded
        self._temp_files: set[Path] = set()
        self._temp_lock = threading.Lock()

    def ensure(self) -> None:
        """Create the cache directories if they are missing."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        """Return the path of a sha256 blob, checking the digest first.

        Raises:
            InvalidInputError: the digest is malformed or not sha256.
        """
        validate_digest(digest, "cache")
        algorithm, _, encoded = digest.partition(":")
        if algorithm != "sha256":
            raise InvalidInputError(
                f"cannot cache blob {digest}: only sha256 digests are stored"
            )
        return self.blob_dir / encoded

    def relative(self, path: Path) -> str:
        """Return ``path`` relative to the cache root, as manifest.json has it."""
        return path.relative_to(self.root).as_posix()

    def has_blob(self, digest: str) -> bool:
        """Tell whether a blob is present."""
        return self.blob_path(digest).is_file()

    def read_small_blob(self, digest: str, limit: int) -> bytes | None:
        """Return a cached manifest or config, verified, or None if absent."""
        path = self.blob_path(digest)
        try:
            with path.open("rb") as file:
                data = file.read(limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit or compute_digest(data) != digest:
            logger.warning("removing corrupt cached blob %s", digest)
            path.unlink(missing_ok=True)
            return None
        return data

    def put_bytes(self, digest: str, data: bytes) -> Path:
        """Store a small verified blob atomically and return its path.

        Raises:
            IntegrityError: the bytes do not match ``digest``.
        """
        actual = compute_digest(data, digest.partition(":")[0])
        if actual != digest:
            raise IntegrityError(f"digest mismatch for blob {digest}: got {actual}")
        path = self.blob_path(digest)
        with self.temp_file() as (file, temp):
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            os.replace(temp, path)
        return path

    @contextlib.contextmanager
    def temp_file(self) -> Iterator[tuple[BinaryIO, Path]]:
        """Open a temporary file beside the blobs; it is removed on exit.

        Rename it into place with ``os.replace`` inside the block to keep it.
        """
        self.ensure()
        fd, name = tempfile.mkstemp(dir=self.blob_dir, prefix=".tmp-")
        path = Path(name)
        with self._temp_lock:
            self._temp_files.add(path)
        try:
            with os.fdopen(fd, "w+b") as file:
                yield file, path
        finally:
            path.unlink(missing_ok=True)
            with self._temp_lock:
                self._temp_files.discard(path)

    def remove_temp_files(self) -> None:
        """Delete the temporary files still open in other threads."""
        with self._temp_lock:
            paths = list(self._temp_files)
        for path in paths:
            path.unlink(missing_ok=True)

    def layer_path(self, digest: str, diff_id: str) -> Path | None:
        """Return the cached file of a layer in either form, if present."""
        for candidate in (diff_id, digest):
            path = self.blob_path(candidate)
            if path.is_file():
                return path
        return None

    def store_layer(self, downloaded: BinaryIO, digest: str, diff_id: str) -> Path:
        """Move a verified downloaded layer into the cache and return its path.

        With uncompressed storage the layer is decompressed and its diff_id
        checked before it is renamed to ``blobs/sha256/<diff_id hex>``.

        Raises:
            IntegrityError: the uncompressed layer does not match ``diff_id``.
        """
        downloaded.seek(0)
        compression = detect_compression(downloaded.read(8))
        downloaded.seek(0)
        if self.layer_storage == "compressed" or compression == "none":
            if compression == "none" and digest != diff_id:
                raise IntegrityError(
                    f"diff_id mismatch for layer {digest}: the layer is not "
                    f"compressed, so its diff_id must equal it, got {diff_id}"
                )
            return self._link_download(downloaded, digest)
        target = self.blob_path(diff_id)
        size = os.fstat(downloaded.fileno()).st_size
        with self.temp_file() as (file, temp):
            # The shared decoder caps the expanded size and reports corrupt
            # or truncated data (a cut-off zstd frame included) as invalid.
            actual = decompress_to_file(
                downloaded.fileno(),
                0,
                size,
                compression,
                file.fileno(),
                label=f"layer {digest}",
                algorithms=(None, "sha256"),
                max_expanded=self.max_expanded,
            ).uncompressed
            if actual != diff_id:
                raise IntegrityError(
                    f"diff_id mismatch for layer {digest}: expected {diff_id}, "
                    f"got {actual}"
                )
            file.flush()
            os.fsync(file.fileno())
            os.replace(temp, target)
        return target

    def _link_download(self, downloaded: BinaryIO, digest: str) -> Path:
        name = getattr(downloaded, "name", None)
        target = self.blob_path(digest)
        if isinstance(name, str) and Path(name).parent == self.blob_dir:
            downloaded.flush()
            os.fsync(downloaded.fileno())
            os.replace(name, target)
            return target
        with self.temp_file() as (file, temp):
            while chunk := downloaded.read(CHUNK_SIZE):
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
            os.replace(temp, target)
        return target

    def read_manifest_json(self) -> list[dict[str, Any]]:
        """Return the entries of ``manifest.json``, or [] when there is none."""
        try:
            data = json.loads((self.root / MANIFEST_NAME).read_bytes())
        except FileNotFoundError:
            return []
        except (ValueError, RecursionError) as exc:
            raise InvalidInputError(
                f"cache index {self.root / MANIFEST_NAME} is not valid JSON; "
                "delete it to rebuild the cache index"
            ) from exc
        if not isinstance(data, list):
            raise InvalidInputError(
                f"cache index {self.root / MANIFEST_NAME} is not a JSON array; "
                "delete it to rebuild the cache index"
            )
        return [entry for entry in data if isinstance(entry, dict)]

    def find_entry(self, repo_tag: str) -> dict[str, Any] | None:
        """Return the entry carrying ``repo_tag`` if all its files exist."""
        for entry in self.read_manifest_json():
            if repo_tag in (entry.get("RepoTags") or []):
                return entry if self._is_complete(entry) else None
        return None

    def record(
        self,
        config: Path,
        layers: list[Path],
        *,
        tags: list[str],
        moving_tags: list[str],
    ) -> None:
        """Add or update the entry for an image in ``manifest.json``.

        ``moving_tags`` such as ``busybox:latest`` are removed from every
        other entry first, as Docker moves a tag to the image pulled last.
        The update holds an exclusive flock, so concurrent pulls do not lose
        each other's entries.
        """
        expected = {
            "Config": self.relative(config),
            "Layers": [self.relative(path) for path in layers],
        }
        new_tags = list(dict.fromkeys(tags + moving_tags))
        with self._locked():
            entries = self.read_manifest_json()
            target: dict[str, Any] | None = None
            for entry in entries:
                same = (
                    entry.get("Config") == expected["Config"]
                    and entry.get("Layers") == expected["Layers"]
                )
                if same and target is None:
                    target = entry
                    continue
                old = entry.get("RepoTags") or []
                entry["RepoTags"] = [tag for tag in old if tag not in moving_tags]
            if target is None:
                target = {"Config": expected["Config"], "RepoTags": [], **expected}
                entries.append(target)
            old_tags = target.get("RepoTags") or []
            target["RepoTags"] = list(dict.fromkeys(old_tags + new_tags))
            self._write_manifest_json(entries)

    def _is_complete(self, entry: dict[str, Any]) -> bool:
        paths = [entry.get("Config")] + list(entry.get("Layers") or [])
        return all(
            isinstance(path, str) and (self.root / path).is_file() for path in paths
        )

    def _write_manifest_json(self, entries: list[dict[str, Any]]) -> None:
        data = json.dumps(entries, indent=1).encode()
        fd, name = tempfile.mkstemp(dir=self.root, prefix=".manifest-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(name, self.root / MANIFEST_NAME)
        finally:
            Path(name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.ensure()
        with (self.root / "lock").open("a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
