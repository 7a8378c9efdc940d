"""A blob store in an S3 bucket: the durable, shared home of packs and indexes for a fleet.

Why it looks the way it does:

- The cold path fetches many large ranges at once, so the client is created once
  (boto3 clients are thread-safe), its connection pool is sized for parallel
  fetches, and a semaphore bounds how many requests are in flight.
- Object stores answer 5xx, 429/SlowDown, stall or drop connections as a matter of
  course. botocore's own retries are turned off and one explicit loop retries those
  faults with exponential backoff and full jitter, a bounded number of attempts.
  The policy is therefore visible in one place, logged, counted in :meth:`stats`
  and testable against a fault proxy. Everything else (missing key, missing bucket,
  bad credentials) fails at once with a message naming the store and the key.
  The store says so (``retries_itself``), so the chunk chain does not retry it again.
- A reader waits on some of these calls, so a call can have a budget
  (``call_timeout``, seconds, retries and backoff included): no attempt starts once it
  is spent, and each attempt's connect and read timeouts are cut to fit in it. A mount
  sets it from its ``--read-timeout``: a stalled store then costs a reader that long,
  not attempts x read timeout (5 x 30 s here before).
- Endpoint, region and credentials come from the standard AWS environment and
  config, so the store behaves as users of the AWS CLI expect; any custom endpoint
  (SeaweedFS, MinIO, Ceph) gets path-style addressing.

boto3 is imported only here: it is slow to import and most runs use a local store.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions
from botocore.paginate import TokenEncoder

from cache.blobstore import BlobNotFound, BlobStoreError, validate_key

log = logging.getLogger(__name__)

T = TypeVar("T")
_TOKENS = TokenEncoder()

DEFAULT_REGION = "us-east-1"
# Upper bound of one backoff sleep, whatever the attempt number.
MAX_BACKOFF = 5.0
# Error codes that mean "slow down or try again", whatever the HTTP status says.
RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "PriorRequestNotComplete",
})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
AUTH_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
})
# Network faults worth another attempt: timeouts, refused/reset/closed connections,
# bodies cut short.
RETRYABLE_EXCEPTIONS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ConnectionError,  # endpoint unreachable, connect timeout
    botocore.exceptions.HTTPClientError,  # read timeout, connection closed, streaming error
    botocore.exceptions.IncompleteReadError,
)


@dataclass(frozen=True, slots=True)
class S3Stats:
    """A snapshot of one store's traffic since it was created.

    ``requests`` counts HTTP requests sent (every attempt), ``retries`` the attempts
    that repeated a failed one, ``errors`` the calls that ended in a
    :class:`BlobStoreError` other than :class:`BlobNotFound`; ``bytes_in`` and
    ``bytes_out`` count object payload received and sent.
    """

    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0
    errors: int = 0


def _error_code(e: botocore.exceptions.ClientError) -> tuple[str, int]:
    err = e.response.get("Error", {}) or {}
    status = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
    return str(err.get("Code", "") or status), status


def _is_aws_host(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


class S3Store:
    """Blobs as objects under ``prefix`` in ``bucket`` (implements ``BlobStore``)."""

    # Keys per LIST request (S3's maximum; tests lower it to exercise paging).
    list_page_size: int = 1000
    # The retry policy lives here (see the module docstring): callers should not add theirs.
    retries_itself = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        credentials: tuple[str, str] | None = None,
        region: str | None = None,
        max_pool: int = 32,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_attempts: int = 5,
        backoff_base: float = 0.1,
        max_concurrency: int = 32,
        call_timeout: float | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if max_attempts < 1 or max_concurrency < 1 or max_pool < 1:
            raise ValueError(
                f"s3://{bucket}: max_attempts ({max_attempts}), max_concurrency ({max_concurrency}) "
                f"and max_pool ({max_pool}) must be at least 1"
            )
        if call_timeout is not None:
            if call_timeout <= 0:
                raise ValueError(f"s3://{bucket}: call_timeout must be positive, not {call_timeout!r}")
            # Room for at least two attempts of a stalled server within the budget.
            read_timeout = min(read_timeout, call_timeout / 2)
            connect_timeout = min(connect_timeout, call_timeout / 4)
        self.call_timeout = call_timeout
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self._sem = threading.BoundedSemaphore(max_concurrency)
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "bytes_in": 0, "bytes_out": 0, "retries": 0, "errors": 0}

        if endpoint_url is None and not os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
            endpoint_url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        session = boto3.session.Session()
        self.region = region or os.environ.get("AWS_REGION") or session.region_name or DEFAULT_REGION

        def make_client(path_style: bool) -> Any:
            config = botocore.config.Config(
                region_name=self.region,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_pool_connections=max_pool,
                retries={"total_max_attempts": 1, "mode": "standard"},  # we retry ourselves
                s3={"addressing_style": "path"} if path_style else None,
            )
            kwargs: dict[str, Any] = {}
            if credentials is not None:
                kwargs = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
            return session.client("s3", endpoint_url=endpoint_url, config=config, **kwargs)

        try:
            client = make_client(path_style=endpoint_url is not None)
            if endpoint_url is None and not _is_aws_host(client.meta.endpoint_url):
                # An endpoint from ~/.aws/config: not AWS, so path-style as for any other.
                client = make_client(path_style=True)
        except ValueError as e:  # botocore: malformed endpoint URL
            raise BlobStoreError(f"{self.url}: bad endpoint {endpoint_url!r}: {e}") from e
        except botocore.exceptions.BotoCoreError as e:
            raise BlobStoreError(f"{self.url}: cannot configure S3 client: {e}") from e
        self._client = client
        self.endpoint_url: str = client.meta.endpoint_url

    # -- keys and bookkeeping -------------------------------------------------

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def stats(self) -> S3Stats:
        """A frozen snapshot of the counters (cheap; safe from any thread)."""
        with self._lock:
            return S3Stats(**self._counts)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint_url!r})"

    # -- the retry policy -------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep before attempt ``attempt + 1`` (attempts count from 1):
        full jitter over an exponentially growing window, capped at MAX_BACKOFF."""
        return random.uniform(0, min(MAX_BACKOFF, self.backoff_base * (2 ** (attempt - 1))))

    def _call(self, what: str, key: str | None, fn: Callable[[], T],
              on_client_error: Callable[[str, int], BlobStoreError | None] | None = None) -> T:
        """Run ``fn`` (one request, body read included) under the retry policy.

        ``on_client_error(code, status)`` may turn a non-retryable S3 error into a
        specific :class:`BlobStoreError` (such as :class:`BlobNotFound`).
        """
        where = f"{self.url}: {what} {key}" if key is not None else f"{self.url}: {what}"
        last = ""
        deadline = None if self.call_timeout is None else time.monotonic() + self.call_timeout
        attempt = 0
        for attempt in range(1, self.max_attempts + 1):
            try:
                with self._sem:
                    self._count(requests=1)
                    return fn()
            except botocore.exceptions.ClientError as e:
                code, status = _error_code(e)
                err = self._classify(where, code, status, on_client_error)
                if err is not None:
                    if not isinstance(err, BlobNotFound):
                        self._count(errors=1)
                    raise err from None
                last = f"HTTP {status}" if code == str(status) else f"HTTP {status} {code}"
            except botocore.exceptions.SSLError as e:  # a certificate will not fix itself
                self._count(errors=1)
                raise BlobStoreError(f"{where}: TLS failure at {self.endpoint_url}: {e}") from None
            except RETRYABLE_EXCEPTIONS as e:
                last = f"{type(e).__name__}: {e}"
            except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError) as e:
                self._count(errors=1)
                raise BlobStoreError(
                    f"{where}: no usable AWS credentials ({e}); set AWS_ACCESS_KEY_ID and "
                    f"AWS_SECRET_ACCESS_KEY or configure a profile"
                ) from None
            except botocore.exceptions.ParamValidationError as e:
                self._count(errors=1)
                raise BlobStoreError(f"{where}: refused by the S3 client: {e}") from None
            except botocore.exceptions.BotoCoreError as e:
                self._count(errors=1)
                raise BlobStoreError(f"{where}: {type(e).__name__}: {e}") from None
            if attempt == self.max_attempts:
                break
            delay = self.backoff(attempt)
            if deadline is not None and time.monotonic() + delay >= deadline:
                self._count(errors=1)
                raise BlobStoreError(f"{where}: gave up after {attempt} attempt{'s' if attempt > 1 else ''} "
                                     f"in {self.call_timeout:g} s at {self.endpoint_url}: {last}")
            self._count(retries=1)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.2fs",
                        where, attempt, self.max_attempts, last, delay)
            time.sleep(delay)
        self._count(errors=1)
        raise BlobStoreError(f"{where}: failed after {self.max_attempts} attempts at {self.endpoint_url}: {last}")

    def _classify(self, where: str, code: str, status: int,
                  on_client_error: Callable[[str, int], BlobStoreError | None] | None) -> BlobStoreError | None:
        """The final error for an S3 error response, or None if it is worth retrying."""
        if code in RETRYABLE_CODES or status == 429 or status >= 500:
            return None
        if on_client_error is not None:
            specific = on_client_error(code, status)
            if specific is not None:
                return specific
        if code == "NoSuchBucket":
            return BlobStoreError(f"s3://{self.bucket}: no such bucket")
        if code in AUTH_CODES or status == 403:
            return BlobStoreError(f"{where}: access denied at {self.endpoint_url} ({code}): check the credentials")
        return BlobStoreError(f"{where}: HTTP {status} {code}")

    def _not_found(self, key: str) -> Callable[[str, int], BlobStoreError | None]:
        def check(code: str, status: int) -> BlobStoreError | None:
            if code in NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
                return BlobNotFound(f"{self.url}: no blob {key}")
            return None
        return check

    # -- BlobStore ------------------------------------------------------------

    def get(self, key: str) -> bytes:
        full = self._key(key)

        def fetch() -> bytes:
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
            data = resp["Body"].read()
            self._count(bytes_in=len(data))
            return data

        return self._call("GET", key, fetch, self._not_found(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        full = self._key(key)
        if offset < 0 or length < 0:
            raise ValueError(f"{self.url}: bad range of {key}: offset {offset}, length {length}")
        if length == 0:
            self.size(key)  # still BlobNotFound for a missing blob
            return b""
        past_end = object()

        def fetch() -> bytes | object:
            try:
                resp = self._client.get_object(
                    Bucket=self.bucket, Key=full, Range=f"bytes={offset}-{offset + length - 1}")
            except botocore.exceptions.ClientError as e:
                code, status = _error_code(e)
                if status == 416 or code == "InvalidRange":
                    return past_end  # the blob exists and ends before offset
                raise
            data = resp["Body"].read()
            self._count(bytes_in=len(data))
            if not resp.get("ContentRange"):  # a server that ignored Range sent it all
                data = data[offset:offset + length]
            return data

        got = self._call(f"GET [{offset}:+{length}]", key, fetch, self._not_found(key))
        return b"" if got is past_end else got  # type: ignore[return-value]

    def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        body = bytes(data)

        def send() -> None:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=body)
            self._count(bytes_out=len(body))

        self._call("PUT", key, send)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        full = self._key(key)

        def head() -> int:
            return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])

        return self._call("HEAD", key, head, self._not_found(key))

    def list(self, prefix: str) -> Iterator[str]:
        for key, _size in self.list_sizes(prefix):
            yield key

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every key that starts with ``prefix``: the sizes come with
        the LIST pages, no HEAD per object."""
        if prefix.startswith("/") or "\0" in prefix:
            raise ValueError(f"{self.url}: invalid list prefix {prefix!r}")
        base = f"{self.prefix}/" if self.prefix else ""
        full = base + prefix
        paginator = self._client.get_paginator("list_objects_v2")
        token: str | None = None
        while True:
            # Each page is one request under the retry policy; a retry resumes the
            # paginator from the last page's continuation token, not from the start.
            config: dict[str, Any] = {"PageSize": self.list_page_size}
            if token:
                config["StartingToken"] = _TOKENS.encode({"ContinuationToken": token})

            def page(config: dict[str, Any] = config) -> dict[str, Any]:
                pages = paginator.paginate(Bucket=self.bucket, Prefix=full, PaginationConfig=config)
                return next(iter(pages))

            got = self._call("LIST", full or "(all)", page)
            for obj in got.get("Contents", ()) or ():
                yield obj["Key"][len(base):], int(obj.get("Size", 0) or 0)
            next_token = got.get("NextContinuationToken") if got.get("IsTruncated") else None
            if not next_token:
                return
            if next_token == token:  # a server that repeats itself would loop forever
                raise BlobStoreError(f"{self.url}: LIST {full}: server returned the same continuation token twice")
            token = next_token

    def delete(self, key: str) -> None:
        full = self._key(key)

        def remove() -> None:
            self._client.delete_object(Bucket=self.bucket, Key=full)

        # Deleting an absent key is not an error in S3; tolerate servers that say 404.
        def ignore_missing(code: str, status: int) -> BlobStoreError | None:
            if code in NOT_FOUND_CODES:
                return BlobNotFound(key)
            return None

        try:
            self._call("DELETE", key, remove, ignore_missing)
        except BlobNotFound:
            pass

    def check(self) -> None:
        def head() -> None:
            self._client.head_bucket(Bucket=self.bucket)

        def bucket_error(code: str, status: int) -> BlobStoreError | None:
            if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
                return BlobStoreError(f"s3://{self.bucket}: no such bucket (at {self.endpoint_url})")
            return None

        self._call("HEAD bucket", None, head, bucket_error)
