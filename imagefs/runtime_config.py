"""Turn an image config into an OCI runtime config for runc.

Starts from runc's own default spec (``runc spec``: namespaces, the default mounts of
/proc, /dev, /sys), then applies the image: Entrypoint/Cmd, Env, WorkingDir and User,
with the user's overrides on top, as ``docker run`` does. What the container may do
(capabilities, seccomp, masked paths) is :mod:`imagefs.container_security`'s.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from imagefs.image_files import ImageFileError, read_image_file
from imagefs.run_spec import ConfigError, RunSpec

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel


@dataclass
class _Entry:
    """One line of an image's /etc/passwd or /etc/group, split at ':'."""

    file: str
    line: int
    fields: list[str]

    def id(self, i: int, what: str) -> int:
        """Field ``i`` as a uid or gid; a clear error naming the file and line if it is not one."""
        value = self.fields[i]
        if not value.isdigit() or int(value) > MAX_ID:  # isdigit: no sign, no spaces
            raise ConfigError(f"the image's {self.file} line {self.line}: {what} {value[:40]!r} is not a number "
                              f"from 0 to {MAX_ID}")
        return int(value)


def _read_db(rootfs: str, name: str) -> list[_Entry]:
    """The entries of the image's ``/etc/<name>``, read inside the image (see
    :mod:`imagefs.image_files`); none if the image has no such file."""
    path = f"/etc/{name}"
    try:
        data = read_image_file(rootfs, path)
    except ImageFileError as e:
        raise ConfigError(f"cannot resolve the user: {e}") from None
    if data is None:
        return []
    entries = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        if line.strip() and not line.startswith("#"):
            entries.append(_Entry(path, n, line.split(":")))
    return entries


def _id(value: str, what: str) -> int:
    if not value.isdigit() or int(value) > MAX_ID:
        raise ConfigError(f"{what} {value!r}: not a name or a number from 0 to {MAX_ID}")
    return int(value)


def resolve_user(spec: str | None, rootfs: str) -> tuple[int, int, list[int]]:
    """(uid, gid, additional gids) for an image ``User`` string: ``uid``, ``uid:gid``,
    ``name``, ``name:group``, looked up in the image's own /etc/passwd and /etc/group
    (resolved inside the image at ``rootfs``, never on the host)."""
    if not spec:
        spec = "0"
    user, _, group = spec.partition(":")
    if not user:
        raise ConfigError(f"user {spec!r}: no user name or uid before ':'")
    passwd = _read_db(rootfs, "passwd")
    uid: int | None = None
    gid: int | None = None
    name: str | None = None
    if user.isdigit():
        uid = _id(user, "user")
        for row in passwd:
            if len(row.fields) > 3 and row.fields[2] == user:
                name, gid = row.fields[0], row.id(3, "gid")
                break
    else:
        for row in passwd:
            if len(row.fields) > 3 and row.fields[0] == user:
                name, uid, gid = user, row.id(2, "uid"), row.id(3, "gid")
                break
        if uid is None:
            raise ConfigError(f"user {user!r} not found in the image's /etc/passwd")
    # /etc/group is read only when needed: for a group name, or a named user's other groups.
    by_name, members = bool(group) and not group.isdigit(), name is not None and not group
    groups = _read_db(rootfs, "group") if by_name or members else []
    if group:
        if group.isdigit():
            gid = _id(group, "group")
        else:
            for row in groups:
                if len(row.fields) > 2 and row.fields[0] == group:
                    gid = row.id(2, "gid")
                    break
            else:
                raise ConfigError(f"group {group!r} not found in the image's /etc/group")
    if gid is None:
        gid = 0
    extra: list[int] = []
    if name and not group:
        for row in groups:
            if len(row.fields) > 3 and name in row.fields[3].split(","):
                g = row.id(2, "gid")
                if g != gid and g not in extra:
                    extra.append(g)
    return uid, gid, extra


def runtime_config(base: dict[str, Any], image_cfg: dict[str, Any], spec: RunSpec, rootfs: str, rootfs_for_lookup: str) -> dict[str, Any]:
    """The config.json for one container.

    ``base`` is runc's default spec; ``rootfs`` is the path runc will use;
    ``rootfs_for_lookup`` is the image tree in which its /etc is read (the lower mount).
    """
    cfg = copy.deepcopy(base)
    uid, gid, extra = resolve_user(spec.user if spec.user is not None else image_cfg.get("User"), rootfs_for_lookup)
    proc = cfg["process"]
    proc["terminal"] = spec.terminal
    proc["args"] = command_line(image_cfg, spec)
    env = merge_env(list(image_cfg.get("Env") or []), spec.env)
    if spec.terminal and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    if spec.hostname:
        env = [e for e in env if not e.startswith("HOSTNAME=")] + [f"HOSTNAME={spec.hostname}"]
        cfg["hostname"] = spec.hostname
    proc["env"] = env
    cwd = spec.workdir or image_cfg.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise ConfigError(f"working directory {cwd!r} must be absolute")
    proc["cwd"] = cwd
    proc["user"] = {"uid": uid, "gid": gid, **({"additionalGids": extra} if extra else {})}
    cfg["root"] = {"path": rootfs, "readonly": spec.read_only}
    namespaces = cfg.setdefault("linux", {}).setdefault("namespaces", [])
    if spec.network == "host":
        cfg["linux"]["namespaces"] = [ns for ns in namespaces if ns.get("type") != "network"]
    elif spec.network != "none":
        raise ConfigError(f"--network {spec.network!r}: use host or none")
    return cfg
