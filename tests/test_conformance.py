"""Flatten third-party image fixtures and compare with umoci's unpack.

The fixtures are small archives and OCI layouts that other projects keep as
test data, read from ``../shared/fixtures/public`` beside the checkout. Each
case converts one image with ``python -m pulldocker`` and lists the output
tar. The reference is the tree that ``umoci unpack --rootless`` builds from
the same image after ``skopeo copy`` has turned it into an OCI layout.

Some inputs are unreadable for skopeo or umoci: legacy archives without
``manifest.json``, Docker manifests inside an OCI layout, and single layer
tars, which are not images on their own. For these, the case wraps the same
layers in a plain ``docker save`` archive and builds the reference from it.

A case marked ``expect_failure`` must make pulldocker exit with one of the
listed codes and a one-line message. A case marked ``may_fail`` (an input
that Docker itself no longer reads) may do either: convert to the reference
tree, or fail cleanly.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    CLI_TIMEOUT,
    PUBLIC_FIXTURES,
    PULLDOCKER,
    REPO,
    describe_failure,
    load_builder,
    missing_tools,
    run_pulldocker,
    tree_diff,
    umoci_rootfs,
)
from treelist import format_lines, list_dir, list_tar

pytestmark = [
    pytest.mark.umoci,
    pytest.mark.skipif(
        not PUBLIC_FIXTURES.is_dir(), reason=f"{PUBLIC_FIXTURES} is not present"
    ),
    pytest.mark.skipif(
        bool(missing_tools("skopeo", "umoci")), reason="skopeo or umoci is missing"
    ),
]

EXIT_INVALID_INPUT = 3
EXIT_NOT_FOUND = 4

# An empty layer as Docker writes it: a tar with only its end-of-archive
# blocks, padded to one 10240-byte record.
EMPTY_TAR = bytes(10240)

Reference = Callable[[Path], Path]
Source = Callable[[Path], Path]


@dataclass(frozen=True)
class Case:
    """One image to convert, and where its expected tree comes from."""

    id: str
    source: Source
    reference: Reference | None = None
    args: tuple[str, ...] = ()
    expect_failure: tuple[int, ...] = ()
    may_fail: bool = False


# ---- sources and references --------------------------------------------------


def fixture(relative: str) -> Source:
    """Use a public fixture as it is."""
    return lambda work: PUBLIC_FIXTURES / relative


def skopeo(transport: str, relative: str, suffix: str = "", *args: str) -> Reference:
    """Flatten ``transport:FIXTURE[suffix]`` with skopeo and umoci."""

    def build(work: Path) -> Path:
        source = f"{transport}:{PUBLIC_FIXTURES / relative}{suffix}"
        return umoci_rootfs(source, work, *args)

    return build


def gunzipped(relative: str) -> Reference:
    """Flatten a gzip-compressed ``docker save`` archive, after gunzip."""

    def build(work: Path) -> Path:
        plain = work / "gunzipped.tar"
        with gzip.open(PUBLIC_FIXTURES / relative) as stream:
            plain.write_bytes(stream.read())
        return umoci_rootfs(f"docker-archive:{plain}", work)

    return build


def wrapped(layers: Callable[[], list[bytes]]) -> Reference:
    """Flatten the given layers, wrapped as a ``docker save`` archive."""

    def build(work: Path) -> Path:
        archive = work / "wrapped.tar"
        write_archive(archive, layers())
        return umoci_rootfs(f"docker-archive:{archive}", work)

    return build


def wrapped_source(layers: Callable[[], list[bytes]]) -> Source:
    """Convert the given layers, wrapped as a ``docker save`` archive."""

    def build(work: Path) -> Path:
        archive = work / "input.tar"
        write_archive(archive, layers())
        return archive

    return build


def write_archive(path: Path, layers: list[bytes]) -> None:
    builder = load_builder()
    data = builder.docker_archive(
        layers,
        tag="conformance/wrapped:latest",
        history=[f"layer {n}" for n in range(len(layers))],
    )
    path.write_bytes(data)


def read_layer(path: Path) -> bytes:
    """Read a layer file, gunzipping it when it is gzip-compressed."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data or EMPTY_TAR


def blob_layers(relative: str, *digests: str) -> Callable[[], list[bytes]]:
    """Read layer blobs of an OCI layout by their sha256 hex digests."""
    blobs = PUBLIC_FIXTURES / relative / "blobs" / "sha256"
    return lambda: [read_layer(blobs / digest) for digest in digests]


def raw_layers(*relatives: str) -> Callable[[], list[bytes]]:
    """Read single layer tars, lowest first."""
    return lambda: [read_layer(PUBLIC_FIXTURES / r) for r in relatives]


