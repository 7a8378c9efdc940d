"""``imagefs snapshotter`` and ``imagefs pull`` against the real thing: Debian's
containerd 1.6 with the snapshotter as its proxy plugin, a real registry on loopback
(its access log counts blob downloads), runc containers started by ``ctr run``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from typing import Iterator

import pytest

from cache.localstore import LocalStore
from imagefs.snapshotter.chain import chain_ids
from indexer.build import build_image
from tests.support.containerd import Containerd, Snapshotter, have_containerd
from tests.support.containers import busybox_entries, can_run_containers
from tests.support.images import write_oci_layout
from tests.support.registry import Registry, blob_gets, start_registry, stop_registry
from tests.support.tars import file, make_tar

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (have_containerd() and can_run_containers()),
                       reason="needs root, containerd (Debian package) and busybox-static"),
]

BLOB = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)  # 3 MiB over several chunks
CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["sh"]}


class World:
    def __init__(self, base: str, reg: Registry, store: str, sn: Snapshotter, cd: Containerd) -> None:
        self.base, self.reg, self.store, self.sn, self.cd = base, reg, store, sn, cd
        self.indexed = f"{reg.host}/indexed:1"
        self.plain = f"{reg.host}/plain:1"
        self.indexed_top = ""  # the chain ID of the indexed image's top layer

    def pull(self, ref: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imagefs", "pull", "--address", self.cd.address, ref],
                              capture_output=True, text=True, timeout=120, env=self.sn.env)

    def run(self, ref: str, cid: str, script: str) -> subprocess.CompletedProcess[str]:
        return self.cd.ctr("run", "--snapshotter", "imagefs", "--rm", ref, cid, "sh", "-c", script)

    def layer_digests(self, repo: str) -> list[str]:
        import json

        res = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{self.reg.host}/{repo}:1"],
                             capture_output=True, text=True, check=True)
        return [l["digest"] for l in json.loads(res.stdout)["layers"]]

    def wait_for(self, what: str, condition: object, timeout: float = 60.0) -> None:
        """containerd removes snapshots in its garbage collector, shortly after they
        are released: wait (bounded) for the effect."""
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not after {timeout:g}s")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = str(tmp_path_factory.mktemp("ctrd"))
    reg = start_registry(os.path.join(base, "registry"), access_log=True)
    busybox = make_tar(busybox_entries())
    data = make_tar([file("data/blob", BLOB)])
    write_oci_layout(os.path.join(base, "indexed"), [busybox, data], CONFIG)
    write_oci_layout(os.path.join(base, "plain"), [busybox, make_tar([file("data/other.txt", b"not in imagefs\n")])],
                     CONFIG)
    reg.push(os.path.join(base, "indexed"), "latest", "indexed", dest_tag="1")
    reg.push(os.path.join(base, "plain"), "latest", "plain", dest_tag="1")
    store = os.path.join(base, "store")
    build_image(f"docker://{reg.host}/indexed:1", LocalStore(store), "indexed:1")
    env = dict(os.environ, IMAGEFS_RUN_DIR=os.path.join(base, "imagefs-run"),
               IMAGEFS_CACHE_DIR=os.path.join(base, "imagefs-cache"))
    env.pop("IMAGEFS_AGENT_SOCKET", None)
    sn = Snapshotter(os.path.join(base, "sn"), os.path.join(base, "imagefs-run", "snapshotter.sock"), store, env,
                     os.path.join(base, "snapshotter.log"))
    cd = Containerd(os.path.join(base, "containerd"), sn.socket)
    os.makedirs(cd.base)
    sn.start()
    cd.start()
    w = World(base, reg, store, sn, cd)
    w.indexed_top = chain_ids(["sha256:" + hashlib.sha256(t).hexdigest() for t in (busybox, data)])[-1]
    try:
        yield w
    finally:
        cd.kill_tasks()
        cd.stop()
        sn.stop()
        for mp in sn.images_mounted():  # what a failed test left (its daemon exits with it)
            subprocess.run([sys.executable, "-m", "imagefs", "umount", mp], capture_output=True, env=sn.env, timeout=60)
        stop_registry(reg)


def test_lazy_pull_downloads_no_layer_that_imagefs_has(world: World) -> None:
    before = blob_gets(world.reg, "indexed")
    res = world.pull(world.indexed)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == world.indexed
    assert "2 layers from imagefs, 0 downloaded" in res.stderr
    fetched = blob_gets(world.reg, "indexed")[len(before):]
    layers = world.layer_digests("indexed")
    assert fetched and not set(fetched) & set(layers)  # the config only
    assert world.sn.images_mounted() == []  # a pull mounts nothing


def test_container_reads_the_image_byte_identically(world: World) -> None:
    before = len(blob_gets(world.reg, "indexed"))
    res = world.run(world.indexed, "reader", "busybox sha256sum /data/blob /bin/busybox; grep ' / ' /proc/self/mountinfo")
    sums = dict(line.split()[::-1] for line in res.stdout.splitlines()[:2])
    with open("/bin/busybox", "rb") as f:
        assert sums["/bin/busybox"] == hashlib.sha256(f.read()).hexdigest()
    assert sums["/data/blob"] == hashlib.sha256(BLOB).hexdigest()
    assert f"lowerdir={world.sn.root}/images/" in res.stdout  # the rootfs is the lazy image mount's overlay
    assert blob_gets(world.reg, "indexed")[before:] == []  # starting it fetched nothing from the registry


def test_two_containers_share_one_image_mount_which_goes_with_the_last(world: World) -> None:
    for cid in ("one", "two"):
        world.cd.ctr("run", "-d", "--snapshotter", "imagefs", world.indexed, cid, "sleep", "600")
    mounts = world.sn.images_mounted()
    assert len(mounts) == 1
    world.cd.kill_tasks()
    world.wait_for("image unmounted after both containers were removed", lambda: world.sn.images_mounted() == [])


def test_an_image_imagefs_does_not_have_falls_back_and_runs(world: World) -> None:
    """``plain`` shares its first layer (busybox) with the indexed image, whose pull left
    that layer's snapshot as a placeholder below the lazily served top: building on it
    makes the snapshotter download and unpack that one layer, once."""
    shared, own = world.layer_digests("plain")
    before = len(blob_gets(world.reg, "indexed")), len(blob_gets(world.reg, "plain"))
    res = world.pull(world.plain)
    assert res.returncode == 0, res.stderr
    assert "0 layers from imagefs, 1 downloaded" in res.stderr and "1 present" in res.stderr
    assert blob_gets(world.reg, "plain")[before[1]:].count(own) == 1
    assert blob_gets(world.reg, "indexed")[before[0]:] == [shared]  # the placeholder, made real
    out = world.run(world.plain, "plain-run", "cat /data/other.txt; busybox sha256sum /bin/busybox; "
                    "grep ' / ' /proc/self/mountinfo").stdout
    with open("/bin/busybox", "rb") as f:
        assert out.startswith(f"not in imagefs\n{hashlib.sha256(f.read()).hexdigest()}  /bin/busybox\n")
    assert f"{world.sn.root}/images/" not in out  # ordinary snapshots: unpacked directories
    # the indexed image is still served lazily, from its mount
    out = world.run(world.indexed, "again", "grep ' / ' /proc/self/mountinfo").stdout
    assert f"lowerdir={world.sn.root}/images/" in out


def test_snapshots_survive_restarts_of_the_snapshotter_and_of_containerd(world: World) -> None:
    before = set(world.cd.snapshots())
    assert len(before) >= 3
    world.sn.stop()
    world.sn.start()
    # containerd's connection to the plugin comes back after gRPC's reconnect backoff
    world.wait_for("containerd reconnected to the snapshotter",
                   lambda: world.cd.ctr("snapshots", "--snapshotter", "imagefs", "ls", check=False).returncode == 0)
    assert set(world.cd.snapshots()) == before
    assert world.run(world.indexed, "after-sn", "busybox sha256sum /data/blob").stdout.split()[0] == \
        hashlib.sha256(BLOB).hexdigest()
    world.cd.stop()
    world.cd.start()
    assert set(world.cd.snapshots()) == before
    assert world.run(world.plain, "after-cd", "cat /data/other.txt").stdout == "not in imagefs\n"


def test_containerd_error_codes_reach_ctr(world: World) -> None:
    before = set(world.cd.snapshots())
    res = world.cd.ctr("snapshots", "--snapshotter", "imagefs", "commit", "from-committed", world.indexed_top,
                       check=False)
    assert res.returncode != 0 and "failed precondition" in res.stderr  # only active snapshots commit
    assert set(world.cd.snapshots()) == before  # containerd rolled back: nothing lost, nothing added


def test_pull_without_containerd_is_a_clear_error(world: World, tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(str(tmp_path), "no.sock")
    res = subprocess.run([sys.executable, "-m", "imagefs", "pull", "--address", missing, world.indexed],
                         capture_output=True, text=True, timeout=120, env=world.sn.env)
    assert res.returncode == 1
    assert missing in res.stderr and "Traceback" not in res.stderr


def test_removing_the_images_leaves_nothing_mounted_or_stored(world: World) -> None:
    world.cd.kill_tasks()
    for ref in (world.indexed, world.plain):
        world.cd.ctr("images", "rm", "--sync", ref)
    world.wait_for("every snapshot removed", lambda: world.cd.snapshots() == [])
    world.wait_for("snapshot directories cleaned",
                   lambda: not os.listdir(os.path.join(world.sn.root, "snapshots")))
    assert world.sn.images_mounted() == []
    assert os.listdir(os.path.join(world.sn.root, "images")) == []
