"""Hostile and malformed archives: each ends in a contained rootfs or one error line.

Every case runs the command line in a child process. A rejected input must
print exactly one ``pulldocker: ...`` line with the documented exit code and
leave nothing in the output directory (no OUTPUT, no ``.part`` file). An
accepted input must produce a tar whose names cannot lead an extractor out of
its root, and which GNU tar extracts as uid 65534 without error and without
writing anything beside the extraction directory.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import zstandard
from hostile import (
    END,
    EXIT_INTEGRITY,
    EXIT_INVALID,
    EXIT_LIMIT,
    Member,
    Workspace,
    assert_contained,
    assert_one_line_error,
    assert_success,
    describe,
    directory,
    docker_archive,
    escaped_files,
    extract_unprivileged,
    file,
    hardlink,
    oci_archive,
    output_names,
    pax_member,
    raw_header,
    raw_member,
    remove_extraction,
    run_cli,
    sha256,
    symlink,
    tar_bytes,
)

OK_LAYER = tar_bytes([directory("etc"), file("etc/ok", b"1")])


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def convert(
    ws: Workspace, archive: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    before = ws.snapshot()
    try:
        result = run_cli(archive, "-o", ws.output, *args, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pulldocker did not finish within {timeout} s")
    assert ws.snapshot() == before, "files appeared outside the output directory"
    return result


def expect_error(ws: Workspace, layers: list[bytes], code: int, **kw: object) -> str:
    archive = docker_archive(ws.input / "image.tar", layers, **kw)  # type: ignore[arg-type]
    result = convert(ws, archive)
    assert_one_line_error(result, code, ws)
    return result.stderr


def expect_rootfs(ws: Workspace, layers: list[bytes], **kw: object) -> dict:
    archive = docker_archive(ws.input / "image.tar", layers, **kw)  # type: ignore[arg-type]
    result = convert(ws, archive)
    assert_success(result, ws)
    assert_contained(ws.output)
    extraction, rootfs = extract_unprivileged(ws.output)
    try:
        assert extraction.returncode == 0, extraction.stderr
        assert extraction.stderr == "", extraction.stderr
        assert escaped_files(rootfs) == []
    finally:
        remove_extraction(rootfs)
    return output_names(ws.output)


# -- names that climb out ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "a/../../evil",
        "./../evil",
        "etc/../../../evil",
        "..",
        "a/b/../../../x",
    ],
)
def test_name_climbing_out_rejected(ws: Workspace, name: str) -> None:
    stderr = expect_error(ws, [tar_bytes([file(name)])], EXIT_INVALID)
    assert "leaves the root" in stderr


def test_name_absolute_lands_inside(ws: Workspace) -> None:
    names = expect_rootfs(ws, [tar_bytes([file("/abs/path", b"y")])])
    assert "abs/path" in names


def test_name_dotdot_staying_inside(ws: Workspace) -> None:
    names = expect_rootfs(ws, [tar_bytes([file("a/../b", b"y")])])
    assert "b" in names
    assert "a" not in names


def test_pax_path_climbing_out_rejected(ws: Workspace) -> None:
    layer = pax_member({b"path": b"../../pax-evil"}, raw_member(b"harmless", b"x"))
    expect_error(ws, [layer + END], EXIT_INVALID)


def test_gnu_longname_climbing_out_rejected(ws: Workspace) -> None:
    long_name = b"../" * 40 + b"gnu-evil\0"
    layer = raw_member(b"././@LongLink", long_name, kind=b"L")
    layer += raw_member(b"short", b"x")
    expect_error(ws, [layer + END], EXIT_INVALID)


def test_whiteout_climbing_out_rejected(ws: Workspace) -> None:
    layers = [OK_LAYER, tar_bytes([file("a/../../.wh.etc", b"")])]
    expect_error(ws, layers, EXIT_INVALID)


@pytest.mark.parametrize("name", [".wh.", "etc/.wh.", "etc/.wh.."])
def test_whiteout_without_name_rejected(ws: Workspace, name: str) -> None:
    expect_error(ws, [OK_LAYER, tar_bytes([file(name, b"")])], EXIT_INVALID)


# -- hardlinks --------------------------------------------------------------


@pytest.mark.parametrize("target", ["../../etc/shadow", "a/../../x", ".."])
def test_hardlink_outside_rejected(ws: Workspace, target: str) -> None:
    layer = tar_bytes([file("a/f"), hardlink("h", target)])
    stderr = expect_error(ws, [layer], EXIT_INVALID)
    assert "outside the root" in stderr


def test_hardlink_absolute_missing_rejected(ws: Workspace) -> None:
    stderr = expect_error(ws, [tar_bytes([hardlink("h", "/etc/passwd")])], EXIT_INVALID)
    assert "does not exist" in stderr


def test_hardlink_absolute_inside_kept(ws: Workspace) -> None:
    layer = tar_bytes([file("etc/passwd", b"root"), hardlink("h", "/etc/passwd")])
    names = expect_rootfs(ws, [layer])
    assert names["h"].islnk()
    assert names["h"].linkname == "etc/passwd"


def test_hardlink_to_later_name_rejected(ws: Workspace) -> None:
    layer = tar_bytes([hardlink("h", "later"), file("later", b"x")])
    expect_error(ws, [layer], EXIT_INVALID)


def test_hardlink_to_directory_rejected(ws: Workspace) -> None:
    layer = tar_bytes([directory("d"), hardlink("h", "d")])
    expect_error(ws, [layer], EXIT_INVALID)


def test_hardlink_through_symlink_stays_inside(ws: Workspace) -> None:
    layer = tar_bytes(
        [file("etc/passwd", b"root"), symlink("l", "/etc"), hardlink("h", "l/passwd")]
    )
    names = expect_rootfs(ws, [layer])
    assert names["h"].islnk()
    assert names["h"].linkname == "etc/passwd"


def test_hardlink_through_climbing_symlink_clamped(ws: Workspace) -> None:
    layer = tar_bytes(
        [
            file("etc/passwd", b"root"),
            symlink("up", "../../../../etc"),
            hardlink("h", "up/passwd"),
        ]
    )
    names = expect_rootfs(ws, [layer])
    assert names["h"].linkname == "etc/passwd"


# -- symlinks, then files written through them ---------------------------------


def test_write_through_absolute_symlink(ws: Workspace) -> None:
    layers = [
        tar_bytes([symlink("evil", "/tmp")]),
        tar_bytes([file("evil/pwned", b"x")]),
    ]
    names = expect_rootfs(ws, layers)
    assert "tmp/pwned" in names
    assert names["evil"].issym()


def test_write_through_climbing_symlink(ws: Workspace) -> None:
    layer = tar_bytes([symlink("up", "../../../../canary"), file("up/x", b"x")])
    names = expect_rootfs(ws, [layer])
    assert "canary/x" in names


def test_write_through_symlink_chain(ws: Workspace) -> None:
    layer = tar_bytes(
        [
            symlink("a", "b"),
            symlink("b", "c/.."),
            symlink("c", "/../../outside"),
            file("a/deep/file", b"x"),
        ]
    )
    names = expect_rootfs(ws, [layer])
    assert "deep/file" in names


def test_write_through_dangling_symlink(ws: Workspace) -> None:
    layer = tar_bytes([symlink("d", "/nonexistent/deep"), file("d/f", b"x")])
    names = expect_rootfs(ws, [layer])
    assert "nonexistent/deep/f" in names


def test_symlink_loop_rejected(ws: Workspace) -> None:
    layer = tar_bytes([symlink("a", "b"), symlink("b", "a"), file("a/f", b"x")])
    stderr = expect_error(ws, [layer], EXIT_INVALID)
    assert "too many levels" in stderr


def test_symlink_self_loop_rejected(ws: Workspace) -> None:
    layer = tar_bytes([symlink("s", "s"), file("s/f", b"x")])
    expect_error(ws, [layer], EXIT_INVALID)


def test_directory_replaces_symlink(ws: Workspace) -> None:
    layers = [tar_bytes([symlink("etc", "/tmp")]), tar_bytes([file("etc/x", b"1")])]
    layers.append(tar_bytes([directory("etc"), file("etc/y", b"2")]))
    names = expect_rootfs(ws, layers)
    assert names["etc"].isdir()
    assert "etc/y" in names
    assert "tmp/x" in names


def test_whiteout_through_symlink_stays_inside(ws: Workspace) -> None:
    layers = [
        tar_bytes(
            [file("real/keep", b"k"), file("real/gone", b"g"), symlink("l", "real")]
        ),
        tar_bytes([file("l/.wh.gone", b"")]),
    ]
    names = expect_rootfs(ws, layers)
    assert "real/keep" in names
    assert "real/gone" not in names


def test_symlink_targets_kept_verbatim(ws: Workspace) -> None:
    layer = tar_bytes([symlink("up", "../../../../etc/shadow"), symlink("abs", "/")])
    names = expect_rootfs(ws, [layer])
    assert names["up"].linkname == "../../../../etc/shadow"
    assert names["abs"].linkname == "/"


# -- archive members that leave the archive -----------------------------------


@pytest.mark.parametrize("path", ["../x", "a/../../x", "../../../../etc/passwd"])
def test_manifest_layer_path_outside_rejected(ws: Workspace, path: str) -> None:
    manifest = json.dumps([{"Config": "c.json", "Layers": [path]}]).encode()
    config = b'{"rootfs":{"type":"layers","diff_ids":["sha256:' + b"a" * 64 + b'"]}}'
    extra = [raw_member(b"c.json", config)]
    expect_error(ws, [], EXIT_INVALID, manifest=manifest, extra=extra)


def test_manifest_config_path_outside_rejected(ws: Workspace) -> None:
    manifest = json.dumps([{"Config": "../../etc/passwd", "Layers": []}]).encode()
    stderr = expect_error(ws, [], EXIT_INVALID, manifest=manifest)
    assert "leaves the archive" in stderr


def test_manifest_config_absolute_path_stays(ws: Workspace) -> None:
    manifest = json.dumps([{"Config": "/etc/passwd", "Layers": []}]).encode()
    stderr = expect_error(ws, [], EXIT_INVALID, manifest=manifest)
    assert "missing from the archive" in stderr


def test_member_symlink_outside_rejected(ws: Workspace) -> None:
    manifest = json.dumps([{"Config": "c.json", "Layers": []}]).encode()
    extra = [raw_member(b"c.json", kind=b"2", linkname=b"../../../../etc/hostname")]
    expect_error(ws, [], EXIT_INVALID, manifest=manifest, extra=extra)


def test_member_symlink_loop_rejected(ws: Workspace) -> None:
    manifest = json.dumps([{"Config": "a", "Layers": []}]).encode()
    extra = [
        raw_member(b"a", kind=b"2", linkname=b"b"),
        raw_member(b"b", kind=b"2", linkname=b"a"),
    ]
    stderr = expect_error(ws, [], EXIT_INVALID, manifest=manifest, extra=extra)
    assert "too many links" in stderr


def test_layout_blob_symlink_outside_rejected(ws: Workspace) -> None:
    archive = oci_archive(ws.input / "oci.tar", [OK_LAYER])
    layout = ws.input / "layout"
    layout.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")
    (ws.canary / "secret").write_bytes(OK_LAYER)
    blob = layout / "blobs" / "sha256" / sha256(OK_LAYER)[7:]
    blob.unlink()
    blob.symlink_to(ws.canary / "secret")
    result = convert(ws, layout)
    assert_one_line_error(result, EXIT_INVALID, ws)
    assert "outside the directory" in result.stderr


# -- truncated and corrupt data ---------------------------------------------


def test_layer_truncated_mid_data(ws: Workspace) -> None:
    layer = tar_bytes([file("big", b"z" * 100_000)])
    expect_error(ws, [layer[:20_000]], EXIT_INVALID)


def test_layer_truncated_mid_header(ws: Workspace) -> None:
    layer = tar_bytes([file("a", b"x"), file("b", b"y")])
    expect_error(ws, [layer[: 1024 + 300]], EXIT_INVALID)


def test_archive_truncated(ws: Workspace) -> None:
    archive = docker_archive(ws.input / "full.tar", [OK_LAYER])
    data = archive.read_bytes()
    cut = ws.input / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    result = convert(ws, cut)
    assert_one_line_error(result, EXIT_INVALID, ws)


def test_gzip_layer_truncated(ws: Workspace) -> None:
    data = gzip.compress(tar_bytes([file("a", os.urandom(50_000))]))
    expect_error(ws, [data[: len(data) // 2]], EXIT_INVALID)


def test_gzip_layer_corrupt_deflate(ws: Workspace) -> None:
    data = bytearray(gzip.compress(tar_bytes([file("a", b"hello" * 1000)])))
    data[20:30] = b"\xff" * 10
    expect_error(ws, [bytes(data)], EXIT_INVALID)


def test_zstd_layer_truncated(ws: Workspace) -> None:
    plain = tar_bytes([file("a", os.urandom(300_000))])
    data = zstandard.ZstdCompressor().compress(plain)
    stderr = expect_error(
        ws, [data[: len(data) // 2]], EXIT_INVALID, diff_ids=[sha256(plain)]
    )
    assert "zstd" in stderr


def test_zstd_layer_corrupt(ws: Workspace) -> None:
    plain = tar_bytes([file("a", b"hello" * 10_000)])
    data = bytearray(zstandard.ZstdCompressor().compress(plain))
    data[8:16] = b"\xff" * 8
    expect_error(ws, [bytes(data)], EXIT_INVALID, diff_ids=[sha256(plain)])


def test_gzip_archive_corrupt_deflate(ws: Workspace) -> None:
    archive = docker_archive(ws.input / "plain.tar", [OK_LAYER])
    data = bytearray(gzip.compress(archive.read_bytes()))
    data[40:60] = b"\x00" * 20
    packed = ws.input / "image.tar.gz"
    packed.write_bytes(bytes(data))
    result = convert(ws, packed)
    assert_one_line_error(result, EXIT_INVALID, ws)


def test_layer_bad_checksum(ws: Workspace) -> None:
    layer = raw_member(b"a", b"x", checksum_delta=1) + END
    stderr = expect_error(ws, [layer], EXIT_INVALID)
    assert "checksum" in stderr


def test_archive_bad_checksum(ws: Workspace) -> None:
    bad = ws.input / "bad.tar"
    bad.write_bytes(raw_member(b"manifest.json", b"[]", checksum_delta=-5) + END)
    result = convert(ws, bad)
    assert_one_line_error(result, EXIT_INVALID, ws)


def test_size_larger_than_data(ws: Workspace) -> None:
    layer = raw_header(b"a", size=10_000_000) + b"x" * 512 + END
    stderr = expect_error(ws, [layer], EXIT_INVALID)
    assert "ends first" in stderr


def test_size_field_not_octal(ws: Workspace) -> None:
    layer = raw_header(b"a", size_field=b"99999999999\0") + END
    expect_error(ws, [layer], EXIT_INVALID)


def test_pax_size_negative(ws: Workspace) -> None:
    layer = pax_member({b"size": b"-1536"}, raw_member(b"f", b"x")) + END
    archive = docker_archive(ws.input / "image.tar", [layer])
    result = convert(ws, archive, timeout=20)
    assert_one_line_error(result, EXIT_INVALID, ws)


def test_pax_mtime_overflow(ws: Workspace) -> None:
    layer = pax_member({b"mtime": b"1.0e999"}, raw_member(b"f", b"x")) + END
    expect_error(ws, [layer], EXIT_INVALID)


def test_pax_record_malformed(ws: Workspace) -> None:
    member = raw_member(b"PaxHeader/x", b"99 path=x\n", kind=b"x")
    expect_error(ws, [member + raw_member(b"f", b"x") + END], EXIT_INVALID)


def test_decompression_bomb_hits_limit(ws: Workspace) -> None:
    bomb = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100_000
    archive = docker_archive(ws.input / "image.tar", [bomb])
    result = convert(ws, archive, "--max-layer-size", "1M")
    assert_one_line_error(result, EXIT_LIMIT, ws)
    assert "--max-layer-size" in result.stderr


@pytest.mark.parametrize(
    "data",
    [b"hello, I am not a tar" * 50, os.urandom(4096), b"\x00" * 511 + b"\x01"],
    ids=["text", "random", "nearly-zero"],
)
def test_layer_not_tar(ws: Workspace, data: bytes) -> None:
    expect_error(ws, [data], EXIT_INVALID)


def test_layer_empty_and_zero_accepted(ws: Workspace) -> None:
    names = expect_rootfs(ws, [OK_LAYER, b"", bytes(1024)])
    assert "etc/ok" in names


def test_member_type_unknown_rejected(ws: Workspace) -> None:
    layer = raw_member(b"weird", b"", kind=b"Z") + END
    stderr = expect_error(ws, [layer], EXIT_INVALID)
    assert "unsupported" in stderr


# -- JSON documents ---------------------------------------------------------

BAD_JSON = {
    "garbage": b"{not json",
    "null": b"null",
    "number": b"42",
    "string": b'"x"',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "invalid-utf8": b'["\xff\xfe"]',
}


@pytest.mark.parametrize("document", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_manifest_json_invalid(ws: Workspace, document: bytes) -> None:
    expect_error(ws, [OK_LAYER], EXIT_INVALID, manifest=document)


@pytest.mark.parametrize(
    "document",
    [
        b"[]",
        b"[1]",
        b'[{"Config": 1, "Layers": []}]',
        b'[{"Config": "c", "Layers": "x"}]',
        b'[{"Config": "c", "Layers": [1]}]',
    ],
    ids=["empty", "number", "config-number", "layers-string", "layer-number"],
)
def test_manifest_json_wrong_shape(ws: Workspace, document: bytes) -> None:
    archive = docker_archive(ws.input / "image.tar", [OK_LAYER], manifest=document)
    result = convert(ws, archive)
    assert "Traceback" not in result.stderr, describe(result)
    assert result.returncode in (3, 4), describe(result)
    assert len(result.stderr.strip().splitlines()) == 1, describe(result)


@pytest.mark.parametrize(
    "document",
    [*BAD_JSON.values(), b"{}", b'{"rootfs": null}', b'{"rootfs": {"type": "layers"}}'],
    ids=[*BAD_JSON.keys(), "empty", "rootfs-null", "no-diff-ids"],
)
def test_config_invalid(ws: Workspace, document: bytes) -> None:
    expect_error(ws, [OK_LAYER], EXIT_INVALID, config=document)


def test_config_wrong_platform_fields(ws: Workspace) -> None:
    config = {
        "os": ["linux"],
        "architecture": {"x": 1},
        "rootfs": {"type": "layers", "diff_ids": [sha256(OK_LAYER)]},
    }
    archive = docker_archive(
        ws.input / "image.tar", [OK_LAYER], config=json.dumps(config).encode()
    )
    result = convert(ws, archive, "--platform", "linux/amd64")
    assert "Traceback" not in result.stderr, describe(result)
    assert len(result.stderr.strip().splitlines()) <= 1, describe(result)


def test_config_diff_ids_disagree(ws: Workspace) -> None:
    stderr = expect_error(
        ws, [OK_LAYER], EXIT_INTEGRITY, diff_ids=[sha256(b"another layer")]
    )
    assert "diff_id mismatch" in stderr


def test_config_diff_ids_count_differs(ws: Workspace) -> None:
    diff_ids = [sha256(OK_LAYER)] * 2
    expect_error(ws, [OK_LAYER], EXIT_INVALID, diff_ids=diff_ids)


INDEX_CASES = {
    "garbage": b"{nope",
    "null": b"null",
    "list": b"[]",
    "deep": b'{"manifests":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "manifests-object": b'{"manifests": {}}',
    "annotations-list": json.dumps(
        {
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": "sha256:" + "a" * 64,
                    "annotations": ["x"],
                }
            ]
        }
    ).encode(),
    "media-type-list": json.dumps(
        {"manifests": [{"mediaType": ["x"], "digest": "sha256:" + "a" * 64}]}
    ).encode(),
    "digest-number": json.dumps(
        {
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": 5}
            ]
        }
    ).encode(),
}


@pytest.mark.parametrize("document", INDEX_CASES.values(), ids=INDEX_CASES.keys())
def test_index_json_invalid(ws: Workspace, document: bytes) -> None:
    archive = oci_archive(ws.input / "oci.tar", [OK_LAYER], index=document)
    result = convert(ws, archive)
    assert "Traceback" not in result.stderr, describe(result)
    assert result.returncode in (3, 4), describe(result)
    assert len(result.stderr.strip().splitlines()) == 1, describe(result)
    assert list(ws.out.iterdir()) == []


def test_image_selector_unicode_digit(ws: Workspace) -> None:
    archive = docker_archive(ws.input / "image.tar", [OK_LAYER])
    result = convert(ws, archive, "--image", "\u00b2")
    assert "Traceback" not in result.stderr, describe(result)
    assert result.returncode == 4, describe(result)


# -- odd names --------------------------------------------------------------


def test_name_with_newline_kept(ws: Workspace) -> None:
    names = expect_rootfs(ws, [tar_bytes([file("dir/a\nb", b"x")])])
    assert "dir/a\nb" in names


def test_name_with_nul_in_pax_path(ws: Workspace) -> None:
    layer = pax_member({b"path": b"a\0b"}, raw_member(b"x", b"1")) + END
    archive = docker_archive(ws.input / "image.tar", [layer])
    result = convert(ws, archive)
    assert "Traceback" not in result.stderr, describe(result)
    if result.returncode == 0:
        names = output_names(ws.output)
        assert all("\0" not in name for name in names), names
    else:
        assert_one_line_error(result, EXIT_INVALID, ws)


def test_name_not_utf8_kept(ws: Workspace) -> None:
    layer = raw_member(b"caf\xe9", b"x") + END
    archive = docker_archive(ws.input / "image.tar", [layer])
    result = convert(ws, archive)
    assert_success(result, ws)
    with tarfile.open(ws.output, encoding="utf-8", errors="surrogateescape") as tar:
        names = [m.name.encode("utf-8", "surrogateescape") for m in tar]
    assert b"caf\xe9" in names


def test_name_empty_member_skipped(ws: Workspace) -> None:
    layer = raw_member(b"", b"x") + raw_member(b"f", b"y") + END
    archive = docker_archive(ws.input / "image.tar", [layer])
    result = convert(ws, archive)
    assert "Traceback" not in result.stderr, describe(result)
    assert result.returncode in (0, EXIT_INVALID), describe(result)


def test_hundred_thousand_entries_one_directory(ws: Workspace) -> None:
    members = [directory("d")] + [
        Member(f"d/f{i:06d}", data=b"") for i in range(100_000)
    ]
    names = expect_rootfs(ws, [tar_bytes(members)])
    assert len([n for n in names if n.startswith("d/f")]) == 100_000


# -- big layers in bounded memory -------------------------------------------

MEASURE = textwrap.dedent(
    """
    import resource, subprocess, sys
    count = 0
    child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)
    while chunk := child.stdout.read(1 << 20):
        count += len(chunk)
    code = child.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(code, count, peak)
    """
)


def measure_stdout(*args: str) -> tuple[int, int, int]:
    """Run pulldocker writing to ``-o -``; return exit code, bytes, peak RSS (KiB)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "pulldocker", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    code, count, peak = map(int, result.stdout.split())
    return code, count, peak


