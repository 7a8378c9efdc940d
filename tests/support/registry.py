"""A real Docker distribution registry on loopback, and tiny HTTP servers for the
behaviours it cannot show without certificates (token auth) or on purpose (errors).

``registry`` (session-scoped) starts Debian's ``docker-registry`` with filesystem
storage in a temporary directory; ``basic_registry`` is the same with htpasswd
(Basic) auth. Images get there the way users push them: ``skopeo copy``.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
BASIC_USER, BASIC_PASSWORD = "tester", "s3cret"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT``."""

    host: str
    proc: subprocess.Popen[bytes]
    root: str  # config, log and storage (``data/``) live here
    creds: tuple[str, str] | None = None

    def push(self, oci_dir: str, tag: str, repo: str, *, dest_tag: str | None = None, fmt: str | None = None,
             extra: tuple[str, ...] = ()) -> None:
        """``skopeo copy oci:DIR:TAG docker://HOST/REPO:DEST_TAG`` (``fmt="v2s2"`` for
        Docker schema 2 manifests; ``extra`` e.g. ``("--all",)`` or ``("--dest-decompress",)``)."""
        cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *extra]
        if fmt:
            cmd += ["--format", fmt]
        if self.creds:
            cmd += ["--dest-creds", f"{self.creds[0]}:{self.creds[1]}"]
        cmd += [f"oci:{oci_dir}:{tag}", f"docker://{self.host}/{repo}:{dest_tag or tag}"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def upload(self, oci_dir: str, manifest_digest: str, repo: str, tag: str) -> None:
        """Push one image of a layout byte for byte through the distribution API
        (skopeo gzips uncompressed layers on the way to a registry; this does not)."""
        blobs = os.path.join(oci_dir, "blobs", "sha256")
        with open(os.path.join(blobs, manifest_digest.split(":", 1)[1]), "rb") as f:
            manifest = f.read()
        doc = json.loads(manifest)
        for desc in [doc["config"], *doc["layers"]]:
            with open(os.path.join(blobs, desc["digest"].split(":", 1)[1]), "rb") as f:
                data = f.read()
            status, headers = self._call("POST", f"/v2/{repo}/blobs/uploads/", b"", {})
            assert status == 202, status
            loc = urllib.parse.urlsplit(headers["location"])
            sep = "&" if loc.query else ""
            target = f"{loc.path}?{loc.query}{sep}digest={desc['digest']}"
            status, _ = self._call("PUT", target, data, {"Content-Type": "application/octet-stream"})
            assert status == 201, status
        status, _ = self._call("PUT", f"/v2/{repo}/manifests/{tag}", manifest, {"Content-Type": doc["mediaType"]})
        assert status == 201, status

    def _call(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        conn = http.client.HTTPConnection(self.host, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()


def _wait_ready(host: str, proc: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {proc.returncode}: {open(log).read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection(host, timeout=1)
            conn.request("GET", "/v2/")
            status = conn.getresponse().status
            conn.close()
            if status in (200, 401):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"docker-registry on {host} did not answer /v2/ within 15 s")


def start_registry(root: str, htpasswd: str | None = None, *, access_log: bool = False) -> Registry:
    """Start docker-registry with storage under ``root`` on a free loopback port
    (``access_log``: requests go to ``root/registry.log``, for :func:`blob_gets`)."""
    if not os.path.exists(REGISTRY_BIN):
        pytest.skip(f"{REGISTRY_BIN} is not installed (Debian package docker-registry)")
    host = f"127.0.0.1:{free_port()}"
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    config = os.path.join(root, "config.yml")
    auth = f"auth:\n  htpasswd:\n    realm: test-realm\n    path: {htpasswd}\n" if htpasswd else ""
    with open(config, "w") as f:
        f.write(
            "version: 0.1\n"
            f"log:\n  level: warn\n  accesslog:\n    disabled: {'false' if access_log else 'true'}\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root}/data\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {host}\n"
            + auth
        )
    log = os.path.join(root, "registry.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", config], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(host, proc, log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Registry(host, proc, root)


def blob_gets(reg: Registry, repo: str) -> list[str]:
    """Digests of the blobs of ``repo`` that clients GOT from ``reg`` so far (a
    registry started with ``access_log=True``), one entry per request."""
    pattern = re.compile(rf'"GET /v2/{re.escape(repo)}/blobs/(sha256:[0-9a-f]{{64}}) HTTP')
    with open(os.path.join(reg.root, "registry.log"), errors="replace") as f:
        return [m.group(1) for line in f for m in [pattern.search(line)] if m]


def stop_registry(reg: Registry) -> None:
    reg.proc.terminate()
    try:
        reg.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        reg.proc.kill()
        reg.proc.wait()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous docker-registry on 127.0.0.1."""
    reg = start_registry(str(tmp_path_factory.mktemp("registry")))
    yield reg
    stop_registry(reg)


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry that demands Basic auth (htpasswd) as BASIC_USER/BASIC_PASSWORD."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt through the system's libxcrypt; cost 4 keeps requests fast

        hashed = crypt.crypt(BASIC_PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    root = str(tmp_path_factory.mktemp("registry-basic"))
    htpasswd = os.path.join(root, "htpasswd")
    with open(htpasswd, "w") as f:
        f.write(f"{BASIC_USER}:{hashed}\n")
    reg = start_registry(root, htpasswd)
    reg.creds = (BASIC_USER, BASIC_PASSWORD)
    yield reg
    stop_registry(reg)


# -- tiny servers ----------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


Handler = Callable[["TinyServer", http.server.BaseHTTPRequestHandler], None]


@dataclass
class TinyServer:
    """An http.server on ``bind`` (loopback by default) calling ``handler`` for each
    GET; records every request it served in ``requests``."""

    handler: Handler
    bind: str = "127.0.0.1"
    requests: list[Request] = field(default_factory=list)
    server: Any = None

    @property
    def host(self) -> str:
        h, port = self.server.server_address[:2]
        return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"

    def __enter__(self) -> "TinyServer":
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.requests.append(Request("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                outer.handler(outer, self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        cls = http.server.ThreadingHTTPServer
        if ":" in self.bind:
            cls = type("V6Server", (http.server.ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self.server = cls((self.bind, 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def forward(h: http.server.BaseHTTPRequestHandler, upstream: str) -> None:
    """Relay a GET to the registry at ``upstream`` and its answer back."""
    conn = http.client.HTTPConnection(upstream, timeout=10)
    headers = {k: v for k, v in h.headers.items() if k.lower() in ("accept",)}
    conn.request("GET", h.path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    keep = {k: v for k, v in resp.getheaders() if k.lower() in ("content-type", "docker-content-digest", "location", "www-authenticate")}
    conn.close()
    reply(h, resp.status, body, keep)


def bearer_proxy(upstream: str, *, token: str = "tok-123", creds: tuple[str, str] | None = None,
                 realm_host: str | None = None, bind: str = "127.0.0.1") -> TinyServer:
    """A registry front that demands ``Bearer token`` (issued at ``/token``, to anyone
    or only to ``creds`` over Basic) and forwards to ``upstream``. ``realm_host``
    overrides where the challenge says the token server is."""

    def handle(srv: TinyServer, h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/token"):
            if creds is not None:
                want = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
                if h.headers.get("Authorization") != want:
                    reply(h, 401, b'{"details":"bad credentials"}', {"Content-Type": "application/json"})
                    return
            reply(h, 200, ('{"token":"%s","expires_in":300}' % token).encode(), {"Content-Type": "application/json"})
            return
        if h.headers.get("Authorization") != f"Bearer {token}":
            repo = re.sub(r"^/v2/(.*)/(manifests|blobs)/.*$", r"\1", h.path.split("?")[0])
            realm = f"http://{realm_host or srv.host}/token"
            challenge = f'Bearer realm="{realm}",service="tiny",scope="repository:{repo}:pull"'
            reply(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                  {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
            return
        forward(h, upstream)

    return TinyServer(handle, bind)


def status_server(status: int, body: bytes = b"backend exploded") -> TinyServer:
    """Answers every request with ``status`` and ``body``."""
    return TinyServer(lambda srv, h: reply(h, status, body, {"Content-Type": "text/plain"}))


class SilentServer:
    """Accepts TCP connections (kernel backlog) and never answers: for timeouts."""

    def __enter__(self) -> "SilentServer":
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()

