import json
import logging
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from registry_helpers import (
    DIVE_ARCHIVE,
    Registry,
    archive_diff_ids,
    build_docker_archive,
    build_multiplatform_layout,
)

from pulldocker.errors import (
    AuthenticationError,
    NetworkError,
    PlatformNotFoundError,
)
from pulldocker.platform import Platform
from pulldocker.progress import NullProgress
from pulldocker.pull import PullOptions, inspect, pull, save

pytestmark = pytest.mark.registry

AMD64 = Platform.parse("linux/amd64")


class RecordingProgress(NullProgress):
    def __init__(self) -> None:
        self.notes: dict[str, str] = {}
        self.bytes = 0
        self.lock = threading.Lock()

    def advance(self, key: str, amount: int) -> None:
        with self.lock:
            self.bytes += amount

    def finish(self, key: str, note: str = "") -> None:
        self.notes[key] = note


def options(cache: Path, registry: Registry, **extra: object) -> PullOptions:
    values: dict[str, object] = {
        "platform": AMD64,
        "cache_dir": cache,
        "username": registry.username,
        "password": registry.password,
        "cert_dir": registry.cert_dir,
    }
    values.update(extra)
    return PullOptions(**values)  # type: ignore[arg-type]


def cached_diff_ids(cache: Path, image: str) -> list[str]:
    entries = json.loads((cache / "manifest.json").read_text())
    entry = next(e for e in entries if image in e["RepoTags"])
    config = json.loads((cache / entry["Config"]).read_text())
    for path in entry["Layers"]:
        assert (cache / path).is_file()
    return list(config["rootfs"]["diff_ids"])


@pytest.fixture
def small_image(tmp_path: Path) -> tuple[Path, list[str]]:
    archive = tmp_path / "small.tar"
    diff_ids = build_docker_archive(
        archive,
        [{"etc/motd": b"hello\n"}, {"bin/tool": b"x" * 5000, "etc/motd": b"bye\n"}],
        tag="test/small:1",
    )
    return archive, diff_ids


@pytest.fixture
def dive_archive() -> Path:
    if not DIVE_ARCHIVE.is_file():
        pytest.skip("the shared dive fixture is not available")
    return DIVE_ARCHIVE


def test_pull_dive_image_keeps_diff_ids(
    plain_registry: Registry, dive_archive: Path, tmp_path: Path
) -> None:
    plain_registry.push(f"docker-archive:{dive_archive}", "test/dive:1")
    cached = pull(
        f"{plain_registry.host}/test/dive:1",
        options(tmp_path / "cache", plain_registry),
        NullProgress(),
    )
    assert cached.archive_dir == tmp_path / "cache"
    got = cached_diff_ids(cached.archive_dir, cached.image)
    assert got == archive_diff_ids(dive_archive)


