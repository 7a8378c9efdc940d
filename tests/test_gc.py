"""Garbage collection of a store (indexer/gc.py) against real stores: a local directory and
SeaweedFS, real builds, and a real ``imagefs index`` process running while gc runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from cache.blobstore import BlobStore, list_sizes
from cache.localstore import LocalStore
from indexer import catalog
from indexer import profile as profiles
from indexer.build import build_image
from indexer.gc import PLAN_PREFIX, TRASH_TOC_PREFIX, collect
from indexer.leases import Lease, live_lease_keys
from indexer.packer import load_known_chunks
from tests.support.images import write_oci_layout
from tests.support.indexed import index_entries
from tests.support.reference import reference_tree
from tests.support.tars import generated_file, make_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def _layers(tag: str) -> list[bytes]:
    base = make_tar([generated_file("base/a", 3 * MiB, seed=1), generated_file("base/b", 2 * MiB + 7, seed=2)])
    if tag == "base":
        return [base]
    return [base, make_tar([generated_file(f"{tag}/x", 3 * MiB, seed=hash(tag) % 1000 + 10)])]


def _layout(tmp_path: Any, tag: str) -> str:
    path = str(tmp_path / f"layout-{tag}")
    if not os.path.exists(path):
        write_oci_layout(path, _layers(tag), {"Cmd": ["/bin/sh"]})
    return f"oci:{path}:latest"


def _keys(store: BlobStore, prefix: str) -> set[str]:
    return set(store.list(prefix))


def _bytes(store: BlobStore) -> int:
    return sum(size for p in ("indexes/", "profiles/", "erofs/", "packs/", "packtoc/") for _k, size in list_sizes(store, p))


def _intact(store: BlobStore, name: str, tag: str) -> None:
    """The image reads back byte for byte, every pack it names present."""
    index = catalog.open_image(store, name)
    assert set(index.pack_keys()) <= _keys(store, "packs/")
    assert index_entries(index, store) == reference_tree(_layers(tag))


def test_gc_after_rm_shrinks_to_what_the_rest_needs(tmp_path: Any) -> None:
    alone = LocalStore(str(tmp_path / "alone"))
    build_image(_layout(tmp_path, "base"), alone, "base")
    store = LocalStore(str(tmp_path / "store"))
    build_image(_layout(tmp_path, "base"), store, "base")
    big = build_image(_layout(tmp_path, "big"), store, "big")
    assert big.reused_chunks > 0 and big.new_chunks > 0  # it shares the base's packs
    before = _bytes(store)

    catalog.remove_ref(store, "big")
    dry = collect(store, dry_run=True)
    assert _bytes(store) == before  # a dry run deletes nothing...
    report = collect(store)
    assert report.freed == dry.freed  # ...and says exactly what the real run frees
    assert report.freed["indexes"].count == 1 and report.freed["packs"].count >= 1
    assert report.store_bytes_before == before and report.store_bytes_after == _bytes(store)
    # Left: exactly what a store holding only the base holds.
    assert _keys(store, "packs/") == _keys(alone, "packs/")
    assert _keys(store, "indexes/") == _keys(alone, "indexes/")
    assert _bytes(store) == _bytes(alone)
    assert not _keys(store, PLAN_PREFIX) and not _keys(store, TRASH_TOC_PREFIX) and not _keys(store, "leases/")
    _intact(store, "base", "base")
    assert collect(store).freed_bytes == 0  # nothing left to take


def test_profiles_and_startup_packs_live_and_die_with_their_index(tmp_path: Any) -> None:
    store = LocalStore(str(tmp_path / "store"))
    base = build_image(_layout(tmp_path, "base"), store, "base").digest
    big = build_image(_layout(tmp_path, "big"), store, "big").digest

    def startup_pack(data: bytes) -> bytes:
        from cache.chunk import digest_of

        d = digest_of(data)
        store.put("packs/" + d.hex(), data)  # no table of contents, as imagefs optimize writes them
        return d

    kept, superseded, of_big = startup_pack(b"kept" * 100), startup_pack(b"old" * 100), startup_pack(b"big" * 100)
    profiles.save(store, profiles.Profile(base, (), packs=(kept,)))
    profiles.save(store, profiles.Profile(big, (), packs=(of_big,)))
    catalog.remove_ref(store, "big")
    report = collect(store)
    assert report.freed["profiles"].count == 2  # the profile and the EROFS metadata of the index
    packs = _keys(store, "packs/")
    assert "packs/" + kept.hex() in packs
    assert "packs/" + superseded.hex() not in packs and "packs/" + of_big.hex() not in packs
    assert _keys(store, "profiles/") == {profiles.profile_key(base)}
    _intact(store, "base", "base")


def test_a_damaged_index_of_a_name_stops_gc_before_it_deletes(tmp_path: Any) -> None:
    from indexer.gc import GcError

    store = LocalStore(str(tmp_path / "store"))
    build_image(_layout(tmp_path, "base"), store, "base")
    digest = build_image(_layout(tmp_path, "big"), store, "big").digest
    catalog.remove_ref(store, "base")  # the base's index is garbage now, its packs are big's
    store.put(catalog.index_key(digest), b"not an index")
    before = _bytes(store)
    with pytest.raises(GcError, match="cannot be read"):
        collect(store)
    assert _bytes(store) == before


class _Build:
    """A real build that, once it has read the store's tables of contents and its layers, lets
    a gc run (through its progress hook, on its own thread, while it holds its lease)."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.report: Any = None

    def phase(self, label: str, total: int | None = None) -> None:
        if label == "writing packs" and self.report is None:
            self.report = collect(self.store)

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Any) -> BlobStore:
    if request.param == "local":
        return LocalStore(str(tmp_path / "store"))
    return request.getfixturevalue("seaweed").store(f"gc-{os.getpid()}-{request.node.name}")


