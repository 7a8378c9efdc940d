"""Fleet burst: N cold hosts start one image at once through a zone's cache server(s).

What it answers: does the blob store send one copy of an image per zone whatever the
number of hosts that start it at the same moment, and what does a burst do to each
host's start? (Issue "fleet burst": before the v3 streams, 8 hosts at once made the
store send the image 5.4 times.) One run per (servers, hosts) pair, every tier cold:

- network namespaces (bench/netem.py, prefix ``fl-``): ``blob`` (SeaweedFS behind two
  delay proxies: one the zone's servers use, one the hosts use, so the store's traffic
  is counted by who asked), ``az`` (1 or 3 ``imagefs cache-server``, listening on a
  zone address with a shared secret), and one namespace per host, each joined to
  ``az`` and to ``blob`` by its own veth pairs shaped with htb;
- each host: its own ``imagefs agent`` started inside its namespace (``nsenter --net``,
  so its FUSE mounts are the machine's), its own run directory and SSD cache;
- at t0 every host mounts the image by digest (the index from the store over its own
  link, as ``imagefs run`` does after a resolve) and runs the workload: ``cksum`` over
  the files ``import numpy`` loads (the modules it imports and the shared objects it
  maps, listed once from the image's rootfs), compared with the same files on local
  disk: light on CPU (no Python per host), and every wrong byte is caught;
- the run ends when every host's prefetch has ended or stands by; the store's bytes
  and GETs are counted until then (prefetch included: the defaults are on).

Reported per run: store bytes and GETs (by the servers / by hosts directly), bytes the
zone served, per-host tier hits and misses and direct store reads, start p50/p99/max
(t0 to the workload's exit) and the machine's CPU use during the starts. Optionally
(``--stop``) the zone's server is killed (SIGKILL) in the middle of a burst and
restarted: every host must finish with 0 wrong bytes, direct store reads within each
host's budget, and the restarted server serving again within a probe interval.

Results: bench/results/fleet.json and .md (the figures in bench/RESULTS.md "Fleet
burst" were copied from there, with the command and machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import netem, scenarios, services
from bench.prep import (PREP_VERSION, PrepError, index_into_store, layout_dir, locked, machine_info, manifest_digest,
                        prepare_code, run_checked, sigterm_as_interrupt, step)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
S3_PORT = 8333  # SeaweedFS on the blob namespace's loopback
STORE_IP = "198.19.255.1"  # the store's address (on the blob namespace's lo), reached over each link
ZONE_IP = "198.19.255.9"  # the zone's servers' address (on the az namespace's lo)
SERVER_STORE_PORT, HOST_STORE_PORT = 18333, 18334  # delay proxies in front of S3: servers', hosts'
SERVER_PORT = 7071  # servers listen on ZONE_IP:7071, 7072, ...
SERVER_BACKEND_PORT = 7171  # ... or on the az loopback behind delay proxies (--az-latency-ms > 0)
PROBE_INTERVAL_S = 1.0  # the AZ client's health probe (cache.azclient default)

# Lists, inside the image, every file `import numpy` reads: the modules it imports (their
# .pyc when there is one) and the files it maps (shared objects), all as real paths.
WORKSET_SCRIPT = r"""
import importlib.util, os, sys
import numpy  # noqa: F401
seen = set()
def add(p):
    p = os.path.realpath(p)
    if os.path.isfile(p):
        seen.add(p)
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if not f:
        continue
    if f.endswith(".py"):
        try:
            c = importlib.util.cache_from_source(f)
        except Exception:
            c = None
        add(c if c and os.path.exists(c) else f)
    else:
        add(f)
with open("/proc/self/maps") as maps:
    for line in maps:
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("/"):
            add(parts[5])
add(sys.executable)
print("\0".join(sorted(seen)), end="")
"""
WORKSET_VERSION = 1


def log(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- preparation


@dataclass
class Workset:
    """The workload's files (relative to the image root) and their cksum on local disk."""

    list_file: Path  # NUL-separated relative paths
    expected: str  # `cksum` output for them, run in the image root
    files: int
    bytes: int


