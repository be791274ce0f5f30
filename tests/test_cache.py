import gzip
import hashlib
import json
from pathlib import Path

import pytest
import zstandard
from hostile import docker_archive, file, sha256, tar_bytes

from pulldocker.cache import ImageCache
from pulldocker.convert import convert
from pulldocker.errors import IntegrityError
from pulldocker.pull import default_cache_dir


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_default_cache_dir_uses_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert default_cache_dir() == Path("/x/cache/pulldocker")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_cache_dir() == Path("/home/u/.cache/pulldocker")


def test_put_bytes_rejects_wrong_digest(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    with pytest.raises(IntegrityError, match="digest mismatch"):
        cache.put_bytes(digest_of(b"a"), b"b")
    assert not cache.has_blob(digest_of(b"a"))


@pytest.mark.parametrize(
    "compress",
    [lambda d: gzip.compress(d), lambda d: zstandard.ZstdCompressor().compress(d)],
    ids=["gzip", "zstd"],
)
def test_store_layer_uncompresses_by_magic(tmp_path: Path, compress: object) -> None:
    raw = b"tar bytes" * 1000
    blob = compress(raw)  # type: ignore[operator]
    cache = ImageCache(tmp_path)
    with cache.temp_file() as (file, _):
        file.write(blob)
        path = cache.store_layer(file, digest_of(blob), digest_of(raw))
    assert path.name == digest_of(raw)[7:]
    assert path.read_bytes() == raw


def test_store_layer_rejects_wrong_diff_id(tmp_path: Path) -> None:
    blob = gzip.compress(b"data")
    cache = ImageCache(tmp_path)
    with cache.temp_file() as (file, _), pytest.raises(IntegrityError, match="diff_id"):
        file.write(blob)
        cache.store_layer(file, digest_of(blob), digest_of(b"other"))
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == []


def test_store_layer_compressed_keeps_download(tmp_path: Path) -> None:
    raw = b"layer" * 100
    blob = gzip.compress(raw)
    cache = ImageCache(tmp_path, layer_storage="compressed")
    with cache.temp_file() as (file, _):
        file.write(blob)
        path = cache.store_layer(file, digest_of(blob), digest_of(raw))
    assert path.read_bytes() == blob


def test_record_moves_tag_to_latest_image(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    config_a = cache.put_bytes(digest_of(b"{}"), b"{}")
    config_b = cache.put_bytes(digest_of(b"[]"), b"[]")
    cache.record(config_a, [], tags=["x:sha256-a"], moving_tags=["x:1"])
    cache.record(config_b, [], tags=["x:sha256-b"], moving_tags=["x:1"])
    entries = json.loads((tmp_path / "manifest.json").read_text())
    assert entries[0]["RepoTags"] == ["x:sha256-a"]
    assert entries[1]["RepoTags"] == ["x:sha256-b", "x:1"]
    assert cache.find_entry("x:1") == entries[1]


def test_verified_layers_skip_plain_hashing(tmp_path: Path) -> None:
    """layers_verified skips hashing uncompressed layers, never compressed ones.

    The cache checks each uncompressed layer's diff_id before storing it, so
    converting from the cache need not hash it again. A compressed layer's
    diff_id is only known after decompressing, so it is always checked.
    """
    plain = tar_bytes([file("etc/hostname", b"box\n")])
    wrong = [sha256(b"some other layer")]
    plain_archive = docker_archive(tmp_path / "plain.tar", [plain], diff_ids=wrong)
    output = tmp_path / "rootfs.tar"
    with pytest.raises(IntegrityError, match="diff_id mismatch"):
        convert(str(plain_archive), str(output))
    assert not output.exists()
    convert(str(plain_archive), str(output), layers_verified=True)
    assert output.exists()

    packed = docker_archive(tmp_path / "gz.tar", [gzip.compress(plain)], diff_ids=wrong)
    with pytest.raises(IntegrityError, match="diff_id mismatch"):
        convert(str(packed), str(tmp_path / "other.tar"), layers_verified=True)
