"""List a root filesystem, as a tar or as a directory, in one comparable form.

Each entry becomes one tab-separated line:

    path  type  mode  uid:gid  size  content  link  xattrs  mtime

* ``type`` is ``f`` file, ``d`` directory, ``l`` symlink, ``c``/``b`` device,
  ``p`` fifo, ``s`` socket.
* ``content`` is the sha256 of a file, the target of a symlink, ``major,minor``
  of a device, and ``-`` otherwise.
* ``link`` names the smallest path of a hardlink group, so a tar (where the
  later names are ``LNKTYPE`` members) and an unpacked directory (where the
  names share an inode) give the same lines. It is ``-`` for a lone file.
* ``xattrs`` is ``name=base64`` joined by ``,``, or ``-``.
* ``mtime`` is in whole seconds. Directories always show ``-``, because an
  unpacker touches a directory every time it writes into it.

Ownership in a rootless unpack lives in the ``user.rootlesscontainers``
xattr (a protobuf with uid in field 1 and gid in field 2) that umoci writes.
``list_dir(..., rootless=True)`` decodes it and drops the xattr.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

ROOTLESS_XATTR = "user.rootlesscontainers"
# The protobuf value that leaves an id unchanged (uint32 max).
_ROOTLESS_NOOP = 0xFFFFFFFF
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PAX_XATTR_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")


@dataclass(frozen=True)
class Entry:
    """One path of a root filesystem, as it would be after extraction."""

    path: str
    type: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    content: str = "-"
    link: str = "-"
    xattrs: tuple[tuple[str, bytes], ...] = ()
    mtime: int | None = None
    notes: tuple[str, ...] = field(default=())

    def line(self, *, owners: bool = True, mtimes: bool = True) -> str:
        """Format the entry as one tab-separated line."""
        owner = f"{self.uid}:{self.gid}" if owners else "-"
        show_mtime = mtimes and self.type != "d" and self.mtime is not None
        xattrs = ",".join(
            f"{name}={base64.b64encode(value).decode()}" for name, value in self.xattrs
        )
        columns = [
            self.path,
            self.type,
            f"{self.mode:04o}",
            owner,
            str(self.size),
            self.content,
            self.link,
            xattrs or "-",
            str(self.mtime) if show_mtime else "-",
        ]
        columns.extend(self.notes)
        return "\t".join(columns)


def format_lines(
    entries: Iterable[Entry], *, owners: bool = True, mtimes: bool = True
) -> list[str]:
    """Format entries as sorted lines."""
    return sorted(e.line(owners=owners, mtimes=mtimes) for e in entries)


def normalize_name(name: str) -> str:
    """Strip ``./``, leading and trailing slashes from a tar member name."""
    while name.startswith("./"):
        name = name[2:]
    name = name.strip("/")
    return "" if name == "." else name


# ---- tar -------------------------------------------------------------------


def list_tar(path: str | os.PathLike[str]) -> list[Entry]:
    """List the tree that extracting the tar at ``path`` would create.

    The tar may be plain or compressed with gzip, bzip2, xz or (when the
    ``zstandard`` module is installed) zstd. A name that occurs more than once
    keeps its last member and gets a ``dup=N`` note. A hardlink whose target
    is not an earlier member gets a ``missing-target`` note.
    """
    with open(path, "rb") as raw:
        if raw.read(4) == _ZSTD_MAGIC:
            raw.seek(0)
            import zstandard  # a dependency of the package under test

            reader = zstandard.ZstdDecompressor().stream_reader(raw)
            with reader, tarfile.open(fileobj=reader, mode="r|") as tar:
                return _list_members(tar)
        raw.seek(0)
        with tarfile.open(fileobj=raw, mode="r:*") as tar:
            return _list_members(tar)


def _list_members(tar: tarfile.TarFile) -> list[Entry]:
    entries: dict[str, Entry] = {}
    counts: dict[str, int] = {}
    # A regular file member makes a new inode and a hardlink member shares
    # its target's inode, as when GNU tar extracts. A name that is written
    # again gets a new inode, so older links to it keep the old content.
    inode_of: dict[str, int] = {}
    for number, member in enumerate(tar):
        name = normalize_name(member.name)
        if not name:
            continue
        counts[name] = counts.get(name, 0) + 1
        inode_of.pop(name, None)
        if member.islnk():
            entries[name] = _hardlink_entry(name, member, entries)
            target = normalize_name(member.linkname)
            if target in inode_of:
                inode_of[name] = inode_of[target]
            continue
        entries[name] = _member_entry(name, member, tar)
        if member.isreg():
            inode_of[name] = number

    names_of: dict[int, list[str]] = {}
    for name, inode in inode_of.items():
        names_of.setdefault(inode, []).append(name)
    result = []
    for name, entry in entries.items():
        names = names_of.get(inode_of.get(name, -1), [])
        if len(names) > 1:
            entry = replace(entry, link=min(names))
        if counts[name] > 1:
            entry = replace(entry, notes=(*entry.notes, f"dup={counts[name]}"))
        result.append(entry)
    return result


def _member_entry(name: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> Entry:
    base = Entry(
        path=name,
        type=_member_type(member),
        mode=member.mode & 0o7777,
        uid=member.uid,
        gid=member.gid,
        xattrs=_pax_xattrs(member),
        mtime=int(member.mtime),
    )
    if member.isreg():
        digest, size = _hash_stream(tar.extractfile(member))
        return replace(base, size=size, content=digest)
    if member.issym():
        # Linux gives every symlink mode 0777, whatever mode its header records.
        return replace(base, mode=0o777, content=member.linkname)
    if member.ischr() or member.isblk():
        return replace(base, content=f"{member.devmajor},{member.devminor}")
    return base


def _hardlink_entry(
    name: str, member: tarfile.TarInfo, entries: dict[str, Entry]
) -> Entry:
    target = normalize_name(member.linkname)
    found = entries.get(target)
    if found is None or found.type != "f":
        return Entry(
            path=name,
            type="h",
            mode=member.mode & 0o7777,
            content=target,
            notes=("missing-target",),
        )
    # The new name shares the target's inode, so it shows the target's
    # metadata, not the metadata in its own LNKTYPE header.
    return replace(found, path=name, link="-", notes=())


def _member_type(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "f"
    if member.isdir():
        return "d"
    if member.issym():
        return "l"
    if member.ischr():
        return "c"
    if member.isblk():
        return "b"
    if member.isfifo():
        return "p"
    return f"?{member.type!r}"


def _pax_xattrs(member: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    found = []
    for key, value in member.pax_headers.items():
        for prefix in _PAX_XATTR_PREFIXES:
            if not key.startswith(prefix):
                continue
            raw = value.encode("utf-8", "surrogateescape")
            if prefix.startswith("LIBARCHIVE"):
                raw = base64.b64decode(raw)
            found.append((key[len(prefix) :], raw))
    return tuple(sorted(found))


def _hash_stream(stream: object) -> tuple[str, int]:
    if stream is None:
        return hashlib.sha256().hexdigest(), 0
    digest = hashlib.sha256()
    size = 0
    read = stream.read  # type: ignore[attr-defined]
    while chunk := read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


# ---- directory -------------------------------------------------------------


def list_dir(path: str | os.PathLike[str], *, rootless: bool = False) -> list[Entry]:
    """List the tree under the directory ``path`` (not the directory itself).

    With ``rootless`` the owner comes from umoci's ``user.rootlesscontainers``
    xattr (0:0 when it is absent) instead of the inode.
    """
    root = os.fspath(path)
    entries = []
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            entries.append(_path_entry(full, rel, st, rootless))

    leaders = {}
    for names in inodes.values():
        if len(names) > 1:
            for name in names:
                leaders[name] = min(names)
    return [
        replace(e, link=leaders[e.path]) if e.path in leaders else e for e in entries
    ]


def _path_entry(full: str, rel: str, st: os.stat_result, rootless: bool) -> Entry:
    xattrs = _read_xattrs(full)
    uid, gid = st.st_uid, st.st_gid
    if rootless:
        uid, gid = 0, 0
        for name, value in xattrs:
            if name == ROOTLESS_XATTR:
                uid, gid = parse_rootless_owner(value)
        xattrs = tuple((n, v) for n, v in xattrs if n != ROOTLESS_XATTR)

    base = Entry(
        path=rel,
        type=_stat_type(st.st_mode),
        mode=stat.S_IMODE(st.st_mode),
        uid=uid,
        gid=gid,
        xattrs=xattrs,
        mtime=int(st.st_mtime),
    )
    if base.type == "f":
        with open(full, "rb") as stream:
            digest, size = _hash_stream(stream)
        return replace(base, size=size, content=digest)
    if base.type == "l":
        return replace(base, content=os.readlink(full))
    if base.type in ("c", "b"):
        return replace(base, content=f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}")
    return base


def _stat_type(mode: int) -> str:
    for test, letter in (
        (stat.S_ISREG, "f"),
        (stat.S_ISDIR, "d"),
        (stat.S_ISLNK, "l"),
        (stat.S_ISCHR, "c"),
        (stat.S_ISBLK, "b"),
        (stat.S_ISFIFO, "p"),
        (stat.S_ISSOCK, "s"),
    ):
        if test(mode):
            return letter
    return "?"


def _read_xattrs(full: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError:
        return ()
    found = []
    for name in names:
        try:
            found.append((name, os.getxattr(full, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(sorted(found))


def parse_rootless_owner(value: bytes) -> tuple[int, int]:
    """Decode a ``user.rootlesscontainers`` protobuf into ``(uid, gid)``."""
    fields = {1: 0, 2: 0}
    pos = 0
    while pos < len(value):
        key, pos = _read_varint(value, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type != 0:
            raise ValueError(f"unexpected protobuf wire type {wire_type} in {value!r}")
        number_value, pos = _read_varint(value, pos)
        if number in fields and number_value != _ROOTLESS_NOOP:
            fields[number] = number_value
    return fields[1], fields[2]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise ValueError(f"truncated protobuf varint in {data!r}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def list_path(path: str, *, rootless: bool = False) -> list[Entry]:
    """List a directory or a tar file, whichever ``path`` is."""
    if os.path.isdir(path):
        return list_dir(path, rootless=rootless)
    return list_tar(path)


def main(argv: list[str]) -> int:
    """Print the listing of each path given on the command line."""
    rootless = "--rootless" in argv
    no_owner = "--no-owner" in argv
    no_mtime = "--no-mtime" in argv
    for path in (a for a in argv if not a.startswith("--")):
        for line in format_lines(
            list_path(path, rootless=rootless), owners=not no_owner, mtimes=not no_mtime
        ):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
