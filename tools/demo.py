#!/usr/bin/env python3
"""The README's main job on the embedded default: build a real image, index it, run it.

1. Build a Debian bookworm minbase root filesystem with debootstrap through the
   machine's configured mirror (cached: later runs reuse it).
2. Turn it into an OCI image layout with umoci (a real image, as a registry would hold).
3. ``imagefs index`` it into the default local store and ``imagefs inspect`` it.
4. ``imagefs run`` a container from it (once the run command exists), printing how
   long mount and start took.

Everything goes through the ``imagefs`` command, exactly as a user would type it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time

WORK = os.environ.get("IMAGEFS_DEMO_DIR", "/var/cache/imagefs-demo")
IMAGE = "demo/debian:bookworm-minbase"
IMAGEFS = [sys.executable, "-m", "imagefs.cli"]


def say(msg: str) -> None:
    print(f"==> {msg}", file=sys.stderr, flush=True)


def debian_mirror() -> str:
    """The machine's Debian mirror, from deb822 sources or sources.list."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        text = open(path).read()
        for stanza in text.split("\n\n"):
            if re.search(r"^Suites:.*\bbookworm\b", stanza, re.M) and "security" not in stanza:
                m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if m:
                    return m.group(1)
    if os.path.exists("/etc/apt/sources.list"):
        for line in open("/etc/apt/sources.list"):
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", line)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def ensure_rootfs() -> str:
    rootfs = os.path.join(WORK, "rootfs")
    if os.path.exists(os.path.join(WORK, "rootfs.done")):
        return rootfs
    tmp = rootfs + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(WORK, exist_ok=True)
    say(f"debootstrap --variant=minbase bookworm (mirror {debian_mirror()}), about 30 s")
    subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", tmp, debian_mirror()],
        check=True, stdout=subprocess.DEVNULL,
    )
    shutil.rmtree(rootfs, ignore_errors=True)
    os.rename(tmp, rootfs)
    open(os.path.join(WORK, "rootfs.done"), "w").close()
    return rootfs


def ensure_layout(rootfs: str) -> str:
    layout = os.path.join(WORK, "oci")
    if os.path.exists(os.path.join(WORK, "oci.done")):
        return layout
    tmp, bundle = layout + ".tmp", os.path.join(WORK, "bundle")
    for d in (tmp, bundle):
        shutil.rmtree(d, ignore_errors=True)
    say("umoci: writing the OCI image layout")
    subprocess.run(["umoci", "init", "--layout", tmp], check=True)
    subprocess.run(["umoci", "new", "--image", f"{tmp}:latest"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{tmp}:latest", bundle], check=True, stdout=subprocess.DEVNULL)
    os.rmdir(os.path.join(bundle, "rootfs"))
    subprocess.run(["cp", "-a", rootfs, os.path.join(bundle, "rootfs")], check=True)
    subprocess.run(["umoci", "repack", "--image", f"{tmp}:latest", bundle], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["umoci", "config", "--image", f"{tmp}:latest", "--config.cmd", "/bin/bash",
         "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         "--config.workingdir", "/", "--os", "linux", "--architecture", "amd64"],
        check=True,
    )
    shutil.rmtree(bundle)
    shutil.rmtree(layout, ignore_errors=True)
    os.rename(tmp, layout)
    open(os.path.join(WORK, "oci.done"), "w").close()
    return layout


def imagefs(*args: str) -> str:
    out = subprocess.run([*IMAGEFS, *args], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout


def main() -> int:
    layout = ensure_layout(ensure_rootfs())
    say(f"imagefs index oci:{layout}:latest --name {IMAGE}")
    digest = imagefs("index", f"oci:{layout}:latest", "--name", IMAGE).strip()
    print(f"image digest: {digest}")
    say(f"imagefs inspect {IMAGE}")
    print(imagefs("inspect", IMAGE), end="")
    if "run" in imagefs("--help"):
        say(f"imagefs run {IMAGE} -- cat /etc/debian_version")
        start = time.monotonic()
        subprocess.run([*IMAGEFS, "run", "--timings", IMAGE, "--", "cat", "/etc/debian_version"], check=True)
        print(f"container ran in {time.monotonic() - start:.2f} s (command to exit, including Python start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
