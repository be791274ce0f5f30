"""Builders for malformed and hostile image archives, and checks on the result.

The builders write tar headers by hand where ``tarfile`` would refuse or
repair the input (bad checksums, NUL bytes in names, sizes past the data).
The checks run the real command line in a child process and assert the
contract that every hostile input must meet: either a rootfs tar that an
unprivileged GNU tar extracts cleanly, or one line on stderr with the
documented exit code, with no output and no temporary file left behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PULLDOCKER = (sys.executable, "-m", "pulldocker")
CLI_TIMEOUT = 300
NOBODY = 65534

# Exit codes of pulldocker.errors, repeated here so that a change there shows
# up as a test failure instead of silently moving the expectation.
EXIT_INVALID = 3
EXIT_NOT_FOUND = 4
EXIT_INTEGRITY = 7
EXIT_LIMIT = 8
EXIT_INTERRUPTED = 130


def sha256(data: bytes) -> str:
    """Return the ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- tar members ------------------------------------------------------------


@dataclass
class Member:
    """One tar member as ``tarfile`` can write it."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    pax: dict[str, str] = field(default_factory=dict)


def file(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    return Member(name, tarfile.REGTYPE, data, mode=mode)


def directory(name: str) -> Member:
    return Member(name, tarfile.DIRTYPE, mode=0o755)


def symlink(name: str, target: str) -> Member:
    return Member(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hardlink(name: str, target: str) -> Member:
    return Member(name, tarfile.LNKTYPE, linkname=target)


def tar_bytes(members: list[Member], *, end: bool = True) -> bytes:
    """Write ``members`` as a PAX tar; ``end=False`` drops the trailer."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.kind
            info.mode = member.mode
            info.linkname = member.linkname
            info.size = len(member.data) if member.kind == tarfile.REGTYPE else 0
            info.mtime = 1_600_000_000
            info.pax_headers = dict(member.pax)
            tar.addfile(info, io.BytesIO(member.data) if info.size else None)
    data = buffer.getvalue()
    if not end:
        data = data.rstrip(b"\0")
        data += bytes(-len(data) % 512)
    return data


def raw_header(
    name: bytes,
    *,
    size: int = 0,
    kind: bytes = b"0",
    linkname: bytes = b"",
    mode: int = 0o644,
    checksum_delta: int = 0,
    size_field: bytes | None = None,
) -> bytes:
    """Build one ustar header block by hand, with a settable checksum error."""
    block = bytearray(512)
    block[0 : len(name[:100])] = name[:100]
    block[100:108] = b"%07o\0" % mode
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_600_000_000
    block[156:157] = kind
    block[157 : 157 + len(linkname[:100])] = linkname[:100]
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    checksum = sum(block) + checksum_delta
    block[148:156] = b"%06o\0 " % checksum
    return bytes(block)


def raw_member(name: bytes, data: bytes = b"", **fields: object) -> bytes:
    """Return a hand-built header plus padded data."""
    header = raw_header(name, size=len(data), **fields)  # type: ignore[arg-type]
    return header + data + bytes(-len(data) % 512)


def pax_member(records: dict[bytes, bytes], member: bytes) -> bytes:
    """Prefix ``member`` (a header plus data) with a PAX header of ``records``."""
    body = b""
    for key, value in records.items():
        payload = b" " + key + b"=" + value + b"\n"
        length = len(payload) + 1
        while len(str(length).encode()) + len(payload) != length:
            length = len(str(length).encode()) + len(payload)
        body += str(length).encode() + payload
    return raw_member(b"PaxHeader/x", body, kind=b"x") + member


END = bytes(1024)


# -- archives -----------------------------------------------------------------


