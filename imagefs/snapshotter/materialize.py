"""Make a remote snapshot below an image's top real, when another image builds on it.

imagefs serves an image whole, so the snapshots of its lower layers are placeholders
(:mod:`.images`). containerd sees them as existing, and so does any later pull of an
image that shares those layers (every image built on the same base): its unpacker
finds the shared layers present and asks to extract its own next layer on top of a
placeholder. Nothing can be served lazily there (no store image ends at that layer),
so the placeholder becomes what containerd would have made: the layer is downloaded
from the registry it came from (``cri.image-ref``/``cri.layer-digest`` labels of the
pull that made it, else the store image's own ``docker://`` source), verified against
its digest and diff ID, and unpacked into a directory (:mod:`.unpack`). Each
placeholder is done once; the image that is served lazily keeps its own mount.
"""

from __future__ import annotations

import logging
import os
import shutil

from imagefs.snapshotter.errors import FailedPrecondition
from imagefs.snapshotter.images import CRI_IMAGE_REF_LABEL, CRI_LAYER_DIGEST_LABEL, StoreImages
from imagefs.snapshotter.metadata import Snapshot
from imagefs.snapshotter.unpack import apply_tar

log = logging.getLogger(__name__)
UNCOMPRESSED_SNIFFED = "application/vnd.oci.image.layer.v1.tar"  # open_layer sniffs gzip/zstd magic under this type


def layer_sources(snap: Snapshot, images: StoreImages) -> list[tuple[str, str, int, str]]:
    """Where ``snap``'s layer can be downloaded: (registry reference, digest, size, diff ID)."""
    assert snap.chain is not None
    out: list[tuple[str, str, int, str]] = []
    label_ref, label_digest = snap.labels.get(CRI_IMAGE_REF_LABEL, ""), snap.labels.get(CRI_LAYER_DIGEST_LABEL, "")
    for image, depth in images.containing(snap.chain):
        if not image.layers or len(image.diff_ids) < depth:
            continue
        digest, size, _media_type = image.layers[depth - 1]
        diff_id = image.diff_ids[depth - 1]
        if label_ref and digest == label_digest:
            out.append((label_ref.removeprefix("docker://"), digest, size, diff_id))
        if image.source.startswith("docker://"):
            out.append((image.source[len("docker://"):], digest, size, diff_id))
    return list(dict.fromkeys(out))


def materialize(snap: Snapshot, images: StoreImages, directory: str) -> None:
    """Download and unpack ``snap``'s layer into ``directory``/fs (which must not exist:
    it is built beside it and renamed into place, so it is whole or absent)."""
    from indexer.sources import SourceError
    from indexer.sources.blobs import Layer, open_layer
    from indexer.sources.registry import RegistryClient, parse_reference

    sources = layer_sources(snap, images)
    if not sources:
        raise FailedPrecondition(
            f"snapshot {snap.key} is layer {snap.chain} below the top of an imagefs image and another image builds "
            "on it, but no registry is known to download that layer from")
    tmp = directory + ".unpacking"
    errors = []
    for ref, digest, size, diff_id in sources:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "fs"), mode=0o700)
        os.mkdir(os.path.join(tmp, "work"), 0o700)
        what = f"docker://{ref} layer {digest}"
        try:
            client = RegistryClient(parse_reference(ref), f"docker://{ref}")
            layer = Layer(digest=digest, size=size, media_type=UNCOMPRESSED_SNIFFED,
                          opener=lambda c=client, d=digest: c.open_blob(d, "layer blob"), source=ref, diff_id=diff_id)
            stream = open_layer(layer)
            try:
                apply_tar(stream, os.path.join(tmp, "fs"), what)
            finally:
                stream.close()  # verifies digest, size and diff ID
            os.chmod(os.path.join(tmp, "fs"), 0o755)
            os.rename(tmp, directory)
            log.info("snapshot %s: downloaded and unpacked layer %s from %s (another image builds on it)",
                     snap.key, digest, ref)
            return
        except (SourceError, OSError, FailedPrecondition) as e:
            log.warning("%s: %s", what, e)
            errors.append(f"{what}: {e}")
    shutil.rmtree(tmp, ignore_errors=True)
    raise FailedPrecondition(f"snapshot {snap.key}: cannot download its layer: {'; '.join(errors)}")
