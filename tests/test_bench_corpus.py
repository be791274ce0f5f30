"""Flatten the quick benchmark image and check it against its expected rootfs.

The image (about 100 MB in 10 layers, made from real Debian packages) is
built by the corpus generator beside the checkout, which also writes the
expected tree. The generator downloads its .debs with apt-get, so the test
runs only where apt-get works.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import SHARED, describe_failure, run_pulldocker

BENCH = SHARED / "bench"
CORPUS_DIR = Path("/tmp/bench")
CORPUS = CORPUS_DIR / "corpus-quick.tar"
EXPECTED = CORPUS_DIR / "corpus-quick.expected.tsv.gz"

# Building from an empty .deb cache took 15 s on a 2-core machine, most of it
# downloading the .debs. The limit leaves room for a slow mirror.
BUILD_TIMEOUT = 1800

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BENCH.is_dir(), reason=f"{BENCH} is not present"),
]


def apt_lists_present() -> bool:
    return bool(glob.glob("/var/lib/apt/lists/*_Packages*"))


@pytest.fixture(scope="module")
def quick_corpus() -> Path:
    if CORPUS.exists() and EXPECTED.exists():
        return CORPUS
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get and dpkg-deb are needed to build the corpus")
    command = [sys.executable, str(BENCH / "make_corpus.py"), "--quick"]
    if not apt_lists_present():
        command.append("--apt-update")
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, describe_failure(result)
    return CORPUS


def test_quick_corpus_matches_expected(quick_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "rootfs.tar"

    result = run_pulldocker(quick_corpus, "-o", out, "-q")
    assert result.returncode == 0, describe_failure(result)

    compare = subprocess.run(
        [sys.executable, str(BENCH / "compare_rootfs.py"), str(out), str(EXPECTED)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert compare.returncode == 0, compare.stdout[-6000:] + compare.stderr[-2000:]
