"""``imagefs mount``, ``imagefs umount`` and ``imagefs stats``.

The options that say where chunks come from and how much may be cached are shared
with ``imagefs run`` through :func:`add_mount_options` and
:func:`mount_options_from_args`, so both commands accept and mean the same flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from imagefs.cli import INFO, WARNING, CLIError, add_store_options, configure_logging, size_arg

# typing costs ~3 ms to import and is needed only by type checkers here (mypy reads this as typing.TYPE_CHECKING)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from imagefs.mount import MountOptions

def add_mount_options(p: argparse.ArgumentParser) -> None:
    """Store and cache options for any command that mounts an image."""
    from imagefs.mount import default_cache_dir

    add_store_options(p)
    g = p.add_argument_group("cache")
    g.add_argument("--cache-dir", metavar="DIR",
                   help=f"local SSD chunk cache, shared by mounts (default: {default_cache_dir()})")
    g.add_argument("--cache-size", metavar="SIZE", type=size_arg, default=None,
                   help="bound of the SSD cache, e.g. 10G or 512M; 0 disables it (default: 10G)")
    g.add_argument("--memory-size", metavar="SIZE", type=size_arg, default=None,
                   help="bound of the in-memory chunk cache of one mount (default: 512M)")
    g.add_argument("--read-ahead", metavar="KB", type=int, default=None,
                   help="the kernel's readahead window for the mount, in KiB (also the window read around a "
                   "page fault in a mapped file; default: 512 for EROFS mounts, see imagefs/erofs/session.py; "
                   "32768 for plain ones, see imagefs/readahead.py)")
    g.add_argument("--read-timeout", metavar="SECONDS", type=float, default=None,
                   help="the most a read waits for file data, every tier and retry included, before it fails "
                   "with EIO (the mount's log names the file and chunk); a stalled store costs a reader this "
                   "long (default: 30)")
    g.add_argument("--az-cache", metavar="HOST:PORT", action="append", default=[],
                   help="a cache server in this zone (repeatable)")
    g.add_argument("--store-budget", metavar="N[,RATE]", type=_budget_arg, default=None,
                   help="with --az-cache: blob-store reads this host may make itself when the zone's "
                   "servers are down or lack a chunk: a burst of N, then RATE a second (default 64,16); "
                   "background reads leave half the burst to reads a process waits for")
    g.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="do not fetch the rest of the image in the background; by default the image's chunks "
                   "are brought to the SSD cache in layout order, after what readers ask for (with a startup "
                   "profile: only once the workload is quiet, one read at a time; with --az-cache: only once "
                   "a read has had to go past the zone's cache to the store)")
    g.add_argument("--prefetch-rate", metavar="SIZE", type=size_arg, default=None,
                   help="after a startup profile, fetch the rest of the image at most this fast, per second "
                   "(e.g. 64M; 0: no bound; default: 64M)")
    g = p.add_argument_group("startup profiles")
    g.add_argument("--no-replay", dest="replay", action="store_false",
                   help="do not stream the image's startup profile at mount (by default, when the image has "
                   "one, the chunks its workload read first are streamed in that order as the mount starts)")
    g.add_argument("--record", action="store_true",
                   help="record what this mount's readers read first and save it as (part of) the image's "
                   "startup profile in the store, so that later cold starts stream it")
    g.add_argument("--record-quiet", metavar="SECONDS", type=float, default=10.0,
                   help="stop recording once nothing new has been read for this long (default: 10)")
    g.add_argument("--record-max", metavar="SECONDS", type=float, default=300.0,
                   help="stop recording this long after the mount at the latest (default: 300)")
    g.add_argument("--record-replace", dest="record_merge", action="store_false",
                   help="replace the image's profile with this recording (default: merge into it)")
    g = p.add_argument_group("serving")
    g.add_argument("--fs", choices=("auto", "erofs", "fuse"), default="auto",
                   help="how the tree is served: 'erofs' = the kernel's EROFS answers lookups, stats and "
                   "listings from metadata imagefs writes, and file data comes through FUSE once per page; "
                   "'fuse' = every request through FUSE; 'auto' = erofs where this kernel can (Linux >= 6.12 "
                   "with file-backed EROFS), else fuse, saying why in the mount's log (default: auto)")


def _budget_arg(text: str) -> str:
    from cache.storebudget import parse_budget

    try:
        parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def mount_options_from_args(args: argparse.Namespace) -> "MountOptions":
    from imagefs.mount import MountOptions

    opts = MountOptions(store=args.store, s3_endpoint=args.s3_endpoint, cache_dir=args.cache_dir,
                        az_cache=list(args.az_cache or []), prefetch=args.prefetch, replay=args.replay,
                        record=args.record, record_quiet_s=args.record_quiet, record_max_s=args.record_max,
                        record_merge=args.record_merge, read_ahead_kb=args.read_ahead, fs=args.fs,
                        store_budget=getattr(args, "store_budget", None))
    if opts.record_quiet_s <= 0 or opts.record_max_s <= 0:
        from imagefs.cli import CLIError

        raise CLIError("--record-quiet and --record-max must be positive numbers of seconds", code=2)
    if args.read_ahead is not None and args.read_ahead < 0:
        from imagefs.cli import CLIError

        raise CLIError("--read-ahead must be a number of KiB, 0 or more", code=2)
    if args.prefetch_rate is not None:
        opts.prefetch_rate = args.prefetch_rate
    if args.read_timeout is not None:
        if not args.read_timeout > 0:
            from imagefs.cli import CLIError

            raise CLIError("--read-timeout must be a positive number of seconds", code=2)
        opts.read_timeout = args.read_timeout
    if args.cache_size is not None:
        opts.cache_size = args.cache_size
    if args.memory_size is not None:
        opts.memory_size = args.memory_size
    return opts


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "mount",
        help="mount an indexed image read-only, fetching file data lazily",
        description="Mount IMAGE (a name or blake3:<hex> digest in the store) at MOUNTPOINT. Only the "
        "index is fetched before the mount answers; file data is fetched chunk by chunk on first "
        "read. Returns once the mount answers, leaving a daemon serving it (see 'imagefs umount').",
    )
    p.add_argument("image", metavar="IMAGE", help="image name or blake3:<hex> digest")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="serve in this process until unmounted or interrupted")
    add_mount_options(p)
    p.set_defaults(func=cmd_mount, defer_logging=True)

    p = sub.add_parser("umount", aliases=["unmount"], help="unmount an imagefs mount",
                       description="Unmount MOUNTPOINT (lazily if it is busy) and wait for its daemon to exit.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("stats", help="per-tier cache counters of a running mount",
                       description="Ask the daemon serving MOUNTPOINT for its request and cache counters.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the raw counters as JSON")
    p.set_defaults(func=cmd_stats)


def cmd_mount(args: argparse.Namespace) -> int:
    from imagefs.mount import MountError, start_mount

    opts = mount_options_from_args(args)
    if args.foreground or args.log_level < WARNING:
        configure_logging(args.log_level)
    try:
        if args.foreground:
            from imagefs.daemon import serve

            serve(args.image, args.mountpoint, opts)
            return 0
        # The daemon logs at INFO at least (its log file is what is left to read
        # when a mount misbehaves); this process logs nothing on the agent path.
        pid = start_mount(args.image, args.mountpoint, opts, log_level=min(args.log_level, INFO))
    except MountError as e:
        raise CLIError(str(e)) from e
    if not args.quiet:
        print(f"imagefs: mounted {args.image} at {args.mountpoint} (daemon pid {pid})", file=sys.stderr)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from imagefs.mount import MountError, unmount

    try:
        unmount(args.mountpoint)
    except MountError as e:
        raise CLIError(str(e)) from e
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from imagefs.mount import MountError, query_stats

    try:
        stats = query_stats(args.mountpoint)
    except MountError as e:
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(format_stats(stats))
    return 0


def format_stats(stats: dict[str, Any]) -> str:
    """A short human summary of a daemon's stats."""
    lines = [f"{stats['mountpoint']}: {stats['image']} ({stats['digest']}), pid {stats['pid']}, "
             f"up {stats['uptime_s']:.0f}s"]
    if stats.get("restarts"):
        last = (stats.get("crashes") or [{}])[-1]
        lines.append(f"server replaced {stats['restarts']} time(s) (now pid {stats.get('server_pid')}); "
                     f"the last one {last.get('how', 'died')} at "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last.get('time', 0)))}")
    fs = stats.get("fs") or {}
    if fs.get("mode") == "erofs":
        lines.append(f"served as EROFS: metadata {fs.get('metadata')} ({(fs.get('metadata_bytes') or 0) / (1 << 20):.1f} "
                     f"MiB), file data through the FUSE blob {fs.get('blob')}")
    req = stats.get("requests", {})
    ops = req.get("ops", {})
    what = "FUSE requests of the blob" if fs.get("mode") == "erofs" else "requests"
    lines.append(f"{what}: " + (", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "none"))
    errors = req.get("errors", {})
    if errors:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())))
    cache = stats.get("cache")
    if cache:
        lines.append(f"{'tier':<8} {'requests':>9} {'hits':>9} {'misses':>9} {'MiB':>10} {'errors':>7} {'held MiB':>9}")
        for name, t in cache.get("tiers", {}).items():
            lines.append(f"{name:<8} {t['requests']:>9} {t['hits']:>9} {t['misses']:>9} "
                         f"{t['bytes'] / (1 << 20):>10.1f} {t['errors']:>7} {t['stored_bytes'] / (1 << 20):>9.1f}")
        rest = {k: v for k, v in cache.items() if k != "tiers" and v}
        if rest:
            lines.append("chain: " + ", ".join(f"{k} {v}" for k, v in rest.items()))
    rp = stats.get("replay")
    if rp and rp.get("state") != "off":
        detail = ""
        if rp.get("planned"):
            detail = (f": {rp['planned']} chunks planned, {rp['fetched']} fetched, {rp['held']} already held, "
                      f"{rp['failed']} failed; served {rp['served']} first reads, missed {rp['missed']}; "
                      f"{rp['bytes'] / (1 << 20):.1f} MiB in {rp['requests']} requests")
        elif rp.get("reason"):
            detail = f": {rp['reason']}"
        lines.append(f"replay: {rp['state']}{detail}")
    pf = stats.get("prefetch")
    if pf:
        counts = ""
        if pf.get("planned"):
            counts = (f": {pf.get('fetched', 0)} of {pf.get('planned', 0)} planned chunks fetched, "
                      f"{pf.get('stored', 0)} stored on the SSD, {pf.get('failed', 0)} failed")
        lines.append(f"prefetch: {pf['state']}{counts}")
    rec = stats.get("record")
    if rec:
        lines.append(f"record: {rec['state']}, {rec['chunks']} chunks" + (f"; {rec['saved']}" if rec.get("saved") else ""))
    return "\n".join(lines)
