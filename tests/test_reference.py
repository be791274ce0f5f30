import pytest

from pulldocker.errors import UsageError
from pulldocker.reference import parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        pytest.param("busybox", "docker.io/library/busybox:latest", id="bare"),
        pytest.param("ubuntu:22.04", "docker.io/library/ubuntu:22.04", id="tag"),
        pytest.param("user/app:1", "docker.io/user/app:1", id="hub-user"),
        pytest.param(
            "index.docker.io/ubuntu", "docker.io/library/ubuntu:latest", id="index"
        ),
        pytest.param("docker.io/ubuntu", "docker.io/library/ubuntu:latest", id="hub"),
        pytest.param(
            "registry-1.docker.io/ubuntu",
            "registry-1.docker.io/ubuntu:latest",
            id="api-host-not-alias",
        ),
        pytest.param("localhost/app", "localhost/app:latest", id="localhost"),
        pytest.param("localhost:5000/app", "localhost:5000/app:latest", id="port"),
        pytest.param("[::1]:5000/x", "[::1]:5000/x:latest", id="ipv6"),
        pytest.param("127.0.0.1:5000/a/b:T", "127.0.0.1:5000/a/b:T", id="ipv4"),
        pytest.param("Foo/bar", "Foo/bar:latest", id="uppercase-domain"),
        pytest.param(
            "localhost:5000", "docker.io/library/localhost:5000", id="no-slash"
        ),
        pytest.param(f"myhost:5000/a/b@{DIGEST}", f"myhost:5000/a/b@{DIGEST}", id="dg"),
        pytest.param(
            f"ubuntu:22.04@{DIGEST}", f"docker.io/library/ubuntu@{DIGEST}", id="both"
        ),
        pytest.param("a.b/c__d/e-f.g", "a.b/c__d/e-f.g:latest", id="separators"),
    ],
)
def test_parse_reference_canonical(text: str, canonical: str) -> None:
    assert str(parse_reference(text)) == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("Busybox", "must be lowercase", id="upper-hub"),
        pytest.param("host:5000/App", "must be lowercase", id="upper-path"),
        pytest.param("ab" * 32, "image ID", id="identifier"),
        pytest.param("", "expected an image name", id="empty"),
        pytest.param("a/-b", "repository path", id="bad-component"),
        pytest.param("busybox:.x", "invalid tag", id="bad-tag"),
        pytest.param("busybox@sha256:abc", "invalid digest", id="short-digest"),
        pytest.param("busybox@sha256:" + "AB" * 32, "lowercase hex", id="upper-hex"),
        pytest.param("h.io/" + "a" * 260, "longer than 255", id="too-long"),
    ],
)
def test_parse_reference_rejects(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_reference(text)


def test_reference_api_host_for_docker_hub() -> None:
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert parse_reference("localhost:5000/x").api_host == "localhost:5000"


def test_reference_scope_and_familiar_name() -> None:
    ref = parse_reference("busybox")
    assert ref.scope() == "repository:library/busybox:pull"
    assert ref.familiar_name == "busybox"
    assert parse_reference("user/app").familiar_name == "user/app"
    assert parse_reference("h:1/a/b").familiar_name == "h:1/a/b"


def test_reference_identifier_prefers_digest() -> None:
    assert parse_reference(f"x:1@{DIGEST}").identifier == DIGEST
    assert parse_reference("x:1").identifier == "1"
