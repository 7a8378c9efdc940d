"""What ``imagefs run`` was asked for, on top of the image's config (``docker run``'s flags).

One plain record, filled by the CLI (:mod:`imagefs.cli_run`) and read by the modules
that each turn part of it into the container's runtime config:
:mod:`imagefs.runtime_config` (process, user, environment), :mod:`imagefs.container_security`
(capabilities, seccomp, masked paths), :mod:`imagefs.container_etc` (hosts, resolv.conf,
hostname) and :mod:`imagefs.run_mounts` (volumes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagefs.run_mounts import Mount


class ConfigError(ValueError):
    """The image config and the options do not make a runnable container."""


@dataclass
class RunSpec:
    command: list[str] = field(default_factory=list)  # replaces Cmd when non-empty
    entrypoint: list[str] | None = None  # replaces Entrypoint when given ([] clears it)
    env: list[str] = field(default_factory=list)  # K=V, override the image's
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None  # None: Docker's default for the network (container_etc)
    terminal: bool = False  # -t: a pseudo-terminal for the container
    interactive: bool = False  # -i: our stdin is the container's (else it reads /dev/null)
    network: str = "host"  # "host": share the host's network; "none": a private, empty one
    mounts: list[Mount] = field(default_factory=list)  # -v, --mount, --tmpfs
    init: bool = False  # --init: a small init (tini) as PID 1 that reaps and forwards signals
    privileged: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)
    read_only: bool = False  # the container's root file system is read-only
    add_hosts: list[tuple[str, str]] = field(default_factory=list)  # (name, ip) lines for /etc/hosts
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    stop_timeout: float = 10.0  # grace after SIGTERM/SIGHUP before the container is killed
