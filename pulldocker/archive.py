"""Find an image's config and layers in a saved archive or layout.

The readers cover ``docker save`` archives (the classic ``<id>/layer.tar``
layout and the Docker 25+ OCI-layout hybrid), skopeo ``docker-archive:``
output, and OCI image layouts and archives with nested indexes. Each may be a
tar, a compressed tar (gzip, zstd, xz, bzip2), a directory, or ``-`` for a tar
on stdin. Where ``manifest.json`` exists, it and the config's
``rootfs.diff_ids`` decide the image and the layer order. Otherwise
``index.json`` does.

Paths named by a manifest are confined to the archive: ``..`` is rejected and
symlinked members are followed at most 8 times, inside the archive only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnsafePathError,
    UnsupportedError,
    UsageError,
)
from .layers import (
    DEFAULT_MAX_EXPANDED,
    DigestCheck,
    decompress_to_file,
    detect_compression,
    parse_digest,
)
from .platform import INDEX_TYPES, Platform, host_platform, select_manifests
from .tarscan import DIRECTORY, HARDLINK, REGULAR_TYPES, SYMLINK, iter_entries

__all__ = ["Archive", "ImageLayers", "LayerBlob", "open_archive"]

logger = logging.getLogger(__name__)

_MAX_JSON = 16 * 1024 * 1024
_MAX_LINK_HOPS = 8
_MAX_INDEX_DEPTH = 8
# Docker also accepts the legacy values below as image configs.
_IMAGE_CONFIG_TYPES = frozenset(
    {
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
        "application/octet-stream",
        "application/json",
        "text/html",
        "",
        None,
    }
)
_NON_LAYER_HINTS = ("in-toto", "json", "+encrypted", "helm", "wasm")


@dataclass
class LayerBlob:
    """The location of one layer's stored bytes and the digests they must have."""

    fd: int
    offset: int
    size: int
    check: DigestCheck
    media_type: str | None = None


@dataclass
class ImageLayers:
    """An image chosen from an archive: its config and layers, base first."""

    name: str
    config: dict[str, Any]
    layers: list[LayerBlob] = field(default_factory=list)


