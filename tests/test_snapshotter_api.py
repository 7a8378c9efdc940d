"""The snapshots API of ``imagefs snapshotter`` over its real gRPC socket, without
containerd: containerd's error codes, durability across a restart, List's filters,
and remote snapshots from a store image (matched by chain IDs, mounted lazily,
unmounted with the last container)."""

from __future__ import annotations

import hashlib
import os
from typing import Iterator

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cache.localstore import LocalStore
from imagefs.containerd_api import snapshots_pb2 as pb
from imagefs.containerd_api import snapshots_pb2_grpc as pb_grpc
from imagefs.mount import MountOptions
from imagefs.snapshotter.chain import chain_ids, chain_of_ref
from imagefs.snapshotter.images import CRI_IMAGE_LAYERS_LABEL, DIFF_IDS_LABEL, SNAPSHOT_REF_LABEL, StoreImages
from imagefs.snapshotter.mounts import ImageMounts
from imagefs.snapshotter.service import start_server
from imagefs.snapshotter.snapshots import Snapshotter
from indexer.build import build_image
from indexer.catalog import read_ref
from tests.support.images import write_oci_layout
from tests.support.tars import file, make_tar

LAYERS = [make_tar([file("a.txt", b"layer one\n")]), make_tar([file("b.txt", b"layer two\n" * 1000)])]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


DIFF_IDS = [sha256(t) for t in LAYERS]
CHAIN = chain_ids(DIFF_IDS)


class Env:
    def __init__(self, base: str, store: str) -> None:
        self.base, self.store = base, store
        self.root = os.path.join(base, "root")
        self.socket = os.path.join(base, "run", "snapshotter.sock")
        self.server: grpc.Server | None = None
        self.sn: Snapshotter | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> pb_grpc.SnapshotsStub:
        opts = MountOptions(store=self.store, cache_dir=os.path.join(self.base, "cache"))
        images = StoreImages(LocalStore(self.store), refresh_interval=0)
        self.sn = Snapshotter(self.root, images, ImageMounts(os.path.join(self.root, "images"), opts))
        self.server = start_server(self.sn, self.socket, workers=4)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        return pb_grpc.SnapshotsStub(self.channel)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.server is not None:
            self.server.stop(None).wait()
        if self.sn is not None:
            self.sn.close()
        self.server = self.sn = self.channel = None

    def image_mounts(self) -> list[str]:
        prefix = os.path.join(self.root, "images") + "/"
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = tmp_path_factory.mktemp("snapstore")
    write_oci_layout(str(base / "layout"), LAYERS, {"Cmd": ["true"]})
    build_image(f"oci:{base / 'layout'}:latest", LocalStore(str(base / "store")), "two:1")
    return str(base / "store")


@pytest.fixture
def env(tmp_path: os.PathLike[str], store: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("IMAGEFS_RUN_DIR", os.path.join(str(tmp_path), "imagefs-run"))
    e = Env(str(tmp_path), store)
    yield e
    if e.sn is not None:
        e.sn.image_mounts.retain(set)  # whatever a failed test left mounted
    e.stop()


def code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()  # type: ignore[attr-defined,no-any-return]


def test_the_name_records_diff_ids(store: str) -> None:
    record = read_ref(LocalStore(store), "two:1")
    assert record is not None and record.origin["diff_ids"] == DIFF_IDS


def test_chain_ids_follow_the_oci_definition() -> None:
    assert CHAIN[0] == DIFF_IDS[0]
    assert CHAIN[1] == sha256(f"{DIFF_IDS[0]} {DIFF_IDS[1]}".encode())
    assert chain_of_ref(f"default/12/{CHAIN[1]}") == CHAIN[1]
    assert chain_of_ref("extract-123") is None


def test_containerd_error_codes_and_nothing_lost(env: Env) -> None:
    s = env.start()
    assert code(lambda: s.Stat(pb.StatSnapshotRequest(key="nope"))) == grpc.StatusCode.NOT_FOUND
    assert code(lambda: s.Prepare(pb.PrepareSnapshotRequest(key="a", parent="missing"))) == grpc.StatusCode.NOT_FOUND
    mounts = s.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"x": "1"})).mounts
    assert [m.type for m in mounts] == ["bind"] and "rw" in mounts[0].options
    assert code(lambda: s.Prepare(pb.PrepareSnapshotRequest(key="a"))) == grpc.StatusCode.ALREADY_EXISTS
    # an active parent is refused as containerd refuses it
    assert code(lambda: s.Prepare(pb.PrepareSnapshotRequest(key="b", parent="a"))) == grpc.StatusCode.INVALID_ARGUMENT
    with open(os.path.join(mounts[0].source, "f"), "wb") as f:
        f.write(b"x" * 10000)
    s.Commit(pb.CommitSnapshotRequest(name="base", key="a"))
    assert code(lambda: s.Stat(pb.StatSnapshotRequest(key="a"))) == grpc.StatusCode.NOT_FOUND
    assert s.Stat(pb.StatSnapshotRequest(key="base")).info.kind == pb.COMMITTED
    assert s.Usage(pb.UsageRequest(key="base")).size >= 10000
    s.View(pb.ViewSnapshotRequest(key="v", parent="base"))
    assert code(lambda: s.Commit(pb.CommitSnapshotRequest(name="x", key="v"))) == grpc.StatusCode.FAILED_PRECONDITION
    s.Prepare(pb.PrepareSnapshotRequest(key="c", parent="base"))
    assert code(lambda: s.Commit(pb.CommitSnapshotRequest(name="base", key="c"))) == grpc.StatusCode.ALREADY_EXISTS
    assert code(lambda: s.Remove(pb.RemoveSnapshotRequest(key="base"))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(lambda: s.Remove(pb.RemoveSnapshotRequest(key="zzz"))) == grpc.StatusCode.NOT_FOUND
    assert code(lambda: s.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="base", parent="other"), update_mask=field_mask_pb2.FieldMask(paths=["parent"])))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    # every refusal left the snapshots as they were
    names = {i.name: i for r in s.List(pb.ListSnapshotsRequest()) for i in r.info}
    assert set(names) == {"base", "v", "c"}
    assert names["c"].parent == "base" and names["v"].kind == pb.VIEW


