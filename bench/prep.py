"""Preparation steps shared by the benches that run imagefs against emulated links.

Why a module of its own: the cold-start bench and the fleet bench prepare the same
things the same way (the code under test exported from HEAD, bench images indexed into
SeaweedFS, the machine described in the results), and a step is only trusted when it
is skipped for the very inputs it was built from, so these live in one place:

- :func:`step`: a cached step with a stamp of its inputs (run again when they change);
- :func:`prepare_code`: the imagefs code every command of a run uses;
- :func:`index_into_store`: ``imagefs index`` of a bench image into the bench's S3;
- :func:`machine_info`, :func:`locked`, :func:`sigterm_as_interrupt`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import services

REPO = Path(__file__).resolve().parent.parent
PREP_VERSION = 1  # bump when a preparation step changes its output
CODE_DIRS = ("imagefs", "indexer", "cache")


class PrepError(RuntimeError):
    """A preparation step failed; the message has the command and its output."""


def _stamp_matches(path: Path, inputs: dict[str, Any]) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("inputs") == inputs)
    except (OSError, ValueError):
        return False


def _write_stamp(path: Path, inputs: dict[str, Any], seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"inputs": inputs, "seconds": round(seconds, 1),
                               "at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}))
    tmp.replace(path)


@contextlib.contextmanager
def step(stamp: Path, inputs: dict[str, Any], what: str, log: Callable[[str], None]) -> Iterator[bool]:
    """Yields True if the step must run; stamps it when the body completes."""
    if _stamp_matches(stamp, inputs):
        yield False
        return
    stamp.unlink(missing_ok=True)
    log(f"preparing: {what}")
    t0 = time.monotonic()
    yield True
    _write_stamp(stamp, inputs, time.monotonic() - t0)
    log(f"prepared: {what} in {time.monotonic() - t0:.1f}s")


def run_checked(argv: Sequence[str], what: str, env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if res.returncode:
        raise PrepError(f"{what} failed ({res.returncode}): `{shlex.join(argv)}`\n{(res.stderr or res.stdout)[-2000:]}")
    return res.stdout


def layout_dir(ref: str) -> Path:
    """``oci:PATH:TAG`` -> PATH."""
    body = ref[len("oci:"):] if ref.startswith("oci:") else ref
    path, _, _tag = body.rpartition(":")
    return Path(path or body)


def manifest_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


def source_hash(root: Path, *dirs: str) -> str:
    """Digest of the indexer's sources: an index built by other code is rebuilt."""
    h = hashlib.sha256()
    for d in dirs:
        for p in sorted((root / d).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def prepare_code(rundir: Path, mode: str) -> tuple[Path, str]:
    """The imagefs code every command of this run uses, and how to name it.

    ``head``: an export of the committed HEAD into the run directory, put first on
    PYTHONPATH (ahead of the editable install) for this process and every child, so
    that edits others make to the checkout while the matrix runs cannot leak into it.
    ``worktree``: the checkout as it is.
    """
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=True).stdout

    commit = git("rev-parse", "--short", "HEAD").strip()
    if mode == "worktree":
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_DIRS).strip()
        return REPO, commit + ("+uncommitted changes" if dirty else "")
    code = rundir / "code"
    code.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", *CODE_DIRS], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    sys.path.insert(0, str(code))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    return code, commit


def index_into_store(work: Path, ns_blob: str, name: str, layout_zstd: str, store_name: str, code_dir: Path,
                     s3_port: int, log: Callable[[str], None]) -> None:
    """``imagefs index`` of an image's zstd layout into the bench's S3 (SeaweedFS in
    ``ns_blob``, straight to its loopback: preparation is not what is measured); cached
    by a stamp of the layout and the indexer's sources, under ``work/seaweed``."""
    layout = layout_dir(layout_zstd)
    inputs = {"zstd": manifest_digest(layout), "indexer": source_hash(code_dir, "indexer", "cache"),
              "prep": PREP_VERSION}
    with step(work / "seaweed" / "stamps" / f"{name}.json", inputs, f"imagefs index {name}", log) as todo:
        if todo:
            run_checked(services.in_ns(ns_blob, [services.tool("imagefs"), "-q", "index", f"oci:{layout}:latest",
                                                 "--store", f"s3://{services.S3_BUCKET}",
                                                 "--s3-endpoint", f"http://127.0.0.1:{s3_port}",
                                                 "--name", store_name]),
                        f"imagefs index {name}", env=services.s3_env())


def machine_info(code: str) -> dict[str, Any]:
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    osname = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')

    def version(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0][:80]
        return "?"

    return {"hostname": socket.gethostname(), "kernel": platform.release(), "os": osname,
            "cpus": os.cpu_count() or 0, "memory_gib": round(mem_kb / (1 << 20), 1),
            "python": platform.python_version(), "commit": code,
            "tools": {"skopeo": version(["skopeo", "--version"]), "umoci": version(["umoci", "--version"]),
                      "runc": version(["runc", "--version"]), "casync": version(["casync", "--version"]),
                      "squashfuse": version(["squashfuse", "--version"]),
                      "mksquashfs": version(["mksquashfs", "-version"])}}


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold ``path`` exclusively for the run (a second run of ``what`` fails at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepError(f"another {what} run holds {path}") from None
        yield