def legacy_layers(relative: str) -> Callable[[], list[bytes]]:
    """Read a legacy archive's layers in the order of their ``parent`` chain.

    Archives written before Docker 1.10 have no ``manifest.json``. The top
    layer is the id in ``repositories``, and each ``<id>/json`` names its
    parent. An empty ``layer.tar`` file becomes an empty tar.
    """

    def read() -> list[bytes]:
        with tarfile.open(PUBLIC_FIXTURES / relative) as archive:
            members = {m.name.removeprefix("./"): m for m in archive.getmembers()}

            def member_bytes(name: str) -> bytes:
                stream = archive.extractfile(members[name])
                assert stream is not None, f"{name} is not a file"
                return stream.read()

            repositories = json.loads(member_bytes("repositories"))
            (tags,) = repositories.values()
            (layer_id,) = tags.values()
            chain = []
            while layer_id:
                chain.append(member_bytes(f"{layer_id}/layer.tar") or EMPTY_TAR)
                layer_id = json.loads(member_bytes(f"{layer_id}/json")).get("parent")
        return list(reversed(chain))

    return read


def regclient_base() -> bytes:
    """Build a layer for regclient's whiteout layer to remove things from."""
    builder = load_builder()
    items = [
        builder.file_("layer1.txt", "old\n"),
        builder.file_("layer2.txt", "2\n"),
        builder.dir_("exdir"),
        builder.file_("exdir/hidden.txt", "hidden by the opaque marker\n"),
        builder.dir_("exdir/sub"),
        builder.file_("exdir/sub/deep.txt", "also hidden\n"),
    ]
    return builder.layer_tar(items, builder.BASE_MTIME)


def regclient_layers() -> list[bytes]:
    return [regclient_base(), read_layer(PUBLIC_FIXTURES / "regclient/layer-wh.tar")]


# ---- the cases --------------------------------------------------------------

LAYOUT_TEST_INDEX_LAYER = blob_layers(
    "ggcr/layout_test_index",
    "dc52c6e48a1d51a96047b059f16889bc889c4b4c28f3b36b3f93187f62fc0b2b",
)
LA_CROIX = (
    "container-diff/la-croix1.tar",
    "container-diff/la-croix2.tar",
    "container-diff/la-croix-wh.tar",
    "container-diff/la-croix-update.tar",
    "container-diff/la-croix-dir-update.tar",
)


def docker_archive_case(relative: str) -> Case:
    return Case(
        relative.removesuffix(".tar"),
        fixture(relative),
        skopeo("docker-archive", relative),
    )


def platform_args(platform: str) -> tuple[str, ...]:
    """Return skopeo's options that pick ``os/arch[/variant]``."""
    parts = platform.split("/")
    args = ["--override-os", parts[0], "--override-arch", parts[1]]
    if len(parts) == 3:
        args += ["--override-variant", parts[2]]
    return tuple(args)


def regclient_case(ref: str, platform: str) -> Case:
    relative = "regclient/testrepo"
    return Case(
        f"{relative}:{ref}@{platform}",
        fixture(relative),
        skopeo("oci", relative, f":{ref}", *platform_args(platform)),
        args=("--image", ref, "--platform", platform),
    )


def oci_archive_case(relative: str, platform: str) -> Case:
    return Case(
        relative.removesuffix(".tar"),
        fixture(relative),
        skopeo("oci-archive", relative),
        args=("--platform", platform),
    )


