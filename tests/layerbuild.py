"""Build image layers and saved-image archives in memory; list output tars.

Layers are written with ``tarfile``. Entries are given either as ``Entry``
objects or in a short text form:

* ``"a/"`` is a directory, ``"a/b"`` an empty regular file;
* ``'a/b "text"'`` is a regular file with content ``text``;
* ``"x -> y"`` is a symlink and ``"x => y"`` a hardlink (typeflag ``1``).

A whiteout is an ordinary empty file named ``.wh.NAME``. Names may be
``bytes``; they are written with ``surrogateescape`` so that bytes that are
not UTF-8 reach the tar unchanged.

The wrappers write a classic ``docker save`` archive (``<id>/layer.tar``), the
Docker 25 hybrid (OCI layout plus ``manifest.json``) and OCI layouts, as a
directory or a tar. ``read_tree`` lists an output tar as a ``Tree`` and
records every violation of the output rules in ``Tree.problems``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

REPO = Path(__file__).resolve().parents[1]
CLI = (sys.executable, "-m", "pulldocker")
CLI_TIMEOUT = 120
MTIME = 1_700_000_000

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

_FORMATS = {
    "pax": tarfile.PAX_FORMAT,
    "gnu": tarfile.GNU_FORMAT,
    "ustar": tarfile.USTAR_FORMAT,
}
_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "contiguous": tarfile.CONTTYPE,
    "oldfile": tarfile.AREGTYPE,
}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777, "hardlink": 0o644}


def text(name: str | bytes) -> str:
    """Return a tar name as ``str``; bytes that are not UTF-8 become surrogates."""
    if isinstance(name, bytes):
        return name.decode("utf-8", "surrogateescape")
    return name


@dataclass
class Entry:
    """One tar member of a layer; ``kind`` is a key of ``_TYPES``."""

    name: str | bytes
    kind: str = "file"
    data: bytes = b""
    link: str | bytes = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] | None = None
    pax: dict[str, str] | None = None

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(text(self.name))
        info.type = _TYPES[self.kind]
        info.mode = self.mode if self.mode is not None else self.default_mode()
        info.uid, info.gid = self.uid, self.gid
        info.uname = info.gname = ""
        info.mtime = self.mtime
        info.linkname = text(self.link)
        info.devmajor, info.devminor = self.devmajor, self.devminor
        info.size = len(self.data) if self.has_data() else 0
        headers = dict(self.pax or {})
        for key, value in (self.xattrs or {}).items():
            headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = headers
        return info

    def has_data(self) -> bool:
        return self.kind in ("file", "contiguous", "oldfile")

    def default_mode(self) -> int:
        return _DEFAULT_MODES.get(self.kind, 0o644)


def parse_entry(spec: str | bytes | Entry) -> Entry:
    """Turn the short text form (see the module docstring) into an ``Entry``."""
    if isinstance(spec, Entry):
        return spec
    if isinstance(spec, bytes):
        return Entry(spec)
    if " -> " in spec:
        name, target = spec.split(" -> ", 1)
        return Entry(name, "symlink", link=target)
    if " => " in spec:
        name, target = spec.split(" => ", 1)
        return Entry(name, "hardlink", link=target)
    if spec.endswith('"') and ' "' in spec:
        name, content = spec.split(' "', 1)
        return Entry(name, data=content[:-1].encode())
    if spec.endswith("/"):
        return Entry(spec, "dir")
    return Entry(spec)


def layer(
    *specs: str | bytes | Entry,
    fmt: str = "pax",
    global_pax: dict[str, str] | None = None,
) -> bytes:
    """Return an uncompressed layer tar holding ``specs`` in order.

    ``global_pax`` records go into a global (``g``) header before the members.
    """
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer,
        mode="w",
        format=_FORMATS[fmt],
        encoding="utf-8",
        errors="surrogateescape",
        pax_headers=global_pax,
    ) as tar:
        for spec in specs:
            entry = parse_entry(spec)
            data = io.BytesIO(entry.data) if entry.has_data() else None
            tar.addfile(entry.tarinfo(), data)
    return buffer.getvalue()


def compress(data: bytes, kind: str | None) -> bytes:
    """Compress ``data`` with ``gzip``, ``zstd``, ``xz`` or ``bzip2``."""
    if kind is None or kind == "none":
        return data
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if kind == "xz":
        return lzma.compress(data)
    if kind == "bzip2":
        return bz2.compress(data)
    raise ValueError(f"unknown compression {kind!r}")


def decompress(data: bytes) -> bytes:
    """Undo ``compress``, choosing the decoder from the magic bytes."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        decoder = zstandard.ZstdDecompressor(max_window_size=2**31)
        reader = decoder.stream_reader(io.BytesIO(data), read_across_frames=True)
        return b"".join(iter(lambda: reader.read(1 << 20), b""))
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Case:
    """Layers (each a list of entry specs, or raw layer bytes) and the result."""

    layers: list[list[str | bytes | Entry] | bytes]
    expected: list[str | bytes | Entry] = field(default_factory=list)
    fmt: str = "pax"

    def image(self) -> Image:
        blobs = [
            specs if isinstance(specs, bytes) else layer(*specs, fmt=self.fmt)
            for specs in self.layers
        ]
        return Image(blobs)


