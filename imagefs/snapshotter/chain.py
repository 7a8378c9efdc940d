"""Chain IDs: how containerd names the snapshot of an image's first N layers.

The OCI image spec defines them from the layers' diff IDs (the sha256 of each
uncompressed layer tar): ``ChainID(L1) = DiffID(L1)`` and
``ChainID(L1..Ln) = sha256(ChainID(L1..Ln-1) + " " + DiffID(Ln))``. Two images whose
first N layers have equal chain IDs have byte-identical trees after those N layers, so
a chain ID is what the snapshotter matches store images by.
"""

from __future__ import annotations

import hashlib
import re

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHAIN_AT_END = re.compile(r"(sha256:[0-9a-f]{64})$")


def is_digest(text: str) -> bool:
    return bool(_DIGEST.fullmatch(text))


def chain_ids(diff_ids: list[str], start: str | None = None) -> list[str]:
    """The chain ID after each layer of ``diff_ids``; ``start``: the chain ID of the
    layers below them (None: they start at the bottom)."""
    out: list[str] = []
    chain = start
    for diff_id in diff_ids:
        if not is_digest(diff_id):
            raise ValueError(f"not a sha256 diff ID: {diff_id!r}")
        chain = diff_id if chain is None else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
        out.append(chain)
    return out


def chain_of_ref(ref: str) -> str | None:
    """The chain ID that a ``containerd.io/snapshot.ref`` label names. containerd's
    metadata layer hands a backend snapshotter its own key for the target, of the form
    ``NAMESPACE/SEQ/CHAINID``; a client calling the snapshotter directly gives the
    chain ID itself."""
    m = _CHAIN_AT_END.search(ref)
    return m.group(1) if m else None
