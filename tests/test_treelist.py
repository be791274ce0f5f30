"""The tree lister gives a tar and its extracted directory the same lines."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import missing_tools
from treelist import format_lines, list_dir, list_tar, parse_rootless_owner


def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 1_600_000_000
    tar.addfile(info, io.BytesIO(data))


def add_entry(tar: tarfile.TarFile, name: str, type_: bytes, **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mtime = 1_600_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info)


def write_tar(path: Path, build: Callable[[tarfile.TarFile], None]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return path


def sample_tree(tar: tarfile.TarFile) -> None:
    add_entry(tar, "./", tarfile.DIRTYPE, mode=0o755)
    add_entry(tar, "./etc/", tarfile.DIRTYPE, mode=0o755)
    add_file(tar, "./etc/motd", b"hello\n")
    add_file(tar, "./etc/run.sh", b"#!/bin/sh\n", 0o4755)
    add_entry(tar, "./etc/hello", tarfile.LNKTYPE, linkname="etc/motd")
    add_entry(tar, "./etc/link", tarfile.SYMTYPE, linkname="motd", mode=0o755)
    add_entry(tar, "./tmp/", tarfile.DIRTYPE, mode=0o1777)


def test_tar_lines_normalise_names(tmp_path: Path) -> None:
    lines = format_lines(list_tar(write_tar(tmp_path / "t.tar", sample_tree)))
    paths = [line.split("\t")[0] for line in lines]

    assert paths == ["etc", "etc/hello", "etc/link", "etc/motd", "etc/run.sh", "tmp"]


def test_tar_hardlink_joins_group(tmp_path: Path) -> None:
    entries = {e.path: e for e in list_tar(write_tar(tmp_path / "t.tar", sample_tree))}

    assert entries["etc/hello"].link == "etc/hello"
    assert entries["etc/motd"].link == "etc/hello"
    assert entries["etc/hello"].content == entries["etc/motd"].content
    assert entries["etc/run.sh"].link == "-"


def test_tar_symlink_mode_is_0777(tmp_path: Path) -> None:
    entries = {e.path: e for e in list_tar(write_tar(tmp_path / "t.tar", sample_tree))}

    assert entries["etc/link"].mode == 0o777
    assert entries["etc/link"].content == "motd"


def test_tar_rewritten_target_breaks_link(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_file(tar, "a", b"old\n")
        add_entry(tar, "b", tarfile.LNKTYPE, linkname="a")
        add_file(tar, "a", b"new\n")

    entries = {e.path: e for e in list_tar(write_tar(tmp_path / "t.tar", build))}

    assert entries["a"].link == "-"
    assert entries["b"].link == "-"
    assert entries["a"].content != entries["b"].content
    assert "dup=2" in entries["a"].notes


def test_tar_missing_link_target_noted(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_entry(tar, "b", tarfile.LNKTYPE, linkname="nowhere")

    (entry,) = list_tar(write_tar(tmp_path / "t.tar", build))

    assert entry.type == "h"
    assert "missing-target" in entry.notes


def test_tar_and_extracted_dir_agree(tmp_path: Path) -> None:
    if missing_tools("tar"):
        pytest.skip("GNU tar is not installed")
    archive = write_tar(tmp_path / "t.tar", sample_tree)
    target = tmp_path / "x"
    target.mkdir()
    subprocess.run(["tar", "-xpf", str(archive), "-C", str(target)], check=True)

    from_tar = format_lines(list_tar(archive), owners=False)
    from_dir = format_lines(list_dir(target), owners=False)

    assert from_tar == from_dir


def test_dir_xattrs_listed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    try:
        os.setxattr(path, "user.test", b"\x00\x01")
    except OSError as exc:
        pytest.skip(f"user xattrs are not supported here: {exc}")

    (entry,) = list_dir(tmp_path)

    assert entry.xattrs == (("user.test", b"\x00\x01"),)
    assert "user.test=AAE=" in entry.line()


def test_rootless_owner_decoded() -> None:
    # uid 1000 (field 1), gid 100 (field 2), as protobuf varints.
    assert parse_rootless_owner(b"\x08\xe8\x07\x10\x64") == (1000, 100)
    assert parse_rootless_owner(b"") == (0, 0)
    assert parse_rootless_owner(b"\x08\xff\xff\xff\xff\x0f\x10\x05") == (0, 5)


def test_rootless_owner_rejects_bytes_field() -> None:
    with pytest.raises(ValueError, match="wire type"):
        parse_rootless_owner(b"\x0a\x01\x00")
