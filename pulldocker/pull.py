"""Pull images into the local cache, save them as archives, inspect them.

``pull`` resolves a reference to one image manifest for the requested
platform, descending through indexes. It fetches the config and layers into
the cache and records the image in the cache's ``manifest.json`` under two
tags. The reference's own tag moves to the image pulled last, while the tag
``NAME:sha256-<manifest hex>`` names this exact image and never moves.
A second pull of a cached image downloads no blobs. A reference pinned by
digest whose image is complete in the cache needs no network at all.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .auth import Authenticator
from .cache import ImageCache
from .credentials import find_credentials
from .errors import InvalidInputError, PlatformNotFoundError, UsageError
from .layers import DEFAULT_MAX_EXPANDED, detect_compression
from .manifest import (
    OCI_INDEX,
    OCI_LAYER_TAR,
    Descriptor,
    Manifest,
    compute_digest,
    parse_manifest,
)
from .platform import Platform, select_manifests
from .progress import ProgressListener
from .reference import Reference, parse_reference
from .registry import RegistryClient
from .transport import Transport

__all__ = [
    "CachedImage",
    "PullOptions",
    "default_cache_dir",
    "inspect",
    "pull",
    "save",
]

logger = logging.getLogger(__name__)

CONFIG_LIMIT = 16 << 20
MANIFEST_LIMIT = 4 << 20
MAX_INDEX_DEPTH = 4
_CONFIG_KEYS = (
    "Entrypoint",
    "Cmd",
    "Env",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Labels",
)
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_LAYER_TYPES = {
    "none": OCI_LAYER_TAR,
    "gzip": OCI_LAYER_TAR + "+gzip",
    "zstd": OCI_LAYER_TAR + "+zstd",
}


@dataclass(frozen=True)
class PullOptions:
    """Options of a pull: platform, cache directory and registry access."""

    platform: Platform
    cache_dir: Path
    username: str | None = None
    password: str | None = None
    authfile: Path | None = None
    cert_dir: Path | None = None
    insecure: bool = False
    jobs: int = 4
    max_layer_size: int = DEFAULT_MAX_EXPANDED


@dataclass(frozen=True)
class CachedImage:
    """An image in the cache, selectable by ``image`` among its RepoTags."""

    archive_dir: Path
    image: str


@dataclass(frozen=True)
class _Resolved:
    manifest: Manifest
    top: Manifest
    config: bytes
    diff_ids: list[str]


class _CacheMiss(Exception):
    """A blob needed to resolve an image offline is not in the cache."""


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/pulldocker``, default ``~/.cache/pulldocker``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pulldocker"


def pull(
    reference: str, options: PullOptions, progress: ProgressListener
) -> CachedImage:
    """Pull an image into the cache and return where to find it.

    Raises:
        PulldockerError: the reference is invalid, the registry failed, the
            platform is missing or the content does not verify.
    """
    ref = parse_reference(reference)
    _check_options(options)
    cache = ImageCache(options.cache_dir, max_expanded=options.max_layer_size)
    if ref.digest:
        with contextlib.suppress(_CacheMiss):
            cached = _pull_offline(cache, ref, options.platform, progress)
            logger.info("using cached %s with no network access", ref)
            return cached
    with _open_client(ref, options) as client:
        resolved = _resolve(_network_source(client, cache), ref, options.platform)
        layers = _fetch_layers(client, cache, resolved, options.jobs, progress)
    return _record(cache, ref, resolved, layers)


def save(
    reference: str, output: str, options: PullOptions, progress: ProgressListener
) -> None:
    """Pull an image and write it as a docker-archive tar to ``output``.

    The tar contains ``manifest.json`` with RepoTags, the config and the layers
    under ``blobs/sha256/``, and an OCI layout (``oci-layout``,
    ``index.json``) describing the same blobs. ``-`` writes to stdout;
    a file is written under a temporary name and renamed when complete.

    Raises:
        PulldockerError: as ``pull``; UsageError when the output directory
            does not exist.
    """
    ref = parse_reference(reference)
    cached = pull(reference, options, progress)
    cache = ImageCache(cached.archive_dir)
    entry = cache.find_entry(cached.image)
    if entry is None:
        raise InvalidInputError(
            f"cache entry {cached.image!r} vanished from {cache.root}; pull again"
        )
    repo_tags = [f"{ref.familiar_name}:{ref.tag}"] if ref.tag else []
    with _open_output(output) as stream:
        _write_archive(stream, cache, entry, ref, repo_tags)
    logger.info("wrote %s to %s", ref, output)


def inspect(reference: str, options: PullOptions) -> dict[str, Any]:
    """Describe an image without downloading its layers.

    The result is JSON-serialisable and never contains credentials.
    """
    ref = parse_reference(reference)
    _check_options(options)
    cache = ImageCache(options.cache_dir, max_expanded=options.max_layer_size)
    with _open_client(ref, options) as client:
        resolved = _resolve(
            _network_source(client, cache, store=False), ref, options.platform
        )
    config = json.loads(resolved.config)
    manifest = resolved.manifest
    result: dict[str, Any] = {
        "reference": str(ref),
        "digest": manifest.digest,
        "mediaType": manifest.media_type,
        "platform": str(Platform.from_json(config)),
        "layers": [
            {"digest": d.digest, "size": d.size, "mediaType": d.media_type}
            for d in manifest.layers
        ],
        "config": _config_subset(config),
    }
    if resolved.top.digest != manifest.digest:
        result["indexDigest"] = resolved.top.digest
    return result


def _check_options(options: PullOptions) -> None:
    if options.jobs < 1:
        raise UsageError(f"invalid --jobs {options.jobs}: use 1 or more")


@contextlib.contextmanager
def _open_client(ref: Reference, options: PullOptions) -> Iterator[RegistryClient]:
    credentials = find_credentials(
        ref.domain,
        username=options.username,
        password=options.password,
        authfile=options.authfile,
    )
    insecure = frozenset({ref.api_host}) if options.insecure else frozenset()
    with Transport(cert_dir=options.cert_dir, insecure_hosts=insecure) as transport:
        yield RegistryClient(ref, transport, Authenticator(transport, credentials))


ManifestSource = Callable[[str, str], Manifest]
ConfigSource = Callable[[Descriptor], bytes]
_Item = tuple[Descriptor, str]


@dataclass(frozen=True)
class _Source:
    manifest: ManifestSource
    config: ConfigSource


def _network_source(
    client: RegistryClient, cache: ImageCache, *, store: bool = True
) -> _Source:
    def manifest(identifier: str, context: str) -> Manifest:
        if ":" not in identifier:
            digest = client.head_manifest(identifier)
            if digest is None:
                fetched = client.fetch_manifest(identifier)
                if store:
                    cache.put_bytes(fetched.digest, fetched.raw)
                return fetched
            identifier = digest
        cached = _cached_manifest(cache, identifier, context)
        if cached is not None:
            return cached
        fetched = client.fetch_manifest(identifier)
        if store:
            cache.put_bytes(fetched.digest, fetched.raw)
        return fetched

    def config(descriptor: Descriptor) -> bytes:
        data = _cached_blob(cache, descriptor.digest, CONFIG_LIMIT)
        if data is None:
            data = client.fetch_blob_bytes(descriptor, CONFIG_LIMIT)
            if store:
                cache.put_bytes(descriptor.digest, data)
        return data

    return _Source(manifest, config)


def _offline_source(cache: ImageCache) -> _Source:
    def manifest(identifier: str, context: str) -> Manifest:
        found = _cached_manifest(cache, identifier, context)
        if found is None:
            raise _CacheMiss(identifier)
        return found

    def config(descriptor: Descriptor) -> bytes:
        data = _cached_blob(cache, descriptor.digest, CONFIG_LIMIT)
        if data is None:
            raise _CacheMiss(descriptor.digest)
        return data

    return _Source(manifest, config)


def _cached_blob(cache: ImageCache, digest: str, limit: int) -> bytes | None:
    if not digest.startswith("sha256:"):
        return None
    return cache.read_small_blob(digest, limit)


def _cached_manifest(cache: ImageCache, digest: str, context: str) -> Manifest | None:
    raw = _cached_blob(cache, digest, MANIFEST_LIMIT)
    if raw is None:
        return None
    return parse_manifest(raw, "", expected_digest=digest, context=context)


def _resolve(source: _Source, ref: Reference, platform: Platform) -> _Resolved:
    context = str(ref)
    top = source.manifest(ref.identifier, context)
    manifest = top
    for _ in range(MAX_INDEX_DEPTH):
        if not manifest.is_index:
            break
        entries = manifest.data.get("manifests")
        if not isinstance(entries, list) or not all(
            isinstance(entry, dict) for entry in entries
        ):
            raise InvalidInputError(
                f"index of {context} has no 'manifests' list of objects"
            )
        chosen = select_manifests(entries, platform, repr(context))
        digest = str(chosen.get("digest"))
        manifest = source.manifest(digest, f"{ref.name}@{digest}")
    else:
        raise InvalidInputError(
            f"{context}: indexes are nested more than {MAX_INDEX_DEPTH} deep"
        )
    logger.info("resolved %s to %s", context, manifest.digest)
    config = source.config(manifest.config)
    diff_ids = _check_config(config, manifest, platform, context)
    return _Resolved(manifest, top, config, diff_ids)


def _check_config(
    raw: bytes, manifest: Manifest, platform: Platform, context: str
) -> list[str]:
    try:
        config = json.loads(raw)
        rootfs = config["rootfs"]
        diff_ids = [str(item) for item in rootfs["diff_ids"]]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidInputError(
            f"config of {context} has no valid rootfs.diff_ids"
        ) from exc
    if not isinstance(config, dict) or not isinstance(rootfs, dict):
        raise InvalidInputError(f"config of {context} is not a JSON object")
    if rootfs.get("type") != "layers":
        raise InvalidInputError(
            f"config of {context}: rootfs.type is {rootfs.get('type')!r}, "
            "expected 'layers'"
        )
    if len(diff_ids) != len(manifest.layers):
        raise InvalidInputError(
            f"config of {context} lists {len(diff_ids)} diff_ids for "
            f"{len(manifest.layers)} layers"
        )
    offered = Platform.from_json(config)
    if offered.os and offered.architecture and not platform.accepts(offered):
        raise PlatformNotFoundError(
            f"no image for platform {str(platform)!r} in {context!r} "
            f"(available: {offered}); choose one with --platform"
        )
    return diff_ids


def _fetch_layers(
    client: RegistryClient,
    cache: ImageCache,
    resolved: _Resolved,
    jobs: int,
    progress: ProgressListener,
) -> list[Path]:
    pairs = list(zip(resolved.manifest.layers, resolved.diff_ids, strict=True))
    unique = {descriptor.digest: (descriptor, diff) for descriptor, diff in pairs}
    cache.ensure()

    def fetch(item: tuple[Descriptor, str]) -> Path:
        descriptor, diff_id = item
        return _fetch_layer(client, cache, descriptor, diff_id, progress)

    try:
        fetched = _run_parallel(fetch, list(unique.values()), jobs)
    except KeyboardInterrupt:
        # Workers stuck in a socket read cannot be stopped, and they are
        # daemon threads that die at exit, so remove their files here.
        cache.remove_temp_files()
        raise
    paths = dict(zip(unique, fetched, strict=True))
    return [paths[descriptor.digest] for descriptor, _ in pairs]


def _run_parallel(
    function: Callable[[_Item], Path], items: list[_Item], jobs: int
) -> list[Path]:
    """Call ``function`` on each item in up to ``jobs`` daemon threads.

    Daemon threads, unlike a ThreadPoolExecutor's, do not keep the process
    alive after Ctrl-C while a download waits on a stalled connection. The
    first error stops new items from starting and is raised after the
    running ones end.
    """
    results: list[Path | None] = [None] * len(items)
    errors: list[BaseException] = []
    pending = list(range(len(items)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if errors or not pending:
                    return
                index = pending.pop(0)
            try:
                results[index] = function(items[index])
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                with lock:
                    errors.append(exc)

    threads = [
        threading.Thread(target=work, name=f"pulldocker-fetch-{number}", daemon=True)
        for number in range(min(jobs, len(items)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.25)
    if errors:
        raise errors[0]
    return [result for result in results if result is not None]


def _fetch_layer(
    client: RegistryClient,
    cache: ImageCache,
    descriptor: Descriptor,
    diff_id: str,
    progress: ProgressListener,
) -> Path:
    key = descriptor.digest
    progress.start(key, _short(descriptor.digest), descriptor.size)
    found = cache.layer_path(descriptor.digest, diff_id)
    if found is not None:
        logger.info("layer %s is cached", descriptor.digest)
        progress.finish(key, "cached")
        return found
    # NOTE: descriptor "urls" of foreign layers are not tried. The blob is
    # always fetched from the registry, which fails for Windows base layers.
    with cache.temp_file() as (file, _):
        client.download_blob(descriptor, file, progress)
        path = cache.store_layer(file, descriptor.digest, diff_id)
    logger.info("fetched layer %s", descriptor.digest)
    progress.finish(key)
    return path


def _pull_offline(
    cache: ImageCache, ref: Reference, platform: Platform, progress: ProgressListener
) -> CachedImage:
    resolved = _resolve(_offline_source(cache), ref, platform)
    layers: list[Path] = []
    for descriptor, diff_id in zip(
        resolved.manifest.layers, resolved.diff_ids, strict=True
    ):
        path = cache.layer_path(descriptor.digest, diff_id)
        if path is None:
            raise _CacheMiss(descriptor.digest)
        layers.append(path)
    for descriptor in resolved.manifest.layers:
        progress.start(descriptor.digest, _short(descriptor.digest), descriptor.size)
        progress.finish(descriptor.digest, "cached")
    return _record(cache, ref, resolved, layers)


def _record(
    cache: ImageCache, ref: Reference, resolved: _Resolved, layers: list[Path]
) -> CachedImage:
    pinned = f"{ref.familiar_name}:{resolved.manifest.digest.replace(':', '-')}"
    moving = [f"{ref.familiar_name}:{ref.tag}"] if ref.tag else []
    config = cache.blob_path(resolved.manifest.config.digest)
    if not config.is_file():
        cache.put_bytes(resolved.manifest.config.digest, resolved.config)
    cache.record(config, layers, tags=[pinned], moving_tags=moving)
    return CachedImage(cache.root, pinned)


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12]


def _config_subset(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("config")
    if not isinstance(inner, dict):
        return {}
    return {key: inner[key] for key in _CONFIG_KEYS if inner.get(key) is not None}


@contextlib.contextmanager
def _open_output(output: str) -> Iterator[BinaryIO]:
    if output == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(output)
    if target.is_dir():
        raise UsageError(
            f"output {output!r} is a directory; give a file path for the archive"
        )
    if not target.parent.is_dir():
        raise UsageError(
            f"output directory {str(target.parent)!r} does not exist; create it "
            "or choose another path"
        )
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(name, 0o644)
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)


def _write_archive(
    stream: BinaryIO,
    cache: ImageCache,
    entry: dict[str, Any],
    ref: Reference,
    repo_tags: list[str],
) -> None:
    config_name = str(entry["Config"])
    layer_names = [str(name) for name in entry["Layers"]]
    manifest_json = [{"Config": config_name, "RepoTags": repo_tags}]
    manifest_json[0]["Layers"] = layer_names
    oci_manifest = _oci_manifest(cache, config_name, layer_names)
    oci_digest = compute_digest(oci_manifest)
    index = _oci_index(ref, oci_digest, len(oci_manifest))
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_dir(tar, "blobs")
        _add_dir(tar, "blobs/sha256")
        for name in dict.fromkeys([config_name, *layer_names]):
            _add_file(tar, name, cache.root / name)
        _add_bytes(tar, f"blobs/sha256/{oci_digest.partition(':')[2]}", oci_manifest)
        _add_bytes(tar, "index.json", index)
        _add_bytes(tar, "manifest.json", json.dumps(manifest_json).encode())
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')


def _oci_manifest(cache: ImageCache, config_name: str, layer_names: list[str]) -> bytes:
    def describe(name: str, media_type: str | None) -> dict[str, Any]:
        path = cache.root / name
        if media_type is None:
            with path.open("rb") as file:
                compression = detect_compression(file.read(8))
                # NOTE: bzip2 and xz have no OCI media type, so a cache in
                # compressed storage that contains one labels it plain tar.
                media_type = _LAYER_TYPES.get(compression, OCI_LAYER_TAR)
        digest = "sha256:" + name.rpartition("/")[2]
        return {"mediaType": media_type, "digest": digest, "size": path.stat().st_size}

    manifest = {
        "schemaVersion": 2,
        "mediaType": _OCI_MANIFEST,
        "config": describe(config_name, _OCI_CONFIG),
        "layers": [describe(name, None) for name in layer_names],
    }
    return json.dumps(manifest).encode()


def _oci_index(ref: Reference, digest: str, size: int) -> bytes:
    descriptor: dict[str, Any] = {
        "mediaType": _OCI_MANIFEST,
        "digest": digest,
        "size": size,
    }
    if ref.tag:
        descriptor["annotations"] = {
            "io.containerd.image.name": str(ref),
            "org.opencontainers.image.ref.name": ref.tag,
        }
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]}
    return json.dumps(index).encode()


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    with path.open("rb") as file:
        tar.addfile(info, file)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
