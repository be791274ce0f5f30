"""Time pulldocker beside baseline commands on the benchmark corpora.

Usage:
    python benchmarks/run.py            # full corpora, 5 runs per side
    python benchmarks/run.py --quick    # the ~100 MB corpus, 3 runs per side

The corpora come from ``make_corpus.py`` in ``../shared/bench`` beside the
checkout. They are built into ``--bench-dir`` when missing and reused when
present. Each row runs a pulldocker command and its baseline in turn, once
untimed to warm the page cache on both sides and then ``--runs`` times each,
and reports the median wall times, their ratio and pulldocker's peak resident
memory. Every rootfs tar that pulldocker writes is checked against the
corpus's expected tree with ``compare_rootfs.py``.

The registry rows start Debian's ``docker-registry`` on 127.0.0.1 with a free
port and storage in a temporary directory, push the gzip corpus with
``skopeo copy`` and stop the registry at the end. A row whose pulldocker
command fails is printed as "n/a (reason)" and the run goes on.

Exit status: 0 when every output tree matched, 1 when one did not or a
flatten row failed, 2 when the corpus generator is missing. The ratios are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "bench"
MAKE_CORPUS = SHARED_BENCH / "make_corpus.py"
COMPARE_ROOTFS = SHARED_BENCH / "compare_rootfs.py"
SMALL_IMAGE = REPO / "fixtures" / "demo-busybox.tar"
PULLDOCKER = (sys.executable, "-m", "pulldocker")
ROW_GROUPS = ("flatten", "small", "registry", "scaling")

Command = Sequence[str]


@dataclass(frozen=True)
class Corpus:
    """One benchmark image: its archive, expected tree and generator options."""

    name: str
    options: tuple[str, ...]
    bench_dir: Path

    @property
    def archive(self) -> Path:
        return self.bench_dir / f"corpus-{self.name}.tar"

    @property
    def expected(self) -> Path:
        return self.bench_dir / f"corpus-{self.name}.expected.tsv.gz"

    @property
    def meta(self) -> Path:
        return self.bench_dir / f"corpus-{self.name}.meta.json"

    def layer_bytes(self) -> int:
        """Return the total uncompressed layer size that the generator recorded."""
        return int(json.loads(self.meta.read_text())["uncompressed_layer_bytes"])


@dataclass
class Timing:
    """Wall times in seconds and peak resident sizes in KiB of repeated runs."""

    seconds: list[float] = field(default_factory=list)
    max_rss_kib: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak_mib(self) -> float:
        return max(self.max_rss_kib) / 1024


@dataclass
class Row:
    """One line of the result table."""

    name: str
    target: str
    subject: Timing | None = None
    baseline: Timing | None = None
    baseline_name: str = ""
    check: str = ""
    note: str = ""

    def cells(self) -> list[str]:
        if self.subject is None or self.baseline is None:
            return [self.name, "", self.baseline_name, "", "", self.target, "", "",
                    self.note]  # fmt: skip
        ratio = self.subject.median / self.baseline.median
        return [
            self.name,
            f"{self.subject.median:.3f}",
            self.baseline_name,
            f"{self.baseline.median:.3f}",
            f"{ratio:.2f} x",
            self.target,
            f"{self.subject.peak_mib:.0f} MiB",
            self.check,
            self.note,
        ]


class CommandFailed(Exception):
    """A benchmarked command exited with an error."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if not MAKE_CORPUS.is_file() or not COMPARE_ROOTFS.is_file():
        print(
            f"error: the corpus tools are missing: expected {MAKE_CORPUS} and "
            f"{COMPARE_ROOTFS} beside the checkout",
            file=sys.stderr,
        )
        return 2
    groups = set(args.rows.split(","))
    unknown = groups - set(ROW_GROUPS)
    if unknown:
        print(f"error: unknown --rows {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    bench_dir = Path(args.bench_dir)
    runs = args.runs or (3 if args.quick else 5)
    plain, gzipped = _main_corpora(bench_dir, args.quick)
    scaling = [] if args.quick else _scaling_corpora(bench_dir)
    for corpus in (plain, gzipped, *scaling):
        ensure_corpus(corpus)

    print(machine_summary())
    print(f"runs per side: {runs}; corpus: {plain.archive} and {gzipped.archive}\n")
    with tempfile.TemporaryDirectory(prefix="pulldocker-bench-", dir=bench_dir) as t:
        work = Path(t)
        rows: list[Row] = []
        if "flatten" in groups:
            rows += [
                flatten_row(plain, plain, work, runs, "flatten, uncompressed", "1.25"),
                flatten_row(gzipped, plain, work, runs, "flatten, gzip layers", "4.5"),
            ]
        if "small" in groups:
            rows.append(small_image_row(work, max(runs, 10)))
        if "registry" in groups:
            rows += registry_rows(gzipped, plain, work, runs)
        if scaling and "scaling" in groups:
            rows.append(scaling_row([*scaling, plain], work, max(2, runs - 2)))
    print(format_table(rows))
    if "flatten" in groups and rows[0].baseline is not None:
        print()
        print(floors(plain, gzipped, rows[0].baseline.median))
    if args.json:
        Path(args.json).write_text(json.dumps([_row_json(r) for r in rows], indent=2))
    failed = [r.name for r in rows if r.check.startswith("MISMATCH")]
    failed += [r.name for r in rows if r.name.startswith("flatten") and not r.subject]
    if failed:
        print(f"\nfailed rows: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick", action="store_true", help="use the ~100 MB corpus and 3 runs"
    )
    parser.add_argument("--runs", type=int, help="timed runs per side (default 5)")
    parser.add_argument(
        "--bench-dir",
        default="/tmp/bench",
        help="directory for the corpora and scratch files (default /tmp/bench)",
    )
    parser.add_argument(
        "--rows",
        default=",".join(ROW_GROUPS),
        help="comma-separated row groups to run (default: all of "
        + ", ".join(ROW_GROUPS)
        + ")",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return parser.parse_args(argv)


# -- corpora -----------------------------------------------------------------


def _main_corpora(bench_dir: Path, quick: bool) -> tuple[Corpus, Corpus]:
    preset = ("--quick",) if quick else ()
    name = "quick" if quick else "full"
    plain = Corpus(name, preset, bench_dir)
    gzipped = Corpus(f"{name}-gz", (*preset, "--compression", "gzip"), bench_dir)
    return plain, gzipped


def _scaling_corpora(bench_dir: Path) -> list[Corpus]:
    return [
        Corpus(size, ("--target-size", size), bench_dir) for size in ("280M", "550M")
    ]


def ensure_corpus(corpus: Corpus) -> None:
    """Build the corpus with make_corpus.py unless its files already exist."""
    if corpus.archive.is_file() and corpus.expected.is_file() and corpus.meta.is_file():
        return
    corpus.bench_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(MAKE_CORPUS), *corpus.options]
    command += ["--out", str(corpus.archive)]
    print(f"building {corpus.archive} ...", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 and "--apt-update" not in command:
        # A fresh machine has no apt package lists yet.
        result = subprocess.run(
            [*command, "--apt-update"], capture_output=True, text=True
        )
    if result.returncode != 0:
        raise SystemExit(
            f"error: {' '.join(command)} failed with exit {result.returncode}:\n"
            + result.stderr[-3000:]
        )


# -- running commands ----------------------------------------------------------


def run_once(command: Command, *, cwd: Path = REPO) -> tuple[float, int]:
    """Run ``command``; return its wall time in seconds and peak RSS in KiB.

    Raises:
        CommandFailed: the command exited with a non-zero status.
    """
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=errors,
        )  # fmt: skip
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
            last = lines[-1] if lines else "no message"
            raise CommandFailed(f"exit {process.returncode}: {last}")
    return elapsed, usage.ru_maxrss


def compare(
    subject: Callable[[], Command],
    baseline: Callable[[], Command],
    runs: int,
    *,
    prepare: Callable[[], None] = lambda: None,
) -> tuple[Timing, Timing]:
    """Time ``subject`` and ``baseline`` in turn, after one untimed run each.

    The callables build a fresh command line per run, so each run may use a
    new output or cache path. ``prepare`` runs, untimed, before every run and
    removes what the previous run left. Dirty pages are flushed after it, so
    no run pays for another's writeback.
    """
    subject_timing, baseline_timing = Timing(), Timing()
    # The subject runs last in each round, so its output is left for a check.
    sides = ((baseline, baseline_timing), (subject, subject_timing))
    for round_number in range(runs + 1):
        for make_command, timing in sides:
            prepare()
            os.sync()
            elapsed, rss = run_once(make_command())
            if round_number > 0:
                timing.seconds.append(elapsed)
                timing.max_rss_kib.append(rss)
    return subject_timing, baseline_timing


def check_tree(output: Path, corpus: Corpus) -> str:
    """Compare a rootfs tar with the corpus's expected tree; return a verdict."""
    result = subprocess.run(
        [sys.executable, str(COMPARE_ROOTFS), str(output), str(corpus.expected)],
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        return "ok"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return "MISMATCH: " + (lines[-1] if lines else f"exit {result.returncode}")


def _fixed(command: Command) -> Callable[[], Command]:
    return lambda: command


def _remover(*paths: Path) -> Callable[[], None]:
    def remove() -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    return remove


def _warm(*paths: Path) -> None:
    """Read files once so that the timed runs find them in the page cache."""
    for path in paths:
        with path.open("rb") as file:
            while file.read(8 * 1024 * 1024):
                pass


# -- rows ----------------------------------------------------------------------


def flatten_row(
    corpus: Corpus, copied: Corpus, work: Path, runs: int, name: str, target: str
) -> Row:
    """Flatten ``corpus`` to a file, beside ``cp`` of ``copied``'s archive."""
    row = Row(
        name, f"<= {target} x, <= 64 MiB", baseline_name=f"cp {copied.archive.name}"
    )
    output, copy = work / "rootfs.tar", work / "copy.tar"
    _warm(corpus.archive, copied.archive)
    try:
        row.subject, row.baseline = compare(
            lambda: [*PULLDOCKER, str(corpus.archive), "-o", str(output), "-q"],
            lambda: ["cp", str(copied.archive), str(copy)],
            runs,
            prepare=_remover(output, copy),
        )
    except CommandFailed as exc:
        row.note = f"n/a ({exc})"
        return row
    row.check = check_tree(output, corpus)
    row.note = f"{corpus.layer_bytes() / 1e9:.2f} GB of layers"
    return row


def small_image_row(work: Path, runs: int) -> Row:
    """Convert the 2 MB demo image end to end, beside an empty interpreter run."""
    row = Row(
        f"convert small image ({SMALL_IMAGE.stat().st_size / 1e6:.1f} MB)",
        "<= 4 x",
        baseline_name="python3 -c pass",
    )
    output = work / "small.tar"
    try:
        row.subject, row.baseline = compare(
            lambda: [*PULLDOCKER, str(SMALL_IMAGE), "-o", str(output), "-q"],
            lambda: [sys.executable, "-c", "pass"],
            runs,
            prepare=_remover(output),
        )
    except CommandFailed as exc:
        row.note = f"n/a ({exc})"
    return row


def scaling_row(corpora: list[Corpus], work: Path, runs: int) -> Row:
    """Flatten corpora of growing size; report seconds per GB of layers."""
    row = Row("scaling: seconds per GB", "spread <= 10 %")
    output = work / "rootfs.tar"
    per_gb: list[str] = []
    rates: list[float] = []
    peaks: list[str] = []
    for corpus in corpora:
        _warm(corpus.archive)
        timing = Timing()
        try:
            for round_number in range(runs + 1):
                _remover(output)()
                os.sync()
                command = [*PULLDOCKER, str(corpus.archive), "-o", str(output), "-q"]
                elapsed, rss = run_once(command)
                if round_number > 0:
                    timing.seconds.append(elapsed)
                    timing.max_rss_kib.append(rss)
        except CommandFailed as exc:
            row.note = f"n/a ({corpus.name}: {exc})"
            return row
        verdict = check_tree(output, corpus)
        if verdict != "ok":
            row.check = f"{verdict} ({corpus.name})"
        gigabytes = corpus.layer_bytes() / 1e9
        rates.append(timing.median / gigabytes)
        per_gb.append(f"{gigabytes:.2f} GB: {rates[-1]:.2f}")
        peaks.append(f"{timing.peak_mib:.0f}")
    spread = (max(rates) - min(rates)) / min(rates) * 100
    row.check = row.check or "ok"
    row.note = (
        "; ".join(per_gb) + f" s/GB; spread {spread:.0f} %; peak RSS "
        + "/".join(peaks) + " MiB"
    )  # fmt: skip
    return row


def registry_rows(gzipped: Corpus, plain: Corpus, work: Path, runs: int) -> list[Row]:
    """Time pulls from a loopback registry beside ``skopeo copy`` and ``cp``."""
    names = (
        "pull, empty cache",
        "REF -o rootfs.tar, empty cache",
        "REF -o rootfs.tar, warm cache",
    )
    targets = ("<= 0.7 x", "<= 0.6 x", "<= 1.3 x")
    rows = [Row(n, t) for n, t in zip(names, targets, strict=True)]
    missing = [tool for tool in ("docker-registry", "skopeo") if not shutil.which(tool)]
    if missing:
        for row in rows:
            row.note = f"n/a ({', '.join(missing)} not installed)"
        return rows
    try:
        with loopback_registry(work / "registry") as host:
            reference = f"{host}/bench/{gzipped.name}:1"
            push(gzipped.archive, reference)
            _pull_rows(rows, reference, gzipped, plain, work, runs)
    except (CommandFailed, RuntimeError, subprocess.CalledProcessError) as exc:
        for row in rows:
            if row.subject is None and not row.note:
                row.note = f"n/a ({exc})"
    return rows


def _pull_rows(
    rows: list[Row],
    reference: str,
    corpus: Corpus,
    plain: Corpus,
    work: Path,
    runs: int,
) -> None:
    pull_row, convert_row, warm_row = rows
    output, skopeo_output = work / "rootfs.tar", work / "skopeo.tar"
    cache = work / "cache"
    skopeo = ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{reference}",
              f"docker-archive:{skopeo_output}"]  # fmt: skip
    registry_options = ["--cache-dir", str(cache), "--insecure", "-q"]
    cleanup = _remover(output, skopeo_output, cache)
    for row, subject in (
        (pull_row, [*PULLDOCKER, "pull", reference, *registry_options]),
        (convert_row, [*PULLDOCKER, reference, "-o", str(output), *registry_options]),
    ):
        row.baseline_name = "skopeo copy to docker-archive"
        try:
            row.subject, row.baseline = compare(
                _fixed(subject),
                _fixed(skopeo),
                runs,
                prepare=cleanup,
            )
        except CommandFailed as exc:
            row.note = f"n/a ({exc})"
    if convert_row.subject is not None:
        convert_row.check = check_tree(output, corpus)

    warm_row.baseline_name = f"cp {plain.archive.name}"
    warm_command = [*PULLDOCKER, reference, "-o", str(output), *registry_options]
    copy = work / "copy.tar"
    cleanup()
    try:
        run_once(warm_command)
        _warm(plain.archive)
        warm_row.subject, warm_row.baseline = compare(
            _fixed(warm_command),
            _fixed(["cp", str(plain.archive), str(copy)]),
            runs,
            prepare=_remover(output, copy),
        )
    except CommandFailed as exc:
        warm_row.note = f"n/a ({exc})"
        return
    warm_row.check = check_tree(output, corpus)


# -- the loopback registry ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def loopback_registry(directory: Path) -> Iterator[str]:
    """Run docker-registry on 127.0.0.1 with its own storage; yield host:port."""
    directory.mkdir(parents=True)
    port = _free_port()
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {directory / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: benchmark-only\n"
    )
    log_path = directory / "registry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            _wait_ready(f"http://127.0.0.1:{port}/v2/", process, log_path)
            yield f"127.0.0.1:{port}"
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()[-500:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not respond on {url} within 15 s")


def push(archive: Path, reference: str) -> None:
    """Push a docker-archive to the loopback registry with skopeo."""
    command = ["skopeo", "copy", "-q", "--dest-tls-verify=false",
               f"docker-archive:{archive}", f"docker://{reference}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo push failed: {result.stderr.strip()[-300:]}")


# -- lower bounds --------------------------------------------------------------------


def floors(plain: Corpus, gzipped: Corpus, cp_seconds: float) -> str:
    """Measure the work that no flattener checking diff_ids can skip.

    Checking a diff_id means hashing every uncompressed layer byte with
    SHA-256, and a gzip layer must also be inflated. Writing the output
    costs at least what ``cp`` of the archive costs. Hashing
    and inflating are timed here in CPU seconds over the corpus layers. Even
    with every core busy all the time, a flatten cannot take less than the
    sum of that work divided by the number of cores.
    """
    from pulldocker.archive import open_archive
    from pulldocker.layers import decompress_to_file, hash_region

    hash_cpu = inflate_cpu = 0.0
    with open_archive(str(plain.archive)) as archive:
        for layer in archive.select_image(None, None).layers:
            started = time.process_time()
            hash_region(layer.fd, layer.offset, layer.size, "sha256")
            hash_cpu += time.process_time() - started
    with open_archive(str(gzipped.archive)) as archive, open(os.devnull, "wb") as sink:
        for layer in archive.select_image(None, None).layers:
            started = time.process_time()
            decompress_to_file(
                layer.fd, layer.offset, layer.size, "gzip", sink.fileno(), label=""
            )
            inflate_cpu += time.process_time() - started
    cores = os.cpu_count() or 1
    plain_floor = (hash_cpu + cp_seconds) / cores
    gzip_floor = (hash_cpu + inflate_cpu + cp_seconds) / cores
    return "\n".join(
        [
            f"Lower bounds with diff_ids checked ({cores} cores, "
            f"cp {cp_seconds:.2f} s):",
            f"* SHA-256 of the {plain.layer_bytes() / 1e9:.2f} GB of layers takes "
            f"{hash_cpu:.2f} s of CPU; inflating the gzip layers {inflate_cpu:.2f} s",
            f"* flatten, uncompressed >= (hash + cp) / cores = {plain_floor:.2f} s "
            f"= {plain_floor / cp_seconds:.2f} x cp",
            f"* flatten, gzip layers >= (hash + inflate + cp) / cores = "
            f"{gzip_floor:.2f} s = {gzip_floor / cp_seconds:.2f} x cp",
        ]
    )


# -- reporting -------------------------------------------------------------------


def machine_summary() -> str:
    """Describe the machine: cores, memory, the file system of /tmp, Python."""
    with open("/proc/meminfo") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    filesystem = subprocess.run(
        ["df", "--output=fstype,source", "/tmp"], capture_output=True, text=True
    ).stdout.split()
    return (
        f"machine: {os.cpu_count()} cores, {total_kib / 1024**2:.1f} GiB RAM, "
        f"/tmp on {' '.join(filesystem[2:]) or 'unknown'}, "
        f"Python {platform.python_version()}, Linux {platform.release()}"
    )


HEADERS = [
    "row", "pulldocker (s)", "baseline", "baseline (s)", "ratio", "target",
    "peak RSS", "output", "notes",
]  # fmt: skip


def format_table(rows: list[Row]) -> str:
    """Render the rows as a Markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        lines.append("| " + " | ".join(row.cells()) + " |")
    return "\n".join(lines)


def _row_json(row: Row) -> dict[str, object]:
    def timing(value: Timing | None) -> dict[str, object] | None:
        if value is None:
            return None
        return {"seconds": value.seconds, "max_rss_kib": value.max_rss_kib}

    return {
        "row": row.name,
        "target": row.target,
        "baseline": row.baseline_name,
        "subject_timing": timing(row.subject),
        "baseline_timing": timing(row.baseline),
        "check": row.check,
        "note": row.note,
    }


if __name__ == "__main__":
    sys.exit(main())
