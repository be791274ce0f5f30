"""The ``pulldocker`` command line: parse options, run, render errors.

Usage:
    pulldocker SOURCE -o OUTPUT        flatten a saved image or a reference
    pulldocker pull REFERENCE          fill the cache only
    pulldocker save REFERENCE -o TAR   write a docker-archive
    pulldocker inspect REFERENCE       show digest, platform, layers, config

SOURCE is a local image when it is ``-`` (stdin), starts with ``/``, ``./``,
``../`` or ``~``, names an existing path, or ends in an archive suffix such as
``.tar``. Anything else is an image reference to pull. Errors print one line
on stderr and exit with the code of their class (see ``errors.py``), or 130
on Ctrl-C. ``--debug`` adds tracebacks and debug logging.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import NotFoundError, PulldockerError, UsageError
from .progress import NullProgress, ProgressListener

if TYPE_CHECKING:
    from .platform import Platform
    from .pull import PullOptions

__all__ = ["is_local_source", "main"]

logger = logging.getLogger("pulldocker")

_COMMANDS = ("pull", "save", "inspect")
_ARCHIVE_SUFFIXES = (
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.zst",
    ".tar.zstd",
    ".tzst",
    ".tar.xz",
    ".txz",
    ".tar.bz2",
)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def is_local_source(source: str) -> bool:
    """Tell whether SOURCE names a local image rather than a reference."""
    if source == "-" or source.startswith(("/", "./", "../", "~")):
        return True
    if os.path.lexists(source):
        return True
    return source.lower().endswith(_ARCHIVE_SUFFIXES)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(args_list[0] if args_list else "")
    args = parser.parse_args(args_list)
    _configure_logging(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("pulldocker: interrupted", file=sys.stderr)
        return 130
    except PulldockerError as exc:
        if args.debug:
            logger.exception("failed")
        print(f"pulldocker: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 1
    except OSError as exc:
        if args.debug:
            logger.exception("failed")
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pulldocker: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    command = getattr(args, "command", None)
    if command == "pull":
        with _progress(args) as progress:
            cached = _pull_module().pull(args.reference, _pull_options(args), progress)
        logger.info("cached %s in %s", cached.image, cached.archive_dir)
        return 0
    if command == "save":
        with _progress(args) as progress:
            _pull_module().save(
                args.reference, args.output, _pull_options(args), progress
            )
        return 0
    if command == "inspect":
        result = _pull_module().inspect(args.reference, _pull_options(args))
        _print_inspect(result, args.json)
        return 0
    return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    platform = _parse_platform(args.platform)
    if args.tmpdir is not None and not os.path.isdir(args.tmpdir):
        raise UsageError(f"--tmpdir {args.tmpdir!r} is not a directory")
    source = os.path.expanduser(args.source)
    image = args.image
    with _progress(args) as progress:
        if is_local_source(args.source):
            if source != "-" and not os.path.lexists(source):
                raise NotFoundError(
                    f"{args.source}: no such file or directory (a local path was "
                    "assumed from its form; give an image reference to pull)"
                )
        else:
            if image is not None:
                raise UsageError(
                    "--image selects within an archive; not with a reference"
                )
            cached = _pull_module().pull(args.source, _pull_options(args), progress)
            source, image = str(cached.archive_dir), cached.image
        result = convert(
            source,
            args.output,
            image=image,
            platform=platform,
            compression=args.compression,
            progress=progress,
            tmpdir=args.tmpdir,
            max_layer_size=args.max_layer_size,
            layers_verified=not is_local_source(args.source),
        )
    logger.info(
        "wrote %s: %d entries from %d layers of %s",
        args.output,
        result.entries,
        result.layers,
        result.image,
    )
    return 0


def _pull_module() -> Any:
    from . import pull

    return pull


def _pull_options(args: argparse.Namespace) -> PullOptions:
    from .platform import host_platform

    pull = _pull_module()
    username = password = None
    if args.creds:
        username, _, password = args.creds.partition(":")
        if not password and not args.password_stdin:
            password = None
    if args.password_stdin:
        if not args.creds:
            raise UsageError("--password-stdin needs --creds USER")
        password = sys.stdin.readline().rstrip("\r\n")
    cache_dir = Path(args.cache_dir) if args.cache_dir else pull.default_cache_dir()
    options: PullOptions = pull.PullOptions(
        platform=_parse_platform(args.platform) or host_platform(),
        cache_dir=cache_dir,
        username=username,
        password=password,
        authfile=Path(args.authfile) if args.authfile else None,
        cert_dir=Path(args.cert_dir) if args.cert_dir else None,
        insecure=args.insecure,
        jobs=args.jobs,
        max_layer_size=args.max_layer_size,
    )
    return options


def _parse_platform(text: str | None) -> Platform | None:
    if text is None:
        return None
    from .platform import Platform

    return Platform.parse(text)


def _print_inspect(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return
    for key in ("reference", "digest", "mediaType", "platform"):
        if key in result:
            print(f"{key}: {result[key]}")
    layers = result.get("layers") or []
    print(f"layers: {len(layers)}")
    for layer in layers:
        print(f"  {layer.get('digest')}  {layer.get('size')} bytes")
    config = result.get("config") or {}
    for key, value in config.items():
        print(f"{key}: {json.dumps(value)}")


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Iterator[ProgressListener]:
    if args.quiet or not sys.stderr.isatty():
        yield NullProgress()
        return
    from .console import RichProgress

    with RichProgress() as progress:
        yield progress


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if args.quiet:
        level = logging.ERROR
    elif args.debug:
        level = logging.DEBUG
    elif args.verbose:
        level = logging.INFO
    logging.basicConfig(level=level, format="pulldocker: %(levelname)s: %(message)s")
    # urllib3 logs whole request lines at DEBUG, query strings included, and
    # pre-signed blob URLs carry credentials there; pulldocker's own request
    # log redacts them.
    logging.getLogger("urllib3").setLevel(max(level, logging.INFO))


def _parse_size(text: str) -> int:
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        return int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}; use a number with an optional K, M, G or T"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}; use 1 or more")
    return value


def _build_parser(first: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pulldocker",
        description="Turn a container image into one flattened rootfs tar.",
        epilog="SOURCE is a local path when it is -, starts with /, ./, ../ or ~, "
        "exists, or ends in .tar (or a compressed tar suffix); otherwise it is "
        "an image reference to pull. Exit codes: 0 ok, 1 other error, 2 usage, "
        "3 invalid input, 4 not found, 5 authentication, 6 registry or network, "
        "7 digest mismatch, 8 limit exceeded, 130 interrupted. Other commands: "
        "pulldocker pull|save|inspect REFERENCE (see their --help).",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    if first in _COMMANDS:
        commands = parser.add_subparsers(dest="command", required=True)
        pull = commands.add_parser("pull", help="download an image into the cache")
        pull.add_argument("reference", help="image reference, e.g. busybox:latest")
        save = commands.add_parser("save", help="write an image as a docker-archive")
        save.add_argument("reference", help="image reference, e.g. busybox:latest")
        save.add_argument("-o", "--output", required=True, help="archive path, or -")
        inspect = commands.add_parser("inspect", help="show an image's details")
        inspect.add_argument("reference", help="image reference, e.g. busybox:latest")
        inspect.add_argument("--json", action="store_true", help="print JSON")
        for sub in (pull, save, inspect):
            _add_common(sub)
            _add_registry(sub)
        return parser
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="image reference, archive path, OCI layout directory, or - for stdin",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="rootfs tar path (.tar, .tar.gz, .tar.zst, .tar.xz), or - for stdout",
    )
    parser.add_argument(
        "--image",
        metavar="NAME|INDEX",
        help="tag, ref name or 0-based index of the image in a multi-image archive",
    )
    parser.add_argument(
        "--compression",
        choices=("none", "gzip", "zstd", "xz"),
        help="output compression (default: from the output suffix)",
    )
    parser.add_argument("--tmpdir", metavar="DIR", help="directory for temporary files")
    _add_common(parser)
    _add_registry(parser)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="platform to choose from an index (default: linux/<host arch>)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress")
    parser.add_argument(
        "--max-layer-size",
        type=_parse_size,
        default="256G",
        metavar="SIZE",
        help="largest size that one compressed layer, or an archive compressed "
        "whole, may expand to; K, M, G or T suffix (default 256G)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    parser.add_argument(
        "--debug", action="store_true", help="debug logging and tracebacks"
    )


def _add_registry(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registry")
    group.add_argument("--creds", metavar="USER[:PASS]", help="registry credentials")
    group.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    group.add_argument(
        "--authfile", metavar="FILE", help="auth file (docker config.json format)"
    )
    group.add_argument(
        "--cert-dir", metavar="DIR", help="directory with *.crt CAs and client certs"
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain HTTP or unverified TLS for this registry",
    )
    group.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="image cache (default: $XDG_CACHE_HOME/pulldocker)",
    )
    group.add_argument(
        "--jobs",
        type=_positive_int,
        default=4,
        metavar="N",
        help="parallel downloads (default 4)",
    )
