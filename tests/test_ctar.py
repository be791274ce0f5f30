"""Differential tests of the compiled tar header reader and writer.

``pulldocker._ctar`` reads the common tar headers in C and leaves every other
member to the Python reader in ``tarscan``. The two must agree: for any bytes,
``iter_entries`` yields the same entries (every slot equal) and ends with the
same exception type and message whether or not the compiled reader is used.
``_ctar.ustar_header`` must write the same block as ``tarwrite._ustar_block``
for every input that fits a ustar header, and raise ValueError for the rest.

CI runs a short, derandomized pass. A longer random run is::

    PULLDOCKER_FUZZ_EXAMPLES=50000 python -m pytest tests/test_ctar.py
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import os
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
import zstandard
from fuzzing import fuzz_settings
from harness import PUBLIC_FIXTURES, REPO
from hostile import END, pax_member, raw_header, raw_member
from hypothesis import assume, example, given
from hypothesis import strategies as st

from pulldocker import tarscan, tarwrite
from pulldocker.tarscan import TarEntry

ctar = pytest.importorskip("pulldocker._ctar")

SHORT_PASS = 150  # examples per target in CI
BLOCK = 512
MAX_ID = 8**7  # the first uid or gid that does not fit the 8-byte octal field
MAX_SIZE = 8**11  # the same for the 12-byte size and mtime fields


# -- running both readers -------------------------------------------------------


@dataclass
class Outcome:
    """The entries ``iter_entries`` yielded, as slot dicts, and its final error."""

    entries: list[dict[str, Any]]
    error: tuple[str, str] | None


def entry_fields(entry: TarEntry) -> dict[str, Any]:
    return {slot: getattr(entry, slot) for slot in TarEntry.__slots__}


@contextlib.contextmanager
def stored(data: bytes, prefix: bytes = b"", suffix: bytes = b"") -> Iterator[int]:
    """Yield a descriptor of a file that contains ``prefix + data + suffix``."""
    with tempfile.TemporaryFile(prefix="pulldocker-ctar-") as handle:
        handle.write(prefix + data + suffix)
        handle.flush()
        yield handle.fileno()


def read_outcome(
    data: bytes, compiled: ModuleType | None, prefix: bytes = b"", suffix: bytes = b""
) -> Outcome:
    """Run ``iter_entries`` over ``data`` with ``compiled`` as the fast path.

    ``data`` sits between ``prefix`` and ``suffix`` in the file, so a reader
    that strays outside its region reads bytes that are not part of the tar.
    Any exception is recorded, because the readers must raise the same one.
    """
    # Each member takes at least one block, so more entries than this means
    # that a reader loops.
    max_entries = len(data) // BLOCK + 1
    entries: list[dict[str, Any]] = []
    error = None
    with (
        stored(data, prefix, suffix) as fd,
        mock.patch.object(tarscan, "_ctar", compiled),
    ):
        found = tarscan.iter_entries(fd, len(prefix), len(data), label="layer")
        try:
            for entry in itertools.islice(found, max_entries + 1):
                entries.append(entry_fields(entry))
        except Exception as caught:  # any type, because both must raise the same
            error = (type(caught).__name__, str(caught))
    assert len(entries) <= max_entries, "more members than blocks: the reader loops"
    return Outcome(entries, error)


def assert_readers_agree(
    data: bytes, prefix: bytes = b"", suffix: bytes = b""
) -> Outcome:
    """Assert that both readers give the same outcome for ``data``, and return it."""
    compiled = read_outcome(data, ctar, prefix, suffix)
    pure = read_outcome(data, None, prefix, suffix)
    assert compiled.error == pure.error
    assert compiled.entries == pure.entries
    return pure


# -- fixtures: real image archives and their layers -----------------------------


FIXTURE_ROOTS = (REPO / "fixtures", PUBLIC_FIXTURES)


def fixture_files() -> list[Path]:
    files: list[Path] = []
    for root in FIXTURE_ROOTS:
        if root.is_dir():
            files.extend(sorted(path for path in root.rglob("*") if path.is_file()))
    return files


def decompressed(data: bytes) -> bytes:
    """Return ``data`` decompressed when it is gzip or zstd, else unchanged."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:4] == b"\x28\xb5\x2f\xfd":
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError):
        pass
    return data


