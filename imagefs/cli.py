"""The ``imagefs`` command: one parser, one module per group of subcommands.

Each ``cli_*`` module exposes ``register(subparsers)`` that adds its subcommands and
sets ``func`` to a handler returning an exit code. Errors the user can act on are
raised as :class:`CLIError` (or a domain error listed in ``USER_ERRORS``) and printed as
one line, ``imagefs: <message>``, with a non-zero exit: no traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

# typing costs ~3 ms to import and is needed only by type checkers here (mypy reads this as typing.TYPE_CHECKING)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1  # the operation failed (bad input, unreachable store, ...)
EXIT_USAGE = 2  # argparse's convention for bad arguments
EXIT_INTERRUPTED = 130
# logging's levels, named here so that a command line need not import logging (~10 ms)
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

# Which module registers each subcommand. A command line that names one imports only
# that module: ``imagefs mount`` is on the path to a ready mount, and importing every
# command's dependencies would cost it more than the mount itself (see build_parser).
COMMANDS = {
    "index": "imagefs.cli_index", "images": "imagefs.cli_index", "inspect": "imagefs.cli_index",
    "mount": "imagefs.cli_mount", "umount": "imagefs.cli_mount", "unmount": "imagefs.cli_mount",
    "stats": "imagefs.cli_mount", "agent": "imagefs.cli_agent", "run": "imagefs.cli_run",
    "cache-server": "imagefs.cli_cache_server", "profile": "imagefs.cli_profile", "optimize": "imagefs.cli_profile",
    "rm": "imagefs.cli_images", "rmi": "imagefs.cli_images", "tag": "imagefs.cli_images",
    "gc": "imagefs.cli_images", "prune": "imagefs.cli_images",
    "snapshotter": "imagefs.cli_snapshotter", "pull": "imagefs.cli_snapshotter",
}


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


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, minus its ``import shutil`` (and with it bz2, lzma and
    more: several ms on every command line, since argparse makes a formatter for each
    argument it adds) just to learn the terminal width."""

    def __init__(self, prog: str, *args: Any, **kwargs: Any) -> None:
        if len(args) < 3 and "width" not in kwargs:
            kwargs["width"] = _terminal_columns() - 2
        super().__init__(prog, *args, **kwargs)


def _terminal_columns() -> int:
    """What ``shutil.get_terminal_size`` would say: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommand parsers share :class:`_HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand a command line names: its first word that is not an option (the
    top-level options take no value)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``imagefs`` parser. Given the command line, it registers only the module of
    the subcommand it names; without one (``imagefs --help``, a typo) it registers all,
    so the listing and argparse's "invalid choice" message name every command."""
    word = _command_word(sys.argv[1:] if argv is None else argv)
    modules = [COMMANDS[word]] if word in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    parser = _Parser(
        prog="imagefs",
        description="Start containers from OCI images without pulling them: index an image into "
        "content-addressed chunks, then mount or run it lazily.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only results and errors (no progress)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).register(sub)
    # Accept -v/-q after the subcommand too (``imagefs index --quiet``), as users type them.
    # An alias (umount/unmount) maps to the same parser: visit each parser once.
    # A command that gives -v/-q a meaning of its own (run's -v is docker's --volume) keeps it.
    for subparser in {id(p): p for p in sub.choices.values()}.values():
        taken = subparser._option_string_actions
        subparser.add_argument(*[o for o in ("-v", "--verbose") if o not in taken], action="count",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        subparser.add_argument(*[o for o in ("-q", "--quiet") if o not in taken], action="store_true",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Domain errors that are the user's to fix: printed as one line, no traceback."""
    from cache.blobstore import BlobStoreError
    from cache.stores import StoreURLError
    from indexer.build import BuildError
    from indexer.catalog import AmbiguousImage, ImageNotFound, InvalidImageName
    from indexer.format import IndexFormatError
    from indexer.layers import LayerError
    from indexer.sources import SourceError

    return (CLIError, BlobStoreError, StoreURLError, SourceError, LayerError, IndexFormatError, ImageNotFound,
            InvalidImageName, AmbiguousImage, BuildError)


def configure_logging(level: int) -> None:
    """Log records at ``level`` and above to stderr, as ``imagefs: LEVEL name: message``."""
    import logging

    logging.basicConfig(level=level, format="imagefs: %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.log_level = max(DEBUG, ERROR if args.quiet else WARNING - 10 * args.verbose)
    # A command on a latency path (``imagefs mount``) sets ``defer_logging`` and calls
    # configure_logging itself where it logs; every other command gets it here.
    if not getattr(args, "defer_logging", False):
        configure_logging(args.log_level)
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
