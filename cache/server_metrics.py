"""The cache server's counters, rendered in the Prometheus text exposition format.

Why hand-written rather than a client library: the server needs a dozen numbers and
one histogram, all updated on the single trio thread (so no locks), and a new
dependency for that is not worth it. The output follows the text format (version
0.0.4): ``# HELP`` and ``# TYPE`` per family, counters named ``*_total``, histograms as
cumulative ``_bucket{le=...}`` series ending in ``+Inf`` plus ``_sum`` and ``_count``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

PREFIX = "imagefs_cache_server_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a page-cache hit is well under 1 ms, a read-through a blob round trip.
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


@dataclass
class ServerMetrics:
    """Everything the server counts itself (tier-owned numbers are passed to
    :meth:`render`)."""

    chunk_requests: int = 0  # HTTP requests for chunks (single or batch)
    chunks_requested: int = 0
    hits: int = 0  # chunks served from the disk cache
    misses: int = 0  # chunks that needed the blob store
    joined: int = 0  # misses that waited for a fetch already in flight (single flight)
    failed: int = 0  # chunks answered with an error status
    bytes_served: int = 0
    bytes_sendfile: int = 0
    blob_fetches: int = 0  # ranged blob-store reads started
    unauthorized: int = 0
    bad_requests: int = 0
    demand_requests: int = 0  # batch requests of the demand class
    background_requests: int = 0  # ... and of the background class (prefetch, profile replay)
    promoted: int = 0  # background reads a demand request joined (now demand work)
    heartbeats: int = 0  # progress frames sent while waiting for the blob store
    remembered_failures: int = 0  # chunks answered from the failure memory (no store read)
    refused_refs: int = 0  # refs not read through: not what their pack holds
    read_ahead: int = 0  # chunks a background read-through brought beyond what was asked
    toc_loads: int = 0  # packs whose table of contents (or size) was loaded
    speculative_reads: int = 0  # ranged reads that ran while their pack's table loaded
    blob_requests: int = 0  # content-addressed blobs (image indexes) asked for
    corrupt_reports: int = 0  # digests clients said did not verify
    reverified_on_report: int = 0  # ... of which a verified file will be checked again
    refused_connections: int = 0  # over the per-client connection limit
    idle_closed: int = 0  # idle keep-alive connections closed by the server
    in_flight: int = 0  # chunk requests being answered now
    blob_in_flight: int = 0
    connections: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def render(self, *, evictions: int, blob_errors: int, corrupt: int, cache_bytes: int,
               cache_entries: int, cache_max_bytes: int, blob_waiting: dict[str, int] | None = None) -> str:
        out: list[str] = []
        counter = lambda n, h, v: _family(out, n, "counter", h, [("", v)])  # noqa: E731
        gauge = lambda n, h, v: _family(out, n, "gauge", h, [("", v)])  # noqa: E731
        counter("requests_total", "HTTP requests for chunks (single and batch).", self.chunk_requests)
        counter("chunks_requested_total", "Chunks asked for.", self.chunks_requested)
        counter("hits_total", "Chunks served from the disk cache.", self.hits)
        counter("misses_total", "Chunks not in the disk cache (read through to the blob store).",
                self.misses)
        counter("joined_total", "Misses that joined a blob read already in flight.", self.joined)
        counter("failed_total", "Chunks answered with an error status.", self.failed)
        counter("served_bytes_total", "Chunk bytes sent to clients.", self.bytes_served)
        counter("sendfile_bytes_total", "Chunk bytes sent with sendfile from the disk cache.",
                self.bytes_sendfile)
        counter("blob_fetches_total", "Ranged reads from the blob store.", self.blob_fetches)
        counter("blob_errors_total", "Blob-store reads that failed.", blob_errors)
        counter("corrupt_total", "Chunk copies that failed verification (disk cache or blob store).",
                corrupt)
        counter("evictions_total", "Chunks evicted from the disk cache.", evictions)
        counter("unauthorized_total", "Requests refused for a missing or wrong secret.",
                self.unauthorized)
        counter("bad_requests_total", "Malformed requests.", self.bad_requests)
        _family(out, "class_requests_total", "counter", "Batch requests by class.",
                [('{class="demand"}', self.demand_requests), ('{class="background"}', self.background_requests)])
        counter("promoted_total", "Background blob reads a demand request joined.", self.promoted)
        counter("heartbeats_total", "Progress frames sent while waiting for the blob store.", self.heartbeats)
        counter("remembered_failures_total", "Chunks answered from the failure memory, without a store read.",
                self.remembered_failures)
        counter("refused_refs_total", "Refs not read through: not what their pack holds.", self.refused_refs)
        counter("read_ahead_total", "Chunks background read-throughs brought beyond what was asked.",
                self.read_ahead)
        counter("toc_loads_total", "Packs whose table of contents (or size) was loaded.", self.toc_loads)
        counter("speculative_reads_total", "Ranged reads run while their pack's table of contents loaded.",
                self.speculative_reads)
        counter("blob_requests_total", "Image indexes asked for (content-addressed blobs).", self.blob_requests)
        counter("corrupt_reports_total", "Chunks clients reported as not verifying.", self.corrupt_reports)
        counter("refused_connections_total", "Connections refused over the per-client limit.",
                self.refused_connections)
        counter("idle_closed_total", "Idle keep-alive connections closed by the server.", self.idle_closed)
        gauge("in_flight_requests", "Chunk requests being answered.", self.in_flight)
        gauge("blob_fetches_in_flight", "Blob-store reads in progress.", self.blob_in_flight)
        waiting = blob_waiting or {}
        _family(out, "blob_fetches_waiting", "gauge", "Blob-store reads waiting for a slot, by class.",
                [(f'{{class="{k}"}}', v) for k, v in sorted(waiting.items())])
        gauge("open_connections", "Client connections open.", self.connections)
        gauge("cache_bytes", "Bytes held in the disk cache.", cache_bytes)
        gauge("cache_entries", "Chunks held in the disk cache.", cache_entries)
        gauge("cache_max_bytes", "Bound of the disk cache.", cache_max_bytes)
        h = self.latency
        samples: list[tuple[str, float]] = []
        cumulative = 0
        for bound, n in zip(h.bounds, h.counts):
            cumulative += n
            samples.append((f'_bucket{{le="{_num(bound)}"}}', cumulative))
        samples.append(('_bucket{le="+Inf"}', h.count))
        samples.append(("_sum", h.total))
        samples.append(("_count", h.count))
        _family(out, "request_duration_seconds", "histogram",
                "Time to answer a chunk request, from its head to its last byte.", samples)
        return "".join(out)


def _num(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return str(int(v))
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _family(out: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[str, float]]) -> None:
    full = PREFIX + name
    out.append(f"# HELP {full} {help_text}\n# TYPE {full} {kind}\n")
    for suffix, value in samples:
        out.append(f"{full}{suffix} {_num(value)}\n")
