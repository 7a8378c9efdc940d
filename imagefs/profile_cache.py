"""A host's copies of startup profiles, so a replay can start without a round trip.

Without a copy, a cold start pays its round trips one after another: the name, the
index, then (in the mount daemon) the profile, then the profile's first range. Here the
profile is fetched *beside* the index, in the same round trip (:func:`fetch_beside`,
called by :func:`imagefs.index_cache.load_index` when it has to fetch an index), and
kept in the host's cache directory, so the daemon starts streaming the moment it starts.

A profile, unlike an index, can change (a new recording, a new layout), so a copy is a
hint, not the truth: the daemon replays the copy it finds and then fetches the store's
version in the background for the next mount (:func:`refresh`). A stale copy costs at
most a less useful replay; it can never cost a wrong byte (a profile is checked against
the mounted index, and every chunk against its digest).

Copies are the stored blobs, as the store holds them, under
``DIR/profiles/<index hex>.profile``, 0600 in a 0700 directory (cache.private), written
to a temporary file and renamed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from cache.blobstore import BlobNotFound, BlobStore
from cache.private import write_atomic
from indexer import profile as profiles
from indexer.format import DIGEST_PREFIX
from indexer.index import Index

log = logging.getLogger(__name__)


def _path(cache_dir: str, digest: str) -> str:
    return os.path.join(cache_dir, "profiles", digest[len(DIGEST_PREFIX):] + ".profile")


NONE = object()  # read_copy: the host knows the image has no profile (an empty copy)


def read_copy(cache_dir: str | None, index: Index) -> "profiles.Profile | object | None":
    """The host's copy of ``index``'s profile if it has a usable one; :data:`NONE` if
    its copy says the image has none (an empty file: the store had none when it asked);
    None if it has no copy."""
    if not cache_dir:
        return None
    path = _path(cache_dir, index.digest)
    try:
        with open(path, "rb") as f:
            blob = f.read(profiles.MAX_BLOB)
    except OSError:
        return None
    if not blob:
        return NONE
    try:
        found = profiles.decode(blob, path)
        profiles.check_against(found, index, path)
    except profiles.ProfileError as e:
        log.warning("local copy of a profile is unusable (%s); dropping it", e)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    return found


def age(cache_dir: str | None, digest: str) -> float:
    """Seconds since the host's copy was written (infinite without one)."""
    if not cache_dir:
        return float("inf")
    import time

    try:
        return time.time() - os.stat(_path(cache_dir, digest)).st_mtime
    except OSError:
        return float("inf")


def keep(cache_dir: str | None, digest: str, blob: bytes | None) -> None:
    """Keep ``blob`` as the host's copy of ``digest``'s profile (None: it has none,
    kept as an empty file so that a mount right after does not ask again)."""
    if not cache_dir:
        return
    path = _path(cache_dir, digest)
    try:
        write_atomic(path, blob or b"")
    except OSError as e:
        log.warning("cannot keep a copy of the profile at %s: %s", path, e)


def fetch(store: BlobStore, digest: str) -> bytes | None:
    """The stored profile blob of ``digest`` (readers check it against the index), or
    None. Through a zone's server (cache.zoneblobs) a profile comes unverified: one that
    does not decode is asked of the store itself."""
    key = profiles.profile_key(digest)
    try:
        blob = store.get(key)
    except BlobNotFound:
        return None
    inner = getattr(store, "inner", None)
    if inner is not None:
        try:
            profiles.decode(blob, key)
        except profiles.ProfileError as e:
            log.warning("the zone's copy of %s is unusable (%s); asking the store", key, e)
            try:
                return inner.get(key)
            except BlobNotFound:
                return None
    return blob


def refresh(store: BlobStore, cache_dir: str | None, digest: str) -> bytes | None:
    """Fetch the store's profile of ``digest`` and make it the host's copy; returns it."""
    blob = fetch(store, digest)
    keep(cache_dir, digest, blob)
    return blob


def fetch_beside(store: BlobStore, cache_dir: str | None, digest: str) -> threading.Thread | None:
    """Start fetching ``digest``'s profile into the host's copy while the caller fetches
    its index (the caller joins the thread before the mount starts)."""
    if not cache_dir:
        return None

    def run() -> None:
        try:
            refresh(store, cache_dir, digest)
        except Exception as e:  # only a slower replay
            log.debug("profile of %s not fetched beside its index: %r", digest, e)

    t = threading.Thread(target=run, name="imagefs-profile-fetch", daemon=True)
    t.start()
    return t
