import dataclasses
import email.utils
import io
import json
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import responses
from fake_registry import (
    BASE,
    OCI_INDEX,
    OCI_MANIFEST,
    REALM,
    REPO,
    FakeRegistry,
    fake_options,
    make_image,
    make_index,
    quiet,
    sha256,
)

from pulldocker.auth import Authenticator
from pulldocker.credentials import Credentials
from pulldocker.errors import (
    AuthenticationError,
    IntegrityError,
    LimitExceededError,
    NotFoundError,
    RateLimitError,
    UnsupportedError,
)
from pulldocker.manifest import Descriptor
from pulldocker.progress import NullProgress
from pulldocker.pull import inspect, pull
from pulldocker.reference import parse_reference
from pulldocker.registry import RegistryClient
from pulldocker.transport import RetryPolicy, Transport

REF = f"registry.test/{REPO}:1"


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []
    monkeypatch.setattr(time, "sleep", recorded.append)
    return recorded


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        registry = FakeRegistry(rsps)
        registry.install_ping_and_token()
        yield registry


def cached_blobs(cache: Path) -> set[str]:
    directory = cache / "blobs" / "sha256"
    return {path.name for path in directory.iterdir()} if directory.exists() else set()


def test_expired_token_is_refreshed_once(fake: FakeRegistry, tmp_path: Path) -> None:
    image = make_image()
    fake.serve_image(image)
    layer = image.layers[1]

    def expire_then_serve(
        request: requests.PreparedRequest,
    ) -> tuple[int, dict[str, str], bytes]:
        fake.blob_requests.append(request)
        if len(fake.tokens_issued) == 1:
            fake.valid_tokens.clear()  # the first token expires mid-pull
            return fake.unauthorized()
        return 200, {}, layer

    fake.rsps.remove(responses.GET, f"{BASE}/v2/{REPO}/blobs/{sha256(layer)}")
    fake.serve_blob(layer, expire_then_serve)
    cached = pull(REF, fake_options(tmp_path / "cache"), quiet())
    assert fake.tokens_issued == ["token-1", "token-2"]
    assert fake.blob_requests[-1].headers["Authorization"] == "Bearer token-2"
    assert cached.image.endswith(image.digest.replace(":", "-"))


def test_second_unauthorized_is_fatal(fake: FakeRegistry, tmp_path: Path) -> None:
    def always_expired(
        request: requests.PreparedRequest,
    ) -> tuple[int, dict[str, str], bytes]:
        fake.valid_tokens.clear()
        return fake.unauthorized()

    url = f"{BASE}/v2/{REPO}/manifests/latest"
    fake.rsps.add_callback(responses.HEAD, url, callback=always_expired)
    fake.rsps.add_callback(responses.GET, url, callback=always_expired)
    with pytest.raises(AuthenticationError, match="HTTP 401"):
        pull(f"registry.test/{REPO}", fake_options(tmp_path / "cache"), quiet())
    # HEAD refreshes once, then GET starts with the second token and refreshes.
    assert len(fake.tokens_issued) == 3


