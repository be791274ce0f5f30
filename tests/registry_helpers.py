"""Real registries for tests: Debian's docker-registry on 127.0.0.1.

Each registry gets its own port and storage directory and runs with no
auth, htpasswd Basic auth, or Bearer tokens from a token server that runs
in a thread of the test process. TLS uses a self-signed certificate made
with ``openssl``. Images are pushed with ``skopeo copy`` from archives built
here with ``tarfile``.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DIVE_ARCHIVE = SHARED / "fixtures" / "public" / "dive" / "test-docker-image.tar"
SERVICE = "test-registry"
ISSUER = "test-token-issuer"


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Registry:
    url: str
    host: str
    workdir: Path
    cert_dir: Path | None = None
    username: str | None = None
    password: str | None = None
    token_requests: list[dict[str, Any]] = field(default_factory=list)

    def skopeo_dest_args(self) -> list[str]:
        args = []
        if self.cert_dir is not None:
            args.append(f"--dest-cert-dir={self.cert_dir}")
        else:
            args.append("--dest-tls-verify=false")
        if self.username:
            args.append(f"--dest-creds={self.username}:{self.password}")
        return args

    def push(self, source: str, name: str, *extra: str) -> None:
        command = ["skopeo", "copy", "-q", *self.skopeo_dest_args(), *extra]
        command += [source, f"docker://{self.host}/{name}"]
        subprocess.run(command, check=True, capture_output=True, timeout=120)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def run_registry(
    workdir: Path,
    *,
    auth: str | None = None,
    tls: bool = False,
    username: str = "alice",
    password: str = "s3cret-pw",
    token_ttl: int = 300,
) -> Iterator[Registry]:
    require_tools("docker-registry", "skopeo", "openssl")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    scheme = "https" if tls else "http"
    registry = Registry(f"{scheme}://127.0.0.1:{port}", f"127.0.0.1:{port}", workdir)
    sections: list[str] = []
    if tls:
        cert, key = make_certificate(workdir / "tls")
        registry.cert_dir = workdir / "ca"
        registry.cert_dir.mkdir()
        shutil.copy(cert, registry.cert_dir / "ca.crt")
        sections.append(f"  tls:\n    certificate: {cert}\n    key: {key}\n")
    token_server: TokenServer | None = None
    auth_config = ""
    if auth == "basic":
        require_tools("htpasswd")
        subprocess.run(
            ["htpasswd", "-Bbc", str(workdir / "htpasswd"), username, password],
            check=True,
            capture_output=True,
        )
        auth_config = (
            f"auth:\n  htpasswd:\n    realm: test\n    path: {workdir / 'htpasswd'}\n"
        )
    elif auth == "token":
        cert, key = make_certificate(workdir / "token")
        token_server = TokenServer(key, cert, username, password, token_ttl)
        token_server.requests = registry.token_requests
        auth_config = (
            f"auth:\n  token:\n    realm: {token_server.realm}\n"
            f"    service: {SERVICE}\n    issuer: {ISSUER}\n"
            f"    rootcertbundle: {cert}\n"
        )
    if auth:
        registry.username, registry.password = username, password
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: test-secret\n"
        + "".join(sections)
        + auth_config
    )
    log = (workdir / "registry.log").open("wb")
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_ready(registry, process)
        yield registry
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if token_server is not None:
            token_server.stop()


def _wait_ready(registry: Registry, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (registry.workdir / "registry.log").read_text(errors="replace")
            raise RuntimeError(f"docker-registry exited early:\n{log}")
        with contextlib.suppress(requests.RequestException):
            response = requests.get(f"{registry.url}/v2/", verify=False, timeout=1)
            if response.status_code in (200, 401):
                return
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not start on {registry.url}")


class TokenServer:
    """A Docker token server issuing RS256 JWTs, signed with ``openssl``."""

    def __init__(
        self, key: Path, cert: Path, username: str, password: str, ttl: int
    ) -> None:
        self.key, self.username, self.password, self.ttl = key, username, password, ttl
        pem = cert.read_text()
        self.x5c = "".join(
            line for line in pem.splitlines() if line and not line.startswith("-----")
        )
        self.requests: list[dict[str, Any]] = []
        handler = type("Handler", (_TokenHandler,), {"server_state": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def issue(self, subject: str, scopes: list[str]) -> str:
        now = int(time.time())
        access = []
        for scope in " ".join(scopes).split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + self.ttl,
            "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(),
            "access": access,
        }  # fmt: skip
        signing_input = f"{_b64(json.dumps(header))}.{_b64(json.dumps(claims))}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{_b64(signature)}"


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class _TokenHandler(BaseHTTPRequestHandler):
    server_state: TokenServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        self._answer("GET", query.get("scope", []), self._basic_user())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        user = self._basic_user()
        if form.get("grant_type") == ["refresh_token"]:
            user = (self.server_state.username, self.server_state.password)
        self._answer("POST", form.get("scope", []), user)

    def _basic_user(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user, password

    def _answer(
        self, method: str, scopes: list[str], user: tuple[str, str] | None
    ) -> None:
        state = self.server_state
        state.requests.append(
            {"method": method, "scopes": scopes, "user": user and user[0]}
        )
        if user is not None and user != (state.username, state.password):
            self._send(401, {"errors": [{"code": "UNAUTHORIZED"}]})
            return
        if user is None:
            scopes = []  # anonymous users get no access at all
        token = state.issue(user[0] if user else "", scopes)
        self._send(200, {"token": token, "expires_in": state.ttl})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# Image archives built with tarfile.


def layer_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(diff_ids: list[str], arch: str, variant: str = "") -> bytes:
    config: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "Labels": {"a": arch}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "test"} for _ in diff_ids],
    }
    if variant:
        config["variant"] = variant
    return json.dumps(config).encode()


def build_docker_archive(
    path: Path, layers: list[dict[str, bytes]], *, tag: str, arch: str = "amd64"
) -> list[str]:
    """Write a ``docker save`` style archive; return the layers' diff_ids."""
    tars = [layer_tar(files) for files in layers]
    diff_ids = [sha256(data) for data in tars]
    config = image_config(diff_ids, arch)
    config_name = sha256(config)[7:] + ".json"
    names = [f"{sha256(data)[7:]}/layer.tar" for data in tars]
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": names}]
    with tarfile.open(path, "w") as tar:
        _add(tar, config_name, config)
        for name, data in zip(names, tars, strict=True):
            _add(tar, name, data)
        _add(tar, "manifest.json", json.dumps(manifest).encode())
    return diff_ids


