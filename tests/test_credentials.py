import base64
import json
import os
import stat
from pathlib import Path

import pytest

from pulldocker.credentials import Credentials, find_credentials, parse_creds_option
from pulldocker.errors import AuthenticationError, UsageError


def write_config(path: Path, config: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_explicit_credentials_win(tmp_path: Path) -> None:
    found = find_credentials("h:5000", username="u", password="p", environ={})
    assert found == Credentials("u", "p")


def test_docker_config_auth_field(tmp_path: Path) -> None:
    write_config(
        tmp_path / "docker" / "config.json",
        {"auths": {"h:5000": {"auth": basic("u", "pa:ss")}}},
    )
    env = {"DOCKER_CONFIG": str(tmp_path / "docker")}
    assert find_credentials("h:5000", environ=env) == Credentials("u", "pa:ss")


def test_docker_hub_uses_index_key(tmp_path: Path) -> None:
    write_config(
        tmp_path / ".docker" / "config.json",
        {"auths": {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}},
    )
    env = {"HOME": str(tmp_path)}
    assert find_credentials("docker.io", environ=env) == Credentials("u", "p")


def test_url_keys_match_by_host(tmp_path: Path) -> None:
    write_config(
        tmp_path / "auth.json",
        {"auths": {"https://h.example/v1/": {"identitytoken": "id-tok"}}},
    )
    found = find_credentials("h.example", authfile=tmp_path / "auth.json", environ={})
    assert found.identity_token == "id-tok"


def test_registry_auth_file_before_docker_config(tmp_path: Path) -> None:
    first = write_config(
        tmp_path / "a.json", {"auths": {"h": {"auth": basic("first", "1")}}}
    )
    write_config(
        tmp_path / "d" / "config.json", {"auths": {"h": {"auth": basic("d", "2")}}}
    )
    env = {"REGISTRY_AUTH_FILE": str(first), "DOCKER_CONFIG": str(tmp_path / "d")}
    assert find_credentials("h", environ=env).username == "first"


def test_xdg_runtime_auth_json(tmp_path: Path) -> None:
    write_config(
        tmp_path / "run" / "containers" / "auth.json",
        {"auths": {"h": {"registrytoken": "raw"}}},
    )
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run")}
    assert find_credentials("h", environ=env).registry_token == "raw"


def test_missing_entry_is_anonymous(tmp_path: Path) -> None:
    write_config(tmp_path / "d" / "config.json", {"auths": {}})
    env = {"DOCKER_CONFIG": str(tmp_path / "d")}
    assert find_credentials("h", environ=env) == Credentials()


def test_missing_explicit_authfile_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--authfile"):
        find_credentials("h", authfile=tmp_path / "absent.json", environ={})


def helper_script(directory: Path, name: str, body: str) -> None:
    directory.mkdir(exist_ok=True)
    script = directory / f"docker-credential-{name}"
    script.write_text(f"#!/bin/sh\nread key\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def helper_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_cred_helper_is_used(tmp_path: Path, helper_path: Path) -> None:
    helper_script(
        helper_path,
        "test",
        'echo "{\\"ServerURL\\":\\"$key\\",\\"Username\\":\\"hu\\",'
        '\\"Secret\\":\\"hs\\"}"',
    )
    config = write_config(tmp_path / "c.json", {"credHelpers": {"h:1": "test"}})
    assert find_credentials("h:1", authfile=config) == Credentials("hu", "hs")


def test_creds_store_token_user_is_identity_token(
    tmp_path: Path, helper_path: Path
) -> None:
    helper_script(
        helper_path,
        "store",
        'echo "{\\"Username\\":\\"<token>\\",\\"Secret\\":\\"idt\\"}"',
    )
    config = write_config(tmp_path / "c.json", {"credsStore": "store"})
    assert find_credentials("h", authfile=config).identity_token == "idt"


def test_creds_store_not_found_falls_back(tmp_path: Path, helper_path: Path) -> None:
    helper_script(
        helper_path, "none", 'echo "credentials not found in native keychain"; exit 1'
    )
    config = write_config(
        tmp_path / "c.json",
        {"credsStore": "none", "auths": {"h": {"auth": basic("a", "b")}}},
    )
    assert find_credentials("h", authfile=config) == Credentials("a", "b")


def test_failing_helper_is_auth_error(tmp_path: Path, helper_path: Path) -> None:
    helper_script(helper_path, "bad", "echo boom >&2; exit 3")
    config = write_config(tmp_path / "c.json", {"credHelpers": {"h": "bad"}})
    with pytest.raises(AuthenticationError, match="exit 3"):
        find_credentials("h", authfile=config)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("u:p", ("u", "p")),
        ("u", ("u", None)),
        ("u:p:q", ("u", "p:q")),
        ("u:", ("u", "")),
    ],
)
def test_parse_creds_option(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_creds_option(text) == expected


def test_parse_creds_option_rejects_empty_user() -> None:
    with pytest.raises(UsageError):
        parse_creds_option(":p")


def test_credentials_repr_hides_secrets() -> None:
    assert "secret" not in repr(Credentials("u", "secret", "secret", "secret"))
