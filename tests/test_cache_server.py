"""The AZ cache server as a real process: wire format, single flight, restart, eviction,
auth, metrics, many connections, graceful shutdown.

Every server here is ``python -m imagefs.cli cache-server`` on 127.0.0.1 with a real
store (a local directory, or SeaweedFS behind a counting fault proxy) and a real disk
cache; tests talk to it over real sockets with the stdlib HTTP client.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from cache.chunk import ChunkRef, compress, digest_of
from cache.localstore import LocalStore
from cache.server_wire import (BATCH_PATH, MAX_BATCH_REFS, ST_CORRUPT, ST_NOT_FOUND, ST_OK, ST_READ_THROUGH,
                               chunk_query, encode_refs, iter_frames)
from cache.ssd import SSDTier
from tests.support.cacheserver import (CacheServerProcess, cache_servers, parse_prometheus,  # noqa: F401
                                       start_cache_server)
from tests.support.chunks import random_chunks, write_pack
from tests.support.faultproxy import FaultProxy
from tests.support.seaweed import Seaweed

pytestmark = pytest.mark.timeout(90)


def batch(server: CacheServerProcess, refs: list[ChunkRef],
          conn: http.client.HTTPConnection | None = None) -> list[tuple[bytes, int, bytes]]:
    """POST a batch; the frames as (digest, status, bytes)."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {server.secret}"} if server.secret else {}
        c.request("POST", BATCH_PATH, body=encode_refs(refs), headers=headers)
        resp = c.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body[:200])
        return [(d, st, bytes(v)) for d, st, v in iter_frames(body)]
    finally:
        if own:
            c.close()


def local_pack(root: Path, n: int, size: int, seed: int = 1, *,
               compressible: bool = False) -> tuple[LocalStore, list[bytes], list[ChunkRef]]:
    """A pack of ``n`` chunks in a local store: (store, each chunk's frame as the pack
    stores it, which is what the server must send, refs)."""
    store = LocalStore(str(root / "store"))
    refs = write_pack(store, random_chunks(n, size, seed=seed, compressible=compressible))
    return store, [pack_slice(store, r) for r in refs], refs


def pack_slice(store: LocalStore, ref: ChunkRef) -> bytes:
    return store.get_range(ref.pack, ref.offset, ref.clen)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def cache_file_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in (directory / "chunks").rglob("*") if p.is_file())


def test_single_and_batch_requests_read_through_then_hit(tmp_path: Path,
                                                         cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 8, 40_000)
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)  # one keep-alive connection

    conn.request("GET", chunk_query(refs[0]))
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, stored[0])
    wait_for(lambda: srv.metric("cache_entries") == 1)  # the fill is written behind the response
    conn.request("GET", chunk_query(refs[0]))
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, stored[0])
    m = srv.metrics()
    assert m["imagefs_cache_server_misses_total"] == 1 and m["imagefs_cache_server_hits_total"] == 1
    assert m["imagefs_cache_server_sendfile_bytes_total"] == len(stored[0])  # the hit never entered Python

    # Five cold chunks back to back in the pack: one ranged read for all of them, which
    # also brings the two that follow (read-ahead, now that the pack's table is known:
    # the first read of a pack ran while it loaded, and brought its chunk alone).
    frames = batch(srv, refs[1:6], conn)
    # Each says it was read through from the blob store (the zone's cache was cold for it).
    assert [(d, st, b) for d, st, b in frames] == [(r.digest, ST_READ_THROUGH, c)
                                                   for r, c in zip(refs[1:6], stored[1:6])]
    assert srv.metric("blob_fetches_total") == 2
    assert srv.metric("read_ahead_total") == 2

    # Hits, a miss, a ref whose digest lies, a pack that does not exist, a duplicate: in order.
    liar = ChunkRef(digest_of(b"something else"), refs[6].pack, refs[6].offset, refs[6].clen, refs[6].ulen)
    ghost = ChunkRef(digest_of(b"ghost"), "packs/" + "0" * 64, 0, refs[7].clen, refs[7].ulen)
    asked = [refs[2], refs[7], liar, ghost, refs[2]]
    fetches = srv.metric("blob_fetches_total")
    frames = batch(srv, asked, conn)
    # The liar is not in the pack's table of contents (known by now): no read. The ghost's
    # pack is new to the server: one ranged GET (404, no bytes) alongside the look-up of
    # its table of contents, never more.
    assert [(d, st) for d, st, _ in frames] == [(refs[2].digest, ST_OK), (refs[7].digest, ST_OK),
                                               (liar.digest, ST_NOT_FOUND), (ghost.digest, ST_NOT_FOUND),
                                               (refs[2].digest, ST_OK)]
    assert frames[0][2] == frames[4][2] == stored[2] and frames[1][2] == stored[7]
    assert frames[2][2] == b"" and frames[3][2] == b""
    assert srv.metric("blob_fetches_total") == fetches + 1  # the ghost's one look

    conn.request("GET", chunk_query(liar))  # remembered: answered without a look at the store
    resp = conn.getresponse()
    assert resp.status == 404 and resp.read()
    m = srv.metrics()
    assert m["imagefs_cache_server_refused_refs_total"] == 2
    assert m["imagefs_cache_server_remembered_failures_total"] == 1
    assert m["imagefs_cache_server_failed_total"] == 3
    conn.close()


