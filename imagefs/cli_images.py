"""``imagefs rm``/``rmi``, ``tag``, ``gc`` and ``prune``: names, and making store and host shrink."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from imagefs.cli import CLIError, add_store_options
from imagefs.progress import human_bytes, progress_for


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "rm", aliases=["rmi"],
        help="remove image names (their storage goes at the next 'imagefs gc')",
        description="Remove each IMAGE's name from the store, as 'docker rmi' untags. IMAGE is a name, or a "
        "digest (whole or a unique prefix such as blake3:aa3a88d4): then every name of that image is removed. "
        "An image left with no name is dangling (<none> in 'imagefs images'); 'imagefs gc' deletes it and "
        "every pack no other image shares. Refused for an image a mount on this host serves (unless --force).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="name, or digest / unique digest prefix")
    p.add_argument("-f", "--force", action="store_true",
                   help="remove even if a mount on this host serves the image, or a digest has several names")
    add_store_options(p)
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser(
        "tag",
        help="give an image another name",
        description="Point the name TARGET at the image SOURCE (a name, a digest or a unique digest prefix), as "
        "'docker tag'. If TARGET named another image, it is re-pointed and that is said: the other image keeps "
        "its other names, or becomes dangling (<none>) if it had none.",
    )
    p.add_argument("source", metavar="SOURCE", help="image name, or digest / unique digest prefix")
    p.add_argument("target", metavar="TARGET", help="new name, e.g. myapp:2 or registry.example/app:1")
    add_store_options(p)
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser(
        "gc",
        help="delete what no named image needs from the store",
        description="Garbage-collect the store: keep every image a name points at, its startup profile and every "
        "pack either names; delete the rest (dangling images, their profiles, packs of removed images, "
        "interrupted builds and superseded startup packs). Safe while other hosts index into the same store: "
        "packs a running build may reuse are deleted only once it has finished (writers hold leases), at once "
        "when none runs, else by a later gc. Safe to interrupt at any point.",
    )
    add_store_options(p)
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "prune",
        help="remove this host's leftovers: dead runs, files of gone mount daemons, unused index copies",
        description="Remove what this host keeps that nothing uses: containers, overlays, bundles and image "
        "mounts of runs killed with SIGKILL; run files of mount daemons that are gone; index and profile "
        "copies and EROFS metadata in the cache directory of images no live mount serves (fetched or "
        "written again when needed). The store is not touched: 'imagefs gc' shrinks it.",
    )
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the host cache directory (default: $IMAGEFS_CACHE_DIR, else /var/cache/imagefs for root)")
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would be removed; remove nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_prune)


def _store(args: argparse.Namespace) -> Any:
    from cache.stores import open_store

    return open_store(args.store, s3_endpoint=args.s3_endpoint)


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"imagefs: {message}", file=sys.stderr)


def moved_message(store: Any, name: str, old: str, new: str) -> str:
    """What to say when ``name`` moved from ``old`` to ``new``."""
    from indexer.catalog import names_of

    others = [n for n in names_of(store, old) if n != name]
    fate = (f"it keeps its name(s) {', '.join(others)}" if others
            else "it has no name left and is listed as <none>; 'imagefs gc' deletes it")
    return f"{name} now points at {new[:23]}; it pointed at {old[:23]} before: {fate}"


def cmd_rm(args: argparse.Namespace) -> int:
    from indexer import catalog
    from imagefs.prune import live_digests

    store = _store(args)
    in_use = live_digests()
    status = 0
    for image in args.images:
        try:
            digest = catalog.resolve(store, image)
        except (catalog.ImageNotFound, catalog.AmbiguousImage, catalog.InvalidImageName) as e:
            print(f"imagefs: {e}", file=sys.stderr)
            status = 1
            continue
        names = catalog.names_of(store, digest)
        is_name = image in names or catalog.normalize_name(image) in names
        targets = [catalog.normalize_name(image)] if is_name else names
        if not targets:
            print(f"imagefs: {image}: {digest} has no name to remove; 'imagefs gc' deletes it with every other "
                  "unnamed image", file=sys.stderr)
            continue
        if not is_name and len(targets) > 1 and not args.force:
            print(f"imagefs: {image}: refusing to remove {len(targets)} names ({', '.join(targets)}) of {digest[:23]} "
                  "at once (name them, or use --force)", file=sys.stderr)
            status = 1
            continue
        last = set(targets) >= set(names)
        if last and digest in in_use and not args.force:
            print(f"imagefs: {image}: a mount on this host serves {digest[:23]}; unmount it first (or use --force)",
                  file=sys.stderr)
            status = 1
            continue
        for name in targets:
            catalog.remove_ref(store, name)
            print(f"Untagged: {name}")
        if last:
            print(f"Dangling: {digest} (no name left; 'imagefs gc' frees its space)")
    return status


def cmd_tag(args: argparse.Namespace) -> int:
    from indexer import catalog
    from indexer.leases import Lease

    store = _store(args)
    target = catalog.validate_name(args.target)
    # Under a lease: a concurrent gc does not delete a dangling SOURCE before TARGET names it.
    with Lease(store, f"tag {args.source} {target}"):
        digest = catalog.resolve(store, args.source)
        origin: dict[str, Any] = {}
        try:
            src_ref = catalog.read_ref(store, args.source)
        except catalog.InvalidImageName:
            src_ref = None
        if src_ref is not None:
            origin = {k: v for k, v in src_ref.origin.items() if k != "indexed"}
        old = catalog.set_ref(store, target, digest, {**origin, "tagged_from": args.source})
    if old:
        _say(args, moved_message(store, target, old, digest))
    print(digest)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from indexer.gc import GcError, collect

    store = _store(args)
    try:
        report = collect(store, dry_run=args.dry_run, progress=progress_for(args.quiet))
    except GcError as e:
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would free" if report.dry_run else "freed"
    parts = [f"{f.count} {kind} ({human_bytes(f.bytes)})" for kind, f in report.freed.items() if f.count]
    print(f"{store.url}: {verb} {human_bytes(report.freed_bytes)}" + (f": {', '.join(parts)}" if parts else ""))
    print(f"  kept {report.live_images} named image(s), {report.live_packs} pack(s); the store "
          + ("would hold" if report.dry_run else "holds") + f" {human_bytes(report.store_bytes_after)} "
          f"(was {human_bytes(report.store_bytes_before)})")
    if report.restored:
        print(f"  {report.restored} condemned pack(s) were named by a build that finished meanwhile: kept")
    if report.deferred.count:
        print(f"  {report.deferred.count} pack(s) ({human_bytes(report.deferred.bytes)}) condemned, deleted by a "
              f"later gc once these writers finish: {'; '.join(report.waiting_for)}")
    elif report.dry_run and report.waiting_for:
        print(f"  running writers (their packs are deleted only once they finish): {'; '.join(report.waiting_for)}")
    for b in report.broken_names:
        print(f"  warning: name {b}", file=sys.stderr)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from imagefs.mount import default_cache_dir
    from imagefs.prune import prune

    report = prune(args.cache_dir or default_cache_dir(), dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"dry_run": report.dry_run, "bytes": report.bytes, "dead_mounts": report.dead_mounts,
                          "removed": [i.__dict__ for i in report.removed]}, indent=2))
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for item in report.removed:
        print(f"{verb} {item.kind}: {item.what}" + (f" ({human_bytes(item.bytes)})" if item.bytes else ""))
    print(f"{verb} {len(report.removed)} item(s), {human_bytes(report.bytes)}")
    for mp in report.dead_mounts:
        print(f"imagefs: {mp}: its mount daemon is gone; 'imagefs umount {mp}' removes the dead mount",
              file=sys.stderr)
    return 0