def prepare_workset(work: Path, img: Any) -> Workset:
    rootfs = Path(img.rootfs)
    out = work / "workset"
    list_file, ref_file = out / f"{img.name}.list", out / f"{img.name}.cksum"
    inputs = {"zstd": manifest_digest(layout_dir(img.layout_zstd)), "version": WORKSET_VERSION, "prep": PREP_VERSION}
    with step(out / f"{img.name}.stamp.json", inputs, f"the files `import numpy` reads in {img.name}", log) as todo:
        if todo:
            out.mkdir(parents=True, exist_ok=True)
            # A private mount namespace: /proc and /dev for the image's Python, gone with it.
            inner = (f"mount -t proc proc {shlex.quote(str(rootfs / 'proc'))} && "
                     f"mount --rbind /dev {shlex.quote(str(rootfs / 'dev'))} && "
                     f"exec chroot {shlex.quote(str(rootfs))} /usr/bin/env -i PATH=/usr/bin:/bin "
                     f"/opt/venv/bin/python3 -c {shlex.quote(WORKSET_SCRIPT)}")
            paths = run_checked(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
                                "listing the workload's files").split("\0")
            rel = [p.lstrip("/") for p in paths if p]
            if len(rel) < 10:
                raise PrepError(f"only {len(rel)} files listed for `import numpy` in {rootfs}")
            list_file.write_bytes(b"\0".join(r.encode() for r in rel) + b"\0")
            ref_file.write_text(_cksum(list_file, rootfs))
    expected = ref_file.read_text()
    files = [r for r in list_file.read_bytes().split(b"\0") if r]
    size = sum(int(line.split()[1]) for line in expected.splitlines())
    return Workset(list_file, expected, len(files), size)


def _cksum(list_file: Path, root: Path) -> str:
    res = subprocess.run(["xargs", "-0", "-a", str(list_file), "cksum"], cwd=root, capture_output=True, text=True,
                         timeout=600)
    if res.returncode:
        raise PrepError(f"cksum in {root} failed: {res.stderr[-500:]}")
    return res.stdout


def resolve_digest(ns_blob: str, store_name: str) -> str:
    code = ("import sys; from cache.stores import open_store; from indexer.catalog import resolve; "
            f"print(resolve(open_store('s3://{services.S3_BUCKET}', s3_endpoint='http://127.0.0.1:{S3_PORT}'), "
            f"{store_name!r}))")
    return run_checked(services.in_ns(ns_blob, [sys.executable, "-c", code]), f"resolving {store_name}",
                       env=services.s3_env()).strip()


# --------------------------------------------------------------------------- the zone


@dataclass
class Host:
    name: str
    ns: str
    root: Path  # run dir, caches, mountpoint
    agent: services.Service | None = None

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def mountpoint(self) -> Path:
        return self.root / "mnt"

    def env(self, secret: str) -> dict[str, str]:
        return {**services.s3_env(), "IMAGEFS_RUN_DIR": str(self.run_dir), "IMAGEFS_CACHE_SECRET": secret}


