"""``imagefs pull``: containerd's pull with unpack, asking the snapshotter first.

``ctr image pull`` downloads every layer into containerd's content store and only then
unpacks, so a remote snapshotter cannot spare a single download through it (stargz
ships ``ctr-remote image rpull`` for the same reason). This is the pull that containerd's
own client library does with unpack (the path the CRI plugin takes), over containerd's
gRPC API:

1. resolve the reference at the registry; write the image index (if any), the
   manifest and the config into containerd's content store, with the garbage
   collector's labels that tie them together, under a lease;
2. for each layer, bottom up: if the snapshot of its chain ID exists, go on; else
   ``Prepare`` an extraction snapshot with ``containerd.io/snapshot.ref`` set to the
   chain ID and the labels that say which image this is (``cri.*``, as the CRI plugin
   sets them, and ``imagefs.diff-ids``). AlreadyExists means the snapshotter provides
   the layer: nothing is downloaded. Otherwise download the layer into the content
   store, have containerd's diff service apply it to the snapshot, and commit it;
3. create (or update) the image record, and drop the lease.

Afterwards ``ctr run --snapshotter imagefs REF ...`` finds the image unpacked.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

import grpc
from google.protobuf import field_mask_pb2

from imagefs.containerd_api import content_pb2, content_pb2_grpc, diff_pb2, diff_pb2_grpc, images_pb2, images_pb2_grpc
from imagefs.containerd_api import leases_pb2, leases_pb2_grpc, snapshots_pb2, snapshots_pb2_grpc, types_pb2
from imagefs.snapshotter.chain import chain_ids
from imagefs.snapshotter.images import (
    CRI_IMAGE_LAYERS_LABEL, CRI_IMAGE_REF_LABEL, CRI_LAYER_DIGEST_LABEL, CRI_MANIFEST_LABEL, DIFF_IDS_LABEL,
    SNAPSHOT_REF_LABEL,
)
from indexer.sources import SourceError
from indexer.sources.credentials import AuthOptions
from indexer.sources.manifest import (
    INDEX_TYPES, MAX_CONFIG_SIZE, MAX_INDEX_DEPTH, Descriptor, check_config_platform, check_layer_count, diff_ids,
    media_type_of, parse_config, parse_index, parse_json, parse_manifest, read_limited, select_platform, sha256_digest,
    verify_blob,
)
from indexer.sources.registry import RegistryClient, parse_reference

LABEL_MAX = 4096  # containerd's bound on a label's key and value together
WRITE_CHUNK = 1 << 20
LEASE_S = 3600  # the lease expires by itself if this process dies mid-pull
RPC_TIMEOUT_S = 60.0  # one metadata call; layer writes and applies get TRANSFER_TIMEOUT_S
TRANSFER_TIMEOUT_S = 3600.0
GC_SNAPSHOT_LABEL = "containerd.io/gc.ref.snapshot."


class PullError(Exception):
    """The pull failed; the message names the image or containerd and the problem."""


@dataclass
class PullResult:
    name: str  # the image record's name in containerd
    target: str  # the digest it points at
    remote_layers: int = 0  # provided by the snapshotter: not downloaded
    fetched_layers: int = 0  # downloaded and unpacked
    present_layers: int = 0  # snapshot already there
    fetched_bytes: int = 0
    layer_states: list[str] = field(default_factory=list)


def _joined(items: list[str], key: str) -> str:
    """As many of ``items``, comma-joined, as fit in one containerd label (as the CRI
    plugin's list of layers: a shorter list only costs matching, never correctness)."""
    out = ""
    for item in items:
        candidate = f"{out},{item}" if out else item
        if len(key) + len(candidate) > LABEL_MAX:
            break
        out = candidate
    return out


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class _Containerd:
    """The containerd services a pull uses, in one namespace, under one lease."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(f"unix://{address}", options=[("grpc.max_receive_message_length", 16 << 20)])
        self.metadata: list[tuple[str, str]] = [("containerd-namespace", namespace)]
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.diff = diff_pb2_grpc.DiffStub(self.channel)

    def call(self, method: Any, request: Any, timeout: float = RPC_TIMEOUT_S) -> Any:
        return method(request, metadata=self.metadata, timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def _describe(e: grpc.RpcError) -> str:
    return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]


def _code(e: grpc.RpcError) -> grpc.StatusCode:
    return e.code()  # type: ignore[attr-defined,no-any-return]


def pull(ref: str, *, address: str, namespace: str = "default", snapshotter: str = "imagefs",
         platform: str | None = None, insecure: bool = False, auth: AuthOptions | None = None,
         progress: IO[str] | None = None) -> PullResult:
    """Pull ``ref`` (``HOST[:PORT]/REPO[:TAG|@DIGEST]``) into containerd at ``address``
    with unpack through ``snapshotter``; see the module docstring."""
    rref = parse_reference(ref)
    display = f"docker://{ref}"
    registry = RegistryClient(rref, display, insecure=insecure, auth=auth)
    name = f"{rref.host}/{rref.repo}" + (f"@{rref.digest}" if rref.digest else f":{rref.tag or 'latest'}")

    def say(text: str) -> None:
        if progress is not None:
            print(f"{name}: {text}", file=progress, flush=True)

    try:
        # 1. resolve: index -> manifest -> config
        blobs: list[tuple[Descriptor, bytes, dict[str, str]]] = []  # written to the content store
        data, hint = registry.manifest(rref.reference)
        top = Descriptor("", sha256_digest(data), len(data))
        desc = top
        for _ in range(MAX_INDEX_DEPTH + 1):
            doc = parse_json(data, f"{display}: manifest {desc.digest}")
            mt = media_type_of(doc, hint or desc.media_type, f"{display}: manifest {desc.digest}")
            if desc is top:
                top = desc = Descriptor(mt, desc.digest, desc.size)
            if mt not in INDEX_TYPES:
                break
            children = parse_index(doc, f"{display}: index {desc.digest}")
            chosen = select_platform(children, platform, f"{display}: index {desc.digest}")
            blobs.append((Descriptor(mt, desc.digest, desc.size), data,
                          {f"containerd.io/gc.ref.content.m.{i}": c.digest for i, c in enumerate(children)}))
            data, hint = registry.manifest(chosen.digest)
            verify_blob(data, chosen, f"{display}: manifest {chosen.digest}")
            desc = chosen
        else:
            raise SourceError(f"{display}: image indexes nest deeper than {MAX_INDEX_DEPTH} levels")
        manifest = parse_manifest(doc, mt, f"{display}: manifest {desc.digest}")
        with registry.open_blob(manifest.config.digest, "config") as f:
            config_bytes = read_limited(f, MAX_CONFIG_SIZE, f"{display}: config {manifest.config.digest}")
        config = parse_config(config_bytes, manifest.config, display)
        check_config_platform(config, platform, display)
        check_layer_count(len(manifest.layers), config, f"{display}: manifest {desc.digest}")
        diffs = diff_ids(config)
        chain = chain_ids(diffs)
    except (SourceError, ValueError) as e:
        raise PullError(str(e)) from e
    manifest_labels = {"containerd.io/gc.ref.content.config": manifest.config.digest,
                       **{f"containerd.io/gc.ref.content.l.{i}": l.digest for i, l in enumerate(manifest.layers)}}
    blobs.append((Descriptor(mt, desc.digest, desc.size), data, manifest_labels))
    config_labels = {GC_SNAPSHOT_LABEL + snapshotter: chain[-1]} if chain else {}
    blobs.append((manifest.config, config_bytes, config_labels))

    cd = _Containerd(address, namespace)
    result = PullResult(name=name, target=top.digest)
    try:
        try:
            lease = cd.call(cd.leases.Create, leases_pb2.CreateRequest(
                labels={"containerd.io/gc.expire": _rfc3339(time.time() + LEASE_S)})).lease
        except grpc.RpcError as e:
            raise PullError(f"containerd at {address}: {_describe(e)}") from None
        cd.metadata.append(("containerd-lease", lease.id))
        try:
            for d, blob, labels in blobs:
                _write_blob(cd, d, iter([blob]), labels)
            _unpack(cd, registry, display, snapshotter, name, desc.digest, manifest.layers, diffs, chain, result, say)
            _set_image(cd, name, top)
        finally:
            try:
                cd.call(cd.leases.Delete, leases_pb2.DeleteRequest(id=lease.id))
            except grpc.RpcError:
                pass  # it expires by itself
    except grpc.RpcError as e:
        raise PullError(f"{name}: containerd at {address}: {_describe(e)}") from None
    except SourceError as e:
        raise PullError(str(e)) from e
    finally:
        cd.close()
    say(f"{result.remote_layers} layers from imagefs, {result.fetched_layers} downloaded "
        f"({result.fetched_bytes} bytes), {result.present_layers} present")
    return result


def _write_blob(cd: _Containerd, desc: Descriptor, chunks: Iterator[bytes], labels: dict[str, str]) -> None:
    """Put a blob into containerd's content store (verified there against its digest),
    or only its labels when it is there already."""
    try:
        cd.call(cd.content.Info, content_pb2.InfoRequest(digest=desc.digest))
        exists = True
    except grpc.RpcError as e:
        if _code(e) != grpc.StatusCode.NOT_FOUND:
            raise
        exists = False
    if exists:
        if labels:
            paths = [f"labels.{k}" for k in labels]
            cd.call(cd.content.Update, content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=desc.digest, labels=labels),
                update_mask=field_mask_pb2.FieldMask(paths=paths)))
        return
    ref = f"imagefs-pull-{desc.digest}"
    failed: list[BaseException] = []  # what went wrong reading the blob (grpc reports only a cancel)

    def requests() -> Iterator[content_pb2.WriteContentRequest]:
        offset = 0
        for chunk in _recording(chunks, failed):
            for i in range(0, len(chunk), WRITE_CHUNK):
                part = chunk[i:i + WRITE_CHUNK]
                yield content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref=ref, total=desc.size,
                                                      expected=desc.digest, offset=offset, data=part)
                offset += len(part)
        yield content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=ref, total=desc.size,
                                              expected=desc.digest, offset=offset, labels=labels)

    try:
        for _ in cd.content.Write(requests(), metadata=cd.metadata, timeout=TRANSFER_TIMEOUT_S):
            pass
    except grpc.RpcError as e:
        if failed:
            raise failed[0] from None
        if _code(e) != grpc.StatusCode.ALREADY_EXISTS:  # a concurrent pull wrote it first
            raise


def _recording(chunks: Iterator[bytes], failed: list[BaseException]) -> Iterator[bytes]:
    try:
        yield from chunks
    except BaseException as e:
        failed.append(e)
        raise


def _stat(cd: _Containerd, snapshotter: str, key: str) -> bool:
    try:
        cd.call(cd.snapshots.Stat, snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key))
        return True
    except grpc.RpcError as e:
        if _code(e) == grpc.StatusCode.NOT_FOUND:
            return False
        raise


def _unpack(cd: _Containerd, registry: RegistryClient, display: str, snapshotter: str, name: str,
            manifest_digest: str, layers: list[Descriptor], diffs: list[str], chain: list[str],
            result: PullResult, say: Any) -> None:
    parent = ""
    digests = [l.digest for l in layers]
    for i, (layer, chain_id) in enumerate(zip(layers, chain)):
        what = f"layer {i + 1}/{len(layers)} {layer.digest[7:19]}"
        if _stat(cd, snapshotter, chain_id):
            result.present_layers += 1
            result.layer_states.append("present")
            parent = chain_id
            continue
        labels = {
            SNAPSHOT_REF_LABEL: chain_id,
            CRI_IMAGE_REF_LABEL: name,
            CRI_MANIFEST_LABEL: manifest_digest,
            CRI_LAYER_DIGEST_LABEL: layer.digest,
            CRI_IMAGE_LAYERS_LABEL: _joined(digests[i:], CRI_IMAGE_LAYERS_LABEL),
            DIFF_IDS_LABEL: _joined(diffs[i:], DIFF_IDS_LABEL),
        }
        key = f"extract-{secrets.token_hex(8)}-{chain_id}"
        try:
            mounts = cd.call(cd.snapshots.Prepare, snapshots_pb2.PrepareSnapshotRequest(
                snapshotter=snapshotter, key=key, parent=parent, labels=labels), timeout=TRANSFER_TIMEOUT_S).mounts
        except grpc.RpcError as e:
            if _code(e) == grpc.StatusCode.ALREADY_EXISTS and _stat(cd, snapshotter, chain_id):
                result.remote_layers += 1
                result.layer_states.append("remote")
                say(f"{what}: provided by the snapshotter, not downloaded")
                parent = chain_id
                continue
            raise
        try:
            say(f"{what}: downloading {layer.size} bytes")
            _write_blob(cd, layer, _verified_chunks(registry, layer, display), {})
            applied = cd.call(cd.diff.Apply, diff_pb2.ApplyRequest(
                diff=types_pb2.Descriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size),
                mounts=mounts), timeout=TRANSFER_TIMEOUT_S).applied
            if applied.digest != diffs[i]:
                raise SourceError(f"{display}: {what}: unpacked to {applied.digest}, but the config says its diff ID "
                                  f"is {diffs[i]}")
            cd.call(cd.snapshots.Commit, snapshots_pb2.CommitSnapshotRequest(
                snapshotter=snapshotter, name=chain_id, key=key, labels={}))
        except BaseException:
            try:
                cd.call(cd.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))
            except grpc.RpcError:
                pass
            raise
        result.fetched_layers += 1
        result.fetched_bytes += layer.size
        result.layer_states.append("fetched")
        parent = chain_id


def _verified_chunks(registry: RegistryClient, layer: Descriptor, display: str) -> Iterator[bytes]:
    """The layer blob from the registry, checked against its digest and size as it
    streams (containerd checks again when it commits)."""
    h, n = hashlib.sha256(), 0
    with registry.open_blob(layer.digest, "layer blob") as f:
        while chunk := f.read(WRITE_CHUNK):
            n += len(chunk)
            if n > layer.size:
                raise SourceError(f"{display}: layer {layer.digest} is larger than its descriptor's {layer.size} bytes")
            h.update(chunk)
            yield chunk
    if n != layer.size or "sha256:" + h.hexdigest() != layer.digest:
        raise SourceError(f"{display}: layer {layer.digest}: content does not match the manifest's digest and size")


def _set_image(cd: _Containerd, name: str, top: Descriptor) -> None:
    image = images_pb2.Image(name=name, target=types_pb2.Descriptor(media_type=top.media_type, digest=top.digest,
                                                                    size=top.size))
    try:
        cd.call(cd.images.Create, images_pb2.CreateImageRequest(image=image))
    except grpc.RpcError as e:
        if _code(e) != grpc.StatusCode.ALREADY_EXISTS:
            raise
        cd.call(cd.images.Update, images_pb2.UpdateImageRequest(
            image=image, update_mask=field_mask_pb2.FieldMask(paths=["target"])))