def test_bad_requests_are_refused_clearly(tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, _, refs = local_pack(tmp_path, 1, 1000)
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    assert srv.request("POST", BATCH_PATH, body=b"\x01" * 7)[0] == 400
    assert srv.request("GET", "/v2/chunk/zz?pack=packs/x&offset=0&clen=1&ulen=1")[0] == 400
    assert srv.request("GET", f"/v2/chunk/{refs[0].hex}?pack=../etc/passwd&offset=0&clen=1&ulen=1")[0] == 400
    assert srv.request("GET", f"/v2/chunk/{refs[0].hex}?pack=packs/x")[0] == 400
    assert srv.request("GET", BATCH_PATH)[0] == 405
    assert srv.request("GET", "/nowhere")[0] == 404
    too_many = encode_refs([refs[0]] * (MAX_BATCH_REFS + 1))
    assert srv.request("POST", BATCH_PATH, body=too_many)[0] == 413
    assert srv.metric("bad_requests_total") == 5
    assert srv.request("GET", "/health")[0] == 200  # still serving


@pytest.fixture(scope="module")
def s3_pack(seaweed: Seaweed) -> Iterator[tuple[Seaweed, str, list[bytes], list[ChunkRef]]]:
    prefix = f"cache-server-{uuid.uuid4().hex[:8]}"
    chunks = random_chunks(24, 64 * 1024, seed=7, compressible=False)
    refs = write_pack(seaweed.store(prefix), chunks)
    yield seaweed, prefix, [compress(c) for c in chunks], refs  # the frames, as write_pack stores them


def s3_env(seaweed: Seaweed) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1"}


def test_64_concurrent_requests_for_a_cold_chunk_make_one_blob_get(
        tmp_path: Path, cache_servers: list[CacheServerProcess],
        s3_pack: tuple[Seaweed, str, list[bytes], list[ChunkRef]]) -> None:
    seaweed, prefix, stored, refs = s3_pack
    with FaultProxy("127.0.0.1", seaweed.s3_port) as proxy:
        srv = start_cache_server(tmp_path, f"s3://{seaweed.bucket}/{prefix}", s3_endpoint=proxy.url,
                                 env=s3_env(seaweed))
        cache_servers.append(srv)
        proxy.reset_counters()
        proxy.delay(100)  # the blob GET takes a while: every request arrives during it
        barrier = threading.Barrier(64)
        results: list[bytes | None] = [None] * 64

        def one(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            conn.connect()
            barrier.wait(10)
            if i % 2:
                conn.request("GET", chunk_query(refs[0]))
                resp = conn.getresponse()
                results[i] = resp.read() if resp.status == 200 else None
            else:  # batch requests join the same flight
                conn.request("POST", BATCH_PATH, body=encode_refs([refs[0]]))
                (d, st, data), = iter_frames(conn.getresponse().read())
                results[i] = bytes(data) if st == ST_READ_THROUGH else None
            conn.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [stored[0]] * 64
        # Single flight: one ranged GET for 64 concurrent requests, and one GET of the
        # pack's table of contents (made at the same time, to check the ref).
        assert proxy.requests == 2
        m = srv.metrics()
        assert m["imagefs_cache_server_misses_total"] == 64
        assert m["imagefs_cache_server_joined_total"] == 63
        assert m["imagefs_cache_server_blob_fetches_total"] == 1
        assert m["imagefs_cache_server_toc_loads_total"] == 1

        # Misses of one batch that are contiguous in the pack: one ranged GET.
        proxy.delay(0)
        frames = batch(srv, refs[1:9])
        assert [b for _, _, b in frames] == stored[1:9]
        assert proxy.requests == 3


def test_sigterm_finishes_in_flight_requests_and_exits_0(
        tmp_path: Path, cache_servers: list[CacheServerProcess],
        s3_pack: tuple[Seaweed, str, list[bytes], list[ChunkRef]]) -> None:
    seaweed, prefix, stored, refs = s3_pack
    with FaultProxy("127.0.0.1", seaweed.s3_port) as proxy:
        srv = start_cache_server(tmp_path, f"s3://{seaweed.bucket}/{prefix}", s3_endpoint=proxy.url,
                                 env=s3_env(seaweed))
        cache_servers.append(srv)
        idle = socket.create_connection(("127.0.0.1", srv.port))  # an idle keep-alive client
        proxy.delay(400)  # the read-through of a cold chunk takes ~0.8 s
        got: list[int | bytes] = []

        def slow_request() -> None:
            status, body, _ = srv.request("GET", chunk_query(refs[20]))
            got.extend([status, body])

        t = threading.Thread(target=slow_request)
        t.start()
        deadline = time.monotonic() + 10
        while srv.metric("blob_fetches_in_flight") < 1:  # the request is being served
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        assert srv.terminate(timeout=15) == 0
        t.join(10)
        assert got == [200, stored[20]], "the in-flight request was finished, not cut"
        assert time.monotonic() - t0 < 8
        idle.settimeout(5)
        assert idle.recv(1) == b"", "idle keep-alive connections are closed at shutdown"
        idle.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=2)
        assert "draining" in srv.log_tail()


def test_restart_keeps_its_hits_and_never_serves_a_rotten_file(
        tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 8, 30_000)
    first = start_cache_server(tmp_path, store.root)
    cache_servers.append(first)
    assert [b for _, _, b in batch(first, refs)] == stored
    assert first.terminate() == 0

    # Rot one cached file, and take the pack away: a restarted server can only answer
    # from its disk, and must not pass the rotten copy on.
    rotten = first.directory / "chunks" / refs[3].hex[:2] / refs[3].hex
    raw = bytearray(rotten.read_bytes())
    raw[100] ^= 0x55
    rotten.write_bytes(bytes(raw))
    os.unlink(os.path.join(store.root, refs[0].pack))

    second = start_cache_server(tmp_path, store.root)
    cache_servers.append(second)
    frames = batch(second, refs)
    for i, ((d, st, data), r, c) in enumerate(zip(frames, refs, stored)):
        assert d == r.digest
        assert (st, data) == ((ST_NOT_FOUND, b"") if i == 3 else (ST_OK, c))
    m = second.metrics()
    assert m["imagefs_cache_server_blob_fetches_total"] == 1  # only for the rotten one (and it failed)
    assert m["imagefs_cache_server_hits_total"] == 7
    assert m["imagefs_cache_server_misses_total"] == 1
    assert m["imagefs_cache_server_corrupt_total"] == 1
    assert not rotten.exists()


def test_eviction_keeps_the_disk_cache_under_max_size(tmp_path: Path,
                                                      cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 40, 100_000)
    srv = start_cache_server(tmp_path, store.root, max_size="1M")
    cache_servers.append(srv)
    for i in range(0, 40, 4):
        assert [b for _, _, b in batch(srv, refs[i:i + 4])] == stored[i:i + 4]
        # Fills are written behind the response, and a fill installs then evicts in one
        # transaction: the bound holds once each fill has landed.
        wait_for(lambda: srv.metric("misses_total") + srv.metric("read_ahead_total")
                 == srv.metric("cache_entries") + srv.metric("evictions_total"))
        assert cache_file_bytes(srv.directory) <= 1 << 20
    m = srv.metrics()
    assert m["imagefs_cache_server_evictions_total"] >= 30
    assert m["imagefs_cache_server_cache_bytes"] <= 1 << 20
    # Evicted chunks are read through again, not lost.
    assert [b for _, _, b in batch(srv, refs[:4])] == stored[:4]
    wait_for(lambda: srv.metric("misses_total") + srv.metric("read_ahead_total")
             == srv.metric("cache_entries") + srv.metric("evictions_total"))
    assert cache_file_bytes(srv.directory) <= 1 << 20


def test_shared_secret(tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 2, 1000)
    srv = start_cache_server(tmp_path, store.root, secret="correct horse")
    cache_servers.append(srv)
    body = encode_refs(refs)
    wrong = {"Authorization": "Bearer battery staple"}
    assert srv.request("POST", BATCH_PATH, body=body, auth=False)[0] == 401
    assert srv.request("POST", BATCH_PATH, body=body, headers=wrong)[0] == 401
    assert srv.request("POST", BATCH_PATH, body=body, headers={"Authorization": "Basic Y29ycmVjdA=="})[0] == 401
    assert srv.request("GET", chunk_query(refs[0]), auth=False)[0] == 401
    assert srv.request("GET", "/metrics", auth=False)[0] == 401
    assert srv.request("GET", "/health", auth=False)[0] == 200  # a load balancer needs no secret
    assert srv.request("GET", "/health", headers=wrong)[0] == 401  # but a wrong one is refused
    status, data, _ = srv.request("POST", BATCH_PATH, body=body)
    assert status == 200 and [bytes(b) for _, _, b in iter_frames(data)] == stored
    assert srv.metric("unauthorized_total") == 6


def test_metrics_are_prometheus_text(tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 4, 5000)
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    for _ in range(3):
        batch(srv, refs)
    status, body, headers = srv.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_prometheus(body.decode())
    p = "imagefs_cache_server_"
    for name in ("hits_total", "misses_total", "served_bytes_total", "in_flight_requests", "evictions_total",
                 "blob_errors_total", "corrupt_total", "open_connections"):
        assert p + name in m
    assert m[p + "hits_total"] == 8 and m[p + "misses_total"] == 4
    assert m[p + "served_bytes_total"] == 3 * sum(map(len, stored))
    buckets = sorted(((float(k.split('"')[1]), v) for k, v in m.items()
                      if k.startswith(p + "request_duration_seconds_bucket") and "+Inf" not in k))
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "histogram buckets are cumulative"
    assert m[p + 'request_duration_seconds_bucket{le="+Inf"}'] == m[p + "request_duration_seconds_count"] == 3
    assert 0 < m[p + "request_duration_seconds_sum"] < 10
    assert "# TYPE imagefs_cache_server_request_duration_seconds histogram" in body.decode()


def test_holds_hundreds_of_connections(tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 1, 20_000)
    srv = start_cache_server(tmp_path, store.root, extra=["--max-client-connections", "1000"])  # all from 127.0.0.1
    cache_servers.append(srv)
    batch(srv, refs)  # warm
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=20) for _ in range(300)]
    try:
        request = (f"GET {chunk_query(refs[0])} HTTP/1.1\r\nHost: x\r\n\r\n").encode()
        for s in socks:
            s.sendall(request)
        for s in socks:
            s.settimeout(20)
            resp = http.client.HTTPResponse(s)
            resp.begin()
            assert resp.status == 200 and resp.read() == stored[0]
        assert srv.metric("open_connections") >= 300
    finally:
        for s in socks:
            s.close()