@dataclass
class Zone:
    """Everything a run uses: namespaces, the store and its proxies, hosts, servers."""

    topo: netem.Topology
    ns_blob: str
    ns_az: str
    rundir: Path
    secret: str
    secret_file: Path
    hosts: list[Host]
    store_proxies: dict[str, services.ProxyService]
    az_latency_ms: float
    one_way_ms: float
    servers: list[services.Service] = field(default_factory=list)
    server_proxies: list[services.ProxyService] = field(default_factory=list)

    @property
    def store_url(self) -> str:
        return f"s3://{services.S3_BUCKET}"

    def server_addresses(self, n: int) -> list[str]:
        return [f"{ZONE_IP}:{SERVER_PORT + i}" for i in range(n)]

    def start_servers(self, n: int, tag: str, max_size: str) -> None:
        for i in range(n):
            self.servers.append(self._start_server(i, self.rundir / "servers" / tag / f"s{i}", max_size))

    def _start_server(self, i: int, workdir: Path, max_size: str) -> services.Service:
        proxied = self.az_latency_ms > 0 or self.one_way_ms > 0
        host, port = ("127.0.0.1", SERVER_BACKEND_PORT + i) if proxied else (ZONE_IP, SERVER_PORT + i)
        svc = services.start_cache_server(self.ns_az, workdir, port=port, host=host, store=self.store_url,
                                          s3_endpoint=f"http://{STORE_IP}:{SERVER_STORE_PORT}", max_size=max_size,
                                          extra=["--secret-file", str(self.secret_file)])
        if proxied and len(self.server_proxies) <= i:
            self.server_proxies.append(services.start_delay_proxy(
                f"az{i}", self.ns_az, f"{ZONE_IP}:{SERVER_PORT + i}", f"127.0.0.1:{port}", ttfb_ms=self.az_latency_ms,
                one_way_ms=self.one_way_ms, rundir=self.rundir / "proxies"))
        return svc

    def restart_server(self, i: int, tag: str, max_size: str) -> services.Service:
        """Start server ``i`` again on the same port and disk cache (a supervisor's restart)."""
        svc = self._start_server(i, self.rundir / "servers" / tag / f"s{i}", max_size)
        self.servers[i] = svc
        return svc

    def stop_servers(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers.clear()

    def server_metrics(self, i: int) -> dict[str, float]:
        proxied = self.az_latency_ms > 0 or self.one_way_ms > 0
        addr = f"127.0.0.1:{SERVER_BACKEND_PORT + i}" if proxied else f"{ZONE_IP}:{SERVER_PORT + i}"
        res = subprocess.run(services.in_ns(self.ns_az, ["curl", "-s", "-m", "5", "-H",
                                                         f"Authorization: Bearer {self.secret}",
                                                         f"http://{addr}/metrics"]),
                             capture_output=True, text=True, timeout=15)
        out: dict[str, float] = {}
        for line in res.stdout.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[k.replace("imagefs_cache_server_", "")] = float(v)
        return out

    def close(self) -> None:
        self.stop_servers()
        for p in self.server_proxies:
            p.stop()
        for h in self.hosts:
            if h.agent is not None:
                h.agent.stop()


def build_zone(stack: contextlib.ExitStack, rundir: Path, work: Path, n_hosts: int, args: argparse.Namespace
               ) -> Zone:
    netem.preflight("fl-")
    stale = netem.remove_stale("fl-", "fl-")
    if stale:
        log(f"removed what an earlier run left: {', '.join(stale)}")
    topo = stack.enter_context(netem.Topology(ns_prefix="fl-", veth_prefix="fl-",
                                              first_subnet=netem.FLEET_FIRST_SUBNET))
    ns_blob, ns_az = topo.namespace("blob"), topo.namespace("az")
    bw = args.bandwidth_mbit

    def ip(*a: str) -> None:
        run_checked(["ip", *a], "ip " + " ".join(a), timeout=30)

    ip("-n", ns_blob, "addr", "add", f"{STORE_IP}/32", "dev", "lo")
    ip("-n", ns_az, "addr", "add", f"{ZONE_IP}/32", "dev", "lo")
    az_blob = topo.link("az-blob", ns_az, ns_blob, args.server_bandwidth_mbit)
    ip("-n", ns_az, "route", "add", f"{STORE_IP}/32", "via", az_blob.b.addr)
    hosts: list[Host] = []
    for k in range(n_hosts):
        ns = topo.namespace(f"h{k}")
        to_az = topo.link(f"h{k}-az", ns, ns_az, bw)
        to_blob = topo.link(f"h{k}-blob", ns, ns_blob, bw)
        ip("-n", ns, "route", "add", f"{ZONE_IP}/32", "via", to_az.b.addr)
        ip("-n", ns, "route", "add", f"{STORE_IP}/32", "via", to_blob.b.addr)
        hosts.append(Host(f"h{k}", ns, rundir / "hosts" / f"h{k}"))
    log(f"namespaces: blob, az and {n_hosts} hosts, each host with its own {bw:g} Mbit/s links to az and blob; "
        f"az to blob {args.server_bandwidth_mbit:g} Mbit/s")

    seaweed = services.start_seaweed(ns_blob, work / "seaweed", S3_PORT)
    stack.callback(seaweed.stop)
    proxies = {}
    for name, port in (("store-servers", SERVER_STORE_PORT), ("store-hosts", HOST_STORE_PORT)):
        proxies[name] = services.start_delay_proxy(name, ns_blob, f"{STORE_IP}:{port}", f"127.0.0.1:{S3_PORT}",
                                                   ttfb_ms=args.blob_latency_ms, one_way_ms=args.one_way_ms,
                                                   rundir=rundir / "proxies")
        stack.callback(proxies[name].stop)
    secret = secrets.token_hex(16)
    secret_file = rundir / "cache.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    zone = Zone(topo, ns_blob, ns_az, rundir, secret, secret_file, hosts, proxies, args.az_latency_ms,
                args.one_way_ms)
    stack.callback(zone.close)
    for h in hosts:  # agents: the whole read path imported before t0, as on hosts that run one
        h.run_dir.mkdir(parents=True, exist_ok=True)
        h.agent = services.start_agent(h.run_dir, h.root / "agent.log", netns=h.ns, env=h.env(secret))
    return zone


