"""The demo image from the README converts to its hand-checked tree."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import (
    CLI_TIMEOUT,
    PULLDOCKER,
    REPO,
    describe_failure,
    load_builder,
    missing_tools,
    run_pulldocker,
    tree_diff,
    umoci_rootfs,
    unprivileged_prefix,
)
from treelist import format_lines, list_dir, list_tar

DEMO = REPO / "fixtures" / "demo-busybox.tar"
RECORD = REPO / "fixtures" / "demo-busybox.json"
EXPECTED = REPO / "fixtures" / "demo-busybox.expected.tsv"


def expected_lines(*, owners: bool = True) -> list[str]:
    lines = [
        line
        for line in EXPECTED.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    if owners:
        return sorted(lines)
    return sorted(_drop_owner(line) for line in lines)


def _drop_owner(line: str) -> str:
    columns = line.split("\t")
    columns[3] = "-"
    return "\t".join(columns)


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "rootfs.tar"
    result = run_pulldocker(DEMO, "-o", out)
    assert result.returncode == 0, describe_failure(result)
    return out


def test_demo_archive_matches_record() -> None:
    record = json.loads(RECORD.read_text())
    data = DEMO.read_bytes()

    assert len(data) == record["archive"]["size"]
    assert hashlib.sha256(data).hexdigest() == record["archive"]["sha256"]
    assert len(data) < 3 * 1024 * 1024


def test_demo_builder_is_deterministic() -> None:
    builder = load_builder()
    busybox = b"\x7fELF not really busybox\n" * 100

    first = builder.build_demo(busybox, b"copyright\n")
    second = builder.build_demo(busybox, b"copyright\n")

    assert first == second
    assert first != DEMO.read_bytes()


def test_demo_converts_to_expected_tree(demo_output: Path) -> None:
    actual = format_lines(list_tar(demo_output))
    expected = expected_lines()

    assert actual == expected, tree_diff(actual, expected)


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.zst"])
def test_demo_compressed_output_same_tree(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"rootfs{suffix}"
    result = run_pulldocker(DEMO, "-o", out)
    assert result.returncode == 0, describe_failure(result)

    magic = out.read_bytes()[:4]
    if suffix == ".tar.gz":
        assert magic[:2] == b"\x1f\x8b"
    else:
        assert magic == b"\x28\xb5\x2f\xfd"
    actual = format_lines(list_tar(out))
    assert actual == expected_lines(), tree_diff(actual, expected_lines())


def test_demo_output_to_stdout(tmp_path: Path, demo_output: Path) -> None:
    result = subprocess.run(
        [*PULLDOCKER, str(DEMO), "-o", "-"],
        cwd=REPO,
        capture_output=True,
        timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")

    out = tmp_path / "stdout.tar"
    out.write_bytes(result.stdout)
    assert format_lines(list_tar(out)) == format_lines(list_tar(demo_output))


def test_demo_output_extracts_with_gnu_tar(demo_output: Path) -> None:
    if missing_tools("tar"):
        pytest.skip("GNU tar is not installed")
    prefix = unprivileged_prefix()
    # pytest's temporary root is mode 0700, so the user "nobody" could not
    # reach it. A world-readable directory under /tmp is used instead.
    with tempfile.TemporaryDirectory(prefix="pulldocker-demo-") as scratch:
        work = Path(scratch)
        target = work / "extracted"
        target.mkdir()
        archive = work / "rootfs.tar"
        shutil.copyfile(demo_output, archive)
        if prefix:
            os.chmod(work, 0o755)
            os.chmod(archive, 0o644)
            os.chown(target, 65534, 65534)

        result = subprocess.run(
            [*prefix, "tar", "-xpf", str(archive), "-C", str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        actual = format_lines(list_dir(target), owners=False)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    expected = expected_lines(owners=False)
    assert actual == expected, tree_diff(actual, expected)


def readme_first_command() -> str:
    """Return the README's install-and-convert command line."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("pip install . && pulldocker "):
            return line
    raise AssertionError("README.md has no 'pip install . && pulldocker' line")


def test_readme_first_command_runs(tmp_path: Path) -> None:
    command = readme_first_command().split(" && ", 1)[1].split()
    assert command[0] == "pulldocker"
    (tmp_path / "fixtures").mkdir()
    shutil.copyfile(DEMO, tmp_path / command[1])

    # The package is already installed for the tests, so run the module.
    result = subprocess.run(
        [*PULLDOCKER, *command[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    assert result.returncode == 0, result.stderr
    out = tmp_path / command[command.index("-o") + 1]
    assert format_lines(list_tar(out)) == expected_lines()


def test_readme_test_command_matches_ci() -> None:
    readme = (REPO / "README.md").read_text()
    ci_script = (REPO / ".ci" / "run").read_text()

    assert "TEST_COMMAND=(python3 -m pytest)" in ci_script
    assert "```sh\npython3 -m pytest\n```" in readme


@pytest.mark.umoci
def test_demo_expected_tree_matches_umoci(tmp_path: Path) -> None:
    missing = missing_tools("skopeo", "umoci")
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")

    rootfs = umoci_rootfs(f"docker-archive:{DEMO}", tmp_path)

    actual = format_lines(list_dir(rootfs, rootless=True))
    assert actual == expected_lines(), tree_diff(actual, expected_lines())
