"""A registry made of ``responses`` callbacks, for faults a real one lacks.

It serves ``https://registry.test``: the ``/v2/`` ping with a Bearer
challenge, a token realm on ``https://auth.test/token``, manifests by tag and
digest, and blobs. Tests replace single routes to inject 401s, 429s,
redirects, dropped connections and wrong bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import responses

from pulldocker.platform import Platform
from pulldocker.progress import NullProgress
from pulldocker.pull import PullOptions

HOST = "registry.test"
BASE = f"https://{HOST}"
REALM = "https://auth.test/token"
REPO = "team/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

Callback = Callable[[requests.PreparedRequest], tuple[int, dict[str, str], Any]]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_bytes(name: str, content: bytes) -> tuple[bytes, str]:
    """Return a gzip layer holding one file, and its diff_id."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    raw = buffer.getvalue()
    return gzip.compress(raw, mtime=0), sha256(raw)


@dataclass
class FakeImage:
    manifest: bytes
    config: bytes
    layers: list[bytes]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def make_image(arch: str = "amd64", files: int = 2) -> FakeImage:
    layers, diff_ids = [], []
    for number in range(files):
        blob, diff_id = layer_bytes(f"f{number}", f"{arch} {number}\n".encode() * 50)
        layers.append(blob)
        diff_ids.append(diff_id)
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(blob),
                    "size": len(blob),
                }
                for blob in layers
            ],
        }
    ).encode()
    return FakeImage(manifest, config, layers)


def make_index(images: dict[str, FakeImage]) -> bytes:
    entries = []
    for platform, image in images.items():
        parsed = Platform.parse(platform)
        described: dict[str, str] = {
            "os": parsed.os,
            "architecture": parsed.architecture,
        }
        if parsed.variant:
            described["variant"] = parsed.variant
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.digest,
                "size": len(image.manifest),
                "platform": described,
            }
        )
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    ).encode()


@dataclass
class FakeRegistry:
    rsps: responses.RequestsMock
    tokens_issued: list[str] = field(default_factory=list)
    blob_requests: list[requests.PreparedRequest] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    token_auth: bool = True

    def challenge(self, error: str | None = None) -> str:
        value = f'Bearer realm="{REALM}",service="registry.test"'
        value += f',scope="repository:{REPO}:pull"'
        if error:
            value += f',error="{error}"'
        return value

    def install_ping_and_token(self) -> None:
        self.rsps.add(
            responses.GET,
            f"{BASE}/v2/",
            status=401,
            headers={"WWW-Authenticate": self.challenge()},
        )
        self.rsps.add_callback(responses.GET, REALM, callback=self._issue_token)

    def _issue_token(
        self, request: requests.PreparedRequest
    ) -> tuple[int, dict[str, str], str]:
        token = f"token-{len(self.tokens_issued) + 1}"
        self.tokens_issued.append(token)
        self.valid_tokens.add(token)
        return 200, {}, json.dumps({"token": token, "expires_in": 300})

    def authorized(self, request: requests.PreparedRequest) -> bool:
        if not self.token_auth:
            return True
        header = request.headers.get("Authorization", "")
        return header.removeprefix("Bearer ") in self.valid_tokens

    def unauthorized(self) -> tuple[int, dict[str, str], bytes]:
        body = json.dumps({"errors": [{"code": "UNAUTHORIZED"}]}).encode()
        return 401, {"WWW-Authenticate": self.challenge("invalid_token")}, body

    def serve_manifest(self, name: str, body: bytes, media_type: str) -> None:
        def callback(
            request: requests.PreparedRequest,
        ) -> tuple[int, dict[str, str], bytes]:
            if not self.authorized(request):
                return self.unauthorized()
            headers = {
                "Content-Type": media_type,
                "Docker-Content-Digest": sha256(body),
            }
            return 200, headers, b"" if request.method == "HEAD" else body

        url = f"{BASE}/v2/{REPO}/manifests/{name}"
        self.rsps.add_callback(responses.HEAD, url, callback=callback)
        self.rsps.add_callback(responses.GET, url, callback=callback)

    def serve_blob(self, data: bytes, callback: Callback | None = None) -> None:
        def default(
            request: requests.PreparedRequest,
        ) -> tuple[int, dict[str, str], bytes]:
            self.blob_requests.append(request)
            if not self.authorized(request):
                return self.unauthorized()
            return 200, {}, data

        url = f"{BASE}/v2/{REPO}/blobs/{sha256(data)}"
        self.rsps.add_callback(responses.GET, url, callback=callback or default)

    def serve_image(self, image: FakeImage, tag: str = "1") -> None:
        self.serve_manifest(tag, image.manifest, OCI_MANIFEST)
        self.serve_manifest(image.digest, image.manifest, OCI_MANIFEST)
        self.serve_blob(image.config)
        for blob in image.layers:
            self.serve_blob(blob)


def fake_options(cache: Path, platform: str = "linux/amd64") -> PullOptions:
    return PullOptions(platform=Platform.parse(platform), cache_dir=cache)


def quiet() -> NullProgress:
    return NullProgress()
