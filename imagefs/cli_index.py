"""``imagefs index``, ``imagefs images`` and ``imagefs inspect``: the write side's commands."""

from __future__ import annotations

import argparse
import json
import stat
import sys
from collections import Counter
from typing import Any

from imagefs.cli import add_store_options, size_arg
from imagefs.progress import human_bytes, progress_for


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "index",
        help="convert an OCI image into chunks and an index in a store",
        description="Read an image (every layer verified against its digest), cut its files into "
        "content-addressed chunks, store the chunks the store does not have yet, and write the "
        "index. Prints the image digest. Sources, as in skopeo: oci:DIR[:TAG], "
        "docker-archive:FILE, docker://HOST[:PORT]/REPO[:TAG|@DIGEST].",
    )
    p.add_argument("source", metavar="SOURCE", help="oci:DIR[:TAG] | docker-archive:FILE | docker://HOST/REPO[:TAG|@DIGEST]")
    add_store_options(p)
    p.add_argument("--name", help="name to give the image in the store (default: derived from SOURCE)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="pick from a multi-platform image (default linux/amd64)")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a non-loopback registry")
    p.add_argument("--tls-verify", choices=["true", "false"], default=None,
                   help="skopeo's spelling: --tls-verify=false is --insecure")
    p.add_argument("--creds", metavar="USER[:PASSWORD]",
                   help="registry credentials (without :PASSWORD, asked for on the terminal)")
    p.add_argument("--authfile", metavar="FILE",
                   help="credentials file (skopeo/podman auth.json or docker config.json: auths, credHelpers, "
                   "credsStore); replaces the default files $REGISTRY_AUTH_FILE, "
                   "$XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json")
    p.add_argument("--max-layer-size", metavar="SIZE", type=size_arg, default=None,
                   help="the most one layer may decompress to, e.g. 100G; a layer past it (a decompression "
                   "bomb, most likely) fails the build and nothing is stored (default: 64G)")
    p.add_argument("--chunk-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the build figures as JSON")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("images", help="list the images in a store", description="List the named images in a store with their digests.")
    add_store_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser(
        "inspect",
        help="show an image's config, size and dedup figures (and its tree)",
        description="Show what an indexed image holds: its source and config, entry counts, "
        "content and stored sizes, chunks shared with other images in the store, and with --tree "
        "every entry.",
    )
    p.add_argument("image", metavar="IMAGE", help="image name or blake3:<hex> digest")
    add_store_options(p)
    p.add_argument("--tree", action="store_true", help="list every entry (like ls -l, with full paths)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from cache.stores import open_store

    return open_store(args.store, s3_endpoint=args.s3_endpoint)


def _auth_options(args: argparse.Namespace) -> Any:
    """--creds and --authfile; a missing password is asked for now, before any work."""
    from indexer.sources.credentials import AuthOptions, parse_creds

    creds = None
    if args.creds is not None:
        c = parse_creds(args.creds)
        creds = f"{c.user}:{c.password}"
    return AuthOptions(creds=creds, authfile=args.authfile)


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.build import build_image
    from indexer.chunker import DEFAULT_CHUNK_SIZE

    store = _store(args)
    result = build_image(
        args.source,
        store,
        args.name,
        platform=args.platform,
        insecure=args.insecure or args.tls_verify == "false",
        chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
        auth=_auth_options(args),
        progress=progress_for(args.quiet),
        max_layer_bytes=args.max_layer_size,
    )
    if not result.name:
        print(f"imagefs: warning: {result.digest[:23]} has no name, so it is dangling (<none>) and the next "
              "'imagefs gc' deletes it; name it with 'imagefs tag'", file=sys.stderr)
    if result.replaced and result.name:
        from imagefs.cli_images import moved_message

        print(f"imagefs: {moved_message(store, result.name, result.replaced, result.digest)}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
        return 0
    if not args.quiet:
        rate = result.content_bytes / max(result.seconds, 1e-6)
        print(
            f"indexed {args.source} into {store.url}"
            + (f" as {result.name}" if result.name else "")
            + f"\n  {result.entries} entries, {result.files} files, {human_bytes(result.content_bytes)} of content"
            + f"\n  {result.chunks} chunks: {result.new_chunks} new ({human_bytes(result.stored_bytes)} stored), "
            + f"{result.reused_chunks} already in the store"
            + f"\n  index {human_bytes(result.index_bytes)}, {result.seconds:.1f} s ({human_bytes(rate)}/s)",
            file=sys.stderr,
        )
    print(result.digest)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from indexer.catalog import list_images

    refs = list_images(_store(args))
    if args.json:
        print(json.dumps([{"name": r.name, "digest": r.digest, "source": r.origin.get("source")} for r in refs],
                         indent=2))
        return 0
    if refs:
        width = max(len("NAME"), *(len(r.name or "<none>") for r in refs))
        print(f"{'NAME':<{width}}  DIGEST")
        for r in refs:
            print(f"{r.name or '<none>':<{width}}  {r.digest}")
    return 0


_TYPES = [
    (stat.S_ISDIR, "directories", "d"), (stat.S_ISREG, "files", "-"), (stat.S_ISLNK, "symlinks", "l"),
    (stat.S_ISCHR, "char devices", "c"), (stat.S_ISBLK, "block devices", "b"),
    (stat.S_ISFIFO, "fifos", "p"), (stat.S_ISSOCK, "sockets", "s"),
]


def _kind(mode: int) -> tuple[str, str]:
    for test, plural, letter in _TYPES:
        if test(mode):
            return plural, letter
    return "other", "?"


def profile_figures(store: Any, index: Any) -> dict[str, Any] | None:
    """The image's startup profile, summarized (None: it has none)."""
    from indexer import profile as profiles

    try:
        found = profiles.load(store, index)
    except profiles.ProfileError as e:
        return {"error": str(e)}
    if found is None:
        return None
    figures = profiles.summary(found, index)
    files: list[str] = []
    for e in found.entries:
        if e.ino and len(files) < 10:
            path = index.path_of(e.ino)
            if path not in files:
                files.append(path)
    figures["first_files"] = files
    return figures


def inspect_figures(store: Any, image: str) -> dict[str, Any]:
    """Sizes and dedup figures of one image, against the rest of the store."""
    from indexer.catalog import list_images, open_image

    index = open_image(store, image)
    refs = list_images(store)
    names = [r for r in refs if r.name and r.digest == index.digest]
    # Where the image came from is its names' (older indexes kept it in the index itself).
    mine = next((r for r in names if r.name == image), names[0] if names else None)
    origin = mine.origin if mine is not None else {}
    kinds: Counter[str] = Counter()
    content = 0
    for ino in range(1, index.n_inodes + 1):
        node = index.inode(ino)
        kinds[_kind(node.mode)[0]] += 1
        if stat.S_ISREG(node.mode):
            content += node.size
    chunks = list(index.all_chunks())
    unique_bytes = sum(c.ulen for c in chunks)
    stored_bytes = sum(c.clen for c in chunks)
    mine = {c.digest for c in chunks}
    shared: set[bytes] = set()
    others = 0
    for digest in sorted({r.digest for r in refs if r.name} - {index.digest}):
        others += 1
        other = open_image(store, digest)
        shared |= mine & {c.digest for c in other.all_chunks()}
    shared_bytes = sum(c.clen for c in chunks if c.digest in shared)
    return {
        "profile": profile_figures(store, index),
        "digest": index.digest,
        "names": [r.name for r in names],
        "source": origin.get("source", index.meta.get("source")),
        "manifest_digest": origin.get("manifest_digest", index.meta.get("manifest_digest")),
        "platform": "/".join(x for x in (index.meta.get("os"), index.meta.get("architecture"), index.meta.get("variant")) if x),
        "config": index.config,
        "inodes": index.n_inodes,
        "kinds": dict(kinds),
        "content_bytes": content,
        "chunks": len(chunks),
        "chunk_size": index.chunk_size,
        "unique_chunk_bytes": unique_bytes,
        "stored_bytes": stored_bytes,
        "shared_with_other_images": {"images": others, "chunks": len(shared), "stored_bytes": shared_bytes},
        "index": index,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from indexer.index import ROOT_INO

    f = inspect_figures(_store(args), args.image)
    index = f.pop("index")
    if args.json:
        print(json.dumps(f, indent=2))
        return 0
    dedup = f["content_bytes"] / f["unique_chunk_bytes"] if f["unique_chunk_bytes"] else 1.0
    print(f"Digest:        {f['digest']}")
    print(f"Names:         {', '.join(f['names']) or '<none>'}")
    print(f"Source:        {f['source']}")
    print(f"Manifest:      {f['manifest_digest']}")
    print(f"Platform:      {f['platform']}")
    for key in ("Entrypoint", "Cmd", "WorkingDir", "User"):
        if key in f["config"]:
            print(f"{key + ':':<14} {json.dumps(f['config'][key])}")
    for env in f["config"].get("Env", []):
        print(f"Env:           {env}")
    print(f"Inodes:        {f['inodes']} (" + ", ".join(f"{n} {k}" for k, n in sorted(f["kinds"].items())) + ")")
    print(f"Content:       {human_bytes(f['content_bytes'])} in files")
    print(
        f"Chunks:        {f['chunks']} of up to {human_bytes(f['chunk_size'])}: {human_bytes(f['unique_chunk_bytes'])} "
        f"unique ({dedup:.2f}x dedup within the image), {human_bytes(f['stored_bytes'])} compressed"
    )
    s = f["shared_with_other_images"]
    print(f"Shared:        {s['chunks']} chunks ({human_bytes(s['stored_bytes'])} stored) with {s['images']} other image(s)")
    p = f["profile"]
    if p is None:
        print("Profile:       none (record one with 'imagefs profile')")
    elif "error" in p:
        print(f"Profile:       unusable: {p['error']}")
    else:
        layout = (f"laid out: {p['copied']} copied to {p['startup_packs']} startup pack(s), the rest read in place, "
                  f"{human_bytes(p['head_bytes'])} inline" if p["optimized"] else
                  "not laid out ('imagefs optimize' lays it out)")
        print(f"Profile:       {p['chunks']} chunks, {human_bytes(p['bytes'])} ({human_bytes(p['compressed_bytes'])} "
              f"stored), from {p['recordings']} recording(s), read over {p['span_ms'] / 1000:.1f} s; {layout}")
        for path in p["first_files"]:
            print(f"  read early:  {path}")
    if args.tree:
        stack = [(b"", ROOT_INO)]
        while stack:
            path, ino = stack.pop()
            node = index.inode(ino)
            _, letter = _kind(node.mode)
            perms = stat.filemode(node.mode)[1:]
            extra = f" -> {index.readlink(ino).decode(errors='replace')}" if stat.S_ISLNK(node.mode) else ""
            print(f"{letter}{perms} {node.uid:>5} {node.gid:>5} {node.size:>12} /{path.decode(errors='replace')}{extra}")
            if stat.S_ISDIR(node.mode):
                children = list(index.readdir(ino))
                for _i, name, child in reversed(children):
                    stack.append((path + b"/" + name if path else name, child))
    return 0
