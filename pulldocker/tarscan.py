"""Read tar headers from a file region without reading member data.

The reader understands ustar, GNU (long names ``L``/``K``, old sparse ``S``)
and PAX (``path``, ``linkpath``, ``size``, ``uid``, ``gid``, ``mtime``,
``SCHILY.xattr.*``, GNU sparse formats 0.0, 0.1 and 1.0) headers. Names and
link targets stay bytes, so names that are not UTF-8 survive unchanged.

Each ``TarEntry`` records where its data starts in the file, so a later pass
can copy the data with ``os.copy_file_range`` instead of reading it through
Python. A zero block, or the end of the region at a header boundary, ends the
archive, because tars without the two-block trailer are common in layers.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from zlib import adler32

from .errors import InvalidInputError, UnsupportedError

try:
    from . import _ctar as _ctar  # re-exported for tarwrite
except ImportError:  # not built: the Python code does all the work
    _ctar = None  # type: ignore[assignment]
if os.environ.get("PULLDOCKER_PURE_PYTHON"):
    _ctar = None  # type: ignore[assignment]

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

_PAX_TIME = re.compile(rb"-?[0-9]{1,20}(\.[0-9]{1,9})?")
_SCAN_BATCH = 1024  # members per call into the compiled reader
_MAX_META_SIZE = 16 * 1024 * 1024  # cap on one long name or PAX header
_ZERO_BLOCK = bytes(BLOCK)
# The ustar header fields, skipping the checksum (148:156) and the padding
# (500:512): name, mode with uid and gid, size, mtime, typeflag, linkname,
# magic with version, uname, gname, devmajor with devminor, prefix.
_USTAR = struct.Struct("100s24s12s12s8xc100s8s32s32s16s155s12x")


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


_new_entry = object.__new__  # the parser sets every field itself


class _Window:
    """A read-ahead buffer over ``fd`` for the region [start, end)."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd = fd
        self.end = end
        self.buf_start = start
        self.buf = b""

    def read(self, pos: int, length: int) -> bytes:
        """Return up to ``length`` bytes at ``pos``; short only at the end."""
        offset = pos - self.buf_start
        if offset >= 0 and offset + length <= len(self.buf):
            return self.buf[offset : offset + length]
        length = min(length, self.end - pos)
        if length <= 0:
            return b""
        want = min(max(length, _READ_AHEAD), self.end - pos)
        data = os.pread(self.fd, want, pos)
        self.buf_start, self.buf = pos, data
        return data[:length]


def iter_entries(
    fd: int, start: int, length: int, *, label: str = "tar"
) -> Iterator[TarEntry]:
    """Yield the members of the tar stored at ``fd`` in [start, start+length).

    PAX, GNU long-name and sparse headers are folded into the member they
    describe. ``label`` names the layer or archive in error messages. The
    compiled reader, when it is built, reads the common members, and each
    member it leaves is read here.

    Raises:
        InvalidInputError: a header has a bad checksum, a field is malformed
            or a member's data runs past the end of the region.
        UnsupportedError: a member has a type that cannot be part of a rootfs.
    """
    end = start + length
    window = _Window(fd, start, end)
    pos = start
    # The compiled reader uses 64-bit offsets, so regions past 2**60 are read here.
    compiled = _ctar if start >= 0 and end < 2**60 else None
    while True:
        if compiled is not None:
            entries, pos, status = compiled.scan(fd, pos, end, _SCAN_BATCH, TarEntry)
            yield from entries
            if status == compiled.DONE:
                return
            if status == compiled.MORE:
                continue
        entry, pos = _read_member(window, pos, start, label)
        if entry is None:
            return
        yield entry


def _read_member(
    window: _Window, pos: int, start: int, label: str
) -> tuple[TarEntry | None, int]:
    """Read the member whose headers start at ``pos``.

    Returns the member, or None at the end of the archive, and the position
    of the next header.
    """
    end = window.end
    long_name: bytes | None = None
    long_link: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        block = window.read(pos, BLOCK)
        if len(block) < BLOCK:
            if not block.strip(b"\0"):
                return None, pos  # no trailer: the region ended at a header boundary
            raise InvalidInputError(
                f"{label}: truncated tar header at byte {pos - start}"
            )
        if block == _ZERO_BLOCK:
            return None, pos
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
                # Docker and containerd ignore global headers (Go's archive/tar
                # hands them over as separate entries), so they change nothing.
                _parse_pax(data, label)
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
        if pax:
            _apply_pax(entry, pax, window, label)
        long_name = long_link = None
        if pax:
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
            pos = entry.offset + (entry.size + BLOCK - 1) // BLOCK * BLOCK
        if kind in _IGNORED_TYPES:
            continue
        if kind not in _MEMBER_TYPES and kind != _GNU_SPARSE:
            raise UnsupportedError(
                f"{label}: member {entry.name!r} has unsupported tar type {kind!r}"
            )
        return entry, pos


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _verify_checksum(block: bytes, where: int, label: str) -> None:
    field = block[148:156]
    try:
        stored = _parse_number(field)
    except ValueError:
        stored = -1
    # The checksum field itself counts as eight spaces (8 * 32 = 256).
    unsigned = _byte_sum(block) - sum(field) + 256
    if stored == unsigned:
        return
    # Some old writers summed signed chars.
    signed = sum((b - 256 if b > 127 else b) for b in block[:148] + block[156:]) + 256
    if stored != signed:
        raise InvalidInputError(f"{label}: bad tar header checksum at byte {where}")