def nested_tars(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """Yield ``data`` and every regular member inside it, down to layer tars."""
    data = decompressed(data)
    yield data
    if depth == 2:
        return
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            contents = []
            for member in tar:
                reader = tar.extractfile(member) if member.isfile() else None
                if reader is not None:
                    contents.append(reader.read())
    except (tarfile.TarError, EOFError, OSError):
        return
    for content in contents:
        yield from nested_tars(content, depth + 1)


def fixture_id(path: Path) -> str:
    for root in FIXTURE_ROOTS:
        if path.is_relative_to(root):
            return f"{root.name}/{path.relative_to(root)}"
    return str(path)


@pytest.mark.parametrize("path", fixture_files(), ids=fixture_id)
def test_fixture_layers_readers_agree(path: Path) -> None:
    """Every fixture archive, and each tar inside it, reads the same both ways."""
    for data in nested_tars(path.read_bytes()):
        assert_readers_agree(data)


# -- generated tars -------------------------------------------------------------


def _binary_text(raw: bytes) -> str:
    """Return ``raw`` as the str that tarfile writes back as the same bytes."""
    return raw.decode("utf-8", "surrogateescape")


name_segments = st.text(
    st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=60
) | st.binary(min_size=1, max_size=40).map(
    lambda raw: _binary_text(raw.replace(b"/", b"_"))
)
names = st.lists(name_segments, min_size=1, max_size=6).map("/".join)
owner_names = st.text(st.characters(codec="utf-8"), max_size=40) | st.binary(
    max_size=40
).map(_binary_text)
ids = st.integers(0, 70_000) | st.integers(-300, 2**57)
mtimes = (
    st.integers(0, 2**33)
    | st.integers(-(2**40), 2**60)
    | st.floats(-1e12, 1e12, allow_nan=False)
)
pax_extras = st.dictionaries(
    st.sampled_from(["comment", "atime", "ctime"])
    | st.text(
        st.characters(codec="ascii", exclude_characters="= \n\0"), max_size=12
    ).map(lambda key: "SCHILY.xattr.user." + key),
    st.text(st.characters(codec="utf-8"), max_size=30)
    | st.binary(max_size=30).map(_binary_text),
    max_size=3,
)
TARFILE_TYPES = [
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.CONTTYPE,
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
]
TAR_FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


@st.composite
def tarfile_member(draw: st.DrawFn, tar_format: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(draw(names))
    info.type = draw(st.sampled_from(TARFILE_TYPES))
    info.mode = draw(st.integers(0, 0o7777) | st.integers(0, 8**7 - 1))
    info.uid = draw(ids)
    info.gid = draw(ids)
    info.uname = draw(owner_names)
    info.gname = draw(owner_names)
    info.mtime = draw(mtimes)
    if info.type in (tarfile.LNKTYPE, tarfile.SYMTYPE):
        info.linkname = draw(names)
    if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor = draw(st.integers(0, 2**24))
        info.devminor = draw(st.integers(0, 2**24))
    data = b""
    # One in ten header-only members also declares data. Both readers skip no
    # data for these types, so they read that data as headers.
    if info.isreg() or draw(st.integers(0, 9)) == 0:
        data = draw(st.binary(max_size=1500))
    info.size = len(data)
    if tar_format == tarfile.PAX_FORMAT:
        info.pax_headers = draw(pax_extras)
    return info, data


@st.composite
def tarfile_chunk(draw: st.DrawFn) -> bytes:
    """Members written by tarfile in one format, without the end-of-archive blocks."""
    tar_format = draw(st.sampled_from(TAR_FORMATS))
    global_records = {}
    if tar_format == tarfile.PAX_FORMAT:
        global_records = draw(pax_extras)
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer,
        mode="w",
        format=tar_format,
        encoding="utf-8",
        errors="surrogateescape",
        pax_headers=global_records,
    ) as tar:
        members = st.lists(tarfile_member(tar_format), min_size=1, max_size=5)
        for info, data in draw(members):
            try:
                tar.addfile(info, io.BytesIO(data))
            except (ValueError, UnicodeError):
                assume(False)  # a field does not fit this format
        return buffer.getvalue()[: tar.offset]


def pax_body(records: list[tuple[bytes, bytes]]) -> bytes:
    """Return ``records`` as PAX records ``"%d key=value\\n"``, keys repeated or not."""
    body = b""
    for key, value in records:
        payload = b" " + key + b"=" + value + b"\n"
        length = len(payload) + 1
        while len(str(length)) + len(payload) != length:
            length = len(str(length)) + len(payload)
        body += str(length).encode() + payload
    return body


PAX_KEYS = [
    b"path",
    b"linkpath",
    b"size",
    b"uid",
    b"gid",
    b"uname",
    b"gname",
    b"mtime",
    b"hdrcharset",
    b"comment",
    b"SCHILY.xattr.user.a",
    b"SCHILY.xattr.",
    b"GNU.sparse.name",
    b"GNU.sparse.major",
    b"GNU.sparse.map",
    b"GNU.sparse.offset",
]
PAX_VALUES = [
    b"",
    b"0",
    b"7",
    b"-1",
    b"+7",
    b" 7",
    b"7 ",
    b"1_0",
    b"0x10",
    b"1.5",
    b"-1.5",
    b"-0.5",
    b"1.",
    b".5",
    b"1.0123456789",
    b"1e3",
    b"999999999999999999",
    b"9999999999999999999",
    b"99999999999999999999",
    b"\xff\xfe",
    b"a=b",
    b"a\nb",
    b"a\0b",
]
pax_values = st.sampled_from(PAX_VALUES) | st.binary(max_size=20)
META_TYPES = [b"x", b"x", b"L", b"K", b"g"]
MEMBER_TYPES = [b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6"]
ODD_TYPES = [b"V", b"S", b"g", b"x", b"Z"]


@st.composite
def hand_member(draw: st.DrawFn) -> bytes:
    """A hand-built member with types and PAX records that tarfile never writes."""
    data = b""
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(META_TYPES))
        if kind in (b"x", b"g"):
            records = st.tuples(st.sampled_from(PAX_KEYS), pax_values)
            body = pax_body(draw(st.lists(records, max_size=5)))
        else:
            body = draw(names).encode("utf-8", "surrogateescape") + b"\0"
        data += raw_member(b"././@Meta", body, kind=kind)
    name = draw(st.binary(min_size=1, max_size=100))
    kind = draw(st.sampled_from(MEMBER_TYPES) | st.sampled_from(ODD_TYPES))
    content = b""
    # One in ten header-only members also declares data, which both readers
    # then read as headers.
    if kind in (b"0", b"\0", b"7") or draw(st.integers(0, 9)) == 0:
        content = draw(st.binary(max_size=700))
    return data + raw_member(name, content, kind=kind)


@st.composite
def generated_tar(draw: st.DrawFn) -> bytes:
    """Members from tarfile and by hand, and an end of archive that may be missing.

    The end is both zero blocks, one, some garbage after them, or none. Without
    one, the last member's padding may be cut too, so the tar ends with its data.
    """
    chunks = draw(st.lists(tarfile_chunk() | hand_member(), min_size=1, max_size=3))
    data = b"".join(chunks)
    ending = draw(st.sampled_from(["two", "one", "garbage", "none", "unpadded"]))
    if ending == "unpadded":
        return data[: draw(st.integers(max(0, len(data) - BLOCK + 1), len(data)))]
    return data + {"two": END, "one": bytes(BLOCK), "garbage": END + b"junk"}.get(
        ending, b""
    )


# -- mutations ----------------------------------------------------------------

# Header fields as (start, end) byte offsets in a ustar header block.
FIELDS = {
    "name": (0, 100),
    "mode": (100, 108),
    "uid": (108, 116),
    "gid": (116, 124),
    "size": (124, 136),
    "mtime": (136, 148),
    "checksum": (148, 156),
    "typeflag": (156, 157),
    "linkname": (157, 257),
    "magic": (257, 265),
    "uname": (265, 297),
    "gname": (297, 329),
    "devmajor": (329, 337),
    "devminor": (337, 345),
    "prefix": (345, 500),
}
# Bytes that mean something to one of the parsers.
SPECIAL_BYTES = b"\0 0178-+.=\n\t_xgSLKV\x80\xff/"


@st.composite
def field_value(draw: st.DrawFn, width: int) -> bytes:
    """Field bytes as writers fill them, near misses of that, and random bytes."""
    number = draw(st.integers(0, 8**width))
    value = draw(
        st.sampled_from(
            [
                b"%0*o\0" % (width - 1, number % 8 ** (width - 1)),
                b"%*o " % (width - 1, number % 8 ** (width - 1)),
                b"%o" % number,
                b" %o\0" % number,
                b"\x80" + number.to_bytes(width, "big")[1:],
                b"\xff" * width,
                b" " * width,
                bytes(width),
                b"0o17\0",
                b"1_0\0",
                b"+17\0",
                b"-17\0",
                b"7\0" + b"7" * (width - 2),
                b"9\0",
            ]
        )
        | st.binary(min_size=width, max_size=width)
        | st.binary(max_size=width).map(lambda raw: raw.ljust(width, b"\0"))
    )
    return value[:width].ljust(width, b"\0")


def header_starts(data: bytes | bytearray) -> list[int]:
    """Offsets of the blocks that look like ustar or GNU headers."""
    return [
        offset
        for offset in range(0, len(data) - BLOCK + 1, BLOCK)
        if data[offset + 257 : offset + 262] == b"ustar"
    ]


def fix_checksum(data: bytearray, offset: int) -> None:
    block = data[offset : offset + BLOCK]
    block[148:156] = b" " * 8
    data[offset + 148 : offset + 156] = b"%06o\0 " % sum(block)


@st.composite
def mutated_tars(draw: st.DrawFn) -> list[bytes]:
    """A generated tar after each of a series of changes to its headers and bytes.

    A change overwrites a header field, sets a byte, cuts the tar short or
    appends bytes to it.
    """
    data = bytearray(draw(generated_tar()))
    stages = []
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["field", "field", "byte", "cut", "append"]))
        starts = header_starts(data)
        if action == "field" and starts:
            offset = draw(st.sampled_from(starts))
            begin, end = FIELDS[draw(st.sampled_from(sorted(FIELDS)))]
            data[offset + begin : offset + end] = draw(field_value(end - begin))
            # Mostly keep the checksum right, so the change reaches the parsers.
            if draw(st.integers(0, 3)):
                fix_checksum(data, offset)
        elif action == "byte" and data:
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.sampled_from(SPECIAL_BYTES) | st.integers(0, 255))
        elif action == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif action == "append":
            data += draw(
                st.binary(max_size=600)
                | st.just(raw_header(b"tail", size=10_000))
                | st.just(END)
            )
        stages.append(bytes(data))
    return stages


