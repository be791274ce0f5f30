"""Pulls through a fault-injecting proxy in front of a real docker-registry.

Every pull either completes with the right tree or fails with one clear
line; the cache never contains a blob whose content does not hash to its name,
and a re-run after a failure finishes. Also covered: ``kill -9`` and SIGINT
mid-pull, concurrent pulls into one cache, a full disk, and credentials and
tokens kept out of every output stream.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import Fault, FaultProxy
from hostile import (
    EXIT_INTEGRITY,
    EXIT_INTERRUPTED,
    REPO,
    describe,
    directory,
    docker_archive,
    file,
    run_cli,
    tar_bytes,
)
from registry_helpers import Registry, run_registry

pytestmark = pytest.mark.registry

BASE_LAYER = tar_bytes(
    [directory("etc"), file("etc/base", b"base\n"), file("big", os.urandom(600_000))]
)
EXIT_REGISTRY = 6


def top_layer(name: str) -> bytes:
    return tar_bytes([directory("app"), file(f"app/{name}", os.urandom(300_000))])


def push_image(registry: Registry, work: Path, name: str, layers: list[bytes]) -> None:
    archive = docker_archive(work / f"{re.sub(r'[/:]', '_', name)}.tar", layers)
    registry.push(f"docker-archive:{archive}", name)


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("registry")
    with run_registry(work / "reg") as registry:
        push_image(registry, work, "fault/img:1", [BASE_LAYER, top_layer("one")])
        for index in range(4):
            layers = [BASE_LAYER, top_layer(f"app{index}")]
            push_image(registry, work, f"fault/shared{index}:1", layers)
        yield registry


@pytest.fixture
def proxy(plain_registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(plain_registry.url) as front:
        yield front


def pull(proxy: FaultProxy, cache: Path, *args: str, name: str = "fault/img:1"):
    return run_cli(
        "pull", f"{proxy.host}/{name}", "--cache-dir", cache, *args, timeout=240
    )


def assert_cache_sound(cache: Path) -> None:
    """Each blob hashes to its name and no temporary file is left."""
    blobs = cache / "blobs" / "sha256"
    if not blobs.exists():
        return
    for path in blobs.iterdir():
        assert not path.name.startswith(".tmp"), f"temporary file left: {path}"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == path.name, f"cached blob {path.name} hashes to {digest}"


def assert_one_line(result: subprocess.CompletedProcess[str], code: int) -> None:
    """Check one error line; retry warnings before it are allowed."""
    lines = [
        line
        for line in result.stderr.strip().splitlines()
        if not line.startswith("pulldocker: WARNING: retrying")
    ]
    assert "Traceback" not in result.stderr, describe(result)
    assert len(lines) == 1, describe(result)
    assert result.returncode == code, describe(result)


def converted_names(proxy: FaultProxy, cache: Path, out: Path) -> set[str]:
    """Convert the cached image offline-through-proxy and list its names."""
    result = run_cli(f"{proxy.host}/fault/img:1", "-o", out, "--cache-dir", cache)
    assert result.returncode == 0, describe(result)
    with tarfile.open(out) as tar:
        return {member.name for member in tar}


EXPECTED = {"etc", "etc/base", "big", "app", "app/one"}


def test_proxy_clean_pull_baseline(proxy: FaultProxy, tmp_path: Path) -> None:
    result = pull(proxy, tmp_path / "cache")
    assert result.returncode == 0, describe(result)
    assert converted_names(proxy, tmp_path / "cache", tmp_path / "o.tar") == EXPECTED
    assert_cache_sound(tmp_path / "cache")


def test_drop_mid_blob_resumes(proxy: FaultProxy, tmp_path: Path) -> None:
    fault = proxy.add(Fault("drop", after=100_000, times=2))
    result = pull(proxy, tmp_path / "cache")
    assert result.returncode == 0, describe(result)
    assert fault.fired == 2
    ranged = [s for s in proxy.seen if "Range" in s.headers]
    assert ranged, "no request resumed with Range"
    assert converted_names(proxy, tmp_path / "cache", tmp_path / "o.tar") == EXPECTED
    assert_cache_sound(tmp_path / "cache")


def test_drop_every_time_fails_then_rerun(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Fault("drop", after=0, times=None))
    result = pull(proxy, tmp_path / "cache")
    assert_one_line(result, EXIT_REGISTRY)
    assert_cache_sound(tmp_path / "cache")
    proxy.clear()
    rerun = pull(proxy, tmp_path / "cache")
    assert rerun.returncode == 0, describe(rerun)
    assert_cache_sound(tmp_path / "cache")


@pytest.mark.parametrize(
    ("status", "headers"),
    [(429, {"Retry-After": "1"}), (429, {}), (503, {"Retry-After": "1"}), (503, {})],
    ids=["429-retry-after", "429-bare", "503-retry-after", "503-bare"],
)
def test_error_status_retried(
    proxy: FaultProxy, tmp_path: Path, status: int, headers: dict[str, str]
) -> None:
    fault = proxy.add(Fault("status", status=status, headers=headers, times=2))
    result = pull(proxy, tmp_path / "cache")
    assert result.returncode == 0, describe(result)
    assert fault.fired == 2
    assert_cache_sound(tmp_path / "cache")


def test_rate_limit_forever_fails_clearly(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Fault("status", status=429, headers={"Retry-After": "0"}, times=None))
    result = pull(proxy, tmp_path / "cache")
    assert_one_line(result, EXIT_REGISTRY)
    assert "rate limit" in result.stderr
    assert_cache_sound(tmp_path / "cache")


def test_manifest_503_retried(proxy: FaultProxy, tmp_path: Path) -> None:
    fault = Fault("status", path=r"/manifests/", status=503, times=2)
    fault.headers = {"Retry-After": "1"}
    proxy.add(fault)
    result = pull(proxy, tmp_path / "cache")
    assert result.returncode == 0, describe(result)
    assert fault.fired == 2


def test_flipped_byte_never_cached(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Fault("flip", after=5000, times=None))
    result = pull(proxy, tmp_path / "cache")
    assert_one_line(result, EXIT_INTEGRITY)
    assert "digest mismatch" in result.stderr or "diff_id" in result.stderr
    assert_cache_sound(tmp_path / "cache")
    proxy.clear()
    rerun = pull(proxy, tmp_path / "cache")
    assert rerun.returncode == 0, describe(rerun)
    assert_cache_sound(tmp_path / "cache")


def test_flipped_manifest_rejected(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add(Fault("flip", path=r"/manifests/sha256:", after=10, times=None))
    proxy.add(Fault("flip", path=r"/manifests/1$", after=10, times=None))
    result = pull(proxy, tmp_path / "cache")
    assert "Traceback" not in result.stderr, describe(result)
    assert result.returncode in (3, EXIT_INTEGRITY), describe(result)
    assert len(result.stderr.strip().splitlines()) == 1, describe(result)
    assert_cache_sound(tmp_path / "cache")


def test_redirect_to_second_host(
    proxy: FaultProxy, plain_registry: Registry, tmp_path: Path
) -> None:
    with FaultProxy(plain_registry.url, strip_prefix="/store") as store:
        proxy.add(Fault("redirect", times=None, location=f"{store.url}/store"))
        result = pull(proxy, tmp_path / "cache")
        assert result.returncode == 0, describe(result)
        assert store.seen, "the second host got no request"
    assert_cache_sound(tmp_path / "cache")


def test_stall_mid_blob_resumes(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled body times out (read timeout shortened in-process) and resumes."""
    from pulldocker import cli, transport

    monkeypatch.setitem(transport.Transport.__init__.__kwdefaults__, "timeout", (5, 2))
    proxy.add(Fault("stall", after=50_000, seconds=30, times=1))
    started = time.monotonic()
    code = cli.main(["pull", f"{proxy.host}/fault/img:1", "--cache-dir", str(tmp_path)])
    assert code == 0
    assert time.monotonic() - started < 25
    assert_cache_sound(tmp_path)


