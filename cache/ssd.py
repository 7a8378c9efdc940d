"""The host's local-SSD chunk tier, shared by every imagefs process on the host.

Why this shape:

- A hit must be a plain file read, so chunks are stored *uncompressed* as files
  ``DIR/chunks/<2 hex>/<64 hex>`` named by their blake3 digest. Several mounts of
  images that share layers share the chunks too.
- Several processes fill and evict the same directory at once, so the bookkeeping
  (digest -> size and last access, an LRU index, the running total) lives in one LMDB
  environment, ``DIR/meta.lmdb``, opened with ``lock=True``: LMDB's process-shared
  writer lock serialises every change across processes, and readers never block.
- Every rename into ``chunks/`` and every unlink out of it happens *inside* the write
  transaction that records it. Two processes can therefore never interleave a fill
  and an eviction of one digest, and the only way files and records can disagree is a
  process dying between a rename/unlink and its commit.
- Every hit is verified (blake3) before it is returned; a file that fails is deleted
  with its record, counted as ``corrupt`` and reported as a miss, so the chain
  fetches the chunk again from below.
- The AZ cache server keeps the same structure with ``frames=True``: each file is
  the chunk's zstd frame, as the packs store it, because the server's job is to send
  chunks over a network (under a third of the bytes) and a host's job is to read
  them back fast. Which form a directory holds is recorded in its LMDB (``form``) and
  checked at open, so a host cache and a server cache are never mixed up.

Crash safety (a crash leaves the cache smaller, never corrupt):

- A fill writes ``DIR/tmp/<pid>.<random>`` then renames it over the final name within
  the recording transaction. It is not fsynced by default (``fsync=True`` asks for
  it): every hit is verified, so a file a crash left empty or torn is a detected miss,
  never served, and an fsync per chunk cut fill throughput to a fraction of a fast
  cold read (measured: a 1 GiB sequential read filled only part of the tier before
  the write-behind queue overflowed). Temporaries live in one directory (same file
  system as ``chunks/``, so the rename is atomic) so that opening the tier sweeps
  them with one ``listdir``: a temporary whose process is gone, or that is older than
  an hour, is deleted. (Processes sharing the directory must share a PID namespace,
  or a live fill may lose its temporary: that fill then fails, nothing is corrupted.)
- A *record without a file* (a crash after an eviction's unlink, before its commit)
  is found when read: a miss, and the record is dropped. Eviction skips it too.
- A *file without a record* (a crash after a fill's rename, before its commit) is
  never served: a lookup starts from the record, not the file. The next fill of that
  digest replaces it. Such files cost disk space but not correctness; finding them
  needs a full directory walk, which :meth:`SSDTier.scrub` does on request rather
  than every open.

Last-access times are not written on every hit: a hit whose recorded access is
younger than ``touch_after`` seconds changes nothing, older ones are queued and
written in one transaction every ``touch_batch`` hits or ``touch_interval`` seconds
(or with the next fill). LRU order is thus approximate to a few seconds, which is all
eviction needs, and the hit path stays one read transaction, one file read, one hash.

The disk may be smaller than ``max_bytes``, or shared with other data: every fill
also keeps a little of the disk free (``reserve``, so that LMDB can always commit, an
eviction included), evicting least-recently-used chunks to do so, and a chunk whose
write finds the disk full (ENOSPC, EDQUOT) makes room the same way and is written
again once. Without this, a disk smaller than the bound filled once and every later
fill failed, for good (issue 12).

LMDB is opened with ``metasync=False``: one fsync per commit instead of two; a power
loss may undo the last commit, which only makes the cache smaller (its renamed file
becomes an orphan), and LMDB stays consistent.

LMDB forbids opening one environment twice in a process, so instances on the same
directory within a process share one environment (reference counted).
"""

from __future__ import annotations

import errno
import os
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import lmdb

from cache.chunk import ChunkRef, CorruptChunk, check_frame, verify
from cache.directio import DirectReader
from cache.private import DIR_MODE, FILE_MODE, private_dir
from cache.stats import Counters, TierStats

if TYPE_CHECKING:
    from lmdb import _Database

CHUNKS_DIR = "chunks"
TMP_DIR = "tmp"
META_DIR = "meta.lmdb"
DEFAULT_MAP_SIZE = 1 << 30  # sparse; ~5 M records
STALE_TMP_SECONDS = 3600.0

