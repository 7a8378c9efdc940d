"""Results of the cold-start bench: the JSON document, its summary, a table and a chart.

Why a schema with a version: results are kept in git and compared across commits and
machines, so a reader must be able to tell what a file holds and refuse one it does
not understand. :func:`validate` checks a document by hand (no jsonschema dependency)
and names every problem it finds.

Schema ``imagefs-bench/coldstart``, version 1::

    schema    "imagefs-bench/coldstart"
    version   1
    command   the command line that produced it
    started, finished   ISO 8601 local time with offset
    machine   {hostname, kernel, cpus, memory_gib, python, ...}
    settings  {blob_latency_ms, az_latency_ms, one_way_ms, bandwidth_mbit, repeat,
               quick, images[], workloads[], scenarios[], ...}: what every run ran with
    images    {name: {layer_sizes[], n_entries, ...}}
    runs[]    one per measured run:
      scenario, image, workload (str), repeat (int), ok (bool), error (str|null),
      exit_status (int|null),
      phases_s   {phase: seconds} with phases from resolve, pull, unpack, mount, start, run
      ready_s, start_s, total_s   seconds from t0 (null when the run failed early)
      timed_out_s  seconds after which the run was stopped (null unless it timed out)
      links      {link: {connections, requests, bytes_up, bytes_down}}  (delay proxy counters)
      tiers      {tier: {requests, hits, misses, bytes, errors}}       (imagefs stats)
      workload_io {rchar, read_bytes, syscr, ...}  (/proc/<pid>/io of the workload)
      fuse       {ops_<op>: count, read_bytes?}                      (imagefs stats)
    warmups[] (optional) unmeasured runs that filled the AZ cache server, same shape as runs
    summary[] one per (image, workload, scenario), from :func:`summarize`:
      image, workload, scenario, n, ok, errors[], timed_out_s (shortest timeout, or null),
      total_s, ready_s, start_s {median, p90}, phases_s {phase: median},
      link_bytes, link_requests, workload_rchar (medians over ok runs),
      tiers {tier: {requests, hits, bytes}} (medians over ok runs that have them)

Quantiles: the median, and p90 by linear interpolation between closest ranks (the
"inclusive" method; numpy's default); one sample is its own median and p90.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SCHEMA = "imagefs-bench/coldstart"
VERSION = 1
PHASES = ("resolve", "pull", "unpack", "mount", "start", "run")
TIER_ORDER = ("memory", "ssd", "az", "blob")
SECTION = "## Cold start"
PHASE_COLORS = {"resolve": "#8c564b", "pull": "#d62728", "unpack": "#ff7f0e", "mount": "#9467bd",
                "start": "#7f7f7f", "run": "#1f77b4"}


class SchemaError(ValueError):
    """A result document that does not match the schema (the message lists why)."""


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} not in [0, 1]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def p90(values: Sequence[float]) -> float:
    return quantile(values, 0.9)


# --------------------------------------------------------------------------- validation


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_counts(where: str, value: Any, problems: list[str], nested: bool) -> None:
    if not isinstance(value, dict):
        problems.append(f"{where}: expected an object")
        return
    for k, v in value.items():
        if nested:
            _check_counts(f"{where}.{k}", v, problems, nested=False)
        elif not _is_num(v):
            problems.append(f"{where}.{k}: expected a number, got {v!r}")


def validate(doc: Any) -> list[str]:
    """Every way ``doc`` departs from the schema (empty: valid)."""
    p: list[str] = []
    if not isinstance(doc, dict):
        return ["document: expected a JSON object"]
    if doc.get("schema") != SCHEMA:
        p.append(f"schema: expected {SCHEMA!r}, got {doc.get('schema')!r}")
    if doc.get("version") != VERSION:
        p.append(f"version: expected {VERSION}, got {doc.get('version')!r}")
    for key in ("command", "started", "finished"):
        if not isinstance(doc.get(key), str):
            p.append(f"{key}: expected a string")
    for key in ("machine", "settings", "images"):
        if not isinstance(doc.get(key), dict):
            p.append(f"{key}: expected an object")
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    for key in ("blob_latency_ms", "az_latency_ms", "bandwidth_mbit", "repeat"):
        if not _is_num(settings.get(key)):
            p.append(f"settings.{key}: expected a number")
    runs = doc.get("runs")
    if not isinstance(runs, list):
        p.append("runs: expected a list")
        runs = []
    warmups = doc.get("warmups", [])
    if not isinstance(warmups, list):
        p.append("warmups: expected a list")
        warmups = []
    for w, r in [(f"runs[{i}]", r) for i, r in enumerate(runs)] + [(f"warmups[{i}]", r) for i, r in enumerate(warmups)]:
        if not isinstance(r, dict):
            p.append(f"{w}: expected an object")
            continue
        for key in ("scenario", "image", "workload"):
            if not isinstance(r.get(key), str):
                p.append(f"{w}.{key}: expected a string")
        if not isinstance(r.get("repeat"), int) or isinstance(r.get("repeat"), bool):
            p.append(f"{w}.repeat: expected an integer")
        if not isinstance(r.get("ok"), bool):
            p.append(f"{w}.ok: expected true or false")
        if r.get("error") is not None and not isinstance(r.get("error"), str):
            p.append(f"{w}.error: expected a string or null")
        phases = r.get("phases_s")
        if not isinstance(phases, dict):
            p.append(f"{w}.phases_s: expected an object")
        else:
            for k, v in phases.items():
                if k not in PHASES:
                    p.append(f"{w}.phases_s.{k}: unknown phase (known: {', '.join(PHASES)})")
                elif not _is_num(v) or v < 0:
                    p.append(f"{w}.phases_s.{k}: expected a number >= 0")
        for key in ("ready_s", "start_s", "total_s", "timed_out_s"):
            v = r.get(key)
            if v is None:
                if r.get("ok") is True and key == "total_s":
                    p.append(f"{w}.total_s: a successful run needs its total time")
            elif not _is_num(v) or v < 0:
                p.append(f"{w}.{key}: expected a number >= 0 or null")
        for key, nested in (("links", True), ("tiers", True), ("workload_io", False), ("fuse", False)):
            if key in r:
                _check_counts(f"{w}.{key}", r[key], p, nested)
    if "summary" in doc and not isinstance(doc["summary"], list):
        p.append("summary: expected a list")
    return p


def check(doc: Any) -> None:
    problems = validate(doc)
    if problems:
        raise SchemaError("invalid cold-start result: " + "; ".join(problems[:20])
                          + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""))


# --------------------------------------------------------------------------- summary


def _link_totals(run: dict[str, Any]) -> tuple[int, int]:
    links = run.get("links") or {}
    return (sum(int(v.get("bytes_down", 0)) + int(v.get("bytes_up", 0)) for v in links.values()),
            sum(int(v.get("requests", 0)) for v in links.values()))


def summarize(runs: Iterable[dict[str, Any]], scenario_order: Sequence[str] = (),
              workload_order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Group runs by (image, workload, scenario): medians and p90s over the ok runs.
    Entries come by image, then in the given workload and scenario orders."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["image"], r["workload"], r["scenario"]), []).append(r)
    order = {s: i for i, s in enumerate(scenario_order)}
    wl_order = {w: i for i, w in enumerate(workload_order)}

    def key(k: tuple[str, str, str]) -> tuple[str, int, str, int, str]:
        return (k[0], wl_order.get(k[1], len(wl_order)), k[1], order.get(k[2], len(order)), k[2])

    out = []
    for (image, workload, scenario) in sorted(groups, key=key):
        rs = groups[(image, workload, scenario)]
        ok = [r for r in rs if r.get("ok") and r.get("total_s") is not None]
        timeouts = [float(r["timed_out_s"]) for r in rs if r.get("timed_out_s") is not None]
        entry: dict[str, Any] = {"image": image, "workload": workload, "scenario": scenario,
                                 "n": len(rs), "ok": len(ok),
                                 "errors": sorted({str(r.get("error"))[:300] for r in rs if not r.get("ok")}),
                                 "timed_out_s": min(timeouts) if timeouts else None}
        for field in ("total_s", "ready_s", "start_s"):
            vals = [float(r[field]) for r in ok if r.get(field) is not None]
            entry[field] = {"median": median(vals), "p90": p90(vals)} if vals else None
        entry["phases_s"] = {ph: median([float(r["phases_s"].get(ph, 0.0)) for r in ok])
                             for ph in PHASES if ok and any(ph in r["phases_s"] for r in ok)}
        if ok:
            totals = [_link_totals(r) for r in ok]
            entry["link_bytes"] = median([t[0] for t in totals])
            entry["link_requests"] = median([t[1] for t in totals])
            rchar = [r["workload_io"]["rchar"] for r in ok if "rchar" in (r.get("workload_io") or {})]
            entry["workload_rchar"] = median(rchar) if rchar else None
            entry["tiers"] = _tier_medians(ok)
        out.append(entry)
    return out


def _tier_order(names: Iterable[str]) -> list[str]:
    """Tier names fastest first (the chain's order), unknown ones after, by name."""
    rank = {n: i for i, n in enumerate(TIER_ORDER)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n))


