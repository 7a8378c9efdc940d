"""A container's own /etc/hosts, /etc/resolv.conf and /etc/hostname, as Docker gives one.

Each is a file in the container's bundle, bind-mounted over the image's: private to
the container (writes stay there and go with it), never a host file shared into it.
With the host network (imagefs's default, Docker's ``--network host``) they start as
copies of the host's, and the hostname is the host's; with ``--network none`` the
hosts file has only the loopback names. ``--hostname``, ``--add-host`` and ``--dns``
change them as in Docker.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Any

from imagefs.run_spec import ConfigError

# Docker's hosts file for a container with no network of its own.
LOOPBACK_HOSTS = """127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
ff00::0\tip6-mcastprefix
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def check_hostname(name: str) -> str:
    if len(name) > 64 or not _HOSTNAME.match(name):
        raise ConfigError(f"--hostname {name!r}: not a valid hostname (letters, digits, '-' and '.', at most 64)")
    return name


def parse_add_host(value: str) -> tuple[str, str]:
    """``--add-host NAME:IP`` (or ``NAME=IP``) as Docker takes it."""
    sep = "=" if "=" in value else ":"
    name, _, ip = value.partition(sep)
    ip = ip.strip("[]")
    if ip == "host-gateway":
        ip = "127.0.0.1"  # on the host network, the host is the gateway
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ConfigError(f"--add-host {value!r}: expected NAME:IP") from None
    return check_hostname(name), ip


def _read_host(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def hosts_file(hostname: str, network: str, add_hosts: list[tuple[str, str]]) -> str:
    if network == "host":
        text = _read_host("/etc/hosts")
        if not re.search(r"^\s*127\.0\.0\.1\s+(.*\s)?localhost(\s|$)", text, re.MULTILINE):
            text = LOOPBACK_HOSTS + text  # the host's file lacks localhost: Docker's lines first
    else:
        text = LOOPBACK_HOSTS
    if text and not text.endswith("\n"):
        text += "\n"
    text += "".join(f"{ip}\t{name}\n" for name, ip in add_hosts)
    return text


def resolv_conf(dns: list[str], dns_search: list[str]) -> str:
    text = _read_host("/etc/resolv.conf")
    if dns or dns_search:
        kept = [line for line in text.splitlines()
                if not (dns and line.split()[:1] == ["nameserver"]) and not (dns_search and line.split()[:1] in (["search"], ["domain"]))]
        for server in dns:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ConfigError(f"--dns {server!r}: not an IP address") from None
        text = "\n".join([*(f"nameserver {s}" for s in dns), *([f"search {' '.join(dns_search)}"] if dns_search else []), *kept]) + "\n"
    return text


def default_hostname(network: str, cid: str) -> str:
    """Docker's: the host's name on the host network, else the container's (12 characters)."""
    if network == "host":
        return socket.gethostname()[:64]
    return cid.removeprefix("imagefs-")[:12]


def write_etc_files(bundle: str, hostname: str, network: str, add_hosts: list[tuple[str, str]],
                    dns: list[str], dns_search: list[str]) -> list[dict[str, Any]]:
    """Write the three files into ``bundle`` and return the mounts that put them in place."""
    files = {
        "hosts": hosts_file(hostname, network, add_hosts),
        "resolv.conf": resolv_conf(dns, dns_search),
        "hostname": hostname + "\n",
    }
    mounts = []
    for name, text in files.items():
        path = os.path.join(bundle, name)
        # 0644: the container's users read it; the 0700 bundle keeps the host's out
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with open(fd, "w") as f:
            f.write(text)
        mounts.append({"destination": f"/etc/{name}", "type": "bind", "source": path,
                       "options": ["rbind", "rprivate", "nosuid", "nodev", "noexec"]})
    return mounts
