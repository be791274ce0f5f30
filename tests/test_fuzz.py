"""Property-based fuzzing of every parser that reads untrusted bytes.

The contract under test: only ``PulldockerError`` subclasses may escape, and
every parser returns within a few seconds. Any other exception, or a hang, is
a fault in pulldocker.

CI runs a short, derandomized pass. A longer random run is::

    PULLDOCKER_FUZZ_EXAMPLES=100000 python -m pytest tests/test_fuzz.py

which sets ``max_examples`` for every target and draws fresh random inputs.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from fuzzing import fuzz_settings
from hostile import (
    END,
    directory,
    docker_archive,
    file,
    hardlink,
    oci_archive,
    pax_member,
    raw_member,
    sha256,
    symlink,
    tar_bytes,
)
from hypothesis import given
from hypothesis import strategies as st

from pulldocker import archive, auth, manifest, platform, pull, reference, tarscan
from pulldocker.convert import convert
from pulldocker.errors import PulldockerError

SHORT_PASS = 200  # examples per target in CI
HANG_SECONDS = 10


class Hang(Exception):
    """A parser ran for longer than ``HANG_SECONDS``."""


@contextlib.contextmanager
def time_limit(seconds: int = HANG_SECONDS) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- seed inputs --------------------------------------------------------------


def _seed_layers() -> list[bytes]:
    long = "d/" + "n" * 150
    return [
        tar_bytes(
            [
                directory("etc"),
                file("etc/a", b"1"),
                symlink("l", "/etc"),
                hardlink("h", "etc/a"),
            ]
        ),
        tar_bytes([file(long, b"long"), symlink("s", "x" * 200)]),
        pax_member({b"SCHILY.xattr.user.a": b"v", b"mtime": b"1.5"}, raw_member(b"f"))
        + END,
        raw_member(b"././@LongLink", b"g" * 120 + b"\0", kind=b"L")
        + raw_member(b"short", b"y")
        + END,
        pax_member(
            {
                b"GNU.sparse.major": b"1",
                b"GNU.sparse.minor": b"0",
                b"GNU.sparse.name": b"sp",
                b"GNU.sparse.realsize": b"4096",
            },
            raw_member(
                b"GNUSparseFile.0/sp", b"1\n0\n512\n".ljust(512, b"\0") + b"S" * 512
            ),
        )
        + END,
        tar_bytes([file(".wh.x", b""), file("d/.wh..wh..opq", b"")]),
    ]


SEED_LAYERS = _seed_layers()


def _seed_archives(directory_path: Path) -> list[bytes]:
    layer = SEED_LAYERS[0]
    seeds = [
        docker_archive(directory_path / "a.tar", [layer]).read_bytes(),
        docker_archive(
            directory_path / "b.tar", [layer, gzip.compress(layer)]
        ).read_bytes(),
        oci_archive(directory_path / "c.tar", [layer]).read_bytes(),
    ]
    zstd_layer = zstandard.ZstdCompressor().compress(layer)
    seeds.append(
        docker_archive(
            directory_path / "d.tar", [zstd_layer], diff_ids=[sha256(layer)]
        ).read_bytes()
    )
    return seeds


with tempfile.TemporaryDirectory() as _scratch:
    SEED_ARCHIVES = _seed_archives(Path(_scratch))


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Seeds with byte flips, inserted bytes and truncation applied."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 8))):
            if not data:
                break
            position = draw(st.integers(0, len(data) - 1))
            action = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
            value = draw(st.integers(0, 255))
            if action == "flip":
                data[position] ^= 1 << (value % 8)
            elif action == "set":
                data[position] = draw(
                    st.sampled_from([0, 0x30, 0x37, 0x2D, 0xFF, value])
                )
            elif action == "insert":
                data[position:position] = draw(st.binary(min_size=1, max_size=16))
            else:
                del data[position : position + draw(st.integers(1, 600))]
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return bytes(data)

    return build()


def tar_header_bytes() -> st.SearchStrategy[bytes]:
    """Blocks with a valid checksum whose fields are otherwise random."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        block = bytearray(draw(st.binary(min_size=512, max_size=512)))
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        tail = draw(st.binary(max_size=2048))
        return bytes(block) + tail

    return build()


