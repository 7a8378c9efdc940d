"""Cold container start: imagefs tier by tier vs pull-and-unpack and peer filesystems.

Why one command does everything: the figures only mean something with the network
they ran on, the same images for every contender and the same container start, so
``python -m bench coldstart`` builds (or reuses) all of it offline, runs the matrix on
emulated links, and writes results that carry their own settings:

1. images (bench/images.py), pushed to a local docker-registry (skopeo), indexed into
   SeaweedFS (``imagefs index``), made into a zstd squashfs and a casync store; each
   step is cached with a stamp of its inputs in the work directory;
2. two network namespaces: ``blob`` (SeaweedFS S3, the registry, the casync store's
   HTTP server) and ``az`` (``imagefs cache-server``), joined to the host and to each
   other by veth pairs shaped with htb, each server fronted by a delay proxy
   (bench/netem.py, bench/delayproxy.py, bench/services.py);
3. the scenarios of bench/scenarios.py for every image and workload, repeated, with
   the order interleaved per repeat so machine noise spreads over all of them;
4. bench/results/coldstart-{quick,full}.{json,md,png} and a new entry in the
   "Cold start" section of bench/RESULTS.md (bench/report.py).

Everything started is stopped and every namespace removed on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import netem, profiled, report, scenarios, services
from bench.prep import (PREP_VERSION, PrepError, index_into_store, layout_dir, locked, machine_info, manifest_digest,
                        prepare_code, run_checked, sigterm_as_interrupt, step)
from bench.scenarios import Context, ImageAssets, RunResult, Workload

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

CHAIN = ("imagefs-cold", "imagefs-ssd", "imagefs-page")
S3_PORT, REGISTRY_PORT, CASYNC_PORT, CACHE_PORT = 8333, 5000, 8081, 7070

RESULTS_INTRO = """\
`python -m bench coldstart` (bench/coldstart.py): time from nothing on the host to a
container's workload exit, per way of getting the rootfs. Servers run in network
namespaces behind veth pairs capped with htb; a delay proxy adds the time to first
byte of a cloud blob store (blob store, registry, casync store) or of a same-zone
cache server. `ready` = rootfs usable (pulled and unpacked, or mounted), `start` =
container process exists, `exit` = workload exited, all from one t0 (medians, and p90
of the exit time); `link MiB/requests` = what crossed the emulated links; `workload
read` = the workload's rchar (read(2) bytes, not page faults of mmapped files).
Scenarios and phases: bench/scenarios.py; JSON schema: bench/report.py."""


def log(msg: str) -> None:
    print(f"[coldstart {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- preparation


def prepare_local(work: Path, img: Any) -> ImageAssets:
    """squashfs and casync store of the image's rootfs (no servers needed)."""
    rootfs = Path(img.rootfs)
    ident = {"zstd": manifest_digest(layout_dir(img.layout_zstd)), "prep": PREP_VERSION}
    sqfs = work / "squashfs" / f"{img.name}.sqfs"
    with step(sqfs.with_suffix(".stamp.json"), {**ident, "comp": "zstd"}, f"squashfs of {img.name}", log) as todo:
        if todo:
            sqfs.parent.mkdir(parents=True, exist_ok=True)
            tmp = sqfs.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            run_checked(["mksquashfs", str(rootfs), str(tmp), "-comp", "zstd", "-noappend", "-no-progress", "-quiet"],
                 f"mksquashfs {img.name}")
            tmp.replace(sqfs)
    casync_dir = work / "casync"
    caidx = casync_dir / f"{img.name}.caidx"
    with step(casync_dir / f"{img.name}.stamp.json", ident, f"casync store of {img.name}", log) as todo:
        if todo:
            casync_dir.mkdir(parents=True, exist_ok=True)
            tmp = casync_dir / f".{img.name}.tmp.caidx"
            tmp.unlink(missing_ok=True)
            run_checked(["casync", "make", f"--store={casync_dir / 'default.castr'}", str(tmp), str(rootfs)],
                 f"casync make {img.name}")
            tmp.replace(caidx)
    config = scenarios.oci_config(layout_dir(img.layout_gzip))
    return ImageAssets(name=img.name, store_name=f"bench/{img.name}", registry_repo=f"bench/{img.name}:latest",
                       config=config, squashfs=sqfs, caidx_name=caidx.name)