class Archive:
    """An opened image archive or layout; close it to release files."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tmpdir: str | None = None  # where temp_dir() is made; None: $TMPDIR
        self._fds: list[int] = []
        self._tempdir: str | None = None

    # Subclasses provide these two.
    def _member(self, path: str) -> tuple[int, int, int] | None:
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def member(self, path: str, what: str) -> tuple[int, int, int]:
        """Return ``(fd, offset, size)`` of the file at ``path``.

        Raises:
            UnsafePathError: the path leaves the archive.
            InvalidInputError: nothing is stored there.
        """
        cleaned = _clean_member_path(path, self.label, what)
        found = self._member(cleaned)
        if found is None:
            raise InvalidInputError(
                f"{self.label}: {what} {path!r} is missing from the archive"
            )
        return found

    def has(self, path: str) -> bool:
        return self._member(path) is not None

    def read_json(self, path: str, what: str) -> Any:
        fd, offset, size = self.member(path, what)
        if size > _MAX_JSON:
            raise InvalidInputError(f"{self.label}: {what} {path!r} is too large")
        data = os.pread(fd, size, offset)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidInputError(
                f"{self.label}: {what} {path!r} is not valid JSON ({exc})"
            ) from None

    def temp_dir(self) -> str:
        if self._tempdir is None:
            self._tempdir = tempfile.mkdtemp(prefix="pulldocker-", dir=self.tmpdir)
        return self._tempdir

    def keep_fd(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- choosing the image -------------------------------------------------

    def select_image(
        self, selector: str | None, platform: Platform | None
    ) -> ImageLayers:
        """Choose one image by tag, reference or index, and list its layers.

        Raises:
            NotFoundError: no image matches ``selector``.
            UsageError: several images exist and none was chosen.
            InvalidInputError: the archive is not an image or is malformed.
        """
        if self.has("manifest.json"):
            return self._from_docker_manifest(selector, platform)
        if self.has("index.json"):
            return self._from_oci_index(selector, platform)
        if self.has("repositories"):
            return self._from_legacy_repositories(selector)
        raise InvalidInputError(
            f"{self.label}: not an image archive: it has neither manifest.json "
            "nor index.json"
        )

    def _from_docker_manifest(
        self, selector: str | None, platform: Platform | None
    ) -> ImageLayers:
        manifest = self.read_json("manifest.json", "manifest")
        if not isinstance(manifest, list) or not all(
            isinstance(item, dict) for item in manifest
        ):
            raise InvalidInputError(
                f"{self.label}: manifest.json must be a JSON array of objects"
            )
        if not manifest:
            raise NotFoundError(f"{self.label}: manifest.json lists no images")
        entry, name = _choose_entry(manifest, selector, self.label)
        config_path = entry.get("Config")
        layer_paths = entry.get("Layers")
        if not isinstance(config_path, str) or not isinstance(layer_paths, list):
            raise InvalidInputError(
                f"{self.label}: manifest.json entry {name} needs Config and Layers"
            )
        config = self.read_json(config_path, "config")
        diff_ids = _diff_ids(config, len(layer_paths), f"{self.label}: {name}")
        _warn_platform(config, platform, name)
        image = ImageLayers(name, config)
        count = len(layer_paths)
        for i, (path, diff_id) in enumerate(zip(layer_paths, diff_ids, strict=True)):
            if not isinstance(path, str):
                raise InvalidInputError(f"{self.label}: layer path {path!r} is invalid")
            label = f"layer {i + 1}/{count} ({path})"
            fd, offset, size = self.member(path, "layer")
            check = DigestCheck(label, None, diff_id, None)
            image.layers.append(LayerBlob(fd, offset, size, check))
        return image

    def _from_legacy_repositories(self, selector: str | None) -> ImageLayers:
        """Read a pre-1.10 ``docker save``: layers chained by ``parent`` ids.

        These archives record no diff_ids, so layer content cannot be
        verified; Docker loaded them the same way until version 29.
        """
        repositories = self.read_json("repositories", "repositories file")
        tops: list[tuple[str, str]] = []
        if isinstance(repositories, dict):
            for repository, tags in repositories.items():
                if isinstance(tags, dict):
                    for tag, top_id in tags.items():
                        tops.append((f"{repository}:{tag}", str(top_id)))
        if not tops:
            raise InvalidInputError(
                f"{self.label}: the repositories file lists no image"
            )
        manifest = [{"RepoTags": [name], "Top": top} for name, top in tops]
        entry, name = _choose_entry(manifest, selector, self.label)
        chain: list[str] = []
        layer_id: str | None = entry["Top"]
        config: dict[str, Any] | None = None
        while layer_id:
            if layer_id in chain or len(chain) > 1000:
                raise InvalidInputError(
                    f"{self.label}: the parent chain of {name} loops"
                )
            if not re.fullmatch(r"[a-f0-9]{64}", layer_id):
                raise InvalidInputError(f"{self.label}: invalid layer id {layer_id!r}")
            chain.append(layer_id)
            layer_json = self.read_json(f"{layer_id}/json", "layer json")
            if not isinstance(layer_json, dict):
                raise InvalidInputError(
                    f"{self.label}: {layer_id}/json is not an object"
                )
            if config is None:
                config = layer_json
            parent = layer_json.get("parent")
            layer_id = parent if isinstance(parent, str) else None
        logger.info("%s: pre-1.10 archive; its layers cannot be verified", self.label)
        image = ImageLayers(name, config or {})
        chain.reverse()
        for i, chained_id in enumerate(chain):
            label = f"layer {i + 1}/{len(chain)} ({chained_id[:12]})"
            fd, offset, size = self.member(f"{chained_id}/layer.tar", "layer")
            check = DigestCheck(label, None, None, None)
            image.layers.append(LayerBlob(fd, offset, size, check))
        return image

    def _from_oci_index(
        self, selector: str | None, platform: Platform | None
    ) -> ImageLayers:
        index = self.read_json("index.json", "index")
        descriptors = _descriptor_list(index, f"{self.label}: index.json")
        descriptor = _choose_descriptor(descriptors, selector, platform, self.label)
        name = _descriptor_name(descriptor)
        requested = platform or host_platform()
        for _ in range(_MAX_INDEX_DEPTH):
            document = self._read_blob_json(descriptor, "manifest")
            is_index = (
                _text(descriptor.get("mediaType")) in INDEX_TYPES
                or _text(document.get("mediaType")) in INDEX_TYPES
                or ("manifests" in document and "layers" not in document)
            )
            if not is_index:
                image = self._image_from_manifest(document, name)
                _warn_platform(image.config, platform, name)
                return image
            children = _descriptor_list(document, f"{self.label}: index {name}")
            descriptor = dict(
                select_manifests(children, requested, f"{self.label} ({name})")
            )
        raise InvalidInputError(f"{self.label}: indexes nested too deeply")

    def _image_from_manifest(self, manifest: Any, name: str) -> ImageLayers:
        if manifest.get("schemaVersion") == 1:
            raise UnsupportedError(f"{self.label}: schema1 manifests are not supported")
        config_descriptor = manifest.get("config")
        layers = manifest.get("layers")
        if not isinstance(config_descriptor, dict) or not isinstance(layers, list):
            raise InvalidInputError(
                f"{self.label}: manifest of {name} needs config and layers"
            )
        config_type = _text(config_descriptor.get("mediaType"))
        if config_type not in _IMAGE_CONFIG_TYPES:
            raise UnsupportedError(
                f"{self.label}: {name} is not a container image (its config has "
                f"media type {config_type!r}); choose an image with --image"
            )
        config = self._read_blob_json(config_descriptor, "config")
        diff_ids = _diff_ids(config, len(layers), f"{self.label}: {name}")
        image = ImageLayers(name, config)
        for i, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
            if not isinstance(layer, dict):
                raise InvalidInputError(
                    f"{self.label}: layer descriptor {i} is invalid"
                )
            media_type = _text(layer.get("mediaType"))
            digest = layer.get("digest")
            algorithm, encoded = parse_digest(digest, f"{self.label}: layer {i + 1}")
            if any(hint in media_type for hint in _NON_LAYER_HINTS):
                raise UnsupportedError(
                    f"{self.label}: layer {digest} has media type {media_type!r}, "
                    "which is not a filesystem layer"
                )
            label = f"layer {i + 1}/{len(layers)} ({digest})"
            fd, offset, size = self.member(f"blobs/{algorithm}/{encoded}", "layer blob")
            expected_size = layer.get("size")
            check = DigestCheck(
                label,
                str(digest),
                diff_id,
                expected_size if isinstance(expected_size, int) else None,
            )
            image.layers.append(LayerBlob(fd, offset, size, check, media_type))
        return image

    def _read_blob_json(self, descriptor: Mapping[str, Any], what: str) -> Any:
        digest = descriptor.get("digest")
        algorithm, encoded = parse_digest(digest, f"{self.label}: {what}")
        path = f"blobs/{algorithm}/{encoded}"
        fd, offset, size = self.member(path, what)
        if size > _MAX_JSON:
            raise InvalidInputError(f"{self.label}: {what} {digest} is too large")
        data = os.pread(fd, size, offset)
        actual = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if actual != digest:
            raise IntegrityError(
                f"{self.label}: {what} blob {digest} hashes to {actual}"
            )
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidInputError(
                f"{self.label}: {what} {digest} is not valid JSON ({exc})"
            ) from None
        if not isinstance(document, dict):
            raise InvalidInputError(
                f"{self.label}: {what} {digest} is not a JSON object"
            )
        return document


class DirectoryArchive(Archive):
    """An archive unpacked into a directory (an OCI layout or the cache)."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.root = root.resolve()

    def _member(self, path: str) -> tuple[int, int, int] | None:
        full = (self.root / path).resolve()
        if full != self.root and self.root not in full.parents:
            raise UnsafePathError(
                f"{self.label}: {path!r} resolves outside the directory"
            )
        try:
            fd = os.open(full, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        self.keep_fd(fd)
        return fd, 0, info.st_size

    def names(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()
        )


class TarArchive(Archive):
    """An archive in a tar file: members are read in place, never extracted."""

    def __init__(self, fd: int, size: int, label: str) -> None:
        super().__init__(label)
        self.fd = self.keep_fd(fd)
        self.members: dict[str, tuple[bytes, int, int, bytes]] = {}
        for entry in iter_entries(fd, 0, size, label=label):
            try:
                name = _clean_member_path(os.fsdecode(entry.name), label, "member")
            except UnsafePathError:
                continue  # never reachable from a manifest path either
            if entry.type in REGULAR_TYPES or entry.type in (SYMLINK, HARDLINK):
                self.members[name] = (
                    entry.type,
                    entry.offset,
                    entry.size,
                    entry.linkname,
                )
            elif entry.type == DIRECTORY:
                self.members.pop(name, None)

    def _member(self, path: str) -> tuple[int, int, int] | None:
        for _ in range(_MAX_LINK_HOPS):
            found = self.members.get(path)
            if found is None:
                return None
            kind, offset, size, linkname = found
            if kind in REGULAR_TYPES:
                return self.fd, offset, size
            target = os.fsdecode(linkname)
            if kind == SYMLINK:
                target = posixpath.join(posixpath.dirname(path), target)
            path = _clean_member_path(target, self.label, "link target")
        raise InvalidInputError(f"{self.label}: too many links resolving {path!r}")

    def names(self) -> list[str]:
        return sorted(self.members)


def open_archive(
    source: str,
    *,
    tmpdir: str | None = None,
    max_expanded: int = DEFAULT_MAX_EXPANDED,
) -> Archive:
    """Open a path (tar, compressed tar or directory) or ``-`` for stdin.

    Raises:
        NotFoundError: the path does not exist.
        InvalidInputError: the file is not a tar archive.
    """
    archive = _open_source(source, tmpdir, max_expanded)
    archive.tmpdir = tmpdir
    return archive


def _open_source(source: str, tmpdir: str | None, max_expanded: int) -> Archive:
    if source == "-":
        fd = _spool_pipe(sys.stdin.fileno(), tmpdir)
        return _open_tar(fd, "<stdin>", tmpdir, max_expanded)
    path = Path(source)
    if path.is_dir():
        return DirectoryArchive(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NotFoundError(f"{source}: no such file or directory") from None
    except OSError as exc:
        raise InvalidInputError(f"{source}: cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        try:
            pipe = fd
            fd = _spool_pipe(pipe, tmpdir)
        finally:
            os.close(pipe)
    return _open_tar(fd, source, tmpdir, max_expanded)


def _spool_pipe(fd: int, tmpdir: str | None) -> int:
    """Copy a pipe to an unlinked temp file, which allows random access."""
    spool_fd, spool_path = tempfile.mkstemp(prefix="pulldocker-stdin-", dir=tmpdir)
    os.unlink(spool_path)
    while True:
        data = os.read(fd, 1024 * 1024)
        if not data:
            return spool_fd
        view = memoryview(data)
        while view:
            view = view[os.write(spool_fd, view) :]


def _open_tar(fd: int, label: str, tmpdir: str | None, max_expanded: int) -> Archive:
    """Open the tar in ``fd``, first decompressing it if it is compressed.

    ``fd`` belongs to the returned archive, or is closed on failure.
    """
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise InvalidInputError(f"{label}: empty input")
        compression = detect_compression(os.pread(fd, 8, 0))
        if compression != "none":
            spool_fd, spool_path = tempfile.mkstemp(
                prefix="pulldocker-archive-", dir=tmpdir
            )
            os.unlink(spool_path)
            try:
                decompress_to_file(
                    fd,
                    0,
                    size,
                    compression,
                    spool_fd,
                    label=label,
                    max_expanded=max_expanded,
                )
            except BaseException:
                os.close(spool_fd)
                raise
            os.close(fd)
            fd, size = spool_fd, os.fstat(spool_fd).st_size
        return TarArchive(fd, size, label)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def _clean_member_path(path: str, label: str, what: str) -> str:
    stripped = path.lstrip("/")
    cleaned = posixpath.normpath(stripped) if stripped else "."
    if cleaned == ".." or cleaned.startswith("../"):
        raise UnsafePathError(f"{label}: {what} path {path!r} leaves the archive")
    return cleaned


def _diff_ids(config: Any, layer_count: int, label: str) -> list[str]:
    if not isinstance(config, dict):
        raise InvalidInputError(f"{label}: the image config is not a JSON object")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidInputError(f"{label}: config has no rootfs of type 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise InvalidInputError(f"{label}: config rootfs.diff_ids is not a list")
    for diff_id in diff_ids:
        parse_digest(diff_id, f"{label}: diff_id")
    if len(diff_ids) != layer_count:
        raise InvalidInputError(
            f"{label}: the manifest lists {layer_count} layers but the config "
            f"lists {len(diff_ids)} diff_ids"
        )
    return diff_ids


def _warn_platform(config: Any, platform: Platform | None, name: str) -> None:
    if platform is None:
        return
    if not config.get("os") or not config.get("architecture"):
        return  # the config names no platform, so there is nothing to compare
    offered = Platform.from_json(config)
    if not platform.accepts(offered):
        raise NotFoundError(
            f"{name} is for {offered}, not {platform}; the archive contains no "
            "other platform of it"
        )


def _familiar(reference: str) -> str:
    """Reduce a reference to Docker's short form, with ``:latest`` added."""
    name = reference
    for prefix in ("docker.io/", "index.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            if name.startswith("library/") and name.count("/") == 1:
                name = name[len("library/") :]
    if "@" not in name and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def _index_selector(selector: str) -> int | None:
    text = selector[1:] if selector.startswith("@") else selector
    return int(text) if text.isascii() and text.isdigit() else None


def _choose_entry(
    manifest: list[dict[str, Any]], selector: str | None, label: str
) -> tuple[dict[str, Any], str]:
    def tags(entry: dict[str, Any]) -> list[str]:
        value = entry.get("RepoTags")
        return (
            [t for t in value if isinstance(t, str)] if isinstance(value, list) else []
        )

    def describe(i: int, entry: dict[str, Any]) -> str:
        return f"[{i}] " + (", ".join(tags(entry)) or "<untagged>")

    if selector is None:
        if len(manifest) == 1:
            entry = manifest[0]
            return entry, (tags(entry) or ["image 0"])[0]
        listing = "; ".join(describe(i, e) for i, e in enumerate(manifest))
        raise UsageError(
            f"{label} contains {len(manifest)} images; choose one with --image TAG "
            f"or --image INDEX: {listing}"
        )
    position = _index_selector(selector)
    if position is not None:
        if position >= len(manifest):
            raise NotFoundError(
                f"{label}: no image at index {position}; it contains {len(manifest)}"
            )
        entry = manifest[position]
        return entry, (tags(entry) or [f"image {position}"])[0]
    requested = _familiar(selector)
    for entry in manifest:
        for tag in tags(entry):
            if tag == selector or _familiar(tag) == requested:
                return entry, tag
    listing = "; ".join(describe(i, e) for i, e in enumerate(manifest))
    raise NotFoundError(f"{label}: no image tagged {selector!r}; it contains {listing}")


def _descriptor_list(document: Any, label: str) -> list[dict[str, Any]]:
    if not isinstance(document, dict):
        raise InvalidInputError(f"{label} is not a JSON object")
    manifests = document.get("manifests")
    if manifests is None:
        manifests = []
    if not isinstance(manifests, list) or not all(
        isinstance(m, dict) for m in manifests
    ):
        raise InvalidInputError(f"{label}: 'manifests' must be a list of descriptors")
    return manifests


def _text(value: object) -> str:
    """Return ``value`` if it is a string, else "" (for untrusted JSON fields)."""
    return value if isinstance(value, str) else ""


def _annotations(descriptor: Mapping[str, Any]) -> Mapping[str, Any]:
    annotations = descriptor.get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def _descriptor_name(descriptor: Mapping[str, Any]) -> str:
    annotations = _annotations(descriptor)
    return str(
        annotations.get("io.containerd.image.name")
        or annotations.get("org.opencontainers.image.ref.name")
        or descriptor.get("digest")
    )


def _choose_descriptor(
    descriptors: list[dict[str, Any]],
    selector: str | None,
    platform: Platform | None,
    label: str,
) -> dict[str, Any]:
    usable = [
        d
        for d in descriptors
        if _text(d.get("mediaType")) in INDEX_TYPES
        or _text(d.get("mediaType"))
        in (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
    ]
    if not usable:
        raise NotFoundError(f"{label}: index.json lists no image")
    if selector is not None:
        requested = _familiar(selector)
        for descriptor in descriptors:
            annotations = _annotations(descriptor)
            ref_name = annotations.get("org.opencontainers.image.ref.name")
            full_name = annotations.get("io.containerd.image.name")
            candidates = [n for n in (ref_name, full_name) if isinstance(n, str)]
            named = selector in candidates or any(
                _familiar(n) == requested for n in candidates
            )
            if not named and selector != descriptor.get("digest"):
                continue
            if descriptor not in usable:
                media_type = _text(descriptor.get("mediaType"))
                raise UnsupportedError(
                    f"{label}: {selector!r} has media type {media_type!r}, "
                    "which is neither an image manifest nor an index"
                )
            return descriptor
        # A ref name wins over a position, because ref names such as "1"
        # are common in OCI layouts.
        position = _index_selector(selector)
        if position is not None:
            if position >= len(usable):
                raise NotFoundError(f"{label}: no image at index {position}")
            return usable[position]
        names = ", ".join(_descriptor_name(d) for d in usable)
        raise NotFoundError(
            f"{label}: no image named {selector!r}; it contains {names}"
        )
    if len(usable) == 1:
        return usable[0]
    if all(isinstance(d.get("platform"), dict) for d in usable):
        return dict(select_manifests(usable, platform or host_platform(), label))
    names = "; ".join(f"[{i}] {_descriptor_name(d)}" for i, d in enumerate(usable))
    raise UsageError(
        f"{label} contains {len(usable)} images; choose one with --image NAME or "
        f"--image INDEX: {names}"
    )
