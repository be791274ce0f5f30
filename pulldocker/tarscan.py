"""Read tar headers from a file region without reading member data.

The reader understands ustar, GNU (long names ``L``/``K``, old sparse ``S``)
and PAX (``path``, ``linkpath``, ``size``, ``uid``, ``gid``, ``mtime``,
``SCHILY.xattr.*``, GNU sparse formats 0.0, 0.1 and 1.0) headers. Names and
link targets stay bytes, so names that are not UTF-8 survive unchanged.

Each ``TarEntry`` records where its data starts in the file, so a later pass
can copy the data with ``os.copy_file_range`` instead of reading it through
Python. A zero block, or the end of the region at a header boundary, ends the
archive; tars without the two-block trailer are common in image layers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from .errors import InvalidInputError, UnsupportedError

__all__ = [
    "BLOCK",
    "TarEntry",
    "iter_entries",
]

BLOCK = 512
_READ_AHEAD = 64 * 1024

# Type flags, as bytes of length 1.
REGULAR_TYPES = frozenset({b"0", b"\0", b"7"})
HARDLINK = b"1"
SYMLINK = b"2"
CHARDEV = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
_PAX_LOCAL = b"x"
_PAX_GLOBAL = b"g"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"
_GNU_SPARSE = b"S"
_IGNORED_TYPES = frozenset({b"V"})  # volume labels carry no file
_HEADER_ONLY_TYPES = frozenset({HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO})
_MEMBER_TYPES = REGULAR_TYPES | {HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO}

_MAX_META_SIZE = 16 * 1024 * 1024  # cap on one long name or PAX header


class TarEntry:
    """One tar member: its header fields and where its data sits in the file.

    ``sparse`` is None for ordinary members. For sparse members it lists
    ``(offset_in_file_content, length, offset_in_source)`` segments and
    ``real_size`` is the size of the file they describe; the holes are zeros.
    """

    __slots__ = (
        "devmajor",
        "devminor",
        "gid",
        "gname",
        "linkname",
        "mode",
        "mtime",
        "mtime_text",
        "name",
        "offset",
        "real_size",
        "size",
        "sparse",
        "type",
        "uid",
        "uname",
        "xattrs",
    )

    def __init__(self) -> None:
        self.name = b""
        self.type = b"0"
        self.mode = 0
        self.uid = 0
        self.gid = 0
        self.uname = b""
        self.gname = b""
        self.mtime = 0
        self.mtime_text: bytes | None = None
        self.size = 0
        self.linkname = b""
        self.devmajor = 0
        self.devminor = 0
        self.xattrs: dict[bytes, bytes] | None = None
        self.offset = 0
        self.sparse: list[tuple[int, int, int]] | None = None
        self.real_size = 0

    def __repr__(self) -> str:
        return f"<TarEntry {self.name!r} type={self.type!r} size={self.size}>"


class _Window:
    """A read-ahead buffer over ``fd`` for the region [start, end)."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd = fd
        self.end = end
        self.buf_start = start
        self.buf = b""

    def read(self, pos: int, length: int) -> bytes:
        """Return up to ``length`` bytes at ``pos``; short only at the end."""
        length = min(length, self.end - pos)
        if length <= 0:
            return b""
        offset = pos - self.buf_start
        if offset >= 0 and offset + length <= len(self.buf):
            return self.buf[offset : offset + length]
        want = min(max(length, _READ_AHEAD), self.end - pos)
        data = os.pread(self.fd, want, pos)
        self.buf_start, self.buf = pos, data
        return data[:length]


