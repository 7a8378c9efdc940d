"""A zone under a burst of hosts: a real cache server, a real SeaweedFS store, several
real mount daemons with their own host caches, all cold.

What is asserted is counted, not timed: the bytes and GETs the store sent (through a
counting proxy in front of it, one for the zone's server and one for the hosts), each
host's direct store reads (``imagefs stats``), and the server's own counters.

- a burst of 4 cold hosts makes the store send what 1 host makes it send (within 10%):
  prefetch included, every host's background reads go through the zone's server;
- a server that is alive but slow (its store 1.4 s away: past the old 1 s batch
  deadline, with which 2 hosts made 5 direct store reads each) sends no host to the store;
- a server killed in the middle sends hosts to the store, within their budget of direct
  reads, and every byte read is right;
- one host's demand reads complete while another host's prefetch saturates the server
  (they overtake background reads still queued there).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest

from imagefs.mount import MountOptions, query_stats
from tests.support.cacheserver import CacheServerProcess, cache_servers, start_cache_server  # noqa: F401
from tests.support.faultproxy import FaultProxy
from tests.support.mounts import ImageBuilder, Mount, mounted
from tests.support.seaweed import Seaweed

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

CS = 64 * 1024
SMALL_FILES = 32  # the image every host starts: 32 files of 3 chunks (6 MiB), packs of 1 MiB
BIG_FILES = 96  # the image whose prefetch saturates the server (18 MiB)


def _content(rng: random.Random, n: int) -> bytes:
    # Half random, half repeated: zstd has work to do, as with real files.
    half = rng.randbytes(n // 2)
    return half + half[: n - len(half)]


@pytest.fixture(scope="module")
def zone_images(seaweed: Seaweed) -> Iterator[tuple[Seaweed, str, dict[str, dict[str, bytes]]]]:
    prefix = f"fleet-{os.getpid()}-{random.randrange(1 << 30)}"
    store = seaweed.store(prefix)
    rng = random.Random(16)
    images: dict[str, dict[str, bytes]] = {}
    for name, count in (("app", SMALL_FILES), ("big", BIG_FILES)):
        b = ImageBuilder(chunk_size=CS, pack_size=1 << 20)
        files = {f"lib/{name}{i:03d}.so": _content(rng, 3 * CS - i) for i in range(count)}
        for path, data in files.items():
            b.file(path, data)
        b.write(store, name)
        images[name] = files
    yield seaweed, prefix, images


@pytest.fixture
def zone(zone_images: tuple[Seaweed, str, dict[str, dict[str, bytes]]], tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator["Zone"]:
    seaweed, prefix, images = zone_images
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)  # the daemons read the AWS env
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("IMAGEFS_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("IMAGEFS_CACHE_SECRET", raising=False)
    target = urllib.parse.urlsplit(seaweed.endpoint)
    with FaultProxy(target.hostname or "127.0.0.1", target.port or 0) as server_link, \
            FaultProxy(target.hostname or "127.0.0.1", target.port or 0) as host_link:
        z = Zone(seaweed, prefix, images, tmp_path, server_link, host_link)
        try:
            yield z
        finally:
            z.close()


class Zone:
    """The store behind two counting links (the server's, the hosts'), cache servers, hosts."""

    def __init__(self, seaweed: Seaweed, prefix: str, images: dict[str, dict[str, bytes]], tmp: Path,
                 server_link: FaultProxy, host_link: FaultProxy) -> None:
        self.seaweed, self.prefix, self.images, self.tmp = seaweed, prefix, images, tmp
        self.server_link, self.host_link = server_link, host_link
        self.servers: list[CacheServerProcess] = []
        self._n = 0

    @property
    def store_url(self) -> str:
        return f"s3://{self.seaweed.bucket}/{self.prefix}"

    def start_server(self, *extra: str) -> CacheServerProcess:
        self._n += 1
        srv = start_cache_server(self.tmp / f"server{self._n}", self.store_url, s3_endpoint=self.server_link.url,
                                 extra=list(extra))
        self.servers.append(srv)
        return srv

    def host(self, name: str, srv: CacheServerProcess, **kw: Any) -> MountOptions:
        return MountOptions(store=self.store_url, s3_endpoint=self.host_link.url,
                            cache_dir=str(self.tmp / "hosts" / name), az_cache=[srv.address], **kw)

    def reset_links(self) -> None:
        self.server_link.reset_counters()
        self.host_link.reset_counters()

    def close(self) -> None:
        for s in self.servers:
            s.kill()


def read_files(mp: str, files: dict[str, bytes], names: list[str] | None = None) -> int:
    """Read ``names`` (all by default) through the mount; how many were wrong."""
    wrong = 0
    for name in names if names is not None else sorted(files):
        with open(os.path.join(mp, name), "rb") as f:
            if f.read() != files[name]:
                wrong += 1
    return wrong


def in_parallel(*jobs: Any) -> list[Any]:
    """Run the callables at once (threads: the readers block in the kernel); their results."""
    out: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = jobs[i]()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    if errors:
        raise errors[0]
    return out


def settled_prefetch(mp: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        pf = query_stats(mp).get("prefetch") or {}
        if pf.get("state") not in ("pending", "running") or time.monotonic() > deadline:
            return pf
        time.sleep(0.1)


def chain_stats(mp: str) -> dict[str, Any]:
    return dict(query_stats(mp)["cache"])


def burst(zone: Zone, n: int, tag: str) -> dict[str, Any]:
    """``n`` cold hosts start the app image at once through a fresh server; what the
    store sent (server's link + hosts' link) until every prefetch has settled."""
    srv = zone.start_server()
    # The store is 1.2 s a round trip from the zone: a read-through of a prefetch batch
    # outlasts the 1 s batch deadline the client had, which made every host fetch the
    # chunks again from the store (4 hosts: 28 MB from the store against 11 MB for one).
    zone.server_link.delay(600)
    files = zone.images["app"]
    with contextlib.ExitStack() as stack:
        mounts: list[Mount] = []
        zone.reset_links()
        for i in range(n):
            mounts.append(stack.enter_context(mounted("app", str(zone.tmp / f"mp-{tag}-{i}"),
                                                      zone.host(f"{tag}-{i}", srv))))
        wrong = in_parallel(*[lambda m=m: read_files(m.path, files) for m in mounts])
        prefetch = [settled_prefetch(m.path) for m in mounts]
        stats = [chain_stats(m.path) for m in mounts]
        sl, hl = zone.server_link.stats(), zone.host_link.stats()
    return {"wrong": sum(wrong), "prefetch": prefetch, "stats": stats, "server_bytes": sl.bytes_down,
            "server_gets": sl.gets, "host_bytes": hl.bytes_down, "host_gets": hl.gets,
            "store_bytes": sl.bytes_down + hl.bytes_down, "server": srv.metrics()}


def test_a_burst_of_four_cold_hosts_costs_the_store_what_one_host_does(zone: Zone) -> None:
    one = burst(zone, 1, "one")
    four = burst(zone, 4, "four")
    assert one["wrong"] == 0 and four["wrong"] == 0
    image_bytes = sum(len(v) for v in zone.images["app"].values())
    # One host: its reads and its prefetch bring the whole image through the server once.
    assert all(p["state"] == "done" for p in one["prefetch"] + four["prefetch"]), (one["prefetch"], four["prefetch"])
    assert one["server_bytes"] > image_bytes // 4, "the image came through the zone's server"
    # Four hosts at once: the store sends what it sent for one (indexes aside, which each host fetches).
    assert four["store_bytes"] <= 1.1 * one["store_bytes"], (four["store_bytes"], one["store_bytes"])
    assert four["server_gets"] <= 1.1 * one["server_gets"], (four["server_gets"], one["server_gets"])
    for s in four["stats"]:
        assert s["direct_reads"] == 0 and s["tiers"]["blob"]["requests"] == 0, "no host went to the store"
    # The hosts' own link carried the name of the image only (one GET each); its index
    # came through the zone's server, read from the store once.
    assert four["host_gets"] == 4 and one["host_gets"] == 1
    # Each host asked the zone for the index and, beside it, the image's startup profile
    # and its EROFS metadata.
    assert four["server"]["imagefs_cache_server_blob_requests_total"] == 12
    assert four["server"]["imagefs_cache_server_class_requests_total{class=\"background\"}"] > 0


def test_a_slow_server_sends_no_host_to_the_store(zone: Zone) -> None:
    srv = zone.start_server()
    zone.server_link.delay(700)  # each way: every read-through takes 1.4 s (the old batch deadline was 1 s)
    files = zone.images["app"]
    names = sorted(files)[:12]
    with mounted("app", str(zone.tmp / "mp-a"), zone.host("a", srv)) as a, \
            mounted("app", str(zone.tmp / "mp-b"), zone.host("b", srv)) as b:
        zone.reset_links()
        wrong = in_parallel(lambda: read_files(a.path, files, names), lambda: read_files(b.path, files, names))
        stats = [chain_stats(m.path) for m in (a, b)]
    assert wrong == [0, 0]
    for s in stats:
        assert s["direct_reads"] == 0 and s["tiers"]["blob"]["requests"] == 0, s
        assert s["tiers"]["az"]["errors"] == 0
    assert zone.host_link.stats().gets == 0
    assert srv.metric("heartbeats_total") > 0, "the server said it was busy while the store was slow"


def test_a_killed_server_sends_hosts_to_the_store_within_their_budget(zone: Zone) -> None:
    srv = zone.start_server()
    files = zone.images["app"]
    names = sorted(files)
    burst_reads, per_s = 2, 1.0
    # No prefetch: what is left to read when the server dies must come from the store.
    opts: dict[str, Any] = {"store_budget": f"{burst_reads},{per_s:g}", "prefetch": False}
    with mounted("app", str(zone.tmp / "mp-a"), zone.host("a", srv, **opts)) as a, \
            mounted("app", str(zone.tmp / "mp-b"), zone.host("b", srv, **opts)) as b:
        half = len(names) // 4
        assert in_parallel(lambda: read_files(a.path, files, names[:half]),
                           lambda: read_files(b.path, files, names[:half])) == [0, 0]
        t0 = time.monotonic()
        srv.kill()
        wrong = in_parallel(lambda: read_files(a.path, files), lambda: read_files(b.path, files))
        elapsed = time.monotonic() - t0
        stats = [chain_stats(m.path) for m in (a, b)]
    assert wrong == [0, 0], "every byte right, from the store once the server was gone"
    for s in stats:
        assert s["direct_reads"] > 0, "with the server gone, the host read the store itself"
        assert s["direct_reads"] <= burst_reads + per_s * elapsed + 1, (s["direct_reads"], elapsed)
        assert s["direct_reads"] == s["tiers"]["blob"]["requests"] - s["retries"]
    assert any(s["direct_waits"] > 0 for s in stats), "the budget held some reads back"


def test_demand_reads_overtake_another_hosts_saturating_prefetch(zone: Zone) -> None:
    srv = zone.start_server("--store-concurrency", "2")  # background reads: at most 1 at a time
    zone.server_link.delay(300)
    big, app = zone.images["big"], zone.images["app"]
    waiting = 'imagefs_cache_server_blob_fetches_waiting{class="background"}'
    with mounted("big", str(zone.tmp / "mp-a"), zone.host("a", srv)) as a:
        assert read_files(a.path, big, sorted(big)[:1]) == 0  # a read-through: A's prefetch starts
        deadline = time.monotonic() + 60
        while srv.metrics().get(waiting, 0) < 2:
            assert time.monotonic() < deadline, "A's prefetch never queued at the server"
            time.sleep(0.05)
        with mounted("app", str(zone.tmp / "mp-b"), zone.host("b", srv, prefetch=False)) as b:
            names = sorted(app)[:4]
            assert read_files(b.path, app, names) == 0
            queued_after = srv.metrics()[waiting]
            b_stats = chain_stats(b.path)
        a_prefetch = query_stats(a.path)["prefetch"]
    # B's reads went through the zone (read through for it: demand slots) and finished
    # while A's background reads were still queued behind the server's background share.
    assert queued_after >= 1, "B finished only after A's queued background reads had drained"
    assert a_prefetch["state"] == "running"
    assert b_stats["direct_reads"] == 0 and b_stats["tiers"]["az"]["hits"] >= len(names)
