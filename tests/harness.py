"""Helpers shared by the end-to-end tests: run the CLI, build reference trees."""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PUBLIC_FIXTURES = SHARED / "fixtures" / "public"

# A conversion of a small fixture takes well under a second. The timeout only
# stops a hung process from stalling the whole run.
CLI_TIMEOUT = 300
PULLDOCKER = (sys.executable, "-m", "pulldocker")


def run_pulldocker(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pulldocker ARGS`` from the checkout and capture output."""
    return subprocess.run(
        [*PULLDOCKER, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def describe_failure(result: subprocess.CompletedProcess[str]) -> str:
    """Summarise a finished CLI run for an assertion message."""
    return (
        f"exit {result.returncode}\n--- stderr ---\n{result.stderr[-4000:]}"
        f"\n--- stdout ---\n{result.stdout[-1000:]}"
    )


def tree_diff(actual: list[str], expected: list[str], *, limit: int = 80) -> str:
    """Return a unified diff of two listings, cut to ``limit`` lines."""
    lines = list(
        difflib.unified_diff(expected, actual, "expected", "pulldocker", lineterm="")
    )
    if len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more diff lines"]
    return "\n".join(lines)


def missing_tools(*names: str) -> list[str]:
    """Return the names in ``names`` that are not on ``PATH``."""
    return [name for name in names if shutil.which(name) is None]


def run_tool(*args: str | os.PathLike[str]) -> None:
    """Run a reference tool and raise with its stderr when it fails."""
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, args))} failed with exit {result.returncode}: "
            f"{result.stderr.strip()}"
        )


def umoci_rootfs(source: str, work: Path, *skopeo_args: str) -> Path:
    """Flatten ``source`` (a skopeo transport reference) with umoci.

    skopeo copies the image into an OCI layout, recompressing layers to gzip
    because umoci 0.4.7 rejects zstd layers, and ``umoci unpack --rootless``
    applies the layers. Returns the rootfs directory.
    """
    layout = work / "oci"
    bundle = work / "bundle"
    run_tool(
        "skopeo",
        "copy",
        "--quiet",
        "--dest-compress-format",
        "gzip",
        *skopeo_args,
        source,
        f"oci:{layout}:ref",
    )
    run_tool("umoci", "unpack", "--rootless", "--image", f"{layout}:ref", bundle)
    return bundle / "rootfs"


def unprivileged_prefix() -> list[str]:
    """Return a command prefix that runs as the user nobody (65534), or ``[]``."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    return []


def load_builder() -> ModuleType:
    """Import ``fixtures/build_demo.py``, which also writes archives for tests."""
    name = "build_demo"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO / "fixtures" / "build_demo.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
