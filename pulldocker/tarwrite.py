"""Write the flattened tree as one PAX tar.

Every path appears once, directories before their children, children in byte
order, so the same tree always gives the same bytes. The first name of a
hardlinked file carries the data and later names are hardlinks to it. Fields
that do not fit ustar (long names and link targets, large numbers, fractional
mtimes, extended attributes) go into a PAX header. A name that is not UTF-8
is written with ``hdrcharset=BINARY``, so its bytes survive.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import BinaryIO
from zlib import adler32

from .flatten import BLK, CHR, DIR, FIFO_KIND, REG, SYM, Inode, Node, RootFS
from .tarscan import _ctar

__all__ = ["TarSink", "write_tree"]

_BLOCK = 512
_RECORD = 10240
_COPY_CHUNK = 1024 * 1024
_FLUSH_AT = 1024 * 1024
# Data shorter than this goes through the buffer, so that many small files
# share one write; longer data is copied with os.copy_file_range.
_SMALL_FILE = 16 * 1024
_ZEROS = bytes(_COPY_CHUNK)
_MAX_ID = 8**7  # the first value that does not fit an 8-byte octal field
_MAX_SIZE = 8**11  # the same for a 12-byte field
_TYPEFLAG = {REG: b"0", DIR: b"5", SYM: b"2", CHR: b"3", BLK: b"4", FIFO_KIND: b"6"}
# name, mode, uid, gid, size, mtime, checksum, typeflag, linkname, magic and
# version, uname, gname, devmajor, devminor, prefix; "s" pads with NULs.
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


class TarSink:
    """Buffered tar output that can also copy byte ranges from other files.

    Give either ``fd``, a regular file opened for writing, or ``stream``, any
    binary stream (a compressor, a pipe). With ``fd``, ranges are copied
    inside the kernel with ``os.copy_file_range`` where the file systems
    allow it. ``written`` counts the tar bytes produced so far.
    """

    def __init__(
        self, *, fd: int | None = None, stream: BinaryIO | None = None
    ) -> None:
        if (fd is None) == (stream is None):
            raise ValueError("give exactly one of fd and stream")
        self.fd = fd
        self.stream = stream
        self.buffer = bytearray()
        self.written = 0
        self._copy_in_kernel = fd is not None

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.written += len(data)
        if len(self.buffer) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        if self.stream is not None:
            self.stream.write(self.buffer)
        else:
            assert self.fd is not None
            view = memoryview(self.buffer)
            while view:
                view = view[os.write(self.fd, view) :]
        self.buffer = bytearray()

    def copy_range(self, fd: int, offset: int, length: int) -> None:
        """Append ``length`` bytes read from ``fd`` at ``offset``."""
        if self._copy_in_kernel and length >= _SMALL_FILE:
            self.flush()
            assert self.fd is not None
            try:
                copied = os.copy_file_range(fd, self.fd, length, offset)
            except OSError:
                # Some file system pairs refuse (EXDEV, EINVAL, ENOSYS); the
                # refusal comes before any byte is copied.
                copied = 0
                self._copy_in_kernel = False
            while 0 < copied < length:
                self.written += copied
                offset, length = offset + copied, length - copied
                copied = os.copy_file_range(fd, self.fd, length, offset)
            if copied == length:
                self.written += length
                return
        while length > 0:
            chunk = os.pread(fd, min(length, _COPY_CHUNK), offset)
            if not chunk:
                raise OSError(f"unexpected end of data at offset {offset}")
            self.write(chunk)
            offset += len(chunk)
            length -= len(chunk)

    def write_zeros(self, length: int) -> None:
        while length > 0:
            step = min(length, _COPY_CHUNK)
            self.write(_ZEROS[:step])
            length -= step


def write_tree(
    rootfs: RootFS,
    sink: TarSink,
    source_fds: Sequence[int],
    on_file: Callable[[int], None] | None = None,
) -> int:
    """Write every path of ``rootfs`` to ``sink``; return the number of entries.

    ``source_fds[i]`` is the open file that ``Inode.source == i`` refers to.
    ``on_file`` is called with each regular file's size after its data.
    """
    first_names: dict[int, bytes] = {}
    count = 0
    stack: list[tuple[bytes, Node]] = []
    _push_children(rootfs.root, b"", stack)
    while stack:
        path, node = stack.pop()
        inode = node.inode
        count += 1
        if inode.kind == DIR:
            sink.write(_header(path + b"/", inode, DIR, 0, b""))
            _push_children(node, path, stack)
            continue
        shared = first_names.get(id(inode))
        if shared is not None:
            sink.write(_header(path, inode, -1, 0, shared))
            continue
        first_names[id(inode)] = path
        if inode.kind != REG:
            sink.write(_header(path, inode, inode.kind, 0, inode.linkname))
            continue
        header = _header(path, inode, REG, inode.size, b"")
        if inode.size < _SMALL_FILE and inode.sparse is None:
            # One buffered write for header, data and padding.
            data = _read_exact(source_fds[inode.source], inode.offset, inode.size)
            sink.write(header + data + _ZEROS[: -inode.size % _BLOCK])
        else:
            sink.write(header)
            _write_data(sink, inode, source_fds)
        if on_file is not None:
            on_file(inode.size)
    sink.write(bytes(2 * _BLOCK))
    remainder = sink.written % _RECORD
    if remainder:
        sink.write(bytes(_RECORD - remainder))
    sink.flush()
    return count


def _push_children(node: Node, path: bytes, stack: list[tuple[bytes, Node]]) -> None:
    assert node.children is not None
    prefix = path + b"/" if path else b""
    for name in sorted(node.children, reverse=True):
        stack.append((prefix + name, node.children[name]))


def _read_exact(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) < length:
        raise OSError(f"unexpected end of data at offset {offset + len(data)}")
    return data


def _write_data(sink: TarSink, inode: Inode, source_fds: Sequence[int]) -> None:
    fd = source_fds[inode.source]
    if inode.sparse is None:
        sink.copy_range(fd, inode.offset, inode.size)
    else:
        position = 0
        for file_offset, length, source_offset in inode.sparse:
            sink.write_zeros(file_offset - position)
            sink.copy_range(fd, source_offset, length)
            position = file_offset + length
        sink.write_zeros(inode.size - position)
    padding = -inode.size % _BLOCK
    if padding:
        sink.write(bytes(padding))


def _header(path: bytes, inode: Inode, kind: int, size: int, linkname: bytes) -> bytes:
    """Return the ustar header, preceded by a PAX header when needed.

    ``kind`` -1 makes a hardlink to ``linkname``.
    """
    if (
        len(path) <= 100
        and len(linkname) <= 100
        and inode.mtime_text is None
        and not inode.xattrs
        and 0 <= inode.uid < _MAX_ID
        and 0 <= inode.gid < _MAX_ID
        and size < _MAX_SIZE
        and 0 <= inode.mtime < _MAX_SIZE
        and len(inode.uname) <= 32
        and len(inode.gname) <= 32
        and kind not in (CHR, BLK)
    ):
        # The usual entry: every field fits ustar, so no PAX header.
        typeflag = b"1" if kind == -1 else _TYPEFLAG[kind]
        if _ctar is not None:
            return _ctar.ustar_header(
                path, inode.mode, inode.uid, inode.gid, size, inode.mtime,
                typeflag, linkname, inode.uname, inode.gname,
            )  # fmt: skip
        return _ustar_block(
            path, b"", inode.mode, inode.uid, inode.gid, size, inode.mtime,
            typeflag, linkname, inode.uname, inode.gname, 0, 0,
        )  # fmt: skip
    pax: list[tuple[bytes, bytes]] = []
    name_field, prefix_field = _split_name(path)
    if name_field is None:
        pax.append((b"path", path))
        name_field, prefix_field = path[:100], b""
    if len(linkname) > 100:
        pax.append((b"linkpath", linkname))
    mtime = inode.mtime
    if inode.mtime_text is not None:
        pax.append((b"mtime", inode.mtime_text))
        mtime = min(max(mtime, 0), 8**11 - 1)
    uid_field = _number(inode.uid, 8, b"uid", pax)
    gid_field = _number(inode.gid, 8, b"gid", pax)
    size_field = _number(size, 12, b"size", pax)
    mtime_field = _number(mtime, 12, b"mtime", pax)
    if len(inode.uname) > 32:
        pax.append((b"uname", inode.uname))
    if len(inode.gname) > 32:
        pax.append((b"gname", inode.gname))
    if inode.xattrs:
        for key in sorted(inode.xattrs):
            pax.append((b"SCHILY.xattr." + key, inode.xattrs[key]))
    typeflag = b"1" if kind == -1 else _TYPEFLAG[kind]
    devices = kind in (CHR, BLK)
    block = _ustar_block(
        name_field,
        prefix_field,
        inode.mode,
        uid_field,
        gid_field,
        size_field,
        mtime_field,
        typeflag,
        linkname[:100],
        inode.uname[:32],
        inode.gname[:32],
        inode.devmajor if devices else 0,
        inode.devminor if devices else 0,
    )
    if not pax:
        return block
    return _pax_header(pax) + block


def _split_name(path: bytes) -> tuple[bytes | None, bytes]:
    """Fit ``path`` into ustar's name (100) and prefix (155) fields, if it can."""
    if len(path) <= 100:
        return path, b""
    if len(path) > 256:
        return None, b""
    # Split at a slash so that the prefix is at most 155 bytes and the rest
    # at most 100; a trailing slash belongs to the name part.
    cut = path.rfind(b"/", 0, 156)
    while cut > 0:
        if len(path) - cut - 1 <= 100 and path[cut + 1 :]:
            return path[cut + 1 :], path[:cut]
        cut = path.rfind(b"/", 0, cut)
    return None, b""