# --------------------------------------------------------------------------- one burst


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _proc_cpu_s(pid: int) -> float:
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _stats(host: Host, secret: str) -> dict[str, Any]:
    res = subprocess.run([services.tool("imagefs"), "stats", "--json", str(host.mountpoint)], capture_output=True,
                         text=True, timeout=30, env={**os.environ, **host.env(secret)})
    if res.returncode:
        raise scenarios.ScenarioError(f"imagefs stats {host.mountpoint}: {res.stderr.strip()[-300:]}")
    return dict(json.loads(res.stdout))


def record_profile(zone: Zone, digest: str, workset: Workset, args: argparse.Namespace) -> str:
    """Record the workload's startup profile on host 0 (a fresh mount, every tier cold,
    straight from the store: no zone server runs yet) and lay it out, as a user would
    with ``imagefs profile``; a line saying what was recorded."""
    h = zone.hosts[0]
    scenarios.force_unmount(h.mountpoint)
    shutil.rmtree(h.root / "cache", ignore_errors=True)
    h.mountpoint.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **h.env(zone.secret)}
    store = ["--store", zone.store_url, "--s3-endpoint", f"http://{STORE_IP}:{HOST_STORE_PORT}"]
    run_checked(services.net_only(h.ns, [services.tool("imagefs"), "-q", "mount", digest, str(h.mountpoint), *store,
                                         "--cache-dir", str(h.root / "cache"), "--no-prefetch", "--record",
                                         "--record-replace", "--record-quiet", "30"]),
                "mount --record", env=env)
    try:
        res = subprocess.run(["xargs", "-0", "-a", str(workset.list_file), "cksum"], cwd=h.mountpoint,
                             capture_output=True, text=True, timeout=args.run_timeout)
        if res.returncode:
            raise PrepError(f"recording: cksum failed: {res.stderr[-300:]}")
    finally:
        _unmount(h, zone.secret)  # the daemon saves the recording as it exits
    out = run_checked(services.net_only(h.ns, [services.tool("imagefs"), "optimize", digest, *store]),
                      "imagefs optimize", env=env)
    shutil.rmtree(h.root / "cache", ignore_errors=True)
    return out.strip() or "laid out"


def _unmount(host: Host, secret: str) -> None:
    subprocess.run([services.tool("imagefs"), "umount", str(host.mountpoint)], capture_output=True, timeout=60,
                   env={**os.environ, **host.env(secret)})
    scenarios.force_unmount(host.mountpoint)


@dataclass
class HostRun:
    name: str
    ok: bool = True
    error: str = ""
    mount_s: float = 0.0
    start_s: float = 0.0  # t0 -> the workload's exit
    wrong_files: int = 0
    prefetch: dict[str, Any] = field(default_factory=dict)
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    direct_reads: int = 0
    direct_waits: int = 0
    daemon_cpu_s: float = 0.0


