"""Flattening cases taken from faults reported against other image flatteners.

Each case builds its layers, runs ``python -m pulldocker`` on an archive of
them and compares the output with a tree written out by hand. The expected
trees follow Docker's layer unpacking (moby ``pkg/archive``); where runtimes
differ, they follow the policy stated in ``pulldocker/flatten.py``. The
comment over each case links the public report it comes from.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import zstandard
from layerbuild import (
    DOCKER_LAYER_ZSTD,
    LAYER_GZIP,
    LAYER_TAR,
    LAYER_ZSTD,
    BlobStore,
    Case,
    Entry,
    Image,
    check_case_tree,
    clean_failure_problems,
    compress,
    docker25_archive,
    docker_archive,
    docker_archive_files,
    expect,
    failure_text,
    flatten,
    layer,
    oci_index,
    read_tree,
    sha256,
    write_files,
)

# security.capability for cap_net_admin,cap_net_raw=p (VFS_CAP_REVISION_2).
PING_CAPABILITY = bytes.fromhex("0000000200300000") + bytes(12)
LONG = "m" * 120
SITE = "usr/lib/python2.7/site-packages"


TREE_CASES = {
    # https://github.com/google/go-containerregistry/issues/1897
    "opaque-dir-hides-lower-children": Case(
        [["a/", "a/b/", 'a/b/foo "x"'], ["a/", "a/.wh..wh..opq"]],
        ["a/"],
    ),
    # https://github.com/google/go-containerregistry/pull/2191
    "recreated-dir-drops-old-children": Case(
        [["a/", 'a/foo "1"', "b/", 'b/bar "2"'], [".wh.a"], ["a/", 'a/baz "3"']],
        ["a/", 'a/baz "3"', "b/", 'b/bar "2"'],
    ),
    # https://github.com/google/go-containerregistry/issues/1623
    "markers-in-only-layer-removed": Case(
        [
            [
                "manifests/",
                "manifests/.wh..wh..opq",
                'manifests/x.yaml "x"',
                "root/",
                "root/.wh..wh..opq",
            ]
        ],
        ["manifests/", 'manifests/x.yaml "x"', "root/"],
    ),
    # https://github.com/larsks/undocker/issues/8
    "whiteout-of-missing-path-is-noop": Case([["etc/"], ["etc/.wh.ghost"]], ["etc/"]),
    "whiteout-removes-whole-dir": Case([["d/", 'd/x "1"'], [".wh.d"]], []),
    "whiteout-of-symlink-keeps-target": Case(
        [["real/", 'real/keep "k"', "link -> real"], [".wh.link"]],
        ["real/", 'real/keep "k"'],
    ),
    # https://github.com/anchore/stereoscope/pull/696
    "opaque-prefix-name-is-not-opaque": Case(
        [["etc/", 'etc/passwd "p"', 'etc/hostname "h"'], ["etc/.wh..wh..opqX"]],
        ["etc/", 'etc/hostname "h"', 'etc/passwd "p"'],
    ),
    # https://github.com/appc/docker2aci/issues/98
    "hardlink-survives-whited-out-source": Case(
        [['LINK-A "data"', "LINK-Z => LINK-A"], [".wh.LINK-A"]],
        ['LINK-Z "data"'],
    ),
    # https://github.com/anchore/stereoscope/pull/670
    "hardlink-source-replaced-by-symlink": Case(
        [['app/bin "X"', "cache/h1 => app/bin"], ["app/bin -> /cache/h1"]],
        ["app/", "app/bin -> /cache/h1", "cache/", 'cache/h1 "X"'],
    ),
    # https://github.com/goldmann/docker-squash/issues/118
    "file-and-hardlink-in-two-layers": Case(
        [
            ["usr/", 'usr/f "v1"', "usr/g => usr/f"],
            ["usr/", 'usr/f "v2"', "usr/g => usr/f"],
        ],
        ["usr/", 'usr/f "v2"', "usr/g => usr/f"],
    ),
    # https://github.com/rmohr/bazeldnf/issues/47
    "duplicate-in-layer-last-wins": Case([['x "first"', 'x "second"']], ['x "second"']),
    # https://github.com/apple/container/issues/1797
    "hardlinks-without-parent-entries": Case(
        [
            [
                'bin/app.repo_mapping "m"',
                'bin/app "ELF"',
                'bin/app.runfiles/_main/main.go "go"',
                "bin/app.runfiles/_repo_mapping => bin/app.repo_mapping",
                "bin/app.runfiles/_main/app_/app => bin/app",
            ]
        ],
        [
            "bin/",
            'bin/app "ELF"',
            'bin/app.repo_mapping "m"',
            "bin/app.runfiles/",
            "bin/app.runfiles/_main/",
            'bin/app.runfiles/_main/main.go "go"',
            "bin/app.runfiles/_main/app_/",
            "bin/app.runfiles/_main/app_/app => bin/app",
            "bin/app.runfiles/_repo_mapping => bin/app.repo_mapping",
        ],
    ),
    # https://github.com/opencontainers/image-tools/issues/41
    "symlink-replaces-symlink": Case(
        [
            ["bin/", 'lib/systemd/systemd "v1"', "bin/systemd -> /lib/systemd/systemd"],
            [
                "bin/systemd -> /lib/systemd/systemd-new",
                'lib/systemd/systemd-new "v2"',
            ],
        ],
        [
            "bin/",
            "bin/systemd -> /lib/systemd/systemd-new",
            "lib/",
            "lib/systemd/",
            'lib/systemd/systemd "v1"',
            'lib/systemd/systemd-new "v2"',
        ],
    ),
    # https://github.com/google/go-containerregistry/issues/2238
    "symlink-targets-kept-verbatim": Case(
        [
            [
                "usr/",
                "usr/lib64/",
                'usr/lib64/ld-linux-x86-64.so.2 "ld"',
                "lib64 -> /usr/lib64",
                "etc/",
                "etc/mtab -> ../proc/self/mounts",
            ]
        ],
        [
            "etc/",
            "etc/mtab -> ../proc/self/mounts",
            "lib64 -> /usr/lib64",
            "usr/",
            "usr/lib64/",
            'usr/lib64/ld-linux-x86-64.so.2 "ld"',
        ],
    ),
    # https://github.com/google/go-containerregistry/issues/2399
    "dot-slash-root-entries": Case(
        [
            [
                "./",
                "./etc/",
                './etc/os-release "x"',
                Entry("./tmp/", "dir", mode=0o1777),
            ],
            ["./", "./app/", './app/run "y"'],
        ],
        [
            "app/",
            'app/run "y"',
            "etc/",
            'etc/os-release "x"',
            Entry("tmp/", "dir", mode=0o1777),
        ],
    ),
    # https://github.com/google/go-containerregistry/pull/2227
    "absolute-name-lands-in-root": Case(
        [["etc/", 'etc/ok "1"', '/abs/path "y"']],
        ["abs/", 'abs/path "y"', "etc/", 'etc/ok "1"'],
    ),
    # https://github.com/moby/tool/issues/218
    "long-names-pax-input": Case(
        [[f'{SITE}/{LONG}.pyc "x"', f"{SITE}/{LONG}.pyo => {SITE}/{LONG}.pyc"]],
        [
            "usr/",
            "usr/lib/",
            "usr/lib/python2.7/",
            f"{SITE}/",
            f'{SITE}/{LONG}.pyc "x"',
            f"{SITE}/{LONG}.pyo => {SITE}/{LONG}.pyc",
        ],
    ),
    "long-names-gnu-input": Case(
        [[f'{SITE}/{LONG}.pyc "x"', f"{SITE}/{LONG}.pyo => {SITE}/{LONG}.pyc"]],
        [
            "usr/",
            "usr/lib/",
            "usr/lib/python2.7/",
            f"{SITE}/",
            f'{SITE}/{LONG}.pyc "x"',
            f"{SITE}/{LONG}.pyo => {SITE}/{LONG}.pyc",
        ],
        fmt="gnu",
    ),
    # https://github.com/containerd/accelerated-container-image/issues/251
    "binary-capability-xattr-kept": Case(
        [
            [
                "usr/",
                "usr/bin/",
                Entry(
                    "usr/bin/ping",
                    data=b"ELF",
                    mode=0o755,
                    xattrs={"security.capability": PING_CAPABILITY},
                ),
            ]
        ],
        [
            "usr/",
            "usr/bin/",
            Entry(
                "usr/bin/ping",
                data=b"ELF",
                mode=0o755,
                xattrs={"security.capability": PING_CAPABILITY},
            ),
        ],
    ),
    # https://github.com/goldmann/docker-squash/issues/86
    "non-utf8-names-in-ustar": Case(
        [
            ["data/", Entry(b"data/caf\xe9.txt", data=b"x")],
            [b"data/.wh.caf\xe9.txt", Entry(b"data/\xc0bad", data=b"y")],
        ],
        ["data/", Entry(b"data/\xc0bad", data=b"y")],
        fmt="ustar",
    ),
    "non-utf8-names-in-pax": Case(
        [
            ["data/", Entry(b"data/caf\xe9.txt", data=b"x")],
            [b"data/.wh.caf\xe9.txt", Entry(b"data/\xc0bad", data=b"y")],
        ],
        ["data/", Entry(b"data/\xc0bad", data=b"y")],
    ),
    # https://github.com/apptainer/singularity/issues/5128
    "device-nodes-copied-through": Case(
        [
            [
                "dev/",
                Entry("dev/agpgart", "chardev", mode=0o660, devmajor=10, devminor=175),
                Entry("dev/loop0", "blockdev", mode=0o660, devmajor=7, devminor=0),
                Entry("run/initctl", "fifo", mode=0o600),
            ]
        ],
        [
            "dev/",
            Entry("dev/agpgart", "chardev", mode=0o660, devmajor=10, devminor=175),
            Entry("dev/loop0", "blockdev", mode=0o660, devmajor=7, devminor=0),
            "run/",
            Entry("run/initctl", "fifo", mode=0o600),
        ],
    ),
    # https://github.com/google/go-containerregistry/issues/367
    "empty-and-all-zero-layers": Case(
        [['a "1"'], b"", bytes(1024)],
        ['a "1"'],
    ),
}


@pytest.mark.parametrize("case", TREE_CASES.values(), ids=TREE_CASES.keys())
def test_flatten_matches_expected_tree(tmp_path: Path, case: Case) -> None:
    check_case_tree(tmp_path, case)


def test_device_numbers_in_output_header(tmp_path: Path) -> None:
    devices = [Entry("dev/agpgart", "chardev", devmajor=10, devminor=175)]
    archive = docker_archive(tmp_path / "image.tar", Image([layer(*devices)]))
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    member = read_tree(output).members["dev/agpgart"]
    assert member.ischr()
    assert (member.devmajor, member.devminor) == (10, 175)


def test_long_names_written_in_full(tmp_path: Path) -> None:
    long_dir = "d" * 150
    specs = [f'{long_dir}/{LONG} "x"', f"{long_dir}/link => {long_dir}/{LONG}"]
    archive = docker_archive(tmp_path / "image.tar", Image([layer(*specs)]))
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    tree = read_tree(output)
    names = {f"{long_dir}/{LONG}", f"{long_dir}/link"}
    assert tree.links == {frozenset(names)}
    assert tree.entries[f"{long_dir}/{LONG}"][4] == b"x"
    assert tree.entries[f"{long_dir}/link"][4] == b"x"
    linknames = {tree.members[name].linkname for name in names}
    assert linknames - {""} <= names


# Inputs that the core rejects by policy: a name or hardlink target that
# climbs out of the root with "..", and a whiteout that names no file.
ERROR_CASES = {
    # https://github.com/google/go-containerregistry/pull/2227
    "dotdot-name": [["etc/", 'etc/ok "1"', '../../tmp/evil "x"']],
    "dotdot-hardlink-target": [["etc/", 'etc/ok "1"', "h => ../../etc/shadow"]],
    "dotdot-inside-name": [['a/../../evil "x"']],
    # https://github.com/anchore/stereoscope/pull/647
    "bare-whiteout-in-dir": [
        ["etc/", 'etc/passwd "p"', 'etc/hostname "h"'],
        ["etc/.wh."],
    ],
    "bare-whiteout-at-root": [["etc/", 'etc/passwd "p"'], [".wh."]],
}


@pytest.mark.parametrize("layers", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_rejected_input_fails_cleanly(tmp_path: Path, layers: list[list[str]]) -> None:
    image = Image([layer(*specs) for specs in layers])
    archive = docker_archive(tmp_path / "image.tar", image)
    result, _ = flatten(archive, tmp_path / "out")
    assert result.returncode == 3, failure_text(result)
    assert clean_failure_problems(result, tmp_path / "out") == []


# https://github.com/pelagos-containers/pelagos/issues/441
def test_compression_read_from_magic_bytes(tmp_path: Path) -> None:
    image = Image(
        [
            compress(layer('a "1"'), "gzip"),
            layer('b "2"'),
            compress(layer('c "3"'), "gzip"),
            layer('d "4"'),
        ],
        media_types=[
            LAYER_GZIP,
            LAYER_TAR,
            LAYER_TAR,
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ],
    )
    store = BlobStore()
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    files["index.json"] = oci_index([store.add_image(image)])
    files.update(store.files)
    layout = write_files(tmp_path / "layout", files, as_tar=False)
    result, output = flatten(layout, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    tree = read_tree(output)
    assert tree.entries == expect('a "1"', 'b "2"', 'c "3"', 'd "4"').entries


def _zstd_large_window(data: bytes) -> bytes:
    """Compress with a 256 MiB window declared in the frame header."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=28, enable_ldm=True, write_content_size=False
    )
    compressor = zstandard.ZstdCompressor(compression_params=params)
    chunker = compressor.chunker()
    return b"".join([*chunker.compress(data), *chunker.finish()])