def test_second_pull_downloads_nothing(
    plain_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, _ = small_image
    plain_registry.push(f"docker-archive:{archive}", "test/small:again")
    opts = options(tmp_path / "cache", plain_registry)
    first = RecordingProgress()
    pull(f"{plain_registry.host}/test/small:again", opts, first)
    second = RecordingProgress()
    pull(f"{plain_registry.host}/test/small:again", opts, second)
    assert first.bytes > 0
    assert second.bytes == 0
    assert set(second.notes.values()) == {"cached"}


def test_pull_by_digest_uses_cache_offline(
    plain_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, diff_ids = small_image
    plain_registry.push(f"docker-archive:{archive}", "test/small:pin")
    opts = options(tmp_path / "cache", plain_registry)
    found = inspect(f"{plain_registry.host}/test/small:pin", opts)
    pinned = f"{plain_registry.host}/test/small@{found['digest']}"
    pull(pinned, opts, NullProgress())
    offline = options(tmp_path / "cache", plain_registry, cert_dir=None)
    unreachable = pinned.replace(plain_registry.host, "127.0.0.1:9")
    cached = pull(unreachable, offline, NullProgress())
    assert cached_diff_ids(cached.archive_dir, cached.image) == diff_ids


def test_pull_with_basic_auth(
    basic_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, diff_ids = small_image
    basic_registry.push(f"docker-archive:{archive}", "test/small:basic")
    ref = f"{basic_registry.host}/test/small:basic"
    cached = pull(ref, options(tmp_path / "cache", basic_registry), NullProgress())
    assert cached_diff_ids(cached.archive_dir, cached.image) == diff_ids


def test_pull_with_basic_auth_wrong_password(
    basic_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, _ = small_image
    basic_registry.push(f"docker-archive:{archive}", "test/small:basic2")
    ref = f"{basic_registry.host}/test/small:basic2"
    opts = options(tmp_path / "cache", basic_registry, password="wrong")
    with pytest.raises(Exception, match="HTTP 401") as caught:
        pull(ref, opts, NullProgress())
    assert "wrong" not in str(caught.value)
    assert caught.value.exit_code == 5  # type: ignore[attr-defined]


def test_pull_with_token_auth(
    token_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, diff_ids = small_image
    token_registry.push(f"docker-archive:{archive}", "test/small:token")
    token_registry.token_requests.clear()
    ref = f"{token_registry.host}/test/small:token"
    cached = pull(ref, options(tmp_path / "cache", token_registry), NullProgress())
    assert cached_diff_ids(cached.archive_dir, cached.image) == diff_ids
    scopes = {tuple(r["scopes"]) for r in token_registry.token_requests}
    assert scopes == {("repository:test/small:pull",)}
    assert len(token_registry.token_requests) == 1


def test_pull_over_tls_with_cert_dir(
    tls_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, diff_ids = small_image
    tls_registry.push(f"docker-archive:{archive}", "test/small:tls")
    ref = f"{tls_registry.host}/test/small:tls"
    cached = pull(ref, options(tmp_path / "cache", tls_registry), NullProgress())
    assert cached_diff_ids(cached.archive_dir, cached.image) == diff_ids


def test_pull_over_tls_without_ca_fails(
    tls_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, _ = small_image
    tls_registry.push(f"docker-archive:{archive}", "test/small:tls2")
    ref = f"{tls_registry.host}/test/small:tls2"
    opts = options(tmp_path / "cache", tls_registry, cert_dir=None)
    with pytest.raises(NetworkError, match="--cert-dir"):
        pull(ref, opts, NullProgress())


def test_pull_over_tls_insecure_skips_verification(
    tls_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, diff_ids = small_image
    tls_registry.push(f"docker-archive:{archive}", "test/small:tls3")
    ref = f"{tls_registry.host}/test/small:tls3"
    opts = options(tmp_path / "cache", tls_registry, cert_dir=None, insecure=True)
    cached = pull(ref, opts, NullProgress())
    assert cached_diff_ids(cached.archive_dir, cached.image) == diff_ids


@pytest.fixture
def multiplatform(plain_registry: Registry, tmp_path: Path) -> dict[str, str]:
    layout = tmp_path / "layout"
    digests = build_multiplatform_layout(
        layout, [("amd64", ""), ("arm64", "v8"), ("arm", "v7")]
    )
    plain_registry.push(f"oci:{layout}:multi", "test/multi:1", "--all")
    return digests


def test_pull_selects_arm64_from_index(
    plain_registry: Registry, multiplatform: dict[str, str], tmp_path: Path
) -> None:
    arm64 = Platform.parse("linux/arm64")
    opts = options(tmp_path / "cache", plain_registry, platform=arm64)
    cached = pull(f"{plain_registry.host}/test/multi:1", opts, NullProgress())
    assert cached.image.endswith(multiplatform["arm64/v8"].replace(":", "-"))
    entries = json.loads((cached.archive_dir / "manifest.json").read_text())
    config = json.loads((cached.archive_dir / entries[0]["Config"]).read_text())
    assert config["architecture"] == "arm64"


def test_pull_unknown_platform_lists_available(
    plain_registry: Registry, multiplatform: dict[str, str], tmp_path: Path
) -> None:
    s390x = Platform.parse("linux/s390x")
    opts = options(tmp_path / "cache", plain_registry, platform=s390x)
    with pytest.raises(PlatformNotFoundError) as caught:
        pull(f"{plain_registry.host}/test/multi:1", opts, NullProgress())
    message = str(caught.value)
    assert "linux/s390x" in message
    assert "linux/amd64, linux/arm/v7, linux/arm64" in message


def test_inspect_reports_index_and_config(
    plain_registry: Registry, multiplatform: dict[str, str], tmp_path: Path
) -> None:
    arm = Platform.parse("linux/arm/v7")
    opts = options(tmp_path / "cache", plain_registry, platform=arm)
    found = inspect(f"{plain_registry.host}/test/multi:1", opts)
    assert found["digest"] == multiplatform["arm/v7"]
    assert found["indexDigest"] == multiplatform["index"]
    assert found["platform"] == "linux/arm/v7"
    assert found["config"]["Labels"] == {"a": "arm"}
    assert len(found["layers"]) == 1
    assert not (tmp_path / "cache").exists()
    json.dumps(found)


def test_save_output_pushes_back_with_skopeo(
    plain_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, diff_ids = small_image
    plain_registry.push(f"docker-archive:{archive}", "test/small:save")
    output = tmp_path / "saved.tar"
    opts = options(tmp_path / "cache", plain_registry)
    save(f"{plain_registry.host}/test/small:save", str(output), opts, NullProgress())
    with tarfile.open(output) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert tar.getmember("oci-layout").isfile()
    assert manifest[0]["RepoTags"] == [f"{plain_registry.host}/test/small:save"]
    assert archive_diff_ids(output) == diff_ids
    plain_registry.push(f"docker-archive:{output}", "test/small:resaved")
    result = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--config",
         f"docker://{plain_registry.host}/test/small:resaved"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert json.loads(result.stdout)["rootfs"]["diff_ids"] == diff_ids


def test_save_leaves_no_file_on_failure(
    plain_registry: Registry, tmp_path: Path
) -> None:
    output = tmp_path / "out.tar"
    opts = options(tmp_path / "cache", plain_registry)
    with pytest.raises(Exception, match="MANIFEST_UNKNOWN|NAME_UNKNOWN"):
        save(f"{plain_registry.host}/test/absent:1", str(output), opts, NullProgress())
    assert list(tmp_path.glob("*out.tar*")) == []


def test_concurrent_pulls_share_one_cache(
    plain_registry: Registry, tmp_path: Path
) -> None:
    refs = []
    for number in range(4):
        archive = tmp_path / f"image{number}.tar"
        build_docker_archive(
            archive,
            [{"shared": b"same base\n"}, {"own": f"image {number}\n".encode()}],
            tag=f"test/c:{number}",
        )
        plain_registry.push(f"docker-archive:{archive}", f"test/c:{number}")
        refs.append(f"{plain_registry.host}/test/c:{number}")
    opts = options(tmp_path / "cache", plain_registry)
    errors: list[BaseException] = []

    def run(ref: str) -> None:
        try:
            pull(ref, opts, NullProgress())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(ref,)) for ref in refs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    entries = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    tags = {tag for entry in entries for tag in entry["RepoTags"]}
    for number in range(4):
        assert f"{plain_registry.host}/test/c:{number}" in tags


def test_cache_dir_is_a_docker_archive(
    plain_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, diff_ids = small_image
    plain_registry.push(f"docker-archive:{archive}", "test/small:archive")
    cache = tmp_path / "cache"
    cached = pull(
        f"{plain_registry.host}/test/small:archive",
        options(cache, plain_registry),
        NullProgress(),
    )
    packed = tmp_path / "cache.tar"
    with tarfile.open(packed, "w") as tar:
        tar.add(cache / "manifest.json", "manifest.json")
        tar.add(cache / "blobs", "blobs")
    result = subprocess.run(
        ["skopeo", "inspect", f"docker-archive:{packed}:{cached.image}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert json.loads(result.stdout)["Layers"] == diff_ids


def test_token_auth_wrong_password_is_rejected(
    token_registry: Registry, small_image: tuple[Path, list[str]], tmp_path: Path
) -> None:
    archive, _ = small_image
    token_registry.push(f"docker-archive:{archive}", "test/small:tokenbad")
    ref = f"{token_registry.host}/test/small:tokenbad"
    opts = options(tmp_path / "cache", token_registry, password="not-it")
    with pytest.raises(AuthenticationError, match="rejected the credentials"):
        pull(ref, opts, NullProgress())


def test_token_pull_logs_no_secrets(
    token_registry: Registry,
    small_image: tuple[Path, list[str]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    archive, _ = small_image
    token_registry.push(f"docker-archive:{archive}", "test/small:logs")
    caplog.set_level(logging.DEBUG)
    ref = f"{token_registry.host}/test/small:logs"
    pull(ref, options(tmp_path / "cache", token_registry), NullProgress())
    text = caplog.text
    assert "GET" in text
    assert token_registry.password is not None
    assert token_registry.password not in text
    assert "Bearer ey" not in text
    assert "Basic " not in text


def test_save_to_stdout(
    plain_registry: Registry,
    small_image: tuple[Path, list[str]],
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    archive, diff_ids = small_image
    plain_registry.push(f"docker-archive:{archive}", "test/small:stdout")
    opts = options(tmp_path / "cache", plain_registry)
    save(f"{plain_registry.host}/test/small:stdout", "-", opts, NullProgress())
    output = tmp_path / "from-stdout.tar"
    output.write_bytes(capsysbinary.readouterr().out)
    assert archive_diff_ids(output) == diff_ids
