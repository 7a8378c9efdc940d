"""The cold-start scenarios: one container start measured end to end, per way of getting a rootfs.

Why these and why measured this way: a user who types ``docker run`` on a host that
does not have the image pays pull + unpack + start; an imagefs host pays resolve +
mount + start, and then the workload pays for every first read of a byte through the
tiers. So every scenario runs the *same* container (overlayfs over a read-only lower
directory, a runc config from the image config, ``runc run``), and only the way the
lower directory comes to exist differs:

==============  =================================================================
baseline        ``skopeo copy docker://`` (parallel layer pull through the blob link)
                + ``umoci unpack`` of the gzip layers to local disk
imagefs-cold    ``imagefs mount`` from the blob store only; fresh SSD cache dir,
                page cache dropped
imagefs-az      as cold, plus ``--az-cache`` to a cache server that already holds
                the chunks (warmed by one unmeasured run); fresh SSD dir, caches dropped
imagefs-ssd     a new mount on the SSD cache the cold run filled; page cache dropped
imagefs-page    a second container on the still-mounted ssd run (kernel page cache warm)
imagefs-*profile*  with a startup profile: see bench/profiled.py (the runs above mount
                with ``--no-replay``: a first start ever)
squashfuse      squashfuse over a local zstd squashfs of the same rootfs (a FUSE
                reference without any network); page cache dropped
casync          ``casync mount`` of a .caidx whose chunk store is served over HTTP
                behind the blob link (a content-addressed lazy peer); caches dropped
==============  =================================================================

Time is split into phases measured from one ``t0`` per run: ``resolve`` (imagefs: name
-> digest and the index, kept in the host's cache dir, as ``imagefs run`` does; the
mount then goes by digest), ``pull``,
``unpack``, ``mount`` (until the mount answers), ``start`` (until runc has the
container's process: its --pid-file appears), ``run`` (until the workload exits).

The workload runs under ``/bin/sh -c '"$@"; ...'`` which, after the command exits,
prints its own ``/proc/$$/io``: Linux adds a reaped child's I/O counters to its
parent's, so ``rchar`` there is what the workload read through read(2) (page faults
of mmapped files are not counted; the FUSE/tier counters cover those for imagefs).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.services import ProxyService, s3_env, tool

PY = "/opt/venv/bin/python3"
IO_TAG = "__bench_io__"
_IO_WRAPPER = ('"$@"; rc=$?; while read -r k v; do echo "' + IO_TAG + ' $k $v" >&2; done < /proc/$$/io; '
               'exit $rc')

SCENARIOS = ("baseline", "imagefs-cold", "imagefs-az", "imagefs-ssd", "imagefs-page", "imagefs-profiled",
             "imagefs-az-profiled", "imagefs-otherprofile", "squashfuse", "casync")
PHASES = ("resolve", "pull", "unpack", "mount", "start", "run")
# How long an AZ warm-up waits for its mount to prefetch the whole image through the
# cache server (the torch image takes ~10-20 s at 1 Gbit/s).
WARMUP_PREFETCH_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Workload:
    name: str
    argv: tuple[str, ...]
    images: tuple[str, ...] | None = None  # None: every image

    def applies_to(self, image: str) -> bool:
        return self.images is None or image in self.images


WORKLOADS: tuple[Workload, ...] = (
    Workload("true", ("/bin/true",)),
    Workload("import numpy", (PY, "-c", "import numpy")),
    Workload("import torch", (PY, "-c", "import torch"), images=("torch",)),
)


@dataclass
class ImageAssets:
    """What the preparation made of one bench image."""

    name: str  # bench image name: numpy, torch
    store_name: str  # name in the imagefs store
    registry_repo: str  # repository in the registry, e.g. bench/numpy:latest
    config: dict[str, Any]  # the OCI image config's "config" (for peers and the baseline check)
    squashfs: Path
    caidx_name: str  # file name under the casync HTTP root


@dataclass
class Context:
    """The running bench environment every scenario uses."""

    rundir: Path
    settings: dict[str, Any]
    blob: ProxyService  # S3 (SeaweedFS) behind the blob link
    registry: ProxyService  # docker-registry behind the blob link
    casync: ProxyService  # the casync store's HTTP server behind the blob link
    az: ProxyService | None  # imagefs cache-server behind the AZ link
    s3_endpoint: str  # via the blob link, e.g. http://198.18.0.2:8333
    store_url: str
    registry_host: str  # HOST:PORT via the blob link
    casync_url: str  # http://HOST:PORT via the blob link
    az_address: str | None  # HOST:PORT via the AZ link
    runc_base: dict[str, Any]
    run_timeout_s: float
    peer_timeout_s: float
    mount_args: tuple[str, ...] = ()  # extra options for every ``imagefs mount`` (A/B runs)

    def links(self) -> dict[str, ProxyService]:
        out = {"blob": self.blob, "registry": self.registry, "casync": self.casync}
        if self.az is not None:
            out["az"] = self.az
        return out

    def reset_links(self) -> None:
        for p in self.links().values():
            p.reset()

    def link_stats(self, names: Sequence[str]) -> dict[str, dict[str, int]]:
        keep = ("connections", "requests", "bytes_up", "bytes_down")
        out = {}
        for name in names:
            p = self.links().get(name)
            if p is not None:
                s = p.stats()
                out[name] = {k: int(s.get(k, 0)) for k in keep}
        return out


@dataclass
class RunResult:
    """One measured run (the ``runs`` entries of the result JSON, see bench/report.py)."""

    scenario: str
    image: str
    workload: str
    repeat: int
    ok: bool = True
    error: str | None = None
    exit_status: int | None = None
    phases_s: dict[str, float] = field(default_factory=dict)
    ready_s: float | None = None  # lower dir usable (after pull+unpack or mount)
    start_s: float | None = None  # container process exists
    total_s: float | None = None  # workload exited
    links: dict[str, dict[str, int]] = field(default_factory=dict)
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    workload_io: dict[str, int] = field(default_factory=dict)
    fuse: dict[str, int] = field(default_factory=dict)
    timed_out_s: float | None = None  # the run was stopped after this many seconds
    prefetch: dict[str, Any] = field(default_factory=dict)  # imagefs: the mount's prefetch at the end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fail(self, error: str | BaseException) -> "RunResult":
        self.ok = False
        self.error = str(error)[-2000:]
        if isinstance(error, ScenarioTimeout):
            self.timed_out_s = round(error.after, 1)
        return self


class ScenarioError(RuntimeError):
    """A step of a scenario failed; the message says which and why."""


class ScenarioTimeout(ScenarioError):
    """The container did not exit in time (``after`` seconds from t0)."""

    def __init__(self, message: str, after: float) -> None:
        super().__init__(message)
        self.after = after


# --------------------------------------------------------------------------- helpers


def drop_caches() -> None:
    """Write back dirty pages, then drop page cache, dentries and inodes (as root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _check(argv: Sequence[str], what: str, timeout: float, env: dict[str, str] | None = None) -> str:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise ScenarioError(f"{what}: no result within {timeout:.0f}s") from None
    if res.returncode:
        raise ScenarioError(f"{what} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-800:]}")
    return res.stdout


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                return True
    return False


def force_unmount(path: Path) -> None:
    for argv in (["fusermount3", "-u", str(path)], ["fusermount3", "-uz", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(argv, capture_output=True, timeout=30)


def stats_diff(after: Any, before: Any) -> Any:
    """Numeric leaves of ``after`` minus those of ``before`` (same shape, missing = 0)."""
    if isinstance(after, dict):
        b = before if isinstance(before, dict) else {}
        return {k: stats_diff(v, b.get(k)) for k, v in after.items()}
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return after - (before if isinstance(before, (int, float)) and not isinstance(before, bool) else 0)
    return after


def tiers_from_stats(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per-tier requests/hits/misses/bytes/errors out of ``imagefs stats --json``."""
    keep = ("requests", "hits", "misses", "bytes", "errors")
    tiers = (stats.get("cache") or {}).get("tiers") or {}
    return {name: {k: int(t.get(k, 0)) for k in keep} for name, t in tiers.items() if isinstance(t, dict)}


def fuse_from_stats(stats: dict[str, Any]) -> dict[str, int]:
    """FUSE request counts (and read bytes, if the daemon reports them)."""
    req = stats.get("requests") or {}
    out = {f"ops_{k}": int(v) for k, v in (req.get("ops") or {}).items() if isinstance(v, (int, float))}
    for key in ("read_bytes", "bytes_read"):
        if isinstance(req.get(key), (int, float)):
            out["read_bytes"] = int(req[key])
    return out


# --------------------------------------------------------------------------- container


@dataclass
class ContainerOutcome:
    status: int
    start_s: float
    exit_s: float
    io: dict[str, int]
    stderr_tail: str


def run_container(ctx: Context, lower: Path, image_cfg: dict[str, Any], argv: Sequence[str], t0: float,
                  timeout: float, abort: Callable[[], None] | None = None) -> ContainerOutcome:
    """overlay over ``lower`` + runc config from ``image_cfg`` + ``runc run``; times from ``t0``.

    ``timeout`` counts from ``t0`` (the whole run, as ``--run-timeout`` and
    ``--peer-timeout`` say), not from this call: the pull, the mount, and the overlay
    and config steps before ``runc run`` (which read the image's /etc/passwd through
    the lower mount, seconds on a slow lazy peer) are inside it. On timeout,
    ``abort`` (if given) is called first: it kills the FUSE daemon under ``lower``, so
    that processes blocked in its reads fail at once and can be killed.
    """
    from imagefs.run import overlay
    from imagefs.runtime_config import RunSpec, runtime_config

    cid = f"bench-{secrets.token_hex(5)}"
    bundle = ctx.rundir / "bundles" / cid
    bundle.mkdir(parents=True)
    runc_root = str(ctx.rundir / "runc")
    out_path, err_path = bundle / "stdout", bundle / "stderr"
    try:
        with overlay(str(lower), str(bundle)) as rootfs:
            spec = RunSpec(command=["/bin/sh", "-c", _IO_WRAPPER, "sh", *argv], entrypoint=[], network="host")
            cfg = runtime_config(ctx.runc_base, image_cfg, spec, rootfs, str(lower))
            (bundle / "config.json").write_text(json.dumps(cfg))
            pid_file = bundle / "pid"
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(["runc", "--root", runc_root, "run", "--bundle", str(bundle),
                                         "--pid-file", str(pid_file), cid],
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err)
                start_s: float | None = None
                deadline = t0 + timeout
                try:
                    while proc.poll() is None:
                        now = time.monotonic()
                        if start_s is None and pid_file.exists():
                            start_s = now - t0
                        if now > deadline:
                            if abort is not None:
                                abort()
                            raise ScenarioTimeout(f"container did not exit within {timeout:.0f}s of the run's start",
                                                  now - t0)
                        time.sleep(0.001 if start_s is None else 0.005)
                finally:
                    if proc.poll() is None:
                        subprocess.run(["runc", "--root", runc_root, "kill", cid, "KILL"], capture_output=True)
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(10)
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait(10)
                exit_s = time.monotonic() - t0
        err_text = err_path.read_text(errors="replace")
    finally:
        subprocess.run(["runc", "--root", runc_root, "delete", "--force", cid], capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)
    io: dict[str, int] = {}
    other = []
    for line in err_text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == IO_TAG and parts[2].isdigit():
            io[parts[1].rstrip(":")] = int(parts[2])
        else:
            other.append(line)
    return ContainerOutcome(proc.returncode, start_s if start_s is not None else exit_s, exit_s, io,
                            "\n".join(other[-10:]))


def _finish(res: RunResult, t0: float, ready_at: float, c: ContainerOutcome) -> None:
    res.ready_s = ready_at - t0
    res.start_s = c.start_s
    res.total_s = c.exit_s
    res.phases_s["start"] = max(0.0, c.start_s - res.ready_s)
    res.phases_s["run"] = max(0.0, c.exit_s - c.start_s)
    res.exit_status = c.status
    res.workload_io = c.io
    if c.status != 0:
        res.fail(f"workload exited with status {c.status}: {c.stderr_tail}")


# --------------------------------------------------------------------------- baseline


def oci_config(layout_dir: Path, tag: str = "latest") -> dict[str, Any]:
    """The ``config`` object of the image tagged ``tag`` in an OCI layout directory."""
    index = json.loads((layout_dir / "index.json").read_text())
    manifests = index.get("manifests") or []
    chosen = next((m for m in manifests if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag),
                  manifests[0] if manifests else None)
    if chosen is None:
        raise ScenarioError(f"{layout_dir}: index.json lists no manifest")

    def blob(digest: str) -> Any:
        algo, _, hexd = digest.partition(":")
        return json.loads((layout_dir / "blobs" / algo / hexd).read_text())

    manifest = blob(chosen["digest"])
    return blob(manifest["config"]["digest"]).get("config") or {}


def run_baseline(ctx: Context, img: ImageAssets, wl: Workload, rep: int) -> RunResult:
    res = RunResult("baseline", img.name, wl.name, rep)
    work = ctx.rundir / "baseline"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    layout, bundle = work / "layout", work / "bundle"
    try:
        drop_caches()
        ctx.reset_links()
        t0 = time.monotonic()
        _check(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                f"docker://{ctx.registry_host}/{img.registry_repo}", f"oci:{layout}:latest"],
               "skopeo copy (pull)", ctx.run_timeout_s)
        t_pull = time.monotonic()
        _check(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], "umoci unpack", ctx.run_timeout_s)
        image_cfg = oci_config(layout)
        t_ready = time.monotonic()
        res.phases_s.update(pull=t_pull - t0, unpack=t_ready - t_pull)
        c = run_container(ctx, bundle / "rootfs", image_cfg, wl.argv, t0, ctx.run_timeout_s)
        _finish(res, t0, t_ready, c)
        res.links = ctx.link_stats(["registry"])
    except ScenarioError as e:
        res.fail(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- imagefs


def _imagefs_env() -> dict[str, str]:
    return s3_env()


def resolve_image(ctx: Context, store_name: str, cache_dir: Path) -> tuple[str, dict[str, Any]]:
    """Name -> (digest, image config) through the blob link, the way ``imagefs run``
    does it: the index is fetched once and kept in the host's cache directory, where the
    mount daemon finds it (older code without that copy: resolve, then fetch)."""
    from cache.stores import open_store

    store = open_store(ctx.store_url, s3_endpoint=ctx.s3_endpoint)
    try:
        from imagefs.index_cache import load_index
    except ImportError:
        from indexer.catalog import open_image, resolve

        digest = resolve(store, store_name)
        return digest, dict(open_image(store, digest).config)
    index = load_index(store, store_name, str(cache_dir))
    return index.digest, dict(index.config)


def imagefs_mount(ctx: Context, image: str, mp: Path, cache_dir: Path, az: bool, replay: bool = False) -> None:
    argv = [tool("imagefs"), "-q", "mount", image, str(mp), "--store", ctx.store_url,
            "--s3-endpoint", ctx.s3_endpoint, "--cache-dir", str(cache_dir)]
    if not replay:
        argv.append("--no-replay")
    argv += ctx.mount_args
    if az:
        if not ctx.az_address:
            raise ScenarioError("no AZ cache server in this run")
        argv += ["--az-cache", ctx.az_address]
    _check(argv, "imagefs mount", 120, env=_imagefs_env())


def imagefs_stats(mp: Path) -> dict[str, Any]:
    return json.loads(_check([tool("imagefs"), "stats", "--json", str(mp)], "imagefs stats", 30))


def wait_for_prefetch(mp: Path, timeout: float, poll: float = 0.25) -> dict[str, Any]:
    """Wait until the mount's prefetch has ended or stands by (the AZ cache answered
    every miss), or ``timeout``; its last state, with ``wait_s``. Mounts from before
    prefetch was reported say ``unknown`` at once."""
    t0 = time.monotonic()
    while True:
        pf = dict(imagefs_stats(mp).get("prefetch") or {"state": "unknown"})
        if pf["state"] not in ("pending", "running") or time.monotonic() - t0 >= timeout:
            pf["wait_s"] = round(time.monotonic() - t0, 2)
            return pf
        time.sleep(poll)


def imagefs_kill(mp: Path) -> None:
    """SIGKILL the daemon serving ``mp`` (a timed-out run; the mount is cleaned up after)."""
    with contextlib.suppress(ScenarioError, ValueError, KeyError, ProcessLookupError):
        os.kill(int(imagefs_stats(mp)["pid"]), signal.SIGKILL)


def imagefs_umount(mp: Path) -> None:
    try:
        _check([tool("imagefs"), "umount", str(mp)], "imagefs umount", 60)
    finally:
        force_unmount(mp)


@contextlib.contextmanager
def _mountpoint(ctx: Context, name: str) -> Iterator[Path]:
    mp = ctx.rundir / "mnt" / name
    if is_mounted(mp):
        force_unmount(mp)
    mp.mkdir(parents=True, exist_ok=True)
    yield mp


def _imagefs_once(ctx: Context, scenario: str, img: ImageAssets, wl: Workload, rep: int, mp: Path,
                  cache_dir: Path, *, az: bool, drop: bool, reuse_mount: bool, replay: bool = False) -> RunResult:
    """One imagefs run; leaves the mount up (the caller unmounts)."""
    res = RunResult(scenario, img.name, wl.name, rep)
    try:
        if drop:
            drop_caches()
        before = imagefs_stats(mp) if reuse_mount else {}
        ctx.reset_links()
        t0 = time.monotonic()
        digest, image_cfg = resolve_image(ctx, img.store_name, cache_dir)
        t_resolved = time.monotonic()
        if not reuse_mount:
            imagefs_mount(ctx, digest, mp, cache_dir, az, replay)
        t_ready = time.monotonic()
        res.phases_s.update(resolve=t_resolved - t0, mount=t_ready - t_resolved)
        c = run_container(ctx, mp, image_cfg, wl.argv, t0, ctx.run_timeout_s, abort=lambda: imagefs_kill(mp))
        _finish(res, t0, t_ready, c)
        res.links = ctx.link_stats(["blob", "az"] if az else ["blob"])
        after = imagefs_stats(mp)
        stats = stats_diff(after, before)
        res.tiers = tiers_from_stats(stats)
        res.fuse = fuse_from_stats(stats)
        res.prefetch = dict(after.get("prefetch") or {})
        if replay:
            res.prefetch["replay"] = dict(after.get("replay") or {})
    except ScenarioError as e:
        res.fail(e)
    except Exception as e:  # the store client raising: keep the matrix going, say what
        res.fail(f"{type(e).__name__}: {e}")
    return res


def run_imagefs_chain(ctx: Context, img: ImageAssets, wl: Workload, rep: int, wanted: Sequence[str],
                      cache_dir: Path, run_cold: bool = True) -> list[RunResult]:
    """cold (fresh SSD dir) -> ssd (new mount, same dir) -> page (same mount), as asked.

    ``run_cold=False`` skips the cold run and reuses ``cache_dir`` as an earlier cold
    run of the same workload left it (a cold run too slow to repeat still lets the
    warm tiers be measured again). The caller owns ``cache_dir``.
    """
    out: list[RunResult] = []
    if run_cold:
        shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _mountpoint(ctx, f"imagefs-{img.name}") as mp:
        if run_cold:
            try:
                cold = _imagefs_once(ctx, "imagefs-cold", img, wl, rep, mp, cache_dir, az=False, drop=True,
                                     reuse_mount=False)
            finally:
                if is_mounted(mp):
                    imagefs_umount(mp)
            if "imagefs-cold" in wanted:
                out.append(cold)
            if not cold.ok:
                return out
        if not {"imagefs-ssd", "imagefs-page"} & set(wanted):
            return out
        try:
            ssd = _imagefs_once(ctx, "imagefs-ssd", img, wl, rep, mp, cache_dir, az=False, drop=True,
                                reuse_mount=False)
            if "imagefs-ssd" in wanted:
                out.append(ssd)
            if ssd.ok and "imagefs-page" in wanted:
                out.append(_imagefs_once(ctx, "imagefs-page", img, wl, rep, mp, cache_dir, az=False,
                                         drop=False, reuse_mount=True))
        finally:
            if is_mounted(mp):
                imagefs_umount(mp)
    return out


def run_imagefs_az(ctx: Context, img: ImageAssets, wl: Workload, rep: int, *, warmup: bool = False) -> RunResult:
    """A mount with a fresh SSD dir and the AZ cache server.

    ``warmup``: the unmeasured run that fills the AZ cache server, as other hosts of
    the zone would have: after the workload it waits for the mount's prefetch to bring
    the whole image through the server (``prefetch.wait_s`` says how long), so the
    measured runs find it all there."""
    cache_dir = ctx.rundir / "ssd" / f"az-{secrets.token_hex(4)}"
    cache_dir.mkdir(parents=True)
    try:
        with _mountpoint(ctx, f"imagefs-az-{img.name}") as mp:
            try:
                res = _imagefs_once(ctx, "imagefs-az-warmup" if warmup else "imagefs-az", img, wl, rep, mp,
                                    cache_dir, az=True, drop=not warmup, reuse_mount=False)
                if warmup and res.ok:
                    res.prefetch = wait_for_prefetch(mp, WARMUP_PREFETCH_TIMEOUT_S)
                return res
            finally:
                if is_mounted(mp):
                    imagefs_umount(mp)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


# --------------------------------------------------------------------------- peers


def _wait_mounted(mp: Path, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mp):
        if proc.poll() is not None:
            raise ScenarioError(f"{what} exited ({proc.returncode}) before the mount appeared")
        if time.monotonic() > deadline:
            raise ScenarioError(f"{what}: no mount within {timeout:.0f}s")
        time.sleep(0.002)


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _stop_fuse_daemon(mp: Path, proc: subprocess.Popen[bytes]) -> None:
    force_unmount(mp)
    stop_process(proc)
    force_unmount(mp)


def link_note(links: dict[str, dict[str, int]], elapsed_s: float) -> str:
    """What crossed each link before a run was stopped, and the run time per request.

    On one connection (HTTP/1.1, no pipelining) requests take turns, so the run's time
    divided by its requests is what each one cost, link latency included.
    """
    parts = []
    for name, s in links.items():
        n = int(s.get("requests", 0))
        if n <= 0:
            parts.append(f"{name} link: no requests")
            continue
        parts.append(f"{name} link: {n} requests on {int(s.get('connections', 0))} connection(s), "
                     f"{s.get('bytes_down', 0) / (1 << 20):.1f} MiB down, "
                     f"{elapsed_s * 1000 / n:.0f} ms of the run per request")
    return "; ".join(parts)


def _peer_run(ctx: Context, scenario: str, img: ImageAssets, wl: Workload, rep: int, argv: list[str],
              links: Sequence[str], timeout: float, timeout_hint: str = "") -> RunResult:
    """One peer run: ``argv MOUNTPOINT`` (a FUSE daemon in the foreground), then the container.

    A run stopped by ``timeout`` says in its error what crossed ``links`` until then
    (:func:`link_note`) and ``timeout_hint``: a timeout is a measurement ("> N s"),
    and the request count says where the time went.
    """
    res = RunResult(scenario, img.name, wl.name, rep)
    with _mountpoint(ctx, f"{scenario}-{img.name}") as mp:
        log = ctx.rundir / "logs" / f"{scenario}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc: subprocess.Popen[bytes] | None = None
        try:
            drop_caches()
            ctx.reset_links()
            t0 = time.monotonic()
            with open(log, "ab") as f:
                proc = subprocess.Popen([*argv, str(mp)], stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                        start_new_session=True)
            _wait_mounted(mp, proc, 60, scenario)
            t_ready = time.monotonic()
            res.phases_s["mount"] = t_ready - t0
            daemon = proc
            c = run_container(ctx, mp, img.config, wl.argv, t0, timeout,
                              abort=lambda: _killpg(daemon))
            _finish(res, t0, t_ready, c)
        except ScenarioTimeout as e:
            res.fail(e)
            with contextlib.suppress(Exception):
                res.links = ctx.link_stats(links)
            note = link_note(res.links, e.after) if links else ""
            res.error = "; ".join(filter(None, [str(e), note, timeout_hint]))[-2000:]
        except ScenarioError as e:
            res.fail(e)
        finally:
            if proc is not None:
                _stop_fuse_daemon(mp, proc)
            with contextlib.suppress(Exception):
                res.links = res.links or ctx.link_stats(links)
    return res


def run_squashfuse(ctx: Context, img: ImageAssets, wl: Workload, rep: int) -> RunResult:
    return _peer_run(ctx, "squashfuse", img, wl, rep, ["squashfuse", "-f", str(img.squashfs)], [],
                     ctx.run_timeout_s)


def run_casync(ctx: Context, img: ImageAssets, wl: Workload, rep: int) -> RunResult:
    base = ctx.casync_url
    argv = ["casync", "mount", f"--store={base}/default.castr", f"{base}/{img.caidx_name}"]
    return _peer_run(ctx, "casync", img, wl, rep, argv, ["casync"], ctx.peer_timeout_s, CASYNC_TIMEOUT_HINT)


# short: the report keeps 300 characters of an error
CASYNC_TIMEOUT_HINT = "casync-http GETs one ~64 KiB chunk at a time; runs allowed to finish: bench/README.md"