def prepare_servers(work: Path, ns_blob: str, images: dict[str, Any], assets: dict[str, ImageAssets],
                    code_dir: Path) -> None:
    """Push to the registry and index into SeaweedFS, from inside the blob namespace
    (straight to the servers' loopback: preparation is not what is measured)."""
    for name, img in images.items():
        a = assets[name]
        gz = manifest_digest(layout_dir(img.layout_gzip))
        with step(work / "registry" / "stamps" / f"{name}.json", {"gzip": gz, "prep": PREP_VERSION},
                  f"push {name} to the registry", log) as todo:
            if todo:
                run_checked(services.in_ns(ns_blob, ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                                                     f"oci:{layout_dir(img.layout_gzip)}:latest",
                                                     f"docker://127.0.0.1:{REGISTRY_PORT}/{a.registry_repo}"]),
                            f"skopeo push {name}")
        index_into_store(work, ns_blob, name, img.layout_zstd, a.store_name, code_dir, S3_PORT, log)


# --------------------------------------------------------------------------- environment


def has_cache_server() -> bool:
    res = subprocess.run([services.tool("imagefs"), "cache-server", "--help"], capture_output=True)
    return res.returncode == 0


def cleanup_rundir(rundir: Path) -> None:
    """Undo what a killed earlier run left in our run directory: containers, mounts."""
    runc_root = rundir / "runc"
    if runc_root.is_dir():
        out = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True)
        for cid in out.stdout.split():
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", cid], capture_output=True)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if len(line.split()) > 4]
    prefix = str(rundir.resolve()) + "/"
    for mp in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        scenarios.force_unmount(Path(mp))
    shutil.rmtree(rundir, ignore_errors=True)


# --------------------------------------------------------------------------- matrix


