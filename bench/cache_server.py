"""Cache-server throughput and latency on loopback: 16 clients, 1 MiB chunks, warm server.

Why with a baseline: this machine is small and shared, so an absolute GB/s means
little on its own. Each run therefore also measures, in the same minute, the same
chunk files read straight from the server's disk cache by 16 clients (page cache,
no network, no HTTP): the ceiling the server's sendfile path is compared with.

Phases (each ``--seconds`` long, same chunks, same concurrency; in phases 1 and 2 each
client is a process of its own, so the figures are the server's and the disk's, not
the bench's GIL):

1. ``disk``   16 clients: open + read the cached chunk files (the baseline).
2. ``server`` 16 raw HTTP clients (blocking sockets, keep-alive), one
   ``GET /v2/chunk/...`` per request, body received into a reused buffer, not hashed:
   what the server can deliver.
3. ``client`` 16 trio tasks sharing one :class:`~cache.azclient.AZCacheTier` (batch
   endpoint, pooled connections, every chunk verified): what a mount gets.

The chunks are random bytes, so their zstd frames (what the server keeps and sends)
are as large as the chunks: every figure is in bytes on the wire, the worst case.
Real image chunks travel at under a third of their size (torch: 0.30x).

Targets (issue "AZ cache server"): >= 1 GB/s aggregate and p99 <= 10 ms in phase 2.
``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summary(name: str, latencies: list[float], nbytes: int, seconds: float) -> dict[str, Any]:
    return {"phase": name, "requests": len(latencies), "bytes": nbytes, "seconds": round(seconds, 3),
            "gb_per_s": nbytes / seconds / 1e9 if seconds else 0.0,
            "median_ms": statistics.median(latencies) * 1e3 if latencies else float("nan"),
            "p99_ms": _quantile(latencies, 0.99) * 1e3}


def _run_clients(n: int, seconds: float, work: Callable[[int, float, list[float]], int]) -> tuple[list[float], int, float]:
    """Run ``work(i, stop_at, latencies) -> bytes`` in ``n`` forked processes (one per
    client, so that no client waits for another's GIL); (latencies, bytes, wall)."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)
    results: Any = ctx.Queue()

    def body(i: int) -> None:
        lat: list[float] = []
        barrier.wait()
        t0 = time.perf_counter()
        nbytes = work(i, t0 + seconds, lat)
        results.put((lat, nbytes, time.perf_counter() - t0))

    procs = [ctx.Process(target=body, args=(i,), daemon=True) for i in range(n)]
    for pr in procs:
        pr.start()
    got = [results.get(timeout=seconds + 60) for _ in procs]
    for pr in procs:
        pr.join(10)
    return [x for lat, _, _ in got for x in lat], sum(b for _, b, _ in got), max(w for _, _, w in got)


def phase_disk(paths: list[str], clients: int, seconds: float, size: int) -> dict[str, Any]:
    def work(i: int, stop_at: float, lat: list[float]) -> int:
        buf = bytearray(size)
        done = 0
        k = i
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            with open(paths[k % len(paths)], "rb", buffering=0) as f:
                n = f.readinto(buf)
            lat.append(time.perf_counter() - t0)
            done += n or 0
            k += 1
        return done

    lats, nbytes, wall = _run_clients(clients, seconds, work)
    return _summary("disk", lats, nbytes, wall)


def phase_server(port: int, queries: list[str], clients: int, seconds: float, size: int) -> dict[str, Any]:
    def work(i: int, stop_at: float, lat: list[float]) -> int:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(size + 65536)
        view = memoryview(buf)
        done = 0
        k = i
        try:
            while time.perf_counter() < stop_at:
                req = f"GET {queries[k % len(queries)]} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
                k += 1
                t0 = time.perf_counter()
                s.sendall(req)
                have = 0
                while True:
                    n = s.recv_into(view[have:])
                    if not n:
                        raise ConnectionError("server closed the connection")
                    have += n
                    end = buf.find(b"\r\n\r\n", 0, have)
                    if end >= 0:
                        break
                head = bytes(buf[:end])
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"bench request failed: {head[:80]!r}")
                m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                assert m is not None
                body = int(m.group(1))
                need = end + 4 + body
                if need > len(buf):
                    raise RuntimeError("response larger than the chunk size")
                while have < need:
                    n = s.recv_into(view[have:need])
                    if not n:
                        raise ConnectionError("server closed the connection")
                    have += n
                lat.append(time.perf_counter() - t0)
                done += body
        finally:
            s.close()
        return done

    lats, nbytes, wall = _run_clients(clients, seconds, work)
    return _summary("server", lats, nbytes, wall)