def gnu_sparse_layer(real_size: int) -> bytes:
    """A PAX 1.0 GNU sparse member: ``real_size`` bytes, one 512-byte data run."""
    data_map = b"1\n0\n512\n"
    data_map += bytes(-len(data_map) % 512)
    payload = data_map + b"S" * 512
    records = {
        b"GNU.sparse.major": b"1",
        b"GNU.sparse.minor": b"0",
        b"GNU.sparse.name": b"huge",
        b"GNU.sparse.realsize": str(real_size).encode(),
    }
    return pax_member(records, raw_member(b"GNUSparseFile.0/huge", payload)) + END


@pytest.mark.slow
def test_sparse_ten_gib_bounded_memory(ws: Workspace) -> None:
    ten_gib = 10 * 1024**3
    archive = docker_archive(ws.input / "image.tar", [gnu_sparse_layer(ten_gib)])
    code, count, peak_kib = measure_stdout(str(archive), "-o", "-")
    assert code == 0
    assert count > ten_gib
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB"


@pytest.mark.slow
def test_gzip_zeros_bounded_memory(ws: Workspace) -> None:
    from isal import igzip

    size = 2 * 1024**3
    layer_path = ws.input / "zeros.gz"
    chunk = bytes(1 << 24)
    with igzip.open(layer_path, "wb", compresslevel=1) as out:
        out.write(tar_header_for(b"zeros", size))
        for _ in range(size // len(chunk)):
            out.write(chunk)
        out.write(END)
    layer = layer_path.read_bytes()
    layer_path.unlink()
    archive = docker_archive(
        ws.input / "image.tar", [layer], diff_ids=[zeros_diff_id(size)]
    )
    code, count, peak_kib = measure_stdout(
        str(archive), "-o", "-", "--tmpdir", str(ws.input)
    )
    assert code == 0
    assert count > size
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB"


def tar_header_for(name: bytes, size: int) -> bytes:
    return raw_header(name, size=size)


def zeros_diff_id(size: int) -> str:
    import hashlib

    digest = hashlib.sha256(tar_header_for(b"zeros", size))
    chunk = bytes(1 << 24)
    for _ in range(size // len(chunk)):
        digest.update(chunk)
    digest.update(END)
    return "sha256:" + digest.hexdigest()


def test_output_stays_out_of_cwd(ws: Workspace) -> None:
    archive = docker_archive(ws.input / "image.tar", [OK_LAYER])
    result = run_cli(archive, "-o", ws.output, cwd=ws.canary)
    assert result.returncode == 0, describe(result)
    assert list(ws.canary.iterdir()) == []
    shutil.rmtree(ws.out)
    ws.out.mkdir()


def test_compressed_archive_bomb_hits_limit(ws: Workspace) -> None:
    layer = tar_bytes([file("zeros", bytes(64 * 1024 * 1024))])
    plain = docker_archive(ws.input / "plain.tar", [layer])
    packed = ws.input / "image.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=9))
    plain.unlink()
    assert packed.stat().st_size < 100_000
    result = convert(ws, packed, "--max-layer-size", "1M")
    assert_one_line_error(result, EXIT_LIMIT, ws)