def build_multiplatform_layout(
    directory: Path, platforms: list[tuple[str, str]], *, ref: str = "multi"
) -> dict[str, str]:
    """Write an OCI layout whose index has one image per (arch, variant).

    Returns the manifest digest of each platform, keyed ``arch/variant``.
    The index also carries an attestation manifest, which must be skipped.
    """
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest

    descriptors = []
    digests = {}
    for arch, variant in platforms:
        layer = gzip.compress(layer_tar({"arch": f"{arch}{variant}\n".encode()}))
        diff_id = sha256(gzip.decompress(layer))
        config = image_config([diff_id], arch, variant)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": put(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": put(layer),
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        platform = {"architecture": arch, "os": "linux"}
        if variant:
            platform["variant"] = variant
        digest = put(manifest)
        digests[f"{arch}/{variant}".rstrip("/")] = digest
        descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": len(manifest),
                "platform": platform,
            }
        )
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descriptors,
    }
    index_bytes = json.dumps(index).encode()
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": put(index_bytes),
                "size": len(index_bytes),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(top))
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    digests["index"] = sha256(index_bytes)
    return digests


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def archive_diff_ids(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
    return list(config["rootfs"]["diff_ids"])


# Fixtures, imported by conftest.py.


@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry-plain")) as registry:
        yield registry


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry-basic"), auth="basic") as reg:
        yield reg


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry-token"), auth="token") as reg:
        yield reg


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry-tls"), tls=True) as reg:
        yield reg