def strip_trailer(tar: bytes) -> bytes:
    """Cut the zero blocks that end a tar, leaving the last member's padding."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        last = archive.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    return tar[:end]


# -- archives -----------------------------------------------------------------


@dataclass
class Image:
    """One image: layers base first, as stored (plain or compressed bytes)."""

    layers: list[bytes]
    tags: list[str] = field(default_factory=lambda: ["test/image:1"])
    os: str = "linux"
    architecture: str = "amd64"
    media_types: list[str] | None = None
    diff_ids: list[str] | None = None
    annotations: dict[str, str] | None = None

    def config(self) -> bytes:
        diff_ids = self.diff_ids or [sha256(decompress(blob)) for blob in self.layers]
        document = {
            "architecture": self.architecture,
            "os": self.os,
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        return json.dumps(document, sort_keys=True).encode()


def write_files(path: Path, files: dict[str, bytes], *, as_tar: bool = True) -> Path:
    """Write ``files`` (archive path -> bytes) as a tar at ``path`` or a tree."""
    if not as_tar:
        for name, data in files.items():
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return path
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()
        for name, data in files.items():
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    return path


def docker_archive_files(images: list[Image]) -> dict[str, bytes]:
    """Return the members of a classic ``docker save`` archive."""
    files: dict[str, bytes] = {}
    manifest = []
    for image in images:
        config = image.config()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        files[config_name] = config
        paths = []
        for blob in image.layers:
            layer_id = hashlib.sha256(blob).hexdigest()
            files[f"{layer_id}/VERSION"] = b"1.0"
            files[f"{layer_id}/json"] = json.dumps({"id": layer_id}).encode()
            files[f"{layer_id}/layer.tar"] = blob
            paths.append(f"{layer_id}/layer.tar")
        manifest.append(
            {"Config": config_name, "RepoTags": image.tags, "Layers": paths}
        )
    files["manifest.json"] = json.dumps(manifest).encode()
    return files


def docker_archive(path: Path, *images: Image, as_tar: bool = True) -> Path:
    """Write a classic ``docker save`` archive of ``images``."""
    return write_files(path, docker_archive_files(list(images)), as_tar=as_tar)


class BlobStore:
    """The ``blobs/sha256`` part of an OCI layout."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def add(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        digest = sha256(data)
        self.files["blobs/sha256/" + digest.split(":", 1)[1]] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def add_image(self, image: Image, **extra: Any) -> dict[str, Any]:
        """Store an image's layers, config and manifest; return its descriptor."""
        media_types = image.media_types or [
            _guess_media_type(blob) for blob in image.layers
        ]
        layers = [
            self.add(blob, media_type)
            for blob, media_type in zip(image.layers, media_types, strict=True)
        ]
        config = self.add(image.config(), OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": layers,
        }
        platform = {"os": image.os, "architecture": image.architecture}
        return self.add(
            json.dumps(manifest).encode(), OCI_MANIFEST, platform=platform, **extra
        )


def _guess_media_type(blob: bytes) -> str:
    if blob[:2] == b"\x1f\x8b":
        return LAYER_GZIP
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return LAYER_ZSTD
    return LAYER_TAR


def oci_index(manifests: list[dict[str, Any]]) -> bytes:
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return json.dumps(document).encode()


