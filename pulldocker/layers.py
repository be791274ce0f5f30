"""Recognise layer compression by magic bytes, decompress and hash layers.

The compression of a layer or archive is decided from its first bytes, never
from its name or media type alone, because registries and tools mislabel
layers both ways (gzip labelled as plain tar, zstd labelled as gzip):

* gzip ``1f 8b``, zstd ``28 b5 2f fd`` (or a skippable frame), bzip2 ``BZh``,
  xz ``fd 37 7a 58 5a 00``; anything else is read as plain tar.

A compressed layer is decompressed once, into a spool file, while both the
stored bytes (the manifest digest) and the uncompressed bytes (the config's
diff_id) are hashed.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import re
from typing import BinaryIO, Protocol

from .errors import (
    IntegrityError,
    InvalidInputError,
    LimitExceededError,
    UnsupportedError,
)

__all__ = [
    "DEFAULT_MAX_EXPANDED",
    "DigestCheck",
    "Hashed",
    "RegionReader",
    "decompress_to_file",
    "detect_compression",
    "hash_region",
    "parse_digest",
]

DEFAULT_MAX_EXPANDED = 256 * 1024**3  # 256 GiB of uncompressed data per layer
_CHUNK = 1024 * 1024
_DIGEST_PATTERN = {
    "sha256": re.compile(rb"[a-f0-9]{64}"),
    "sha512": re.compile(rb"[a-f0-9]{128}"),
}


class _Progress(Protocol):
    def __call__(self, amount: int) -> None: ...


def parse_digest(digest: object, what: str) -> tuple[str, str]:
    """Split ``sha256:<hex>`` into algorithm and hex, checking both.

    Raises:
        InvalidInputError: the digest is not a sha256 or sha512 digest.
    """
    if not isinstance(digest, str):
        raise InvalidInputError(f"{what}: digest {digest!r} is not a string")
    algorithm, _, encoded = digest.partition(":")
    pattern = _DIGEST_PATTERN.get(algorithm)
    if pattern is None or not pattern.fullmatch(encoded.encode()):
        raise InvalidInputError(
            f"{what}: invalid digest {digest!r}; expected sha256:<64 hex digits>"
        )
    return algorithm, encoded


def detect_compression(head: bytes) -> str:
    """Name the compression of data starting with ``head``; "none" for plain."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if (
        len(head) >= 4
        and 0x184D2A50 <= int.from_bytes(head[:4], "little") <= 0x184D2A5F
    ):
        return "zstd"  # a skippable frame, as written before some zstd layers
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    return "none"