regions = st.tuples(
    st.sampled_from([b"", b"\xff" * 7, bytes(BLOCK)]),
    st.sampled_from([b"", raw_member(b"after-end", b"beyond"), b"\x01" * 300]),
)


@fuzz_settings(SHORT_PASS)
@given(generated_tar(), regions)
def test_generated_tars_readers_agree(data: bytes, region: tuple[bytes, bytes]) -> None:
    """Tars from tarfile (ustar, GNU, PAX) and by hand read the same both ways."""
    prefix, suffix = region
    assert_readers_agree(data, prefix, suffix)


@fuzz_settings(SHORT_PASS)
@given(mutated_tars(), regions)
def test_mutated_tars_readers_agree(
    stages: list[bytes], region: tuple[bytes, bytes]
) -> None:
    """Damaged headers, PAX records and truncated tars give the same outcome."""
    prefix, suffix = region
    for data in stages:
        assert_readers_agree(data, prefix, suffix)


# -- members the compiled reader leaves to Python -------------------------------


def gnu_member(name: str, uid: int, data: bytes = b"") -> bytes:
    """A GNU-format member whose uid needs a base-256 field."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.uid = uid
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()[: tar.offset]


def global_pax_member() -> bytes:
    body = pax_body([(b"comment", b"global"), (b"path", b"ignored")])
    return raw_member(b"pax_global_header", body, kind=b"g") + raw_member(b"after")


def old_gnu_sparse_member() -> bytes:
    """A type ``S`` member: 512 stored bytes at offset 0 of a 4096-byte file."""
    header = bytearray(raw_header(b"sparse", size=BLOCK, kind=b"S"))
    header[386:398] = b"%011o\0" % 0
    header[398:410] = b"%011o\0" % BLOCK
    header[483:495] = b"%011o\0" % 4096
    fix_checksum(header, 0)
    return bytes(header) + b"S" * BLOCK


def pax_sparse_member() -> bytes:
    """A PAX GNU sparse 1.0 member whose map starts its data."""
    data_map = b"1\n0\n512\n".ljust(BLOCK, b"\0")
    records = {
        b"GNU.sparse.major": b"1",
        b"GNU.sparse.minor": b"0",
        b"GNU.sparse.name": b"sparse",
        b"GNU.sparse.realsize": b"4096",
    }
    member = raw_member(b"GNUSparseFile.0/sparse", data_map + b"S" * BLOCK)
    return pax_member(records, member)


@dataclass
class LeftCase:
    """The bytes from a member that scan leaves to Python, and the expected result."""

    tail: bytes
    error: str | None = None  # text in the error the Python reader raises
    entries: int = 3  # members read without an error, with the two before the tail


LEFT_CASES = {
    "bad checksum": LeftCase(
        raw_member(b"bad", b"x", checksum_delta=1) + END,
        error="bad tar header checksum at byte 2048",
    ),
    "base-256 uid": LeftCase(gnu_member("big-uid", 8**8) + END),
    "malformed size": LeftCase(
        raw_member(b"odd", size_field=b"12x45678901\0") + END,
        error="malformed numeric field",
    ),
    "global PAX header": LeftCase(global_pax_member() + END),
    "old GNU sparse": LeftCase(old_gnu_sparse_member() + END),
    "PAX GNU sparse": LeftCase(pax_sparse_member() + END),
    "PAX header over 1 MiB": LeftCase(
        pax_member({b"path": b"p" * (1 << 20)}, raw_member(b"f")) + END
    ),
    "PAX header then end": LeftCase(
        pax_member({b"path": b"lost"}, b"") + END, entries=2
    ),
    "malformed PAX record": LeftCase(
        raw_member(b"pax", b"8 pathx\n", kind=b"x") + raw_member(b"f") + END,
        error="PAX record without '='",
    ),
    "negative PAX uid": LeftCase(
        pax_member({b"uid": b"-1"}, raw_member(b"f")) + END,
        error="negative size or owner",
    ),
    "volume label": LeftCase(raw_member(b"label", kind=b"V") + raw_member(b"f") + END),
    "unknown type": LeftCase(
        raw_member(b"odd", kind=b"Z") + END, error="unsupported tar type"
    ),
    "truncated member": LeftCase(
        raw_member(b"cut", b"x" * 2000)[: 3 * BLOCK],
        error="declares 2000 bytes but the tar ends first",
    ),
    "truncated header": LeftCase(
        raw_member(b"cut")[:300], error="truncated tar header"
    ),
    "truncated PAX header": LeftCase(
        pax_member({b"path": b"p" * 600}, raw_member(b"f"))[: 2 * BLOCK],
        error="truncated extended header",
    ),
}


@pytest.mark.parametrize("case", sorted(LEFT_CASES))
def test_scan_leaves_member_to_python(case: str) -> None:
    """scan stops with PYTHON at a member it does not read, without raising.

    iter_entries then gives what the Python reader alone gives: the members
    before it, then that member or the Python reader's error.
    """
    expected = LEFT_CASES[case]
    first = raw_member(b"first", b"1") + raw_member(b"second", b"2")
    data = first + expected.tail
    with stored(data) as fd:
        entries, next_pos, status = ctar.scan(fd, 0, len(data), 100, TarEntry)
    assert status == ctar.PYTHON
    assert next_pos == len(first)
    assert [entry.name for entry in entries] == [b"first", b"second"]

    outcome = assert_readers_agree(data)
    if expected.error is None:
        assert outcome.error is None
        assert len(outcome.entries) == expected.entries
    else:
        assert outcome.error is not None
        assert expected.error in outcome.error[1]


def test_scan_pax_member_matches_python() -> None:
    """scan applies every PAX record it reads as the Python reader does."""
    records = {
        b"path": b"long/" + b"n" * 200 + b"\xff",
        b"linkpath": b"target",
        b"uid": b"123456789",
        b"gid": b"42",
        b"uname": b"u" * 40,
        b"gname": b"",
        b"mtime": b"-1.25",
        b"size": b"3",
        b"SCHILY.xattr.user.a": b"1",
        b"SCHILY.xattr.security.capability": b"\0\x01",
    }
    data = pax_member(records, raw_member(b"short", b"abc")) + END
    with stored(data) as fd:
        entries, _, status = ctar.scan(fd, 0, len(data), 100, TarEntry)
    assert status == ctar.DONE
    assert len(entries) == 1
    entry = entries[0]
    assert entry.name == records[b"path"]
    assert entry.mtime == -1
    assert entry.mtime_text == b"-1.25"
    assert entry.xattrs == {b"user.a": b"1", b"security.capability": b"\0\x01"}
    assert assert_readers_agree(data).entries == [entry_fields(entry)]


def read_names_compiled(data: bytes) -> list[bytes]:
    with stored(data) as fd, mock.patch.object(tarscan, "_ctar", ctar):
        return [entry.name for entry in tarscan.iter_entries(fd, 0, len(data))]


def test_python_member_unpadded_at_end() -> None:
    """A member read in Python may end the region before its padding does.

    The Python reader then returns a next position past the end of the region.
    """
    data = gnu_member("big-uid", 8**8, b"x")[: BLOCK + 1]
    assert read_outcome(data, None).entries[0]["name"] == b"big-uid"
    assert read_names_compiled(data) == [b"big-uid"]


def test_batch_ends_with_unpadded_member() -> None:
    """The last member of a full scan batch may end before its padding does."""
    batch = tarscan._SCAN_BATCH
    members = [raw_member(b"m%d" % i) for i in range(batch - 1)]
    data = b"".join(members) + raw_member(b"last", b"x")[: BLOCK + 1]
    assert len(read_outcome(data, None).entries) == batch
    assert len(read_names_compiled(data)) == batch


def test_region_near_offset_limit_python() -> None:
    """scan leaves a region ending near the largest file offset to Python.

    Offsets there would overflow the compiled reader's signed 64-bit
    arithmetic. A child process runs the check, because such a failure is a
    crash.
    """
    code = (
        "import tempfile\n"
        "from pulldocker import _ctar, tarscan\n"
        "with tempfile.TemporaryFile() as handle:\n"
        "    fd, pos = handle.fileno(), 2**63 - 100\n"
        "    print(_ctar.scan(fd, pos, pos + 99, 1, tarscan.TarEntry))\n"
        "    print(list(tarscan.iter_entries(fd, pos, 99)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PULLDOCKER_PURE_PYTHON"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    scanned, read = result.stdout.splitlines()
    assert scanned == f"([], {2**63 - 100}, {ctar.PYTHON})"
    assert read == "[]"


# -- the limit argument ---------------------------------------------------------


def ten_members() -> bytes:
    """Ten members, two with PAX or GNU long-name headers, then the trailer."""
    members = [raw_member(b"m%d" % i, b"x" * i * 100) for i in range(8)]
    members.insert(3, pax_member({b"path": b"p" * 300}, raw_member(b"pax")))
    members.insert(6, raw_member(b"././@LongLink", b"q" * 150, kind=b"L"))
    members[6] += raw_member(b"long")
    return b"".join(members) + END


@pytest.mark.parametrize("limit", [1, 2, 3, 9, 10, 11, 1024])
def test_scan_limit_resumes(limit: int) -> None:
    """scan returns at most ``limit`` entries, and resuming returns the rest."""
    data = ten_members()
    batches = []
    pos = 0
    with stored(data) as fd:
        while True:
            entries, pos, status = ctar.scan(fd, pos, len(data), limit, TarEntry)
            assert len(entries) <= limit
            batches.append(entries)
            if status == ctar.DONE:
                break
            assert status == ctar.MORE
            assert len(entries) == limit
    assert len(batches) == 10 // limit + 1
    scanned = [entry_fields(entry) for batch in batches for entry in batch]
    assert scanned == read_outcome(data, None).entries
    assert len(scanned) == 10


@pytest.mark.parametrize(
    ("pos", "end", "limit"), [(0, 1024, 0), (0, 1024, -1), (-1, 1024, 5), (0, -1, 5)]
)
def test_scan_bad_arguments_rejected(pos: int, end: int, limit: int) -> None:
    """A negative position or end, or a limit below 1, raises ValueError."""
    with stored(END) as fd, pytest.raises(ValueError, match="invalid region or limit"):
        ctar.scan(fd, pos, end, limit, TarEntry)


def test_scan_rejects_borrowed_slots() -> None:
    """Slot descriptors copied from TarEntry onto another class raise TypeError.

    Their offsets belong to TarEntry instances, so writing through them into
    a smaller instance would corrupt memory.
    """
    borrowed = type("Borrowed", (), dict.fromkeys(TarEntry.__slots__))
    for slot in TarEntry.__slots__:
        setattr(borrowed, slot, TarEntry.__dict__[slot])
    with stored(raw_member(b"f", b"x") + END) as fd, pytest.raises(TypeError):
        ctar.scan(fd, 0, BLOCK * 4, 1, borrowed)


def test_scan_position_past_end_done() -> None:
    """A position past the end, as after a member's cut padding, ends the archive."""
    data = raw_member(b"f", b"x")
    with stored(data) as fd:
        entries, _, status = ctar.scan(fd, len(data) + 10, len(data), 5, TarEntry)
    assert entries == []
    assert status == ctar.DONE