def write_temp(data: bytes) -> int:
    fd, path = tempfile.mkstemp(prefix="pulldocker-fuzz-")
    os.unlink(path)
    os.write(fd, data)
    return fd


# -- targets ------------------------------------------------------------------


def scan_all(data: bytes) -> None:
    fd = write_temp(data)
    try:
        blocks = len(data) // tarscan.BLOCK + 1
        entries = tarscan.iter_entries(fd, 0, len(data), label="fuzz")
        for count, _ in enumerate(entries, start=1):
            assert count <= blocks, "more members than blocks: the reader loops"
    finally:
        os.close(fd)


@fuzz_settings(SHORT_PASS)
@given(mutated(SEED_LAYERS) | st.binary(max_size=4096) | tar_header_bytes())
def test_tarscan_only_pulldocker_errors(data: bytes) -> None:
    with contextlib.suppress(PulldockerError), time_limit():
        scan_all(data)


@fuzz_settings(SHORT_PASS, 0.5)
@given(mutated(SEED_ARCHIVES))
def test_archive_select_only_pulldocker_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "image.tar"
        path.write_bytes(data)
        with (
            contextlib.suppress(PulldockerError),
            time_limit(),
            archive.open_archive(str(path), tmpdir=scratch) as opened,
        ):
            opened.select_image(None, None)


@fuzz_settings(SHORT_PASS, 0.5)
@given(mutated(SEED_ARCHIVES))
def test_convert_only_pulldocker_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "image.tar"
        path.write_bytes(data)
        output = Path(scratch) / "out" / "rootfs.tar"
        output.parent.mkdir()
        with contextlib.suppress(PulldockerError), time_limit():
            convert(str(path), str(output), tmpdir=scratch, max_layer_size=1 << 22)
        assert [p.name for p in output.parent.iterdir()] in ([], ["rootfs.tar"])


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            manifest.OCI_INDEX,
            manifest.OCI_MANIFEST,
            manifest.DOCKER_MANIFEST,
            "sha256:" + "a" * 64,
            "linux",
            "amd64",
            "unknown",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "mediaType",
                    "digest",
                    "size",
                    "manifests",
                    "layers",
                    "config",
                    "platform",
                    "annotations",
                    "os",
                    "architecture",
                    "variant",
                    "schemaVersion",
                    "rootfs",
                    "diff_ids",
                    "type",
                    "vnd.docker.reference.type",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


class _FuzzSource:
    """A manifest source for ``pull._resolve`` that serves fuzzed documents."""

    def __init__(self, documents: list[bytes], content_type: str) -> None:
        self.documents = documents
        self.content_type = content_type
        self.served = 0

    def manifest(self, identifier: str, context: str) -> manifest.Manifest:
        raw = self.documents[min(self.served, len(self.documents) - 1)]
        self.served += 1
        return manifest.parse_manifest(
            raw, self.content_type, expected_digest=None, context=context
        )

    def config(self, descriptor: manifest.Descriptor) -> bytes:
        return self.documents[-1]


@fuzz_settings(SHORT_PASS)
@given(
    st.lists(json_values.map(lambda v: json.dumps(v).encode()), min_size=1, max_size=3),
    st.sampled_from(
        ["", "application/json", manifest.OCI_INDEX, manifest.OCI_MANIFEST]
    ),
)
def test_registry_resolve_only_pulldocker_errors(
    documents: list[bytes], content_type: str
) -> None:
    source = _FuzzSource(documents, content_type)
    ref = reference.parse_reference("127.0.0.1:5000/fuzz/image:tag")
    requested = platform.Platform("linux", "amd64")
    with contextlib.suppress(PulldockerError), time_limit():
        pull._resolve(source, ref, requested)  # type: ignore[arg-type]