def run_burst(zone: Zone, digest: str, workset: Workset, n: int, n_servers: int, args: argparse.Namespace,
              tag: str, stop: bool = False) -> dict[str, Any]:
    hosts = zone.hosts[:n]
    for h in hosts:
        scenarios.force_unmount(h.mountpoint)
        shutil.rmtree(h.root / "cache", ignore_errors=True)
        h.mountpoint.mkdir(parents=True, exist_ok=True)
    zone.start_servers(n_servers, tag, args.az_cache_size)
    az = zone.server_addresses(n_servers)
    scenarios.drop_caches()
    for p in zone.store_proxies.values():
        p.reset()
    runs = [HostRun(h.name) for h in hosts]
    events: dict[str, float] = {}
    cpu0 = _cpu_jiffies()
    done_cpu: list[tuple[int, int]] = []
    t0 = time.monotonic()

    def host_job(h: Host, r: HostRun) -> None:
        env = {**os.environ, **h.env(zone.secret)}
        argv = [services.tool("imagefs"), "-q", "mount", digest, str(h.mountpoint), "--store", zone.store_url,
                "--s3-endpoint", f"http://{STORE_IP}:{HOST_STORE_PORT}", "--cache-dir", str(h.root / "cache")]
        for a in az:
            argv += ["--az-cache", a]
        if not args.prefetch:
            argv.append("--no-prefetch")
        try:
            res = subprocess.run(services.net_only(h.ns, argv), capture_output=True, text=True, timeout=120, env=env)
            if res.returncode:
                raise RuntimeError(f"mount failed: {res.stderr.strip()[-300:]}")
            r.mount_s = time.monotonic() - t0
            res = subprocess.run(["xargs", "-0", "-a", str(workset.list_file), "cksum"], cwd=h.mountpoint,
                                 capture_output=True, text=True, timeout=args.run_timeout)
            r.start_s = time.monotonic() - t0
            got = res.stdout.splitlines()
            want = workset.expected.splitlines()
            r.wrong_files = sum(1 for a, b in zip(got, want) if a != b) + abs(len(got) - len(want))
            if res.returncode or r.wrong_files:
                r.ok = False
                r.error = f"cksum exit {res.returncode}, {r.wrong_files} wrong file(s): {res.stderr.strip()[-200:]}"
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            r.ok, r.error = False, str(e)[-500:]

    def stopper() -> None:
        """Kill server 0 mid-burst, restart it, and time how soon it serves again."""
        time.sleep(args.stop_after)
        svc = zone.servers[0]
        os.killpg(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait(10)
        events["killed_s"] = time.monotonic() - t0
        time.sleep(args.restart_after)
        zone.restart_server(0, tag, args.az_cache_size)
        events["restarted_s"] = time.monotonic() - t0
        give_up = time.monotonic() + 10 * PROBE_INTERVAL_S  # nothing left to ask it for, by then
        while time.monotonic() < give_up:
            if zone.server_metrics(0).get("requests_total", 0) > 0:
                events["serving_again_s"] = time.monotonic() - t0
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=host_job, args=(h, r)) for h, r in zip(hosts, runs)]
    if stop:
        threads.append(threading.Thread(target=stopper))
    for t in threads:
        t.start()
    for t in threads[:n]:
        t.join()
    t_started = time.monotonic()
    done_cpu.append(_cpu_jiffies())
    for t in threads[n:]:
        t.join()
    # Until every prefetch has ended or stands by: what the store sends for a start includes it.
    deadline = time.monotonic() + args.settle_timeout
    for h, r in zip(hosts, runs):
        with contextlib.suppress(scenarios.ScenarioError, ValueError):
            while True:
                st = _stats(h, zone.secret)
                r.prefetch = dict(st.get("prefetch") or {})
                if r.prefetch.get("state") not in ("pending", "running") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    t_settled = time.monotonic()
    settle_cpu = _cpu_jiffies()
    for h, r in zip(hosts, runs):
        try:
            st = _stats(h, zone.secret)
            cache = st.get("cache") or {}
            r.tiers = scenarios.tiers_from_stats(st)
            r.direct_reads = int(cache.get("direct_reads", 0))
            r.direct_waits = int(cache.get("direct_waits", 0))
            r.daemon_cpu_s = round(_proc_cpu_s(int(st["pid"])), 2)
        except (scenarios.ScenarioError, ValueError, KeyError) as e:
            r.ok, r.error = False, r.error or f"stats: {e}"
    store = {name: p.stats() for name, p in zone.store_proxies.items()}
    servers = [zone.server_metrics(i) for i in range(n_servers)]
    for h in hosts:
        _unmount(h, zone.secret)
    zone.stop_servers()

    starts = sorted(r.start_s for r in runs if r.ok)
    hz = os.sysconf("SC_CLK_TCK")

    def busy_cores(a: tuple[int, int], b: tuple[int, int], seconds: float) -> float:
        return round((b[0] - a[0]) / hz / max(seconds, 1e-9), 2)

    sv, hv = store["store-servers"], store["store-hosts"]
    return {
        "servers": n_servers, "hosts": n, "stop": stop, "ok": all(r.ok for r in runs),
        "store_bytes": sv["bytes_down"] + hv["bytes_down"], "store_requests": sv["requests"] + hv["requests"],
        "store_bytes_servers": sv["bytes_down"], "store_requests_servers": sv["requests"],
        "store_bytes_hosts": hv["bytes_down"], "store_requests_hosts": hv["requests"],
        "zone_served_bytes": sum(m.get("served_bytes_total", 0) for m in servers),
        "zone_blob_fetches": sum(m.get("blob_fetches_total", 0) for m in servers),
        "start_p50_s": round(_percentile(starts, 50), 2) if starts else None,
        "start_p99_s": round(_percentile(starts, 99), 2) if starts else None,
        "start_max_s": round(starts[-1], 2) if starts else None,
        "mount_p50_s": round(statistics.median(r.mount_s for r in runs), 2),
        "starts_window_s": round(t_started - t0, 2), "settled_s": round(t_settled - t0, 2),
        "cpu_busy_cores_starts": busy_cores(cpu0, done_cpu[0], t_started - t0),
        "cpu_busy_cores_to_settled": busy_cores(cpu0, settle_cpu, t_settled - t0),
        "daemon_cpu_s_median": round(statistics.median(r.daemon_cpu_s for r in runs), 2),
        "direct_reads": [r.direct_reads for r in runs], "direct_waits": [r.direct_waits for r in runs],
        "wrong_files": sum(r.wrong_files for r in runs), "events": {k: round(v, 2) for k, v in events.items()},
        "server_metrics": servers, "host_runs": [r.__dict__ for r in runs],
    }


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p99 of 16 values is the largest: what one slow host costs)."""
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return float(sorted_values[int(k)])


# --------------------------------------------------------------------------- report


def markdown(doc: dict[str, Any]) -> str:
    runs = doc["runs"]
    base = {r["servers"]: r for r in runs if r["hosts"] == 1 and not r["stop"]}
    lines = ["| servers | hosts | store MB (x 1 host) | store GETs (x 1 host) | by servers / by hosts: GETs "
             "| zone served MB | direct store reads per host (max) | start p50 s | start p99 s | mount p50 s "
             "| CPU busy cores during the starts | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        b = base.get(r["servers"])
        ratio_b = f" ({r['store_bytes'] / b['store_bytes']:.2f}x)" if b and b["store_bytes"] else ""
        ratio_g = f" ({r['store_requests'] / b['store_requests']:.2f}x)" if b and b["store_requests"] else ""
        label = f"{r['hosts']}" + (" (server killed mid-burst)" if r["stop"] else "")
        lines.append(
            f"| {r['servers']} | {label} | {r['store_bytes'] / 1e6:.1f}{ratio_b} | {r['store_requests']}{ratio_g} | "
            f"{r['store_requests_servers']} / {r['store_requests_hosts']} | {r['zone_served_bytes'] / 1e6:.1f} | "
            f"{max(r['direct_reads'] or [0])} | {r['start_p50_s']} | {r['start_p99_s']} | {r['mount_p50_s']} | "
            f"{r['cpu_busy_cores_starts']} | {'yes' if r['ok'] and not r['wrong_files'] else 'NO'} |")
    tiers = ["", "Per host, medians over the hosts of each run (requests / hits / misses):", "",
             "| servers | hosts | memory | ssd | az | blob | prefetch states |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        cells = []
        for name in ("memory", "ssd", "az", "blob"):
            vals = [h["tiers"].get(name, {}) for h in r["host_runs"]]
            med = {k: int(statistics.median(v.get(k, 0) for v in vals)) if vals else 0
                   for k in ("requests", "hits", "misses")}
            cells.append(f"{med['requests']} / {med['hits']} / {med['misses']}")
        states: dict[str, int] = {}
        for h in r["host_runs"]:
            s = h["prefetch"].get("state", "?")
            states[s] = states.get(s, 0) + 1
        tiers.append(f"| {r['servers']} | {r['hosts']}{' (killed)' if r['stop'] else ''} | " + " | ".join(cells)
                     + " | " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())) + " |")
    stops = [r for r in runs if r["stop"]]
    notes = []
    for r in stops:
        ev = r["events"]
        again = (f"{ev['serving_again_s'] - ev['restarted_s']:.2f} s after its restart"
                 if "serving_again_s" in ev and "restarted_s" in ev else "never (no request reached it)")
        notes.append(f"- Server killed at {ev.get('killed_s')} s, restarted at {ev.get('restarted_s')} s "
                     f"({r['servers']} server(s), {r['hosts']} hosts): every host finished: "
                     f"{'yes' if r['ok'] else 'NO'}; wrong files {r['wrong_files']}; direct store reads per host "
                     f"{r['direct_reads']} (waits for the budget {r['direct_waits']}); it served again {again}.")
    return "\n".join(lines + tiers + ([""] + notes if notes else [])) + "\n"


# --------------------------------------------------------------------------- command


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", default="1,4,8,16", help="host counts, one burst each (default 1,4,8,16)")
    p.add_argument("--servers", default="1,3", help="cache-server counts (default 1,3)")
    p.add_argument("--stop", action="store_true",
                   help="also a burst in which the zone's (first) server is killed and restarted")
    p.add_argument("--stop-hosts", type=int, default=8, help="hosts in the --stop burst (default 8)")
    p.add_argument("--stop-after", type=float, default=1.0, help="seconds after t0 the server is killed (default 1)")
    p.add_argument("--restart-after", type=float, default=2.0,
                   help="seconds after the kill it is restarted (default 2)")
    p.add_argument("--image", default="numpy", help="bench image (default numpy)")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false", help="mount with --no-prefetch")
    p.add_argument("--profile", action="store_true",
                   help="record the workload's startup profile first (imagefs mount --record, then optimize): every "
                   "host then replays it through the zone instead of prefetching the whole image at once")
    p.add_argument("--blob-latency-ms", type=float, default=200.0, help="store time to first byte (default 200)")
    p.add_argument("--az-latency-ms", type=float, default=0.0,
                   help="cache servers' time to first byte, through a delay proxy (default 0: no proxy, whose "
                   "copying would take CPU from the hosts)")
    p.add_argument("--one-way-ms", type=float, default=0.0, help="extra one-way delay on every proxied link")
    p.add_argument("--bandwidth-mbit", type=float, default=1000.0, help="each host's links, each way (default 1000)")
    p.add_argument("--server-bandwidth-mbit", type=float, default=1000.0,
                   help="the zone's link to the store, each way (default 1000)")
    p.add_argument("--az-cache-size", default="20G", help="each cache server's --max-size (default 20G)")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds a host's start may take (default 300)")
    p.add_argument("--settle-timeout", type=float, default=300.0,
                   help="seconds to wait for the hosts' prefetches after the starts (default 300)")
    p.add_argument("--workdir", help="bench work directory (default $IMAGEFS_BENCH_DIR, else /var/cache/imagefs-bench)")
    p.add_argument("--code", choices=("head", "worktree"), default="head",
                   help="imagefs code to measure: an export of the committed HEAD (default) or the working tree")
    args = p.parse_args(argv)
    try:
        args.hosts = sorted({int(x) for x in args.hosts.split(",") if x})
        args.servers = sorted({int(x) for x in args.servers.split(",") if x})
    except ValueError:
        p.error("--hosts and --servers take comma-separated numbers")
    if not args.hosts or min(args.hosts) < 1 or not args.servers or min(args.servers) < 1 or max(args.servers) > 8:
        p.error("--hosts >= 1, --servers 1..8")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if os.geteuid() != 0:
        print("bench fleet: needs root (namespaces, mounts, drop_caches)", file=sys.stderr)
        return 2
    from bench import images as bench_images

    base = bench_images.resolve_workdir(args.workdir)
    work = base / "fleet"
    command = "python -m bench fleet " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    started = datetime.datetime.now().astimezone()
    os.environ.update(services.s3_env())
    runs: list[dict[str, Any]] = []
    try:
        with locked(work / ".lock", "fleet"), sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            rundir = work / "run"
            _cleanup(rundir)
            rundir.mkdir(parents=True)
            stack.callback(_cleanup, rundir)
            code_dir, code_name = prepare_code(rundir, args.code)
            log(f"imagefs code: {code_name} ({code_dir})")
            img = bench_images.ensure_images(str(base), (args.image,))[args.image]
            workset = prepare_workset(work, img)
            log(f"workload: cksum of {workset.files} files ({workset.bytes / 1e6:.1f} MB) that `import numpy` reads")
            n_hosts = max(args.hosts + ([args.stop_hosts] if args.stop else []))
            zone = build_zone(stack, rundir, work, n_hosts, args)
            store_name = f"bench/{img.name}"
            index_into_store(work, zone.ns_blob, img.name, img.layout_zstd, store_name, code_dir, S3_PORT, log)
            digest = resolve_digest(zone.ns_blob, store_name)
            profile_note = ""
            if args.profile:
                profile_note = record_profile(zone, digest, workset, args)
                log(f"startup profile of the workload recorded: {profile_note}")
            plan = [(s, n, False) for s in args.servers for n in args.hosts]
            if args.stop:
                plan += [(s, args.stop_hosts, True) for s in args.servers]
            for i, (s, n, stop) in enumerate(plan):
                tag = f"run{i}"
                log(f"burst: {n} host(s), {s} server(s){', server killed mid-burst' if stop else ''}")
                r = run_burst(zone, digest, workset, n, s, args, tag, stop)
                runs.append(r)
                log(f"  store {r['store_bytes'] / 1e6:.1f} MB in {r['store_requests']} requests "
                    f"(servers {r['store_requests_servers']}, hosts {r['store_requests_hosts']}); zone served "
                    f"{r['zone_served_bytes'] / 1e6:.1f} MB; start p50 {r['start_p50_s']} s, p99 {r['start_p99_s']} s; "
                    f"CPU {r['cpu_busy_cores_starts']} cores; direct reads {r['direct_reads']}; "
                    f"{'ok' if r['ok'] else 'FAILED: ' + '; '.join(h['error'] for h in r['host_runs'] if h['error'])}")
                for cache in (rundir / "servers" / tag).glob("*/cache"):  # (their logs stay)
                    shutil.rmtree(cache, ignore_errors=True)
            settings = {k: v for k, v in vars(args).items()}
            settings.update({"image": img.name, "digest": digest, "workset_files": workset.files,
                             "workset_bytes": workset.bytes, "profile": profile_note})
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return 130
    except (PrepError, bench_images.BuildError, services.ServiceError, netem.NetemError,
            scenarios.ScenarioError) as e:
        log(f"failed: {e}")
        return 1
    doc = {"command": command, "started": started.isoformat(timespec="seconds"),
           "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine_info(code_name), "settings": settings, "runs": runs}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "fleet.json").write_text(json.dumps(doc, indent=1, default=str))
    body = markdown(doc)
    (RESULTS_DIR / "fleet.md").write_text(f"# Fleet burst\n\n`{command}`, {doc['started']}\n\n" + body)
    print(body)
    log(f"results: {RESULTS_DIR / 'fleet.json'}, .md")
    return 0 if all(r["ok"] and not r["wrong_files"] for r in runs) else 1


def _cleanup(rundir: Path) -> None:
    """Undo what a killed earlier run left in our run directory: mounts first."""
    if not rundir.exists():
        return
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if len(line.split()) > 4]
    prefix = str(rundir.resolve()) + "/"
    for mp in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        scenarios.force_unmount(Path(mp))
    logs = rundir.parent / "last-run-logs"  # kept until the next run: daemons, agents, servers, proxies
    shutil.rmtree(logs, ignore_errors=True)
    for p in rundir.rglob("*.log"):
        dest = logs / p.relative_to(rundir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy2(p, dest)
    shutil.rmtree(rundir, ignore_errors=True)
