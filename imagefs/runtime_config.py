"""Turn an image config into an OCI runtime config for runc.

Starts from runc's own default spec (``runc spec``: namespaces, the default mounts of
/proc, /dev, /sys, capabilities, masked paths), so the container gets exactly what the
runtime considers standard, then applies the image: Entrypoint/Cmd, Env, WorkingDir and
User, with the user's overrides on top, as ``docker run`` does.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ConfigError(ValueError):
    """The image config and the options do not make a runnable container."""


@dataclass
class RunSpec:
    """What the user asked for on top of the image config."""

    command: list[str] = field(default_factory=list)  # replaces Cmd when non-empty
    entrypoint: list[str] | None = None  # replaces Entrypoint when given ([] clears it)
    env: list[str] = field(default_factory=list)  # K=V, override the image's
    workdir: str | None = None
    user: str | None = None
    hostname: str = "imagefs"
    terminal: bool = False
    network: str = "host"  # "host": share the host's network; "none": a private, empty one


def merge_env(image_env: list[str], overrides: list[str]) -> list[str]:
    """Image Env, then overrides by name; PATH defaulted if the image has none."""
    merged: dict[str, str] = {}
    for item in [*image_env, *overrides]:
        key, sep, value = item.partition("=")
        if not key:
            raise ConfigError(f"invalid environment variable {item!r} (expected KEY=VALUE)")
        if not sep:  # -e KEY passes the caller's value through, as docker does
            if key not in os.environ:
                continue
            value = os.environ[key]
        merged[key] = value
    merged.setdefault("PATH", DEFAULT_PATH)
    return [f"{k}={v}" for k, v in merged.items()]


def command_line(image_cfg: dict[str, Any], spec: RunSpec) -> list[str]:
    entrypoint = spec.entrypoint if spec.entrypoint is not None else list(image_cfg.get("Entrypoint") or [])
    if spec.command:
        cmd = spec.command
    elif spec.entrypoint is not None:
        cmd = []  # docker: --entrypoint resets the image's Cmd
    else:
        cmd = list(image_cfg.get("Cmd") or [])
    args = [*entrypoint, *cmd]
    if not args:
        raise ConfigError("no command: the image has no Entrypoint or Cmd; give one after IMAGE")
    return args


def _read_db(rootfs: str, name: str) -> list[list[str]]:
    try:
        with open(os.path.join(rootfs, "etc", name), encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def resolve_user(spec: str | None, rootfs: str) -> tuple[int, int, list[int]]:
    """(uid, gid, additional gids) for an image ``User`` string: ``uid``, ``uid:gid``,
    ``name``, ``name:group``, looked up in the image's own /etc/passwd and /etc/group."""
    if not spec:
        spec = "0"
    user, _, group = spec.partition(":")
    passwd = _read_db(rootfs, "passwd")
    groups = _read_db(rootfs, "group")
    uid: int | None = None
    gid: int | None = None
    name: str | None = None
    if user.isdigit():
        uid = int(user)
        for row in passwd:
            if len(row) > 3 and row[2] == user:
                name, gid = row[0], int(row[3]) if row[3].isdigit() else 0
                break
    else:
        for row in passwd:
            if len(row) > 3 and row[0] == user:
                name, uid, gid = user, int(row[2]), int(row[3])
                break
        if uid is None:
            raise ConfigError(f"user {user!r} not found in the image's /etc/passwd")
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            for row in groups:
                if len(row) > 2 and row[0] == group:
                    gid = int(row[2])
                    break
            else:
                raise ConfigError(f"group {group!r} not found in the image's /etc/group")
    if gid is None:
        gid = 0
    extra: list[int] = []
    if name and not group:
        for row in groups:
            if len(row) > 3 and name in row[3].split(",") and row[2].isdigit() and int(row[2]) != gid:
                extra.append(int(row[2]))
    return uid, gid, extra


def runtime_config(base: dict[str, Any], image_cfg: dict[str, Any], spec: RunSpec, rootfs: str, rootfs_for_lookup: str) -> dict[str, Any]:
    """The config.json for one container.

    ``base`` is runc's default spec; ``rootfs`` is the path runc will use;
    ``rootfs_for_lookup`` is where the image's /etc can be read (the lower mount).
    """
    cfg = copy.deepcopy(base)
    uid, gid, extra = resolve_user(spec.user if spec.user is not None else image_cfg.get("User"), rootfs_for_lookup)
    proc = cfg["process"]
    proc["terminal"] = spec.terminal
    proc["args"] = command_line(image_cfg, spec)
    env = merge_env(list(image_cfg.get("Env") or []), spec.env)
    if spec.terminal and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    env.append(f"HOSTNAME={spec.hostname}")
    proc["env"] = env
    cwd = spec.workdir or image_cfg.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise ConfigError(f"working directory {cwd!r} must be absolute")
    proc["cwd"] = cwd
    proc["user"] = {"uid": uid, "gid": gid, **({"additionalGids": extra} if extra else {})}
    cfg["root"] = {"path": rootfs, "readonly": False}
    cfg["hostname"] = spec.hostname
    namespaces = cfg.setdefault("linux", {}).setdefault("namespaces", [])
    if spec.network == "host":
        cfg["linux"]["namespaces"] = [ns for ns in namespaces if ns.get("type") != "network"]
        # Share the host's resolver config, as a host-network container expects.
        if os.path.exists("/etc/resolv.conf"):
            cfg["mounts"].append({
                "destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf",
                "options": ["rbind", "ro"],
            })
    elif spec.network != "none":
        raise ConfigError(f"--network {spec.network!r}: use host or none")
    return cfg
