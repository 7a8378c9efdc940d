"""Cold-start scenarios with a startup profile (issue 10), for ``python -m bench coldstart``.

A profile is recorded the way a user records one, on the bench's own container run (so
it reads exactly what the measured runs read): a fresh mount with ``--record``, every tier
cold, the workload's container, unmount (the daemon saves the profile as it exits), then
``imagefs optimize`` (startup packs). Each (image, workload) gets its own recording; its
stored profile blob is kept in the run directory and put back in the store before every
run that uses it, because the store holds one profile per image. Runs of the scenarios
without a profile mount with ``--no-replay``, so they measure a first start ever.

==========================  ===========================================================
imagefs-profiled            every tier cold (fresh SSD dir, page cache dropped), blob
                            store only, with the profile recorded for this workload
imagefs-az-profiled         as imagefs-az (AZ cache warm, fresh SSD dir), with the profile
imagefs-otherprofile        every tier cold, with the profile recorded for another
                            workload of the same image (a wrong profile: what it costs)
==========================  ===========================================================
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bench import scenarios
from bench.scenarios import Context, ImageAssets, RunResult, ScenarioError, Workload
from bench.services import tool

SCENARIOS = ("imagefs-profiled", "imagefs-az-profiled", "imagefs-otherprofile")


@dataclass
class RecordedProfile:
    """A profile recorded for one (image, workload), kept as its stored blob."""

    image: str
    workload: str
    digest: str  # the image's index digest
    blob: Path
    chunks: int
    bytes: int
    compressed_bytes: int
    optimize_note: str
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {"image": self.image, "workload": self.workload, "chunks": self.chunks, "bytes": self.bytes,
                "compressed_bytes": self.compressed_bytes, "optimize": self.optimize_note,
                "seconds": round(self.seconds, 1)}


def _store(ctx: Context):  # type: ignore[no-untyped-def]
    from cache.stores import open_store

    return open_store(ctx.store_url, s3_endpoint=ctx.s3_endpoint)


def install_profile(ctx: Context, digest: str, profile: RecordedProfile | None) -> None:
    """Make ``profile`` (None: no profile) the image's profile in the store."""
    from indexer.profile import profile_key

    store = _store(ctx)
    if profile is None:
        store.delete(profile_key(digest))
    else:
        store.put(profile_key(digest), profile.blob.read_bytes())


def record(ctx: Context, img: ImageAssets, wl: Workload) -> RecordedProfile:
    """Record ``wl``'s profile on ``img`` (unmeasured) and lay it out in startup packs."""
    from indexer import profile as profiles
    from indexer.catalog import open_image

    t0 = time.monotonic()
    cache_dir = ctx.rundir / "ssd" / f"record-{secrets.token_hex(4)}"
    cache_dir.mkdir(parents=True)
    try:
        with scenarios._mountpoint(ctx, f"record-{img.name}") as mp:
            digest, image_cfg = scenarios.resolve_image(ctx, img.store_name, cache_dir)
            store = _store(ctx)
            store.delete(profiles.profile_key(digest))
            scenarios._check([tool("imagefs"), "-q", "mount", digest, str(mp), "--store", ctx.store_url,
                              "--s3-endpoint", ctx.s3_endpoint, "--cache-dir", str(cache_dir), "--no-prefetch",
                              "--record", "--record-replace", "--record-quiet", "30", *ctx.mount_args],
                             "imagefs mount --record", 120, env=scenarios._imagefs_env())
            try:
                c = scenarios.run_container(ctx, mp, image_cfg, wl.argv, time.monotonic(), ctx.run_timeout_s)
                if c.status != 0:
                    raise ScenarioError(f"recording {img.name} / {wl.name}: workload exited {c.status}: "
                                        f"{c.stderr_tail}")
            finally:
                scenarios.imagefs_umount(mp)  # the daemon saves the recording as it exits
        res = subprocess.run([tool("imagefs"), "optimize", digest, "--store", ctx.store_url,
                              "--s3-endpoint", ctx.s3_endpoint], capture_output=True, text=True, timeout=600,
                             env={**scenarios._imagefs_env()})
        if res.returncode:
            raise ScenarioError(f"imagefs optimize {img.name}: {res.stderr.strip()[-800:]}")
        index = open_image(store, digest)
        found = profiles.load(store, index)
        if found is None:
            raise ScenarioError(f"recording {img.name} / {wl.name}: no profile was saved")
        s = profiles.summary(found, index)
        blob = ctx.rundir / "profiles" / f"{img.name}-{scenarios_slug(wl.name)}.profile"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(store.get(profiles.profile_key(digest)))
        return RecordedProfile(img.name, wl.name, digest, blob, int(s["chunks"]), int(s["bytes"]),
                               int(s["compressed_bytes"]), res.stderr.strip().splitlines()[-1] if res.stderr else "",
                               time.monotonic() - t0)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def scenarios_slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def other_profile(recorded: dict[tuple[str, str], RecordedProfile], image: str, workload: str,
                  order: Sequence[str]) -> RecordedProfile | None:
    """The profile of another workload of ``image``: the last one of ``order`` (the
    heaviest) that is not ``workload``."""
    for name in reversed(order):
        if name != workload and (image, name) in recorded:
            return recorded[(image, name)]
    return None


def run(ctx: Context, scenario: str, img: ImageAssets, wl: Workload, rep: int,
        profile: RecordedProfile | None) -> RunResult:
    """One profiled run: the profile installed, then a cold (or AZ-warm) mount with replay."""
    if profile is None:
        return RunResult(scenario, img.name, wl.name, rep).fail("no profile to use (recording failed or none applies)")
    install_profile(ctx, profile.digest, profile)
    az = scenario == "imagefs-az-profiled"
    cache_dir = ctx.rundir / "ssd" / f"profiled-{secrets.token_hex(4)}"
    cache_dir.mkdir(parents=True)
    try:
        with scenarios._mountpoint(ctx, f"{scenario}-{img.name}") as mp:
            try:
                res = scenarios._imagefs_once(ctx, scenario, img, wl, rep, mp, cache_dir, az=az, drop=True,
                                              reuse_mount=False, replay=True)
                res.prefetch["profile"] = profile.workload
                return res
            finally:
                if scenarios.is_mounted(mp):
                    scenarios.imagefs_umount(mp)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
