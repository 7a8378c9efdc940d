"""S3Store's own promises, against real SeaweedFS and a real fault proxy in front of it:
the retry policy (what is retried, how often, counted), concurrency bound, paging,
prefix isolation and configuration from the standard AWS environment.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from cache.blobstore import BlobNotFound, BlobStoreError
from cache.s3store import S3Store
from cache.stores import open_store
from tests.support.faultproxy import FaultProxy
from tests.support.seaweed import Seaweed  # the `seaweed` session fixture comes from conftest.py

pytestmark = pytest.mark.timeout(60)

ATTEMPTS = 4
READ_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def proxy_server(seaweed: Seaweed) -> Iterator[FaultProxy]:  # noqa: F811
    with FaultProxy("127.0.0.1", seaweed.s3_port) as p:
        yield p


@pytest.fixture
def proxy(proxy_server: FaultProxy) -> Iterator[FaultProxy]:
    proxy_server.reset()
    proxy_server.reset_counters()
    yield proxy_server
    proxy_server.reset()


@pytest.fixture
def store(seaweed: Seaweed, proxy: FaultProxy) -> S3Store:  # noqa: F811
    """A store that reaches SeaweedFS through the proxy, with test-sized timeouts."""
    return seaweed.store(f"s3store/{uuid.uuid4().hex[:12]}", endpoint_url=proxy.url,
                         connect_timeout=1, read_timeout=READ_TIMEOUT, max_attempts=ATTEMPTS,
                         backoff_base=0.01)


def test_500s_then_success_is_retried_and_counted(store: S3Store, proxy: FaultProxy,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    store.put("k", b"payload")
    before = store.stats()
    proxy.fail_next(2, status=500)
    with caplog.at_level(logging.WARNING, logger="cache.s3store"):
        assert store.get("k") == b"payload"
    after = store.stats()
    assert proxy.failed == 2
    assert after.retries - before.retries == 2
    assert after.requests - before.requests == 3
    assert after.errors == 0
    assert after.bytes_in - before.bytes_in == len(b"payload")
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == 2 and "GET k" in retried[0].getMessage() and "500" in retried[0].getMessage()


def test_503_slowdown_is_retried(store: S3Store, proxy: FaultProxy) -> None:
    proxy.fail_next(3, status=503)
    store.put("slow", b"down")  # three SlowDowns, then the real PUT
    assert proxy.failed == 3
    assert store.stats().retries == 3
    assert store.stats().bytes_out == len(b"down")
    proxy.fail_next(1, status=503)
    assert store.exists("slow")  # HEAD: an error response without a body, still retried
    assert store.get("slow") == b"down"


def test_stall_longer_than_read_timeout_is_retried(store: S3Store, proxy: FaultProxy) -> None:
    store.put("stall", b"x" * 50_000)
    proxy.stall_next(1, seconds=5)
    start = time.monotonic()
    assert store.get("stall") == b"x" * 50_000
    elapsed = time.monotonic() - start
    assert proxy.stalled == 1
    assert store.stats().retries == 1
    assert READ_TIMEOUT * 0.9 <= elapsed < 3, f"{elapsed:.2f}s: should give up on the stall and retry"


def test_a_call_timeout_bounds_every_attempt_together(seaweed: Seaweed, proxy: FaultProxy) -> None:  # noqa: F811
    """A stalled store costs a call its budget, not attempts x read timeout: the
    attempts' timeouts are cut to fit, and no attempt starts once it is spent."""
    store = seaweed.store(f"s3store/{uuid.uuid4().hex[:12]}", endpoint_url=proxy.url, read_timeout=30,
                          max_attempts=5, backoff_base=0.01, call_timeout=2.0)
    store.put("stalled", b"y" * 1000)
    proxy.stall_next(100, seconds=20)
    before = store.stats().requests
    start = time.monotonic()
    with pytest.raises(BlobStoreError, match=r"stalled: gave up after 2 attempts in 2 s"):
        store.get_range("stalled", 0, 10)
    assert time.monotonic() - start < 5  # 2 x 1 s, not 5 x 30 s
    assert proxy.stalled == 2 and store.stats().requests - before == 2
    assert S3Store.retries_itself  # the chain relies on it not to retry on top


def test_cut_connection_is_retried(store: S3Store, proxy: FaultProxy) -> None:
    store.put("cut", b"data")
    proxy.cut_next(2)
    assert store.get_range("cut", 1, 2) == b"at"
    assert proxy.cut == 2
    assert store.stats().retries == 2


def test_persistent_500_gives_up_after_max_attempts(store: S3Store, proxy: FaultProxy) -> None:
    proxy.fail_next(100, status=500)
    start = time.monotonic()
    with pytest.raises(BlobStoreError) as info:
        store.get("packs/persistent")
    assert time.monotonic() - start < 3
    assert not isinstance(info.value, BlobNotFound)
    msg = str(info.value)
    assert "packs/persistent" in msg and "500" in msg and f"{ATTEMPTS} attempts" in msg
    assert proxy.failed == ATTEMPTS
    stats = store.stats()
    assert (stats.requests, stats.retries, stats.errors) == (ATTEMPTS, ATTEMPTS - 1, 1)