def _number(value: int, width: int, key: bytes, pax: list[tuple[bytes, bytes]]) -> int:
    """Return ``value`` if it fits the octal field, else 0 plus a PAX record."""
    if 0 <= value < 8 ** (width - 1):
        return value
    pax.append((key, str(value).encode()))
    return 0 if value < 0 else min(value, 8 ** (width - 1) - 1)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _ustar_block(
    name: bytes,
    prefix: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes,
    uname: bytes,
    gname: bytes,
    devmajor: int,
    devminor: int,
) -> bytes:
    block = _USTAR.pack(
        name,
        b"%07o\0" % (mode & 0o7777),
        b"%07o\0" % uid,
        b"%07o\0" % gid,
        b"%011o\0" % size,
        b"%011o\0" % mtime,
        b"        ",  # the checksum counts its own field as eight spaces
        typeflag,
        linkname,
        b"ustar\x0000",
        uname,
        gname,
        b"%07o\0" % devmajor,
        b"%07o\0" % devminor,
        prefix,
    )
    return block[:148] + b"%06o\0 " % _byte_sum(block) + block[156:]


def _byte_sum(block: bytes) -> int:
    """Return the sum of the bytes of a 512-byte block.

    Adler-32 keeps 1 + the byte sum modulo 65521 in its low 16 bits, and zlib
    computes it about ten times faster than ``sum()`` iterates. The value is
    exact when the sum stays below 65521: always for ASCII (at most
    127 * 512), and for any 256-byte half (at most 255 * 256).
    """
    if block.isascii():
        return (adler32(block) & 0xFFFF) - 1
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _pax_header(records: list[tuple[bytes, bytes]]) -> bytes:
    if any(_not_utf8(value) for key, value in records if key in (b"path", b"linkpath")):
        records = [(b"hdrcharset", b"BINARY"), *records]
    body = b"".join(_pax_record(key, value) for key, value in records)
    block = _ustar_block(
        b"././@PaxHeader", b"", 0o644, 0, 0, len(body), 0, b"x", b"", b"", b"", 0, 0
    )
    padding = -len(body) % _BLOCK
    return block + body + bytes(padding)


def _pax_record(key: bytes, value: bytes) -> bytes:
    payload = b" " + key + b"=" + value + b"\n"
    length = len(payload) + 1
    while len(str(length)) + len(payload) != length:
        length = len(str(length)) + len(payload)
    return str(length).encode() + payload


def _not_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
