"""Layer rules, one kind at a time: whiteouts, opaque directories, symlinked
parents, hardlinks, odd tar encodings, compression, archive forms and errors.

Expected trees follow Docker's layer unpacking (moby ``pkg/archive``) and the
OCI image-spec changeset rules. Where those differ, they follow the policy in
``pulldocker/flatten.py``: paths a layer writes survive its own whiteouts,
``..`` names are rejected, and a dangling symlinked parent is created at its
target.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from layerbuild import (
    OCI_INDEX,
    BlobStore,
    Case,
    Entry,
    Image,
    check_case_tree,
    clean_failure_problems,
    compress,
    decompress,
    docker_archive,
    docker_archive_files,
    expect,
    failure_text,
    flatten,
    layer,
    oci_index,
    oci_layout,
    read_tree,
    run_cli,
    sha256,
    strip_trailer,
    write_files,
)

RULE_CASES = {
    # -- whiteouts ------------------------------------------------------------
    "whiteout-spares-same-layer-file": Case(
        [['a "old"'], ['a "new"', ".wh.a"]],
        ['a "new"'],
    ),
    "whiteout-spares-same-layer-children": Case(
        [["d/", 'd/old "1"'], ["d/", 'd/new "2"', ".wh.d"]],
        ["d/", 'd/new "2"'],
    ),
    "whiteout-spares-nested-new-file": Case(
        [["a/", "a/sub/", 'a/sub/old "1"'], ['a/sub/new "2"', ".wh.a"]],
        ["a/", "a/sub/", 'a/sub/new "2"'],
    ),
    "whiteout-then-recreate-same-layer": Case(
        [["a/", 'a/old "1"'], [".wh.a", "a/", 'a/new "2"']],
        ["a/", 'a/new "2"'],
    ),
    "whiteout-of-hardlink-name": Case(
        [['f "x"', "g => f"], [".wh.g"]],
        ['f "x"'],
    ),
    "whiteout-with-dot-slash": Case(
        [["./a/", './a/f "1"', './b "2"'], ["./a/.wh.f", "./.wh.b"]],
        ["a/"],
    ),
    "whiteout-through-symlinked-parent": Case(
        [["usr/", "usr/lib/", 'usr/lib/x "1"', "lib -> usr/lib"], ["lib/.wh.x"]],
        ["lib -> usr/lib", "usr/", "usr/lib/"],
    ),
    "whiteout-through-absolute-symlink": Case(
        [["usr/", "usr/lib/", 'usr/lib/x "1"', "lib -> /usr/lib"], ["lib/.wh.x"]],
        ["lib -> /usr/lib", "usr/", "usr/lib/"],
    ),
    "whiteout-of-dir-holding-link-source": Case(
        [["d/", 'd/f "x"', "g => d/f"], [".wh.d"]],
        ['g "x"'],
    ),
    "aufs-metadata-names-skipped": Case(
        [['a "1"'], [".wh..wh.plnk/", ".wh..wh.aufs", 'b "2"']],
        ['a "1"', 'b "2"'],
    ),
    # -- opaque directories -------------------------------------------------------
    "opaque-after-kept-entries": Case(
        [["a/", 'a/old "1"', "a/keep/"], ['a/new "n"', "a/.wh..wh..opq"]],
        ["a/", 'a/new "n"'],
    ),
    "opaque-keeps-nested-new-file": Case(
        [["a/", "a/sub/", 'a/sub/old "1"'], ['a/sub/new "2"', "a/.wh..wh..opq"]],
        ["a/", "a/sub/", 'a/sub/new "2"'],
    ),
    "opaque-dir-replaced-by-file": Case(
        [["a/", 'a/x "1"'], ["a/.wh..wh..opq", 'a "file"']],
        ['a "file"'],
    ),
    "opaque-at-root": Case(
        [['a "1"', "b/", 'b/c "2"'], [".wh..wh..opq", 'c "3"']],
        ['c "3"'],
    ),
    "opaque-on-new-dir": Case(
        [['a "1"'], ["n/.wh..wh..opq", 'n/x "2"']],
        ['a "1"', "n/", 'n/x "2"'],
    ),
    # Docker's directory walk does not follow a symlink at its root, so an
    # opaque marker below a symlink changes nothing.
    "opaque-through-symlinked-parent": Case(
        [["usr/", "usr/lib/", 'usr/lib/x "1"', "lib -> usr/lib"], ["lib/.wh..wh..opq"]],
        ["lib -> usr/lib", "usr/", "usr/lib/", 'usr/lib/x "1"'],
    ),
    "opaque-in-lower-layer-kept-children": Case(
        [["a/", 'a/x "1"'], ["a/.wh..wh..opq", 'a/y "2"'], ['a/z "3"']],
        ["a/", 'a/y "2"', 'a/z "3"'],
    ),
    # -- replacing entries ---------------------------------------------------------
    "dir-file-dir-across-layers": Case(
        [["a/", 'a/x "1"'], ['a "file"'], ["a/", 'a/y "2"']],
        ["a/", 'a/y "2"'],
    ),
    "dir-entry-merges-metadata": Case(
        [["d/", 'd/x "1"'], [Entry("d/", "dir", mode=0o700, uid=5, gid=6)]],
        [Entry("d/", "dir", mode=0o700, uid=5, gid=6), 'd/x "1"'],
    ),
    "dir-entry-replaces-symlink": Case(
        [["real/", 'real/k "k"', "link -> real"], ["link/"]],
        ["link/", "real/", 'real/k "k"'],
    ),
    "file-replaces-symlink-not-target": Case(
        [["d/", 'd/f "1"', "link -> d/f"], ['link "2"']],
        ["d/", 'd/f "1"', 'link "2"'],
    ),
    "write-through-then-replace-link": Case(
        [["usr/", "usr/lib/", "lib -> usr/lib"], ['lib/x "1"', "lib/"]],
        ["lib/", "usr/", "usr/lib/", 'usr/lib/x "1"'],
    ),
    "symlink-replaces-dir-tree": Case(
        [["a/", 'a/x "1"', "b/"], ["a -> b"]],
        ["a -> b", "b/"],
    ),
    # -- symlinked parents -----------------------------------------------------------
    "relative-symlink-parent": Case(
        [["usr/", "usr/lib/", "lib -> usr/lib"], ['lib/x "1"']],
        ["lib -> usr/lib", "usr/", "usr/lib/", 'usr/lib/x "1"'],
    ),
    "absolute-symlink-parent": Case(
        [["usr/", "usr/lib/", "lib -> /usr/lib"], ['lib/x "1"']],
        ["lib -> /usr/lib", "usr/", "usr/lib/", 'usr/lib/x "1"'],
    ),
    "chained-symlink-parents": Case(
        [["usr/", "usr/lib/", "lib -> l2", "l2 -> /usr/lib"], ['lib/x "1"']],
        ["l2 -> /usr/lib", "lib -> l2", "usr/", "usr/lib/", 'usr/lib/x "1"'],
    ),
    "dotdot-symlink-parent": Case(
        [["lib/", "usr/", "usr/lib64 -> ../lib"], ['usr/lib64/x "1"']],
        ["lib/", 'lib/x "1"', "usr/", "usr/lib64 -> ../lib"],
    ),
    "escaping-symlink-parent-clamped": Case(
        [["tmp/", "evil -> ../../../../tmp"], ['evil/x "1"']],
        ["evil -> ../../../../tmp", "tmp/", 'tmp/x "1"'],
    ),
    "symlink-to-root-parent": Case(
        [["top -> /"], ['top/x "1"']],
        ["top -> /", 'x "1"'],
    ),
    "self-dir-symlink-parent": Case(
        [["d/", "d/self -> ."], ['d/self/self/x "1"']],
        ["d/", "d/self -> .", 'd/x "1"'],
    ),
    "dangling-symlink-parent-created": Case(
        [["lib -> usr/lib"], ['lib/x "1"']],
        ["lib -> usr/lib", "usr/", "usr/lib/", 'usr/lib/x "1"'],
    ),
    "symlink-parent-in-same-layer": Case(
        [["usr/", "usr/lib/", "lib -> usr/lib", 'lib/x "1"']],
        ["lib -> usr/lib", "usr/", "usr/lib/", 'usr/lib/x "1"'],
    ),
    # -- hardlinks ----------------------------------------------------------------
    "hardlink-keeps-old-content": Case(
        [['f "old"', "g => f"], ['f "new"']],
        ['f "new"', 'g "old"'],
    ),
    "hardlink-keeps-old-mode": Case(
        [['f "x"', "g => f"], [Entry("f", data=b"x", mode=0o600)]],
        [Entry("f", data=b"x", mode=0o600), 'g "x"'],
    ),
    "hardlink-header-chmods-shared-file": Case(
        [['f "x"'], [Entry("g", "hardlink", link="f", mode=0o750)]],
        [Entry("f", data=b"x", mode=0o750), "g => f"],
    ),
    "hardlink-chain-one-group": Case(
        [['a "1"', "b => a", "c => b"]],
        ['a "1"', "b => a", "c => a"],
    ),
    "hardlink-to-lower-layer": Case(
        [['a "1"'], ["b => a"]],
        ['a "1"', "b => a"],
    ),
    "hardlink-split-by-rewrite": Case(
        [['a "1"'], ["b => a"], ['a "2"']],
        ['a "2"', 'b "1"'],
    ),
    "hardlink-to-symlink": Case(
        [["s -> target", "h => s"]],
        ["s -> target", "h => s"],
    ),
    "hardlink-replaces-file": Case(
        [['a "1"', 'b "2"'], ["b => a"]],
        ['a "1"', "b => a"],
    ),
    "hardlink-target-dot-slash": Case(
        [['f "1"', "g => ./f"]],
        ['f "1"', "g => f"],
    ),
    "hardlink-target-leading-slash": Case(
        [["d/", 'd/f "1"', "g => /d/f"]],
        ["d/", 'd/f "1"', "g => d/f"],
    ),
    "hardlink-through-symlinked-parent": Case(
        [["usr/", "usr/lib/", 'usr/lib/f "1"', "lib -> usr/lib"], ["h => lib/f"]],
        ["lib -> usr/lib", "usr/", "usr/lib/", 'usr/lib/f "1"', "h => usr/lib/f"],
    ),
    "hardlink-to-fifo": Case(
        [[Entry("p", "fifo"), "q => p"]],
        [Entry("p", "fifo"), "q => p"],
    ),
    # -- names and metadata ----------------------------------------------------------
    "name-cleaning": Case(
        [['a//b "1"', './a/./c "2"', 'a/x/../d "3"', "./"]],
        ["a/", 'a/b "1"', 'a/c "2"', 'a/d "3"'],
    ),
    "rooted-dotdot-name-stays-inside": Case(
        [['/../etc/x "1"']],
        ["etc/", 'etc/x "1"'],
    ),
    "special-mode-bits-kept": Case(
        [
            [
                Entry("suid", data=b"1", mode=0o4755),
                Entry("sgid", data=b"2", mode=0o2755),
                Entry("tmp/", "dir", mode=0o1777),
                Entry("all", data=b"3", mode=0o7777),
            ]
        ],
        [
            Entry("all", data=b"3", mode=0o7777),
            Entry("sgid", data=b"2", mode=0o2755),
            Entry("suid", data=b"1", mode=0o4755),
            Entry("tmp/", "dir", mode=0o1777),
        ],
    ),
    "large-ids-pax-input": Case(
        [[Entry("f", data=b"1", uid=3_000_000, gid=4_000_000)]],
        [Entry("f", data=b"1", uid=3_000_000, gid=4_000_000)],
    ),
    "large-ids-gnu-input": Case(
        [[Entry("f", data=b"1", uid=3_000_000, gid=2**32 - 2)]],
        [Entry("f", data=b"1", uid=3_000_000, gid=2**32 - 2)],
        fmt="gnu",
    ),
    "old-regular-type-flags": Case(
        [[Entry("c", "contiguous", data=b"7"), Entry("o", "oldfile", data=b"0")]],
        ['c "7"', 'o "0"'],
        fmt="gnu",
    ),
    "xattr-merged-on-dir-entry": Case(
        [[Entry("d/", "dir", xattrs={"user.a": b"1"})], ["d/"]],
        [Entry("d/", "dir", xattrs={"user.a": b"1"})],
    ),
    "xattr-not-inherited-on-replace": Case(
        [[Entry("f", data=b"1", xattrs={"user.a": b"1"})], ['f "2"']],
        ['f "2"'],
    ),
    "long-symlink-target": Case(
        [["l -> /" + "t" * 300]],
        ["l -> /" + "t" * 300],
    ),
    "long-dir-names-split": Case(
        [["a" * 120 + "/" + "b" * 50 + "/", "x" * 99 + "/", "y" * 100 + "/"]],
        [
            "a" * 120 + "/",
            "a" * 120 + "/" + "b" * 50 + "/",
            "x" * 99 + "/",
            "y" * 100 + "/",
        ],
    ),
    "deep-path-over-256": Case(
        [["/".join(["p" * 60] * 6) + ' "deep"']],
        [
            *("/".join(["p" * 60] * depth) + "/" for depth in range(1, 6)),
            "/".join(["p" * 60] * 6) + ' "deep"',
        ],
    ),
    "ustar-prefix-names": Case(
        [["q" * 140 + "/", "q" * 140 + "/" + "r" * 90 + ' "1"']],
        ["q" * 140 + "/", "q" * 140 + "/" + "r" * 90 + ' "1"'],
        fmt="ustar",
    ),
    "implied-parents-of-whiteout": Case(
        [["etc/"], ["x/y/.wh.z"]],
        ["etc/", "x/", "x/y/"],
    ),
}


@pytest.mark.parametrize("case", RULE_CASES.values(), ids=RULE_CASES.keys())
def test_layer_rule(tmp_path: Path, case: Case) -> None:
    check_case_tree(tmp_path, case)


ERROR_CASES = {
    "symlink-loop-parent": ([["a -> b", "b -> a"], ['a/x "1"']], 3),
    "symlink-self-loop-parent": ([["a -> a"], ['a/x "1"']], 3),
    "symlink-to-file-parent": ([['f "1"', "l -> f"], ['l/x "1"']], 3),
    "file-as-parent": ([['a "1"', 'a/x "2"']], 3),
    "hardlink-to-missing": ([['a "1"', "b => nothing"]], 3),
    "hardlink-to-directory": ([["d/", "h => d"]], 3),
    "hardlink-to-itself": ([['a "1"'], ["a => a"]], 3),
    "hardlink-to-later-entry": ([["b => a", 'a "1"']], 3),
    "whiteout-dotdot-name": ([['a "1"'], ["d/.wh.."]], 3),
    "dotdot-only-name": ([["../"]], 3),
}


@pytest.mark.parametrize(
    ("layers", "code"), ERROR_CASES.values(), ids=ERROR_CASES.keys()
)
def test_layer_rule_error(tmp_path: Path, layers: list[list[str]], code: int) -> None:
    image = Image([layer(*specs) for specs in layers])
    archive = docker_archive(tmp_path / "image.tar", image)
    result, _ = flatten(archive, tmp_path / "out")
    assert result.returncode == code, failure_text(result)
    assert clean_failure_problems(result, tmp_path / "out") == []


# Docker rejects this target because it joins it to the root before cleaning.
# containerd clamps it to "a". Either is safe, but an escaping link is not.
def test_rooted_dotdot_link_target(tmp_path: Path) -> None:
    archive = docker_archive(
        tmp_path / "image.tar", Image([layer('a "1"', "h => /../a")])
    )
    result, output = flatten(archive, tmp_path / "out")
    if result.returncode != 0:
        assert clean_failure_problems(result, tmp_path / "out") == []
        return
    tree = read_tree(output)
    assert tree.links == {frozenset({"a", "h"})}
    assert tree.problems == []


# -- metadata in the output header --------------------------------------------


def test_fractional_mtime_kept(tmp_path: Path) -> None:
    specs = [Entry("d/", "dir", mtime=1_700_000_000.25), Entry("d/f", mtime=1.5)]
    archive = docker_archive(tmp_path / "image.tar", Image([layer(*specs)]))
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    members = read_tree(output).members
    assert members["d"].pax_headers.get("mtime") == "1700000000.25"
    assert members["d/f"].pax_headers.get("mtime") == "1.5"


def test_integer_mtime_kept(tmp_path: Path) -> None:
    specs = [Entry("f", mtime=1_234_567_890), Entry("big", mtime=2**34)]
    archive = docker_archive(tmp_path / "image.tar", Image([layer(*specs)]))
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    members = read_tree(output).members
    assert members["f"].mtime == 1_234_567_890
    assert members["big"].mtime == 2**34


# -- sparse files -------------------------------------------------------------


def _sparse_layer(tmp_path: Path, *tar_args: str) -> tuple[bytes, bytes]:
    """Make a layer with a sparse file using GNU tar; return it and the content."""
    source = tmp_path / "sparse-src"
    source.mkdir()
    path = source / "holes"
    with path.open("wb") as handle:
        handle.seek(1 << 20)
        handle.write(b"middle")
        handle.seek(3 << 20)
        handle.write(b"end")
        handle.truncate(4 << 20)
    os.chmod(path, 0o644)
    os.utime(path, (0, 0))
    content = path.read_bytes()
    out = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", "--sparse", *tar_args, "--owner=0", "--group=0", "--numeric-owner"]
        + ["-cf", str(out), "-C", str(source), "holes"],
        check=True,
    )
    return out.read_bytes(), content


SPARSE_FORMATS = {
    "posix-0.0": ("--format=posix", "--sparse-version=0.0"),
    "posix-0.1": ("--format=posix", "--sparse-version=0.1"),
    "posix-1.0": ("--format=posix", "--sparse-version=1.0"),
    "gnu": ("--format=gnu",),
}


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("args", SPARSE_FORMATS.values(), ids=SPARSE_FORMATS.keys())
def test_sparse_file_becomes_regular(tmp_path: Path, args: tuple[str, ...]) -> None:
    blob, content = _sparse_layer(tmp_path, *args)
    assert len(blob) < len(content)
    archive = docker_archive(tmp_path / "image.tar", Image([blob, layer("g => holes")]))
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    tree = read_tree(output)
    assert tree.members["g"].type in (b"0", b"1")
    assert tree.entries["holes"][0] == "f"
    assert tree.entries["holes"][4] == content
    assert tree.links == {frozenset({"g", "holes"})}
    assert tree.problems == []


# -- determinism and output forms ---------------------------------------------


MIXED_LAYERS = [
    ["etc/", 'etc/a "1"', "lib -> usr/lib", "usr/", "usr/lib/", 'usr/lib/f "f"'],
    ["etc/.wh.a", 'lib/g "g"', "usr/lib/h => usr/lib/f", Entry("run/p", "fifo")],
    ["usr/.wh..wh..opq", 'usr/new "n"', "b/", 'b/c "c"'],
]


def _mixed_archive(tmp_path: Path, fmt: str = "pax", name: str = "image.tar") -> Path:
    image = Image([layer(*specs, fmt=fmt) for specs in MIXED_LAYERS])
    return docker_archive(tmp_path / name, image)


def test_same_input_same_bytes(tmp_path: Path) -> None:
    archive = _mixed_archive(tmp_path)
    first, out1 = flatten(archive, tmp_path / "one")
    second, out2 = flatten(archive, tmp_path / "two")
    assert first.returncode == 0, failure_text(first)
    assert second.returncode == 0, failure_text(second)
    assert out1.read_bytes() == out2.read_bytes()


@pytest.mark.parametrize("fmt", ["gnu", "ustar"])
def test_input_format_same_bytes(tmp_path: Path, fmt: str) -> None:
    pax, out1 = flatten(_mixed_archive(tmp_path), tmp_path / "pax")
    other, out2 = flatten(_mixed_archive(tmp_path, fmt, "other.tar"), tmp_path / fmt)
    assert pax.returncode == 0, failure_text(pax)
    assert other.returncode == 0, failure_text(other)
    assert out1.read_bytes() == out2.read_bytes()


def test_mixed_layers_tree(tmp_path: Path) -> None:
    result, output = flatten(_mixed_archive(tmp_path), tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    tree = read_tree(output)
    expected = expect(
        "b/",
        'b/c "c"',
        "etc/",
        "lib -> usr/lib",
        "run/",
        Entry("run/p", "fifo"),
        "usr/",
        'usr/new "n"',
    )
    assert tree.entries == expected.entries
    assert tree.problems == []


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar.zst", ".tar.xz"])
def test_compressed_output_same_tar(tmp_path: Path, suffix: str) -> None:
    archive = _mixed_archive(tmp_path)
    plain, out_plain = flatten(archive, tmp_path / "plain")
    packed, out_packed = flatten(archive, tmp_path / "packed", name="rootfs" + suffix)
    assert plain.returncode == 0, failure_text(plain)
    assert packed.returncode == 0, failure_text(packed)
    stored = out_packed.read_bytes()
    assert stored[:4] != out_plain.read_bytes()[:4]
    assert decompress(stored) == out_plain.read_bytes()


def test_output_to_stdout(tmp_path: Path) -> None:
    archive = _mixed_archive(tmp_path)
    to_file, output = flatten(archive, tmp_path / "file")
    to_stdout = run_cli(archive, "-o", "-")
    assert to_file.returncode == 0, failure_text(to_file)
    assert to_stdout.returncode == 0, failure_text(to_stdout)
    assert to_stdout.stdout == output.read_bytes()


@pytest.mark.parametrize("wrap", [None, "gzip", "zstd", "xz", "bzip2"])
def test_input_from_stdin(tmp_path: Path, wrap: str | None) -> None:
    archive = _mixed_archive(tmp_path)
    reference, output = flatten(archive, tmp_path / "file")
    piped = run_cli("-", "-o", "-", stdin=compress(archive.read_bytes(), wrap))
    assert reference.returncode == 0, failure_text(reference)
    assert piped.returncode == 0, failure_text(piped)
    assert piped.stdout == output.read_bytes()


@pytest.mark.parametrize("wrap", ["gzip", "zstd", "xz", "bzip2"])
def test_compressed_archive_file(tmp_path: Path, wrap: str) -> None:
    archive = _mixed_archive(tmp_path)
    reference, output = flatten(archive, tmp_path / "plain")
    wrapped = tmp_path / f"image.tar.{wrap}"
    wrapped.write_bytes(compress(archive.read_bytes(), wrap))
    result, wrapped_output = flatten(wrapped, tmp_path / "wrapped")
    assert reference.returncode == 0, failure_text(reference)
    assert result.returncode == 0, failure_text(result)
    assert wrapped_output.read_bytes() == output.read_bytes()


def test_docker_archive_directory(tmp_path: Path) -> None:
    image = Image([layer(*specs) for specs in MIXED_LAYERS])
    reference, output = flatten(_mixed_archive(tmp_path), tmp_path / "tar")
    directory = docker_archive(tmp_path / "unpacked", image, as_tar=False)
    result, dir_output = flatten(directory, tmp_path / "dir")
    assert reference.returncode == 0, failure_text(reference)
    assert result.returncode == 0, failure_text(result)
    assert dir_output.read_bytes() == output.read_bytes()


@pytest.mark.parametrize("as_tar", [False, True], ids=["dir", "tar"])
def test_oci_layout_matches_docker_archive(tmp_path: Path, as_tar: bool) -> None:
    layers = [compress(layer(*specs), "gzip") for specs in MIXED_LAYERS]
    reference, output = flatten(_mixed_archive(tmp_path), tmp_path / "docker")
    layout = oci_layout(tmp_path / "layout", Image(layers), as_tar=as_tar)
    result, oci_output = flatten(layout, tmp_path / "oci")
    assert reference.returncode == 0, failure_text(reference)
    assert result.returncode == 0, failure_text(result)
    assert oci_output.read_bytes() == output.read_bytes()


# -- odd layers ---------------------------------------------------------------


ODD_LAYERS = {
    "gzip-in-docker-archive": compress(layer('b "2"'), "gzip"),
    "zstd-in-docker-archive": compress(layer('b "2"'), "zstd"),
    "no-trailer": strip_trailer(layer('b "2"')),
    "one-zero-block-trailer": strip_trailer(layer('b "2"')) + bytes(512),
}


@pytest.mark.parametrize("blob", ODD_LAYERS.values(), ids=ODD_LAYERS.keys())
def test_odd_layer_read(tmp_path: Path, blob: bytes) -> None:
    image = Image([layer('a "1"'), blob, bytes(10240)])
    archive = docker_archive(tmp_path / "image.tar", image)
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect('a "1"', 'b "2"').entries


def test_trailer_really_stripped() -> None:
    blob = strip_trailer(layer('b "2"'))
    assert len(blob) == 1024
    assert blob[-512:] != bytes(512)


# A truncated gzip stream has no diff_id to compute, so the config gets a
# placeholder; the decompression error must come first.
PLACEHOLDER_DIFF_ID = "sha256:" + "0" * 64
BAD_LAYERS = {
    "garbage": (b"this is not a tar archive" * 40, None),
    "truncated-member": (layer('a "' + "x" * 2000 + '"')[:1024], None),
    "truncated-gzip": (compress(layer('a "1"'), "gzip")[:30], PLACEHOLDER_DIFF_ID),
}


@pytest.mark.parametrize(
    ("blob", "diff_id"), BAD_LAYERS.values(), ids=BAD_LAYERS.keys()
)
def test_bad_layer_fails_cleanly(
    tmp_path: Path, blob: bytes, diff_id: str | None
) -> None:
    base = layer('a "1"')
    diff_ids = [sha256(base), diff_id] if diff_id else None
    archive = docker_archive(
        tmp_path / "image.tar", Image([base, blob], diff_ids=diff_ids)
    )
    result, _ = flatten(archive, tmp_path / "out")
    assert result.returncode == 3, failure_text(result)
    assert clean_failure_problems(result, tmp_path / "out") == []


@pytest.mark.parametrize("wrap", [None, "gzip"])
def test_diff_id_mismatch_fails(tmp_path: Path, wrap: str | None) -> None:
    blob = compress(layer('a "1"'), wrap)
    wrong = "sha256:" + "0" * 64
    archive = docker_archive(tmp_path / "image.tar", Image([blob], diff_ids=[wrong]))
    result, _ = flatten(archive, tmp_path / "out")
    assert result.returncode == 7, failure_text(result)
    assert clean_failure_problems(result, tmp_path / "out") == []


def test_diff_id_mismatch_stdout_exit(tmp_path: Path) -> None:
    wrong = "sha256:" + "0" * 64
    image = Image([layer('a "1"')], diff_ids=[wrong])
    archive = docker_archive(tmp_path / "image.tar", image)
    result = run_cli(archive, "-o", "-")
    assert result.returncode == 7, failure_text(result)


def test_oci_blob_digest_mismatch_fails(tmp_path: Path) -> None:
    blob = compress(layer('a "1"'), "gzip")
    layout = oci_layout(tmp_path / "layout", Image([blob]))
    stored = layout / "blobs" / "sha256" / sha256(blob)[7:]
    stored.write_bytes(compress(layer('a "2"'), "gzip"))
    result, _ = flatten(layout, tmp_path / "out")
    assert result.returncode == 7, failure_text(result)
    assert clean_failure_problems(result, tmp_path / "out") == []


# -- choosing an image --------------------------------------------------------


def _three_images(tmp_path: Path) -> Path:
    return docker_archive(
        tmp_path / "three.tar",
        Image([layer('which "one"')], tags=["repo/one:1", "repo/one:latest"]),
        Image([layer('which "two"')], tags=["two:2"]),
        Image([layer('which "untagged"')], tags=[]),
    )


@pytest.mark.parametrize(
    ("selector", "content"),
    [
        ("repo/one:1", "one"),
        ("repo/one", "one"),
        ("docker.io/repo/one:latest", "one"),
        ("two:2", "two"),
        ("1", "two"),
        ("2", "untagged"),
    ],
)
def test_image_selected(tmp_path: Path, selector: str, content: str) -> None:
    archive = _three_images(tmp_path)
    result, output = flatten(archive, tmp_path / "out", "--image", selector)
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect(f'which "{content}"').entries


@pytest.mark.parametrize("selector", ["three:3", "7", "two:3"])
def test_image_not_found(tmp_path: Path, selector: str) -> None:
    archive = _three_images(tmp_path)
    result, _ = flatten(archive, tmp_path / "out", "--image", selector)
    assert result.returncode == 4, failure_text(result)
    assert clean_failure_problems(result, tmp_path / "out") == []


def test_image_choices_listed(tmp_path: Path) -> None:
    archive = _three_images(tmp_path)
    result, _ = flatten(archive, tmp_path / "out")
    assert result.returncode == 2, failure_text(result)
    assert b"repo/one:1" in result.stderr
    assert b"two:2" in result.stderr
    assert b"[2]" in result.stderr
    assert clean_failure_problems(result, tmp_path / "out") == []


# -- comparison with umoci ----------------------------------------------------


def _list_unpacked(root: Path) -> tuple[dict[str, tuple[str, int, object]], set]:
    """List an unpacked rootfs as path -> (type, mode, content) plus link groups."""
    entries: dict[str, tuple[str, int, object]] = {}
    inodes: dict[int, set[str]] = {}
    for current, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(current) / name
            relative = str(path.relative_to(root))
            info = path.lstat()
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISDIR(info.st_mode):
                entries[relative] = ("d", mode, None)
            elif stat.S_ISLNK(info.st_mode):
                entries[relative] = ("l", 0o777, os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                entries[relative] = ("f", mode, path.read_bytes())
                if info.st_nlink > 1:
                    inodes.setdefault(info.st_ino, set()).add(relative)
            else:
                entries[relative] = ("?", mode, None)
    groups = {frozenset(names) for names in inodes.values() if len(names) > 1}
    return entries, groups


UMOCI_CASES = {
    "mixed": MIXED_LAYERS,
    "whiteouts-and-links": [
        ["d/", 'd/f "x"', "g => d/f", "keep/", 'keep/k "k"', "s -> keep"],
        [".wh.d", "s/.wh.k", 'keep/n "n"'],
        ["keep/.wh..wh..opq", 'keep/m "m"', 'g "new"'],
    ],
    "replace-kinds": [
        ["a/", 'a/x "1"', 'b "2"', "c -> a"],
        ['a "file"', "b/", 'b/y "3"', "c/"],
        ["a/", 'a/z "4"'],
    ],
}


@pytest.mark.umoci
@pytest.mark.parametrize("layers", UMOCI_CASES.values(), ids=UMOCI_CASES.keys())
def test_matches_umoci(tmp_path: Path, layers: list[list[str | Entry]]) -> None:
    if shutil.which("umoci") is None or shutil.which("skopeo") is None:
        pytest.skip("needs umoci and skopeo")
    image = Image([layer(*specs) for specs in layers])
    archive = docker_archive(tmp_path / "image.tar", image)
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    oci_dir = tmp_path / "oci"
    subprocess.run(
        ["skopeo", "copy", "-q", f"docker-archive:{archive}", f"oci:{oci_dir}:t"],
        check=True,
        capture_output=True,
    )
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{oci_dir}:t", str(bundle)],
        check=True,
        capture_output=True,
    )
    theirs, their_links = _list_unpacked(bundle / "rootfs")
    tree = read_tree(output)
    ours = {
        path: (node[0], node[1] if node[0] != "l" else 0o777, node[4])
        for path, node in tree.entries.items()
        if node[0] in ("d", "f", "l")
    }
    theirs = {path: value for path, value in theirs.items() if value[0] != "?"}
    assert ours == theirs
    assert tree.links == their_links


# -- more encodings -----------------------------------------------------------

MORE_CASES = {
    "whiteout-stored-as-hardlink": Case(
        [['a "1"', 'b "2"'], [Entry(".wh.a", "hardlink", link="b")]],
        ['b "2"'],
    ),
    "whiteout-stored-as-symlink": Case(
        [['a "1"', 'b "2"'], [".wh.a -> b"]],
        ['b "2"'],
    ),
    "whiteout-stored-as-dir": Case(
        [["a/", 'a/x "1"', 'b "2"'], [".wh.a/"]],
        ['b "2"'],
    ),
    "dot-names-are-ordinary": Case(
        [['... "3"', '..a "a"', 'a.. "b"', ".hidden/", '.hidden/..x "x"']],
        ['... "3"', '..a "a"', ".hidden/", '.hidden/..x "x"', 'a.. "b"'],
    ),
    "non-utf8-long-name": Case(
        [[Entry(b"n" * 120 + b"\xff/" + b"o" * 150, data=b"1")]],
        [
            Entry(b"n" * 120 + b"\xff/", "dir"),
            Entry(b"n" * 120 + b"\xff/" + b"o" * 150, data=b"1"),
        ],
    ),
    "non-utf8-link-targets": Case(
        [
            [
                Entry(b"d\xff/", "dir"),
                Entry(b"d\xff/f", data=b"1"),
                Entry(b"g", "hardlink", link=b"d\xff/f"),
                Entry("s", "symlink", link=b"/t\xfe" * 40),
            ]
        ],
        [
            Entry(b"d\xff/", "dir"),
            Entry(b"d\xff/f", data=b"1"),
            Entry(b"g", "hardlink", link=b"d\xff/f"),
            Entry("s", "symlink", link=b"/t\xfe" * 40),
        ],
    ),
    "xattrs-on-dir-and-symlink": Case(
        [
            [
                Entry("d/", "dir", xattrs={"user.d": b"\x00\xff"}),
                Entry("s", "symlink", link="d", xattrs={"user.s": b"v"}),
            ]
        ],
        [
            Entry("d/", "dir", xattrs={"user.d": b"\x00\xff"}),
            Entry("s", "symlink", link="d", xattrs={"user.s": b"v"}),
        ],
    ),
    "repeated-layer-applied-twice": Case(
        [['a "1"'], ['b "2"'], [".wh.b"], ['b "2"']],
        ['a "1"', 'b "2"'],
    ),
    "whiteout-then-link-to-removed": Case(
        [['f "x"'], ["g => f", ".wh.f"]],
        ['g "x"'],
    ),
}


@pytest.mark.parametrize("case", MORE_CASES.values(), ids=MORE_CASES.keys())
def test_layer_encoding(tmp_path: Path, case: Case) -> None:
    check_case_tree(tmp_path, case)


def test_entries_below_whiteout_name_dropped(tmp_path: Path) -> None:
    image = Image([layer('a "1"', 'b "2"'), layer(".wh.a/", '.wh.a/x "x"')])
    archive = docker_archive(tmp_path / "image.tar", image)
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    tree = read_tree(output)
    assert tree.entries == expect('b "2"').entries
    assert tree.problems == []


# Docker and containerd read layers with Go's archive/tar, which returns a
# global header as a member of its own; moby's UnpackLayer then ignores it.
@pytest.mark.parametrize(
    "records",
    [{"uid": "1234", "gid": "1234"}, {"comment": "0123abcd"}, {"path": "renamed"}],
    ids=["ids", "comment", "path"],
)
def test_global_pax_header_ignored(tmp_path: Path, records: dict[str, str]) -> None:
    blob = layer("d/", 'd/f "1"', 'g "2"', global_pax=records)
    assert blob[156:157] == b"g"
    archive = docker_archive(tmp_path / "image.tar", Image([blob]))
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect("d/", 'd/f "1"', 'g "2"').entries


def _many_segment_layer(tmp_path: Path, *tar_args: str) -> tuple[bytes, bytes]:
    """Make a GNU tar layer with a 60-segment sparse file (extended maps)."""
    source = tmp_path / "many-src"
    source.mkdir()
    path = source / "holes"
    with path.open("wb") as handle:
        for index in range(60):
            handle.seek(index * 65536 + 4096)
            handle.write(b"%04d" % index)
        handle.truncate(60 * 65536 + 8192)
    content = path.read_bytes()
    out = tmp_path / "many.tar"
    subprocess.run(
        ["tar", "--sparse", *tar_args, "--owner=0", "--group=0", "--numeric-owner"]
        + ["-cf", str(out), "-C", str(source), "holes"],
        check=True,
    )
    return out.read_bytes(), content


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("args", SPARSE_FORMATS.values(), ids=SPARSE_FORMATS.keys())
def test_sparse_many_segments(tmp_path: Path, args: tuple[str, ...]) -> None:
    blob, content = _many_segment_layer(tmp_path, *args)
    assert len(blob) < len(content)
    archive = docker_archive(tmp_path / "image.tar", Image([blob]))
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries["holes"][4] == content


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("args", SPARSE_FORMATS.values(), ids=SPARSE_FORMATS.keys())
def test_sparse_all_hole(tmp_path: Path, args: tuple[str, ...]) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "empty").write_bytes(b"")
    os.truncate(source / "empty", 1 << 20)
    out = tmp_path / "hole.tar"
    subprocess.run(
        ["tar", "--sparse", *args, "-cf", str(out), "-C", str(source), "empty"],
        check=True,
    )
    archive = docker_archive(tmp_path / "image.tar", Image([out.read_bytes()]))
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries["empty"][4] == bytes(1 << 20)


# -- archive forms ------------------------------------------------------------


def test_symlinked_layer_member(tmp_path: Path) -> None:
    first, second = layer('a "1"'), layer('b "2"')
    image = Image([first, second, first])
    files = docker_archive_files([image])
    manifest = json.loads(files["manifest.json"])
    manifest[0]["Layers"][2] = "dup/layer.tar"
    files["manifest.json"] = json.dumps(manifest).encode()
    archive = tmp_path / "image.tar"
    write_files(archive, files)
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo("dup/layer.tar")
        info.type = tarfile.SYMTYPE
        info.linkname = "../" + manifest[0]["Layers"][0]
        tar.addfile(info)
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect('a "1"', 'b "2"').entries


def test_repeated_gzip_blob_in_layout(tmp_path: Path) -> None:
    blob = compress(layer('a "1"'), "gzip")
    image = Image([blob, compress(layer(".wh.a"), "gzip"), blob])
    layout = oci_layout(tmp_path / "layout", image)
    result, output = flatten(layout, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect('a "1"').entries


def test_nested_index_with_attestation(tmp_path: Path) -> None:
    store = BlobStore()
    amd64 = store.add_image(Image([compress(layer('arch "amd64"'), "gzip")]))
    arm64 = store.add_image(
        Image([compress(layer('arch "arm64"'), "gzip")], architecture="arm64")
    )
    attestation = store.add_image(
        Image(
            [b"{}"],
            os="unknown",
            architecture="unknown",
            media_types=["application/vnd.in-toto+json"],
            diff_ids=["sha256:" + "0" * 64],
        ),
        annotations={"vnd.docker.reference.type": "attestation-manifest"},
    )
    inner = store.add(oci_index([attestation, arm64, amd64]), OCI_INDEX)
    inner["annotations"] = {"org.opencontainers.image.ref.name": "1"}
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    files["index.json"] = oci_index([inner])
    files.update(store.files)
    layout = write_files(tmp_path / "layout.tar", files)
    result, output = flatten(layout, tmp_path / "out", "--platform", "linux/arm64")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect('arch "arm64"').entries


@pytest.mark.parametrize(("platform", "code"), [("linux/arm64", 0), ("linux/amd64", 4)])
def test_docker_archive_platform_check(
    tmp_path: Path, platform: str, code: int
) -> None:
    image = Image([layer('a "1"')], architecture="arm64")
    archive = docker_archive(tmp_path / "image.tar", image)
    result, _ = flatten(archive, tmp_path / "out", "--platform", platform)
    assert result.returncode == code, failure_text(result)


def test_failure_keeps_existing_output(tmp_path: Path) -> None:
    wrong = "sha256:" + "0" * 64
    image = Image([layer('a "1"')], diff_ids=[wrong])
    archive = docker_archive(tmp_path / "image.tar", image)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "rootfs.tar").write_bytes(b"old")
    result, output = flatten(archive, out_dir)
    assert result.returncode == 7, failure_text(result)
    assert output.read_bytes() == b"old"
    assert sorted(p.name for p in out_dir.iterdir()) == ["rootfs.tar"]


def test_missing_output_dir_fails(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "image.tar", Image([layer('a "1"')]))
    result = run_cli(archive, "-o", tmp_path / "nowhere" / "rootfs.tar")
    assert result.returncode == 2, failure_text(result)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()


def test_entry_order_same_bytes(tmp_path: Path) -> None:
    specs = ["z/", 'z/b "2"', 'a "1"', "z/h => a", "l -> z"]
    forward = docker_archive(tmp_path / "f.tar", Image([layer(*specs)]))
    shuffled = ["l -> z", 'a "1"', 'z/b "2"', "z/h => a", "z/"]
    backward = docker_archive(tmp_path / "b.tar", Image([layer(*shuffled)]))
    first, out1 = flatten(forward, tmp_path / "one")
    second, out2 = flatten(backward, tmp_path / "two")
    assert first.returncode == 0, failure_text(first)
    assert second.returncode == 0, failure_text(second)
    assert out1.read_bytes() == out2.read_bytes()


def test_long_whiteout_name(tmp_path: Path) -> None:
    directory = "w" * 90
    victim = "v" * 150
    image = Image(
        [
            layer(f"{directory}/", f'{directory}/{victim} "1"', f'{directory}/k "k"'),
            layer(f"{directory}/.wh.{victim}", fmt="gnu"),
        ]
    )
    archive = docker_archive(tmp_path / "image.tar", image)
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    expected = expect(f"{directory}/", f'{directory}/k "k"')
    assert read_tree(output).entries == expected.entries


def test_max_layer_size_enforced(tmp_path: Path) -> None:
    blob = compress(layer(Entry("big", data=bytes(4 << 20))), "gzip")
    archive = docker_archive(tmp_path / "image.tar", Image([blob]))
    out_dir = tmp_path / "out"
    result, _ = flatten(archive, out_dir, "--max-layer-size", "1M")
    assert result.returncode == 8, failure_text(result)
    assert clean_failure_problems(result, out_dir) == []
