from __future__ import annotations

from typing import Any

import pytest

from pulldocker.errors import PlatformNotFoundError, UsageError
from pulldocker.platform import Platform, select_manifests

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def entry(digest: str, os: str, arch: str, variant: str = "", **extra: Any) -> dict:
    platform = {"os": os, "architecture": arch}
    if variant:
        platform["variant"] = variant
    return {"mediaType": MANIFEST, "digest": digest, "platform": platform, **extra}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/arm64/v9.0", "linux/arm64/v9"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/armel", "linux/arm/v6"),
        ("linux/arm/6", "linux/arm/v6"),
        ("Linux/AMD64", "linux/amd64"),
        ("macos/arm64", "darwin/arm64"),
    ],
)
def test_platform_parse_normalises(text: str, expected: str) -> None:
    assert str(Platform.parse(text)) == expected


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_platform_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(UsageError):
        Platform.parse(text)


def test_select_prefers_exact_variant() -> None:
    index = [
        entry("sha256:v6", "linux", "arm", "v6"),
        entry("sha256:v7", "linux", "arm", "v7"),
    ]
    chosen = select_manifests(index, Platform.parse("linux/arm/v7"), "x")
    assert chosen["digest"] == "sha256:v7"


def test_select_falls_back_to_older_variant() -> None:
    index = [
        entry("sha256:v5", "linux", "arm", "v5"),
        entry("sha256:v6", "linux", "arm", "v6"),
    ]
    chosen = select_manifests(index, Platform.parse("linux/arm/v7"), "x")
    assert chosen["digest"] == "sha256:v6"


def test_select_never_picks_newer_variant() -> None:
    index = [entry("sha256:v8", "linux", "arm", "v8")]
    with pytest.raises(PlatformNotFoundError):
        select_manifests(index, Platform.parse("linux/arm/v7"), "x")


def test_select_arm64_matches_v8_spelling() -> None:
    index = [
        entry("sha256:amd", "linux", "amd64"),
        entry("sha256:a", "linux", "arm64", "v8"),
    ]
    chosen = select_manifests(index, Platform.parse("linux/arm64"), "x")
    assert chosen["digest"] == "sha256:a"


def test_select_skips_attestations() -> None:
    annotations = {"vnd.docker.reference.type": "attestation-manifest"}
    index = [
        entry("sha256:att", "unknown", "unknown", annotations=annotations),
        entry("sha256:img", "linux", "amd64"),
    ]
    chosen = select_manifests(index, Platform.parse("linux/amd64"), "x")
    assert chosen["digest"] == "sha256:img"


def test_select_takes_first_of_equal_matches() -> None:
    index = [
        entry("sha256:first", "linux", "amd64"),
        entry("sha256:second", "linux", "amd64"),
    ]
    chosen = select_manifests(index, Platform.parse("linux/amd64"), "x")
    assert chosen["digest"] == "sha256:first"


def test_select_error_lists_available() -> None:
    index = [entry("sha256:a", "linux", "amd64"), entry("sha256:b", "linux", "arm64")]
    with pytest.raises(PlatformNotFoundError) as caught:
        select_manifests(index, Platform.parse("linux/s390x"), "img")
    message = str(caught.value)
    assert "linux/s390x" in message
    assert "linux/amd64, linux/arm64" in message


def test_select_descends_into_lone_nested_index() -> None:
    nested = {"mediaType": INDEX, "digest": "sha256:nested"}
    chosen = select_manifests([nested], Platform.parse("linux/amd64"), "x")
    assert chosen["digest"] == "sha256:nested"


def test_select_takes_unlabelled_manifest_alone() -> None:
    unlabelled = {"mediaType": MANIFEST, "digest": "sha256:only"}
    chosen = select_manifests([unlabelled], Platform.parse("linux/arm64"), "x")
    assert chosen["digest"] == "sha256:only"


def test_select_prefers_labelled_match() -> None:
    unlabelled = {"mediaType": MANIFEST, "digest": "sha256:plain"}
    index = [unlabelled, entry("sha256:arm", "linux", "arm64")]
    chosen = select_manifests(index, Platform.parse("linux/arm64"), "x")
    assert chosen["digest"] == "sha256:arm"


def test_select_skips_non_object_entries() -> None:
    index = [None, 1, "x", entry("sha256:a", "linux", "amd64")]
    chosen = select_manifests(index, Platform.parse("linux/amd64"), "x")  # type: ignore[arg-type]
    assert chosen["digest"] == "sha256:a"