def test_gc_while_a_build_reuses_condemned_packs_loses_nothing(tmp_path: Any, any_store: BlobStore) -> None:
    store = any_store
    build_image(_layout(tmp_path, "base"), store, "base")
    build_image(_layout(tmp_path, "big"), store, "big")
    big_packs = set(catalog.open_image(store, "big").pack_keys()) - set(catalog.open_image(store, "base").pack_keys())
    catalog.remove_ref(store, "big")  # big's own packs are garbage now...

    during = _Build(store)
    again = build_image(_layout(tmp_path, "big"), store, "big2", progress=during)  # ...and reused by this build
    assert again.new_chunks == 0  # it named big's packs, read through their tables of contents
    r = during.report
    assert r.freed["packs"].count == 0 and r.deferred.count == len(big_packs)  # condemned, not deleted
    assert any("index oci:" in w for w in r.waiting_for)
    assert big_packs <= _keys(store, "packs/")
    _intact(store, "big2", "big")

    # The next gc sees the finished build's index: the packs are live again, their tables back.
    r2 = collect(store)
    assert r2.restored == len(big_packs) and r2.freed["packs"].count == 0
    assert r2.freed["indexes"].count == 0  # big2 is the same image as big: one index
    known = load_known_chunks(store, use_cache=False)
    assert {"packs/" + loc.pack.hex() for loc in known.values()} >= big_packs
    _intact(store, "big2", "big")
    assert not _keys(store, PLAN_PREFIX) and not _keys(store, TRASH_TOC_PREFIX)


def test_a_build_started_after_condemnation_does_not_pick_condemned_packs(tmp_path: Any) -> None:
    store = LocalStore(str(tmp_path / "store"))
    build_image(_layout(tmp_path, "base"), store, "base")
    build_image(_layout(tmp_path, "big"), store, "big")
    catalog.remove_ref(store, "big")
    with Lease(store, "a writer that is still running"):
        r = collect(store)
        assert r.deferred.count >= 1 and r.freed["packs"].count == 0
        assert collect(store).deferred.count == r.deferred.count  # the same packs, not counted twice...
        assert len(_keys(store, PLAN_PREFIX)) == 1  # ...nor condemned in a second plan
        late = build_image(_layout(tmp_path, "big"), store, "late")
        assert late.new_chunks > 0  # the condemned packs were invisible to it: it stored its own
    collect(store)  # the writer is gone: the condemned copies go, the late build's stay
    _intact(store, "late", "big")
    _intact(store, "base", "base")
    assert not _keys(store, PLAN_PREFIX)


class _Killed(BaseException):
    pass


class _DiesAfter(LocalStore):
    """A local store whose process 'dies' after ``budget`` writes or deletes (what a SIGKILL
    at that point leaves: every earlier write durable, no later one made)."""

    def __init__(self, root: str, budget: int) -> None:
        super().__init__(root)
        self.budget = budget

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise _Killed()

    def put(self, key: str, data: bytes) -> None:
        self._spend()
        super().put(key, data)

    def delete(self, key: str) -> None:
        self._spend()
        super().delete(key)