def iter_entries(
    fd: int, start: int, length: int, *, label: str = "tar"
) -> Iterator[TarEntry]:
    """Yield the members of the tar stored at ``fd`` in [start, start+length).

    PAX, GNU long-name and sparse headers are folded into the member they
    describe. ``label`` names the layer or archive in error messages.

    Raises:
        InvalidInputError: a header has a bad checksum, a field is malformed
            or a member's data runs past the end of the region.
        UnsupportedError: a member has a type that cannot be part of a rootfs.
    """
    end = start + length
    window = _Window(fd, start, end)
    pos = start
    long_name: bytes | None = None
    long_link: bytes | None = None
    pax: dict[bytes, bytes] = {}
    global_pax: dict[bytes, bytes] = {}
    while True:
        block = window.read(pos, BLOCK)
        if not block:
            return  # no trailer: the region ended at a header boundary
        if len(block) < BLOCK:
            if not block.strip(b"\0"):
                return
            raise InvalidInputError(
                f"{label}: truncated tar header at byte {pos - start}"
            )
        if block == bytes(BLOCK):
            return
        _verify_checksum(block, pos - start, label)
        entry = _parse_header(block, pos - start, label)
        data_start = pos + BLOCK
        kind = entry.type
        if kind in (_PAX_LOCAL, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
            if entry.size > _MAX_META_SIZE:
                raise InvalidInputError(
                    f"{label}: extended header of {entry.size} bytes is too large"
                )
            data = window.read(data_start, entry.size)
            if len(data) < entry.size:
                raise InvalidInputError(f"{label}: truncated extended header")
            pos = data_start + _padded(entry.size)
            if kind == _PAX_LOCAL:
                pax.update(_parse_pax(data, label))
            elif kind == _PAX_GLOBAL:
                global_pax.update(_parse_pax(data, label))
            elif kind == _GNU_LONGNAME:
                long_name = data.split(b"\0", 1)[0]
            else:
                long_link = data.split(b"\0", 1)[0]
            continue
        entry.offset = data_start
        if long_name is not None:
            entry.name = long_name
        if long_link is not None:
            entry.linkname = long_link
        if global_pax or pax:
            records = {**global_pax, **pax} if global_pax else pax
            _apply_pax(entry, records, window, label)
        long_name = long_link = None
        pax = {}
        if kind in _HEADER_ONLY_TYPES:
            entry.size = 0  # as in Go's archive/tar: these types carry no data
        if kind == _GNU_SPARSE:
            pos = _read_gnu_sparse(window, block, entry, data_start, label)
            entry.type = b"0"
        else:
            if entry.offset + entry.size > end:
                raise InvalidInputError(
                    f"{label}: member {entry.name!r} declares {entry.size} bytes "
                    "but the tar ends first (truncated layer?)"
                )
            pos = entry.offset + _padded(entry.size)
        if kind in _IGNORED_TYPES:
            continue
        if kind not in _MEMBER_TYPES and kind != _GNU_SPARSE:
            raise UnsupportedError(
                f"{label}: member {entry.name!r} has unsupported tar type {kind!r}"
            )
        yield entry


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _verify_checksum(block: bytes, where: int, label: str) -> None:
    stored_field = block[148:156]
    try:
        stored = _parse_number(stored_field)
    except ValueError:
        stored = -1
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    if stored == unsigned:
        return
    # Some old writers summed signed chars.
    signed = sum((b - 256 if b > 127 else b) for b in block[:148] + block[156:]) + 256
    if stored != signed:
        raise InvalidInputError(f"{label}: bad tar header checksum at byte {where}")


def _parse_number(field: bytes) -> int:
    """Parse an octal tar number field, or a base-256 one (high bit set)."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:  # negative base-256
            value -= 256 ** (len(field) - 1)
        elif field[0] != 0x80:
            raise ValueError("bad base-256 field")
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    return int(text, 8)


def _parse_header(block: bytes, where: int, label: str) -> TarEntry:
    entry = TarEntry()
    try:
        entry.mode = _parse_number(block[100:108]) & 0o7777
        entry.uid = _parse_number(block[108:116])
        entry.gid = _parse_number(block[116:124])
        entry.size = _parse_number(block[124:136])
        entry.mtime = _parse_number(block[136:148])
        entry.devmajor = _parse_number(block[329:337])
        entry.devminor = _parse_number(block[337:345])
    except ValueError:
        raise InvalidInputError(
            f"{label}: malformed numeric field in tar header at byte {where}"
        ) from None
    if entry.size < 0:
        raise InvalidInputError(f"{label}: negative member size at byte {where}")
    entry.type = block[156:157]
    name = block[0:100].split(b"\0", 1)[0]
    magic = block[257:265]
    if magic == b"ustar\x0000" or magic[:6] == b"ustar\0":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    entry.name = name
    entry.linkname = block[157:257].split(b"\0", 1)[0]
    entry.uname = block[265:297].split(b"\0", 1)[0]
    entry.gname = block[297:329].split(b"\0", 1)[0]
    return entry


def _parse_pax(data: bytes, label: str) -> dict[bytes, bytes]:
    """Parse PAX records ``"%d %s=%s\\n"``; values stay bytes."""
    records: dict[bytes, bytes] = {}
    pos = 0
    sparse_pairs: list[bytes] = []
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise InvalidInputError(f"{label}: malformed PAX record")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise InvalidInputError(f"{label}: malformed PAX record length") from None
        if length <= 0 or pos + length > len(data) or data[pos + length - 1] != 0x0A:
            raise InvalidInputError(f"{label}: malformed PAX record")
        record = data[space + 1 : pos + length - 1]
        key, sep, value = record.partition(b"=")
        if not sep:
            raise InvalidInputError(f"{label}: PAX record without '='")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            sparse_pairs.append(value)  # format 0.0 repeats these keys
        else:
            records[key] = value
        pos += length
    if sparse_pairs:
        records[b"GNU.sparse.map"] = b",".join(sparse_pairs)
    return records


def _apply_pax(
    entry: TarEntry, records: dict[bytes, bytes], window: _Window, label: str
) -> None:
    try:
        for key, value in records.items():
            if key == b"path":
                entry.name = value
            elif key == b"linkpath":
                entry.linkname = value
            elif key == b"size":
                entry.size = int(value)
            elif key == b"uid":
                entry.uid = int(value)
            elif key == b"gid":
                entry.gid = int(value)
            elif key == b"uname":
                entry.uname = value
            elif key == b"gname":
                entry.gname = value
            elif key == b"mtime":
                entry.mtime = int(float(value)) if b"." in value else int(value)
                if b"." in value:
                    entry.mtime_text = value
            elif key.startswith(b"SCHILY.xattr."):
                if entry.xattrs is None:
                    entry.xattrs = {}
                entry.xattrs[key[13:]] = value
    except ValueError:
        raise InvalidInputError(
            f"{label}: malformed PAX value for member {entry.name!r}"
        ) from None
    if b"GNU.sparse.major" in records or b"GNU.sparse.map" in records:
        _apply_pax_sparse(entry, records, window, label)


def _apply_pax_sparse(
    entry: TarEntry, records: dict[bytes, bytes], window: _Window, label: str
) -> None:
    try:
        if b"GNU.sparse.name" in records:
            entry.name = records[b"GNU.sparse.name"]
        real = records.get(b"GNU.sparse.realsize") or records.get(b"GNU.sparse.size")
        entry.real_size = int(real) if real is not None else entry.size
        if records.get(b"GNU.sparse.major") == b"1":
            # Format 1.0: the map is a text prefix of the data, in 512-byte blocks.
            numbers, used = _read_sparse_prefix(window, entry.offset, entry.size)
            entry.offset += used
            entry.size -= used
        else:
            numbers = [int(x) for x in records[b"GNU.sparse.map"].split(b",") if x]
    except (ValueError, KeyError):
        raise InvalidInputError(
            f"{label}: malformed sparse map for member {entry.name!r}"
        ) from None
    entry.sparse = _segments(numbers, entry.offset, entry.real_size, label)


def _read_sparse_prefix(
    window: _Window, start: int, size: int
) -> tuple[list[int], int]:
    """Read the decimal map that starts a format 1.0 sparse member's data."""
    data = window.read(start, min(size, _MAX_META_SIZE))
    lines = data.split(b"\n")
    count = int(lines[0])
    if count < 0 or count * 2 + 1 > len(lines) - 1:
        raise ValueError("sparse map longer than the member")
    numbers = [int(line) for line in lines[1 : 1 + 2 * count]]
    text_length = sum(len(line) + 1 for line in lines[: 1 + 2 * count])
    return numbers, _padded(text_length)


def _segments(
    numbers: list[int], data_offset: int, real_size: int, label: str
) -> list[tuple[int, int, int]]:
    if len(numbers) % 2:
        raise InvalidInputError(f"{label}: sparse map with an odd number of values")
    segments = []
    source = data_offset
    previous_end = 0
    for i in range(0, len(numbers), 2):
        offset, length = numbers[i], numbers[i + 1]
        if offset < previous_end or length < 0 or offset + length > real_size:
            raise InvalidInputError(f"{label}: sparse map out of order or out of range")
        segments.append((offset, length, source))
        source += length
        previous_end = offset + length
    return segments


def _read_gnu_sparse(
    window: _Window, block: bytes, entry: TarEntry, data_start: int, label: str
) -> int:
    """Read an old GNU sparse header (type ``S``); return the next header's position."""
    numbers: list[int] = []
    try:
        numbers.extend(_sparse_pairs(block[386:482], 4))
        extended = block[482]
        entry.real_size = _parse_number(block[483:495])
        pos = data_start
        while extended:
            ext = window.read(pos, BLOCK)
            if len(ext) < BLOCK:
                raise InvalidInputError(f"{label}: truncated sparse header")
            numbers.extend(_sparse_pairs(ext[:504], 21))
            extended = ext[504]
            pos += BLOCK
    except ValueError:
        raise InvalidInputError(f"{label}: malformed GNU sparse header") from None
    entry.offset = pos
    entry.sparse = _segments(numbers, pos, entry.real_size, label)
    if pos + entry.size > window.end:
        raise InvalidInputError(f"{label}: sparse member {entry.name!r} is truncated")
    return pos + _padded(entry.size)


def _sparse_pairs(area: bytes, count: int) -> list[int]:
    numbers = []
    for i in range(count):
        offset_field = area[i * 24 : i * 24 + 12]
        if not offset_field.strip(b"\0"):
            break
        numbers.append(_parse_number(offset_field))
        numbers.append(_parse_number(area[i * 24 + 12 : i * 24 + 24]))
    return numbers