def test_client_errors_are_not_retried(seaweed: Seaweed, store: S3Store, proxy: FaultProxy) -> None:  # noqa: F811
    with pytest.raises(BlobNotFound):
        store.get("absent")
    assert (store.stats().requests, store.stats().retries, store.stats().errors) == (1, 0, 0)

    wrong = seaweed.store(endpoint_url=proxy.url, credentials=(seaweed.access_key, "wrong-secret"),
                          backoff_base=0.01)
    with pytest.raises(BlobStoreError, match="access denied") as info:
        wrong.get("anything")
    assert wrong.url in str(info.value)
    assert (wrong.stats().requests, wrong.stats().retries, wrong.stats().errors) == (1, 0, 1)


def test_list_pages_and_resumes_after_a_fault(store: S3Store, proxy: FaultProxy) -> None:
    keys = [f"many/{i:02d}" for i in range(10)]
    for k in keys:
        store.put(k, b"")
    store.list_page_size = 3
    before = proxy.requests
    it = store.list("many/")
    first = next(it)  # first page fetched
    proxy.fail_next(1, status=503)  # the second page fails once
    rest = list(it)
    assert sorted([first, *rest]) == keys  # each key once: resumed, not restarted
    assert proxy.failed == 1
    assert proxy.requests - before == 4 + 1  # four pages of <=3 keys, one retry


def test_prefix_isolation(seaweed: Seaweed) -> None:  # noqa: F811
    tag = uuid.uuid4().hex[:8]
    a = seaweed.store(f"iso-{tag}/a")
    ab = seaweed.store(f"iso-{tag}/ab")
    a.put("k", b"in a")
    ab.put("k", b"in ab")
    assert list(a.list("")) == ["k"] and a.get("k") == b"in a"
    assert ab.get("k") == b"in ab"
    a.delete("k")
    assert ab.exists("k") and not a.exists("k")
    assert a.url == f"s3://{seaweed.bucket}/iso-{tag}/a"
    assert seaweed.store().url == f"s3://{seaweed.bucket}"


def test_semaphore_bounds_concurrent_requests(seaweed: Seaweed, proxy: FaultProxy) -> None:  # noqa: F811
    prefix = f"sem/{uuid.uuid4().hex[:8]}"
    seaweed.store(prefix).put("k", b"v")
    narrow = seaweed.store(prefix, endpoint_url=proxy.url, max_concurrency=2)
    proxy.delay(100)  # each request takes >= 200 ms (100 ms each way)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda _: narrow.get("k"), range(8))) == [b"v"] * 8
    elapsed = time.monotonic() - start
    assert elapsed >= 4 * 0.2 * 0.95, f"8 requests, 2 at a time, took only {elapsed:.2f}s"


def test_backoff_is_full_jitter_and_capped(seaweed: Seaweed) -> None:  # noqa: F811
    s = seaweed.store(backoff_base=0.1)
    for attempt in (1, 2, 3, 4):
        samples = [s.backoff(attempt) for _ in range(200)]
        window = 0.1 * 2 ** (attempt - 1)
        assert all(0 <= x <= window for x in samples)
        assert min(samples) < window * 0.2 and max(samples) > window * 0.8  # spread over the window
    assert max(s.backoff(40) for _ in range(50)) <= 5.0


def test_stats_are_frozen_snapshots(store: S3Store) -> None:
    snap = store.stats()
    store.put("s", b"12345")
    assert store.stats().bytes_out == snap.bytes_out + 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.requests = 99  # type: ignore[misc]


def test_configuration_from_aws_environment(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("IMAGEFS_S3_ENDPOINT", raising=False)

    env_store = S3Store(seaweed.bucket, "envcfg")
    assert env_store.region == "eu-west-3"
    assert env_store.endpoint_url == seaweed.endpoint
    env_store.put("k", b"from env")  # path-style, signed with the env credentials

    via_url = open_store(f"s3://{seaweed.bucket}/envcfg")  # the CLI's way in
    assert isinstance(via_url, S3Store) and via_url.get("k") == b"from env"

    monkeypatch.delenv("AWS_REGION")
    assert S3Store(seaweed.bucket).region == "us-east-1"


def test_missing_credentials_is_a_clear_error(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                              tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s = S3Store(seaweed.bucket, endpoint_url=seaweed.endpoint)
    start = time.monotonic()
    with pytest.raises(BlobStoreError, match="no usable AWS credentials") as info:
        s.check()
    assert time.monotonic() - start < 3
    assert s.url in str(info.value)


def test_bad_arguments_are_refused(seaweed: Seaweed) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="bucket"):
        S3Store("", endpoint_url=seaweed.endpoint)
    with pytest.raises(ValueError, match="max_attempts"):
        seaweed.store(max_attempts=0)
    s = seaweed.store()
    with pytest.raises(ValueError, match="bad range"):
        s.get_range("k", -1, 5)
    with pytest.raises(BlobStoreError, match="bad endpoint"):
        S3Store("bucket", endpoint_url="not a url", credentials=("a", "b"))
