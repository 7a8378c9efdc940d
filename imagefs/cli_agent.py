"""``imagefs agent``: run the host agent that makes mounts fast (see imagefs.agent)."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "agent",
        help="run the host agent: later mounts fork from it instead of starting Python",
        description="Run in the foreground (for systemd or a supervisor) with the whole read path "
        "imported. 'imagefs mount' and 'imagefs run' hand mounts to it when its socket answers, "
        "which saves starting Python and importing trio and pyfuse3 on every mount; without it "
        "they spawn a daemon as usual. Each mount still runs in a process of its own and "
        "outlives the agent. SIGTERM or Ctrl-C stops it.",
    )
    p.add_argument("--socket", metavar="PATH", help="where to listen (default: /run/imagefs/agent.sock, or "
                   "$IMAGEFS_AGENT_SOCKET)")
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    import logging

    from imagefs.agent import serve_agent
    from imagefs.cli import CLIError
    from imagefs.mount import MountError

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    try:
        serve_agent(args.socket)
    except MountError as e:
        raise CLIError(str(e)) from e
    return 0