def config_for(diff_ids: list[str]) -> bytes:
    """Return a minimal linux/amd64 image config listing ``diff_ids``."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(config).encode()


def uncompressed_digest(layer: bytes) -> str:
    """Return the diff_id of a stored layer, decompressing gzip if needed."""
    if layer[:2] == b"\x1f\x8b":
        try:
            return sha256(gzip.decompress(layer))
        except (OSError, EOFError, zlib.error):
            return sha256(layer)
    return sha256(layer)


def docker_archive(
    path: Path,
    layers: list[bytes],
    *,
    manifest: bytes | None = None,
    config: bytes | None = None,
    diff_ids: list[str] | None = None,
    extra: list[bytes] | None = None,
) -> Path:
    """Write a ``docker save`` style archive with the given layer bytes.

    ``manifest`` and ``config`` replace the generated JSON; ``diff_ids``
    replace the computed ones; ``extra`` is raw tar data (members built with
    ``raw_member``) appended before the end marker.
    """
    if diff_ids is None:
        diff_ids = [uncompressed_digest(layer) for layer in layers]
    config_data = config if config is not None else config_for(diff_ids)
    config_name = sha256(config_data).partition(":")[2] + ".json"
    layer_names = [f"l{i}/layer.tar" for i in range(len(layers))]
    if manifest is None:
        manifest = json.dumps(
            [{"Config": config_name, "RepoTags": ["h:1"], "Layers": layer_names}]
        ).encode()
    members = [file(config_name, config_data)]
    members += [file(n, layer) for n, layer in zip(layer_names, layers, strict=True)]
    members.append(file("manifest.json", manifest))
    data = tar_bytes(members, end=False)
    data += b"".join(extra or []) + END
    path.write_bytes(data)
    return path


def oci_archive(
    path: Path,
    layers: list[bytes],
    *,
    index: bytes | None = None,
    manifest: bytes | None = None,
    config: bytes | None = None,
) -> Path:
    """Write an OCI image layout, as a tar, holding the given layers."""
    diff_ids = [uncompressed_digest(layer) for layer in layers]
    config_data = config if config is not None else config_for(diff_ids)
    descriptors = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": sha256(layer),
            "size": len(layer),
        }
        for layer in layers
    ]
    if manifest is None:
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(config_data),
                    "size": len(config_data),
                },
                "layers": descriptors,
            }
        ).encode()
    if index is None:
        index = json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": sha256(manifest),
                        "size": len(manifest),
                    }
                ],
            }
        ).encode()
    blobs = {sha256(b): b for b in [config_data, manifest, *layers]}
    members = [file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    members += [file(f"blobs/sha256/{d[7:]}", b) for d, b in blobs.items()]
    members.append(file("index.json", index))
    path.write_bytes(tar_bytes(members))
    return path


# -- running and checking -----------------------------------------------------


@dataclass
class Workspace:
    """A scratch layout: ``input/``, ``out/`` and a ``canary/`` that must stay empty.

    Only ``out/`` may change during a run; the canary directory and the
    parent directory show whether anything was written outside it.
    """

    root: Path

    def __post_init__(self) -> None:
        for name in ("input", "out", "canary", "extract"):
            (self.root / name).mkdir(exist_ok=True)

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def output(self) -> Path:
        return self.out / "rootfs.tar"

    @property
    def canary(self) -> Path:
        return self.root / "canary"

    @property
    def extract(self) -> Path:
        return self.root / "extract"

    def snapshot(self) -> set[str]:
        """List every path under the root except ``out/`` and ``extract/``."""
        found = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            if rel.split(os.sep)[0] in ("out", "extract"):
                dirnames.clear()
                continue
            for name in dirnames + filenames:
                found.add(os.path.join(rel, name))
        return found


def run_cli(
    *args: str | os.PathLike[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pulldocker ARGS`` with PYTHONPATH pointing at the checkout."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run(
        [*PULLDOCKER, *map(str, args)],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=full_env,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """Summarise a finished run for an assertion message."""
    return f"exit {result.returncode}; stderr:\n{result.stderr[-3000:]}"


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], code: int, workspace: Workspace
) -> None:
    """Check a rejected input: one stderr line, ``code``, nothing left in ``out/``."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, describe(result)
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith("pulldocker: "), describe(result)
    assert result.returncode == code, describe(result)
    assert list(workspace.out.iterdir()) == [], describe(result)


def assert_success(
    result: subprocess.CompletedProcess[str], workspace: Workspace
) -> None:
    """Check an accepted input: exit 0, only the output tar in ``out/``."""
    assert "Traceback" not in result.stderr, describe(result)
    assert result.returncode == 0, describe(result)
    assert sorted(p.name for p in workspace.out.iterdir()) == ["rootfs.tar"]


def output_names(tar_path: Path) -> dict[str, tarfile.TarInfo]:
    """Return the members of an output tar by name; duplicates fail the test."""
    members: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            assert info.name not in members, f"duplicate member {info.name!r}"
            members[info.name] = info
    return members


def assert_contained(tar_path: Path) -> None:
    """Check that no member of the output can lead an extractor out of its root.

    No name is absolute or has a ``..`` component, no hardlink target does,
    and no member sits below a name that the tar makes a symlink.
    """
    members = output_names(tar_path)
    symlinks = {name for name, info in members.items() if info.issym()}
    for name, info in members.items():
        parts = name.split("/")
        assert not name.startswith("/"), name
        assert ".." not in parts, name
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            assert prefix not in symlinks, f"{name} lies below symlink {prefix}"
        if info.islnk():
            assert not info.linkname.startswith("/"), info.linkname
            assert ".." not in info.linkname.split("/"), info.linkname
            assert info.linkname in members, f"{name} links to missing {info.linkname}"


def extract_unprivileged(
    tar_path: Path,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Extract ``tar_path`` with GNU tar as uid/gid 65534; return the run and root.

    The tar is read from stdin, so the nobody user needs no access to the test's
    own directories. The extraction root ``top/rootfs`` has a sibling
    ``top/canary``, both owned by 65534: anything that escapes ``rootfs`` can
    land in ``top`` and is seen by ``escaped_files``.
    """
    top = Path(tempfile.mkdtemp(prefix="pulldocker-extract-"))
    os.chmod(top, 0o755)
    for name in ("rootfs", "canary"):
        (top / name).mkdir()
    for path in (top, top / "rootfs", top / "canary"):
        os.chown(path, NOBODY, NOBODY)
    with tar_path.open("rb") as stream:
        result = subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "tar",
                "--no-same-owner",
                "-xf",
                "-",
                "-C",
                str(top / "rootfs"),
            ],
            stdin=stream,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=CLI_TIMEOUT,
        )
    return result, top / "rootfs"


def escaped_files(rootfs: Path) -> list[str]:
    """List what an extraction left beside ``rootfs`` or in its canary."""
    top = rootfs.parent
    found = sorted(p.name for p in top.iterdir() if p.name not in ("rootfs", "canary"))
    found += sorted(f"canary/{p.name}" for p in (top / "canary").iterdir())
    return found


def remove_extraction(rootfs: Path) -> None:
    """Delete an extraction made by ``extract_unprivileged``."""
    shutil.rmtree(rootfs.parent, ignore_errors=True)
