"""The snapshots gRPC service on a unix socket: containerd's proxy plugin calls it.

A thin adapter: every RPC decodes its request, calls :class:`.snapshots.Snapshotter`,
and encodes the answer; a :class:`~.errors.SnapshotError` becomes the gRPC status
containerd maps back to its errdefs (NotFound, AlreadyExists, FailedPrecondition,
InvalidArgument), any other failure an UNKNOWN status whose message says what failed
(and a traceback in the log), never a dead server. The socket is 0600 in a 0700
directory: whoever can reach it can make the host mount things.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from concurrent import futures
from typing import Any, Callable, Iterator, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from imagefs.containerd_api import snapshots_pb2 as pb
from imagefs.containerd_api import snapshots_pb2_grpc as pb_grpc
from imagefs.containerd_api import types_pb2
from imagefs.snapshotter.errors import SnapshotError
from imagefs.snapshotter.metadata import Snapshot
from imagefs.snapshotter.mounts import Mount
from imagefs.snapshotter.snapshots import Snapshotter

log = logging.getLogger(__name__)
T = TypeVar("T")
LIST_BATCH = 100  # Infos per List message
WORKERS = 16


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info(snap: Snapshot) -> pb.Info:
    return pb.Info(name=snap.key, parent=snap.parent, kind=snap.kind, created_at=_timestamp(snap.created_ns),
                   updated_at=_timestamp(snap.updated_ns), labels=snap.labels)


def mounts(ms: list[Mount]) -> list[types_pb2.Mount]:
    return [types_pb2.Mount(type=m["type"], source=m["source"], options=m["options"]) for m in ms]


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SnapshotError as e:
            log.debug("%s: %s %s", what, e.code, e)
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except Exception as e:
            log.exception("%s failed", what)
            context.abort(grpc.StatusCode.UNKNOWN, f"{what}: {e}")
        raise AssertionError("unreachable")  # context.abort raises

    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        ms = self._call(context, f"prepare {request.key}",
                        lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=mounts(ms))

    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        ms = self._call(context, f"view {request.key}",
                        lambda: self.sn.view(request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=mounts(ms))

    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        ms = self._call(context, f"mounts {request.key}", lambda: self.sn.mounts(request.key))
        return pb.MountsResponse(mounts=mounts(ms))

    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call(context, f"commit {request.key} as {request.name}",
                   lambda: self.sn.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call(context, f"remove {request.key}", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        snap = self._call(context, f"stat {request.key}", lambda: self.sn.stat(request.key))
        return pb.StatSnapshotResponse(info=info(snap))

    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        snap = self._call(context, f"update {request.info.name}",
                          lambda: self.sn.update(request.info.name, dict(request.info.labels), paths))
        return pb.UpdateSnapshotResponse(info=info(snap))

    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        snaps = self._call(context, "list", lambda: self.sn.list(list(request.filters)))
        for i in range(0, len(snaps), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info(s) for s in snaps[i:i + LIST_BATCH]])

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        size, inodes = self._call(context, f"usage {request.key}", lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call(context, "cleanup", self.sn.cleanup)
        return empty_pb2.Empty()


class SocketInUse(Exception):
    """Another process answers on the socket already."""


def _claim_socket(path: str) -> None:
    """Make ``path`` free to bind: refuse if a server answers there, remove a stale one."""
    from cache.private import private_dir

    private_dir(os.path.dirname(path) or ".", owned=False)
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left by a snapshotter that died
            return
    raise SocketInUse(f"{path}: another process is serving on this socket")


def start_server(snapshotter: Snapshotter, path: str, *, workers: int = WORKERS) -> grpc.Server:
    """Serve ``snapshotter`` on the unix socket ``path`` (0600); returns the started server."""
    _claim_socket(path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"),
                         options=[("grpc.max_receive_message_length", 16 << 20)])
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(snapshotter), server)
    old = os.umask(0o177)  # the socket is created 0600 from the start
    try:
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise OSError(f"cannot listen on unix socket {path}")
        server.start()
    finally:
        os.umask(old)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)
    return server


def serve_forever(server: grpc.Server, stop: Any) -> None:
    """Wait until ``stop`` (a threading.Event) is set, then stop taking calls and let the
    ones in flight finish (5 s at most)."""
    stop.wait()
    server.stop(grace=5.0).wait(10.0)