def test_redirect_to_other_host_drops_authorization(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    image = make_image()
    fake.serve_image(image)
    layer = image.layers[0]
    url = f"{BASE}/v2/{REPO}/blobs/{sha256(layer)}"
    fake.rsps.remove(responses.GET, url)
    storage_requests: list[requests.PreparedRequest] = []

    def redirect(
        request: requests.PreparedRequest,
    ) -> tuple[int, dict[str, str], bytes]:
        assert request.headers["Authorization"].startswith("Bearer ")
        location = "https://storage.test:8443/blob?X-Amz-Signature=abc"
        return 307, {"Location": location}, b""

    def storage(request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        storage_requests.append(request)
        if "Authorization" in request.headers:
            return 400, {}, b"only one auth mechanism allowed"
        return 200, {}, layer

    fake.rsps.add_callback(responses.GET, url, callback=redirect)
    fake.rsps.add_callback(
        responses.GET, "https://storage.test:8443/blob", callback=storage
    )
    pull(REF, fake_options(tmp_path / "cache"), quiet())
    assert len(storage_requests) == 1
    assert "Authorization" not in storage_requests[0].headers
    assert storage_requests[0].headers["Accept-Encoding"] == "identity"


def test_relative_redirect_keeps_authorization(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    image = make_image()
    fake.serve_image(image)
    layer = image.layers[0]
    url = f"{BASE}/v2/{REPO}/blobs/{sha256(layer)}"
    fake.rsps.remove(responses.GET, url)
    fake.rsps.add(responses.GET, url, status=302, headers={"Location": "/mirror/x"})
    seen: list[str] = []

    def mirror(request: requests.PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        seen.append(request.headers.get("Authorization", ""))
        return 200, {}, layer

    fake.rsps.add_callback(responses.GET, f"{BASE}/mirror/x", callback=mirror)
    pull(REF, fake_options(tmp_path / "cache"), quiet())
    assert seen == ["Bearer token-1"]


@pytest.mark.parametrize("with_body", [True, False], ids=["json-body", "no-body"])
def test_rate_limit_retries_after_seconds(
    fake: FakeRegistry, tmp_path: Path, sleeps: list[float], with_body: bool
) -> None:
    image = make_image()
    fake.serve_image(image)
    layer = image.layers[0]
    url = f"{BASE}/v2/{REPO}/blobs/{sha256(layer)}"
    fake.rsps.remove(responses.GET, url)
    body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS"}]}) if with_body else ""
    for _ in range(2):
        fake.rsps.add(
            responses.GET, url, status=429, headers={"Retry-After": "1"}, body=body
        )
    fake.rsps.add(responses.GET, url, body=layer)
    pull(REF, fake_options(tmp_path / "cache"), quiet())
    assert sleeps == [1.0, 1.0]


def test_rate_limit_retry_after_http_date(
    fake: FakeRegistry, tmp_path: Path, sleeps: list[float]
) -> None:
    image = make_image()
    fake.serve_image(image)
    url = f"{BASE}/v2/{REPO}/manifests/{image.digest}"
    fake.rsps.remove(responses.GET, url)
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    fake.rsps.add(responses.GET, url, status=429, headers={"Retry-After": later})
    far = email.utils.formatdate(time.time() + 3600, usegmt=True)
    fake.rsps.add(responses.GET, url, status=429, headers={"Retry-After": far})
    fake.rsps.add(responses.GET, url, body=image.manifest, content_type=OCI_MANIFEST)
    pull(REF, fake_options(tmp_path / "cache"), quiet())
    assert 25 < sleeps[0] <= 30
    assert sleeps[1] == 60.0  # capped


def test_rate_limit_gives_up_after_attempts(
    fake: FakeRegistry, tmp_path: Path, sleeps: list[float]
) -> None:
    image = make_image()
    fake.serve_image(image)
    url = f"{BASE}/v2/{REPO}/blobs/{sha256(image.config)}"
    fake.rsps.remove(responses.GET, url)
    fake.rsps.add(responses.GET, url, status=429, headers={"Retry-After": "0"})
    with pytest.raises(RateLimitError, match="rate limit"):
        pull(REF, fake_options(tmp_path / "cache"), quiet())
    assert len(sleeps) == 4


def test_server_errors_are_retried_with_backoff(
    fake: FakeRegistry, tmp_path: Path, sleeps: list[float]
) -> None:
    image = make_image()
    fake.serve_image(image)
    url = f"{BASE}/v2/{REPO}/blobs/{sha256(image.config)}"
    fake.rsps.remove(responses.GET, url)
    fake.rsps.add(responses.GET, url, status=503)
    fake.rsps.add(responses.GET, url, status=502)
    fake.rsps.add(responses.GET, url, body=image.config)
    pull(REF, fake_options(tmp_path / "cache"), quiet())
    assert sleeps == [2.0, 4.0]


def test_oci_index_needs_accept_header(fake: FakeRegistry, tmp_path: Path) -> None:
    amd64, arm64 = make_image("amd64"), make_image("arm64")
    index = make_index({"linux/amd64": amd64, "linux/arm64": arm64})
    accept_headers: list[str] = []

    def only_with_accept(
        request: requests.PreparedRequest,
    ) -> tuple[int, dict[str, str], bytes]:
        accept = request.headers.get("Accept", "")
        accept_headers.append(accept)
        if OCI_INDEX not in accept:
            return 404, {}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
        body = b"" if request.method == "HEAD" else index
        return 200, {"Content-Type": OCI_INDEX}, body

    url = f"{BASE}/v2/{REPO}/manifests/1"
    fake.rsps.add_callback(responses.HEAD, url, callback=only_with_accept)
    fake.rsps.add_callback(responses.GET, url, callback=only_with_accept)
    fake.serve_manifest(sha256(index), index, OCI_INDEX)
    fake.serve_image(arm64, tag="arm")
    fake.token_auth = False
    found = inspect(REF, fake_options(tmp_path / "cache", "linux/arm64"))
    assert found["digest"] == arm64.digest
    assert found["indexDigest"] == sha256(index)
    for accept in accept_headers:
        for media_type in (OCI_INDEX, OCI_MANIFEST):
            assert media_type in accept
        assert "application/vnd.docker.distribution.manifest.v2+json" in accept
        assert "application/vnd.docker.distribution.manifest.list.v2+json" in accept


def test_nested_index_is_followed(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.token_auth = False
    image = make_image("arm64")
    inner = make_index({"linux/arm64": image})
    outer = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_INDEX, "digest": sha256(inner), "size": len(inner)}
            ],
        }
    ).encode()
    fake.serve_manifest("1", outer, OCI_INDEX)
    fake.serve_manifest(sha256(outer), outer, OCI_INDEX)
    fake.serve_manifest(sha256(inner), inner, OCI_INDEX)
    fake.serve_image(image, tag="x")
    cached = pull(REF, fake_options(tmp_path / "cache", "linux/arm64"), quiet())
    assert cached.image.endswith(image.digest.replace(":", "-"))


def test_schema1_manifest_is_rejected_clearly(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    fake.token_auth = False
    schema1 = json.dumps(
        {
            "schemaVersion": 1,
            "name": REPO,
            "tag": "1",
            "fsLayers": [{"blobSum": "sha256:" + "a" * 64}],
            "history": [{"v1Compatibility": "{}"}],
        }
    ).encode()
    media_type = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    fake.serve_manifest("1", schema1, media_type)
    fake.serve_manifest(sha256(schema1), schema1, media_type)
    with pytest.raises(UnsupportedError, match="schema1"):
        pull(REF, fake_options(tmp_path / "cache"), quiet())
    assert cached_blobs(tmp_path / "cache") == set()


def test_manifest_not_found_names_the_reference(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
    for method in (responses.HEAD, responses.GET):
        fake.rsps.add(method, f"{BASE}/v2/{REPO}/manifests/1", status=404, body=body)
    with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN") as caught:
        pull(REF, fake_options(tmp_path / "cache"), quiet())
    assert REPO in str(caught.value)


def test_corrupt_layer_never_enters_cache(fake: FakeRegistry, tmp_path: Path) -> None:
    image = make_image()
    fake.serve_image(image)
    layer = image.layers[0]
    url = f"{BASE}/v2/{REPO}/blobs/{sha256(layer)}"
    fake.rsps.remove(responses.GET, url)
    tampered = bytearray(layer)
    tampered[-12] ^= 0xFF
    fake.rsps.add(responses.GET, url, body=bytes(tampered))
    with pytest.raises(IntegrityError, match="digest mismatch"):
        pull(REF, fake_options(tmp_path / "cache"), quiet())
    names = cached_blobs(tmp_path / "cache")
    assert sha256(layer)[7:] not in names
    assert not any(name.startswith(".tmp") for name in names)
    assert not (tmp_path / "cache" / "manifest.json").exists()


class DroppingStream(io.RawIOBase):
    """A body that raises a connection reset after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int | None) -> None:
        self.data, self.limit, self.position = data, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.limit is not None and self.position >= self.limit:
            raise ConnectionResetError("connection reset by peer")
        end = len(self.data) if self.limit is None else self.limit
        chunk = self.data[self.position : min(end, self.position + len(buffer))]
        buffer[: len(chunk)] = chunk
        self.position += len(chunk)
        return len(chunk)


def resume_client(fake: FakeRegistry) -> RegistryClient:
    fake.token_auth = False
    transport = Transport(retry=RetryPolicy(attempts=1))
    auth = Authenticator(transport, Credentials())
    return RegistryClient(parse_reference(REF), transport, auth)


def test_dropped_connection_resumes_with_range(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 16384  # 4 MiB
    ranges: list[str | None] = []

    def flaky(request: requests.PreparedRequest) -> tuple[int, dict[str, str], object]:
        ranges.append(request.headers.get("Range"))
        if len(ranges) == 1:
            return 200, {}, io.BufferedReader(DroppingStream(data, 5 << 19))
        first = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
        headers = {"Content-Range": f"bytes {first}-{len(data) - 1}/{len(data)}"}
        return 206, headers, data[first:]

    fake.serve_blob(data, flaky)  # type: ignore[arg-type]
    descriptor = Descriptor("application/octet-stream", sha256(data), len(data))
    with (tmp_path / "blob").open("w+b") as target:
        resume_client(fake).download_blob(descriptor, target, NullProgress())
    assert (tmp_path / "blob").read_bytes() == data
    assert ranges[0] is None
    assert ranges[1] is not None
    assert ranges[1].startswith("bytes=")


def test_resume_restarts_when_range_ignored(fake: FakeRegistry, tmp_path: Path) -> None:
    data = b"z" * (3 << 20) + b"end"
    calls: list[int] = []

    def ignore_range(
        request: requests.PreparedRequest,
    ) -> tuple[int, dict[str, str], object]:
        calls.append(1)
        if len(calls) == 1:
            return 200, {}, io.BufferedReader(DroppingStream(data, 3 << 19))
        return 200, {}, data

    fake.serve_blob(data, ignore_range)  # type: ignore[arg-type]
    descriptor = Descriptor("application/octet-stream", sha256(data), len(data))
    with (tmp_path / "blob").open("w+b") as target:
        resume_client(fake).download_blob(descriptor, target, NullProgress())
    assert (tmp_path / "blob").read_bytes() == data


class ZeroStream(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


@pytest.mark.slow
def test_huge_blob_streams_in_bounded_memory(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    size = 1 << 30
    digest = "sha256:49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14"

    def huge(request: requests.PreparedRequest) -> tuple[int, dict[str, str], object]:
        return 200, {}, io.BufferedReader(ZeroStream(size), buffer_size=1 << 20)

    fake.rsps.add_callback(
        responses.GET, f"{BASE}/v2/{REPO}/blobs/{digest}", callback=huge
    )
    descriptor = Descriptor("application/octet-stream", digest, size)
    tracemalloc.start()
    try:
        with (tmp_path / "blob").open("w+b") as target:
            resume_client(fake).download_blob(descriptor, target, NullProgress())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (tmp_path / "blob").stat().st_size == size
    assert peak < 32 << 20


def test_token_refresh_post_falls_back_to_get(
    tmp_path: Path,
) -> None:
    with responses.RequestsMock() as rsps:
        rsps.add(
            responses.GET,
            f"{BASE}/v2/",
            status=401,
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}",service="s"'},
        )
        rsps.add(responses.POST, REALM, status=404)
        rsps.add(responses.GET, REALM, json={"access_token": "t", "expires_in": 10})
        transport = Transport()
        auth = Authenticator(transport, Credentials(identity_token="refresh-me"))
        client = RegistryClient(parse_reference(REF), transport, auth)
        client.ping()
        value = auth.authorization(client.host, client.scopes)
        assert value == "Bearer t"
        post = rsps.calls[1].request
        assert post.method == "POST"
        assert "grant_type=refresh_token" in str(post.body)
        assert "refresh_token=refresh-me" in str(post.body)


def test_token_is_cached_per_scope(tmp_path: Path) -> None:
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, REALM, json={"token": "a", "expires_in": 300})
        rsps.add(responses.GET, REALM, json={"token": "b", "expires_in": 300})
        transport = Transport()
        auth = Authenticator(transport, Credentials("u", "p"))
        response = requests.Response()
        response.headers["WWW-Authenticate"] = f'Bearer realm="{REALM}",service="s"'
        auth.remember("h", response)
        assert auth.authorization("h", ["repository:a:pull"]) == "Bearer a"
        assert auth.authorization("h", ["repository:a:pull"]) == "Bearer a"
        assert auth.authorization("h", ["repository:b:pull"]) == "Bearer b"
        query = rsps.calls[0].request.url or ""
        assert "scope=repository%3Aa%3Apull" in query
        assert "account=u" in query
        assert "service=s" in query
        basic = rsps.calls[0].request.headers["Authorization"]
        assert basic.startswith("Basic ")


def test_concurrent_pulls_record_both_images(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    fake.token_auth = False
    first, second = make_image("amd64", files=3), make_image("amd64", files=1)
    fake.serve_image(first, tag="1")
    fake.serve_image(second, tag="2")
    cache = tmp_path / "cache"
    errors: list[BaseException] = []

    def run(reference: str) -> None:
        try:
            pull(reference, fake_options(cache), quiet())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(f"registry.test/{REPO}:{tag}",))
        for tag in ("1", "2", "1", "2")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    entries = json.loads((cache / "manifest.json").read_text())
    assert len(entries) == 2


def test_insufficient_scope_widens_token(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.token_auth = False
    image = make_image()
    fake.serve_image(image)
    url = f"{BASE}/v2/{REPO}/blobs/{sha256(image.config)}"
    fake.rsps.remove(responses.GET, url)
    extra = "repository:team/base:pull"
    challenge = f'Bearer realm="{REALM}",scope="{extra}",error="insufficient_scope"'
    fake.rsps.add(
        responses.GET, url, status=403, headers={"WWW-Authenticate": challenge}
    )
    fake.rsps.add(responses.GET, url, body=image.config)
    pull(REF, fake_options(tmp_path / "cache"), quiet())
    token_urls = [
        c.request.url or "" for c in fake.rsps.calls if REALM in (c.request.url or "")
    ]
    assert len(token_urls) == 2
    assert "team%2Fbase" in token_urls[1]
    assert "team%2Fapp" in token_urls[1]


def test_resume_accepts_range_not_satisfiable(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    data = b"q" * (2 << 20)
    calls: list[str | None] = []

    def complete_then_drop(
        request: requests.PreparedRequest,
    ) -> tuple[int, dict[str, str], object]:
        calls.append(request.headers.get("Range"))
        if len(calls) == 1:
            return 200, {}, io.BufferedReader(DroppingStream(data, len(data)))
        return 416, {"Content-Range": f"bytes */{len(data)}"}, b""

    fake.serve_blob(data, complete_then_drop)  # type: ignore[arg-type]
    descriptor = Descriptor("application/octet-stream", sha256(data), len(data))
    with (tmp_path / "blob").open("w+b") as target:
        resume_client(fake).download_blob(descriptor, target, NullProgress())
    assert calls == [None, f"bytes={len(data)}-"]
    assert (tmp_path / "blob").read_bytes() == data


def test_registry_warning_logged_once(
    fake: FakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.token_auth = False
    image = make_image()
    fake.serve_image(image)
    warning = '299 - "this repository is deprecated"'
    manifest_url = f"{BASE}/v2/{REPO}/manifests/{image.digest}"
    config_url = f"{BASE}/v2/{REPO}/blobs/{sha256(image.config)}"
    fake.rsps.remove(responses.GET, manifest_url)
    fake.rsps.remove(responses.GET, config_url)
    fake.rsps.add(
        responses.GET,
        manifest_url,
        body=image.manifest,
        headers={"Content-Type": OCI_MANIFEST, "Warning": warning},
    )
    fake.rsps.add(
        responses.GET, config_url, body=image.config, headers={"Warning": warning}
    )
    pull(REF, fake_options(tmp_path / "cache"), quiet())
    messages = [
        r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()
    ]
    assert len(messages) == 1


def test_layer_past_size_limit_is_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    image = make_image()
    fake.serve_image(image)
    options = dataclasses.replace(fake_options(tmp_path / "cache"), max_layer_size=512)
    with pytest.raises(LimitExceededError):
        pull(REF, options, quiet())
    blobs = tmp_path / "cache" / "blobs" / "sha256"
    stored = list(blobs.iterdir()) if blobs.is_dir() else []
    for path in stored:  # only the manifest and config may remain
        assert path.read_bytes().startswith(b"{"), path.name
