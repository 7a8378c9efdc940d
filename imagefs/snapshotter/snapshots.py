"""The snapshotter: containerd's snapshot semantics over :mod:`.metadata`, with remote
snapshots from the store's images (:mod:`.images`) and their mounts (:mod:`.mounts`).

Layout under the root (0700): ``metadata.db`` (the snapshots), ``snapshots/<id>/fs``
and ``work`` (an ordinary snapshot's tree and overlayfs's work directory) and
``images/<hex>`` (image mounts).

A ``Prepare`` that carries ``containerd.io/snapshot.ref`` (containerd's unpacker asking
for a layer) is answered, when a store image provides that chain ID, by committing the
remote snapshot under the label's name and raising AlreadyExists: containerd then
skips the layer's download and unpack. Otherwise it is an ordinary active snapshot
that containerd unpacks the layer into.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import threading
from typing import Callable

from imagefs.snapshotter import filters
from imagefs.snapshotter.chain import chain_of_ref
from imagefs.snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from imagefs.snapshotter.images import SNAPSHOT_REF_LABEL, StoreImages
from imagefs.snapshotter.metadata import ACTIVE, COMMITTED, KIND_NAMES, VIEW, MetaStore, Snapshot
from imagefs.snapshotter.mounts import ImageMounts, Mount, bind, overlay

log = logging.getLogger(__name__)

# Set on a remote snapshot (as stargz-snapshotter marks its own): the store image it is.
REMOTE_LABEL = "containerd.io/snapshot/imagefs.image"


class Snapshotter:
    def __init__(self, root: str, images: StoreImages, mounts: ImageMounts) -> None:
        from cache.private import private_dir

        self.root = private_dir(root)
        self.snapshots_dir = private_dir(os.path.join(self.root, "snapshots"))
        self.meta = MetaStore(os.path.join(self.root, "metadata.db"))
        self.images = images
        self.image_mounts = mounts
        self._materialize_lock = threading.Lock()

    def close(self) -> None:
        self.meta.close()

    # -- paths -------------------------------------------------------------------------

    def _dir(self, snap: Snapshot | int) -> str:
        return os.path.join(self.snapshots_dir, str(snap if isinstance(snap, int) else snap.id))

    def _fs(self, snap: Snapshot) -> str:
        return os.path.join(self._dir(snap), "fs")

    def _work(self, snap: Snapshot) -> str:
        return os.path.join(self._dir(snap), "work")

    # -- the API -------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        log.debug("prepare %s on %r, labels %s", key, parent, labels)
        target = labels.get(SNAPSHOT_REF_LABEL, "")
        if target:
            self._maybe_remote(target, parent, labels)
        return self._create(key, parent, ACTIVE, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(key, parent, VIEW, labels)

    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self.meta.require(key))

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        snap = self.meta.commit(key, name, labels, lambda s: _usage(self._fs(s)))
        self.release_unused()
        return snap

    def remove(self, key: str) -> None:
        snap = self.meta.remove(key)
        if not snap.remote:
            self._remove_dir(snap.id)
        self.release_unused()

    def stat(self, key: str) -> Snapshot:
        return self.meta.require(key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Labels are the only mutable field (as containerd's): ``labels`` replaces
        them all, ``labels.KEY`` sets one (or removes it when the value is empty);
        no paths means all mutable fields."""
        for p in paths:
            if p != "labels" and not p.startswith("labels."):
                raise InvalidArgument(f"cannot update field {p!r} of snapshot {key}: only labels can change")

        def change(old: dict[str, str]) -> dict[str, str]:
            if not paths or "labels" in paths:
                return dict(labels)
            for p in paths:
                name = p[len("labels."):]
                if labels.get(name):
                    old[name] = labels[name]
                else:
                    old.pop(name, None)
            return old

        return self.meta.set_labels(key, change)

    def list(self, filter_strings: list[str]) -> list[Snapshot]:
        match = filters.matcher(filter_strings)
        return [s for s in self.meta.all() if match(_fields(s))]

    def usage(self, key: str) -> tuple[int, int]:
        snap = self.meta.require(key)
        if snap.remote:
            return 0, 0  # nothing of it is stored here but what the bounded cache holds
        if snap.kind == COMMITTED:
            return snap.size, snap.inodes
        return _usage(self._fs(snap))

    def cleanup(self) -> None:
        """Remove directories that no snapshot owns (a crash between a row's removal and
        its directory's) and unmount images that no container uses."""
        ids = self.meta.ids()
        for name in os.listdir(self.snapshots_dir):
            sid = name.removeprefix(".removing-")
            if not sid.isdigit() or name.startswith(".removing-") or int(sid) not in ids:
                log.info("cleanup: removing %s (no snapshot owns it)", name)
                self._remove_path(os.path.join(self.snapshots_dir, name))
        self.release_unused()

    # -- internals --------------------------------------------------------------------------

    def _maybe_remote(self, target: str, parent: str, labels: dict[str, str]) -> None:
        """Commit ``target`` as a remote snapshot and raise AlreadyExists, if a store image
        provides its chain ID; return if it must be unpacked as usual."""
        if self.meta.get(target) is not None:
            raise AlreadyExists(f"target snapshot {target} already exists")
        chain = chain_of_ref(target)
        if chain is None:
            return
        image = self.images.provider(chain, labels)
        if image is None:
            return
        remote_labels = {**labels, REMOTE_LABEL: image.digest}
        try:
            self.meta.create(target, parent, COMMITTED, remote_labels, chain=chain)
        except (NotFound, InvalidArgument) as e:
            log.info("layer %s: not remote (%s)", chain, e)
            return
        except AlreadyExists:
            pass  # a concurrent pull of the same image committed it first
        log.info("layer %s: remote, from image %s (%s)", chain, image.name or image.digest, target)
        raise AlreadyExists(f"target snapshot {target} already exists")

    def _create(self, key: str, parent: str, kind: int, labels: dict[str, str]) -> list[Mount]:
        parents = self.meta.ancestry(parent) if parent else []
        owner = self._root_owner(parents)

        def make_dir(sid: int) -> None:
            d = self._dir(sid)
            os.mkdir(d, 0o700)
            os.mkdir(os.path.join(d, "fs"), 0o755)
            os.mkdir(os.path.join(d, "work"), 0o700)
            if owner is not None:  # the container's / takes its mode and owner from the upper directory
                fs = os.path.join(d, "fs")
                os.chown(fs, owner[1], owner[2])
                os.chmod(fs, owner[0])

        snap = self.meta.create(key, parent, kind, labels, make_dir=make_dir)
        try:
            return self._mounts(snap)
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove(key)
            raise

    def _root_owner(self, parents: list[Snapshot]) -> tuple[int, int, int] | None:
        """Mode, uid and gid of the topmost parent's root directory (None: no parent)."""
        if not parents:
            return None
        st = os.stat(self._layer_dir(parents[0])[0])
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

    def _layer_dir(self, snap: Snapshot) -> tuple[str, bool]:
        """The directory that stands for committed ``snap`` in a stack, and whether it is
        a whole image (nothing below it counts). A remote snapshot is the image mount
        of the store image that ends with it; one below an image's top that a container
        or another image's layer builds on is made real first (:mod:`.materialize`)."""
        if snap.remote:
            assert snap.chain is not None
            image = self.images.by_top(snap.chain)
            if image is not None:
                return self.image_mounts.ensure(image.digest), True
            snap = self._materialize(snap)
        return self._fs(snap), False

    def _materialize(self, snap: Snapshot) -> Snapshot:
        from imagefs.snapshotter.materialize import materialize

        with self._materialize_lock:
            current = self.meta.require(snap.key)
            if not current.remote:
                return current  # another call did it meanwhile
            if not os.path.isdir(self._dir(current)):
                materialize(current, self.images, self._dir(current))
            return self.meta.make_local(current.key, _usage(self._fs(current)))

    def _lowers(self, parent: str) -> list[str]:
        """The directories a snapshot on ``parent`` stacks, topmost first; a remote
        snapshot that is a whole image ends the walk."""
        lowers = []
        for snap in self.meta.ancestry(parent) if parent else []:
            path, whole = self._layer_dir(snap)
            lowers.append(path)
            if whole:
                break
        return lowers

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        if snap.kind == ACTIVE:
            lowers = self._lowers(snap.parent)
            if not lowers:
                return bind(self._fs(snap), readonly=False)
            return overlay(lowers, self._fs(snap), self._work(snap))
        # A view, or a committed snapshot, is read-only: its own tree and its parents'.
        lowers = self._lowers(snap.key if snap.kind == COMMITTED else snap.parent)
        if not lowers:
            return bind(self._fs(snap), readonly=True)
        if len(lowers) == 1:
            return bind(lowers[0], readonly=True)
        return overlay(lowers)

    def needed_images(self) -> set[str]:
        """Index digests that an active snapshot or a view stands on."""
        needed = set()
        by_key = {s.key: s for s in self.meta.all()}
        for snap in by_key.values():
            if snap.kind == COMMITTED:
                continue
            p = by_key.get(snap.parent)
            while p is not None:
                if p.remote:
                    image = self.images.by_top(p.chain) if p.chain else None
                    if image is not None:
                        needed.add(image.digest)
                    break
                p = by_key.get(p.parent)
        return needed

    def release_unused(self) -> None:
        self.image_mounts.retain(self.needed_images)

    def _remove_dir(self, sid: int) -> None:
        path = self._dir(sid)
        doomed = os.path.join(self.snapshots_dir, f".removing-{sid}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, doomed)  # atomic: a crash leaves a name Cleanup knows
            self._remove_path(doomed)

    @staticmethod
    def _remove_path(path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=lambda _f, p, e: log.warning("cannot remove %s: %s", p, e[1]))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _fields(snap: Snapshot) -> Callable[[list[str]], str | None]:
    """Snapshot fields by containerd's filter paths."""
    def get(path: list[str]) -> str | None:
        if path == ["name"]:
            return snap.key
        if path == ["parent"]:
            return snap.parent
        if path == ["kind"]:
            return KIND_NAMES.get(snap.kind, "unknown")
        if len(path) >= 2 and path[0] == "labels":
            return snap.labels.get(".".join(path[1:]))
        return None

    return get


def _usage(path: str) -> tuple[int, int]:
    """Bytes (allocated, as du counts them) and inodes under ``path``, hard links once."""
    size, inodes, seen = 0, 0, set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            size += st.st_blocks * 512
    return size, inodes
