"""Indexing end to end: OCI sources in, a store with chunks and an index out.

Each test builds real images in code, indexes them through the real sources and
layer merge, and checks the result against an independent reference extraction
(tests/support/reference.py) or against the store's own bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from typing import Callable

import pytest

from cache.localstore import LocalStore
from indexer.build import build_image
from indexer.catalog import list_images, open_image, read_ref
from tests.support.chunks import dir_snapshot
from tests.support.images import write_docker_archive, write_oci_layout
from tests.support.indexed import file_bytes, index_entries
from tests.support.reference import reference_tree
from tests.support.tars import feature_layers, file, generated_file, make_tar

CONFIG = {"Env": ["PATH=/usr/bin:/bin", "A=1"], "Cmd": ["/bin/sh"], "WorkingDir": "/srv", "User": "1000:1000",
          "Labels": {"org.example": "yes"}}


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_oci_layout_index_matches_reference(tmp_path, compression: str) -> None:  # type: ignore[no-untyped-def]
    layers = feature_layers()
    digest = write_oci_layout(str(tmp_path / "layout"), layers, CONFIG, compression=compression)
    store = LocalStore(str(tmp_path / "store"))
    result = build_image(f"oci:{tmp_path / 'layout'}:latest", store, "features")
    index = open_image(store, "features")
    assert index.digest == result.digest
    assert index_entries(index, store) == reference_tree(layers)
    assert "manifest_digest" not in index.meta and "source" not in index.meta  # how it travelled: the name's
    origin = read_ref(store, "features").origin  # type: ignore[union-attr]
    assert origin["manifest_digest"] == digest and origin["source"] == f"oci:{tmp_path / 'layout'}:latest"
    assert index.config["Env"] == CONFIG["Env"] and index.config["User"] == "1000:1000"
    assert index.config["WorkingDir"] == "/srv" and index.config["Labels"] == {"org.example": "yes"}


def test_docker_archive_index_matches_reference(tmp_path) -> None:  # type: ignore[no-untyped-def]
    layers = feature_layers()
    write_docker_archive(str(tmp_path / "saved.tar"), layers, CONFIG)
    store = LocalStore(str(tmp_path / "store"))
    result = build_image(f"docker-archive:{tmp_path / 'saved.tar'}", store)
    assert result.name == "saved:latest"
    assert index_entries(open_image(store, "saved:latest"), store) == reference_tree(layers)


def test_registry_index_matches_reference(tmp_path, registry) -> None:  # type: ignore[no-untyped-def]
    layers = feature_layers()
    write_oci_layout(str(tmp_path / "layout"), layers, CONFIG, compression="zstd")
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:latest",
         f"docker://{registry.host}/test/features:v1"],
        check=True,
    )
    store = LocalStore(str(tmp_path / "store"))
    result = build_image(f"docker://{registry.host}/test/features:v1", store)
    assert result.name == f"{registry.host}/test/features:v1"  # the registry host stays in the name
    assert index_entries(open_image(store, f"{registry.host}/test/features:v1"), store) == reference_tree(layers)


def test_one_image_one_digest_whatever_the_source(tmp_path, registry) -> None:  # type: ignore[no-untyped-def]
    """The same image from oci: zstd, oci: gzip, docker-archive: and docker:// (gzip) is one index
    in a store: the digest covers what the mount serves; where each name came from is kept with it."""
    layers = feature_layers()
    zstd = write_oci_layout(str(tmp_path / "zstd"), layers, CONFIG, compression="zstd")
    gzip = write_oci_layout(str(tmp_path / "gzip"), layers, CONFIG, compression="gzip")
    assert zstd != gzip  # different manifests, different layer blobs
    write_docker_archive(str(tmp_path / "saved.tar"), layers, CONFIG)
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{tmp_path / 'gzip'}:latest",
                    f"docker://{registry.host}/same/img:gz"], check=True)
    store = LocalStore(str(tmp_path / "store"))
    sources = [f"oci:{tmp_path / 'zstd'}:latest", f"oci:{tmp_path / 'gzip'}:latest",
               f"docker-archive:{tmp_path / 'saved.tar'}", f"docker://{registry.host}/same/img:gz"]
    results = [build_image(src, store, f"n{i}") for i, src in enumerate(sources)]
    assert len({r.digest for r in results}) == 1, [r.digest for r in results]
    assert results[0].new_chunks > 0 and all(r.new_chunks == 0 for r in results[1:])
    assert [r.name for r in list_images(store)] == ["n0", "n1", "n2", "n3"]  # no <none>: one index
    assert [read_ref(store, f"n{i}").origin["source"] for i in range(4)] == sources  # type: ignore[union-attr]
    # A second store laid out the same way gets the same digest too: the index is a function of the tree.
    other = LocalStore(str(tmp_path / "other"))
    assert build_image(sources[3], other, "x").digest == results[0].digest


def test_s3_store_round_trip(tmp_path, seaweed) -> None:  # type: ignore[no-untyped-def]
    layers = feature_layers()
    write_oci_layout(str(tmp_path / "layout"), layers, CONFIG)
    store = seaweed.store("build-test")
    build_image(f"oci:{tmp_path / 'layout'}:latest", store, "features:s3")
    assert [r.name for r in list_images(store)] == ["features:s3"]
    assert index_entries(open_image(store, "features:s3"), store) == reference_tree(layers)


def _pack_bytes(root: str) -> int:
    packs = os.path.join(root, "packs")
    return sum(os.path.getsize(os.path.join(packs, f)) for f in os.listdir(packs)) if os.path.isdir(packs) else 0


def test_shared_layers_are_stored_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = make_tar([generated_file("usr/lib/libbase.so", 3 << 20, seed=11), file("etc/os-release", b"base\n")])
    mid = make_tar([generated_file("opt/venv/numpy.so", 2 << 20, seed=12)])
    top = make_tar([generated_file("opt/venv/torch.so", 5 << 20, seed=13), file("opt/venv/torch.py", b"import x\n")])
    root = str(tmp_path / "store")
    store = LocalStore(root)
    write_oci_layout(str(tmp_path / "a"), [base, mid])
    write_oci_layout(str(tmp_path / "b"), [base, mid, top])
    first = build_image(f"oci:{tmp_path / 'a'}:latest", store, "numpy")
    after_first = _pack_bytes(root)
    second = build_image(f"oci:{tmp_path / 'b'}:latest", store, "torch")
    added = _pack_bytes(root) - after_first
    a, b = open_image(store, "numpy"), open_image(store, "torch")
    only_in_b = {c.digest: c.clen for c in b.all_chunks()} .items() - {c.digest: c.clen for c in a.all_chunks()}.items()
    # The packs grew by exactly the compressed bytes of chunks the first image lacked.
    assert added == sum(clen for _d, clen in only_in_b) == second.stored_bytes
    assert second.reused_chunks == first.chunks and added < after_first * 2
    # Indexing the same image again stores no chunk at all.
    again = build_image(f"oci:{tmp_path / 'b'}:latest", store, "torch-again")
    assert again.new_chunks == 0 and again.stored_bytes == 0 and _pack_bytes(root) == after_first + added


def test_duplicate_files_inside_one_image_share_chunks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    blob = os.urandom(1 << 20) + b"tail"
    layer = make_tar([file("a/one", blob), file("b/two", blob), file("c/three", blob[: 1 << 20])])
    write_oci_layout(str(tmp_path / "l"), [layer])
    store = LocalStore(str(tmp_path / "s"))
    result = build_image(f"oci:{tmp_path / 'l'}:latest", store, "dups")
    assert result.chunks == 2 and result.new_chunks == 2  # the 1 MiB head and the tail
    index = open_image(store, "dups")
    assert file_bytes(index, store, index.resolve("b/two")) == blob


# ------------------------------------------------------------------- bad input


def _layout_json(layout: str, digest: str) -> dict:  # type: ignore[type-arg]
    with open(os.path.join(layout, "blobs", "sha256", digest.split(":")[1])) as f:
        return json.load(f)


def _put_blob(layout: str, data: bytes) -> tuple[str, int]:
    hexd = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", hexd), "wb") as f:
        f.write(data)
    return "sha256:" + hexd, len(data)


def _rewrite_manifest(layout: str, edit: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    """Edit the manifest JSON and re-point index.json at the edited copy."""
    with open(os.path.join(layout, "index.json")) as f:
        idx = json.load(f)
    manifest = _layout_json(layout, idx["manifests"][0]["digest"])
    edit(manifest)
    digest, size = _put_blob(layout, json.dumps(manifest).encode())
    idx["manifests"][0].update(digest=digest, size=size)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(idx, f)


def _layer_path(layout: str, n: int = 0) -> str:
    with open(os.path.join(layout, "index.json")) as f:
        idx = json.load(f)
    layer = _layout_json(layout, idx["manifests"][0]["digest"])["layers"][n]
    return os.path.join(layout, "blobs", "sha256", layer["digest"].split(":")[1])


def _bad_tar(kind: str) -> bytes:
    from tests.support.tars import END, raw_member, raw_pax

    if kind == "dotdot":
        return raw_member(b"etc/../../escape", b"x") + END
    if kind == "absolute":
        return raw_member(b"/etc/passwd", b"x") + END
    if kind == "nul":
        return raw_pax({b"path": b"etc/bad\0name"}) + raw_member(b"etc/placeholder", b"x") + END
    if kind == "hardlink":
        return raw_member(b"etc/link", typeflag=b"1", linkname=b"etc/missing-target") + END
    raise AssertionError(kind)


def _truncate(layout: str) -> None:
    path = _layer_path(layout)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _corrupt(layout: str) -> None:
    path = _layer_path(layout)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)


def _relabelled(breaker: Callable[[str], None]) -> Callable[[str], None]:
    """Break the layer blob, then make the manifest describe the broken bytes, as a
    publisher that wrote a broken stream would: only decompression can catch it."""

    def apply(layout: str) -> None:
        breaker(layout)
        data = open(_layer_path(layout), "rb").read()
        digest, size = _put_blob(layout, data)
        _rewrite_manifest(layout, lambda m: m["layers"][0].update(digest=digest, size=size))

    return apply


# (case, compression, layers kind, how to break the layout, words the message must hold)
BAD_INPUTS = [
    ("dotdot", "gzip", "dotdot", None, ["..", "escape"]),
    ("absolute", "gzip", "absolute", None, ["/etc/passwd", "absolute"]),
    ("nul", "gzip", "nul", None, ["NUL"]),
    ("missing hardlink target", "gzip", "hardlink", None, ["etc/link", "missing-target"]),
    ("digest mismatch", "none", "good", _corrupt, ["digest"]),
    ("size mismatch", "gzip", "good",
     lambda l: _rewrite_manifest(l, lambda m: m["layers"][0].update(size=m["layers"][0]["size"] + 7)), ["size"]),
    ("truncated gzip", "gzip", "good", _relabelled(_truncate), ["gzip"]),
    ("truncated zstd", "zstd", "good", _relabelled(_truncate), ["zstd"]),
    ("corrupt zstd", "zstd", "good", _relabelled(_corrupt), ["zstd"]),
    ("corrupt gzip", "gzip", "good", _relabelled(_corrupt), ["gzip"]),
    ("unknown media type", "gzip", "good",
     lambda l: _rewrite_manifest(l, lambda m: m["layers"][0].update(mediaType="application/x-mystery")), ["application/x-mystery"]),
    ("manifest not JSON", "gzip", "good", lambda l: _rewrite_manifest_raw(l, b"<html>not json</html>"), ["JSON"]),
]


def _rewrite_manifest_raw(layout: str, data: bytes) -> None:
    with open(os.path.join(layout, "index.json")) as f:
        idx = json.load(f)
    digest, size = _put_blob(layout, data)
    idx["manifests"][0].update(digest=digest, size=size)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(idx, f)


@pytest.mark.parametrize("case,compression,kind,breaker,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_and_store_unchanged(tmp_path, capsys, case, compression, kind, breaker, words) -> None:  # type: ignore[no-untyped-def]
    from imagefs.cli import main

    root = str(tmp_path / "store")
    good = make_tar([generated_file("usr/lib/big", (1 << 20) * 2 + 5, seed=3), file("etc/ok", b"ok\n")])
    write_oci_layout(str(tmp_path / "good"), [good])
    assert main(["-q", "index", f"oci:{tmp_path / 'good'}:latest", "--store", root, "--name", "good"]) == 0
    before = dir_snapshot(root)

    layout = str(tmp_path / "bad")
    layers = [good] if kind == "good" else [good, _bad_tar(kind)]
    write_oci_layout(layout, layers, compression=compression)
    if breaker:
        breaker(layout)
    capsys.readouterr()
    code = main(["index", f"oci:{layout}:latest", "--store", root, "--name", "bad"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("imagefs: ") and err.count("\n") == 1, err  # one line, no traceback
    assert layout in err, err  # names the input
    for word in words:
        assert word in err, (word, err)
    assert dir_snapshot(root) == before


def test_a_decompression_bomb_is_refused_and_store_unchanged(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from imagefs.cli import main

    root = str(tmp_path / "store")
    write_oci_layout(str(tmp_path / "good"), [make_tar([file("etc/ok", b"ok\n")])])
    assert main(["-q", "index", f"oci:{tmp_path / 'good'}:latest", "--store", root, "--name", "good"]) == 0
    before = dir_snapshot(root)
    layout = str(tmp_path / "bomb")
    write_oci_layout(layout, [make_tar([file("etc/ok", b"ok\n"), file("zeros", bytes(48 << 20))])], compression="gzip")
    capsys.readouterr()
    code = main(["index", f"oci:{layout}:latest", "--store", root, "--name", "bomb", "--max-layer-size", "16M"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("imagefs: ") and err.count("\n") == 1, err
    assert layout in err and "decompresses to more than 16777216 bytes" in err and "--max-layer-size" in err, err
    assert dir_snapshot(root) == before


@pytest.mark.parametrize("status,words", [(401, "authentication required"), (404, "manifest unknown"), (500, "500")])
def test_registry_errors_are_refused_and_store_unchanged(tmp_path, capsys, status: int, words: str) -> None:  # type: ignore[no-untyped-def]
    from imagefs.cli import main
    from tests.support.registry import status_server

    root = str(tmp_path / "store")
    write_oci_layout(str(tmp_path / "good"), [make_tar([file("etc/ok", b"ok\n")])])
    assert main(["-q", "index", f"oci:{tmp_path / 'good'}:latest", "--store", root, "--name", "good"]) == 0
    before = dir_snapshot(root)
    with status_server(status) as srv:
        ref = f"docker://{srv.host}/app:1"
        capsys.readouterr()
        code = main(["index", ref, "--store", root])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"imagefs: {ref}") and words in err, err
    assert dir_snapshot(root) == before


class _FlakyPackStore(LocalStore):
    """A real local store whose disk fails one pack write (a fault that cannot be made
    on demand for real) while the other pack writes are slow."""

    def __init__(self, root: str, fail_at: int) -> None:
        super().__init__(root)
        self.fail_at = fail_at
        self.packs = 0

    def put(self, key: str, data: bytes) -> None:
        import time

        from cache.blobstore import BlobStoreError

        if key.startswith("packs/"):
            self.packs += 1
            if self.packs == self.fail_at:
                raise BlobStoreError(f"{self.url}: writing {key}: No space left on device")
            time.sleep(0.2)
        super().put(key, data)


def test_a_failed_pack_upload_is_never_lost_behind_slower_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cache.blobstore import BlobStoreError
    from indexer.chunker import ChunkSpill
    from indexer.packer import UPLOAD_WORKERS, write_packs

    n = UPLOAD_WORKERS * 2 + 1
    with ChunkSpill(set(), 64 * 1024) as spill:
        digests = [d for i in range(n) for d in spill.add_file(b"f", 64 * 1024, io.BytesIO(os.urandom(64 * 1024)))]
        spill.finish()
        store = _FlakyPackStore(str(tmp_path / "store"), fail_at=2)  # fails fast while pack 1 is still writing
        with pytest.raises(BlobStoreError, match="No space left"):
            write_packs(store, spill, digests, target_size=1)  # one chunk per pack