def test_snapshots_survive_a_restart(env: Env) -> None:
    s = env.start()
    m = s.Prepare(pb.PrepareSnapshotRequest(key="a")).mounts[0]
    with open(os.path.join(m.source, "kept"), "w") as f:
        f.write("yes")
    s.Commit(pb.CommitSnapshotRequest(name="base", key="a", labels={"l": "1"}))
    s.Prepare(pb.PrepareSnapshotRequest(key="top", parent="base"))
    s.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="base", labels={"l2": "2"}),
                                      update_mask=field_mask_pb2.FieldMask(paths=["labels.l2"])))
    env.stop()
    s = env.start()
    info = s.Stat(pb.StatSnapshotRequest(key="base")).info
    assert dict(info.labels) == {"l": "1", "l2": "2"}
    top = s.Mounts(pb.MountsRequest(key="top")).mounts[0]
    assert top.type == "overlay"
    lower = next(o for o in top.options if o.startswith("lowerdir=")).split("=", 1)[1]
    assert open(os.path.join(lower, "kept")).read() == "yes"


def test_list_filters(env: Env) -> None:
    s = env.start()
    s.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"containerd.io/gc.root": "x"}))
    s.Commit(pb.CommitSnapshotRequest(name="c1", key="a", labels={"containerd.io/gc.root": "x"}))
    s.Prepare(pb.PrepareSnapshotRequest(key="b", parent="c1"))

    def names(*filters: str) -> set[str]:
        return {i.name for r in s.List(pb.ListSnapshotsRequest(filters=list(filters))) for i in r.info}

    assert names() == {"c1", "b"}
    assert names("kind==active") == {"b"}
    assert names("parent==c1") == {"b"}
    assert names('labels."containerd.io/gc.root"') == {"c1"}
    assert names("name~=^c", "kind==active") == {"c1", "b"}
    assert names("kind==committed,name!=c1") == set()
    assert code(lambda: names("kind=active")) == grpc.StatusCode.INVALID_ARGUMENT


def test_remote_snapshots_from_a_store_image(env: Env) -> None:
    s = env.start()
    # a layer below the top is remote only when the labels show the pull reaches the top
    mounts = s.Prepare(pb.PrepareSnapshotRequest(key="x1", labels={SNAPSHOT_REF_LABEL: CHAIN[0]})).mounts
    assert mounts[0].type == "bind"
    s.Remove(pb.RemoveSnapshotRequest(key="x1"))  # it was an ordinary extraction snapshot
    labels = {SNAPSHOT_REF_LABEL: CHAIN[0], DIFF_IDS_LABEL: ",".join(DIFF_IDS)}
    assert code(lambda: s.Prepare(pb.PrepareSnapshotRequest(key="e1", labels=labels))) == grpc.StatusCode.ALREADY_EXISTS
    labels = {SNAPSHOT_REF_LABEL: CHAIN[1], CRI_IMAGE_LAYERS_LABEL: "sha256:" + "0" * 64}
    # the top layer is a store image's whole tree: remote whatever the labels say
    assert code(lambda: s.Prepare(pb.PrepareSnapshotRequest(key="e2", parent=CHAIN[0], labels=labels))) \
        == grpc.StatusCode.ALREADY_EXISTS
    assert s.Stat(pb.StatSnapshotRequest(key=CHAIN[1])).info.kind == pb.COMMITTED
    assert env.image_mounts() == []  # nothing is mounted for a pull
    # two containers on the image share one lazy mount of it
    m1 = s.Prepare(pb.PrepareSnapshotRequest(key="c1", parent=CHAIN[1])).mounts[0]
    m2 = s.Prepare(pb.PrepareSnapshotRequest(key="c2", parent=CHAIN[1])).mounts[0]
    lowers = {next(o for o in m.options if o.startswith("lowerdir=")).split("=", 1)[1] for m in (m1, m2)}
    assert len(lowers) == 1 and env.image_mounts() == list(lowers)
    lower = lowers.pop()
    assert open(os.path.join(lower, "b.txt"), "rb").read() == b"layer two\n" * 1000
    assert m1.type == "overlay" and "nodev" in m1.options
    s.Remove(pb.RemoveSnapshotRequest(key="c1"))
    assert env.image_mounts() == [lower]  # c2 still uses it
    s.Remove(pb.RemoveSnapshotRequest(key="c2"))
    assert env.image_mounts() == []
    assert code(lambda: s.Remove(pb.RemoveSnapshotRequest(key=CHAIN[0]))) == grpc.StatusCode.FAILED_PRECONDITION
    s.Remove(pb.RemoveSnapshotRequest(key=CHAIN[1]))
    s.Remove(pb.RemoveSnapshotRequest(key=CHAIN[0]))
    s.Cleanup(pb.CleanupRequest())
    assert os.listdir(os.path.join(env.root, "snapshots")) == []
    assert os.listdir(os.path.join(env.root, "images")) == []