@fuzz_settings(SHORT_PASS)
@given(st.binary(max_size=512) | mutated([b'{"schemaVersion":2,"manifests":[]}']))
def test_manifest_parse_only_pulldocker_errors(raw: bytes) -> None:
    with contextlib.suppress(PulldockerError), time_limit():
        parsed = manifest.parse_manifest(
            raw, "application/json", expected_digest=None, context="fuzz"
        )
        if not parsed.is_index:
            parsed.config  # noqa: B018
            parsed.layers  # noqa: B018


@fuzz_settings(SHORT_PASS)
@given(json_values)
def test_index_select_only_pulldocker_errors(document: object) -> None:
    """Index entries as archive.py reads them from an OCI layout's index.json."""
    label = "fuzz: index.json"
    with contextlib.suppress(PulldockerError), time_limit():
        descriptors = archive._descriptor_list(document, label)
        archive._choose_descriptor(
            descriptors, None, platform.Platform("linux", "amd64"), label
        )


@fuzz_settings(SHORT_PASS)
@given(st.text(max_size=80) | st.from_regex(r"[a-z0-9.:/@_-]{1,60}", fullmatch=True))
def test_reference_parse_only_pulldocker_errors(text: str) -> None:
    with contextlib.suppress(PulldockerError), time_limit():
        parsed = reference.parse_reference(text)
        str(parsed)
        parsed.scope()


@fuzz_settings(SHORT_PASS)
@given(
    st.lists(
        st.text(max_size=80)
        | st.from_regex(
            r'(Bearer|Basic) ([a-z]+=("[^"]*"|[a-z]*),? ?){0,4}', fullmatch=True
        ),
        max_size=3,
    )
)
def test_challenge_parse_never_raises(lines: list[str]) -> None:
    with time_limit():
        for challenge in auth.parse_challenges(lines):
            challenge.scopes  # noqa: B018


@fuzz_settings(SHORT_PASS)
@given(st.text(max_size=40))
def test_platform_parse_only_pulldocker_errors(text: str) -> None:
    with contextlib.suppress(PulldockerError):
        platform.Platform.parse(text)


@pytest.mark.parametrize("selector", ["\u00b2", "\u0663", "@\u00b9"])
def test_archive_index_selector_unicode_digits(selector: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = docker_archive(Path(scratch) / "a.tar", [SEED_LAYERS[0]])
        with (
            contextlib.suppress(PulldockerError),
            archive.open_archive(str(path)) as opened,
        ):
            opened.select_image(selector, None)


def test_registry_index_entry_not_object() -> None:
    index = json.dumps({"mediaType": manifest.OCI_INDEX, "manifests": [1, "x"]})
    source = _FuzzSource([index.encode()], manifest.OCI_INDEX)
    ref = reference.parse_reference("127.0.0.1:5000/fuzz/image:tag")
    with pytest.raises(PulldockerError):
        pull._resolve(source, ref, platform.Platform("linux", "amd64"))  # type: ignore[arg-type]


def test_registry_index_platform_string() -> None:
    entry = {
        "mediaType": manifest.OCI_MANIFEST,
        "digest": "sha256:" + "a" * 64,
        "size": 2,
        "platform": "linux/amd64",
    }
    index = json.dumps({"mediaType": manifest.OCI_INDEX, "manifests": [entry]})
    source = _FuzzSource([index.encode()], manifest.OCI_INDEX)
    ref = reference.parse_reference("127.0.0.1:5000/fuzz/image:tag")
    with pytest.raises(PulldockerError):
        pull._resolve(source, ref, platform.Platform("linux", "amd64"))  # type: ignore[arg-type]


def test_manifest_parse_deep_nesting() -> None:
    raw = b'{"manifests":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(PulldockerError):
        manifest.parse_manifest(raw, "", expected_digest=None, context="fuzz")


def test_tarscan_pax_size_negative_ends() -> None:
    data = pax_member({b"size": b"-1536"}, raw_member(b"f", b"x")) + END
    with pytest.raises(PulldockerError), time_limit(5):
        scan_all(data)


def test_tarscan_pax_mtime_infinite() -> None:
    data = pax_member({b"mtime": b"1.0e999"}, raw_member(b"f", b"x")) + END
    with pytest.raises(PulldockerError):
        scan_all(data)
