"""The whole config.json of one container, from runc's default spec and the run's flags.

Each part has its own module; this one puts them together in order and checks,
before runc is asked, that the command exists in the image and can be executed
(Docker's exit codes 127 and 126 rather than runc's own error):

1. runc's default spec (namespaces, /proc, /dev, /sys);
2. the image config and the user's overrides (:mod:`imagefs.runtime_config`);
3. what the container may do (:mod:`imagefs.container_security`);
4. its own /etc/hosts, resolv.conf and hostname (:mod:`imagefs.container_etc`);
5. the user's volumes (:mod:`imagefs.run_mounts`) and ``--init``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from typing import Any

from imagefs.container_etc import default_hostname, write_etc_files
from imagefs.container_security import apply_security
from imagefs.image_files import ImageFileError, look_path
from imagefs.run_mounts import check_unique
from imagefs.run_spec import ConfigError, RunSpec
from imagefs.runtime_config import DEFAULT_PATH, runtime_config

INIT_PATH = "/sbin/docker-init"  # where Docker puts its init, and so where scripts look for it
INIT_BINARIES = ("/usr/bin/tini-static", "/usr/bin/tini")  # Debian's tini; the static one runs in any image


class BaseSpecError(Exception):
    """``runc spec`` failed."""


def runc_base_spec(bundle: str) -> dict[str, Any]:
    """runc's default spec, the base every container config starts from."""
    res = subprocess.run(["runc", "spec", "--bundle", bundle], capture_output=True, text=True)
    if res.returncode:
        raise BaseSpecError(f"runc spec failed: {res.stderr.strip()}")
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        spec: dict[str, Any] = json.load(f)
    os.unlink(path)
    return spec


def init_binary() -> str:
    for path in INIT_BINARIES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("tini")
    if found:
        return found
    raise ConfigError("--init needs tini on the host (Debian: apt-get install tini)")


def _under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def check_command(lower: str, args: list[str], env: list[str], cwd: str, mounted: list[str]) -> None:
    """Raise :class:`imagefs.image_files.CommandError` if runc could not start ``args[0]``.

    Skipped where the answer is not in the image: a command (or a $PATH directory)
    below a volume the user mounts.
    """
    path_env = next((e[5:] for e in reversed(env) if e.startswith("PATH=")), DEFAULT_PATH)
    command = args[0]
    candidates = [command if command.startswith("/") else os.path.join(cwd, command)] if "/" in command else \
        [os.path.join(d if d.startswith("/") else os.path.join(cwd, d), command) for d in path_env.split(":")]
    if any(_under(os.path.normpath(c), mounted) for c in candidates):
        return
    try:
        look_path(lower, command, path_env, cwd)
    except ImageFileError:
        return  # the image cannot say: runc will, and its error maps to the same statuses


def build_config(bundle: str, rootfs: str, lower: str, image_cfg: dict[str, Any], spec: RunSpec, cid: str) -> dict[str, Any]:
    """config.json for container ``cid``: its rootfs at ``rootfs``, the image at ``lower``."""
    if spec.hostname is None:
        spec = dataclasses.replace(spec, hostname=default_hostname(spec.network, cid))
    cfg = runtime_config(runc_base_spec(bundle), image_cfg, spec, rootfs, lower)
    apply_security(cfg, spec)
    proc = cfg["process"]
    check_unique(spec.mounts)
    user_targets = [m.destination for m in spec.mounts]
    check_command(lower, proc["args"], proc["env"], proc["cwd"], user_targets)
    assert spec.hostname is not None
    etc = write_etc_files(bundle, spec.hostname, spec.network, spec.add_hosts, spec.dns, spec.dns_search)
    # A volume the user puts at /etc/hosts (say) replaces ours, as in Docker.
    cfg["mounts"] += [m for m in etc if m["destination"] not in user_targets]
    cfg["mounts"] += [m.oci() for m in spec.mounts]
    if spec.init:
        cfg["mounts"].append({"destination": INIT_PATH, "type": "bind", "source": init_binary(),
                              "options": ["rbind", "ro", "nosuid", "nodev"]})
        proc["args"] = [INIT_PATH, "--", *proc["args"]]
    return cfg
