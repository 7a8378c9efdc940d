"""The ``imagefs`` command line itself: which modules a command line loads, and help layout.

``imagefs mount`` with a host agent is mostly the start of the ``imagefs`` process, so
the parser registers only the named subcommand's module and the mount path leaves
logging, dataclasses and the daemon side unimported. These tests keep it that way,
and keep the command table in step with what the modules register.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from imagefs.cli import COMMANDS, build_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_the_full_parser_has_exactly_the_command_table() -> None:
    assert _commands(build_parser([])) == set(COMMANDS)
    assert _commands(build_parser(["--help"])) == set(COMMANDS)
    assert _commands(build_parser(["no-such-command"])) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_named_command_registers_its_own_module_only(name: str) -> None:
    registered = _commands(build_parser(["-q", name]))
    assert name in registered
    siblings = {n for n, module in COMMANDS.items() if module == COMMANDS[name]}
    assert registered == siblings


def _modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, check=True, env=env)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_mount_command_line_leaves_the_heavy_modules_unimported() -> None:
    loaded = _modules_after(
        "from imagefs.cli import build_parser\n"
        "argv = ['mount', 'img', '/mp', '--store', '/s']\n"
        "build_parser(argv).parse_args(argv)\n"
        "import imagefs.mount\n")
    heavy = {"logging", "dataclasses", "shutil", "hashlib", "subprocess", "typing",
             "imagefs.daemon", "imagefs.cli_index", "imagefs.cli_run", "pyfuse3", "trio", "boto3"}
    assert loaded & heavy == set()
    assert {"imagefs.cli_mount", "imagefs.mount"} <= loaded


def test_help_wraps_at_COLUMNS() -> None:
    env = dict(os.environ, COLUMNS="50")
    out = subprocess.run([sys.executable, "-m", "imagefs.cli", "mount", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "usage: imagefs mount" in out
    assert max(len(line) for line in out.splitlines()) <= 50


def test_verbose_mount_configures_logging_and_quiet_mount_does_not() -> None:
    # cmd_mount with a stand-in for start_mount that reports the root logger's state.
    probe = ("import logging, sys\n"
             "import imagefs.mount as m\n"
             "def fake(image, mp, opts, log_level):\n"
             "    print(len(logging.getLogger().handlers), log_level)\n"
             "    return 1\n"
             "m.start_mount = fake\n"
             "from imagefs.cli import main\n"
             "main(sys.argv[1:])\n")
    quiet = subprocess.run([sys.executable, "-c", probe, "-q", "mount", "img", "/mp"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    verbose = subprocess.run([sys.executable, "-c", probe, "-vv", "mount", "img", "/mp"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    assert quiet == ["0", "20"]  # nothing configured in the caller; the daemon still logs at INFO
    assert verbose == ["1", "10"]  # -vv: the caller logs, and the daemon logs at DEBUG