# https://github.com/concourse/registry-image-resource/pull/405
def test_zstd_layers_any_media_type(tmp_path: Path) -> None:
    image = Image(
        [
            compress(layer('a "1"'), "zstd"),
            compress(layer('b "2"'), "zstd"),
            _zstd_large_window(layer('c "3"')),
        ],
        media_types=[LAYER_ZSTD, DOCKER_LAYER_ZSTD, DOCKER_LAYER_ZSTD],
    )
    store = BlobStore()
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    files["index.json"] = oci_index([store.add_image(image)])
    files.update(store.files)
    layout = write_files(tmp_path / "layout.tar", files)
    result, output = flatten(layout, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    tree = read_tree(output)
    assert tree.entries == expect('a "1"', 'b "2"', 'c "3"').entries


def test_large_window_frame_declares_window(tmp_path: Path) -> None:
    frame = _zstd_large_window(layer('c "3"'))
    params = zstandard.get_frame_parameters(frame)
    assert params.window_size > 2**27


# -- attestation manifests ------------------------------------------------------


def _attested_layout(tmp_path: Path, *, bad_layer: bool = False) -> Path:
    """Write an OCI layout: amd64 and arm64 images plus an attestation manifest.

    The attestation manifest comes first in the index, so that a "first
    manifest" fallback would pick it.
    """
    store = BlobStore()
    amd64_layers = [compress(layer('arch "amd64"'), "gzip")]
    media_types = None
    if bad_layer:
        amd64_layers.append(b'{"_type": "https://in-toto.io/Statement/v0.1"}')
        media_types = [LAYER_GZIP, "application/vnd.in-toto+json"]
    amd64 = store.add_image(Image(amd64_layers, media_types=media_types))
    arm64 = store.add_image(
        Image([compress(layer('arch "arm64"'), "gzip")], architecture="arm64")
    )
    statement = b'{"_type": "https://in-toto.io/Statement/v0.1"}'
    attestation = store.add_image(
        Image(
            [statement],
            os="unknown",
            architecture="unknown",
            media_types=["application/vnd.in-toto+json"],
            diff_ids=["sha256:" + "0" * 64],
        ),
        annotations={
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": amd64["digest"],
        },
    )
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    files["index.json"] = oci_index([attestation, amd64, arm64])
    files.update(store.files)
    return write_files(tmp_path / "layout", files, as_tar=False)


# https://github.com/containerd/containerd/issues/8243
@pytest.mark.parametrize(
    ("args", "arch"),
    [
        ((), b"amd64"),
        (("--platform", "linux/amd64"), b"amd64"),
        (("--platform", "linux/arm64"), b"arm64"),
    ],
    ids=["default", "amd64", "arm64"],
)
def test_attestation_manifest_never_chosen(
    tmp_path: Path, args: tuple[str, ...], arch: bytes
) -> None:
    layout = _attested_layout(tmp_path)
    result, output = flatten(layout, tmp_path / "out", *args)
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect(f'arch "{arch.decode()}"').entries


def test_non_tar_layer_rejected(tmp_path: Path) -> None:
    layout = _attested_layout(tmp_path, bad_layer=True)
    result, _ = flatten(layout, tmp_path / "out", "--platform", "linux/amd64")
    assert b"in-toto" in result.stderr
    assert clean_failure_problems(result, tmp_path / "out") == []


# -- Docker 25 archives -----------------------------------------------------------


def _docker25_image() -> Image:
    return Image([layer('a "1"'), layer(".wh.a", 'b "2"')], tags=["x:1"])


# https://github.com/goldmann/docker-squash/issues/236
def test_docker25_archive_through_manifest(tmp_path: Path) -> None:
    archive = docker25_archive(tmp_path / "image.tar", _docker25_image())
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect('b "2"').entries


def test_docker25_archive_through_index(tmp_path: Path) -> None:
    archive = docker25_archive(tmp_path / "full.tar", _docker25_image())
    with tarfile.open(archive) as source:
        files = {
            m.name: source.extractfile(m).read()  # type: ignore[union-attr]
            for m in source.getmembers()
            if m.isfile() and m.name != "manifest.json"
        }
    without_manifest = write_files(tmp_path / "image.tar", files)
    result, output = flatten(without_manifest, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect('b "2"').entries


# -- several images in one archive ------------------------------------------------


def _two_image_archive(tmp_path: Path) -> Path:
    base = layer("etc/", 'etc/shared "s"')
    alpine = Image([base, layer('etc/alpine-release "3"')], tags=["alpine:latest"])
    busybox = Image([base, layer('bin/busybox "bb"')], tags=["busybox:latest"])
    return docker_archive(tmp_path / "two.tar", alpine, busybox)


BUSYBOX_TREE = ["bin/", 'bin/busybox "bb"', "etc/", 'etc/shared "s"']
ALPINE_TREE = ["etc/", 'etc/alpine-release "3"', 'etc/shared "s"']


# https://github.com/podman-container-tools/skopeo/issues/556
@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("busybox:latest", BUSYBOX_TREE),
        ("busybox", BUSYBOX_TREE),
        ("1", BUSYBOX_TREE),
        ("alpine:latest", ALPINE_TREE),
        ("0", ALPINE_TREE),
    ],
)
def test_multi_image_select(tmp_path: Path, selector: str, expected: list[str]) -> None:
    archive = _two_image_archive(tmp_path)
    result, output = flatten(archive, tmp_path / "out", "--image", selector)
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect(*expected).entries


