"""``imagefs profile`` and ``imagefs optimize``: record a startup profile, lay it out.

``profile`` runs the container once, as ``imagefs run`` does but on a mount of its own
that records what is read first (:mod:`imagefs.recorder`); the daemon saves the
recording into the image's profile in the store as it ends (:mod:`indexer.profile`).
Recording ends when the command exits, or earlier when nothing new has been read for
``--record-quiet`` seconds or ``--record-max`` have passed: a server that never exits
is stopped then (SIGTERM, then SIGKILL), as ``ctr-remote image optimize`` does. Then,
unless ``--no-optimize``, the profile's chunks are copied into startup packs in access
order (:mod:`indexer.optimize`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

from imagefs.cli import CLIError, add_store_options
from imagefs.progress import human_bytes as human_size

STOP_GRACE_S = 10.0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from imagefs.cli_mount import add_mount_options

    p = sub.add_parser(
        "profile",
        help="record what a container reads first, so later cold starts stream it",
        description="Run CMD (default: the image's Entrypoint and Cmd) in a container on a fresh mount of "
        "IMAGE that records the order in which the image's chunks are first read, save that as the image's "
        "startup profile in the store (merged with earlier recordings unless --record-replace), and lay "
        "the profile's chunks out in startup packs (unless --no-optimize). Every later mount of the image "
        "streams those chunks as it starts. Recording ends when CMD exits, or when nothing new has been "
        "read for --record-quiet seconds (a server that is up and idle; it is then stopped).",
        usage="imagefs profile [options] IMAGE [--] [CMD ...]",
    )
    p.add_argument("image", metavar="IMAGE", help="image name or blake3:<hex> digest")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments (replace the image's Cmd)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="set an environment variable (repeatable)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside the container")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run as (name or uid, as in the image)")
    p.add_argument("--entrypoint", metavar="CMD", help="replace the image's Entrypoint (a single program)")
    p.add_argument("--network", choices=["host", "none"], default="host", help="host network or none (default: host)")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="record only; do not write startup packs")
    add_mount_options(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "optimize",
        help="lay an image's startup profile out in startup packs",
        description="Copy the chunks of IMAGE's startup profile, in the order they are first read, into a few "
        "startup packs, so that a cold start streams its working set in a handful of large reads. The "
        "index, the image digest and dedup with other images do not change; the startup packs are extra "
        "bytes in the store, reported here.",
    )
    p.add_argument("image", metavar="IMAGE", help="image name or blake3:<hex> digest")
    p.add_argument("--force", action="store_true", help="write new startup packs even if the profile is laid out")
    add_store_options(p)
    p.set_defaults(func=cmd_optimize)


def _stop_when_recorded(cid: str, mountpoint: str, done: threading.Event) -> None:
    """(thread) Once the mount's recording is saved, stop the container if it still runs."""
    from imagefs.mount import MountError, query_stats
    from imagefs.run import runc_root

    while not done.wait(0.5):
        try:
            rec = query_stats(mountpoint).get("record") or {}
        except MountError:
            continue  # not mounted yet, or already gone
        if not rec.get("saved"):
            continue
        print(f"imagefs: recording ended ({rec['state']}); stopping the container", file=sys.stderr)
        subprocess.run(["runc", "--root", runc_root(), "kill", cid, "TERM"], capture_output=True)
        if not done.wait(STOP_GRACE_S):
            subprocess.run(["runc", "--root", runc_root(), "kill", "--all", cid, "KILL"], capture_output=True)
        return


def cmd_profile(args: argparse.Namespace) -> int:
    import secrets

    from cache.stores import open_store
    from imagefs.cli_mount import mount_options_from_args
    from imagefs.index_cache import load_index
    from imagefs.run import ConfigError, RunError, RunSpec, private_mountpoint, run_container
    from indexer import profile as profiles

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    opts = mount_options_from_args(args)
    opts.record = True
    opts.replay = True  # a replay does not hide reads from the recording: it is below the page cache
    spec = RunSpec(command=command, entrypoint=[args.entrypoint] if args.entrypoint is not None else None,
                   env=args.env, workdir=args.workdir, user=args.user, network=args.network)
    cid = f"imagefs-profile-{secrets.token_hex(4)}"
    done = threading.Event()
    watcher = threading.Thread(target=_stop_when_recorded, args=(cid, private_mountpoint(cid), done), daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        status, _timings = run_container(args.image, spec, opts, name=cid, private_mount=True)
    except (RunError, ConfigError) as e:
        raise CLIError(str(e)) from e
    finally:
        done.set()
    store = open_store(opts.store, s3_endpoint=opts.s3_endpoint)
    index = load_index(store, args.image, opts.index_cache_dir())
    try:
        found = profiles.load(store, index)
    except profiles.ProfileError as e:
        raise CLIError(f"the recording was not saved: {e}") from e
    if found is None:
        raise CLIError(f"nothing was recorded for {args.image} (the command exited with status {status}; "
                       "see the mount's log)")
    s = profiles.summary(found, index)
    if not args.quiet:
        print(f"imagefs: container exited with status {status} after {time.monotonic() - t0:.1f} s; profile of "
              f"{index.digest[:19]}: {s['chunks']} chunks, {human_size(int(s['bytes']))} "
              f"({human_size(int(s['compressed_bytes']))} stored) from {s['recordings']} recording(s)",
              file=sys.stderr)
    if args.optimize:
        _optimize(store, index, found, force=False, quiet=args.quiet)
    return 0


def _optimize(store: object, index: object, found: object, *, force: bool, quiet: bool) -> None:
    from indexer.optimize import OptimizeError, optimize

    try:
        res = optimize(store, index, found, force=force)  # type: ignore[arg-type]
    except OptimizeError as e:
        raise CLIError(str(e)) from e
    if quiet:
        return
    if not res.changed:
        print(f"imagefs: the profile is laid out already ({res.packs} startup pack(s), "
              f"{human_size(res.startup_bytes)}; --force writes them again)", file=sys.stderr)
        return
    print(f"imagefs: laid out the profile: {res.chunks} of its {len(res.profile.entries)} chunks copied to "
          f"{res.packs} startup pack(s) (the rest are read where they are), {res.profile.head_chunks} inline; "
          f"{human_size(res.startup_bytes)} extra, {100 * res.extra_ratio:.1f}% of the image's "
          f"{human_size(res.image_bytes)} ({res.seconds:.1f} s)", file=sys.stderr)


def cmd_optimize(args: argparse.Namespace) -> int:
    from cache.stores import open_store
    from indexer import profile as profiles
    from indexer.catalog import open_image

    store = open_store(args.store, s3_endpoint=args.s3_endpoint)
    index = open_image(store, args.image)
    try:
        found = profiles.load(store, index)
    except profiles.ProfileError as e:
        raise CLIError(f"{args.image}: {e}; record a new one with 'imagefs profile --record-replace'") from e
    if found is None:
        raise CLIError(f"{args.image} has no startup profile (record one with 'imagefs profile {args.image}')")
    _optimize(store, index, found, force=args.force, quiet=False)
    return 0