def oci_layout(path: Path, *images: Image, as_tar: bool = False) -> Path:
    """Write an OCI image layout with one index entry per image."""
    store = BlobStore()
    descriptors = []
    for image in images:
        tag = image.tags[0].rsplit(":", 1)[-1] if image.tags else ""
        annotations = {"org.opencontainers.image.ref.name": tag} if tag else {}
        annotations.update(image.annotations or {})
        descriptors.append(store.add_image(image, annotations=annotations))
    files = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": oci_index(descriptors),
        **store.files,
    }
    return write_files(path, files, as_tar=as_tar)


def docker25_archive(path: Path, image: Image) -> Path:
    """Write the Docker 25+ ``docker save`` layout: OCI blobs plus manifest.json."""
    store = BlobStore()
    tag = image.tags[0]
    descriptor = store.add_image(
        image,
        annotations={
            "io.containerd.image.name": "docker.io/library/" + tag,
            "org.opencontainers.image.ref.name": tag.rsplit(":", 1)[-1],
        },
    )
    manifest = json.loads(store.files["blobs/sha256/" + descriptor["digest"][7:]])
    legacy = [
        {
            "Config": "blobs/sha256/" + manifest["config"]["digest"][7:],
            "RepoTags": image.tags,
            "Layers": ["blobs/sha256/" + d["digest"][7:] for d in manifest["layers"]],
        }
    ]
    files = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": oci_index([descriptor]),
        "manifest.json": json.dumps(legacy).encode(),
        **store.files,
    }
    return write_files(path, files)


# -- running the command line ------------------------------------------------------


def run_cli(
    *args: str | os.PathLike[str], stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m pulldocker ARGS`` and capture stdout and stderr as bytes."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        input=stdin if stdin is not None else b"",
        timeout=CLI_TIMEOUT,
    )