class RegionReader:
    """A read-only binary stream over [offset, offset+size) of ``fd``.

    It hashes what it reads when ``algorithm`` is given.
    """

    def __init__(self, fd: int, offset: int, size: int, algorithm: str | None) -> None:
        self.fd = fd
        self.position = offset
        self.end = offset + size
        self.hash = hashlib.new(algorithm) if algorithm else None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        remaining = self.end - self.position
        if size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            return b""
        data = os.pread(self.fd, size, self.position)
        self.position += len(data)
        if self.hash is not None:
            self.hash.update(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end, so the hash covers the whole region."""
        while self.read(_CHUNK):
            pass


class Hashed:
    """Digests computed for one layer: of the stored bytes and of the tar.

    A digest is None when it was not computed because nothing records it.
    """

    __slots__ = ("stored", "uncompressed", "uncompressed_size")

    def __init__(
        self, stored: str | None, uncompressed: str | None, uncompressed_size: int
    ) -> None:
        self.stored = stored
        self.uncompressed = uncompressed
        self.uncompressed_size = uncompressed_size


class DigestCheck:
    """Expected digests and size of one layer; None where none is recorded."""

    __slots__ = ("digest", "diff_id", "label", "size")

    def __init__(
        self, label: str, digest: str | None, diff_id: str | None, size: int | None
    ) -> None:
        self.label = label
        self.digest = digest
        self.diff_id = diff_id
        self.size = size

    def algorithms(self) -> tuple[str | None, str | None]:
        """Return the hash algorithms for the stored and uncompressed bytes.

        An algorithm is None where no digest is recorded, so that nothing
        is hashed in vain.
        """
        stored = parse_digest(self.digest, self.label)[0] if self.digest else None
        plain = parse_digest(self.diff_id, self.label)[0] if self.diff_id else None
        return stored, plain

    def verify(self, hashed: Hashed, stored_size: int) -> None:
        """Raise IntegrityError if a recorded digest or size differs."""
        if self.size is not None and self.size != stored_size:
            raise IntegrityError(
                f"{self.label}: size mismatch: expected {self.size} bytes, "
                f"got {stored_size}"
            )
        if self.digest is not None and self.digest != hashed.stored:
            raise IntegrityError(
                f"{self.label}: digest mismatch: expected {self.digest}, "
                f"got {hashed.stored}"
            )
        if self.diff_id is not None and self.diff_id != hashed.uncompressed:
            raise IntegrityError(
                f"{self.label}: diff_id mismatch: expected {self.diff_id}, "
                f"got {hashed.uncompressed} (the layer does not match the config)"
            )


def hash_region(
    fd: int, offset: int, size: int, algorithm: str, progress: _Progress | None = None
) -> str:
    """Return ``algorithm:hex`` of [offset, offset+size) of ``fd``."""
    digest = hashlib.new(algorithm)
    # One reused buffer: fresh memory for every chunk costs page faults.
    buffer = memoryview(bytearray(_CHUNK))
    position, end = offset, offset + size
    while position < end:
        count = os.preadv(fd, [buffer[: min(_CHUNK, end - position)]], position)
        if not count:
            raise InvalidInputError(f"unexpected end of file at byte {position}")
        digest.update(buffer[:count])
        position += count
        if progress is not None:
            progress(count)
    return f"{algorithm}:{digest.hexdigest()}"


def open_decompressor(compression: str, source: BinaryIO) -> BinaryIO:
    """Wrap ``source`` in a reader that yields the decompressed bytes."""
    if compression == "gzip":
        try:
            from isal import igzip

            return igzip.IGzipFile(fileobj=source, mode="rb")  # type: ignore[no-untyped-call,return-value]
        except ImportError:
            import gzip

            return gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise UnsupportedError(
                "zstd-compressed data needs the 'zstandard' package: "
                "pip install zstandard"
            ) from None
        # Frames may declare windows up to 2 GiB (zstd --long=31).
        decompressor = zstandard.ZstdDecompressor(max_window_size=2**31)
        return decompressor.stream_reader(
            source, read_across_frames=True, closefd=False
        )
    if compression == "bzip2":
        return bz2.BZ2File(source)  # type: ignore[return-value]
    if compression == "xz":
        return lzma.LZMAFile(source)  # type: ignore[return-value]
    raise UnsupportedError(f"unsupported compression {compression!r}")


def decompress_to_file(
    fd: int,
    offset: int,
    size: int,
    compression: str,
    out_fd: int,
    *,
    label: str,
    algorithms: tuple[str | None, str | None] = (None, None),
    max_expanded: int = DEFAULT_MAX_EXPANDED,
    progress: _Progress | None = None,
) -> Hashed:
    """Decompress a region of ``fd`` to the end of ``out_fd``.

    ``algorithms`` names the hashes to compute of the compressed and of the
    decompressed bytes; None skips one.

    Raises:
        InvalidInputError: the compressed stream is corrupt or truncated.
        LimitExceededError: more than ``max_expanded`` bytes came out.
    """
    reader = RegionReader(fd, offset, size, algorithms[0])
    plain_hash = hashlib.new(algorithms[1]) if algorithms[1] else None
    total = 0
    last_position = reader.position
    stream = open_decompressor(compression, reader)  # type: ignore[arg-type]
    while True:
        data = _read_decompressed(stream, compression, label)
        if not data:
            break
        total += len(data)
        if total > max_expanded:
            raise LimitExceededError(
                f"{label}: expands to more than {max_expanded} bytes; "
                "raise the limit with --max-layer-size if the image is trusted"
            )
        if plain_hash is not None:
            plain_hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(out_fd, view) :]
        if progress is not None:
            progress(reader.position - last_position)
            last_position = reader.position
    reader.drain()
    if compression == "zstd":
        # The zstandard stream reader ends quietly at a cut-off frame.
        check_zstd_frames(fd, offset, size, label)
    return Hashed(
        f"{algorithms[0]}:{reader.hash.hexdigest()}" if reader.hash else None,
        f"{algorithms[1]}:{plain_hash.hexdigest()}" if plain_hash else None,
        total,
    )


def _read_decompressed(stream: BinaryIO, compression: str, label: str) -> bytes:
    """Read the next chunk, turning any decoder complaint into InvalidInputError.

    Each decoder has its own error types (zlib.error, IsalError, ZstdError,
    LZMAError, EOFError, gzip.BadGzipFile, OSError without an errno), so only
    an OSError carrying an errno, a real I/O failure, passes through.
    """
    try:
        return stream.read(_CHUNK)
    except OSError as exc:
        if exc.errno is not None:
            raise
        reason: Exception = exc
    except Exception as exc:
        reason = exc
    raise InvalidInputError(
        f"{label}: corrupt or truncated {compression} data ({reason})"
    ) from None


def check_zstd_frames(fd: int, offset: int, size: int, label: str) -> None:
    """Raise InvalidInputError unless the region is a run of complete zstd frames.

    Only frame and block headers are read (RFC 8878, section 3.1), so the
    walk costs one small read per 128 KiB block.
    """
    position, end = offset, offset + size

    def need(length: int) -> bytes:
        data = os.pread(fd, length, position)
        if len(data) < length:
            raise InvalidInputError(f"{label}: truncated zstd data")
        return data

    while position < end:
        magic = int.from_bytes(need(4), "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F:
            position += 4
            position += 4 + int.from_bytes(need(4), "little")
            continue
        if magic != 0xFD2FB528:
            raise InvalidInputError(f"{label}: corrupt zstd data (bad frame magic)")
        position += 4
        descriptor = need(1)[0]
        single_segment = descriptor & 0x20
        header = 1 + (0 if single_segment else 1)
        header += (0, 1, 2, 4)[descriptor & 0x03]
        header += (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
        position += header
        while True:
            block = int.from_bytes(need(3), "little")
            position += 3
            kind, length = (block >> 1) & 0x03, block >> 3
            if kind == 3:
                raise InvalidInputError(f"{label}: corrupt zstd data (reserved block)")
            position += 1 if kind == 1 else length
            if block & 1:
                break
        if descriptor & 0x04:
            position += 4
        if position > end:
            raise InvalidInputError(f"{label}: truncated zstd data")