def test_gc_killed_at_any_point_leaves_a_store_the_next_gc_finishes(tmp_path: Any) -> None:
    import shutil

    seed = tmp_path / "seed"
    s = LocalStore(str(seed))
    build_image(_layout(tmp_path, "base"), s, "base")
    build_image(_layout(tmp_path, "big"), s, "big")
    build_image(_layout(tmp_path, "other"), s, "other")
    catalog.remove_ref(s, "big")
    catalog.remove_ref(s, "other")
    final = None
    for budget in range(0, 40):
        root = tmp_path / f"run{budget}"
        shutil.copytree(seed, root)
        try:
            collect(_DiesAfter(str(root), budget))
            done = True
        except _Killed:
            done = False
        store = LocalStore(str(root))
        _intact(store, "base", "base")  # whatever the point, the live image is whole
        assert set(load_known_chunks(store, use_cache=False)) >= {  # and a build still dedups against it
            c.digest for c in catalog.open_image(store, "base").all_chunks()}
        collect(store)
        if final is None:
            final = (_keys(store, "packs/"), _keys(store, "packtoc/"), _keys(store, "indexes/"))
        assert (_keys(store, "packs/"), _keys(store, "packtoc/"), _keys(store, "indexes/")) == final
        assert not _keys(store, PLAN_PREFIX) and not _keys(store, TRASH_TOC_PREFIX)
        if done:
            break
    else:
        pytest.fail("gc never finished within the budget")
    assert budget > 5  # the loop did interrupt it at many points


def test_leases_expire_when_their_writer_stops_renewing(tmp_path: Any) -> None:
    store = LocalStore(str(tmp_path / "store"))
    lease = Lease(store, "a writer", ttl=60)
    lease.__enter__()
    try:
        import time

        assert live_lease_keys(store) == [lease.key]
        assert live_lease_keys(store, now=time.time() + 61) == []  # judged dead past its ttl
    finally:
        lease.__exit__(None, None, None)
    assert live_lease_keys(store) == [] and not _keys(store, "leases/")


def _env(seaweed: Any) -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
            "AWS_REGION": "us-east-1", "IMAGEFS_S3_ENDPOINT": seaweed.endpoint, "PYTHONPATH": REPO}


def test_gc_on_s3_concurrent_with_an_index_process(tmp_path: Any, seaweed: Any) -> None:
    """A real ``imagefs index`` process into SeaweedFS while gc runs in a loop: the build may reuse
    packs gc finds dead (or, if gc hid them first, store its own); either way it ends up whole.
    (The exact interleaving where it reuses condemned packs is forced, on both stores, by
    test_gc_while_a_build_reuses_condemned_packs_loses_nothing.)"""
    prefix = f"gc-{os.getpid()}"
    store = seaweed.store(prefix)
    url = f"s3://{seaweed.bucket}/{prefix}"
    build_image(_layout(tmp_path, "base"), store, "base")
    build_image(_layout(tmp_path, "big"), store, "big")
    catalog.remove_ref(store, "big")  # big's packs are garbage until the build below names them
    layout = _layout(tmp_path, "big")
    proc = subprocess.Popen([sys.executable, "-m", "imagefs", "-q", "index", layout, "--store", url, "--name", "big2",
                             "--json"], env=_env(seaweed), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while proc.poll() is None and not live_lease_keys(store):
        time.sleep(0.005)  # gc from the moment the build holds its lease, until it has exited
    runs = 0
    while proc.poll() is None or runs == 0:
        collect(store)
        runs += 1
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["name"] == "big2"
    collect(store)
    _intact(store, "big2", "big")
    _intact(store, "base", "base")
    assert not _keys(store, "leases/") and not _keys(store, PLAN_PREFIX) and not _keys(store, TRASH_TOC_PREFIX)
    # Once nothing is being written, the whole of the dead image goes.
    catalog.remove_ref(store, "big2")
    collect(store)
    assert _keys(store, "indexes/") == {catalog.index_key(catalog.resolve(store, "base"))}
    assert _keys(store, "packs/") == set(catalog.open_image(store, "base").pack_keys())


def test_a_plan_that_names_anything_but_garbage_kinds_is_ignored(tmp_path: Any) -> None:
    import json

    store = LocalStore(str(tmp_path / "store"))
    build_image(_layout(tmp_path, "base"), store, "base")
    store.put(PLAN_PREFIX + "evil", json.dumps({"indexes": ["refs/base"], "profiles": [], "packs": ["packs/../refs/base"],
                                                "leases": []}).encode())
    collect(store)
    assert catalog.resolve(store, "base")  # the name is still there
    _intact(store, "base", "base")


def test_erofs_metadata_lives_and_dies_with_its_index(tmp_path: "os.PathLike[str]") -> None:
    """indexer.erofs.store writes erofs/<index hex>.v<N> beside each index: gc keeps it
    while the index is named and deletes it with the index."""
    from indexer.build import build_image
    from indexer.erofs import store as erofs_store
    from indexer.gc import collect
    from tests.support.images import write_oci_layout
    from tests.support.tars import feature_layers

    store = LocalStore(str(tmp_path / "store"))
    layout = str(tmp_path / "layout")
    write_oci_layout(layout, feature_layers())
    res = build_image(f"oci:{layout}:latest", store, "img")
    key = erofs_store.metadata_key(res.digest)
    assert store.exists(key)
    collect(store)
    assert store.exists(key)  # live: its index is named
    store.delete("refs/img")
    collect(store)
    assert not store.exists(key) and not any(store.list("indexes/"))
