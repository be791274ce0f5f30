from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from layerbuild import Image, compress, docker_archive, layer, run_cli

from pulldocker.cli import is_local_source


@pytest.mark.parametrize(
    ("source", "local"),
    [
        ("-", True),
        ("./busybox", True),
        ("/abs/image", True),
        ("../up/image", True),
        ("~/image", True),
        ("saved.tar", True),
        ("saved.tar.gz", True),
        ("busybox", False),
        ("busybox:latest", False),
        ("127.0.0.1:5000/a/b:1", False),
        ("ghcr.io/owner/app@sha256:" + "a" * 64, False),
    ],
)
def test_is_local_source_rule(source: str, local: bool) -> None:
    assert is_local_source(source) is local


def test_existing_path_wins_over_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "busybox").mkdir()
    assert is_local_source("busybox")


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    image = Image([layer("etc/", 'etc/hostname "box"'), layer('bin "x"')])
    return docker_archive(tmp_path / "image.tar", image)


def one_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in lines[0]
    return lines[0]


def test_missing_archive_exits_not_found(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "nope.tar", "-o", tmp_path / "out.tar")
    assert result.returncode == 4
    assert "no such file" in one_line(result.stderr)


def test_missing_output_directory_is_usage_error(archive: Path, tmp_path: Path) -> None:
    result = run_cli(archive, "-o", tmp_path / "no" / "out.tar")
    assert result.returncode == 2
    assert "does not exist" in one_line(result.stderr)


def test_invalid_platform_is_usage_error(archive: Path, tmp_path: Path) -> None:
    result = run_cli(archive, "-o", tmp_path / "out.tar", "--platform", "linux")
    assert result.returncode == 2
    assert "os/arch" in one_line(result.stderr)


def test_image_option_rejected_with_reference(tmp_path: Path) -> None:
    result = run_cli("busybox:latest", "--image", "0", "-o", tmp_path / "out.tar")
    assert result.returncode == 2
    one_line(result.stderr)


def test_output_to_stdout_is_only_the_tar(archive: Path) -> None:
    result = run_cli(archive, "-o", "-", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        names = tar.getnames()
    assert names == ["bin", "etc", "etc/hostname"]


def test_input_from_stdin(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    result = run_cli("-", "-o", out, stdin=archive.read_bytes())
    assert result.returncode == 0, result.stderr
    with tarfile.open(out) as tar:
        assert tar.extractfile("etc/hostname").read() == b"box"  # type: ignore[union-attr]


def test_diff_id_mismatch_leaves_no_output(tmp_path: Path) -> None:
    image = Image([layer('a "1"')], diff_ids=["sha256:" + "0" * 64])
    source = docker_archive(tmp_path / "bad.tar", image)
    out = tmp_path / "out.tar"
    result = run_cli(source, "-o", out)
    assert result.returncode == 7
    assert "diff_id mismatch" in one_line(result.stderr)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tar"]


def test_failure_keeps_existing_output(tmp_path: Path) -> None:
    image = Image([layer('a "1"')], diff_ids=["sha256:" + "0" * 64])
    source = docker_archive(tmp_path / "bad.tar", image)
    out = tmp_path / "out.tar"
    out.write_bytes(b"previous")
    result = run_cli(source, "-o", out)
    assert result.returncode == 7
    assert out.read_bytes() == b"previous"


def test_multi_image_archive_lists_choices(tmp_path: Path) -> None:
    first = Image([layer('a "1"')], tags=["one:1"])
    second = Image([layer('b "2"')], tags=["two:2"])
    source = docker_archive(tmp_path / "two.tar", first, second)
    result = run_cli(source, "-o", tmp_path / "out.tar")
    assert result.returncode == 2
    message = one_line(result.stderr)
    assert "[0] one:1" in message
    assert "[1] two:2" in message


@pytest.mark.parametrize("selector", ["two:2", "1", "@1", "docker.io/library/two:2"])
def test_image_option_selects(tmp_path: Path, selector: str) -> None:
    first = Image([layer('a "1"')], tags=["one:1"])
    second = Image([layer('b "2"')], tags=["two:2"])
    source = docker_archive(tmp_path / "two.tar", first, second)
    out = tmp_path / "out.tar"
    result = run_cli(source, "-o", out, "--image", selector)
    assert result.returncode == 0, result.stderr
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["b"]


def test_image_option_unknown_tag(tmp_path: Path) -> None:
    first = Image([layer('a "1"')], tags=["one:1"])
    source = docker_archive(tmp_path / "one.tar", first)
    result = run_cli(source, "-o", tmp_path / "out.tar", "--image", "two:2")
    assert result.returncode == 4
    assert "one:1" in one_line(result.stderr)


def test_version_option() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(b"pulldocker ")


def test_tmpdir_must_exist(archive: Path, tmp_path: Path) -> None:
    result = run_cli(archive, "-o", tmp_path / "out.tar", "--tmpdir", tmp_path / "no")
    assert result.returncode == 2
    assert "--tmpdir" in one_line(result.stderr)


def test_tmpdir_holds_no_leftovers(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    image = Image([compress(layer('a "1"'), "gzip")])
    source = docker_archive(tmp_path / "gz.tar", image)
    result = run_cli(source, "-o", tmp_path / "out.tar", "--tmpdir", spool)
    assert result.returncode == 0, result.stderr
    assert list(spool.iterdir()) == []
