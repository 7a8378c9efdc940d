"""A test host of our own: a network namespace joined to this one by a veth pair.

Tests that need an address that is not loopback (to check that plain HTTP is refused
off loopback, say) use the host end of a veth pair made here, with IPv6 unique-local
addresses (fd00::/8) that exist only between our own veth ends. Nothing is ever sent
to an address this test run did not create.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def veth_pair(prefix: str = "fd42:1f5:") -> Iterator[tuple[str, str]]:
    """Yield (host-end address, namespace-end address); removed on exit."""
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"ifstest{tag}", f"ifs{tag}h", f"ifs{tag}n"
    subnet = f"{prefix}{int(tag):x}::"
    host_addr, ns_addr = f"{subnet}1", f"{subnet}2"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_addr}/64", "dev", host_if, "nodad")
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{ns_addr}/64", "dev", ns_if, "nodad")
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield host_addr, ns_addr
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
