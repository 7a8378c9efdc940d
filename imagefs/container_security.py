"""What a container may do: Docker's defaults, and the flags that change them.

Docker's defaults are the floor for what a container gets and must not get:

- root in the container holds Docker's 14 default capabilities (enough for ``chown``,
  ``su``, package managers, ``ping``), and no others; a non-root user holds none
  (the kernel drops them when a non-root user execs, since none are ambient);
- ``no_new_privs`` is off unless asked for (``--security-opt no-new-privileges``),
  so setuid programs work as they do under Docker;
- Docker's default seccomp profile (:mod:`imagefs.seccomp_profile`);
- /proc and /sys paths that describe or control the host are masked (an empty file
  or directory is mounted over them) or read-only.

``--privileged`` lifts all of it (every capability, no seccomp, nothing masked, every
host device); ``--cap-add``/``--cap-drop`` and ``--security-opt`` adjust it as in Docker.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any

from imagefs.run_spec import ConfigError, RunSpec
from imagefs.seccomp_profile import ProfileError, default_seccomp, to_oci

DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
# Linux's capabilities in number order (CAP_CHOWN is 0).
_CAPABILITIES = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
]
MASKED_PATHS = [
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
# Below /dev, what --privileged does not copy from the host: runc makes its own.
_NOT_HOST_DEVICES = {"pts", "shm", "mqueue", "fd", "console", "ptmx", "core"}


def all_capabilities() -> list[str]:
    """Every capability this process may give: the kernel's (``cap_last_cap``) that are
    in our own bounding set (a sandbox may have taken some away, and runc cannot give
    a container what it does not have)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = len(_CAPABILITIES) - 1
    bounding = (1 << (last + 1)) - 1
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    bounding = int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return ["CAP_" + c for i, c in enumerate(_CAPABILITIES[: last + 1]) if bounding >> i & 1]


def _cap_name(name: str, flag: str) -> str:
    upper = name.strip().upper()
    if upper == "ALL":
        return upper
    cap = upper if upper.startswith("CAP_") else "CAP_" + upper
    if cap[4:] not in _CAPABILITIES:
        raise ConfigError(f"{flag} {name!r}: no such capability (e.g. NET_ADMIN, SYS_PTRACE, or ALL)")
    return cap


def capabilities(opts: RunSpec) -> list[str]:
    """Docker's rules: privileged gets all; else the defaults (all with ``--cap-add ALL``)
    less ``--cap-drop`` (``ALL``: all of them), then ``--cap-add`` (so an added one stays)."""
    if opts.privileged:
        return all_capabilities()
    adds = [_cap_name(c, "--cap-add") for n in opts.cap_add for c in n.split(",")]
    drops = [_cap_name(c, "--cap-drop") for n in opts.cap_drop for c in n.split(",")]
    basics = all_capabilities() if "ALL" in adds else list(DEFAULT_CAPABILITIES)
    # Drops apply to the basics (ALL drops them all); what is added is added after.
    caps = [] if "ALL" in drops else [c for c in basics if c not in drops]
    return caps + [c for c in adds if c != "ALL" and c not in caps]


@dataclass
class _SecurityOpts:
    no_new_privileges: bool = False
    seccomp: str = "default"
    unmask: bool = False


def _parse_security_opt(values: list[str]) -> _SecurityOpts:
    out = _SecurityOpts()
    for value in values:
        key, sep, arg = value.partition("=")
        if not sep:
            key, sep, arg = value.partition(":")  # Docker's older form, no-new-privileges:true
        key = key.strip()
        if key == "no-new-privileges":
            if arg not in ("", "true", "false"):
                raise ConfigError(f"--security-opt {value!r}: no-new-privileges takes true or false")
            out.no_new_privileges = arg != "false"
        elif key == "seccomp":
            if not arg:
                raise ConfigError(f"--security-opt {value!r}: seccomp=unconfined or seccomp=PROFILE.json")
            out.seccomp = arg
        elif key == "systempaths":
            if arg != "unconfined":
                raise ConfigError(f"--security-opt {value!r}: only systempaths=unconfined is known")
            out.unmask = True
        elif key in ("apparmor", "label"):
            if arg not in ("unconfined", "disable"):
                raise ConfigError(f"--security-opt {value!r}: imagefs applies no AppArmor or SELinux profile; "
                                  f"only {key}=unconfined is accepted")
        else:
            raise ConfigError(f"--security-opt {value!r}: unknown option (no-new-privileges, seccomp=, "
                              f"systempaths=unconfined, apparmor=unconfined, label=disable)")
    return out


def _seccomp(choice: str, caps: list[str]) -> dict[str, Any] | None:
    if choice == "unconfined":
        return None
    if choice == "default":
        return default_seccomp(set(caps))
    try:
        with open(choice) as f:
            doc = json.load(f)
    except OSError as e:
        raise ConfigError(f"--security-opt seccomp={choice}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"--security-opt seccomp={choice}: not JSON ({e})") from None
    try:
        return to_oci(doc, set(caps), what=choice)
    except (ProfileError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--security-opt seccomp={choice}: {e}") from None


def host_devices(root: str = "/dev") -> list[dict[str, Any]]:
    """Every device node below /dev of the host, as OCI ``linux.devices`` (for --privileged)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if d not in _NOT_HOST_DEVICES]
        for name in filenames:
            if dirpath == root and name in _NOT_HOST_DEVICES:
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                out.append({"path": path, "type": "c" if stat.S_ISCHR(st.st_mode) else "b",
                            "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                            "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid})
    return out


def apply_security(cfg: dict[str, Any], opts: RunSpec) -> None:
    """Set capabilities, no_new_privs, seccomp, masked and read-only paths, devices,
    in ``cfg`` (a runtime config from ``runc spec``)."""
    sec = _parse_security_opt(opts.security_opt)
    caps = capabilities(opts)
    proc = cfg["process"]
    # No inheritable and no ambient set (Docker's CVE-2022-24769 fix): a non-root user
    # starts with no capabilities, and a setuid program gets root's bounded set.
    proc["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps}
    proc["noNewPrivileges"] = sec.no_new_privileges
    proc.pop("rlimits", None)  # runc spec's RLIMIT_NOFILE 1024; Docker leaves the limits it inherits
    linux = cfg.setdefault("linux", {})
    privileged = opts.privileged
    seccomp = None if privileged else _seccomp(sec.seccomp, caps)
    if seccomp is None:
        linux.pop("seccomp", None)
    else:
        linux["seccomp"] = seccomp
    unmask = privileged or sec.unmask
    linux["maskedPaths"] = [] if unmask else list(MASKED_PATHS)
    linux["readonlyPaths"] = [] if unmask else list(READONLY_PATHS)
    if privileged:
        linux["devices"] = host_devices()
        linux.setdefault("resources", {})["devices"] = [{"allow": True, "access": "rwm"}]
        for m in cfg.get("mounts", []):
            if m.get("destination") in ("/sys", "/sys/fs/cgroup"):  # Docker mounts them rw when privileged
                m["options"] = ["rw" if o == "ro" else o for o in m.get("options", [])]
