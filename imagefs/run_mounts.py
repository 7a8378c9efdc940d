"""``-v``/``--volume``, ``--mount`` and ``--tmpfs``, as Docker reads them, to OCI mounts.

Only host directories and files (bind mounts) and tmpfs are supported: imagefs keeps
no named volumes, so ``-v NAME:/path`` and ``--mount type=volume`` are refused with a
message that says so. As in Docker, ``-v`` creates a missing host directory, and
``--mount`` refuses a missing source. The destination is resolved by runc inside the
container's root (never on the host).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from imagefs.run_spec import ConfigError

_PROPAGATION = {"private", "rprivate", "shared", "rshared", "slave", "rslave"}


@dataclass(frozen=True)
class Mount:
    destination: str
    type: str  # "bind" or "tmpfs"
    source: str
    options: tuple[str, ...]

    def oci(self) -> dict[str, Any]:
        return {"destination": self.destination, "type": self.type, "source": self.source, "options": list(self.options)}


def _destination(path: str, flag: str) -> str:
    if not path.startswith("/"):
        raise ConfigError(f"{flag}: the container path {path!r} must be absolute")
    norm = os.path.normpath(path)
    if norm == "/":
        raise ConfigError(f"{flag}: cannot mount over the container's /")
    return norm


def _source(path: str, flag: str, *, create: bool) -> str:
    if not path.startswith("/"):
        if path.startswith(".") or "/" in path:
            raise ConfigError(f"{flag}: the host path {path!r} must be absolute")
        raise ConfigError(f"{flag}: {path!r} names a volume; imagefs has no named volumes, give an absolute host path")
    if not os.path.exists(path):
        if not create:
            raise ConfigError(f"{flag}: the host path {path!r} does not exist")
        os.makedirs(path, exist_ok=True)  # Docker's -v does this
    return os.path.realpath(path)


def parse_volume(value: str) -> Mount:
    """``-v HOST:CONTAINER[:OPTIONS]`` (options: ro, rw, a propagation mode, z/Z ignored)."""
    flag = f"-v {value}"
    parts = value.split(":")
    if len(parts) == 1:
        raise ConfigError(f"{flag}: anonymous volumes are not supported; use -v HOST_PATH:CONTAINER_PATH or --tmpfs")
    if len(parts) > 3:
        raise ConfigError(f"{flag}: expected HOST_PATH:CONTAINER_PATH[:OPTIONS]")
    src, dst = parts[0], parts[1]
    opts = parts[2].split(",") if len(parts) == 3 and parts[2] else []
    mode, propagation = "rw", "rprivate"
    for o in opts:
        if o in ("ro", "rw"):
            mode = o
        elif o in _PROPAGATION:
            propagation = o
        elif o in ("z", "Z", "nocopy", "consistent", "cached", "delegated"):
            continue  # SELinux relabelling and macOS hints: nothing to do here
        else:
            raise ConfigError(f"{flag}: unknown option {o!r} (ro, rw, or a propagation mode)")
    return Mount(_destination(dst, flag), "bind", _source(src, flag, create=True), ("rbind", mode, propagation))


def _bool(value: str, flag: str) -> bool:
    if value.lower() in ("", "1", "true"):
        return True
    if value.lower() in ("0", "false"):
        return False
    raise ConfigError(f"{flag}: expected true or false, got {value!r}")


def parse_mount(value: str) -> Mount:
    """``--mount type=bind|tmpfs,source=..,target=..[,readonly][,bind-propagation=..][,tmpfs-size=..][,tmpfs-mode=..]``."""
    flag = f"--mount {value}"
    fields: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        key = key.strip().lower()
        if key in ("readonly", "ro") and not sep:
            val = "true"
        fields[{"src": "source", "dst": "target", "destination": "target", "ro": "readonly"}.get(key, key)] = val
    kind = fields.pop("type", "volume")
    target = fields.pop("target", None)
    if not target:
        raise ConfigError(f"{flag}: no target (target=/path/in/container)")
    dst = _destination(target, flag)
    readonly = _bool(fields.pop("readonly", "false"), flag)
    if kind == "bind":
        source = fields.pop("source", None)
        if not source:
            raise ConfigError(f"{flag}: a bind mount needs source=/host/path")
        propagation = fields.pop("bind-propagation", "rprivate")
        if propagation not in _PROPAGATION:
            raise ConfigError(f"{flag}: bind-propagation {propagation!r} is not one of {', '.join(sorted(_PROPAGATION))}")
        fields.pop("consistency", None)  # a macOS hint
        if fields:
            raise ConfigError(f"{flag}: unknown or unsupported field {next(iter(fields))!r}")
        return Mount(dst, "bind", _source(source, flag, create=False), ("rbind", "ro" if readonly else "rw", propagation))
    if kind == "tmpfs":
        options = ["nosuid", "nodev", "ro" if readonly else "rw"]
        if "tmpfs-size" in fields:
            options.append(f"size={_size(fields.pop('tmpfs-size'), flag)}")
        if "tmpfs-mode" in fields:
            options.append(f"mode={_mode(fields.pop('tmpfs-mode'), flag)}")
        fields.pop("source", None)
        if fields:
            raise ConfigError(f"{flag}: unknown or unsupported field {next(iter(fields))!r}")
        return Mount(dst, "tmpfs", "tmpfs", tuple(options))
    if kind == "volume":
        raise ConfigError(f"{flag}: imagefs has no named volumes; use type=bind,source=/host/path or type=tmpfs")
    raise ConfigError(f"{flag}: mount type {kind!r} is not supported (bind or tmpfs)")


def _size(text: str, flag: str) -> str:
    t = text.strip().lower().removesuffix("b")
    if not t or not (t.isdigit() or (t[:-1].isdigit() and t[-1] in "kmg")):
        raise ConfigError(f"{flag}: size {text!r} (use e.g. 64m or 1g)")
    return t


def _mode(text: str, flag: str) -> str:
    try:
        return format(int(text, 8), "o")
    except ValueError:
        raise ConfigError(f"{flag}: mode {text!r} is not octal (e.g. 1777)") from None


def parse_tmpfs(value: str) -> Mount:
    """``--tmpfs /path[:OPTIONS]`` (mount options as mount(8) takes them: size=, mode=, ro, noexec...)."""
    path, _, opts = value.partition(":")
    flag = f"--tmpfs {value}"
    options = ["nosuid", "nodev", "noexec"]
    for o in filter(None, opts.split(",")):
        if o in ("exec", "noexec", "suid", "nosuid", "dev", "nodev"):
            options = [x for x in options if x.removeprefix("no") != o.removeprefix("no")]
            options.append(o)
        else:
            options.append(o)
    return Mount(_destination(path, flag), "tmpfs", "tmpfs", tuple(options))


def check_unique(mounts: list[Mount]) -> None:
    seen: set[str] = set()
    for m in mounts:
        if m.destination in seen:
            raise ConfigError(f"two mounts at {m.destination} in the container")
        seen.add(m.destination)