_REC = struct.Struct(">QQ")  # size, last access (ns since the epoch)
_ATIME = struct.Struct(">Q")  # big-endian, so the LRU index sorts oldest first
_TOTAL = b"total"
_COUNT = b"count"
_FORM = b"form"
FORM_RAW = b"raw"  # uncompressed chunks (a host's tier)
FORM_FRAMES = b"zstd"  # zstd frames (an AZ cache server's disk)
MAX_FRAME_CONTENT = 1 << 30  # a frame claiming more than this is not one of our chunks
# Free disk kept by fills: this much, or a sixteenth of a smaller file system.
DISK_RESERVE = 64 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _lru_key(atime_ns: int, digest: bytes) -> bytes:
    return _ATIME.pack(atime_ns) + digest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Env:
    env: lmdb.Environment
    chunks: _Database
    lru: _Database
    meta: _Database
    refs: int = 0


_envs: dict[str, _Env] = {}
_envs_lock = threading.Lock()


def _acquire_env(path: str, map_size: int) -> _Env:
    with _envs_lock:
        e = _envs.get(path)
        if e is None:
            env = lmdb.open(path, map_size=map_size, subdir=True, max_dbs=4, max_readers=1024, mode=FILE_MODE,
                            lock=True, readahead=False, metasync=False)
            env.reader_check()  # free reader slots of processes that died
            e = _Env(env, env.open_db(b"chunks"), env.open_db(b"lru"), env.open_db(b"meta"))
            _envs[path] = e
        e.refs += 1
        return e


def _release_env(path: str) -> None:
    with _envs_lock:
        e = _envs.get(path)
        if e is None:
            return
        e.refs -= 1
        if e.refs <= 0:
            del _envs[path]
            e.env.close()


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """What :meth:`SSDTier.scrub` found and fixed."""

    orphan_files: int
    missing_files: int
    stale_temps: int
    entries: int
    total: int


class FormMismatch(ValueError):
    """A directory that holds chunks in the other form (a host cache opened as a server's, or back)."""


