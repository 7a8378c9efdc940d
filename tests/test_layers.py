"""The layer merge (indexer/layers.py) against an independent reference and real tars.

Three kinds of evidence: the streaming merge agrees with a naive model
(tests/support/reference.py, reading tars with tarfile) on layers that use every
feature; tars written by GNU tar from a real directory come out as that directory
(compared through lstat/listxattr); and every malformed or hostile input is refused
with a message naming the layer and the member.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import pytest

from cache.chunk import digest_of
from indexer.layers import LayerError, apply_layer
from indexer.tree import Tree
from tests.support import tars
from tests.support.reference import Entry, dir_entries, reference_tree, tree_entries
from tests.support.tars import (
    CAPABILITY, END, MiB, directory, file, generated_file, hardlink, make_tar, opaque, raw_header,
    raw_member, raw_pax, symlink, whiteout, with_checksum,
)

CHUNK = MiB


class Sink:
    """A real consumer of file content: cuts 1 MiB chunks, names them by blake3, keeps them."""

    def __init__(self) -> None:
        self.chunks: dict[bytes, bytes] = {}
        self.calls: list[tuple[bytes, int]] = []

    def __call__(self, path: bytes, size: int, reader: BinaryIO) -> list[bytes]:
        self.calls.append((path, size))
        digests = []
        left = size
        while left:
            want = min(CHUNK, left)
            data = reader.read(want)
            assert 0 < len(data) <= want
            d = digest_of(data)
            self.chunks[d] = data
            digests.append(d)
            left -= len(data)
        assert reader.read(1) == b"", "the reader must stop at the member's end"
        return digests

    def content(self, chunks: list[bytes]) -> bytes:
        return b"".join(self.chunks[c] for c in chunks)

    def sha256(self, chunks: list[bytes]) -> str:
        return hashlib.sha256(self.content(chunks)).hexdigest()


def merge(layers: list[bytes], sink: Sink | None = None) -> tuple[Tree, Sink]:
    tree, sink = Tree(), sink or Sink()
    for i, layer in enumerate(layers):
        apply_layer(tree, io.BytesIO(layer), f"layer{i}", sink)
    return tree, sink


def entries(layers: list[bytes]) -> dict[bytes, Entry]:
    tree, sink = merge(layers)
    return tree_entries(tree, sink.sha256)


def assert_same(got: dict[bytes, Entry], want: dict[bytes, Entry]) -> None:
    diff = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    assert not diff, "\n".join(f"{k!r}:\n  got  {g}\n  want {w}" for k, (g, w) in sorted(diff.items()))


# ------------------------------------------------------------------ feature layers


@pytest.fixture(scope="module")
def features() -> list[bytes]:
    return tars.feature_layers()


def test_feature_layers_match_the_reference(features: list[bytes]) -> None:
    assert_same(entries(features), reference_tree(features))


def test_feature_layers_semantics(features: list[bytes]) -> None:
    """What the spec says, checked directly (not only agreement with the reference)."""
    tree, sink = merge(features)
    get = tree.get
    assert get(b"gone") is None and get(b"gone_file") is None and get(b"never-there") is None
    assert sorted(get(b"opt/app").children) == [b"new1", b"new2"]  # opaque, same-layer kept
    assert get(b"replace_me_dir").is_reg and get(b"replace_me_file").is_symlink
    etc = get(b"etc")
    assert etc.mode == stat.S_IFDIR | 0o750 and etc.gid == 4 and etc.xattrs == {"user.dir": b"etc"}
    assert sorted(etc.children) == [b"empty", b"hostname", b"libarchive"]  # children kept
    assert sink.content(get(b"etc/hostname").chunks) == b"layer two\n"
    assert etc.mtime_ns == tars.NS_MTIME + 1
    # Hardlinks: to an earlier layer's file, and broken apart when one name is replaced.
    assert get(b"usr/bin/libbig-hl") is get(b"usr/lib/libbig.so")
    assert sink.content(get(b"usr/bin/tool-hl").chunks) == b"#!tool v1\n"
    assert get(b"usr/bin/tool-hl").mode == stat.S_IFREG | 0o4755
    assert sink.content(get(b"usr/bin/tool").chunks) == b"#!tool v2\n"
    assert sink.content(get(b"srv/hl-to-gnu-long").chunks) == b"gnu long name\n"
    assert get(b"usr/bin/wall").mode == stat.S_IFREG | 0o2755 and get(b"tmp").mode == stat.S_IFDIR | 0o1777
    assert get(b"usr/bin/ping").xattrs == {"security.capability": CAPABILITY, "user.note": b"ping\xff\x00bin"}
    assert get(b"etc/libarchive").xattrs == {"user.bin": b"\x00\xff\x10", "user.sp ace%": b"v"}
    assert get(b"home/user/.profile").mtime_ns == tars.NS_MTIME
    assert get(b"data/mtime-neg").mtime_ns == -1_500_000_000
    assert get(b"dev/null").rdev == os.makedev(1, 3) and stat.S_ISCHR(get(b"dev/null").mode)
    assert stat.S_ISBLK(get(b"dev/sda").mode) and stat.S_ISFIFO(get(b"run/initctl").mode)
    assert get(b"var/big-ids").uid == tars.BIG_UID and get(b"srv/gnu-ids").gid == tars.BIG_UID + 3
    assert get(tars.LONG_NAME.encode()).is_reg and get(tars.GNU_LONG_NAME.encode()).is_reg
    assert get(b"srv/longlink").link_target == tars.GNU_LONG_TARGET.encode()
    assert get(b"usr/bin/sh") is None and get(b"lib").link_target == b"usr/lib"
    assert get(b"usr/bin/contig").is_reg and get(b"etc/empty").chunks == [] and get(b"etc/empty").size == 0
    assert get(b"home").mode == stat.S_IFDIR | 0o755 and get(b"home").uid == 0  # created parent
    assert tree.root.mtime_ns == tars.DEFAULT_MTIME_NS + 1
    big = get(b"usr/lib/libbig.so")
    assert big.size == 3 * MiB + MiB // 2 + 123 and len(big.chunks) == 4 and len(set(big.chunks)) == 4
    assert sink.content(big.chunks) == tars.generated_bytes(big.size, seed=1)
    assert not [p for p, _ in tree.walk() if b".wh." in p]
    assert (b"usr/lib/libbig.so", big.size) in sink.calls


# ----------------------------------------------------------------------- edge cases

EDGE_CASES = {
    "file then its whiteout in the same layer: the file stays": [
        [file("a", b"lower")],
        [file("a", b"same layer"), whiteout("a")],
    ],
    "whiteout then re-add in the same layer": [
        [directory("d"), file("d/x", b"x")],
        [whiteout("d"), directory("d", mode=0o700), file("d/y", b"y")],
    ],
    "child written before the whiteout of its lower parent": [
        [directory("d", mode=0o700, uid=9), file("d/old", b"old")],
        [file("d/new", b"new"), whiteout("d")],
    ],
    "opaque root": [
        [file("a"), directory("b"), file("b/c")],
        [file("z", b"z"), opaque("."), directory("./", mode=0o750)],
    ],
    "opaque over a lower symlink and file (rm; mkdir)": [
        [symlink("s", "target"), file("f", b"f")],
        [directory("s"), opaque("s"), file("s/in", b"in"), directory("f"), opaque("f")],
    ],
    "whiteout beneath a lower symlink removes nothing": [
        [directory("real"), file("real/x", b"x"), symlink("link", "real")],
        [whiteout("link/x"), opaque("link")],
    ],
    "dir over file, file over dir, symlink over file, dir over dir": [
        [file("a", b"a"), directory("b"), file("b/c", b"c"), file("s"), directory("d", mode=0o700), file("d/k")],
        [directory("a"), file("b", b"b"), symlink("s", "../x"), directory("d", mode=0o755, uid=3)],
    ],
    "hardlink chains, to a symlink, a device and a fifo": [
        [file("f", b"f"), symlink("s", "f"), tars.char_device("c", 4, 5), tars.fifo("p")],
        [hardlink("f2", "f"), hardlink("f3", "f2"), hardlink("s2", "s"), hardlink("c2", "c"), hardlink("p2", "p")],
    ],
    "hardlink, then the target replaced in the same layer": [
        [file("t", b"old")],
        [hardlink("keep", "t"), file("t", b"new"), hardlink("t2", "t")],
    ],
    "hardlink over a directory replaces it": [
        [file("f", b"f"), directory("d"), file("d/x")],
        [hardlink("d", "f")],
    ],
    "path spellings: ./, //, /./, trailing slash": [
        [directory("./a/"), file("./a//b", b"b"), file("a/./c", b"c"), file("././d", b"d")],
    ],
    "names that are not UTF-8": [
        [directory(b"caf\xe9"), file(b"caf\xe9/\xff\xfe", b"bytes"), symlink(b"l\x80", b"\x81\x82")],
    ],
    "same path twice in one layer: the last wins": [
        [file("a", b"one"), file("a", b"two", mode=0o600)],
    ],
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_the_reference(name: str) -> None:
    layers = [make_tar(layer) for layer in EDGE_CASES[name]]
    assert_same(entries(layers), reference_tree(layers))


def test_edge_case_expectations() -> None:
    """A few of the cases above, stated outright."""
    get = lambda case: merge([make_tar(l) for l in EDGE_CASES[case]])[0].get  # noqa: E731
    g = get("file then its whiteout in the same layer: the file stays")
    assert g(b"a") is not None
    g = get("child written before the whiteout of its lower parent")
    d = g(b"d")
    assert sorted(d.children) == [b"new"] and d.mode == stat.S_IFDIR | 0o755 and d.uid == 0
    g = get("opaque root")
    assert sorted(g(b"").children) == [b"z"] and g(b"").mode == stat.S_IFDIR | 0o750
    g = get("whiteout beneath a lower symlink removes nothing")
    assert g(b"real/x") is not None and g(b"link").is_symlink
    g = get("hardlink, then the target replaced in the same layer")
    assert g(b"keep") is not g(b"t") and g(b"t2") is g(b"t")


def test_pax_mtime_is_exact() -> None:
    cases = {b"5": 5 * 10**9, b"5.5": 5_500_000_000, b"1700000000.123456789": 1_700_000_000_123_456_789,
             b"1.1234567899": 1_123_456_789, b"-1.25": -1_250_000_000, b"0.000000001": 1}
    tar = b"".join(raw_pax({b"mtime": v}) + raw_member(b"f%d" % i) for i, v in enumerate(cases)) + END
    tree, _ = merge([tar])
    assert [tree.get(b"f%d" % i).mtime_ns for i in range(len(cases))] == list(cases.values())


def test_extension_headers() -> None:
    """ustar prefix, GNU base-256 ids, AREGTYPE directories, global headers, xattr precedence."""
    long_path = "p" * 90 + "/" + "q" * 90
    ustar = make_tar([file(long_path, b"split by the ustar prefix field")], "ustar")
    gnu = make_tar([file("ids", b"", uid=2**40, gid=2**33)], "gnu")
    old = raw_member(b"olddir/", typeflag=b"\0") + raw_member(b"olddir/f", b"x", typeflag=b"\0")
    glob = raw_pax({b"comment": b"git archive", b"mtime": b"1"}, b"g")
    both = raw_pax({b"SCHILY.xattr.user.a": b"schily", b"LIBARCHIVE.xattr.user.a": b"bGli",
                    b"SCHILY.xattr.user.b": b"", b"path": b"xattr-file"})
    tree, sink = merge([ustar, gnu, old + glob + both + raw_member(b"ignored-name") + END])
    assert sink.content(tree.get(long_path.encode()).chunks) == b"split by the ustar prefix field"
    assert (tree.get(b"ids").uid, tree.get(b"ids").gid) == (2**40, 2**33)
    assert tree.get(b"olddir").is_dir and tree.get(b"olddir/f").is_reg
    f = tree.get(b"xattr-file")
    assert f.xattrs == {"user.a": b"lib", "user.b": b""} and f.mtime_ns == tars.DEFAULT_MTIME_NS
    assert tree.get(b"ignored-name") is None


def test_reader_given_to_the_sink_is_limited_and_file_like() -> None:
    seen = {}

    def sink(path: bytes, size: int, reader: BinaryIO) -> list[bytes]:
        buf = bytearray(3)
        n = reader.readinto(buf)  # type: ignore[attr-defined]
        rest = reader.read()
        seen[path] = (bytes(buf[:n]) + rest, reader.read(10))
        return [digest_of(seen[path][0])]

    tar = make_tar([file("a", b"hello world"), file("b", b""), file("c", b"xy")])
    apply_layer(Tree(), io.BytesIO(tar), "L", sink)
    assert seen == {b"a": (b"hello world", b""), b"b": (b"", b""), b"c": (b"xy", b"")}


def test_a_sink_that_reads_nothing_leaves_the_stream_in_step() -> None:
    tar = make_tar([generated_file("big", 3 * MiB + 7), file("after", b"after")])
    tree = Tree()
    apply_layer(tree, io.BytesIO(tar), "L", lambda p, s, r: [])
    assert tree.get(b"big").size == 3 * MiB + 7 and tree.get(b"after").size == 5


# ------------------------------------------------------------------- real GNU tar


def _populate(root: Path) -> None:
    """A real directory with every kind of inode and metadata a layer can carry."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"#!tool\n")
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hl")
    os.setxattr(root / "usr/bin/tool", "security.capability", CAPABILITY)
    os.setxattr(root / "usr/bin/tool", "user.bin", b"\x00\xff\x10")
    os.symlink("tool", root / "usr/bin/sym")
    (root / "big").write_bytes(tars.generated_bytes(2 * MiB + 5, seed=3))
    (root / "empty").write_bytes(b"")
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mkfifo(root / "fifo", 0o600)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "home/u").mkdir(parents=True)
    os.chown(root / "home/u", 1000, 1001)
    long = root / ("l" * 120) / ("m" * 150)
    long.parent.mkdir()
    long.write_bytes(b"long")
    (root / "data").write_bytes(b"d")
    os.chown(root / "data", 3_000_000, 70_000)
    os.utime(root / "data", ns=(0, 1_700_000_000_123_456_789))
    for d in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):  # fix dir mtimes last
        if d.is_dir() and not d.is_symlink():
            os.utime(d, ns=(0, 1_600_000_000_987_654_321))
    os.utime(root, ns=(0, 1_600_000_000_987_654_321))


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_gnu_tar_of_a_real_directory(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _populate(src)
    args = ["--xattrs", "--xattrs-include=*"] if fmt == "posix" else []
    tar = subprocess.run(["tar", f"--format={fmt}", *args, "-cf", "-", "-C", str(src), "."],
                         check=True, capture_output=True).stdout
    tree, sink = merge([tar])
    got = tree_entries(tree, sink.sha256)
    want = dir_entries(src)
    if fmt == "gnu":  # no xattrs and whole-second mtimes in the old GNU format
        want = {p: replace(e, xattrs={}, mtime_ns=e.mtime_ns // 10**9 * 10**9) for p, e in want.items()}
    assert_same(got, want)
    if fmt == "posix":
        assert got[b"usr/bin/tool"].xattrs == {"security.capability": CAPABILITY, "user.bin": b"\x00\xff\x10"}
        assert got[b"data"].mtime_ns == 1_700_000_000_123_456_789
    assert got[b"data"].uid == 3_000_000 and got[b"usr/bin/tool-hl"].link_group == b"usr/bin/tool"


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_gnu_sparse_files_are_refused(tmp_path: Path, fmt: str) -> None:
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(4 * MiB)
        f.write(b"data in the middle")
    tar = subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", "-", "-C", str(tmp_path), "sparse"],
                         check=True, capture_output=True).stdout
    with pytest.raises(LayerError, match=r"^L: .*sparse.*: GNU sparse files are not supported$"):
        apply_layer(Tree(), io.BytesIO(tar), "L", Sink())


# ------------------------------------------------------------------- huge files


@pytest.mark.slow
def test_file_over_4_gib_streams_through_in_bounded_memory() -> None:
    size = 4 * 1024 * MiB + MiB // 2 + 3
    expected = tars.GeneratedContent(size, seed=7)
    count = 0

    def sink(path: bytes, n: int, reader: BinaryIO) -> list[bytes]:
        nonlocal count
        out = []
        left = n
        while left:
            data = reader.read(min(CHUNK, left))
            if path == tars.BIG_FILE_NAME:
                assert data == expected.read(len(data))
            out.append(count.to_bytes(8, "big"))
            count += 1
            left -= len(data)
        return out

    tree = Tree()
    tracemalloc.start()
    try:
        apply_layer(tree, tars.big_file_layer(size, seed=7), "huge", sink)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    big = tree.get(tars.BIG_FILE_NAME)
    assert big.size == size and len(big.chunks) == -(-size // CHUNK)
    assert expected.read(1) == b""
    assert tree.get(tars.AFTER_BIG_NAME).size == len(tars.AFTER_BIG_DATA)
    assert peak < 32 * MiB, f"peak traced memory {peak} bytes"


# ------------------------------------------------------------------- bad input


def _tar(*members: bytes) -> bytes:
    return b"".join(members) + END


def _apply_all(layers: list[bytes]) -> None:
    tree = Tree()
    for i, layer in enumerate(layers):
        apply_layer(tree, io.BytesIO(layer), f"layer{i}", Sink())


BASE = make_tar([directory("usr/lib"), symlink("lib", "usr/lib"), file("etc", b"a file"), directory("d")])
LONG = b"n" * 256

BAD = {
    # name: (layers, member as the message names it, problem pattern)
    "dotdot": ([make_tar([file("../etc/passwd")])], "../etc/passwd", "'..' in the path"),
    "dotdot inside": ([make_tar([file("a/../../b")])], "a/../../b", "'..' in the path"),
    "absolute": ([make_tar([file("/etc/passwd")])], "/etc/passwd", "absolute path"),
    "NUL in a PAX path": ([_tar(raw_pax({b"path": b"a\0b"}), raw_member(b"x"))], "a\\x00b", "NUL byte"),
    "component over 255 bytes": ([make_tar([file(b"d/" + LONG)])], "d/" + "n" * 256, "256 bytes long"),
    "parent is a lower symlink": ([BASE, make_tar([file("lib/evil")])], "lib/evil",
                                  "parent 'lib' is a symlink in the tree"),
    "parent is a same-layer symlink": ([make_tar([symlink("up", "/"), file("up/etc/x")])], "up/etc/x",
                                       "parent 'up' is a symlink"),
    "parent is a file": ([BASE, make_tar([file("etc/passwd")])], "etc/passwd", "parent 'etc' is not a directory"),
    "hardlink target missing": ([make_tar([hardlink("a", "nowhere")])], "a", "'nowhere' does not exist"),
    "hardlink target later in the layer": ([make_tar([hardlink("a", "b"), file("b")])], "a", "'b' does not exist"),
    "hardlink to a directory": ([BASE, make_tar([hardlink("x", "d")])], "x", "'d' is a directory"),
    "hardlink through a symlink": ([BASE, make_tar([file("usr/lib/f"), hardlink("x", "lib/f")])], "x",
                                   "goes through 'lib', which is a symlink"),
    "hardlink target with ..": ([make_tar([file("a"), hardlink("b", "../a")])], "b", "'..' in the hardlink target"),
    "hardlink target absolute": ([make_tar([file("a"), hardlink("b", "/a")])], "b", "absolute hardlink target"),
    "hardlink as the root": ([make_tar([file("a"), hardlink(".", "a")])], ".", "root must be a directory"),
    "file as the root": ([_tar(raw_member(b"./", b"x", typeflag=b"0"))], "./", "root must be a directory"),
    "empty symlink target": ([_tar(raw_member(b"s", typeflag=b"2"))], "s", "empty target"),
    "whiteout of ..": ([make_tar([file("d/.wh..")])], "d/.wh..", "names no removable entry"),
    "bare whiteout prefix": ([make_tar([file(".wh.")])], ".wh.", "names no removable entry"),
    "whiteout used as a directory": ([make_tar([file(".wh.x/y")])], ".wh.x/y", "used as a directory"),
    "unsupported type": ([_tar(raw_member(b"dump", typeflag=b"D"))], "dump", "unsupported tar entry type"),
    "PAX record too long": ([_tar(raw_pax({b"path": b"x"})[:512] + b"99 path=x\n".ljust(512, b"\0"),
                                  raw_member(b"m"))], "header at byte 0", "malformed PAX header"),
    "PAX record without =": ([_tar(raw_member(b"PaxHeader", b"9 novalu\n", typeflag=b"x"), raw_member(b"m"))],
                             "header at byte 0", "no keyword"),
    "PAX non-numeric uid": ([_tar(raw_pax({b"uid": b"12a"}), raw_member(b"m"))], "m", "invalid PAX uid"),
    "PAX bad mtime": ([_tar(raw_pax({b"mtime": b"1.2.3"}), raw_member(b"m"))], "m", "invalid PAX mtime"),
    "bad base64 xattr": ([_tar(raw_pax({b"LIBARCHIVE.xattr.user.x": b"!!!!"}), raw_member(b"m"))], "m",
                         "not base64"),
    "non-UTF-8 xattr name": ([_tar(raw_pax({b"SCHILY.xattr.user.\xff": b"v"}), raw_member(b"m"))], "m",
                             "is not UTF-8"),
    "huge extended header": ([_tar(raw_member(b"L", b"x" * (MiB + 1), typeflag=b"L"))], "header at byte 0",
                             "extended header of"),
    "extended header then the end": ([_tar(raw_pax({b"path": b"p"}))], "header at byte 1024",
                                     "not followed by an entry"),
    "bad checksum": ([make_tar([file("a")])[:148] + b"0000000\0" + make_tar([file("a")])[156:]],
                     "header at byte 0 (after the start of the archive)", "bad header checksum"),
    "not a tar (gzip)": ([b"\x1f\x8b\x08\x00" + b"\0" * 2000], "header at byte 0", "bad header checksum"),
    "invalid octal": ([_tar(with_checksum(raw_header(b"m")[:124] + b"0000000009x\0" + raw_header(b"m")[136:]))],
                      "m", "invalid size field"),
    "truncated header": ([make_tar([file("a", b"x"), file("b")])[:1124]], "header at byte 1024",
                         "ends inside a header"),
    "truncated padding": ([make_tar([file("a", b"x")])[:700]], "a", "its padding"),
    "truncated content": ([make_tar([file("a", b"x" * 5000)])[:2048]], "a", "truncated"),
    "truncated content, unread": ([_tar(raw_member(b"a"), raw_header(b".wh.b", size=9999))[:2048]], ".wh.b",
                                  "ends inside the content"),
    "lone zero block mid-archive": ([_tar(raw_member(b"a"), b"\0" * 512, raw_member(b"b"))], "header at byte 512",
                                    "lone zero block"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused_naming_layer_and_member(name: str) -> None:
    layers, member, problem = BAD[name]
    with pytest.raises(LayerError) as info:
        _apply_all(layers)
    msg = str(info.value)
    layer = f"layer{len(layers) - 1}"
    assert msg.startswith(f"{layer}: {member}"), msg
    assert problem in msg, msg
    assert info.value.layer == layer


def test_truncated_content_is_a_layer_error_inside_the_sink() -> None:
    """The sink sees the truncation as a LayerError from its reader, not as short data."""
    tar = make_tar([generated_file("big", 3 * MiB)])[: 2 * MiB]
    with pytest.raises(LayerError, match=r"^L: big: truncated: the stream ends after \d+ of 3145728"):
        apply_layer(Tree(), io.BytesIO(tar), "L", Sink())


def test_the_sink_is_not_called_with_dangerous_paths() -> None:
    sink = Sink()
    with pytest.raises(LayerError):
        apply_layer(Tree(), io.BytesIO(make_tar([file("ok", b"1"), file("../bad", b"2")])), "L", sink)
    assert sink.calls == [(b"ok", 1)]


# ------------------------------------------------------------------- throughput


def test_many_small_files_throughput() -> None:
    """A layer of many small files is applied at tens of thousands of files a second."""
    n = 5000
    tar = make_tar([file(f"site-packages/pkg{i // 50}/mod{i}.py", b"x" * 300) for i in range(n)])
    t0 = time.perf_counter()
    tree, _ = merge([tar])
    elapsed = time.perf_counter() - t0
    assert len(tree.walk()) == n + n // 50 + 2
    assert n / elapsed > 5000, f"{n / elapsed:.0f} files/s"