# -- processes killed or interrupted mid-pull ---------------------------------


def start_pull(proxy: FaultProxy, cache: Path, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "pulldocker", "pull", f"{proxy.host}/fault/img:1"]
        + ["--cache-dir", str(cache), *extra],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_stall(proxy: FaultProxy, fault: Fault, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while fault.fired == 0:
        assert time.monotonic() < deadline, "the pull never reached the blob"
        time.sleep(0.05)
    time.sleep(0.5)


def test_kill_nine_then_rerun(proxy: FaultProxy, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fault = proxy.add(Fault("stall", after=200_000, seconds=60, times=1))
    child = start_pull(proxy, cache)
    wait_for_stall(proxy, fault)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    proxy.stop_stalling.set()
    rerun = pull(proxy, cache)
    assert rerun.returncode == 0, describe(rerun)
    assert converted_names(proxy, cache, tmp_path / "o.tar") == EXPECTED
    leftovers = sorted(p.name for p in (cache / "blobs/sha256").glob(".tmp*"))
    assert leftovers == [], "files left by the killed pull stay in the cache"


def test_sigint_pull_exits_130(proxy: FaultProxy, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fault = proxy.add(Fault("stall", after=200_000, seconds=60, times=None))
    child = start_pull(proxy, cache)
    wait_for_stall(proxy, fault)
    started = time.monotonic()
    child.send_signal(signal.SIGINT)
    try:
        _, stderr = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == EXIT_INTERRUPTED, stderr
    assert time.monotonic() - started < 10, "SIGINT took too long to stop the pull"
    assert "Traceback" not in stderr
    leftovers = sorted(p.name for p in (cache / "blobs/sha256").glob(".tmp*"))
    assert leftovers == []


def test_sigint_convert_removes_part(tmp_path: Path) -> None:
    layer = tar_bytes([file("noise", os.urandom(60 * 1024 * 1024))])
    archive = docker_archive(tmp_path / "image.tar", [layer])
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-m", "pulldocker", str(archive), "-o", str(out / "r.tar.xz")],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".part") for p in out.iterdir()):
        assert child.poll() is None, "convert ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == []


# -- concurrency and resource exhaustion ------------------------------------


def test_four_concurrent_pulls_share_cache(proxy: FaultProxy, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "pulldocker", "pull"]
            + [f"{proxy.host}/fault/shared{i}:1", "--cache-dir", str(cache)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for child in children:
        _, stderr = child.communicate(timeout=240)
        assert child.returncode == 0, stderr
    assert_cache_sound(cache)
    entries = json.loads((cache / "manifest.json").read_text())
    tags = {tag for entry in entries for tag in entry["RepoTags"]}
    for i in range(4):
        assert f"{proxy.host}/fault/shared{i}:1" in tags
        out = tmp_path / f"o{i}.tar"
        result = run_cli(
            f"{proxy.host}/fault/shared{i}:1", "-o", out, "--cache-dir", cache
        )
        assert result.returncode == 0, describe(result)
        with tarfile.open(out) as tar:
            assert f"app/app{i}" in tar.getnames()


def limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_convert_one_line(tmp_path: Path) -> None:
    layer = tar_bytes([file("noise", os.urandom(4 * 1024 * 1024))])
    archive = docker_archive(tmp_path / "image.tar", [layer])
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "pulldocker", str(archive), "-o", str(out / "r.tar")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size(1024 * 1024),
    )
    assert_one_line(result, 1)
    assert list(out.iterdir()) == []


def test_full_disk_pull_one_line(proxy: FaultProxy, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "pulldocker", "pull", f"{proxy.host}/fault/img:1"]
        + ["--cache-dir", str(cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size(200 * 1024),
    )
    assert "Traceback" not in result.stderr, describe(result)
    assert len(result.stderr.strip().splitlines()) == 1, describe(result)
    assert result.returncode != 0
    assert_cache_sound(cache)


# -- secrets ----------------------------------------------------------------


def bearer_tokens(proxy: FaultProxy) -> set[str]:
    found = set()
    for seen in proxy.seen:
        value = seen.headers.get("Authorization", "")
        if value.startswith("Bearer "):
            found.add(value[7:])
    return found


def assert_secret_free(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"secret {secret[:6]}... appears in the output"


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("token-registry")
    with run_registry(work / "reg", auth="token") as registry:
        push_image(registry, work, "fault/img:1", [BASE_LAYER, top_layer("one")])
        yield registry


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("basic-registry")
    with run_registry(work / "reg", auth="basic") as registry:
        push_image(registry, work, "fault/img:1", [BASE_LAYER, top_layer("one")])
        yield registry


def test_token_expired_early_refreshed(
    token_registry: Registry, tmp_path: Path
) -> None:
    with FaultProxy(token_registry.url) as front:
        challenge = (
            f'Bearer realm="{realm_of(token_registry)}",service="test-registry",'
            'scope="repository:fault/img:pull",error="invalid_token"'
        )
        fault = front.add(
            Fault("expire", times=1, headers={"WWW-Authenticate": challenge})
        )
        before = len(token_registry.token_requests)
        result = run_cli(
            "pull", f"{front.host}/fault/img:1", "--cache-dir", tmp_path / "c",
            "--creds", f"{token_registry.username}:{token_registry.password}",
        )  # fmt: skip
        assert result.returncode == 0, describe(result)
        assert fault.fired == 1
        assert len(token_registry.token_requests) - before >= 2
    assert_cache_sound(tmp_path / "c")


def realm_of(registry: Registry) -> str:
    response = __import__("requests").get(f"{registry.url}/v2/", timeout=5)
    match = re.search(r'realm="([^"]+)"', response.headers["WWW-Authenticate"])
    assert match is not None
    return match.group(1)


def test_secrets_absent_token_debug(token_registry: Registry, tmp_path: Path) -> None:
    password = token_registry.password or ""
    with FaultProxy(token_registry.url) as front:
        ref = f"{front.host}/fault/img:1"
        creds = f"{token_registry.username}:{password}"
        cache = ("--cache-dir", tmp_path / "c", "--creds", creds, "--debug")
        runs = [
            run_cli("pull", ref, *cache),
            run_cli("inspect", ref, "--json", *cache),
            run_cli(ref, "-o", tmp_path / "o.tar", *cache, "-v"),
        ]
        tokens = sorted(bearer_tokens(front))
    for result in runs:
        assert result.returncode == 0, describe(result)
    assert tokens, "no bearer token passed the proxy"
    for result in runs:
        assert_secret_free(result.stdout + result.stderr, [password, *tokens])
        encoded = base64.b64encode(creds.encode()).decode()
        assert_secret_free(result.stdout + result.stderr, [encoded])


def test_secrets_absent_basic_debug(basic_registry: Registry, tmp_path: Path) -> None:
    password = basic_registry.password or ""
    creds = f"{basic_registry.username}:{password}"
    encoded = base64.b64encode(creds.encode()).decode()
    with FaultProxy(basic_registry.url) as front:
        ref = f"{front.host}/fault/img:1"
        good = run_cli(
            "pull", ref, "--cache-dir", tmp_path / "c", "--creds", creds, "--debug"
        )
        wrong = run_cli(
            "pull", ref, "--cache-dir", tmp_path / "d", "--creds",
            f"{basic_registry.username}:{password}-wrong", "--debug",
        )  # fmt: skip
    assert good.returncode == 0, describe(good)
    assert wrong.returncode == 5, describe(wrong)
    for result in (good, wrong):
        assert_secret_free(result.stdout + result.stderr, [password, encoded])


def test_redirect_drops_basic_credentials(
    basic_registry: Registry, tmp_path: Path
) -> None:
    creds = f"{basic_registry.username}:{basic_registry.password}"
    upstream_auth = {
        "Authorization": "Basic " + base64.b64encode(creds.encode()).decode()
    }
    with (
        FaultProxy(
            basic_registry.url,
            upstream_headers=upstream_auth,
            strip_prefix="/store",
            reject_authorization=True,
        ) as store,
        FaultProxy(basic_registry.url) as front,
    ):
        signed = f"{store.url}/store"
        front.add(Fault("redirect", times=None, location=signed))
        result = run_cli(
            "pull", f"{front.host}/fault/img:1", "--cache-dir", tmp_path / "c",
            "--creds", creds, "--debug",
        )  # fmt: skip
        leaked = [s for s in store.seen if "Authorization" in s.headers]
        assert store.seen, "the second host got no request"
    assert result.returncode == 0, describe(result)
    assert leaked == []
    assert_cache_sound(tmp_path / "c")


def test_redirect_signature_not_logged(
    basic_registry: Registry, tmp_path: Path
) -> None:
    creds = f"{basic_registry.username}:{basic_registry.password}"
    token = base64.b64encode(creds.encode()).decode()
    with (
        FaultProxy(
            basic_registry.url,
            upstream_headers={"Authorization": f"Basic {token}"},
            strip_prefix="/store",
        ) as store,
        FaultProxy(basic_registry.url) as front,
    ):
        front.add(
            Fault(
                "redirect",
                times=None,
                location=f"{store.url}/store",
                query="?X-Amz-Signature=deadbeefcafe0123456789",
            )
        )
        result = run_cli(
            "pull", f"{front.host}/fault/img:1", "--cache-dir", tmp_path / "c",
            "--creds", creds, "--debug",
        )  # fmt: skip
    assert result.returncode == 0, describe(result)
    assert "deadbeefcafe" not in result.stderr
