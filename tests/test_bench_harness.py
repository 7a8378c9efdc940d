"""The cold-start bench harness's own logic, without running the matrix.

The delay proxy must really delay (measured on loopback against a tiny server), the
result schema must accept what the bench writes and refuse what it must not, the
table and the RESULTS.md section must come out as documented, and the statistics
helpers must agree with their definitions. These run in a second or two, no root.
"""

from __future__ import annotations

import hashlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import report, scenarios
from bench.delayproxy import DelayProxy, ProxyThread, parse_hostport

# --------------------------------------------------------------------------- a tiny server


class _LineServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _Answer(socketserver.StreamRequestHandler):
    """One request per line, ``SIZE\\n``; answers ``SIZE`` bytes at once (keep-alive)."""

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            n = int(line)
            block = hashlib.sha256(line).digest() * (n // 32 + 1)
            self.wfile.write(block[:n])
            self.wfile.flush()


@pytest.fixture()
def server() -> Iterator[int]:
    srv = _LineServer(("127.0.0.1", 0), _Answer)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _ask(sock: socket.socket, n: int) -> tuple[float, float, bytes]:
    """Send one request; return (time to first byte, time to last byte, body)."""
    t0 = time.monotonic()
    sock.sendall(f"{n}\n".encode())
    buf = bytearray()
    ttfb = None
    while len(buf) < n:
        part = sock.recv(1 << 20)
        assert part, "connection closed early"
        if ttfb is None:
            ttfb = time.monotonic() - t0
        buf += part
    assert ttfb is not None
    return ttfb, time.monotonic() - t0, bytes(buf)


def _expected(n: int) -> bytes:
    line = f"{n}\n".encode()
    return (hashlib.sha256(line).digest() * (n // 32 + 1))[:n]


# --------------------------------------------------------------------------- delay proxy


def test_proxy_adds_time_to_first_byte_to_every_answer(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as direct:
        direct_ttfb, _, _ = _ask(direct, 100)
    assert direct_ttfb < 0.05
    with ProxyThread(DelayProxy(("127.0.0.1", 0), ("127.0.0.1", server), ttfb_s=0.15)) as p:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            first, _, body1 = _ask(s, 100)
            second, _, body2 = _ask(s, 10)  # same keep-alive connection: delayed again
        stats = p.proxy.stats()
    assert 0.15 <= first < 0.15 + 0.15
    assert 0.15 <= second < 0.15 + 0.15
    assert body1 == _expected(100) and body2 == _expected(10)
    assert stats["connections"] == 1
    assert stats["requests"] == 2
    assert stats["bytes_up"] == len(b"100\n10\n")
    assert stats["bytes_down"] == 110


def test_proxy_streams_after_the_first_byte(server: int) -> None:
    n = 20 << 20
    with ProxyThread(DelayProxy(("127.0.0.1", 0), ("127.0.0.1", server), ttfb_s=0.1)) as p:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            ttfb, total, body = _ask(s, n)
    assert body == _expected(n)
    assert ttfb >= 0.1
    # the rest of the answer is not delayed chunk by chunk: far less than 0.1 s per 256 KiB
    assert total - ttfb < 2.0


def test_proxy_one_way_delay_costs_a_round_trip(server: int) -> None:
    with ProxyThread(DelayProxy(("127.0.0.1", 0), ("127.0.0.1", server), one_way_s=0.05)) as p:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            rtts = [_ask(s, 1000)[0] for _ in range(3)]
    assert all(0.1 <= r < 0.1 + 0.15 for r in rtts), rtts


def test_proxy_counts_a_refused_target() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead_port = free.getsockname()[1]
    with ProxyThread(DelayProxy(("127.0.0.1", 0), ("127.0.0.1", dead_port), ttfb_s=0.01)) as p:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.settimeout(5)
            assert s.recv(10) == b""  # closed, not hung
        assert p.proxy.stats()["connect_errors"] == 1


def test_parse_hostport() -> None:
    assert parse_hostport("198.18.0.2:8333") == ("198.18.0.2", 8333)
    assert parse_hostport("[fd00::2]:80") == ("fd00::2", 80)
    with pytest.raises(ValueError):
        parse_hostport("no-port")


def test_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError):
        DelayProxy(("127.0.0.1", 0), ("127.0.0.1", 1), ttfb_s=-1)


# --------------------------------------------------------------------------- statistics


def test_median_and_p90() -> None:
    assert report.median([3.0]) == 3.0
    assert report.p90([3.0]) == 3.0
    assert report.median([1, 3, 2]) == 2.0
    assert report.median([1, 2, 3, 4]) == 2.5
    xs = list(range(1, 11))  # 1..10: p90 lies 0.1 of the way from 9 to 10
    assert report.p90(xs) == pytest.approx(9.1)
    assert report.quantile([5, 1], 0.0) == 1 and report.quantile([5, 1], 1.0) == 5
    with pytest.raises(ValueError):
        report.p90([])
    with pytest.raises(ValueError):
        report.quantile([1], 1.5)


# --------------------------------------------------------------------------- schema


def _run(scenario: str, total: float | None, ok: bool = True, **kw: Any) -> dict[str, Any]:
    r = scenarios.RunResult(scenario, "numpy", "import numpy", kw.pop("repeat", 0))
    r.ok = ok
    if total is not None:
        r.total_s = total
        r.ready_s = kw.pop("ready", total / 2)
        r.start_s = r.ready_s + 0.1
        r.phases_s = kw.pop("phases", {"mount": r.ready_s, "start": 0.1, "run": total - r.ready_s - 0.1})
    r.links = kw.pop("links", {"blob": {"connections": 1, "requests": 10, "bytes_up": 1 << 10,
                                        "bytes_down": 3 << 20}})
    r.workload_io = kw.pop("io", {"rchar": 2 << 20})
    r.tiers = kw.pop("tiers", {})
    if not ok:
        r.error = kw.pop("error", "boom")
    return r.to_dict()


def _doc(runs: list[dict[str, Any]]) -> dict[str, Any]:
    doc = {"schema": report.SCHEMA, "version": report.VERSION, "command": "python -m bench coldstart --quick",
           "started": "2026-01-01T10:00:00+00:00", "finished": "2026-01-01T10:03:00+00:00",
           "machine": {"hostname": "h", "cpus": 2, "memory_gib": 24.0, "kernel": "6.1", "os": "Debian"},
           "settings": {"blob_latency_ms": 200, "az_latency_ms": 1, "one_way_ms": 0, "bandwidth_mbit": 1000,
                        "repeat": 2},
           "images": {"numpy": {"layer_sizes": [1, 2], "n_entries": 3}}, "runs": runs}
    doc["summary"] = report.summarize(runs, scenarios.SCENARIOS)
    return doc


def test_schema_accepts_what_the_bench_writes(tmp_path: Path) -> None:
    doc = _doc([_run("baseline", 10.0), _run("imagefs-cold", 2.0), _run("casync", None, ok=False)])
    assert report.validate(doc) == []
    out = tmp_path / "r.json"
    report.write_json(doc, out)
    assert report.load(out)["runs"][2]["error"] == "boom"


@pytest.mark.parametrize("mutate, complaint", [
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(schema="other"), "schema"),
    (lambda d: d["settings"].pop("bandwidth_mbit"), "settings.bandwidth_mbit"),
    (lambda d: d["runs"][0].update(total_s=None), "runs[0].total_s"),
    (lambda d: d["runs"][0]["phases_s"].update(download=1.0), "runs[0].phases_s.download"),
    (lambda d: d["runs"][0]["phases_s"].update(run=-1.0), "runs[0].phases_s.run"),
    (lambda d: d["runs"][0].update(ok="yes"), "runs[0].ok"),
    (lambda d: d["runs"][0].update(repeat=True), "runs[0].repeat"),
    (lambda d: d["runs"][0]["links"]["blob"].update(requests="many"), "runs[0].links.blob.requests"),
    (lambda d: d["runs"][0]["workload_io"].update(rchar=float("nan")), "runs[0].workload_io.rchar"),
    (lambda d: d.update(runs={}), "runs"),
    (lambda d: d["runs"][0].update(timed_out_s="long"), "runs[0].timed_out_s"),
])
def test_schema_rejects(mutate: Any, complaint: str) -> None:
    doc = _doc([_run("baseline", 10.0)])
    mutate(doc)
    problems = report.validate(doc)
    assert any(p.startswith(complaint) for p in problems), problems
    with pytest.raises(report.SchemaError):
        report.check(doc)


def test_schema_rejects_non_objects() -> None:
    assert report.validate([]) == ["document: expected a JSON object"]
    assert report.validate(json.loads('{"schema": "imagefs-bench/coldstart"}'))


# --------------------------------------------------------------------------- summary and table


def test_summary_medians_over_ok_runs_only() -> None:
    runs = [_run("imagefs-cold", 2.0, repeat=0), _run("imagefs-cold", 4.0, repeat=1),
            _run("imagefs-cold", None, ok=False, repeat=2)]
    (entry,) = report.summarize(runs)
    assert (entry["n"], entry["ok"]) == (3, 2)
    assert entry["total_s"] == {"median": 3.0, "p90": pytest.approx(3.8)}
    assert entry["link_bytes"] == (3 << 20) + (1 << 10)
    assert entry["link_requests"] == 10
    assert entry["errors"] == ["boom"]
    assert set(entry["phases_s"]) == {"mount", "start", "run"}


def test_markdown_table() -> None:
    timed_out = _run("casync", None, ok=False)
    timed_out["timed_out_s"] = 40.0
    runs = [_run("baseline", 10.0), _run("imagefs-cold", 2.0), _run("imagefs-az", 20.0),
            _run("squashfuse", None, ok=False), timed_out]
    table = report.markdown_table(report.summarize(runs, scenarios.SCENARIOS))
    assert table.splitlines() == [
        "| image | workload | scenario | ready s | start s | exit s (median) | exit s (p90) | vs baseline "
        "| link MiB | link requests | workload read MiB | ok/n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| numpy | import numpy | baseline | 5.00 | 5.10 | 10.0 | 10.0 | 1× | 3.0 | 10 | 2.0 | 1/1 |",
        "| numpy | import numpy | imagefs-cold | 1.00 | 1.10 | 2.00 | 2.00 | 5.0× faster | 3.0 | 10 | 2.0 | 1/1 |",
        "| numpy | import numpy | imagefs-az | 10.0 | 10.1 | 20.0 | 20.0 | 2.0× slower | 3.0 | 10 | 2.0 | 1/1 |",
        "| numpy | import numpy | squashfuse | – | – | – | – | – | – | – | – | 0/1 ⚠ |",
        "| numpy | import numpy | casync | – | – | > 40 (timeout) | – | > 4× slower | – | – | – | 0/1 ⚠ |",
    ]


def test_markdown_report_states_command_machine_and_settings() -> None:
    doc = _doc([_run("baseline", 10.0), _run("casync", None, ok=False, error="container did not exit within 40s")])
    text = report.markdown_report(doc, "chart.png")
    assert "Command: `python -m bench coldstart --quick`" in text
    assert "2 CPUs, 24 GiB" in text
    assert "200 ms to first byte" in text and "1000 Mbit/s" in text
    assert "casync: container did not exit within 40s" in text
    assert text.rstrip().endswith("![where the time went](chart.png)")


def test_tier_table_shows_where_imagefs_found_the_chunks() -> None:
    def tiers(blob_req: int, blob_mib: int, az: int | None = None) -> dict[str, dict[str, int]]:
        t = {"blob": {"requests": blob_req, "hits": 10 * blob_req, "misses": 0, "bytes": blob_mib << 20, "errors": 0},
             "memory": {"requests": 100, "hits": 90, "misses": 10, "bytes": 50 << 20, "errors": 0}}
        if az is not None:
            t["az"] = {"requests": az, "hits": 40, "misses": 0, "bytes": 30 << 20, "errors": 0}
        return t

    runs = [_run("baseline", 10.0),
            _run("imagefs-cold", 2.0, repeat=0, tiers=tiers(4, 10)), _run("imagefs-cold", 3.0, repeat=1, tiers=tiers(8, 20)),
            _run("imagefs-cold", None, ok=False, repeat=2, tiers=tiers(100, 100)),  # failed: not in the medians
            _run("imagefs-az", 2.0, tiers=tiers(0, 0, az=5))]
    summary = report.summarize(runs, scenarios.SCENARIOS)
    assert report.tier_table(summary).splitlines() == [
        "| image | workload | scenario | memory | az | blob |",  # fastest tier first
        "|---|---|---|---|---|---|",
        "| numpy | import numpy | imagefs-cold | 100 / 90 / 50.0 | – | 6 / 60 / 15.0 |",
        "| numpy | import numpy | imagefs-az | 100 / 90 / 50.0 | 5 / 40 / 30.0 | – |",
    ]
    assert report.tier_table(report.summarize([_run("baseline", 10.0)])) == ""
    doc = _doc(runs)
    assert "Per tier (`imagefs stats`" in report.markdown_report(doc)
    doc["settings"]["agent"] = True
    assert "imagefs mounts forked from a running `imagefs agent`" in report.markdown_report(doc)
    doc["settings"]["agent"] = False
    assert "every imagefs mount spawns a fresh daemon (no agent)" in report.markdown_report(doc)


def test_warm_up_waits_for_the_mounts_prefetch(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([{"prefetch": {"state": "pending"}}, {"prefetch": {"state": "running", "planned": 9}},
                    {"prefetch": {"state": "done", "planned": 9, "fetched": 7}}, {}])
    monkeypatch.setattr(scenarios, "imagefs_stats", lambda mp: next(answers))
    pf = scenarios.wait_for_prefetch(Path("/mnt/x"), timeout=10, poll=0.01)
    assert (pf["state"], pf["planned"], pf["fetched"]) == ("done", 9, 7) and 0 < pf["wait_s"] < 5
    assert scenarios.wait_for_prefetch(Path("/mnt/x"), timeout=10)["state"] == "unknown"  # an older mount
    monkeypatch.setattr(scenarios, "imagefs_stats", lambda mp: {"prefetch": {"state": "running"}})
    assert scenarios.wait_for_prefetch(Path("/mnt/x"), timeout=0.05, poll=0.01)["state"] == "running"


def test_results_section_is_created_then_appended_leaving_others(tmp_path: Path) -> None:
    md = tmp_path / "RESULTS.md"
    report.append_results_section(md, "### run 1\n\nfirst", intro="About cold start.")
    assert md.read_text() == "# Bench results\n\n## Cold start\n\nAbout cold start.\n\n### run 1\n\nfirst\n"
    md.write_text(md.read_text() + "\n## Index build\n\ntheirs\n")
    report.append_results_section(md, "### run 2\n\nsecond", intro="About cold start.")
    text = md.read_text()
    assert text.count("About cold start.") == 1
    assert text.index("first") < text.index("second") < text.index("## Index build")
    assert text.endswith("## Index build\n\ntheirs\n")


def test_chart_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [_run("baseline", 10.0, phases={"pull": 2.0, "unpack": 7.0, "start": 0.1, "run": 0.9}),
            _run("imagefs-cold", 2.0), _run("casync", None, ok=False)]
    out = tmp_path / "c.png"
    report.chart(report.summarize(runs, scenarios.SCENARIOS), out, "title\nsettings")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- scenario helpers


def test_stats_diff_and_tiers() -> None:
    before = {"cache": {"tiers": {"blob": {"requests": 5, "bytes": 100, "hits": 5, "misses": 0, "errors": 0}}},
              "requests": {"ops": {"read": 10}}, "image": "x"}
    after = {"cache": {"tiers": {"blob": {"requests": 7, "bytes": 160, "hits": 7, "misses": 0, "errors": 0},
                                 "ssd": {"requests": 3, "bytes": 30, "hits": 1, "misses": 2, "errors": 0}}},
             "requests": {"ops": {"read": 25, "lookup": 4}}, "image": "x"}
    d = scenarios.stats_diff(after, before)
    assert scenarios.tiers_from_stats(d) == {
        "blob": {"requests": 2, "hits": 2, "misses": 0, "bytes": 60, "errors": 0},
        "ssd": {"requests": 3, "hits": 1, "misses": 2, "bytes": 30, "errors": 0}}
    assert scenarios.fuse_from_stats(d) == {"ops_read": 15, "ops_lookup": 4}
    assert d["image"] == "x"


def test_oci_config_reads_the_tagged_manifest(tmp_path: Path) -> None:
    def put(doc: dict[str, Any]) -> str:
        data = json.dumps(doc).encode()
        hexd = hashlib.sha256(data).hexdigest()
        (tmp_path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (tmp_path / "blobs" / "sha256" / hexd).write_bytes(data)
        return f"sha256:{hexd}"

    cfg = put({"config": {"Cmd": ["python3"], "Env": ["PATH=/opt/venv/bin:/usr/bin"]}})
    other = put({"config": {"Cmd": ["wrong"]}})
    man = put({"config": {"digest": cfg}, "layers": []})
    man_other = put({"config": {"digest": other}, "layers": []})
    (tmp_path / "index.json").write_text(json.dumps({"manifests": [
        {"digest": man_other, "annotations": {"org.opencontainers.image.ref.name": "old"}},
        {"digest": man, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    assert scenarios.oci_config(tmp_path)["Cmd"] == ["python3"]


def test_workloads_apply_to_their_images() -> None:
    by_name = {w.name: w for w in scenarios.WORKLOADS}
    assert by_name["import torch"].applies_to("torch") and not by_name["import torch"].applies_to("numpy")
    assert by_name["true"].applies_to("numpy") and by_name["import numpy"].applies_to("torch")


# --------------------------------------------------------------------------- timeouts and peers

_FAKE_RUNC = """#!/bin/sh
# runc --root ROOT run --bundle B --pid-file P ID | kill ID SIG | delete --force ID
root=$2
case "$3" in
run) echo $$ > "$7"; exec sleep 30 ;;
kill) kill -9 "$(cat "$(dirname "$root")/bundles/$4/pid")" 2>/dev/null; exit 0 ;;
*) exit 0 ;;
esac
"""


def test_run_timeout_counts_from_the_runs_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that already spent 5 s (pull, mount, a slow /etc/passwd) before ``runc run``
    has 0.5 s left of a 5.5 s timeout, not another 5.5 s."""
    import contextlib

    import imagefs.run
    import imagefs.runtime_config

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "runc").write_text(_FAKE_RUNC)
    (bindir / "runc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")

    @contextlib.contextmanager
    def no_overlay(lower: str, workdir: str) -> Iterator[str]:
        yield lower

    monkeypatch.setattr(imagefs.run, "overlay", no_overlay)
    monkeypatch.setattr(imagefs.runtime_config, "runtime_config", lambda *a, **kw: {})
    ctx: Any = type("Ctx", (), {"rundir": tmp_path / "run", "runc_base": {}})()
    aborted = []
    t0 = time.monotonic() - 5.0
    called = time.monotonic()
    with pytest.raises(scenarios.ScenarioTimeout) as exc:
        scenarios.run_container(ctx, tmp_path, {}, ["/bin/true"], t0, 5.5, abort=lambda: aborted.append(1))
    assert time.monotonic() - called < 3.0
    assert 5.5 <= exc.value.after < 8.0
    assert aborted == [1]


def test_link_note_says_requests_and_time_per_request() -> None:
    links = {"casync": {"connections": 1, "requests": 215, "bytes_up": 30667, "bytes_down": 4842939}}
    note = scenarios.link_note(links, 43.0)
    assert "215 requests on 1 connection(s)" in note
    assert "4.6 MiB down" in note and "200 ms of the run per request" in note
    assert scenarios.link_note({"casync": {"requests": 0}}, 10.0) == "casync link: no requests"


def test_a_timed_out_peer_run_reports_what_crossed_its_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def timeout(*a: Any, **kw: Any) -> Any:
        raise scenarios.ScenarioTimeout("container did not exit within 30s of the run's start", 31.0)

    monkeypatch.setattr(scenarios, "drop_caches", lambda: None)
    monkeypatch.setattr(scenarios, "_wait_mounted", lambda *a: None)
    monkeypatch.setattr(scenarios, "_stop_fuse_daemon", lambda mp, proc: proc.wait())
    monkeypatch.setattr(scenarios, "run_container", timeout)
    ctx: Any = type("Ctx", (), {
        "rundir": tmp_path, "reset_links": lambda self: None,
        "link_stats": lambda self, names: {n: {"connections": 1, "requests": 155, "bytes_up": 1,
                                               "bytes_down": 3 << 20} for n in names}})()
    img = scenarios.ImageAssets("numpy", "bench/numpy", "bench/numpy:latest", {}, tmp_path / "x.sqfs", "numpy.caidx")
    r = scenarios._peer_run(ctx, "casync", img, scenarios.WORKLOADS[0], 0, ["true"], ["casync"], 30.0,
                            scenarios.CASYNC_TIMEOUT_HINT)
    assert not r.ok and r.timed_out_s == 31.0
    assert r.error is not None and r.error.startswith("container did not exit within 30s")
    assert "155 requests on 1 connection(s)" in r.error and "200 ms of the run per request" in r.error
    assert "one ~64 KiB chunk at a time" in r.error
    assert len(r.error) <= 300, "the report keeps 300 characters of an error"
    assert r.links["casync"]["requests"] == 155


def test_static_http_answers_keep_alive_gets_without_nagle_stalls(tmp_path: Path) -> None:
    """casync-http GETs one chunk after another on one connection; with Nagle on the
    server each answer's body waited ~40 ms for the client's delayed ACK of its headers."""
    import http.client
    import http.server
    import os

    from bench import services

    body = os.urandom(70_000)
    (tmp_path / "chunk").write_bytes(body)
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **kw: services._StaticHandler(*a, directory=str(tmp_path), **kw))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=5)
        times = []
        for _ in range(30):
            t = time.monotonic()
            conn.request("GET", "/chunk")
            resp = conn.getresponse()
            assert resp.read() == body
            times.append(time.monotonic() - t)
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
    times.sort()
    assert times[len(times) // 2] < 0.02, f"median GET {times[len(times) // 2] * 1000:.0f} ms"
    assert sum(times) < 0.25, f"30 GETs took {sum(times):.2f}s"
