"""``imagefs snapshotter`` (containerd's remote snapshotter) and ``imagefs pull`` (a
containerd pull that asks it first). See :mod:`imagefs.snapshotter` for how they work."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from imagefs.cli import CLIError

DEFAULT_ROOT = "/var/lib/imagefs/snapshotter"
DEFAULT_CONTAINERD = "/run/containerd/containerd.sock"
SOCKET_NAME = "snapshotter.sock"

SNAPSHOTTER_EPILOG = """\
containerd configuration (/etc/containerd/config.toml, version 2), then restart containerd:

  [proxy_plugins.imagefs]
    type = "snapshot"
    address = "/run/imagefs/snapshotter.sock"

  # Kubernetes (CRI): pull and run with it, and let it see which image a layer belongs to
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "imagefs"
    disable_snapshot_annotations = false

Then:
  imagefs index docker://registry.example/app:1        # once, anywhere that writes the store
  imagefs pull registry.example/app:1                   # lazy: fetches manifest and config only
  ctr run --snapshotter imagefs --rm registry.example/app:1 c1 CMD

Layers of images the store has are reported to containerd as existing and never
downloaded; the container's rootfs is an overlay over one lazy imagefs mount of the
whole image, shared by every container of that image. Other images (or layers) are
unpacked as usual; a layer below an image's top that another image builds on is
downloaded and unpacked once, then. Snapshots are kept in ROOT/metadata.db and survive
restarts of the snapshotter and of containerd; image mounts outlive the snapshotter.
"""


def default_socket() -> str:
    from imagefs.mount import run_dir

    return os.path.join(run_dir(), SOCKET_NAME)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from imagefs.cli_mount import add_mount_options

    p = sub.add_parser(
        "snapshotter",
        help="serve containerd's snapshots API: containerd, nerdctl and Kubernetes start imagefs images lazily",
        description="Run containerd's remote snapshotter for imagefs: a long-running daemon that serves\n"
        "containerd's snapshots gRPC API on a unix socket, for a proxy_plugins entry in containerd's\n"
        "config. Mount options (--store, --cache-dir, --az-cache, ...) apply to the image mounts it makes.",
        epilog=SNAPSHOTTER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--address", metavar="SOCKET", default=None,
                   help=f"unix socket to serve on (default: {default_socket()}; 0600, its directory 0700)")
    p.add_argument("--root", metavar="DIR", default=DEFAULT_ROOT,
                   help=f"where snapshots and their metadata live, and image mounts (default: {DEFAULT_ROOT})")
    add_mount_options(p)
    p.set_defaults(func=cmd_snapshotter)

    p = sub.add_parser(
        "pull",
        help="pull an image into containerd through the imagefs snapshotter (lazily)",
        description="Pull REF (HOST[:PORT]/REPO[:TAG|@DIGEST]) into containerd with unpack, as the CRI "
        "plugin does, asking the snapshotter first for every layer: layers that imagefs's store has are "
        "neither downloaded nor unpacked; the others are fetched into containerd's content store and "
        "unpacked. Only the manifest and config are always fetched. 'ctr image pull' cannot do this: it "
        "downloads every layer before it unpacks.",
    )
    p.add_argument("ref", metavar="REF", help="image reference, e.g. registry.example/app:1 (docker:// optional)")
    p.add_argument("--address", "-a", metavar="SOCKET", default=os.environ.get("CONTAINERD_ADDRESS", DEFAULT_CONTAINERD),
                   help=f"containerd's socket (default: $CONTAINERD_ADDRESS, else {DEFAULT_CONTAINERD})")
    p.add_argument("--namespace", "-n", metavar="NS", default=os.environ.get("CONTAINERD_NAMESPACE", "default"),
                   help="containerd namespace (default: $CONTAINERD_NAMESPACE, else default)")
    p.add_argument("--snapshotter", metavar="NAME", default="imagefs",
                   help="the proxy plugin's name in containerd's config (default: imagefs)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="which image of a multi-platform index")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP and unverified TLS to the registry")
    p.add_argument("--creds", metavar="USER:PASSWORD", help="registry credentials")
    p.add_argument("--authfile", metavar="FILE", help="registry auth file (containers-auth.json / docker config.json)")
    p.set_defaults(func=cmd_pull)


def cmd_snapshotter(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from cache.stores import open_store
    from imagefs.cli_mount import mount_options_from_args
    from imagefs.snapshotter.images import StoreImages
    from imagefs.snapshotter.mounts import ImageMounts
    from imagefs.snapshotter.service import SocketInUse, serve_forever, start_server
    from imagefs.snapshotter.snapshots import Snapshotter

    log = logging.getLogger("imagefs.snapshotter")
    opts = mount_options_from_args(args)
    store = open_store(opts.store, s3_endpoint=opts.s3_endpoint)
    address = args.address or default_socket()
    if not os.path.isabs(address):
        raise CLIError(f"--address {address}: give an absolute path to a unix socket", code=2)
    images = StoreImages(store)
    try:
        images.refresh()
    except Exception as e:  # the store may come later; every miss refreshes again
        log.warning("cannot list the images of %s yet: %s", store.url, e)
    snapshotter = Snapshotter(args.root, images, ImageMounts(os.path.join(args.root, "images"), opts))
    snapshotter.cleanup()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = start_server(snapshotter, address)
    except SocketInUse as e:
        raise CLIError(str(e)) from None
    print(f"imagefs snapshotter: serving containerd's snapshots API on {address}", file=sys.stderr, flush=True)
    try:
        serve_forever(server, stop)
    finally:
        snapshotter.close()
        with contextlib.suppress(OSError):
            os.unlink(address)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from imagefs.snapshotter.pull import PullError, pull
    from indexer.sources.credentials import AuthOptions

    ref = args.ref.removeprefix("docker://")
    auth = AuthOptions(creds=args.creds, authfile=args.authfile) if (args.creds or args.authfile) else None
    try:
        result = pull(ref, address=args.address, namespace=args.namespace, snapshotter=args.snapshotter,
                      platform=args.platform, insecure=args.insecure, auth=auth,
                      progress=None if args.quiet else sys.stderr)
    except PullError as e:
        raise CLIError(str(e)) from None
    print(result.name)
    return 0