def _byte_sum(block: bytes) -> int:
    """Return the sum of the bytes of a 512-byte block.

    Adler-32 keeps 1 + the byte sum modulo 65521 in its low 16 bits, and zlib
    computes it about ten times faster than ``sum()`` iterates. The value is exact
    when the sum stays below 65521: always for ASCII (at most 127 * 512), and
    for any 256-byte half (at most 255 * 256).
    """
    if block.isascii():
        return (adler32(block) & 0xFFFF) - 1
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _parse_number(field: bytes) -> int:
    """Parse an octal tar number field, or a base-256 one (high bit set)."""
    try:
        # The usual field: octal digits ended by NUL or space.
        return int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        pass
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
    (
        name,
        mode_owner,
        size,
        mtime,
        kind,
        linkname,
        magic,
        uname,
        gname,
        devices,
        prefix,
    ) = _USTAR.unpack(block)
    _verify_checksum(block, where, label)
    entry = _new_entry(TarEntry)
    try:
        entry.mode, entry.uid, entry.gid = _cached_numbers(_OWNERS, mode_owner)
        entry.devmajor, entry.devminor = _cached_numbers(_DEVICES, devices)
        (entry.mtime,) = _cached_numbers(_MTIMES, mtime, 12)
        entry.size = _parse_number(size)
    except ValueError:
        raise InvalidInputError(
            f"{label}: malformed numeric field in tar header at byte {where}"
        ) from None
    entry.mode &= 0o7777
    if entry.size < 0:
        raise InvalidInputError(f"{label}: negative member size at byte {where}")
    entry.type = kind
    name = name.partition(b"\0")[0]
    if prefix[0] and (magic == b"ustar\x0000" or magic[:6] == b"ustar\0"):
        name = prefix.partition(b"\0")[0] + b"/" + name
    entry.name = name
    entry.linkname = linkname.partition(b"\0")[0]
    entry.uname = uname.partition(b"\0")[0]
    entry.gname = gname.partition(b"\0")[0]
    entry.mtime_text = None
    entry.xattrs = None
    entry.offset = 0
    entry.sparse = None
    entry.real_size = 0
    return entry


# Mode and owner, device numbers and mtimes repeat from header to header, so
# their parsed values are kept by field bytes. Each cache is emptied when full.
_OWNERS: dict[bytes, tuple[int, ...]] = {}
_DEVICES: dict[bytes, tuple[int, ...]] = {}
_MTIMES: dict[bytes, tuple[int, ...]] = {}
_CACHE_SIZE = 4096


def _cached_numbers(
    cache: dict[bytes, tuple[int, ...]], fields: bytes, width: int = 8
) -> tuple[int, ...]:
    """Parse the ``width``-byte number fields that make up ``fields``."""
    values = cache.get(fields)
    if values is None:
        values = tuple(
            _parse_number(fields[i : i + width]) for i in range(0, len(fields), width)
        )
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[fields] = values
    return values


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
                entry.mtime, entry.mtime_text = _parse_pax_time(value)
            elif key.startswith(b"SCHILY.xattr."):
                if entry.xattrs is None:
                    entry.xattrs = {}
                entry.xattrs[key[13:]] = value
    except ValueError:
        raise InvalidInputError(
            f"{label}: malformed PAX value for member {entry.name!r}"
        ) from None
    if entry.size < 0 or entry.uid < 0 or entry.gid < 0:
        raise InvalidInputError(
            f"{label}: negative size or owner in PAX header of {entry.name!r}"
        )
    if b"GNU.sparse.major" in records or b"GNU.sparse.map" in records:
        _apply_pax_sparse(entry, records, window, label)


def _parse_pax_time(value: bytes) -> tuple[int, bytes | None]:
    """Parse a PAX time such as ``1700000000.123``; keep the text if fractional."""
    if not _PAX_TIME.fullmatch(value):
        raise ValueError("malformed time")
    seconds, dot, _ = value.partition(b".")
    return int(seconds), (value if dot else None)


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