def failure_text(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode(errors="replace")[-3000:]
    return f"exit {result.returncode}; stderr:\n{stderr}"


# -- reading an output tar ---------------------------------------------------------

# (type, mode, uid, gid, content or symlink target, xattrs)
Node = tuple[str, int, int, int, bytes | str | None, dict[str, bytes]]
_KIND_LETTER = {
    tarfile.REGTYPE: "f",
    tarfile.AREGTYPE: "f",
    tarfile.DIRTYPE: "d",
    tarfile.SYMTYPE: "l",
    tarfile.CHRTYPE: "c",
    tarfile.BLKTYPE: "b",
    tarfile.FIFOTYPE: "p",
    tarfile.LNKTYPE: "h",
}


@dataclass
class Tree:
    """A root filesystem listing.

    ``entries`` maps each path (no ``./``, no trailing slash) to a ``Node``;
    a hardlink shows the type and content of the file it shares. ``links``
    contains the groups of two or more names that share one file.
    """

    entries: dict[str, Node] = field(default_factory=dict)
    links: set[frozenset[str]] = field(default_factory=set)
    order: list[str] = field(default_factory=list)
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def paths(self) -> set[str]:
        return set(self.entries)


def _xattrs(info: tarfile.TarInfo) -> dict[str, bytes]:
    found = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found[key[13:]] = value.encode("utf-8", "surrogateescape")
    return found


def read_tree(source: Path | bytes) -> Tree:
    """List an output tar (plain or compressed) and check the output rules.

    The rules: no ``.wh.`` names, no duplicate paths, no ``./`` or ``/``
    prefix, every directory emitted before its children, every parent emitted,
    and every hardlink pointing to an earlier, non-directory, non-link member.
    """
    data = source.read_bytes() if isinstance(source, Path) else source
    tree = Tree()
    groups: dict[str, set[str]] = {}
    with tarfile.open(
        fileobj=io.BytesIO(decompress(data)),
        mode="r:",
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for info in tar:
            _add_member(tree, tar, info, groups)
    tree.links = {frozenset(names) for names in groups.values() if len(names) > 1}
    return tree


def _add_member(
    tree: Tree,
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    groups: dict[str, set[str]],
) -> None:
    raw = info.name
    path = raw.rstrip("/")
    if raw.startswith(("./", "/")) or raw in (".", ""):
        tree.problems.append(f"name with a root prefix: {raw!r}")
    base = path.rsplit("/", 1)[-1]
    if base.startswith(".wh."):
        tree.problems.append(f"whiteout marker in the output: {raw!r}")
    if path in tree.entries:
        tree.problems.append(f"duplicate path: {raw!r}")
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and tree.entries.get(parent, ("",))[0] != "d":
        tree.problems.append(f"{raw!r} comes before a directory entry for {parent!r}")
    kind = _KIND_LETTER.get(info.type, "?")
    content: bytes | str | None = None
    if kind == "h":
        target = info.linkname.rstrip("/")
        shared = tree.entries.get(target)
        if shared is None:
            tree.problems.append(f"hardlink {raw!r} to {target!r}, not emitted before")
            node: Node = ("h", info.mode, info.uid, info.gid, target, _xattrs(info))
        else:
            if shared[0] == "d":
                tree.problems.append(f"hardlink {raw!r} to directory {target!r}")
            if tree.members[target].type == tarfile.LNKTYPE:
                tree.problems.append(f"hardlink {raw!r} to hardlink {target!r}")
            node = (shared[0], info.mode, info.uid, info.gid, shared[4], _xattrs(info))
            group = groups.setdefault(target, {target})
            group.add(path)
            groups[path] = group
    else:
        if kind == "f":
            extracted = tar.extractfile(info)
            content = extracted.read() if extracted else b""
        elif kind == "l":
            content = info.linkname
        elif kind in ("c", "b"):
            content = f"{info.devmajor},{info.devminor}"
        node = (kind, info.mode, info.uid, info.gid, content, _xattrs(info))
    tree.entries[path] = node
    tree.members[path] = info
    tree.order.append(path)


def expect(*specs: str | bytes | Entry) -> Tree:
    """Build the expected tree from the same short forms that ``layer`` reads.

    Defaults are those of an implied or plainly written entry: directories
    0755, files 0644, symlinks 0777, owner 0:0. ``"x => y"`` gives ``x`` the
    content of ``y`` and puts both in one link group.
    """
    tree = Tree()
    groups: dict[str, set[str]] = {}
    for spec in specs:
        entry = parse_entry(spec)
        path = text(entry.name).rstrip("/")
        mode = entry.mode if entry.mode is not None else entry.default_mode()
        xattrs = dict(entry.xattrs or {})
        if entry.kind == "hardlink":
            target = text(entry.link)
            shared = tree.entries[target]
            mode = entry.mode if entry.mode is not None else shared[1]
            node: Node = (shared[0], mode, entry.uid, entry.gid, shared[4], xattrs)
            group = groups.setdefault(target, {target})
            group.add(path)
            groups[path] = group
        else:
            kind = "f" if entry.has_data() else "?"
            kind = {"dir": "d", "symlink": "l"}.get(entry.kind, kind)
            content: bytes | str | None = None
            if kind == "f":
                content = entry.data
            elif kind == "l":
                content = text(entry.link)
            elif entry.kind in ("chardev", "blockdev"):
                kind = entry.kind[0]
                content = f"{entry.devmajor},{entry.devminor}"
            elif entry.kind == "fifo":
                kind = "p"
            node = (kind, mode, entry.uid, entry.gid, content, xattrs)
        tree.entries[path] = node
    tree.links = {frozenset(names) for names in groups.values() if len(names) > 1}
    return tree


def flatten(
    archive: Path, out_dir: Path, *args: str, name: str = "rootfs.tar"
) -> tuple[subprocess.CompletedProcess[bytes], Path]:
    """Convert ``archive`` into ``out_dir/name`` with the command line."""
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / name
    return run_cli(archive, "-o", output, *args), output


def check_case_tree(tmp_path: Path, case: Case) -> None:
    """Flatten ``case`` as a ``docker save`` archive and compare the tree."""
    archive = docker_archive(tmp_path / "image.tar", case.image())
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    tree = read_tree(output)
    expected = expect(*case.expected)
    assert tree.entries == expected.entries
    assert tree.links == expected.links
    assert tree.problems == []


def clean_failure_problems(
    result: subprocess.CompletedProcess[bytes], out_dir: Path
) -> list[str]:
    """List how a failed run broke the error contract; empty if it kept it.

    The contract: a non-zero exit, one line on stderr without a traceback,
    and nothing left in the output directory.
    """
    problems = []
    stderr = result.stderr.decode(errors="replace")
    if result.returncode == 0:
        problems.append("exit status 0")
    if len(stderr.strip().splitlines()) != 1:
        problems.append(f"stderr is not one line: {stderr!r}")
    if "Traceback" in stderr:
        problems.append("traceback on stderr")
    left = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    if left:
        problems.append(f"files left behind: {left}")
    return problems
