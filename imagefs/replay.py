"""Replay an image's startup profile at mount: stream what the workload will read first.

The profile (:mod:`indexer.profile`) lists the chunks a recorded run of the workload
read, in first-access order, and where startup packs hold copies of them in that order.
At mount the daemon fetches the profile (one round trip, alongside the mount becoming
ready, never before it), checks it against the mounted index, and streams its chunks
into the memory and SSD tiers (:func:`cache.stream.stream_chunks`): a few large ranged
reads in flight, through the zone's cache server when there is one. Container start
never waits for it; a demand read of a chunk on its way joins it, one of a chunk not
reached yet fetches it at once.

A profile that cannot be used (damaged, recorded on another index, naming chunks the
index lacks, or a store that fails) is logged and skipped: the mount works as if the
image had none.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from cache.chain import ChunkChain
from cache.stream import StreamTracker, stream_chunks
from imagefs import profile_cache
from indexer import profile as profiles
from indexer.index import Index

log = logging.getLogger(__name__)

# A host copy younger than this (fetched beside the index a moment ago) is not
# refreshed: in a burst every host would ask the store once more for nothing.
FRESH_S = 60.0


class ReplayStatus(StreamTracker):
    """A stream tracker that also says what happened before the stream: ``state`` is
    ``loading``, ``none`` (the image has no profile), ``refused`` (``reason`` says why),
    then the stream's ``running`` and ``done``."""

    __slots__ = ("reason", "seconds", "source", "inline", "warmer")

    def __init__(self) -> None:
        super().__init__()
        self.state = "loading"
        self.reason = ""
        self.seconds = 0.0
        self.source = ""  # where the profile came from: "host copy" or "store"
        self.inline = 0  # chunks that came inline with the profile (its head)
        self.warmer: Any = None  # an imagefs.page_warm.PageWarmer while the page cache is warmed

    def as_dict(self) -> dict[str, object]:
        d = super().as_dict()
        if self.reason:
            d["reason"] = self.reason
        d["seconds"] = round(self.seconds, 3)
        if self.source:
            d["source"] = self.source
        d["inline"] = self.inline
        if self.warmer is not None:
            d["page_cache"] = self.warmer.as_dict()
        return d


def load_profile(store: Any, index: Index, status: ReplayStatus,
                 cache_dir: str | None = None) -> profiles.Profile | None:
    """(worker thread) The image's usable profile, or None with ``status`` saying why:
    the host's copy when there is one (:mod:`imagefs.profile_cache`), else the store's
    (kept as the host's copy)."""
    copy = profile_cache.read_copy(cache_dir, index)
    if copy is profile_cache.NONE and profile_cache.age(cache_dir, index.digest) <= FRESH_S:
        status.source, status.state = "host copy", "none"  # the store had none a moment ago
        return None
    if isinstance(copy, profiles.Profile):
        status.source = "host copy"
        return copy
    status.source = "store"
    try:
        blob = profile_cache.refresh(store, cache_dir, index.digest)
        if blob is None:
            status.state = "none"
            return None
        key = f"{store.url}/{profiles.profile_key(index.digest)}"
        found = profiles.decode(blob, key)
        profiles.check_against(found, index, key)
    except profiles.ProfileError as e:
        status.state, status.reason = "refused", str(e)
        log.warning("startup profile not used: %s", e)
        return None
    except Exception as e:  # a store that fails: the mount goes on without
        status.state, status.reason = "refused", f"cannot read it: {e}"
        log.warning("startup profile of %s not read: %r", index.digest, e)
        return None
    return found


async def replay(store: Any, index: Index, chain: ChunkChain, status: ReplayStatus,
                 cache_dir: str | None = None, *, warm_root: str | None = None,
                 ready: trio.Event | None = None) -> bool:
    """Stream ``index``'s startup profile into ``chain``'s local tiers; True if there was
    one to stream (whether or not every chunk came). A replay of the host's copy then
    refreshes the copy from the store, for the next mount.

    ``warm_root`` (the mount, once ``ready`` is set): what arrives is also read into the
    kernel's page cache of the mounted files (:mod:`imagefs.page_warm`)."""
    t0 = time.monotonic()
    found = await trio.to_thread.run_sync(load_profile, store, index, status, cache_dir)
    if status.source == "host copy" and profile_cache.age(cache_dir, index.digest) > FRESH_S:
        _refresh_in_background(store, index, cache_dir)
    if found is None:
        return False
    refs = profiles.replay_refs(found, index)
    status.plan(r.digest for r in refs)
    chain.tracker = status
    async with trio.open_nursery() as nursery:
        tell = None
        if warm_root is not None:
            tell = await _start_warming(nursery, index, found, refs, warm_root, ready, status)
        if found.head_chunks:  # frames that came with the profile: no round trip for these
            inline = await chain.accept_frames(profiles.head_frames(found, index))
            for d in inline:
                status.arrived(d)
                status.inline += 1
            if tell is not None:
                tell(inline)
        await stream_chunks(chain, refs, status, on_arrived=tell)
        status.seconds = time.monotonic() - t0
        if tell is not None:
            tell(None)  # nothing more: the warmer finishes what it has and stops
    log.info("replayed the startup profile: %d chunks planned, %d fetched, %d held, %d failed, %.1f MiB in "
             "%d requests, %.2f s", status.planned, status.fetched, status.held, status.failed,
             status.bytes / (1 << 20), status.requests, status.seconds)
    return True


async def _start_warming(nursery: trio.Nursery, index: Index, found: profiles.Profile, refs: list[Any],
                         root: str, ready: trio.Event | None, status: ReplayStatus) -> Any:
    """Start the page-cache warmer; returns the function the stream tells arrivals to."""
    from imagefs.page_warm import PageWarmer, chunk_places, paths_of

    chunk_of = {r.digest: e.chunk for r, e in zip(refs, found.entries)}
    send, receive = trio.open_memory_channel[Any](float("inf"))

    def tell(digests: list[bytes] | None) -> None:
        send.send_nowait(digests)

    async def warm() -> None:
        places = await trio.to_thread.run_sync(chunk_places, index, found)
        paths = await trio.to_thread.run_sync(paths_of, index, {ino for ino, _o, _l in places.values()})
        warmer = status.warmer = PageWarmer(root, paths)
        if ready is not None:
            await ready.wait()  # the mount must be there (EROFS mounts after FUSE answers)
        try:
            done = False
            while not done:
                batch = [await receive.receive()]
                while True:  # everything that arrived meanwhile, in one thread hop
                    try:
                        batch.append(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                ranges = []
                for digests in batch:
                    if digests is None:
                        done = True
                        continue
                    for d in digests:
                        place = places.get(chunk_of.get(d, -1))
                        if place is not None:
                            ranges.append(place)
                if ranges:
                    await trio.to_thread.run_sync(warmer.warm, ranges)
        finally:  # closing a file of our own mount waits for our own loop: not on it
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(warmer.close)

    nursery.start_soon(warm)
    return tell


def _refresh_in_background(store: Any, index: Index, cache_dir: str | None) -> None:
    """Bring the host's copy up to date in the background (never delays the replay)."""
    def run() -> None:
        try:
            profile_cache.refresh(store, cache_dir, index.digest)
        except Exception as e:
            log.debug("profile copy of %s not refreshed: %r", index.digest, e)

    trio.lowlevel.spawn_system_task(trio.to_thread.run_sync, run)