CASES = [
    docker_archive_case("ggcr/test_image_1.tar"),
    docker_archive_case("ggcr/whiteout_image.tar"),
    docker_archive_case("ggcr/whiteout_dir.tar"),
    docker_archive_case("ggcr/overwritten_file.tar"),
    docker_archive_case("ggcr/source_image_with_empty_layer_history.tar"),
    docker_archive_case("ggcr/hello-world-v25.tar"),
    docker_archive_case("containers-image/almostempty.tar"),
    docker_archive_case("dive/test-docker-image.tar"),
    docker_archive_case("dive/test-kaniko-image.tar"),
    Case(
        "ggcr/test_bundle:test_image_1",
        fixture("ggcr/test_bundle.tar"),
        skopeo("docker-archive", "ggcr/test_bundle.tar", ":@1"),
        args=("--image", "test_image_1"),
    ),
    Case(
        "ggcr/test_bundle:test_image_2",
        fixture("ggcr/test_bundle.tar"),
        skopeo("docker-archive", "ggcr/test_bundle.tar", ":@0"),
        args=("--image", "test_image_2"),
    ),
    Case(
        "ggcr/test_link:test_image_1",
        fixture("ggcr/test_link.tar"),
        skopeo("docker-archive", "ggcr/test_link.tar", ":@0"),
        args=("--image", "bazel/v1/tarball:test_image_1"),
    ),
    Case(
        "ggcr/test_link:test_image_3",
        fixture("ggcr/test_link.tar"),
        skopeo("docker-archive", "ggcr/test_link.tar", ":@1"),
        args=("--image", "bazel/v1/tarball:test_image_3"),
    ),
    Case(
        "trivy/alpine-310.tar.gz",
        fixture("trivy/alpine-310.tar.gz"),
        gunzipped("trivy/alpine-310.tar.gz"),
    ),
    oci_archive_case("dive/test-oci-uncompressed-image.tar", "linux/arm64"),
    oci_archive_case("dive/test-oci-gzip-image.tar", "linux/arm64"),
    oci_archive_case("dive/test-oci-estargz-image.tar", "linux/arm64"),
    # umoci 0.4.7 cannot read zstd layers. skopeo recompresses them to gzip on
    # the way to the reference, so the reference is still independent.
    oci_archive_case("dive/test-oci-zstd-image.tar", "linux/arm64"),
    Case(
        "stereoscope/valid-oci",
        fixture("stereoscope/valid-oci.tar"),
        skopeo("oci-archive", "stereoscope/valid-oci.tar"),
    ),
    Case("trivy/test.oci", fixture("trivy/test.oci"), skopeo("oci", "trivy/test.oci")),
    *(
        Case(
            f"stereoscope/multiplatform_oci_dir@{platform}",
            fixture("stereoscope/multiplatform_oci_dir"),
            skopeo(
                "oci",
                "stereoscope/multiplatform_oci_dir",
                ":latest",
                *platform_args(platform),
            ),
            args=("--platform", platform),
        )
        for platform in ("linux/amd64", "linux/arm64")
    ),
    regclient_case("v1", "linux/amd64"),
    regclient_case("v1", "linux/arm64"),
    regclient_case("v2", "linux/amd64"),
    regclient_case("v2", "linux/arm/v7"),
    regclient_case("v3", "linux/arm64"),
    regclient_case("v3", "linux/arm/v6"),
    regclient_case("b1", "linux/amd64"),
    Case(
        "regclient/testrepo:a1 (artifact)",
        fixture("regclient/testrepo"),
        args=("--image", "a1"),
        expect_failure=(EXIT_INVALID_INPUT, EXIT_NOT_FOUND),
    ),
    # skopeo copies Docker manifests out of an OCI layout unchanged, and
    # umoci then rejects them, so these references use the layer blob.
    *(
        Case(
            f"ggcr/layout_test_index:{ref}",
            fixture("ggcr/layout_test_index"),
            wrapped(LAYOUT_TEST_INDEX_LAYER),
            args=("--image", ref),
        )
        for ref in ("1", "3", "4")
    ),
    # Ref 2 is a descriptor with the media type of a descriptor, not of a
    # manifest. Following it or rejecting it are both reasonable.
    Case(
        "ggcr/layout_test_index:2",
        fixture("ggcr/layout_test_index"),
        wrapped(
            blob_layers(
                "ggcr/layout_test_index",
                "321460fa87fd42433950b42d04b7aff249f4ed960d43404a9f699886906cc9d3",
            )
        ),
        args=("--image", "2"),
        may_fail=True,
    ),
    Case(
        "ggcr/no_manifest (legacy)",
        fixture("ggcr/no_manifest.tar"),
        wrapped(legacy_layers("ggcr/no_manifest.tar")),
        may_fail=True,
    ),
    Case(
        "moby/emptyLayer (legacy)",
        fixture("moby/emptyLayer.tar"),
        wrapped(legacy_layers("moby/emptyLayer.tar")),
        may_fail=True,
    ),
    Case(
        "ggcr/null_manifest",
        fixture("ggcr/null_manifest.tar"),
        expect_failure=(EXIT_INVALID_INPUT,),
    ),
    Case(
        "container-diff/la-croix (5 raw layers)",
        wrapped_source(raw_layers(*LA_CROIX)),
        wrapped(raw_layers(*LA_CROIX)),
    ),
    Case(
        "regclient/layer-wh (raw layer on a base)",
        wrapped_source(
            lambda: [regclient_base(), *raw_layers("regclient/layer-wh.tar")()]
        ),
        wrapped(lambda: [regclient_base(), *raw_layers("regclient/layer-wh.tar")()]),
    ),
]