class SSDTier:
    """Verified chunks on local disk, bounded by ``max_bytes``, LRU-evicted, safe across
    the threads of a process and across processes. Uncompressed by default; with
    ``frames=True`` each entry is the chunk's zstd frame and ``get`` returns the frame
    (verified by decompressing it), ``put`` takes one."""

    name = "ssd"

    def __init__(self, directory: str, max_bytes: int, *, map_size: int = DEFAULT_MAP_SIZE,
                 fsync: bool = False, touch_after: float = 2.0, touch_batch: int = 64,
                 touch_interval: float = 2.0, direct: bool = True, frames: bool = False) -> None:
        if max_bytes < 0:
            raise ValueError(f"ssd tier {directory}: max_bytes must be >= 0, got {max_bytes}")
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.frames = frames
        self._touch_after = int(touch_after * 1e9)
        self._touch_batch = touch_batch
        self._touch_interval = int(touch_interval * 1e9)
        self._chunks_dir = os.path.join(self.directory, CHUNKS_DIR)
        self._tmp_dir = os.path.join(self.directory, TMP_DIR)
        # Cached chunks are image content, uncompressed: root's alone (see cache.private).
        private_dir(self.directory, owned=False)
        for own in (self._chunks_dir, self._tmp_dir, os.path.join(self.directory, META_DIR)):
            private_dir(own)
        self._env_path = os.path.realpath(os.path.join(self.directory, META_DIR))
        self._e = _acquire_env(self._env_path, map_size)
        try:
            self._check_form(FORM_FRAMES if frames else FORM_RAW)
        except BaseException:
            _release_env(self._env_path)
            raise
        self._closed = False
        self._made_dirs: set[str] = set()
        self._touch_lock = threading.Lock()
        self._touches: dict[bytes, int] = {}
        self._last_flush = time.time_ns()
        self.counters = Counters(self.name)
        self._reader = DirectReader(direct)
        self.sweep_temps()

    def _check_form(self, want: bytes) -> None:
        """Record the directory's form on first use; refuse a directory of the other form.
        (Caches written before the form was recorded hold uncompressed chunks.)"""
        with self._e.env.begin(db=self._e.meta) as txn:
            have = txn.get(_FORM)
        if have is None:
            with self._e.env.begin(write=True, db=self._e.meta) as txn:
                have = txn.get(_FORM)
                if have is None:
                    have = want if self._totals(txn)[1] == 0 else FORM_RAW
                    txn.put(_FORM, have)
        have = bytes(have)
        if have != want:
            names = {FORM_RAW: "uncompressed chunks (a host's SSD tier)",
                     FORM_FRAMES: "zstd chunk frames (an AZ cache server's disk cache)"}
            raise FormMismatch(f"{self.directory}: holds {names.get(have, repr(have))}, not "
                               f"{names[want]}; use another directory or empty this one")

    # ---- paths -------------------------------------------------------------------

    def path_of(self, digest: bytes) -> str:
        """Where the file for ``digest`` lives (whether or not it is there)."""
        h = digest.hex()
        return os.path.join(self._chunks_dir, h[:2], h)

    def _ensure_dir(self, digest: bytes) -> None:
        sub = digest.hex()[:2]
        if sub not in self._made_dirs:
            os.makedirs(os.path.join(self._chunks_dir, sub), mode=DIR_MODE, exist_ok=True)
            self._made_dirs.add(sub)

    # ---- reading -----------------------------------------------------------------

    def _record(self, digest: bytes) -> tuple[int, int] | None:
        with self._e.env.begin(db=self._e.chunks) as txn:
            v = txn.get(digest)
        return None if v is None else _REC.unpack(v)

    def contains(self, digest: bytes) -> bool:
        """Whether a record for ``digest`` exists (no file read, no verification)."""
        return self._record(digest) is not None

    def contains_many(self, digests: Iterable[bytes]) -> set[bytes]:
        """The subset of ``digests`` that have records, in one read transaction."""
        with self._e.env.begin(db=self._e.chunks) as txn:
            return {d for d in digests if txn.get(d) is not None}

    def get(self, ref: ChunkRef) -> bytes | None:
        """The verified bytes of ``ref`` (its frame, with ``frames``), or None (a miss,
        or a bad copy now deleted)."""
        t0 = time.perf_counter()
        try:
            data = self._read(ref.digest)
        except (OSError, lmdb.Error):
            self.counters.add(errors=1)
            data = None
        self.counters.lookup(None if data is None else len(data), time.perf_counter() - t0)
        return data

    def _read(self, digest: bytes) -> bytes | None:
        rec = self._record(digest)
        if rec is None:
            return None
        size, atime = rec
        try:
            data, ino = self._reader.read(self.path_of(digest), size)
        except FileNotFoundError:
            self._forget(digest, None)
            return None
        try:
            if len(data) != size:
                raise CorruptChunk(f"{len(data)} bytes on disk, {size} recorded")
            if self.frames:
                check_frame(digest, data, MAX_FRAME_CONTENT)
            else:
                verify(digest, data)
        except CorruptChunk:
            self.counters.add(corrupt=1)
            self._forget(digest, ino)
            return None
        now = time.time_ns()
        if now - atime >= self._touch_after:
            self._touch(digest, now)
        return data

    def _forget(self, digest: bytes, ino: int | None) -> None:
        """Drop a bad or missing copy: the file (if it is still the one we read, ``ino``)
        and its record, in one write transaction."""
        with self._e.env.begin(write=True) as txn:
            rec = txn.get(digest, db=self._e.chunks)
            if rec is None:
                return  # someone else already dropped or evicted it
            path = self.path_of(digest)
            try:
                st: os.stat_result | None = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None:
                if ino is None or st.st_ino != ino:
                    return  # a fresh copy landed since we looked: leave it
                os.unlink(path)
            self._drop(txn, digest, rec)

    def _drop(self, txn: lmdb.Transaction, digest: bytes, rec: bytes | memoryview) -> None:
        size, atime = _REC.unpack(rec)
        txn.delete(digest, db=self._e.chunks)
        txn.delete(_lru_key(atime, digest), db=self._e.lru)
        total, count = self._totals(txn)
        self._set_totals(txn, max(0, total - size), max(0, count - 1))

    # ---- last access -------------------------------------------------------------

    def _touch(self, digest: bytes, now: int) -> None:
        with self._touch_lock:
            self._touches[digest] = now
            due = (len(self._touches) >= self._touch_batch
                   or now - self._last_flush >= self._touch_interval)
        if due:
            self.flush()

    def touch(self, digests: Iterable[bytes]) -> None:
        """Record that ``digests`` were used just now (their LRU position), without
        reading them: for a caller that sends the files itself (the cache server's
        sendfile hits). One write transaction."""
        now = time.time_ns()
        with self._touch_lock:
            for d in digests:
                self._touches[d] = now
        self.flush()

    def flush(self) -> None:
        """Write queued last-access times now (also done on fills and close)."""
        with self._touch_lock:
            touches, self._touches = self._touches, {}
            self._last_flush = time.time_ns()
        if touches:
            with self._e.env.begin(write=True) as txn:
                self._apply_touches(txn, touches)

    def _apply_touches(self, txn: lmdb.Transaction, touches: dict[bytes, int]) -> None:
        for digest, t in touches.items():
            rec = txn.get(digest, db=self._e.chunks)
            if rec is None:
                continue
            size, old = _REC.unpack(rec)
            if t <= old:
                continue
            txn.delete(_lru_key(old, digest), db=self._e.lru)
            txn.put(_lru_key(t, digest), b"", db=self._e.lru)
            txn.put(digest, _REC.pack(size, t), db=self._e.chunks)

    # ---- filling -----------------------------------------------------------------

    def put(self, ref: ChunkRef, data: bytes) -> None:
        """Keep verified ``data`` for ``ref``; declined if larger than the whole tier."""
        self.put_many([(ref, data)])

    def put_many(self, items: Iterable[tuple[ChunkRef, bytes]]) -> int:
        """Keep several verified chunks with one recording transaction (one commit, one
        eviction pass). Returns how many were newly stored. A chunk that does not fit
        on the disk even after making room is left out (counted in ``errors``)."""
        staged: list[tuple[bytes, int, str]] = []
        seen: set[bytes] = set()
        now = time.time_ns()
        try:
            for ref, data in items:
                d = ref.digest
                if len(data) > self.max_bytes or d in seen:
                    continue
                seen.add(d)
                if self._record(d) is not None:
                    with self._touch_lock:
                        self._touches[d] = now
                    continue
                tmp = self._write_tmp_making_room(data)
                if tmp is not None:
                    staged.append((d, len(data), tmp))
            with self._touch_lock:
                touches, self._touches = self._touches, {}
                self._last_flush = now
            if not staged and not touches:
                return 0
            return self._install(staged, touches)
        finally:
            for _, _, tmp in staged:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def _write_tmp_making_room(self, data: bytes) -> str | None:
        """:meth:`_write_tmp`; on a full disk, evict room for it and the reserve and
        write once more; None if it still does not fit."""
        try:
            return self._write_tmp(data)
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
        self.make_room(len(data) + self._reserve())
        try:
            return self._write_tmp(data)
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            self.counters.add(errors=1)
            return None

    def make_room(self, nbytes: int) -> int:
        """Evict least-recently-used chunks until ``nbytes`` are freed (or none are
        left); returns the bytes freed."""
        with self._e.env.begin(write=True) as txn:
            total, count = self._totals(txn)
            left, count = self._evict(txn, total, count, bound=max(0, total - nbytes))
            self._set_totals(txn, left, count)
        return total - left

    def _reserve(self) -> int:
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return 0
        return min(DISK_RESERVE, st.f_blocks * st.f_frsize // 16)

    def _disk_short(self) -> int:
        """Bytes to free so that the disk keeps its reserve (0 when it does)."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return 0
        free = st.f_bavail * st.f_frsize
        reserve = min(DISK_RESERVE, st.f_blocks * st.f_frsize // 16)
        return max(0, reserve - free)

    def _write_tmp(self, data: bytes) -> str:
        path = os.path.join(self._tmp_dir, f"{os.getpid()}.{secrets.token_hex(8)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return path

    def _install(self, staged: list[tuple[bytes, int, str]], touches: dict[bytes, int]) -> int:
        """Rename staged temporaries into place, record them, evict: one write txn."""
        installed: list[str] = []
        txn = self._e.env.begin(write=True)
        try:
            now = time.time_ns()
            total, count = self._totals(txn)
            for digest, size, tmp in staged:
                if txn.get(digest, db=self._e.chunks) is not None:
                    continue  # another process stored it meanwhile
                self._ensure_dir(digest)
                final = self.path_of(digest)
                os.rename(tmp, final)
                installed.append(final)
                txn.put(digest, _REC.pack(size, now), db=self._e.chunks)
                txn.put(_lru_key(now, digest), b"", db=self._e.lru)
                total += size
                count += 1
            self._apply_touches(txn, touches)
            total, count = self._evict(txn, total, count, bound=min(self.max_bytes, total - self._disk_short()))
            self._set_totals(txn, total, count)
            txn.commit()
        except BaseException:
            txn.abort()
            for final in installed:  # not recorded: would never be served, but free the space
                try:
                    os.unlink(final)
                except FileNotFoundError:
                    pass
            raise
        return len(installed)

    def _evict(self, txn: lmdb.Transaction, total: int, count: int, *, bound: int | None = None) -> tuple[int, int]:
        """Evict least-recently-used entries until ``total`` is within ``bound``
        (default: the tier's bound)."""
        bound = self.max_bytes if bound is None else bound
        if total <= bound:
            return total, count
        evicted = 0
        cur = txn.cursor(db=self._e.lru)
        while total > bound and cur.first():
            digest = bytes(cur.key()[_ATIME.size:])
            cur.delete()
            rec = txn.get(digest, db=self._e.chunks)
            if rec is None:
                continue
            txn.delete(digest, db=self._e.chunks)
            try:
                os.unlink(self.path_of(digest))
            except FileNotFoundError:
                pass
            total -= _REC.unpack(rec)[0]
            count -= 1
            evicted += 1
        self.counters.add(evictions=evicted)
        return max(0, total), max(0, count)

    # ---- totals, maintenance -----------------------------------------------------

    def _totals(self, txn: lmdb.Transaction) -> tuple[int, int]:
        t = txn.get(_TOTAL, db=self._e.meta)
        c = txn.get(_COUNT, db=self._e.meta)
        return (int(_ATIME.unpack(t)[0]) if t else 0, int(_ATIME.unpack(c)[0]) if c else 0)

    def _set_totals(self, txn: lmdb.Transaction, total: int, count: int) -> None:
        txn.put(_TOTAL, _ATIME.pack(total), db=self._e.meta)
        txn.put(_COUNT, _ATIME.pack(count), db=self._e.meta)

    def usage(self) -> tuple[int, int]:
        """(bytes, chunks) recorded now, across every process sharing the directory."""
        with self._e.env.begin() as txn:
            return self._totals(txn)

    def sweep_temps(self, *, max_age: float = STALE_TMP_SECONDS) -> int:
        """Delete temporaries left by processes that died mid-fill (or older than
        ``max_age``). Done at open; cheap: one directory listing."""
        removed = 0
        now = time.time()
        try:
            names = os.listdir(self._tmp_dir)
        except FileNotFoundError:
            return 0
        for name in names:
            path = os.path.join(self._tmp_dir, name)
            try:
                pid = int(name.split(".", 1)[0])
            except ValueError:
                pid = -1
            try:
                stale = pid <= 0 or not _pid_alive(pid) or now - os.stat(path).st_mtime > max_age
                if stale:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def scrub(self) -> ScrubReport:
        """Reconcile files and records fully: drop records whose file is gone, delete
        files that have no record, recompute the totals, sweep temporaries.

        Holds the writer lock for the walk (fills in other processes wait; reads do not).
        """
        temps = self.sweep_temps()
        orphans = missing = 0
        with self._e.env.begin(write=True) as txn:
            recorded: set[bytes] = set()
            total = count = 0
            gone: list[tuple[bytes, bytes]] = []
            for digest, rec in txn.cursor(db=self._e.chunks):
                if os.path.exists(self.path_of(digest)):
                    recorded.add(digest)
                    total += _REC.unpack(rec)[0]
                    count += 1
                else:
                    gone.append((digest, rec))
            for digest, rec in gone:
                txn.delete(digest, db=self._e.chunks)
                txn.delete(_lru_key(_REC.unpack(rec)[1], digest), db=self._e.lru)
                missing += 1
            for sub in os.listdir(self._chunks_dir):
                subdir = os.path.join(self._chunks_dir, sub)
                for name in os.listdir(subdir):
                    try:
                        digest = bytes.fromhex(name)
                    except ValueError:
                        digest = b""
                    if digest not in recorded:
                        os.unlink(os.path.join(subdir, name))
                        orphans += 1
            self._set_totals(txn, total, count)
        return ScrubReport(orphans, missing, temps, count, total)

    def stats(self) -> TierStats:
        try:
            total, count = self.usage()
        except lmdb.Error:
            total = count = 0
        return self.counters.snapshot(stored_bytes=total, entries=count)

    def close(self) -> None:
        """Write queued access times and let go of the LMDB environment."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            _release_env(self._env_path)

    def __enter__(self) -> SSDTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
