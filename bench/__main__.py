"""``python -m bench <command> [args]``: one entry point for every bench command.

Commands are found, not registered: any module ``bench/<name>.py`` (name not starting
with ``_``) that defines a top-level ``main(argv) -> int`` is the command ``<name>``
(``-`` and ``_`` are interchangeable). Discovery reads the modules' source instead of
importing them, so ``--help`` stays fast and one command with a missing dependency
cannot break the others; only the command that runs is imported.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def discover(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """Command name -> first line of its module docstring, sorted by name."""
    found: dict[str, str] = {}
    for path in sorted(package_dir.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (OSError, SyntaxError) as e:
            found[path.stem] = f"(cannot be read: {e})"
            continue
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        doc = ast.get_docstring(tree) or ""
        found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def usage(commands: dict[str, str]) -> str:
    lines = ["usage: python -m bench <command> [args...]", "", "commands:"]
    width = max((len(c) for c in commands), default=0)
    lines += [f"  {name:<{width}}  {summary}" for name, summary in commands.items()]
    lines += ["", "`python -m bench <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = discover()
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(commands), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name = args[0].replace("-", "_")
    if name not in commands:
        print(f"python -m bench: unknown command {args[0]!r}\n\n{usage(commands)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__ or 'bench'}.{name}")
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
