"""``imagefs run IMAGE [--] [CMD...]``: start a container on a lazy mount of IMAGE."""

from __future__ import annotations

import argparse
import sys

from imagefs.cli import CLIError


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from imagefs.cli_mount import add_mount_options

    p = sub.add_parser(
        "run",
        help="run a container from an indexed image, without pulling it",
        description="Mount IMAGE lazily (or reuse this host's mount of it), put a writable overlay on "
        "top, and run CMD (default: the image's Entrypoint and Cmd) with runc, passing stdin, "
        "stdout, stderr and the exit status through. Everything the run creates is removed when "
        "the container exits.",
        usage="imagefs run [options] IMAGE [--] [CMD ...]",
    )
    p.add_argument("image", metavar="IMAGE", help="image name or blake3:<hex> digest")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments (replace the image's Cmd)")
    p.add_argument("--name", help="container name (default: a random imagefs-<hex>)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="set an environment variable (repeatable)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside the container")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run as (name or uid, as in the image)")
    p.add_argument("--entrypoint", metavar="CMD", help="replace the image's Entrypoint (a single program)")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal (default: when stdin is one)")
    p.add_argument("--network", choices=["host", "none"], default="host", help="host network, or a private one with only loopback (default: host)")
    p.add_argument("--timings", action="store_true", help="print how long the mount and the start took (stderr)")
    add_mount_options(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from imagefs.cli_mount import mount_options_from_args
    from imagefs.run import ConfigError, RunError, RunSpec, run_container

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    spec = RunSpec(
        command=command,
        entrypoint=[args.entrypoint] if args.entrypoint is not None else None,
        env=args.env,
        workdir=args.workdir,
        user=args.user,
        terminal=args.tty or sys.stdin.isatty(),
        network=args.network,
    )
    try:
        status, t = run_container(args.image, spec, mount_options_from_args(args), name=args.name)
    except (RunError, ConfigError) as e:
        raise CLIError(str(e)) from e
    if args.timings:
        mount = "reused mount" if t.reused_mount else f"mount {t.mount_s * 1000:.0f} ms"
        print(
            f"imagefs: {mount}, container started at {t.start_s * 1000:.0f} ms, exited at {t.total_s * 1000:.0f} ms",
            file=sys.stderr,
        )
    return status
