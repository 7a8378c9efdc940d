"""``imagefs run [options] IMAGE [--] [CMD...]``: start a container on a lazy mount of IMAGE.

The options are ``docker run``'s, with Docker's meanings and exit statuses: 125 when
imagefs itself fails (a bad flag, an unknown image, a mount that cannot be made), 126
when the command cannot be executed, 127 when it is not found, and otherwise the
container's own status. Docker flags that imagefs does not implement are refused by
name, never silently taken as something else.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn, Sequence

from imagefs.cli import CLIError

EXIT_RUN_ERROR = 125

# Docker flags that imagefs run does not implement, and why (refused with this message).
UNSUPPORTED = {
    ("-d", "--detach"): "imagefs run keeps the container in the foreground and removes it when it exits; "
                        "start it with '&', nohup or systemd-run instead",
    ("-m", "--memory"): "imagefs run sets no resource limits",
    ("--memory-swap",): "imagefs run sets no resource limits",
    ("--cpus",): "imagefs run sets no resource limits",
    ("-c", "--cpu-shares"): "imagefs run sets no resource limits",
    ("--gpus",): "imagefs run gives containers no GPUs",
    ("--device",): "use --privileged for the host's devices",
    ("--restart",): "imagefs run does not restart containers",
    ("--platform",): "an imagefs image is of one platform, chosen at 'imagefs index'",
    ("--pull",): "imagefs run never pulls: the image is mounted from the store",
    ("--pid", "--ipc", "--uts", "--userns", "--cgroupns"): "only the default namespaces are supported",
    ("--ulimit",): "the container inherits imagefs run's limits",
    ("--shm-size",): "/dev/shm is runc's default (64 MiB)",
    ("-a", "--attach"): "stdout and stderr are always attached (use -i for stdin)",
    ("--log-driver", "--log-opt"): "the container writes to imagefs run's stdout and stderr",
    ("--sig-proxy",): "signals are always forwarded to the container",
    ("--cidfile",): "the container's name is --name (or printed with --timings)",
    ("--volumes-from",): "imagefs has no named volumes",
}


class _Refuse(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is not supported: {self.help}")


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.print_usage(sys.stderr)
    print(f"imagefs run: {message} (see 'imagefs run --help')", file=sys.stderr)
    sys.exit(EXIT_RUN_ERROR)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from imagefs.cli_mount import add_mount_options

    p = sub.add_parser(
        "run",
        help="run a container from an indexed image, without pulling it",
        description="Mount IMAGE lazily (or reuse this host's mount of it), put a writable overlay on "
        "top, and run CMD (default: the image's Entrypoint and Cmd) with runc, passing stdout, stderr "
        "(and stdin with -i) and the exit status through. The options and the container's defaults "
        "are docker run's (capabilities, seccomp, /etc/hosts, ...), on the host's network unless "
        "--network none. Everything the run creates is removed when the container exits, whatever "
        "stops it. Exit status: the container's; 125 if imagefs fails, 126 if CMD cannot be "
        "executed, 127 if it is not found.",
        usage="imagefs run [options] IMAGE [--] [CMD ...]",
        add_help=False,  # -h is --hostname, as in docker run
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("image", metavar="IMAGE", help="image name or blake3:<hex> digest")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments (replace the image's Cmd)")
    p.add_argument("--name", help="container name (default: a random imagefs-<hex>)")
    p.add_argument("--rm", action="store_true", help="accepted for docker's sake: a container is always removed")
    g = p.add_argument_group("process")
    g.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="set an environment variable; KEY alone passes this one's (repeatable)")
    g.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="read KEY=VALUE lines (and KEY alone) from FILE, docker's format (repeatable)")
    g.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside the container")
    g.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run as (name or uid, as in the image)")
    g.add_argument("--entrypoint", metavar="CMD", help="replace the image's Entrypoint (a single program)")
    g.add_argument("-i", "--interactive", action="store_true", help="pass stdin to the container (else it reads nothing)")
    g.add_argument("-t", "--tty", action="store_true", help="give the container a terminal (stdin must be one)")
    g.add_argument("--init", action="store_true", help="run a small init (tini) as PID 1: reaps zombies, forwards signals")
    g.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="after SIGTERM or SIGHUP, how long the container has to exit before it is killed (default: 10)")
    g = p.add_argument_group("file system")
    g.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CONTAINER[:ro]",
                   help="bind-mount a host path (made if missing) into the container (repeatable)")
    g.add_argument("--mount", action="append", default=[], metavar="type=bind|tmpfs,...",
                   help="docker's --mount: type=bind,source=..,target=..[,readonly] or type=tmpfs,target=..")
    g.add_argument("--tmpfs", action="append", default=[], metavar="PATH[:OPTS]", help="mount a tmpfs at PATH")
    g.add_argument("--read-only", action="store_true", help="make the container's root file system read-only")
    g = p.add_argument_group("network")
    g.add_argument("--network", "--net", default="host", metavar="host|none",
                   help="host network (default; docker's --network host), or a private one with only loopback")
    g.add_argument("-h", "--hostname", metavar="NAME", help="hostname (default: the host's on the host network)")
    g.add_argument("--add-host", action="append", default=[], metavar="NAME:IP", help="add a line to /etc/hosts")
    g.add_argument("--dns", action="append", default=[], metavar="IP", help="nameserver for /etc/resolv.conf")
    g.add_argument("--dns-search", action="append", default=[], metavar="DOMAIN", help="search domain for /etc/resolv.conf")
    g.add_argument("-p", "--publish", action="append", default=[], metavar="PORTS",
                   help="accepted and ignored, as docker does on the host network: ports are the host's")
    g.add_argument("-P", "--publish-all", action="store_true", help=argparse.SUPPRESS)
    g = p.add_argument_group("security (docker's defaults unless changed)")
    g.add_argument("--privileged", action="store_true",
                   help="every capability, no seccomp filter, nothing masked in /proc, the host's devices")
    g.add_argument("--cap-add", action="append", default=[], metavar="CAP", help="add a capability (or ALL)")
    g.add_argument("--cap-drop", action="append", default=[], metavar="CAP", help="drop a capability (or ALL)")
    g.add_argument("--security-opt", action="append", default=[], metavar="OPT",
                   help="no-new-privileges, seccomp=unconfined|PROFILE.json, systempaths=unconfined")
    p.add_argument("--timings", action="store_true", help="print how long the mount and the start took (stderr)")
    g = p.add_argument_group("not supported (refused with the reason)")
    for flags, why in UNSUPPORTED.items():
        takes_value = flags[0] not in ("-d",)
        g.add_argument(*flags, action=_Refuse, nargs=1 if takes_value else 0, help=why)
    add_mount_options(p)
    p.set_defaults(func=cmd_run)
    _docker_exit_codes(p)


def _docker_exit_codes(p: argparse.ArgumentParser) -> None:
    """Usage errors exit 125 (docker's), and an unknown flag is an error here, not an
    argument argparse hands back to the top-level parser (which would take the flag's
    value for IMAGE first)."""
    p.error = lambda message: _usage_error(p, message)  # type: ignore[method-assign]
    parse_known = p.parse_known_args

    def strict(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = parse_known(args, namespace)  # type: ignore[arg-type]
        if extras:
            _usage_error(p, f"unknown flag {extras[0]}")
        return ns, extras

    p.parse_known_args = strict  # type: ignore[method-assign,assignment]


def read_env_file(path: str) -> list[str]:
    """docker's --env-file: KEY=VALUE or KEY lines, '#' comments and blank lines skipped,
    values taken as written (no quotes or escapes)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CLIError(f"--env-file {path}: {e.strerror}", EXIT_RUN_ERROR) from None
    except UnicodeDecodeError:
        raise CLIError(f"--env-file {path}: not UTF-8 text", EXIT_RUN_ERROR) from None
    out = []
    for n, line in enumerate(lines, 1):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        if not key or any(c.isspace() for c in key):
            raise CLIError(f"--env-file {path} line {n}: {key!r} is not a variable name", EXIT_RUN_ERROR)
        out.append(f"{key}={value}" if sep else key)
    return out


def spec_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~imagefs.run_spec.RunSpec` the flags ask for (errors as :class:`CLIError`)."""
    from imagefs.container_etc import check_hostname, parse_add_host
    from imagefs.run_mounts import parse_mount, parse_tmpfs, parse_volume
    from imagefs.run_spec import ConfigError, RunSpec

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.tty and not os.isatty(0):
        raise CLIError("-t: the input device is not a TTY (run from a terminal, or without -t)", EXIT_RUN_ERROR)
    if args.network not in ("host", "none"):
        raise CLIError(f"--network {args.network}: only host (the default) and none are supported; imagefs makes "
                       f"no bridge networks", EXIT_RUN_ERROR)
    if args.publish or args.publish_all:
        print("imagefs: WARNING: published ports are discarded: the container uses the host's network",
              file=sys.stderr)
    if args.stop_timeout < 0:
        raise CLIError("--stop-timeout must be >= 0", EXIT_RUN_ERROR)
    try:
        env = [e for path in args.env_file for e in read_env_file(path)] + list(args.env)
        mounts = [*map(parse_volume, args.volume), *map(parse_mount, args.mount), *map(parse_tmpfs, args.tmpfs)]
        return RunSpec(
            command=command,
            entrypoint=[args.entrypoint] if args.entrypoint is not None else None,
            env=env, workdir=args.workdir, user=args.user,
            hostname=check_hostname(args.hostname) if args.hostname else None,
            terminal=args.tty, interactive=args.interactive, network=args.network, mounts=mounts,
            init=args.init, privileged=args.privileged, cap_add=args.cap_add, cap_drop=args.cap_drop,
            security_opt=args.security_opt, read_only=args.read_only,
            add_hosts=[parse_add_host(h) for h in args.add_host], dns=args.dns, dns_search=args.dns_search,
            stop_timeout=args.stop_timeout,
        )
    except ConfigError as e:
        raise CLIError(str(e), EXIT_RUN_ERROR) from None


def cmd_run(args: argparse.Namespace) -> int:
    from imagefs.cli import user_errors
    from imagefs.cli_mount import mount_options_from_args
    from imagefs.mount import MountError
    from imagefs.run import CommandError, ConfigError, RunError, run_container

    spec = spec_from_args(args)
    try:
        status, t = run_container(args.image, spec, mount_options_from_args(args), name=args.name)
    except CommandError as e:
        print(f"imagefs: {e}", file=sys.stderr)
        return e.status
    except (RunError, ConfigError, MountError) as e:
        raise CLIError(str(e), EXIT_RUN_ERROR) from e
    except user_errors() as e:  # no such image, an unreachable store, ...
        raise CLIError(str(e), EXIT_RUN_ERROR) from e
    if args.timings:
        mount = "reused mount" if t.reused_mount else f"mount {t.mount_s * 1000:.0f} ms"
        print(
            f"imagefs: {mount}, container started at {t.start_s * 1000:.0f} ms, exited at {t.total_s * 1000:.0f} ms",
            file=sys.stderr,
        )
    return status