# -- ustar_header ---------------------------------------------------------------


def python_block(*fields: Any) -> bytes:
    name, mode, uid, gid, size, mtime, typeflag, linkname, uname, gname = fields
    return tarwrite._ustar_block(
        name, b"", mode, uid, gid, size, mtime, typeflag, linkname, uname, gname, 0, 0
    )


FITTING_FIELDS = (
    st.binary(max_size=100),
    st.integers(-(2**63), 2**63 - 1) | st.integers(0, 0o7777),
    st.integers(0, MAX_ID - 1),
    st.integers(0, MAX_ID - 1),
    st.integers(0, MAX_SIZE - 1),
    st.integers(0, MAX_SIZE - 1),
    st.binary(min_size=1, max_size=1),
    st.binary(max_size=100),
    st.binary(max_size=32),
    st.binary(max_size=32),
)
LARGEST = (
    b"\xff" * 100,
    0o7777,
    MAX_ID - 1,
    MAX_ID - 1,
    MAX_SIZE - 1,
    MAX_SIZE - 1,
    b"\xff",
    b"\xff" * 100,
    b"\xff" * 32,
    b"\xff" * 32,
)


@fuzz_settings(SHORT_PASS)
@given(st.tuples(*FITTING_FIELDS))
@example(LARGEST)
@example((b"", 0, 0, 0, 0, 0, b"0", b"", b"", b""))
def test_ustar_header_matches_python(fields: tuple[Any, ...]) -> None:
    """ustar_header and _ustar_block write identical blocks for fitting fields."""
    block = ctar.ustar_header(*fields)
    assert len(block) == BLOCK
    assert block == python_block(*fields)


