"""The snapshots, kept in one SQLite file under the snapshotter's root.

containerd keeps its own record of which snapshots exist (its metadata database) and
asks the snapshotter for the rest: kind, parent, labels, and mounts. Both must survive
a restart of either process, so every change here is one SQLite transaction in a
write-ahead log with ``synchronous=FULL``: it is on disk when the call returns, and a
crash leaves the state before or after it, never between. A snapshot's directory
(``snapshots/<id>``, for ordinary snapshots only) is created inside the transaction
that adds its row and removed after the transaction that deletes it; a crash between
leaves a directory without a row, which Cleanup removes.

Kinds and their rules are containerd's (``snapshots.Kind``): an *active* snapshot is
writable and may be committed; a *view* is read-only and may not; a *committed* one is
immutable and may be a parent. A *remote* snapshot is a committed snapshot whose tree is
a store image's (``chain`` names the chain ID it stands for); it has no directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from imagefs.snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

VIEW, ACTIVE, COMMITTED = 1, 2, 3  # containerd's Kind enum values
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    chain TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


@dataclass(frozen=True)
class Snapshot:
    id: int
    key: str
    parent: str  # the parent's key ("" for none)
    kind: int
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    chain: str | None = None  # a remote snapshot: the chain ID whose store image it is
    size: int = 0  # bytes and inodes of a committed snapshot's own directory
    inodes: int = 0

    @property
    def remote(self) -> bool:
        return self.chain is not None


class MetaStore:
    """The snapshots table; every method is one transaction (thread-safe)."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # 0600 before SQLite opens it
        os.close(fd)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.RLock()
        with self._tx():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{path}: snapshot database version {version} is newer than this imagefs "
                                   f"understands ({SCHEMA_VERSION}); refusing to touch it")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    _COLUMNS = ("s.id, s.key, COALESCE(p.key, ''), s.kind, s.created_ns, s.updated_ns, s.labels, s.chain, "
                "s.size, s.inodes FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id")

    @staticmethod
    def _row(row: tuple) -> Snapshot:
        return Snapshot(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]), row[7], row[8], row[9])

    def _get(self, db: sqlite3.Connection, key: str) -> Snapshot | None:
        row = db.execute(f"SELECT {self._COLUMNS} WHERE s.key = ?", (key,)).fetchone()
        return self._row(row) if row else None

    def get(self, key: str) -> Snapshot | None:
        with self._lock:
            return self._get(self._db, key)

    def require(self, key: str) -> Snapshot:
        snap = self.get(key)
        if snap is None:
            raise NotFound(f"snapshot {key} does not exist")
        return snap

    def all(self) -> list[Snapshot]:
        with self._lock:
            return [self._row(r) for r in self._db.execute(f"SELECT {self._COLUMNS} ORDER BY s.id")]

    def ancestry(self, key: str) -> list[Snapshot]:
        """``key``'s snapshot and its parents, nearest first ([] if ``key`` is "")."""
        out: list[Snapshot] = []
        with self._lock:
            while key:
                snap = self._get(self._db, key)
                if snap is None:
                    raise NotFound(f"snapshot {key} does not exist")
                out.append(snap)
                key = snap.parent
        return out

    def create(self, key: str, parent: str, kind: int, labels: dict[str, str], *, chain: str | None = None,
               make_dir: Callable[[int], None] | None = None) -> Snapshot:
        """Add a snapshot (``make_dir(id)`` runs inside the transaction: if it fails,
        nothing was added). The parent must exist and be committed."""
        if not key:
            raise InvalidArgument("a snapshot key must not be empty")
        now = time.time_ns()
        with self._tx() as db:
            if self._get(db, key) is not None:
                raise AlreadyExists(f"snapshot {key} already exists")
            parent_id = None
            if parent:
                p = self._get(db, parent)
                if p is None:
                    raise NotFound(f"parent snapshot {parent} does not exist")
                if p.kind != COMMITTED:
                    raise InvalidArgument(f"parent snapshot {parent} is not committed (it is {KIND_NAMES[p.kind]})")
                parent_id = p.id
            cur = db.execute("INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns, labels, chain) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (key, parent_id, kind, now, now, json.dumps(labels), chain))
            sid = int(cur.lastrowid or 0)
            if make_dir is not None:
                make_dir(sid)
            snap = self._get(db, key)
        assert snap is not None
        return snap

    def commit(self, key: str, name: str, labels: dict[str, str], usage: Callable[[Snapshot], tuple[int, int]]) -> Snapshot:
        """Turn the active snapshot ``key`` into the committed snapshot ``name`` (same
        directory, same parent); ``usage`` measures its directory before it is frozen."""
        if not name:
            raise InvalidArgument("a committed snapshot's name must not be empty")
        with self._tx() as db:
            snap = self._get(db, key)
            if snap is None:
                raise NotFound(f"snapshot {key} does not exist")
            if snap.kind != ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is a {KIND_NAMES[snap.kind]} snapshot, not an active one: "
                                         "only active snapshots can be committed")
            if self._get(db, name) is not None:
                raise AlreadyExists(f"snapshot {name} already exists")
            size, inodes = usage(snap)
            db.execute("UPDATE snapshots SET key = ?, kind = ?, updated_ns = ?, labels = ?, size = ?, inodes = ? "
                       "WHERE id = ?", (name, COMMITTED, time.time_ns(), json.dumps(labels), size, inodes, snap.id))
            out = self._get(db, name)
        assert out is not None
        return out

    def remove(self, key: str) -> Snapshot:
        """Delete ``key``'s row; refused while another snapshot has it as parent."""
        with self._tx() as db:
            snap = self._get(db, key)
            if snap is None:
                raise NotFound(f"snapshot {key} does not exist")
            child = db.execute("SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1", (snap.id,)).fetchone()
            if child:
                raise FailedPrecondition(f"cannot remove snapshot {key}: snapshot {child[0]} has it as parent")
            db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

    def set_labels(self, key: str, change: Callable[[dict[str, str]], dict[str, str]]) -> Snapshot:
        """Replace ``key``'s labels with ``change(old labels)``."""
        with self._tx() as db:
            snap = self._get(db, key)
            if snap is None:
                raise NotFound(f"snapshot {key} does not exist")
            labels = change(dict(snap.labels))
            db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                       (json.dumps(labels), time.time_ns(), snap.id))
            out = self._get(db, key)
        assert out is not None
        return out

    def make_local(self, key: str, usage: tuple[int, int]) -> Snapshot:
        """A remote snapshot whose directory now holds its layer becomes an ordinary one."""
        with self._tx() as db:
            snap = self._get(db, key)
            if snap is None:
                raise NotFound(f"snapshot {key} does not exist")
            db.execute("UPDATE snapshots SET chain = NULL, size = ?, inodes = ? WHERE id = ?",
                       (usage[0], usage[1], snap.id))
            out = self._get(db, key)
        assert out is not None
        return out

    def ids(self) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}
