"""Emulated links: network namespaces joined to the host by veth pairs, shaped by tc.

Why: a cold start is decided by the network between a host and its tiers, and a bench
on one machine has none. Each emulated remote (the blob store with the registry, the
AZ cache server) runs in its own network namespace, reachable only over a veth pair
whose both ends are shaped with an htb class (egress of each end = one direction of
the link), so reads *and* writes see the link's bandwidth. Latency comes from
bench/delayproxy.py (this kernel has no netem).

Addresses are IPv4 /30 pairs carved from 198.18.0.0/15, the range RFC 2544 sets aside
for benchmarking: nothing else on a machine should route it, and :func:`preflight`
refuses to run if something does. Names carry a fixed prefix so that a run killed
with SIGKILL can be cleaned up by the next one (:func:`remove_stale`); a lock in the
work directory keeps two runs apart. Each bench has its own prefixes and its own share
of the range (``ifcs``: the cold-start bench from the start of it; ``fl``: the fleet
bench from :data:`FLEET_FIRST_SUBNET`), so one never removes or collides with another's.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

NS_PREFIX = "ifcs-"  # imagefs cold start
VETH_PREFIX = "ifcs"
BENCH_NET = ipaddress.ip_network("198.18.0.0/15")
FLEET_FIRST_SUBNET = 1 << 14  # the fleet bench's /30s start at 198.19.0.0


class NetemError(RuntimeError):
    """A namespace, link or qdisc could not be set up; the message has the command."""


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and res.returncode:
        raise NetemError(f"`{' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def preflight(veth_prefix: str = VETH_PREFIX) -> None:
    """Refuse to run if the host already uses the bench range (we would break its routes)."""
    for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        for line in _run(argv).stdout.splitlines():
            if f" {veth_prefix}" in line or "dev " + veth_prefix in line:
                continue  # our own stale link, removed by remove_stale()
            for word in re.findall(r"\d+\.\d+\.\d+\.\d+(?:/\d+)?", line):
                try:
                    net = ipaddress.ip_network(word, strict=False)
                except ValueError:
                    continue
                if net.prefixlen > 0 and net.overlaps(BENCH_NET):
                    raise NetemError(f"the host already uses {word} (in `{' '.join(argv)}`: {line.strip()}); "
                                     f"the bench needs {BENCH_NET} for its emulated links")


def list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ns_pids(name: str) -> list[int]:
    res = _run(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def kill_ns_processes(name: str, timeout: float = 5.0) -> None:
    """Stop whatever still runs in our namespace ``name`` (TERM, then KILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = ns_pids(name)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and ns_pids(name):
            time.sleep(0.05)


def delete_namespace(name: str) -> None:
    kill_ns_processes(name)
    _run(["ip", "netns", "del", name], check=False)


def remove_stale(ns_prefix: str = NS_PREFIX, veth_prefix: str = VETH_PREFIX) -> list[str]:
    """Remove namespaces and host veth ends a killed earlier run left (our prefix only)."""
    removed = []
    for ns in list_namespaces():
        if ns.startswith(ns_prefix):
            delete_namespace(ns)
            removed.append(ns)
    for line in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
        m = re.match(r"\d+:\s+([^:@\s]+)", line)
        if m and m.group(1).startswith(veth_prefix):
            _run(["ip", "link", "del", m.group(1)], check=False)
            removed.append(m.group(1))
    return removed


def shape(dev: str, rate_mbit: float, ns: str | None = None) -> None:
    """Cap egress of ``dev`` at ``rate_mbit`` with one htb class that takes all traffic."""
    pre = ["ip", "netns", "exec", ns] if ns else []
    rate = f"{rate_mbit:g}mbit"
    burst = f"{max(15, int(rate_mbit * 1e6 / 8 / 1000 / 1024))}k"  # what the rate sends in 1 ms
    # quantum: bytes a class may send per round; tc warns when r2q makes it huge, and
    # one GSO super-packet (64 KiB) per round is what a veth hands us anyway.
    _run([*pre, "tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1"])
    _run([*pre, "tc", "class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
          "rate", rate, "ceil", rate, "burst", burst, "cburst", burst, "quantum", "65536"])


def qdisc_stats(dev: str, ns: str | None = None) -> dict[str, int]:
    """Bytes and packets the root qdisc of ``dev`` sent (for a sanity check of shaping)."""
    pre = ["ip", "netns", "exec", ns] if ns else []
    out = _run([*pre, "tc", "-s", "qdisc", "show", "dev", dev], check=False).stdout
    m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", out)
    if not m:
        return {}
    return {"bytes": int(m.group(1)), "packets": int(m.group(2)), "dropped": int(m.group(3)),
            "overlimits": int(m.group(4))}


@dataclass(frozen=True)
class LinkEnd:
    """One end of a veth pair: its device, namespace (None = host) and address."""

    dev: str
    ns: str | None
    addr: str  # no prefix length


@dataclass
class Link:
    """A shaped veth pair between two namespaces (either may be the host)."""

    name: str
    a: LinkEnd
    b: LinkEnd
    rate_mbit: float

    def qdisc_stats(self) -> dict[str, dict[str, int]]:
        return {self.a.dev: qdisc_stats(self.a.dev, self.a.ns), self.b.dev: qdisc_stats(self.b.dev, self.b.ns)}


@dataclass
class Topology:
    """Namespaces and links created by one bench run; :meth:`close` removes them all."""

    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    namespaces: list[str] = field(default_factory=list)
    links: dict[str, Link] = field(default_factory=dict)
    ns_prefix: str = NS_PREFIX
    veth_prefix: str = VETH_PREFIX
    first_subnet: int = 0  # index of the first /30 of BENCH_NET this topology uses
    _subnets: int = 0

    def namespace(self, role: str) -> str:
        """Create ``<ns_prefix><role>-<tag>`` with loopback up; returns its name."""
        name = f"{self.ns_prefix}{role}-{self.tag}"
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def link(self, name: str, ns_a: str | None, ns_b: str | None, rate_mbit: float) -> Link:
        """A veth pair ``ns_a`` <-> ``ns_b`` with the next /30 of the bench range,
        both ends capped at ``rate_mbit``."""
        idx = self._subnets
        self._subnets += 1
        net = ipaddress.ip_network((int(BENCH_NET.network_address) + 4 * (self.first_subnet + idx), 30))
        if not net.subnet_of(BENCH_NET):  # type: ignore[arg-type]
            raise NetemError(f"out of bench addresses ({net})")
        host_a, host_b = (str(h) for h in list(net.hosts())[:2])
        dev_a, dev_b = f"{self.veth_prefix}{idx}a{self.tag}"[:15], f"{self.veth_prefix}{idx}b{self.tag}"[:15]
        _run(["ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b])
        for dev, ns, addr in ((dev_a, ns_a, host_a), (dev_b, ns_b, host_b)):
            if ns:
                _run(["ip", "link", "set", dev, "netns", ns])
            pre = ["-n", ns] if ns else []
            _run(["ip", *pre, "addr", "add", f"{addr}/30", "dev", dev])
            _run(["ip", *pre, "link", "set", dev, "up"])
            shape(dev, rate_mbit, ns)
        link = Link(name, LinkEnd(dev_a, ns_a, host_a), LinkEnd(dev_b, ns_b, host_b), rate_mbit)
        self.links[name] = link
        return link

    def close(self) -> None:
        """Remove every namespace (their veth ends go with them) and host-side veth."""
        for link in self.links.values():
            for end in (link.a, link.b):
                if end.ns is None:
                    _run(["ip", "link", "del", end.dev], check=False)
        for ns in reversed(self.namespaces):
            delete_namespace(ns)
        self.namespaces.clear()
        self.links.clear()

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
