"""``imagefs cache-server``: run the AZ cache tier (see :mod:`cache.server` for why and how).

Parses the command line (listen address, store, disk-cache directory and bound,
shared secret), opens the store and the disk cache, and runs the server until
SIGTERM/SIGINT. When it is ready it prints one line to stdout,
``imagefs cache-server: listening on http://HOST:PORT``, so a supervisor (or a test)
that asked for port 0 learns the port it got.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from imagefs.cli import CLIError, add_store_options, parse_size

SECRET_ENV = "IMAGEFS_CACHE_SECRET"

log = logging.getLogger("imagefs.cache_server")


def read_secret(path: str | None) -> bytes | None:
    """The shared secret from ``--secret-file`` (trailing newline ignored), else from
    ``$IMAGEFS_CACHE_SECRET``; None if neither is set."""
    if path:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise CLIError(f"--secret-file {path}: {e.strerror}") from None
        secret = raw.strip()
        if not secret:
            raise CLIError(f"--secret-file {path}: the file is empty")
        return secret
    env = os.environ.get(SECRET_ENV)
    if env is not None:
        if not env.strip():
            raise CLIError(f"${SECRET_ENV} is set but empty")
        return env.strip().encode()
    return None


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "cache-server",
        help="serve chunks to the hosts of a zone from a bounded disk cache (the AZ tier)",
        description="Serve verified chunks over HTTP/1.1 to imagefs mounts (--az-cache), from a "
        "bounded, LRU-evicted disk cache that survives restarts, reading through to the store on "
        "a miss. GET /health, GET /metrics (Prometheus). SIGTERM drains and exits.",
    )
    p.add_argument("--listen", metavar="HOST:PORT", required=True,
                   help="address to listen on (port 0: any free port, printed at start)")
    add_store_options(p)
    p.add_argument("--dir", metavar="DIR", required=True, help="disk-cache directory")
    p.add_argument("--max-size", metavar="SIZE", required=True, help="disk-cache bound, e.g. 512M or 10G (chunks are kept compressed, as the packs store them)")
    p.add_argument("--secret-file", metavar="FILE",
                   help=f"require 'Authorization: Bearer <secret>' (default: ${SECRET_ENV} if set); "
                   "needed to listen on an address other than loopback, unless --insecure")
    p.add_argument("--insecure", action="store_true",
                   help="listen on a non-loopback address without a secret: anyone who can reach the "
                   "port can read cached chunks and make the server read from the store")
    p.add_argument("--store-concurrency", type=int, default=16, metavar="N",
                   help="ranged reads from the store at once, for all clients (default 16); background "
                   "requests (prefetch, profile replay) may hold at most three quarters of them, so demand "
                   "reads never wait for a background read")
    p.add_argument("--max-connections", type=int, default=4096, metavar="N",
                   help="connections at once, all clients (default 4096); past three quarters of it, idle "
                   "keep-alive connections are closed after 2 s instead of 120 s")
    p.add_argument("--max-client-connections", type=int, default=256, metavar="N",
                   help="connections one client address may hold at once (default 256)")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="how long requests in progress may finish at shutdown (default 10)")
    p.set_defaults(func=cmd_cache_server)


def cmd_cache_server(args: argparse.Namespace) -> int:
    from cache.server_wire import format_address, parse_address

    try:
        host, port = parse_address(args.listen)
    except ValueError as e:
        raise CLIError(f"--listen {e}") from None
    try:
        max_bytes = parse_size(args.max_size)
    except ValueError as e:
        raise CLIError(f"--max-size: {e}") from None
    if max_bytes <= 0:
        raise CLIError(f"--max-size {args.max_size!r}: must be more than 0")
    if args.grace < 0:
        raise CLIError("--grace must be >= 0")
    if args.store_concurrency < 1:
        raise CLIError("--store-concurrency must be >= 1")
    if args.max_client_connections < 1 or args.max_connections < 1:
        raise CLIError("--max-connections and --max-client-connections must be >= 1")
    secret = read_secret(args.secret_file)

    import trio

    from cache.server import CacheServer, ServerOptions, is_loopback, raise_fd_limit, run_server

    if secret is None and not args.insecure and not is_loopback(host):
        raise CLIError(f"--listen {args.listen}: a server reachable from other machines needs a shared secret "
                       f"(--secret-file FILE or ${SECRET_ENV}); pass --insecure to run it open")
    from cache.ssd import FormMismatch, SSDTier
    from cache.stores import open_store

    store = open_store(args.store, s3_endpoint=args.s3_endpoint)
    store.check()  # a wrong store is a startup error, not a stream of 503s
    try:
        ssd = SSDTier(args.dir, max_bytes, fsync=False, frames=True)  # see cache.server: files are re-verified
    except FormMismatch as e:
        raise CLIError(f"--dir: {e}") from None
    except OSError as e:
        raise CLIError(f"--dir {args.dir}: {e.strerror or e}") from None
    raise_fd_limit()
    n = args.store_concurrency
    server = CacheServer(store, ssd, ServerOptions(secret=secret, grace=args.grace, blob_concurrency=n,
                                                   blob_background=max(1, n * 3 // 4),
                                                   max_connections=args.max_connections,
                                                   max_client_connections=args.max_client_connections))

    def ready(h: str, p: int) -> None:
        print(f"imagefs cache-server: listening on http://{format_address(h, p)}", flush=True)
        log.info("store %s, cache %s (max %d bytes), %d store reads at once%s", store.url, ssd.directory,
                 max_bytes, n, ", secret required" if secret else "")
        if secret is None and not is_loopback(h):
            log.warning("listening on %s without a secret (--insecure)", format_address(h, p))

    try:
        trio.run(functools.partial(run_server, server, host, port, on_ready=ready))
    except OSError as e:
        raise CLIError(f"--listen {args.listen}: {e.strerror or e}") from None
    finally:
        ssd.close()
    print("imagefs cache-server: stopped", file=sys.stderr, flush=True)
    return 0