def _describe(r: RunResult) -> str:
    if not r.ok:
        return f"FAILED: {(r.error or '').splitlines()[0][:200] if r.error else '?'}"
    link_bytes = sum(v.get("bytes_down", 0) + v.get("bytes_up", 0) for v in r.links.values())
    link_req = sum(v.get("requests", 0) for v in r.links.values())
    phases = ", ".join(f"{k} {v:.2f}" for k, v in r.phases_s.items())
    return (f"{r.total_s:.2f}s ({phases}); links {link_bytes / (1 << 20):.1f} MiB in {link_req} requests; "
            f"read {r.workload_io.get('rchar', 0) / (1 << 20):.1f} MiB")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def run_matrix(ctx: Context, assets: dict[str, ImageAssets], workloads: Sequence[Workload],
               wanted: Sequence[str], repeat: int, deadline: float | None, slow_s: float,
               warmups: list[RunResult]) -> list[RunResult]:
    """AZ warm-ups, then ``repeat`` rounds; each round runs every scenario of every
    (image, workload), so a time budget cuts repeats, never coverage.

    Budget rules, all logged: after ``deadline`` no further repeat of any (image,
    workload) starts; a scenario whose
    run took more than ``slow_s`` is not repeated for that (image, workload) (for the
    cold run, the warm tiers are still repeated on the SSD cache it left); a peer that
    timed out on an image is not run again on that image, its remaining runs recorded
    as failed with the reason.
    """
    results: list[RunResult] = []
    combos = [(name, wl) for name in assets for wl in workloads if wl.applies_to(name)]
    chain_head = next((s for s in wanted if s in CHAIN), None)
    slow: set[tuple[str, str, str]] = set()
    gave_up: dict[tuple[str, str], str] = {}  # (image, scenario) -> why

    def keep(rs: Sequence[RunResult]) -> None:
        for r in rs:
            results.append(r)
            log(f"{r.image} / {r.workload} / {r.scenario} #{r.repeat + 1}: {_describe(r)}")
            if r.ok and r.total_s is not None and r.total_s > slow_s and r.repeat == 0:
                slow.add((r.image, r.workload, r.scenario))
                log(f"  (over {slow_s:.0f}s: not repeated)")

    recorded: dict[tuple[str, str], profiled.RecordedProfile] = {}
    if set(wanted) & set(profiled.SCENARIOS):
        for name, wl in combos:
            try:
                recorded[(name, wl.name)] = p = profiled.record(ctx, assets[name], wl)
                log(f"{name}: recorded the profile of {wl.name}: {p.chunks} chunks, {p.bytes / (1 << 20):.1f} MiB "
                    f"({p.compressed_bytes / (1 << 20):.1f} MiB stored) in {p.seconds:.1f}s; {p.optimize_note}")
            except scenarios.ScenarioError as e:
                log(f"{name}: recording the profile of {wl.name} failed: {e}")
        ctx.settings["profiles"] = [p.to_dict() for p in recorded.values()]
    workload_order = [w.name for w in workloads]

    if ("imagefs-az" in wanted or "imagefs-az-profiled" in wanted) and ctx.az is not None:
        for name in assets:  # warm with the heaviest workload: the others read a subset of it
            wl = [w for w in workloads if w.applies_to(name)][-1]
            warm = scenarios.run_imagefs_az(ctx, assets[name], wl, -1, warmup=True)
            warmups.append(warm)
            pf = warm.prefetch
            filled = (f"; then prefetch {pf.get('state')}: {pf.get('fetched', 0)} of {pf.get('planned', 0)} chunks "
                      f"through the AZ cache, waited {pf.get('wait_s', 0):.1f}s") if pf else ""
            log(f"{name}: AZ cache warm-up with {wl.name}: {_describe(warm)}{filled}")

    for rep in range(repeat):
        for name, wl in combos:
            if rep > 0 and deadline is not None and time.monotonic() > deadline:
                log(f"time budget spent: no more repeats (round {rep + 1} of {repeat} stopped before "
                    f"{name} / {wl.name})")
                return results
            img = assets[name]
            for sc in wanted:
                if (name, wl.name, sc) in slow:
                    continue
                if (name, sc) in gave_up:
                    keep([RunResult(sc, name, wl.name, rep).fail(gave_up[(name, sc)])])
                elif sc == "baseline":
                    keep([scenarios.run_baseline(ctx, img, wl, rep)])
                elif sc in CHAIN:
                    if sc == chain_head:  # one chain (cold -> ssd -> page) records them all
                        cache_dir = ctx.rundir / "ssd" / f"{name}-{_slug(wl.name)}"
                        run_cold = (name, wl.name, "imagefs-cold") not in slow
                        keep(scenarios.run_imagefs_chain(ctx, img, wl, rep, wanted, cache_dir, run_cold))
                elif sc == "imagefs-az":
                    keep([scenarios.run_imagefs_az(ctx, img, wl, rep)])
                elif sc in ("imagefs-profiled", "imagefs-az-profiled"):
                    keep([profiled.run(ctx, sc, img, wl, rep, recorded.get((name, wl.name)))])
                elif sc == "imagefs-otherprofile":
                    other = profiled.other_profile(recorded, name, wl.name, workload_order)
                    if other is not None:
                        keep([profiled.run(ctx, sc, img, wl, rep, other)])
                elif sc == "squashfuse":
                    keep([scenarios.run_squashfuse(ctx, img, wl, rep)])
                elif sc == "casync":
                    r = scenarios.run_casync(ctx, img, wl, rep)
                    keep([r])
                    if r.timed_out_s is not None:
                        gave_up[(name, sc)] = (f"not run: casync took over {ctx.peer_timeout_s:.0f}s on "
                                               f"{name} / {wl.name} already")
    return results