def phase_client(address: str, refs: list[Any], clients: int, seconds: float) -> dict[str, Any]:
    import trio

    from cache.azclient import AZCacheTier

    tier = AZCacheTier([address], deadline=2.0)
    lats: list[float] = []
    total = [0]
    misses = [0]

    async def one(i: int, stop_at: float) -> None:
        k = i
        while time.perf_counter() < stop_at:
            r = refs[k % len(refs)]
            k += 1
            t0 = time.perf_counter()
            got = await tier.fetch([r])
            lats.append(time.perf_counter() - t0)
            if r.digest in got:
                total[0] += len(got[r.digest])
            else:
                misses[0] += 1

    async def main() -> float:
        await tier.fetch(refs[:clients])  # open the pool
        stop_at = time.perf_counter() + seconds
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(one, i, stop_at)
        wall = time.perf_counter() - t0
        await tier.aclose()
        return wall

    wall = trio.run(main)
    out = _summary("client", lats, total[0], wall)
    out["misses"] = misses[0]
    return out


def _start_server(workdir: Path, store: str, max_size: str) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(os.environ)
    env.pop("IMAGEFS_CACHE_SECRET", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "imagefs.cli", "cache-server", "--listen", "127.0.0.1:0",
                             "--store", store, "--dir", str(workdir / "cache"), "--max-size", max_size],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                            start_new_session=True)
    log.close()
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 20
    line = b""
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(0.1):
            b = proc.stdout.read1(1)  # type: ignore[attr-defined]
            if not b:
                break
            line += b
            m = re.search(rb"listening on http://127\.0\.0\.1:(\d+)\n", line)
            if m:
                sel.close()
                return proc, int(m.group(1))
    sel.close()
    _stop(proc)
    raise RuntimeError(f"cache server did not start; log: {workdir / 'server.log'}")


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench cache_server", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--chunks", type=int, default=64, help="distinct chunks cycled through (default 64)")
    p.add_argument("--chunk-size", type=int, default=1 << 20, help="bytes per chunk (default 1 MiB)")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each phase (default 6)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)

    from cache.chunk import ChunkRef, compress, digest_of
    from cache.localstore import LocalStore
    from cache.server_wire import chunk_query

    work = Path(tempfile.mkdtemp(prefix="bench-cache-server-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        store = LocalStore(str(work / "store"))
        chunks = [os.urandom(args.chunk_size) for _ in range(args.chunks)]
        parts = [compress(c) for c in chunks]
        pack = b"".join(parts)
        key = f"packs/{digest_of(pack).hex()}"
        store.put(key, pack)
        refs, off = [], 0
        for c, part in zip(chunks, parts):
            refs.append(ChunkRef(digest_of(c), key, off, len(part), len(c)))
            off += len(part)
        del chunks, parts, pack

        proc, port = _start_server(work, store.root, f"{max(2 * args.chunks * args.chunk_size, 1 << 30)}")
        print(f"cache server on 127.0.0.1:{port}; {args.chunks} chunks of {args.chunk_size} bytes, "
              f"{args.clients} clients, {args.seconds:g} s per phase", flush=True)
        # Warm: read through once, then once more so every file is verified and sent by sendfile.
        warm = phase_client(f"127.0.0.1:{port}", refs, 4, 0.0)
        for r in refs:
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"GET {chunk_query(r)} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            while s.recv(1 << 20):
                pass
            s.close()
        del warm
        paths = [str(work / "cache" / "chunks" / r.hex[:2] / r.hex) for r in refs]
        missing = [p_ for p_ in paths if not os.path.exists(p_)]
        if missing:
            raise RuntimeError(f"{len(missing)} chunks not in the server's disk cache after warming")

        results = [phase_disk(paths, args.clients, args.seconds, args.chunk_size)]
        results.append(phase_server(port, [chunk_query(r) for r in refs], args.clients, args.seconds,
                                    args.chunk_size))
        results.append(phase_client(f"127.0.0.1:{port}", refs, args.clients, args.seconds))
        base = results[0]["gb_per_s"]
        print(f"{'phase':<8} {'requests':>9} {'GB/s':>7} {'median ms':>10} {'p99 ms':>8} {'vs disk':>8}")
        for row in results:
            row["vs_disk"] = row["gb_per_s"] / base if base else float("nan")
            print(f"{row['phase']:<8} {row['requests']:>9} {row['gb_per_s']:>7.2f} {row['median_ms']:>10.2f} "
                  f"{row['p99_ms']:>8.2f} {row['vs_disk']:>7.0%}")
        srv = results[1]
        ok = srv["gb_per_s"] >= 1.0 and srv["p99_ms"] <= 10.0
        print(f"target (server phase: >= 1 GB/s, p99 <= 10 ms): {'met' if ok else 'NOT met'}")
        if args.json:
            doc = {"bench": "cache_server", "clients": args.clients, "chunks": args.chunks,
                   "chunk_size": args.chunk_size, "seconds": args.seconds, "cpus": os.cpu_count(),
                   "phases": results, "target_met": ok}
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        return 0
    finally:
        if proc is not None:
            _stop(proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