# Field index and a value just outside what a ustar header can contain.
UNFITTING = [
    (0, b"n" * 101),
    (2, -1),
    (2, MAX_ID),
    (3, -1),
    (3, MAX_ID),
    (4, -1),
    (4, MAX_SIZE),
    (5, -1),
    (5, MAX_SIZE),
    (7, b"l" * 101),
    (8, b"u" * 33),
    (9, b"g" * 33),
]
BASE_FIELDS = (b"name", 0o644, 0, 0, 0, 0, b"0", b"", b"root", b"root")


@pytest.mark.parametrize(("index", "value"), UNFITTING)
def test_ustar_header_rejects_unfitting_field(index: int, value: Any) -> None:
    """A field that does not fit a ustar header raises ValueError."""
    fields = list(BASE_FIELDS)
    fields[index] = value
    with pytest.raises(ValueError, match="does not fit a ustar header"):
        ctar.ustar_header(*fields)


@pytest.mark.parametrize(("index", "value"), [(2, 2**63), (4, -(2**64))])
def test_ustar_header_rejects_huge_number(index: int, value: int) -> None:
    """A number too large for a C long long raises ValueError too."""
    fields = list(BASE_FIELDS)
    fields[index] = value
    with pytest.raises(ValueError):
        ctar.ustar_header(*fields)


def test_ustar_header_huge_mode_matches_python() -> None:
    """Only the low 12 bits of the mode count, as in _ustar_block."""
    fields = list(BASE_FIELDS)
    fields[1] = 2**64 + 0o755
    assert ctar.ustar_header(*fields) == python_block(*fields)