def test_command_line_errors_and_secret_from_the_environment(tmp_path: Path,
                                                             cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 1, 1000)
    # (Through main(), as the installed ``imagefs`` script runs it: under ``python -m
    # imagefs.cli`` the CLI module is imported twice and its CLIError is not caught.)
    entry = "import sys; from imagefs.cli import main; sys.exit(main())"
    base = [sys.executable, "-c", entry, "cache-server", "--store", store.root, "--dir", str(tmp_path / "c")]
    env = {k: v for k, v in os.environ.items() if k != "IMAGEFS_CACHE_SECRET"}
    for extra, message in ((["--listen", "nowhere", "--max-size", "1G"], "--listen 'nowhere': expected HOST:PORT"),
                           (["--listen", "127.0.0.1:0", "--max-size", "10X"], "--max-size: invalid size '10X'"),
                           (["--listen", "127.0.0.1:0", "--max-size", "1G", "--secret-file", str(tmp_path / "no")],
                            "--secret-file")):
        res = subprocess.run(base + extra, capture_output=True, text=True, timeout=30, env=env)
        assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    host_cache = tmp_path / "host-cache"
    SSDTier(str(host_cache), 1 << 20).close()  # a host's SSD tier: uncompressed chunks
    res = subprocess.run([sys.executable, "-c", entry, "cache-server", "--store", store.root, "--dir", str(host_cache),
                          "--listen", "127.0.0.1:0", "--max-size", "1G"], capture_output=True, text=True, timeout=30,
                         env=env)
    assert res.returncode == 1 and "holds uncompressed chunks (a host's SSD tier)" in res.stderr, res.stderr
    srv = start_cache_server(tmp_path, store.root, env={"IMAGEFS_CACHE_SECRET": "from-env"})
    cache_servers.append(srv)
    assert srv.request("GET", chunk_query(refs[0]))[0] == 401
    assert srv.request("GET", chunk_query(refs[0]), headers={"Authorization": "Bearer from-env"})[:2] == (200, stored[0])
