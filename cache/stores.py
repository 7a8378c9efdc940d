"""Turn a ``--store`` argument into a :class:`~cache.blobstore.BlobStore`.

Accepted forms, as users of skopeo/boto3 would expect: a directory path,
``file://DIR``, or ``s3://BUCKET[/PREFIX]`` (endpoint, region and credentials from
the standard AWS environment/config, or ``s3_endpoint`` / ``$IMAGEFS_S3_ENDPOINT``).
"""

from __future__ import annotations

import os

from cache.blobstore import BlobStore, default_store_dir
from cache.localstore import LocalStore


class StoreURLError(ValueError):
    """A --store value that names no store we can open."""


def open_store(url: str | None, *, s3_endpoint: str | None = None, call_timeout: float | None = None) -> BlobStore:
    """Open the store named by ``url`` (``None``: the per-machine default directory).
    ``call_timeout``: the most one call to a network store may take, its retries
    included (a mount's read deadline); a local directory does not need one."""
    if not url:
        return LocalStore(default_store_dir())
    if url.startswith("s3://"):
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreURLError(f"--store {url!r}: missing bucket name (s3://BUCKET[/PREFIX])")
        from cache.s3store import S3Store  # boto3 import is slow: only when needed

        return S3Store(bucket, prefix.strip("/"), endpoint_url=s3_endpoint or os.environ.get("IMAGEFS_S3_ENDPOINT"),
                       call_timeout=call_timeout)
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path:
            raise StoreURLError(f"--store {url!r}: missing directory (file:///PATH)")
        return LocalStore(path)
    if "://" in url:
        raise StoreURLError(f"--store {url!r}: unknown scheme (use a directory, file://DIR or s3://BUCKET[/PREFIX])")
    return LocalStore(url)
