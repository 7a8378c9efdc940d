"""The AZ cache server under abuse, as a real process (the audit's reproductions, rerun):

- unauthenticated bodies are never held in memory (credentials before the body);
- idle connections cannot starve real requests near the connection limit;
- one client address cannot hold more than its share of connections;
- made-up refs cost the store nothing (tables of contents, pack sizes) and failures are
  remembered, so asking again costs nothing either;
- a cache file damaged in place (same inode, size and mtime) is not served;
- the CLI refuses to listen beyond loopback without a secret unless told ``--insecure``.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cache.chunk import ChunkRef, digest_of
from cache.localstore import LocalStore
from cache.server_wire import BATCH_PATH, ST_CORRUPT, ST_NOT_FOUND, ST_OK, ST_READ_THROUGH, encode_refs
from tests.support.cacheserver import CacheServerProcess, cache_servers, start_cache_server  # noqa: F401
from tests.support.chunks import random_chunks, write_pack
from tests.test_cache_server import batch, local_pack, pack_slice, wait_for

pytestmark = pytest.mark.timeout(120)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_unauthenticated_bodies_are_skipped_not_held(tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, _, refs = local_pack(tmp_path, 1, 1000)
    srv = start_cache_server(tmp_path, store.root, secret="s3cret", extra=["--max-client-connections", "1000"])
    cache_servers.append(srv)
    before = rss_kib(srv.pid)
    # 200 clients declare a 1 MiB body, send half of it and hold on (what raised the
    # server's RSS by ~1 GB when bodies were read before credentials were checked).
    head = (f"POST {BATCH_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 20}\r\n\r\n").encode()
    half = b"\0" * (512 << 10)
    socks = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
            s.sendall(head + half)
            socks.append(s)
        answers = []
        for s in socks:
            resp = http.client.HTTPResponse(s)
            resp.begin()
            answers.append(resp.status)
            resp.read()
        assert answers == [401] * 200, "refused at once, on the head"
        grown_mib = (rss_kib(srv.pid) - before) / 1024
        assert grown_mib < 32, f"the server held {grown_mib:.0f} MiB of bodies it will never serve"
    finally:
        for s in socks:
            s.close()
    # A client that sends its whole (unauthenticated) body keeps a usable connection.
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("POST", BATCH_PATH, body=encode_refs(refs))
    r = conn.getresponse()
    assert (r.status, r.read()[:7]) == (401, b"missing")
    conn.request("POST", BATCH_PATH, body=encode_refs(refs), headers={"Authorization": "Bearer s3cret"})
    assert conn.getresponse().status == 200
    conn.close()
    assert srv.metric("unauthorized_total") == 201


def test_idle_connections_near_the_limit_are_closed_for_real_requests(
        tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 1, 1000)
    srv = start_cache_server(tmp_path, store.root,
                             extra=["--max-connections", "64", "--max-client-connections", "1000"])
    cache_servers.append(srv)
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=20) for _ in range(80)]  # all slots, and more
    try:
        # A real client: its connection waits in the backlog until idle ones are closed
        # (after 2 s near the limit, not the usual 120 s).
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", BATCH_PATH, body=encode_refs(refs))
        r = conn.getresponse()
        assert r.status == 200 and r.read().endswith(stored[0])
        conn.close()
    finally:
        for s in idle:
            s.close()
    assert srv.metric("idle_closed_total") >= 1


def test_one_client_address_holds_at_most_its_share(tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, _, _ = local_pack(tmp_path, 1, 1000)
    srv = start_cache_server(tmp_path, store.root, extra=["--max-client-connections", "4"])
    cache_servers.append(srv)
    held: list[socket.socket] = []

    def hold_one() -> bool:
        """Open a connection that the server answers (one closed moments ago, such as the
        start-up health probe's, may still count until the server has seen it go)."""
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = http.client.HTTPResponse(s)
            resp.begin()
            assert resp.status == 200
            resp.read()
        except (ConnectionError, http.client.HTTPException):
            s.close()
            return False
        held.append(s)
        return True

    try:
        for _ in range(4):  # each is accepted and answers
            wait_for(hold_one)
        extra = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert extra.recv(100) == b"", "the fifth connection is closed unanswered"
            except ConnectionResetError:
                pass
        finally:
            extra.close()
    finally:
        for s in held:
            s.close()
    def answers() -> bool:
        try:
            return srv.request("GET", "/health")[0] == 200
        except (ConnectionError, http.client.HTTPException):  # the server has not seen the closes yet
            return False

    wait_for(answers)  # the others are free again
    assert srv.metric("refused_connections_total") >= 1


def test_made_up_refs_cost_the_store_nothing_and_failures_are_remembered(
        tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 4, 50_000)  # with a table of contents
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    assert [st for _, st, _ in batch(srv, refs[:1])] == [ST_READ_THROUGH]  # the pack is known now
    fetches = srv.metric("blob_fetches_total")
    pack = refs[0].pack
    made_up = [ChunkRef(digest_of(i.to_bytes(4, "big")), pack, (i * 4096) % 150_000, 256 << 10, 256 << 10)
               for i in range(1024)]
    huge = [ChunkRef(digest_of(b"huge%d" % i), pack, 0, 64 << 20, 64 << 20) for i in range(4)]
    for _ in range(2):
        frames = batch(srv, made_up) + batch(srv, huge)
        assert {st for _, st, _ in frames} == {ST_NOT_FOUND}
    m = srv.metrics()
    assert m["imagefs_cache_server_blob_fetches_total"] == fetches, "not one read for 2,056 made-up refs"
    assert m["imagefs_cache_server_refused_refs_total"] == 1028
    assert m["imagefs_cache_server_remembered_failures_total"] == 1028, "the second time from memory"
    assert m["imagefs_cache_server_toc_loads_total"] == 1

    # A store without tables of contents: ranges are checked against the pack's size; a
    # range inside it that is not the chunk it claims is read once, then remembered.
    bare = LocalStore(str(tmp_path / "bare"))
    chunks = random_chunks(3, 40_000, seed=4, compressible=False)
    brefs = write_pack(bare, chunks, toc=False)
    srv2 = start_cache_server(tmp_path / "s2", bare.root)
    cache_servers.append(srv2)
    outside = ChunkRef(digest_of(b"x"), brefs[0].pack, 0, 64 << 20, 64 << 20)
    liar = ChunkRef(digest_of(b"y"), brefs[1].pack, brefs[1].offset, brefs[1].clen, brefs[1].ulen)
    for i in range(3):
        frames = batch(srv2, [outside, liar, brefs[2]])
        assert [st for _, st, _ in frames] == [ST_NOT_FOUND, ST_CORRUPT, ST_READ_THROUGH if i == 0 else ST_OK]
        assert frames[2][2] == pack_slice(bare, brefs[2])
    m = srv2.metrics()
    # The first batch: one read of the liar and brefs[2] (back to back in the pack)
    # while the pack's size was looked up, and, the liar failing, one of brefs[2] alone;
    # the 64 MiB ref was never read; after that, nothing for either bad ref.
    assert m["imagefs_cache_server_blob_fetches_total"] == 2
    assert m["imagefs_cache_server_remembered_failures_total"] == 4


def test_a_cache_file_damaged_in_place_is_not_served(tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store, stored, refs = local_pack(tmp_path, 2, 30_000)
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    assert [b for _, _, b in batch(srv, refs)] == stored
    wait_for(lambda: srv.metric("cache_entries") == 2)
    assert [st for _, st, _ in batch(srv, refs)] == [ST_OK, ST_OK]  # verified: sent as files from now on
    path = next(p for p in (srv.directory / "chunks").rglob("*") if p.is_file() and p.name == refs[0].hex)
    st = os.stat(path)
    with open(path, "r+b") as f:  # damage in place: same inode, same size...
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the mtime put back
    st2 = os.stat(path)
    assert (st2.st_ino, st2.st_size, st2.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    frames = batch(srv, refs)
    assert [b for _, _, b in frames] == stored, "the damaged copy was checked, dropped and read again"
    assert frames[0][1] == ST_READ_THROUGH
    assert srv.metric("corrupt_total") >= 1


def test_listening_beyond_loopback_needs_a_secret_or_insecure(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "store"))
    entry = "import sys; from imagefs.cli import main; sys.exit(main())"
    env = {k: v for k, v in os.environ.items() if k != "IMAGEFS_CACHE_SECRET"}
    base = [sys.executable, "-c", entry, "cache-server", "--store", store.root, "--max-size", "1G",
            "--listen", "0.0.0.0:0"]
    res = subprocess.run([*base, "--dir", str(tmp_path / "c1")], capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 1 and "needs a shared secret" in res.stderr and "--insecure" in res.stderr, res.stderr
    proc = subprocess.Popen([*base, "--dir", str(tmp_path / "c2"), "--insecure"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "listening on http://0.0.0.0:" in line
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "without a secret (--insecure)" in err
