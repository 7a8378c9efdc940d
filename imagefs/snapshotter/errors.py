"""containerd's error classes, as the snapshots API returns them.

containerd maps gRPC status codes back to its errdefs (``codes.NotFound`` is
``errdefs.ErrNotFound``, and so on), and its unpacker and metadata layer act on
them: AlreadyExists from Prepare is what makes a snapshot remote. Every refusal of
the snapshotter is one of these, with a message naming the snapshot and the problem.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """A request the snapshotter refuses; ``code`` is the gRPC status code's name."""

    code = "UNKNOWN"


class NotFound(SnapshotError):
    code = "NOT_FOUND"


class AlreadyExists(SnapshotError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotError):
    code = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotError):
    code = "INVALID_ARGUMENT"
