"""Cheap checks of the bench image builder's logic: layer diffs, layer tars, apt sources.

The real build (debootstrap, chroot, pip) takes minutes and needs root and a mirror,
so it is not run here; these tests cover the parts whose mistakes would silently
produce a wrong image: what goes into a layer, and how it is written.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench.images import LayerEntry, count_entries, diff_trees, parse_apt_sources, write_layer


def _write(path: Path, text: str, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    """``old`` and ``new``: ``new`` starts as an exact copy (mtimes included) of ``old``."""
    old, new = tmp_path / "old", tmp_path / "new"
    files = {
        "etc/keep": "unchanged",
        "etc/edit": "before",
        "lib/gone/a": "a",
        "lib/gone/b": "b",
        "lib/dir2file/x": "x",
        "bin/rm_me": "bye",
    }
    for tree in (old, new):
        for rel, text in files.items():
            _write(tree / rel, text, mtime_ns=1_600_000_000_000_000_000)
    for tree in (old, new):  # directories last, so their mtimes match too
        for d in sorted({p for p in tree.rglob("*") if p.is_dir()}, reverse=True):
            os.utime(d, ns=(1_600_000_000_000_000_000,) * 2)
    return old, new


def _names(entries: list[LayerEntry]) -> list[str]:
    return [e.tar_name for e in entries]


def test_identical_trees_give_an_empty_layer(trees: tuple[Path, Path]) -> None:
    old, new = trees
    assert diff_trees(old, new) == []


def test_diff_has_changes_and_whiteouts_but_not_unchanged_files(trees: tuple[Path, Path]) -> None:
    old, new = trees
    _write(new / "etc/edit", "after, longer")
    (new / "bin/rm_me").unlink()
    for name in ("a", "b"):
        (new / "lib/gone" / name).unlink()
    (new / "lib/gone").rmdir()
    _write(new / "usr/new/file", "fresh")

    names = _names(diff_trees(old, new))

    assert "etc/edit" in names
    assert "etc/keep" not in names
    assert "bin/.wh.rm_me" in names
    assert "lib/.wh.gone" in names
    assert not any(n.startswith("lib/gone/") for n in names), "a deleted dir is one whiteout"
    assert names.index("usr") < names.index("usr/new") < names.index("usr/new/file")


def test_type_change_is_a_whiteout_then_the_new_entry(trees: tuple[Path, Path]) -> None:
    old, new = trees
    (new / "lib/dir2file/x").unlink()
    (new / "lib/dir2file").rmdir()
    _write(new / "lib/dir2file", "now a file")

    names = _names(diff_trees(old, new))

    assert names.index("lib/.wh.dir2file") < names.index("lib/dir2file")


def test_whiteouts_come_before_entries_in_their_directory(trees: tuple[Path, Path]) -> None:
    old, new = trees
    (new / "bin/rm_me").unlink()
    _write(new / "bin/-dash", "sorts before '.wh.'")

    names = _names(diff_trees(old, new))

    assert names.index("bin/.wh.rm_me") < names.index("bin/-dash")


def test_base_layer_has_every_entry_but_not_the_root(trees: tuple[Path, Path]) -> None:
    old, _ = trees
    entries = diff_trees(None, old)
    assert len(entries) == count_entries(old)
    assert not any(e.whiteout for e in entries)
    assert "" not in [e.path for e in entries]


def _members(root: Path, entries: list[LayerEntry]) -> tuple[bytes, list[tarfile.TarInfo]]:
    buf = io.BytesIO()
    write_layer(root, entries, buf)
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data, tar.getmembers()


def test_layer_tar_keeps_metadata_links_and_is_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write(root / "d/file", "content", mtime_ns=1_700_000_000_123_456_789)
    os.chmod(root / "d/file", 0o4755)
    os.link(root / "d/file", root / "d/hardlink")
    os.symlink("file", root / "d/sym")
    try:
        os.setxattr(root / "d/file", "user.bench", b"\xffbinary")
        has_xattr = True
    except OSError:
        has_xattr = False

    entries = diff_trees(None, root)
    data, members = _members(root, entries)
    by_name = {m.name: m for m in members}

    assert [m.name for m in members] == ["d", "d/file", "d/hardlink", "d/sym"]
    f = by_name["d/file"]
    assert f.isreg() and f.size == len("content") and f.mode == 0o4755
    assert f.uname == "" and f.gname == "" and f.uid == os.getuid()
    assert f.pax_headers["mtime"] == "1700000000.123456789"
    assert by_name["d/hardlink"].islnk() and by_name["d/hardlink"].linkname == "d/file"
    assert by_name["d/sym"].issym() and by_name["d/sym"].linkname == "file"
    if has_xattr:
        assert f.pax_headers["SCHILY.xattr.user.bench"].encode("utf-8", "surrogateescape") == b"\xffbinary"
    assert data == _members(root, entries)[0], "same tree, same bytes"


def test_whiteout_entries_are_empty_files(trees: tuple[Path, Path]) -> None:
    old, new = trees
    (new / "bin/rm_me").unlink()
    _, members = _members(new, diff_trees(old, new))
    wh = {m.name: m for m in members}["bin/.wh.rm_me"]
    assert wh.isreg() and wh.size == 0


def test_parse_apt_sources_both_formats() -> None:
    deb822 = (
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n"
    )
    assert parse_apt_sources(deb822, deb822=True) == [
        ("http://mirror.example/debian", ["bookworm", "bookworm-updates"])
    ]
    one_line = "# deb http://old.example/ bookworm main\ndeb [arch=amd64] http://m.example/debian bookworm main\n"
    assert parse_apt_sources(one_line, deb822=False) == [("http://m.example/debian", ["bookworm"])]


def test_dispatcher_lists_commands_with_a_main() -> None:
    commands = bench_main.discover()
    assert "images" in commands
    assert "images" in bench_main.usage(commands)