# --------------------------------------------------------------------------- command


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench coldstart",
        description="Measure cold container starts: pull+unpack (baseline), imagefs with each tier "
        "cold or warm, squashfuse and casync, on emulated blob-store and AZ links.")
    p.add_argument("--quick", action="store_true",
                   help="a subset that fits in ~3 minutes: numpy image, `import numpy`, one repeat, "
                   "shorter peer timeout")
    p.add_argument("--images", help="comma-separated bench images (default numpy,torch; quick: numpy)")
    p.add_argument("--workloads", help="comma-separated workload names (default all that apply: "
                   + ", ".join(w.name for w in scenarios.WORKLOADS) + ")")
    p.add_argument("--scenarios", help="comma-separated scenarios (default all: " + ", ".join(scenarios.SCENARIOS) + ")")
    p.add_argument("--repeat", type=int, help="runs per scenario (default 3; quick: 1)")
    p.add_argument("--blob-latency-ms", type=float, default=200.0,
                   help="time to first byte of every blob store, registry and casync store answer (default 200)")
    p.add_argument("--az-latency-ms", type=float, default=1.0,
                   help="time to first byte of every AZ cache server answer (default 1)")
    p.add_argument("--one-way-ms", type=float, default=0.0,
                   help="extra delay of every chunk in each direction, on every link (default 0)")
    p.add_argument("--bandwidth-mbit", type=float, default=1000.0, help="every link, each way (default 1000)")
    p.add_argument("--workdir", help="bench work directory (default $IMAGEFS_BENCH_DIR, else /var/cache/imagefs-bench)")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds one run may take (default 300)")
    p.add_argument("--peer-timeout", type=float, help="seconds a casync run may take (default 60; quick: 30)")
    p.add_argument("--budget", type=float, help="start no further repeat after this many seconds of "
                   "matrix (default 600; quick: 150)")
    p.add_argument("--slow", type=float, default=60.0,
                   help="a run longer than this many seconds is not repeated (default 60)")
    p.add_argument("--az-cache-size", default="20G", help="the AZ cache server's --max-size (default 20G)")
    p.add_argument("--no-agent", dest="agent", action="store_false",
                   help="spawn a fresh mount daemon for every imagefs mount instead of forking it from a "
                        "running `imagefs agent` (the default, as on a host that runs the agent like any "
                        "snapshotter daemon)")
    p.add_argument("--code", choices=("head", "worktree"), default="head",
                   help="imagefs code to measure: an export of the committed HEAD (default: edits made to "
                   "the checkout during the run cannot leak in) or the working tree as it is")
    p.add_argument("--mount-args", default="", help="extra options for every `imagefs mount` of the run, "
                   "e.g. '--read-ahead 128' (an A/B of a mount option; the settings line says so)")
    p.add_argument("--no-record", action="store_true", help="do not add the run to bench/RESULTS.md, and write "
                   "its results to the work directory instead of bench/results")
    args = p.parse_args(argv)
    args.images = [x for x in (args.images or ("numpy" if args.quick else "numpy,torch")).split(",") if x]
    if args.workloads is None and args.quick:
        args.workloads = "import numpy"
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.peer_timeout = args.peer_timeout or (30.0 if args.quick else 60.0)
    if args.budget is None:
        args.budget = 150.0 if args.quick else 600.0
    names = {w.name for w in scenarios.WORKLOADS}
    args.workloads = [w.strip() for w in args.workloads.split(",")] if args.workloads else sorted(names)
    unknown = set(args.workloads) - names
    if unknown:
        p.error(f"unknown workload(s) {sorted(unknown)}; known: {sorted(names)}")
    args.scenarios = [s.strip() for s in args.scenarios.split(",")] if args.scenarios else list(scenarios.SCENARIOS)
    unknown = set(args.scenarios) - set(scenarios.SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; known: {', '.join(scenarios.SCENARIOS)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if os.geteuid() != 0:
        print("bench coldstart: needs root (namespaces, mounts, runc, drop_caches)", file=sys.stderr)
        return 2
    from bench import images as bench_images

    base = bench_images.resolve_workdir(args.workdir)
    work = base / "coldstart"
    command = "python -m bench coldstart " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    started = datetime.datetime.now().astimezone()
    os.environ.update(services.s3_env())
    try:
        with locked(work / ".lock", "coldstart"), sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            rundir = work / "run"
            cleanup_rundir(rundir)
            rundir.mkdir(parents=True)
            stack.callback(cleanup_rundir, rundir)
            code_dir, code_name = prepare_code(rundir, args.code)
            # daemons' sockets and logs in our run dir: ours to clean, and no host agent
            # (which would serve mounts with its own code) is asked; our own agent, running
            # the code under test, is (unless --no-agent)
            os.environ["IMAGEFS_RUN_DIR"] = str(rundir / "imagefs")
            log(f"imagefs code: {code_name} ({code_dir})")
            if args.agent:
                agent = services.start_agent(rundir / "imagefs", rundir / "logs" / "agent.log")
                stack.callback(agent.stop)
            log(f"images: {', '.join(args.images)} (bench/images.py, cached in {base})")
            built = bench_images.ensure_images(str(base), tuple(args.images))
            assets = {name: prepare_local(work, img) for name, img in built.items()}

            netem.preflight()
            stale = netem.remove_stale()
            if stale:
                log(f"removed what an earlier run left: {', '.join(stale)}")
            topo = stack.enter_context(netem.Topology())
            ns_blob, ns_az = topo.namespace("blob"), topo.namespace("az")
            bw = args.bandwidth_mbit
            blob_link = topo.link("blob", None, ns_blob, bw)
            az_link = topo.link("az", None, ns_az, bw)
            az_blob = topo.link("az-blob", ns_az, ns_blob, bw)
            log(f"links: host {blob_link.a.addr} <-> blob {blob_link.b.addr}, host {az_link.a.addr} <-> az "
                f"{az_link.b.addr}, az {az_blob.a.addr} <-> blob {az_blob.b.addr}; {bw:g} Mbit/s each way")

            for svc in (services.start_seaweed(ns_blob, work / "seaweed", S3_PORT),
                        services.start_registry(ns_blob, work / "registry", REGISTRY_PORT),
                        services.start_static_http(ns_blob, work / "casync", CASYNC_PORT, rundir / "logs" / "http.log")):
                stack.callback(svc.stop)
            prepare_servers(work, ns_blob, built, assets, code_dir)

            blob_ms, az_ms, ow = args.blob_latency_ms, args.az_latency_ms, args.one_way_ms
            proxies = {}
            for name, ns, listen, target, ttfb in (
                ("blob", ns_blob, f"{blob_link.b.addr}:{S3_PORT}", f"127.0.0.1:{S3_PORT}", blob_ms),
                ("registry", ns_blob, f"{blob_link.b.addr}:{REGISTRY_PORT}", f"127.0.0.1:{REGISTRY_PORT}", blob_ms),
                ("casync", ns_blob, f"{blob_link.b.addr}:{CASYNC_PORT}", f"127.0.0.1:{CASYNC_PORT}", blob_ms),
                ("az-blob", ns_blob, f"{az_blob.b.addr}:{S3_PORT}", f"127.0.0.1:{S3_PORT}", blob_ms),
            ):
                proxies[name] = services.start_delay_proxy(name, ns, listen, target, ttfb_ms=ttfb, one_way_ms=ow,
                                                           rundir=rundir / "proxies")
                stack.callback(proxies[name].stop)

            wanted = [s for s in scenarios.SCENARIOS if s in args.scenarios]
            skipped: dict[str, str] = {}
            az_proxy = None
            if "imagefs-az" in wanted or "imagefs-az-profiled" in wanted:
                if has_cache_server():
                    cs = services.start_cache_server(ns_az, rundir / "cache-server", port=CACHE_PORT,
                                                     store=f"s3://{services.S3_BUCKET}",
                                                     s3_endpoint=f"http://{az_blob.b.addr}:{S3_PORT}",
                                                     max_size=args.az_cache_size)
                    stack.callback(cs.stop)
                    az_proxy = services.start_delay_proxy("az", ns_az, f"{az_link.b.addr}:{CACHE_PORT}",
                                                          f"127.0.0.1:{CACHE_PORT}", ttfb_ms=az_ms, one_way_ms=ow,
                                                          rundir=rundir / "proxies")
                    stack.callback(az_proxy.stop)
                else:
                    for sc in ("imagefs-az", "imagefs-az-profiled"):
                        if sc in wanted:
                            skipped[sc] = "`imagefs cache-server` is not available in this checkout"
                            wanted.remove(sc)
                            log(f"skipping {sc}: " + skipped[sc])

            from imagefs.run import runc_base_spec

            with tempfile.TemporaryDirectory() as tmp:
                runc_base = runc_base_spec(tmp)
            ctx = Context(rundir=rundir, settings={}, blob=proxies["blob"], registry=proxies["registry"],
                          casync=proxies["casync"], az=az_proxy,
                          s3_endpoint=f"http://{blob_link.b.addr}:{S3_PORT}", store_url=f"s3://{services.S3_BUCKET}",
                          registry_host=f"{blob_link.b.addr}:{REGISTRY_PORT}",
                          casync_url=f"http://{blob_link.b.addr}:{CASYNC_PORT}",
                          az_address=f"{az_link.b.addr}:{CACHE_PORT}" if az_proxy else None,
                          runc_base=runc_base, run_timeout_s=args.run_timeout, peer_timeout_s=args.peer_timeout,
                          mount_args=tuple(shlex.split(args.mount_args)))
            workloads = [w for w in scenarios.WORKLOADS if w.name in args.workloads]
            settings = {
                "blob_latency_ms": blob_ms, "az_latency_ms": az_ms, "one_way_ms": ow, "bandwidth_mbit": bw,
                "repeat": args.repeat, "quick": args.quick, "images": list(assets),
                "workloads": {w.name: list(w.argv) for w in workloads}, "scenarios": wanted, "skipped": skipped,
                "run_timeout_s": args.run_timeout, "peer_timeout_s": args.peer_timeout, "budget_s": args.budget,
                "slow_s": args.slow, "code": args.code,
                "az_cache_size": args.az_cache_size, "agent": args.agent, "mount_args": args.mount_args,
                "links": {"blob": f"host {blob_link.a.addr} <-> {blob_link.b.addr} (SeaweedFS S3, registry, casync store)",
                          "az": f"host {az_link.a.addr} <-> {az_link.b.addr} (imagefs cache-server)",
                          "az-blob": f"{az_blob.a.addr} <-> {az_blob.b.addr} (cache server to blob store)"},
                "latency_model": "delay proxy: hold the first byte of each answer until ttfb after the request "
                                 "began; one_way_ms delays every chunk each way",
                "bandwidth_model": "tc htb class, rate = ceil, on the egress of both veth ends",
            }
            ctx.settings = settings
            log("matrix: " + ", ".join(wanted) + f" x {len(workloads)} workload(s) x {args.repeat} repeat(s)")
            t_matrix = time.monotonic()
            deadline = t_matrix + args.budget if args.budget else None
            warmups: list[RunResult] = []
            runs = run_matrix(ctx, assets, workloads, wanted, args.repeat, deadline, args.slow, warmups)
            settings["matrix_s"] = round(time.monotonic() - t_matrix, 1)
            settings["shaping_check"] = {name: link.qdisc_stats() for name, link in topo.links.items()}
            images_info = {name: {"layer_sizes": list(img.layer_sizes), "n_entries": img.n_entries,
                                  "layer_compressed": {k: list(v) for k, v in img.layer_compressed.items()}}
                           for name, img in built.items()}
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return 130
    except (PrepError, bench_images.BuildError, services.ServiceError, netem.NetemError,
            scenarios.ScenarioError) as e:
        log(f"failed: {e}")
        return 1

    doc = {"schema": report.SCHEMA, "version": report.VERSION, "command": command,
           "started": started.isoformat(timespec="seconds"),
           "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine_info(code_name), "settings": settings, "images": images_info,
           "runs": [r.to_dict() for r in runs], "warmups": [r.to_dict() for r in warmups]}
    doc["summary"] = report.summarize(doc["runs"], scenarios.SCENARIOS, [w.name for w in scenarios.WORKLOADS])
    write_outputs(doc, "quick" if args.quick else "full", record=not args.no_record,
                  results_dir=RESULTS_DIR if not args.no_record else work / "unrecorded")
    return 0 if all(r.ok for r in runs) else 1


def runs_label(summary: Sequence[dict[str, Any]]) -> str:
    counts = sorted({e["n"] for e in summary if e["scenario"] != "casync"} or {0})
    n = f"{counts[0]}" if counts[0] == counts[-1] else f"{counts[0]}–{counts[-1]}"
    return f"{n} run(s) per scenario"


def write_outputs(doc: dict[str, Any], kind: str, record: bool, results_dir: Path = RESULTS_DIR) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"coldstart-{kind}"
    report.write_json(doc, stem.with_suffix(".json"))
    s = doc["settings"]
    title = (f"Cold start ({kind}), {doc['started'][:16]}, {doc['machine'].get('cpus')} CPUs\n"
             f"blob store/registry TTFB {s['blob_latency_ms']:g} ms, AZ cache TTFB {s['az_latency_ms']:g} ms, "
             f"{s['bandwidth_mbit']:g} Mbit/s links, median of {runs_label(doc['summary'])}")
    chart_name: str | None = stem.with_suffix(".png").name
    try:
        report.chart(doc["summary"], stem.with_suffix(".png"), title)
    except ImportError as e:
        log(f"no chart ({e}); install the bench extra (matplotlib)")
        chart_name = None
    body = report.markdown_report(doc, chart_name)
    stem.with_suffix(".md").write_text(f"# Cold start ({kind})\n\n" + body)
    print(report.markdown_table(doc["summary"]))
    log(f"results: {stem}.json, .md" + (", .png" if chart_name else ""))
    if record:
        heading = f"### {doc['started'][:16].replace('T', ' ')} ({kind})\n\n"
        if chart_name:
            body = body.replace(f"]({chart_name})", f"](results/{chart_name})")
        report.append_results_section(RESULTS_MD, heading + body, RESULTS_INTRO)
        log(f"added to {RESULTS_MD}")
