"""What imagefs keeps on a host is root's alone: caches, index copies, tables of contents,
run files; and what an older version left wider is tightened when it is opened again."""

from __future__ import annotations

import os
import stat

import pytest

from cache.chunk import ChunkRef, compress, digest_of
from cache.localstore import LocalStore
from cache.private import open_private, private_dir
from cache.ssd import SSDTier
from imagefs.index_cache import load_index
from indexer.build import build_image
from indexer.packer import load_known_chunks
from tests.support.images import write_oci_layout
from tests.support.mounts import ImageBuilder
from tests.support.tars import file, make_tar


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tree_modes(top: str) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            out[os.path.relpath(os.path.join(dirpath, name), top)] = mode(os.path.join(dirpath, name))
    return out


def assert_private(top: str) -> None:
    for rel, m in tree_modes(top).items():
        assert m & 0o077 == 0, (rel, oct(m))


def test_private_dir_tightens_only_what_imagefs_owns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    new = str(tmp_path / "a" / "b")
    private_dir(new)
    assert mode(new) == 0o700
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o755)
    private_dir(str(wide), owned=False)  # named by the user: may be shared, left as it is
    assert mode(str(wide)) == 0o755
    private_dir(str(wide))
    assert mode(str(wide)) == 0o700


def test_open_private_tightens_an_existing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "old.log"
    path.write_bytes(b"old\n")
    os.chmod(path, 0o644)
    os.close(open_private(str(path), os.O_WRONLY | os.O_APPEND))
    assert mode(str(path)) == 0o600
    os.close(open_private(str(tmp_path / "new.log"), os.O_WRONLY))
    assert mode(str(tmp_path / "new.log")) == 0o600


@pytest.mark.parametrize("frames", [False, True], ids=["host-ssd", "az-server-frames"])
def test_ssd_cache_is_private_and_an_older_wide_one_is_tightened(tmp_path, frames: bool) -> None:  # type: ignore[no-untyped-def]
    top = tmp_path / "cache"
    old_chunks = top / "chunks" / "ab"
    old_chunks.mkdir(parents=True, mode=0o755)
    os.chmod(top / "chunks", 0o755)
    os.chmod(top, 0o755)
    (old_chunks / "ab00").write_bytes(b"left by an older version")
    os.chmod(old_chunks / "ab00", 0o644)
    tier = SSDTier(str(top), 1 << 20, frames=frames)
    try:
        data = b"image content " * 100
        ref = ChunkRef(digest_of(data), "packs/x", 0, len(data), len(data))
        tier.put(ref, compress(data) if frames else data)
        assert tier.contains(ref.digest)
        for own in ("chunks", "tmp", "meta.lmdb"):
            assert mode(str(top / own)) == 0o700, own
        assert mode(str(top)) == 0o755  # a directory the user named is left; what is in it is closed
        path = tier.path_of(ref.digest)
        assert mode(path) == 0o600 and mode(os.path.dirname(path)) == 0o700
        for name in os.listdir(top / "meta.lmdb"):
            assert mode(str(top / "meta.lmdb" / name)) & 0o077 == 0, name
    finally:
        tier.close()


def test_a_new_ssd_cache_directory_is_0700(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tier = SSDTier(str(tmp_path / "fresh"), 1 << 20)
    tier.close()
    assert mode(str(tmp_path / "fresh")) == 0o700
    assert_private(str(tmp_path / "fresh"))


def test_index_copies_are_private_and_tightened_on_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = LocalStore(str(tmp_path / "store"))
    b = ImageBuilder()
    b.file("etc/secret-name", b"x")
    digest = b.write(store, "img").digest
    cache = str(tmp_path / "cache")
    load_index(store, digest, cache)
    assert mode(os.path.join(cache, "indexes")) == 0o700
    assert_private(os.path.join(cache, "indexes"))
    os.chmod(os.path.join(cache, "indexes"), 0o755)  # as an older version left it
    load_index(store, digest, cache)  # answered from the copy
    assert mode(os.path.join(cache, "indexes")) == 0o700


def test_packtoc_copies_are_private(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = LocalStore(str(tmp_path / "store"))
    write_oci_layout(str(tmp_path / "layout"), [make_tar([file("data", b"y" * 5000)])], {})
    build_image(f"oci:{tmp_path / 'layout'}:latest", store, "img")  # writes a pack and its table of contents
    os.makedirs(tmp_path / "xdg" / "imagefs", exist_ok=True)
    os.chmod(tmp_path / "xdg" / "imagefs", 0o755)  # as an older version left it
    assert load_known_chunks(store)
    assert mode(str(tmp_path / "xdg" / "imagefs")) == 0o700
    tocs = tree_modes(str(tmp_path / "xdg" / "imagefs"))
    assert any(m == 0o600 for m in tocs.values()), tocs  # at least one copy was written
    assert_private(str(tmp_path / "xdg" / "imagefs"))


def test_the_run_dir_is_private(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import imagefs.mount as mount

    named = tmp_path / "named"
    named.mkdir(mode=0o755)
    os.chmod(named, 0o755)
    monkeypatch.setenv("IMAGEFS_RUN_DIR", str(named))
    assert mount.private_run_dir() == str(named)
    assert mode(str(named)) == 0o755  # the user's directory: its files are private, it is left
    monkeypatch.setenv("IMAGEFS_RUN_DIR", str(tmp_path / "missing"))
    mount.private_run_dir()
    assert mode(str(tmp_path / "missing")) == 0o700
    # The default (/run/imagefs for root) is imagefs's own: one left wider is tightened.
    default = tmp_path / "default"
    default.mkdir(mode=0o755)
    os.chmod(default, 0o755)
    monkeypatch.delenv("IMAGEFS_RUN_DIR")
    monkeypatch.setattr(mount, "run_dir", lambda: str(default))
    mount.private_run_dir()
    assert mode(str(default)) == 0o700
