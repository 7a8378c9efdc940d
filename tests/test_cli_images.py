"""``imagefs rm``/``rmi``, ``tag``, ``gc``, ``prune`` and short digests, through the real command
line, a real store, and real mounts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest

from cache.localstore import LocalStore
from indexer import catalog
from indexer.build import build_image
from imagefs.mount import MountOptions, process_start_time
from tests.support.images import write_oci_layout
from tests.support.mounts import mounted
from tests.support.tars import file, generated_file, make_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


@pytest.fixture
def host(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A private store, run directory, cache directory and containers directory."""
    env = {"IMAGEFS_STORE": str(tmp_path / "store"), "IMAGEFS_RUN_DIR": str(tmp_path / "run"),
           "IMAGEFS_CACHE_DIR": str(tmp_path / "cache"), "IMAGEFS_CONTAINERS_DIR": str(tmp_path / "containers")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env


def imagefs(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "imagefs", *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def _layout(tmp_path: Any, tag: str, extra: bytes = b"") -> str:
    path = str(tmp_path / f"layout-{tag}")
    layers = [make_tar([generated_file("base/a", 2 * MiB, seed=1), file("etc/hello", b"hello\n")])]
    if extra:
        layers.append(make_tar([file(f"{tag}/extra", extra)]))
    if not os.path.exists(path):  # a tag names one image for the whole test
        write_oci_layout(path, layers, {"Cmd": ["/bin/sh"]})
    return f"oci:{path}:latest"


def _digest(p: subprocess.CompletedProcess[str]) -> str:
    return p.stdout.strip().splitlines()[-1]


def test_tag_rm_and_gc_from_the_command_line(tmp_path: Any, host: dict[str, str]) -> None:
    base = _digest(imagefs("-q", "index", _layout(tmp_path, "base"), "--name", "app:1"))
    big = _digest(imagefs("-q", "index", _layout(tmp_path, "big", os.urandom(3 * MiB)), "--name", "big:1"))

    # Re-pointing a name says what happened to the image it named.
    p = imagefs("index", _layout(tmp_path, "big"), "--name", "app:1")
    assert f"app:1 now points at {big[:23]}; it pointed at {base[:23]} before" in p.stderr
    assert "no name left and is listed as <none>" in p.stderr
    listing = imagefs("images").stdout
    assert "<none>" in listing and base in listing

    # tag by a short digest (both spellings) brings it back; re-pointing a name that keeps others says so.
    assert _digest(imagefs("tag", "blake3:" + base[7:15], "app:0")) == base
    p = imagefs("tag", base[7:19], "app:1")
    assert f"it keeps its name(s) big:1" in p.stderr
    assert "<none>" not in imagefs("images").stdout

    # inspect, rm and rmi take short digests; a digest with several names needs them named (or -f).
    assert "Names:         app:0, app:1" in imagefs("inspect", base[7:17]).stdout
    p = imagefs("rm", "blake3:" + base[7:15], ok=False)
    assert p.returncode == 1 and "refusing to remove 2 names (app:0, app:1)" in p.stderr
    p = imagefs("rmi", "app:0", "app:1")
    assert p.stdout.splitlines() == ["Untagged: app:0", "Untagged: app:1", f"Dangling: {base} (no name left; "
                                     "'imagefs gc' frees its space)"]
    p = imagefs("rm", "nope:1", ok=False)
    assert p.returncode == 1 and "nope:1: no such image" in p.stderr

    store = LocalStore(host["IMAGEFS_STORE"])
    dry = json.loads(imagefs("gc", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["freed"]["indexes"]["count"] == 1
    assert catalog.find_by_prefix(store, base[7:])  # still there
    p = imagefs("gc")
    assert "freed" in p.stdout and "kept 1 named image(s)" in p.stdout
    assert not catalog.find_by_prefix(store, base[7:])
    # big shared the base layer's packs: they stay, and big reads back whole.
    assert imagefs("inspect", "big:1").returncode == 0
    index = catalog.open_image(store, "big:1")
    assert set(index.pack_keys()) <= set(store.list("packs/"))
    assert imagefs("gc", "--json").stdout and json.loads(imagefs("gc", "--json").stdout)["freed_bytes"] == 0


def test_ambiguous_and_unknown_short_digests_are_clear_errors(tmp_path: Any, host: dict[str, str]) -> None:
    store = LocalStore(host["IMAGEFS_STORE"])
    digests = [build_image(_layout(tmp_path, f"i{i}", f"{i}".encode()), store, f"i{i}").digest for i in range(20)]
    # 20 digests: some pair shares its first hex digit.
    first = [d[7] for d in digests]
    shared = next(c for c in first if first.count(c) > 1)
    for cmd in (["inspect"], ["rm"], ["tag", "-", "x:1"], ["optimize"]):
        args = [a if a != "-" else f"blake3:{shared}" for a in cmd]
        if "-" not in cmd:
            args.append(f"blake3:{shared}")
        p = imagefs(*args, ok=False)
        assert p.returncode == 1 and f"blake3:{shared}: ambiguous short digest" in p.stderr, (cmd, p.stderr)
    p = imagefs("inspect", "blake3:" + "f" * 9 if "f" * 9 not in "".join(digests) else "blake3:0000000000", ok=False)
    assert p.returncode == 1 and "no digest starts with" in p.stderr


def test_mount_by_short_digest_serves_the_image(tmp_path: Any, host: dict[str, str]) -> None:
    store = LocalStore(host["IMAGEFS_STORE"])
    digest = build_image(_layout(tmp_path, "m", b"payload\n"), store, "m:1").digest
    opts = MountOptions(store=host["IMAGEFS_STORE"], cache_dir=host["IMAGEFS_CACHE_DIR"], fs="fuse")
    with mounted("blake3:" + digest[7:17], str(tmp_path / "mnt"), opts) as m:
        with open(os.path.join(m.path, "m/extra"), "rb") as f:
            assert f.read() == b"payload\n"
        # rm refuses to take the last name of an image a mount on this host serves.
        p = imagefs("rm", "m:1", ok=False)
        assert p.returncode == 1 and "a mount on this host serves" in p.stderr
        # prune keeps what the live mount uses.
        copy = os.path.join(host["IMAGEFS_CACHE_DIR"], "indexes", digest[7:] + ".body")
        assert os.path.exists(copy)
        imagefs("prune")
        assert os.path.exists(copy)
    out = json.loads(imagefs("prune", "--json").stdout)
    assert copy in [i["what"] for i in out["removed"]] and not os.path.exists(copy)


def test_prune_removes_leftovers_of_dead_daemons_and_keeps_live_and_young_ones(tmp_path: Any,
                                                                            host: dict[str, str]) -> None:
    run = host["IMAGEFS_RUN_DIR"]
    cache = host["IMAGEFS_CACHE_DIR"]
    os.makedirs(run, mode=0o700)
    os.makedirs(os.path.join(cache, "indexes"))
    os.makedirs(os.path.join(cache, "erofs"))
    os.makedirs(os.path.join(cache, "profiles"))
    old = time.time() - 3600

    def put(path: str, data: bytes = b"x", mtime: float | None = None) -> str:
        with open(path, "wb") as f:
            f.write(data)
        if mtime:
            os.utime(path, (mtime, mtime))
        return path

    # A dead daemon (a pid that is not the process it recorded), with its log and blob directory.
    dead = [put(os.path.join(run, "aaaaaaaaaaaaaaaa.json"), json.dumps(
        {"pid": os.getpid(), "start_time": -1, "digest": "blake3:" + "d" * 64, "mountpoint": str(tmp_path / "gone")}
    ).encode()), put(os.path.join(run, "aaaaaaaaaaaaaaaa.log"), b"log" * 100)]
    os.mkdir(os.path.join(run, "aaaaaaaaaaaaaaaa.blob"))
    dead.append(os.path.join(run, "aaaaaaaaaaaaaaaa.blob"))
    # A live one (this process), and an old orphan log, and a young one (a daemon starting now).
    live_digest = "blake3:" + "1" * 64
    live = put(os.path.join(run, "bbbbbbbbbbbbbbbb.json"), json.dumps(
        {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "digest": live_digest,
         "mountpoint": str(tmp_path / "live")}).encode())
    orphan = put(os.path.join(run, "cccccccccccccccc.log"), mtime=old)
    young = put(os.path.join(run, "dddddddddddddddd.log"))
    other = put(os.path.join(run, "not-ours.txt"), mtime=old)
    copies = {d: put(os.path.join(cache, "indexes", d * 64 + ".body"), b"c" * 5000) for d in "12"}
    metas = {d: put(os.path.join(cache, "erofs", f"imagefs-{d * 64}.erofs"), b"m" * 3000) for d in "12"}
    profs = {d: put(os.path.join(cache, "profiles", d * 64 + ".profile"), b"p" * 700) for d in "12"}

    dry = json.loads(imagefs("prune", "--dry-run", "--json").stdout)
    assert all(os.path.exists(p) for p in dead + [orphan, copies["2"], metas["2"]])  # nothing removed
    p = json.loads(imagefs("prune", "--json").stdout)
    assert sorted(i["what"] for i in p["removed"]) == sorted(i["what"] for i in dry["removed"])
    assert not any(os.path.exists(x) for x in dead + [orphan, copies["2"], metas["2"], profs["2"]])
    assert all(os.path.exists(x) for x in (live, young, other, copies["1"], metas["1"], profs["1"]))
    assert p["bytes"] >= 5000 + 3000 + 700 + 300
