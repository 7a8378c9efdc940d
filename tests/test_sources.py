"""Image sources from local files: OCI layouts, docker save archives, and the verified
layer stream every transport shares (indexer/sources/blobs.py)."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import zstandard

from indexer.sources import LayerBlob, SourceError, open_source
from indexer.sources.blobs import Layer
from tests.support.images import (
    LAYER_MEDIA_TYPES, compress, make_tar, sha256, write_docker_archive, write_oci_layout,
)

_rng = random.Random(1234)
# Two layers; the first spans several 1 MiB blocks, compressed and not.
TAR1 = make_tar({"etc/": None, "etc/hello": b"hello\n", "usr/blob": _rng.randbytes(2_500_000), "usr/text": b"imagefs " * 200_000})
TAR2 = make_tar({"etc/hello": b"replaced\n", "tmp/": None})
LAYERS = [TAR1, TAR2]
CONFIG = {"Env": ["PATH=/usr/bin", "A=1"], "Cmd": ["/bin/sh"], "WorkingDir": "/"}


def read_all(src: Any) -> list[bytes]:
    out = []
    for layer in src.layers:
        with layer.open() as f:
            out.append(f.read())
    return out


def blob_layer(raw: bytes, media_type: str, digest: str | None = None, size: int | None = None, **kw: Any) -> LayerBlob:
    return Layer(digest=digest or sha256(raw), size=len(raw) if size is None else size, media_type=media_type,
                 opener=lambda: io.BytesIO(raw), source="test:blob", **kw)


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest.split(":", 1)[1]


def replace_blob(root: Path, old: str, data: bytes) -> str:
    """Store ``data`` as a blob and point every descriptor of ``old`` at it (the
    manifests and indexes that change on the way are re-stored the same way)."""
    new = sha256(data)
    blob_path(root, new).write_bytes(data)
    for p in [*(root / "blobs" / "sha256").iterdir(), root / "index.json"]:
        if p.name == new[7:] or not p.exists() or old.encode() not in p.read_bytes():
            continue
        doc = json.loads(p.read_bytes())
        _replace_desc(doc, old, new, len(data))
        out = json.dumps(doc).encode()
        if p.name == "index.json":
            p.write_bytes(out)
        else:
            replace_blob(root, "sha256:" + p.name, out)
    return new


def _replace_desc(obj: Any, old: str, new: str, size: int) -> None:
    if isinstance(obj, dict):
        if obj.get("digest") == old:
            obj["digest"], obj["size"] = new, size
        for v in obj.values():
            _replace_desc(v, old, new, size)
    elif isinstance(obj, list):
        for v in obj:
            _replace_desc(v, old, new, size)


def manifest_of(root: Path, digest: str) -> dict[str, Any]:
    return json.loads(blob_path(root, digest).read_bytes())


# -- OCI layout ------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_oci_layout_yields_original_tars(tmp_path: Path, compression: str) -> None:
    digest = write_oci_layout(str(tmp_path / "img"), LAYERS, CONFIG, compression=compression, tag="v1")
    src = open_source(f"oci:{tmp_path}/img:v1")
    assert src.reference == f"oci:{tmp_path}/img:v1"
    assert src.manifest_digest == digest
    assert src.config["config"] == CONFIG
    assert [lb.media_type for lb in src.layers] == [LAYER_MEDIA_TYPES[compression]] * 2
    assert read_all(src) == LAYERS


def test_oci_layout_without_tag_takes_the_only_image(tmp_path: Path) -> None:
    digest = write_oci_layout(str(tmp_path), LAYERS)
    assert open_source(f"oci:{tmp_path}").manifest_digest == digest


def test_oci_layout_with_several_tags_needs_one(tmp_path: Path) -> None:
    a = write_oci_layout(str(tmp_path), [TAR1], tag="a")
    b = write_oci_layout(str(tmp_path), [TAR2], tag="b")
    assert open_source(f"oci:{tmp_path}:a").manifest_digest == a
    assert open_source(f"oci:{tmp_path}:b").manifest_digest == b
    with pytest.raises(SourceError, match=r"holds 2 images; name one as DIR:TAG \(tags: a, b\)") as e:
        open_source(f"oci:{tmp_path}")
    assert str(tmp_path) in str(e.value)
    with pytest.raises(SourceError, match=r"no image tagged 'c' \(tags: a, b\)"):
        open_source(f"oci:{tmp_path}:c")


def test_platform_selection_from_an_index(tmp_path: Path) -> None:
    extra = [("linux", "arm64", "v8"), ("linux", "arm", "v7"), ("windows", "amd64")]
    digest = write_oci_layout(str(tmp_path), LAYERS, compression="zstd", extra_platforms=extra)
    default = open_source(f"oci:{tmp_path}:latest")
    assert default.manifest_digest == digest and default.config["architecture"] == "amd64"
    arm64 = open_source(f"oci:{tmp_path}:latest", platform="linux/arm64")  # arm64 means arm64/v8
    assert (arm64.config["architecture"], arm64.config["variant"]) == ("arm64", "v8")
    assert arm64.manifest_digest != digest
    assert read_all(arm64) == LAYERS
    assert open_source(f"oci:{tmp_path}", platform="linux/arm/v7").config["variant"] == "v7"
    with pytest.raises(SourceError) as e:
        open_source(f"oci:{tmp_path}", platform="linux/s390x")
    msg = str(e.value)
    assert "no image for platform linux/s390x" in msg
    assert "available: linux/amd64, linux/arm/v7, linux/arm64/v8, windows/amd64" in msg
    with pytest.raises(SourceError, match=r"invalid platform 'linux'"):
        open_source(f"oci:{tmp_path}", platform="linux")


def test_single_platform_image_must_match_an_explicit_platform(tmp_path: Path) -> None:
    write_oci_layout(str(tmp_path), LAYERS, platform=("linux", "arm64"))
    assert open_source(f"oci:{tmp_path}").config["architecture"] == "arm64"  # no platform asked: take it
    with pytest.raises(SourceError, match=r"image is for platform linux/arm64, not linux/amd64"):
        open_source(f"oci:{tmp_path}", platform="linux/amd64")


# -- docker archive ----------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_docker_archive_yields_original_tars(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "img.tar"
    write_docker_archive(str(path), LAYERS, CONFIG, compression=compression)
    src = open_source(f"docker-archive:{path}")
    assert src.config["config"] == CONFIG
    # the descriptor digest of a docker save layer is its diff_id
    assert [lb.digest for lb in src.layers] == [sha256(t) for t in LAYERS] == src.config["rootfs"]["diff_ids"]
    assert read_all(src) == LAYERS
    assert src.manifest_digest.startswith("sha256:")
    assert open_source(f"docker-archive:{path}").manifest_digest == src.manifest_digest  # stable


def test_docker_archive_follows_linked_layers_and_picks_by_tag(tmp_path: Path) -> None:
    # the same layer twice: docker save stores it once and links the second path
    a, b = tmp_path / "a.tar", tmp_path / "both.tar"
    write_docker_archive(str(a), [TAR2, TAR1], repo_tag="first:1")
    with tarfile.open(a) as src_tf, tarfile.open(b, "w") as out:
        manifest = json.loads(src_tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        for m in src_tf.getmembers():
            if m.name != "manifest.json":
                out.addfile(m, src_tf.extractfile(m) if m.isreg() else None)
        link = tarfile.TarInfo("dup/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../" + manifest[0]["Layers"][0]
        out.addfile(link)
        second = dict(manifest[0], RepoTags=["second:2"], Layers=["dup/layer.tar", manifest[0]["Layers"][1]])
        data = json.dumps(manifest + [second]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    assert read_all(open_source(f"docker-archive:{b}:second:2")) == [TAR2, TAR1]
    assert read_all(open_source(f"docker-archive:{b}:@0")) == [TAR2, TAR1]
    with pytest.raises(SourceError, match=r"holds 2 images; name one .*tags: first:1, second:2"):
        open_source(f"docker-archive:{b}")
    with pytest.raises(SourceError, match=r"no image tagged 'third:3'"):
        open_source(f"docker-archive:{b}:third:3")


def test_docker_archive_in_oci_layout_form(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    digest = write_oci_layout(str(layout), LAYERS, compression="gzip", tag="7")
    archive = tmp_path / "oci.tar"
    with tarfile.open(archive, "w") as tf:
        for name in sorted(os.listdir(layout)):
            tf.add(layout / name, arcname=name)
    src = open_source(f"docker-archive:{archive}")
    assert src.manifest_digest == digest
    assert read_all(src) == LAYERS


def test_docker_archive_bad_inputs(tmp_path: Path) -> None:
    path = tmp_path / "img.tar"
    write_docker_archive(str(path), LAYERS)
    with pytest.raises(SourceError, match=r"no such file"):
        open_source(f"docker-archive:{tmp_path}/nope.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(SourceError, match=r"junk.tar: not a tar archive"):
        open_source(f"docker-archive:{tmp_path}/junk.tar")
    gz = tmp_path / "img.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(SourceError, match=r"img.tar.gz: the archive is compressed"):
        open_source(f"docker-archive:{gz}")

    # a layer whose bytes differ from the config's diff_id: caught when read
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(path) as tf, tarfile.open(tampered, "w") as out:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith("layer.tar") and data == TAR2:
                data = TAR2.replace(b"replaced", b"REPLACED")
            out.addfile(m, io.BytesIO(data))
    src = open_source(f"docker-archive:{tampered}")
    with pytest.raises(SourceError) as e:
        read_all(src)
    assert f"layer {sha256(TAR2)} of docker-archive:{tampered}: digest mismatch" in str(e.value)

    # a manifest.json naming a layer the archive does not have
    missing = tmp_path / "missing.tar"
    with tarfile.open(path) as tf, tarfile.open(missing, "w") as out:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "manifest.json":
                doc = json.loads(data)
                doc[0]["Layers"][1] = "gone/layer.tar"
                data = json.dumps(doc).encode()
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    with pytest.raises(SourceError, match=r"missing.tar: layer 1 \(sha256:[0-9a-f]{64}\) is missing: no file 'gone/layer.tar'"):
        open_source(f"docker-archive:{missing}")


# -- bad OCI layouts ----------------------------------------------------------------------


def test_missing_layout_pieces(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"no such directory"):
        open_source(f"oci:{tmp_path}/none")
    digest = write_oci_layout(str(tmp_path), LAYERS)
    layer = manifest_of(tmp_path, digest)["layers"][1]["digest"]
    blob_path(tmp_path, layer).unlink()
    with pytest.raises(SourceError) as e:
        open_source(f"oci:{tmp_path}")
    assert f"oci:{tmp_path}: layer blob {layer} is missing (blobs/sha256/{layer[7:]})" == str(e.value)
    blob_path(tmp_path, digest).unlink()
    with pytest.raises(SourceError, match=rf"manifest blob {digest}: blobs/sha256/{digest[7:]} is missing"):
        open_source(f"oci:{tmp_path}")
    (tmp_path / "oci-layout").unlink()
    with pytest.raises(SourceError, match=r"not an OCI image layout \(no oci-layout file\)"):
        open_source(f"oci:{tmp_path}")


def test_manifest_not_json(tmp_path: Path) -> None:
    digest = write_oci_layout(str(tmp_path), LAYERS)
    garbage = b"<html>this is not a manifest</html>"
    replace_blob(tmp_path, digest, garbage)
    with pytest.raises(SourceError) as e:
        open_source(f"oci:{tmp_path}")
    assert str(e.value).startswith(f"oci:{tmp_path}: manifest {sha256(garbage)} is not JSON")


def test_unknown_media_types(tmp_path: Path) -> None:
    digest = write_oci_layout(str(tmp_path), LAYERS)
    doc = manifest_of(tmp_path, digest)
    doc["layers"][0]["mediaType"] = "application/x-squashfs"
    replace_blob(tmp_path, digest, json.dumps(doc).encode())
    with pytest.raises(SourceError, match=r"layers\[0\] .*unknown layer media type 'application/x-squashfs'"):
        open_source(f"oci:{tmp_path}")

    root2 = tmp_path / "two"
    digest = write_oci_layout(str(root2), LAYERS)
    doc = manifest_of(root2, digest)
    doc["mediaType"] = "application/vnd.example.manifest+json"
    replace_blob(root2, digest, json.dumps(doc).encode())
    with pytest.raises(SourceError, match=r"unknown manifest media type 'application/vnd.example.manifest\+json'"):
        open_source(f"oci:{root2}")

    layer = blob_layer(compress(TAR1, "gzip"), "application/vnd.oci.image.layer.v1.tar+lz4")
    with pytest.raises(SourceError, match=r"layer sha256:\S+ of test:blob: unknown layer media type '.*tar\+lz4'"):
        layer.open()


def test_config_is_verified_and_must_match_the_layers(tmp_path: Path) -> None:
    digest = write_oci_layout(str(tmp_path), LAYERS, CONFIG)
    cfg_digest = manifest_of(tmp_path, digest)["config"]["digest"]
    path = blob_path(tmp_path, cfg_digest)
    good = path.read_bytes()
    path.write_bytes(good.replace(b"A=1", b"A=2"))
    with pytest.raises(SourceError, match=rf"config {cfg_digest}: digest mismatch: descriptor says {cfg_digest}"):
        open_source(f"oci:{tmp_path}")
    path.write_bytes(good + b" ")
    with pytest.raises(SourceError, match=rf"config {cfg_digest}: size mismatch: descriptor says {len(good)} bytes, got {len(good) + 1}"):
        open_source(f"oci:{tmp_path}")
    path.write_bytes(good)
    cfg = json.loads(good)
    cfg["rootfs"]["diff_ids"].pop()
    replace_blob(tmp_path, cfg_digest, json.dumps(cfg).encode())
    with pytest.raises(SourceError, match=r"manifest lists 2 layers but the config's rootfs.diff_ids has 1"):
        open_source(f"oci:{tmp_path}")


@pytest.mark.parametrize("field,value,problem", [
    ("digest", "sha256:abc", "invalid digest 'sha256:abc'"),
    ("digest", "md5:" + "0" * 32, "invalid digest 'md5:0"),
    ("size", -1, "invalid size -1"),
    ("size", "12", "invalid size '12'"),
])
def test_bad_descriptors_are_refused(tmp_path: Path, field: str, value: Any, problem: str) -> None:
    digest = write_oci_layout(str(tmp_path), LAYERS)
    doc = manifest_of(tmp_path, digest)
    doc["layers"][1][field] = value
    new = replace_blob(tmp_path, digest, json.dumps(doc).encode())
    with pytest.raises(SourceError) as e:
        open_source(f"oci:{tmp_path}")
    assert f"oci:{tmp_path}: manifest {new}: layers[1]: {problem}" in str(e.value)


# -- the verified layer stream ----------------------------------------------------------


def test_digest_and_size_mismatch(tmp_path: Path) -> None:
    raw = compress(TAR1, "gzip")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(SourceError) as e:
        blob_layer(raw, LAYER_MEDIA_TYPES["gzip"], digest=wrong).open().read()
    assert str(e.value) == f"layer {wrong} of test:blob: digest mismatch: descriptor says {wrong}, blob is {sha256(raw)}"
    with pytest.raises(SourceError, match=rf"layer {sha256(raw)} of test:blob: size mismatch: descriptor says {len(raw) + 5} bytes, blob has {len(raw)}"):
        blob_layer(raw, LAYER_MEDIA_TYPES["gzip"], size=len(raw) + 5).open().read()
    with pytest.raises(SourceError, match=r"size mismatch: blob is longer than the 1000 bytes its descriptor says"):
        blob_layer(raw, LAYER_MEDIA_TYPES["gzip"], size=1000).open().read()


@pytest.mark.parametrize("media", ["gzip", "zstd"])
def test_a_decompression_bomb_is_refused_as_soon_as_it_passes_the_limit(media: str) -> None:
    bomb = make_tar({"zeros": bytes(64 << 20)})  # 64 MiB of zeros: ~64 KiB of gzip, less of zstd
    raw = compress(bomb, media)
    assert len(raw) < len(bomb) // 500
    stream = blob_layer(raw, LAYER_MEDIA_TYPES[media]).open(max_bytes=8 << 20)
    with pytest.raises(SourceError) as e:
        stream.read()
    msg = str(e.value)
    assert msg.startswith(f"layer {sha256(raw)} of test:blob: decompresses to more than {8 << 20} bytes")
    assert "decompression bomb" in msg and "--max-layer-size" in msg
    with pytest.raises(SourceError, match="decompresses to more than"):
        stream.read(1)  # the verdict stands
    stream.close()
    assert blob_layer(raw, LAYER_MEDIA_TYPES[media]).open(max_bytes=len(bomb)).read() == bomb  # at the limit: fine
    with blob_layer(raw, LAYER_MEDIA_TYPES[media]).open() as f:  # the default limit is far above this
        assert len(f.read()) == len(bomb)


def test_a_bomb_is_stopped_early_not_decompressed_to_its_end() -> None:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip stream of 1.5 GiB of zeros, ~1.5 MB
    zeros = bytes(16 << 20)
    raw = b"".join(z.compress(zeros) for _ in range(96)) + z.flush()
    assert len(raw) > 1 << 20  # more than one raw block of the stream
    stream = blob_layer(raw, LAYER_MEDIA_TYPES["gzip"]).open(max_bytes=64 << 20)
    with pytest.raises(SourceError, match="decompression bomb"):
        stream.read()
    assert stream.bytes_read <= 1 << 20  # one raw block read, of ~1.5 MB


def test_a_layout_whose_manifest_lies_about_a_layer_size_is_refused_before_reading(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    write_oci_layout(str(root), LAYERS, compression="gzip")
    index = json.loads((root / "index.json").read_bytes())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = manifest_of(root, manifest_digest)
    layer = manifest["layers"][1]
    layer["size"] += 1
    replace_blob(root, manifest_digest, json.dumps(manifest).encode())
    with pytest.raises(SourceError) as e:
        open_source(f"oci:{root}")
    assert f"layer blob {layer['digest']}: size mismatch: the manifest says {layer['size']} bytes" in str(e.value)


def test_verification_happens_on_close_after_the_tar_end(tmp_path: Path) -> None:
    # trailing zeros after the end-of-archive marker: tarfile stops before them
    padded = TAR2 + bytes(3 << 20)
    good = blob_layer(padded, LAYER_MEDIA_TYPES["none"])
    stream = good.open()
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        assert [m.name for m in tf] == ["etc/hello", "tmp"]
    stream.close()  # reads the rest and verifies: fine

    for media, raw in [("none", padded), ("gzip", compress(padded, "gzip")), ("zstd", compress(padded, "zstd"))]:
        bad = blob_layer(raw, LAYER_MEDIA_TYPES[media], digest="sha256:" + "1" * 64)
        stream = bad.open()
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            assert len(list(tf)) == 2
        with pytest.raises(SourceError, match=r"digest mismatch"):
            stream.close()
        stream.close()  # the verdict is given once


def test_leaving_a_with_block_on_error_does_not_read_on() -> None:
    reads = []

    class Counting(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            reads.append(n)
            return super().read(n)

    raw = compress(TAR1, "gzip")
    layer = Layer(digest="sha256:" + "2" * 64, size=len(raw), media_type=LAYER_MEDIA_TYPES["gzip"], opener=lambda: Counting(raw))
    with pytest.raises(KeyError):
        with layer.open() as stream:
            stream.read(10)
            raise KeyError("consumer failed")
    assert len(reads) == 1  # one block, and no draining


@pytest.mark.parametrize("media", ["gzip", "zstd"])
def test_truncated_and_corrupt_streams(media: str) -> None:
    raw = compress(TAR1, media)
    short = raw[: len(raw) - 100]
    with pytest.raises(SourceError) as e:
        blob_layer(short, LAYER_MEDIA_TYPES[media]).open().read()
    assert str(e.value).startswith(f"layer {sha256(short)} of test:blob: truncated {media} stream")
    # a byte flipped mid-stream: gzip's CRC32 catches it, zstd only with a frame
    # checksum (without one, the descriptor digest is what catches it)
    if media == "zstd":
        raw = zstandard.ZstdCompressor(write_checksum=True).compress(TAR1)
    pos = len(raw) // 2
    corrupt = raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1:]
    with pytest.raises(SourceError, match=rf"layer {sha256(corrupt)} of test:blob: (corrupt|truncated) {media} stream"):
        blob_layer(corrupt, LAYER_MEDIA_TYPES[media]).open().read()
    with pytest.raises(SourceError, match=rf"truncated {media} stream"):
        blob_layer(b"", LAYER_MEDIA_TYPES[media]).open().read()
    garbage = raw + b"garbage after the end"
    with pytest.raises(SourceError, match=rf"corrupt {media} stream"):
        blob_layer(garbage, LAYER_MEDIA_TYPES[media]).open().read()


def test_multi_member_gzip_and_multi_frame_zstd() -> None:
    half = len(TAR1) // 2
    gz = gzip.compress(TAR1[:half], mtime=0) + gzip.compress(TAR1[half:], mtime=0)
    zs = zstandard.ZstdCompressor().compress(TAR1[:half]) + zstandard.ZstdCompressor().compress(TAR1[half:])
    assert blob_layer(gz, LAYER_MEDIA_TYPES["gzip"]).open().read() == TAR1
    assert blob_layer(zs, LAYER_MEDIA_TYPES["zstd"]).open().read() == TAR1


def test_zstd_stream_may_end_only_between_frames() -> None:
    # The stream reader says nothing about a stream cut short; the frame walker must
    # refuse every cut that does not fall between two whole frames, whatever part of
    # a frame it falls in (magic, header, block header, block body, checksum, or a
    # skippable frame), and accept the cuts that do.
    rng = random.Random(5)
    data = rng.randbytes(3000) + bytes(200_000) + rng.randbytes(150_000)  # raw, RLE and compressed blocks
    first = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    skippable = (0x184D2A53).to_bytes(4, "little") + (6).to_bytes(4, "little") + b"ignore"
    second = zstandard.ZstdCompressor(write_content_size=False, write_dict_id=False).compress(b"tail" * 100)
    blob = first + skippable + second
    boundaries = {len(first): data, len(first) + len(skippable): data, len(blob): data + b"tail" * 100}
    media = LAYER_MEDIA_TYPES["zstd"]
    assert blob_layer(blob, media).open().read() == data + b"tail" * 100
    cuts = sorted(set(range(1, 40)) | set(range(len(first) - 40, len(blob))) | set(rng.sample(range(len(first)), 300)))
    for cut in cuts:
        layer = blob_layer(blob[:cut], media)
        if cut in boundaries:
            assert layer.open().read() == boundaries[cut]
            continue
        with pytest.raises(SourceError, match=r"(truncated|corrupt) zstd stream"):
            layer.open().read()


def test_uncompressed_media_types_are_sniffed() -> None:
    # docker save writes whatever its store holds under the uncompressed label; the
    # digest may then name the blob or (docker's diff_id) the uncompressed tar
    docker_tar = "application/vnd.docker.image.rootfs.diff.tar"
    for media in ("gzip", "zstd"):
        raw = compress(TAR1, media)
        assert blob_layer(raw, docker_tar).open().read() == TAR1
        assert blob_layer(raw, docker_tar, digest=sha256(TAR1)).open().read() == TAR1
        with pytest.raises(SourceError, match=rf"digest mismatch: descriptor says sha256:0+, blob is {sha256(raw)} \(uncompressed {sha256(TAR1)}\)"):
            blob_layer(raw, docker_tar, digest="sha256:" + "0" * 64).open().read()
    with pytest.raises(SourceError, match=r"blob is xz-compressed, which OCI images do not allow"):
        blob_layer(b"\xfd7zXZ\x00" + bytes(100), docker_tar).open()


def test_diff_id_is_always_checked_unless_turned_off() -> None:
    wrong = "sha256:" + "3" * 64
    with pytest.raises(SourceError, match=rf"diff_id mismatch: image config says {wrong}, uncompressed layer is {sha256(TAR1)}"):
        blob_layer(TAR1, LAYER_MEDIA_TYPES["none"], diff_id=wrong).open().read()
    raw = compress(TAR1, "zstd")
    with pytest.raises(SourceError, match=r"diff_id mismatch"):
        blob_layer(raw, LAYER_MEDIA_TYPES["zstd"], diff_id=wrong).open().read()
    assert blob_layer(raw, LAYER_MEDIA_TYPES["zstd"], diff_id=sha256(TAR1)).open().read() == TAR1
    assert blob_layer(raw, LAYER_MEDIA_TYPES["zstd"], diff_id=wrong, verify_diff_id=False).open().read() == TAR1


def test_read_sizes_are_exact_across_blocks() -> None:
    stream = blob_layer(compress(TAR1, "zstd"), LAYER_MEDIA_TYPES["zstd"]).open()
    sizes = [0, 1, 511, 512, 10240, (1 << 20) + 3, 2 << 20]
    got = [stream.read(n) for n in sizes]
    assert [len(g) for g in got] == sizes
    buf = bytearray(7000)
    assert stream.readinto(buf) == 7000
    rest = stream.read()
    assert b"".join(got) + bytes(buf) + rest == TAR1
    assert stream.read(100) == b"" and stream.read() == b""
    stream.close()


def test_read_errors_of_the_raw_stream_name_the_layer() -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            raise OSError(5, "Input/output error")

    layer = Layer(digest=sha256(b"x"), size=1, media_type=LAYER_MEDIA_TYPES["gzip"], opener=Broken, source="oci:/somewhere")
    with pytest.raises(SourceError, match=r"layer sha256:\S+ of oci:/somewhere: read failed after 0 bytes: .*Input/output error"):
        layer.open().read()


def test_unknown_transport() -> None:
    with pytest.raises(SourceError, match=r"'ftp://x': unknown transport"):
        open_source("ftp://x")
