"""The ``imagefs`` command: one parser, one module per group of subcommands.

Each ``cli_*`` module exposes ``register(subparsers)`` that adds its subcommands and
sets ``func`` to a handler returning an exit code. Errors the user can act on are
raised as :class:`CLIError` (or a domain error listed in ``USER_ERRORS``) and printed as
one line, ``imagefs: <message>``, with a non-zero exit: no traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from typing import Sequence

EXIT_OK = 0
EXIT_ERROR = 1  # the operation failed (bad input, unreachable store, ...)
EXIT_USAGE = 2  # argparse's convention for bad arguments
EXIT_INTERRUPTED = 130

COMMAND_MODULES = [
    "imagefs.cli_index", "imagefs.cli_mount", "imagefs.cli_agent", "imagefs.cli_run", "imagefs.cli_cache_server",
]


class CLIError(Exception):
    """An error to print as one line and exit non-zero."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``10G``, ``512M``, ``1.5GiB`` or ``4096`` (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (use a number with an optional K, M, G, T or P suffix, e.g. 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def size_arg(text: str) -> int:
    """``parse_size`` as an argparse ``type``: a bad size is a usage error."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_store_options(p: argparse.ArgumentParser) -> None:
    """The options every command that touches a store shares."""
    p.add_argument(
        "--store",
        metavar="URL",
        help="where chunks and indexes live: a directory, file://DIR or s3://BUCKET[/PREFIX] "
        "(default: $IMAGEFS_STORE, else /var/lib/imagefs/store for root)",
    )
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3 endpoint for s3:// stores (default: $IMAGEFS_S3_ENDPOINT or the AWS config)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagefs",
        description="Start containers from OCI images without pulling them: index an image into "
        "content-addressed chunks, then mount or run it lazily.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only results and errors (no progress)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    # Accept -v/-q after the subcommand too (``imagefs index --quiet``), as users type them.
    # An alias (umount/unmount) maps to the same parser: visit each parser once.
    for subparser in {id(p): p for p in sub.choices.values()}.values():
        subparser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        subparser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Domain errors that are the user's to fix: printed as one line, no traceback."""
    from cache.blobstore import BlobStoreError
    from cache.stores import StoreURLError
    from indexer.catalog import ImageNotFound, InvalidImageName
    from indexer.format import IndexFormatError
    from indexer.layers import LayerError
    from indexer.sources import SourceError

    return (CLIError, BlobStoreError, StoreURLError, SourceError, LayerError, IndexFormatError, ImageNotFound,
            InvalidImageName)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose if not args.quiet else logging.ERROR
    logging.basicConfig(level=max(level, logging.DEBUG), format="imagefs: %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("imagefs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors() as e:
        print(f"imagefs: {e}", file=sys.stderr)
        return getattr(e, "code", EXIT_ERROR)


if __name__ == "__main__":
    # Run through the imported module, not this __main__ copy, so that the exception
    # classes command modules raise (imagefs.cli.CLIError) are the ones caught here.
    from imagefs.cli import main as _main

    sys.exit(_main())