# Inputs that the cases above read. Every fixture must be one of them.
COVERED = {
    "container-diff/la-croix-dir-update.tar",
    "container-diff/la-croix-update.tar",
    "container-diff/la-croix-wh.tar",
    "container-diff/la-croix1.tar",
    "container-diff/la-croix2.tar",
    "containers-image/almostempty.tar",
    "dive/test-docker-image.tar",
    "dive/test-kaniko-image.tar",
    "dive/test-oci-estargz-image.tar",
    "dive/test-oci-gzip-image.tar",
    "dive/test-oci-uncompressed-image.tar",
    "dive/test-oci-zstd-image.tar",
    "ggcr/hello-world-v25.tar",
    "ggcr/layout_test_index",
    "ggcr/no_manifest.tar",
    "ggcr/null_manifest.tar",
    "ggcr/overwritten_file.tar",
    "ggcr/source_image_with_empty_layer_history.tar",
    "ggcr/test_bundle.tar",
    "ggcr/test_image_1.tar",
    "ggcr/test_link.tar",
    "ggcr/whiteout_dir.tar",
    "ggcr/whiteout_image.tar",
    "moby/emptyLayer.tar",
    "regclient/layer-wh.tar",
    "regclient/testrepo",
    "stereoscope/multiplatform_oci_dir",
    "stereoscope/valid-oci.tar",
    "trivy/alpine-310.tar.gz",
    "trivy/test.oci",
}


def fixture_inputs() -> set[str]:
    """List every image archive and OCI layout under the public fixtures."""
    found = set()
    for group in PUBLIC_FIXTURES.iterdir():
        if not group.is_dir():
            continue
        for item in group.iterdir():
            found.add(f"{group.name}/{item.name}")
    return found


def test_every_fixture_has_a_case() -> None:
    assert fixture_inputs() == COVERED


def assert_clean_failure(
    result: subprocess.CompletedProcess[str], allowed: tuple[int, ...], case_id: str
) -> None:
    """Check that pulldocker failed with a short message, not a traceback."""
    message_lines = [line for line in result.stderr.splitlines() if line.strip()]

    assert result.returncode in allowed, describe_failure(result)
    assert "Traceback" not in result.stderr, result.stderr
    assert 1 <= len(message_lines) <= 2, f"{case_id}: {result.stderr!r}"
    assert "error" in message_lines[0].lower(), message_lines[0]


def case_param(case: Case) -> object:
    return pytest.param(case, id=case.id)


@pytest.mark.parametrize("case", [case_param(case) for case in CASES])
def test_fixture_matches_umoci(case: Case, tmp_path: Path) -> None:
    source = case.source(tmp_path)
    out = tmp_path / "rootfs.tar"

    result = run_pulldocker(source, "-o", out, "-q", *case.args)

    if case.expect_failure:
        assert_clean_failure(result, case.expect_failure, case.id)
        assert not out.exists(), "a failed conversion left its output behind"
        return
    if case.may_fail and result.returncode != 0:
        assert_clean_failure(result, (EXIT_INVALID_INPUT, EXIT_NOT_FOUND), case.id)
        return
    assert result.returncode == 0, describe_failure(result)

    assert case.reference is not None
    work = tmp_path / "reference"
    work.mkdir()
    reference = case.reference(work)
    actual = format_lines(list_tar(out))
    expected = format_lines(list_dir(reference, rootless=True))
    assert actual == expected, tree_diff(actual, expected)


@pytest.mark.parametrize(
    "relative", ["trivy/alpine-310.tar.gz", "dive/test-docker-image.tar"]
)
def test_fixture_from_stdin_same_tree(relative: str, tmp_path: Path) -> None:
    from_path = tmp_path / "from-path.tar"
    from_stdin = tmp_path / "from-stdin.tar"
    path_result = run_pulldocker(PUBLIC_FIXTURES / relative, "-o", from_path, "-q")
    assert path_result.returncode == 0, describe_failure(path_result)

    with open(PUBLIC_FIXTURES / relative, "rb") as stdin:
        stdin_result = subprocess.run(
            [*PULLDOCKER, "-", "-o", str(from_stdin), "-q"],
            cwd=REPO,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )

    assert stdin_result.returncode == 0, describe_failure(stdin_result)
    assert format_lines(list_tar(from_stdin)) == format_lines(list_tar(from_path))


# The dive OCI images hold one layer with only README.md, stored uncompressed,
# as gzip, as eStargz and as zstd. This line was read from the uncompressed
# layer with GNU tar and sha256sum.
DIVE_README_LINE = (
    "README.md\tf\t0644\t0:0\t11189\t"
    "f8b8addc28295c264c4d32a90e4a1dc34160f2c150f8f9c5f4f7906ea8bf27dc\t-\t-\t1737059232"
)


@pytest.mark.parametrize("compression", ["uncompressed", "gzip", "estargz", "zstd"])
def test_dive_oci_image_hand_expectation(compression: str, tmp_path: Path) -> None:
    source = PUBLIC_FIXTURES / f"dive/test-oci-{compression}-image.tar"
    out = tmp_path / "rootfs.tar"

    result = run_pulldocker(source, "-o", out, "-q", "--platform", "linux/arm64")

    assert result.returncode == 0, describe_failure(result)
    assert format_lines(list_tar(out)) == [DIVE_README_LINE]