def test_multi_image_base_layer_stored_once(tmp_path: Path) -> None:
    archive = _two_image_archive(tmp_path)
    with tarfile.open(archive) as tar:
        layers = [m.name for m in tar.getmembers() if m.name.endswith("layer.tar")]
    assert len(layers) == 3


def test_multi_image_needs_selection(tmp_path: Path) -> None:
    archive = _two_image_archive(tmp_path)
    result, _ = flatten(archive, tmp_path / "out")
    assert result.returncode == 2
    assert b"alpine:latest" in result.stderr
    assert b"busybox:latest" in result.stderr
    assert clean_failure_problems(result, tmp_path / "out") == []


def test_index_lists_fewer_images(tmp_path: Path) -> None:
    base = layer("etc/", 'etc/shared "s"')
    alpine = Image([base, layer('etc/alpine-release "3"')], tags=["alpine:latest"])
    busybox = Image([base, layer('bin/busybox "bb"')], tags=["busybox:latest"])
    store = BlobStore()
    descriptor = store.add_image(alpine)
    store.add_image(busybox)
    legacy = json.loads(docker_archive_files([alpine, busybox])["manifest.json"])
    for entry, image in zip(legacy, (alpine, busybox), strict=True):
        config = image.config()
        store.add(config, "application/vnd.oci.image.config.v1+json")
        entry["Config"] = "blobs/sha256/" + sha256(config)[7:]
        entry["Layers"] = ["blobs/sha256/" + sha256(blob)[7:] for blob in image.layers]
    files = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": oci_index([descriptor]),
        "manifest.json": json.dumps(legacy).encode(),
        **store.files,
    }
    archive = write_files(tmp_path / "image.tar", files)
    result, output = flatten(archive, tmp_path / "out", "--image", "busybox:latest")
    assert result.returncode == 0, failure_text(result)
    assert read_tree(output).entries == expect(*BUSYBOX_TREE).entries