def _tier_medians(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{tier: {requests, hits, bytes}}: medians over the runs that report tiers,
    fastest tier first."""
    with_tiers = [r["tiers"] for r in runs if r.get("tiers")]
    names = _tier_order(n for tiers in with_tiers for n in tiers)
    return {n: {k: median([float(t.get(n, {}).get(k, 0)) for t in with_tiers]) for k in ("requests", "hits", "bytes")}
            for n in names}


# --------------------------------------------------------------------------- markdown


def _secs(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _mib(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x / (1 << 20):.1f}"


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The headline table: one row per (image, workload, scenario), times in seconds."""
    cols = ("image", "workload", "scenario", "ready s", "start s", "exit s (median)", "exit s (p90)",
            "vs baseline", "link MiB", "link requests", "workload read MiB", "ok/n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    baseline = {(e["image"], e["workload"]): e["total_s"]["median"] for e in summary
                if e["scenario"] == "baseline" and e.get("total_s")}
    for e in summary:
        total, ready, start = e.get("total_s"), e.get("ready_s"), e.get("start_s")
        base = baseline.get((e["image"], e["workload"]))
        if e["scenario"] == "baseline" and total:
            vs = "1×"
        elif total and base and total["median"] > 0:
            ratio = base / total["median"]
            vs = f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower"
        elif base and e.get("timed_out_s"):
            vs = f"> {e['timed_out_s'] / base:.0f}× slower"
        else:
            vs = "–"
        exit_median = _secs(total["median"] if total else None)
        if not total and e.get("timed_out_s"):
            exit_median = f"> {e['timed_out_s']:.0f} (timeout)"
        requests = e.get("link_requests")
        row = (e["image"], e["workload"], e["scenario"],
               _secs(ready["median"] if ready else None), _secs(start["median"] if start else None),
               exit_median, _secs(total["p90"] if total else None), vs,
               _mib(e.get("link_bytes")), "–" if requests is None else f"{requests:.0f}",
               _mib(e.get("workload_rchar")), f"{e['ok']}/{e['n']}" + ("" if e["ok"] == e["n"] else " ⚠"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def tier_table(summary: Sequence[dict[str, Any]]) -> str:
    """Where imagefs found the chunks, per scenario: requests / hits / MiB of each tier
    (``imagefs stats`` of the mount, medians). Empty when no run reported tiers."""
    rows = [e for e in summary if e.get("tiers")]
    names = _tier_order(n for e in rows for n in e["tiers"])
    if not rows:
        return ""
    cols = ("image", "workload", "scenario", *names)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for e in rows:
        cells = []
        for n in names:
            t = e["tiers"].get(n)
            cells.append("–" if not t or not t["requests"] else
                         f"{t['requests']:.0f} / {t['hits']:.0f} / {_mib(t['bytes'])}")
        lines.append("| " + " | ".join((e["image"], e["workload"], e["scenario"], *cells)) + " |")
    return "\n".join(lines)


def settings_line(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    return (f"blob store and registry: {s['blob_latency_ms']:g} ms to first byte; AZ cache: "
            f"{s['az_latency_ms']:g} ms to first byte; one-way link delay {s.get('one_way_ms', 0):g} ms; "
            f"every link {s['bandwidth_mbit']:g} Mbit/s each way (htb on both veth ends); "
            f"up to {s['repeat']} repeat(s) (ok/n: how many ran); page cache dropped before every cold run"
            + ("" if "agent" not in s else "; imagefs mounts forked from a running `imagefs agent`" if s["agent"]
               else "; every imagefs mount spawns a fresh daemon (no agent)"))


def machine_line(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    return (f"{m.get('hostname', '?')}: {m.get('cpus', '?')} CPUs, {m.get('memory_gib', 0):.0f} GiB, "
            f"Linux {m.get('kernel', '?')}, {m.get('os', '')}".rstrip(", "))


def errors_block(summary: Sequence[dict[str, Any]]) -> str:
    lines = []
    for e in summary:
        for err in e.get("errors") or []:
            lines.append(f"- {e['image']} / {e['workload']} / {e['scenario']}: {err.splitlines()[0][:200]}")
    return "\n".join(lines)


def markdown_report(doc: dict[str, Any], chart_name: str | None = None) -> str:
    parts = [f"Command: `{doc['command']}`  ",
             f"Date: {doc['started']} – {doc['finished']}  ",
             f"Machine: {machine_line(doc)}; imagefs at commit {doc['machine'].get('commit', '?')}  ",
             f"Settings: {settings_line(doc)}", "",
             markdown_table(doc["summary"])]
    tiers = tier_table(doc["summary"])
    if tiers:
        parts += ["", "Per tier (`imagefs stats` of the mount, medians): requests / chunks served / MiB. A blob "
                  "store or AZ cache request is one round trip that may bring many chunks; their MiB are "
                  "compressed bytes, the memory and SSD tiers' uncompressed.", "", tiers]
    errs = errors_block(doc["summary"])
    if errs:
        parts += ["", "Failures:", errs]
    if chart_name:
        parts += ["", f"![where the time went]({chart_name})"]
    return "\n".join(parts) + "\n"


def append_results_section(path: Path, block: str, intro: str = "") -> None:
    """Add ``block`` at the end of the "Cold start" section of ``path`` (created if
    absent), leaving every other section as it was."""
    text = path.read_text() if path.exists() else "# Bench results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + f"\n\n{SECTION}\n\n" + (intro.strip() + "\n\n" if intro else "") + block.rstrip() + "\n"
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        section = "\n".join(lines[start:end]).rstrip("\n")
        before = "\n".join(lines[:start])
        after = "\n".join(lines[end:])
        new = (before + "\n" if before else "") + section + "\n\n" + block.rstrip() + "\n"
        if after:
            new += "\n" + after + ("\n" if not after.endswith("\n") else "")
    path.write_text(new)


# --------------------------------------------------------------------------- chart


def chart(summary: Sequence[dict[str, Any]], out: Path, title: str) -> None:
    """Stacked horizontal bars of the median phases, one panel per (image, workload)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in summary:
        panels.setdefault((e["image"], e["workload"]), []).append(e)
    n = max(1, len(panels))
    height = 1.2 + (0.6 + 0.3 * max(len(v) for v in panels.values() or [[1]])) * n
    fig, axes = plt.subplots(n, 1, figsize=(10, height), squeeze=False)
    for ax, ((image, workload), entries) in zip(axes[:, 0], panels.items()):
        labels = [e["scenario"] + ("" if e["ok"] == e["n"] else f" ({e['ok']}/{e['n']} ok)") for e in entries]
        left = [0.0] * len(entries)
        for ph in PHASES:
            widths = [float((e.get("phases_s") or {}).get(ph, 0.0)) for e in entries]
            if any(widths):
                ax.barh(labels, widths, left=left, color=PHASE_COLORS[ph], label=ph)
                left = [a + b for a, b in zip(left, widths)]
        for y, (e, x) in enumerate(zip(entries, left)):
            t = e.get("total_s")
            if t:
                label = f" {t['median']:.2f}s"
            elif e.get("timed_out_s"):
                label = f" > {e['timed_out_s']:.0f}s (timed out)"
            elif all(err.startswith("not run") for err in e.get("errors") or ["?"]):
                label = " not run (timed out on an earlier workload)"
            else:
                label = " failed"
            ax.text(x, y, label, va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{image}: {workload}", fontsize=10, loc="left")
        ax.set_xlabel("seconds (median per phase)")
        ax.set_xlim(0, max(left + [0.1]) * 1.18)
    handles, names = [], []
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in names:
                handles.append(h)
                names.append(lab)
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.45 / height if names else 0, 1, 1 - 0.55 / height))
    if names:
        fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_json(doc: dict[str, Any], out: Path) -> None:
    check(doc)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    tmp.replace(out)


def load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    check(doc)
    return doc
