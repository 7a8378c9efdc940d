"""The ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`` transport: the distribution API v2.

Only the pull side is needed (``GET /v2/<repo>/manifests/<ref>`` and
``GET /v2/<repo>/blobs/<digest>``), so it is written on ``http.client`` rather than
taking a dependency: one connection per request, blobs streamed straight from the
response into :mod:`indexer.sources.blobs`, which verifies them.

Trust decisions made here:

* Plain HTTP only to loopback hosts (127.0.0.0/8, ::1, ``localhost``) or when the
  caller passes ``insecure=True``; every other URL, including token realms and
  redirect targets, must be https, and a refused http URL is refused before any
  connection is made. ``insecure`` also skips certificate checks, and falls back to
  plain HTTP when the registry does not speak TLS (as docker does for its
  "insecure registries").
* A manifest pulled by digest must hash to that digest; one pulled by tag must match
  the ``Docker-Content-Digest`` header when the registry sends it.
* ``Authorization`` is never sent to another host: it is dropped when a redirect
  (blob stores hand out pre-signed URLs) leaves the registry's host.

Authentication follows the registry's ``WWW-Authenticate`` challenge: ``Bearer``
(fetch a token from the realm, anonymously or with credentials) or ``Basic``.
Credentials (``--creds``, ``--authfile``, auth files and credential helpers) are
:mod:`indexer.sources.credentials`'s business; they are looked up only when the
registry asks for them.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, cast

from indexer.sources import ImageSource, SourceError
from indexer.sources.credentials import AuthOptions, Credentials, Registry, auth_files, find_credentials
from indexer.sources.manifest import (
    ACCEPT, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, Descriptor, check_digest, read_limited,
    resolve_image, sha256_digest, verify_blob,
)

DEFAULT_TIMEOUT = 60.0  # seconds without progress on one socket operation
MAX_REDIRECTS = 5
USER_AGENT = "imagefs/0.1"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_REPO = re.compile(r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^,\s]*))')


@dataclass(frozen=True)
class RegistryRef:
    """A parsed ``HOST[:PORT]/REPO[:TAG|@DIGEST]``."""

    host: str  # as written (``docker.io`` when omitted); names credentials
    repo: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def reference(self) -> str:
        """What the manifest is requested by: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"


def parse_reference(ref: str) -> RegistryRef:
    """Parse ``HOST[:PORT]/REPO[:TAG|@DIGEST]`` (default tag ``latest``)."""
    what = f"docker://{ref}"
    name, at, digest = ref.partition("@")
    if at:
        check_digest(digest, what)
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, path = first, rest
    else:
        host, path = DOCKER_HUB, name
    tag = None
    if ":" in path:
        path, _, tag = path.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise SourceError(f"{what}: invalid tag {tag!r}")
    if not path or not _REPO.fullmatch(path):
        raise SourceError(f"{what}: invalid repository name {path!r} (expected HOST[:PORT]/REPO[:TAG|@DIGEST], lowercase)")
    if host == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if not at and tag is None:
        tag = "latest"
    return RegistryRef(host, path, tag, digest if at else None)


def hostname_of(netloc: str) -> str:
    """The host of ``host[:port]`` / ``[v6]:port``, without brackets or port."""
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def is_loopback(host: str) -> bool:
    name = hostname_of(host).lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- credentials -------------------------------------------------------------------


def _registry(ref: RegistryRef) -> Registry:
    return Registry(ref.host, ref.api_host, ref.repo)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {...})."""
    scheme, _, params = header.strip().partition(" ")
    found = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) for m in _CHALLENGE_PARAM.finditer(params)}
    return scheme.lower(), found


# -- HTTP --------------------------------------------------------------------------


class _BlobStream:
    """A response body as a readable stream; errors become SourceError."""

    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, what: str) -> None:
        self._resp = resp
        self._conn = conn
        self._what = what
        self._count = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._resp.read(None if n is None or n < 0 else n)
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"{self._what}: download failed after {self._count} bytes: {_describe(e)}") from e
        self._count += len(data)
        return data

    def close(self) -> None:
        self._resp.close()
        self._conn.close()

    def __enter__(self) -> "_BlobStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed early ({len(e.partial)} bytes read, {e.expected} more expected)"
    return str(e) or type(e).__name__


def _excerpt(body: bytes) -> str:
    """A short, printable rendering of an error body (registry JSON errors decoded)."""
    try:
        errors = json.loads(body).get("errors")
        if isinstance(errors, list) and errors:
            return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError, UnicodeDecodeError):
        pass
    text = " ".join(body[:300].decode("utf-8", "replace").split())
    return text + ("…" if len(body) > 300 else "")


class RegistryClient:
    """Pulls manifests and blobs of one repository, with auth and trust as above."""

    def __init__(self, ref: RegistryRef, display: str, *, insecure: bool = False, timeout: float = DEFAULT_TIMEOUT,
                 auth: AuthOptions | None = None) -> None:
        self.ref = ref
        self.display = display
        self.insecure = insecure
        self.timeout = timeout
        scheme = "http" if is_loopback(ref.api_host) else "https"
        self._base = f"{scheme}://{ref.api_host}"
        self._authorization: str | None = None
        self._auth_options = auth
        self._creds_loaded = False
        self._creds: Credentials | None = None

    # -- transport ------------------------------------------------------------------

    def _check_url(self, url: urllib.parse.SplitResult) -> None:
        if url.scheme == "https":
            return
        if url.scheme != "http":
            raise SourceError(f"{self.display}: unsupported URL scheme in {url.geturl()!r}")
        if not (is_loopback(url.netloc) or self.insecure):
            raise SourceError(f"{self.display}: refusing plain HTTP to {url.netloc} (only loopback hosts may use http:// unless insecure is set)")

    def _connection(self, url: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        if url.scheme == "https":
            ctx = ssl.create_default_context()
            if self.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(url.netloc, timeout=self.timeout, context=ctx)
        return http.client.HTTPConnection(url.netloc, timeout=self.timeout)

    def _send(self, url: str, headers: dict[str, str]) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """GET ``url``, following redirects; the final response, unread."""
        origin = urllib.parse.urlsplit(url).netloc
        headers = dict(headers)
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            self._check_url(parts)
            if parts.netloc != origin:
                headers.pop("Authorization", None)
            conn = self._connection(parts)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except ssl.SSLError as e:
                conn.close()
                if self.insecure and parts.scheme == "https" and url.startswith(self._base) and not isinstance(e, ssl.SSLCertVerificationError):
                    self._base = "http://" + self._base[len("https://"):]  # the registry speaks plain HTTP
                    url = "http://" + url[len("https://"):]
                    origin = urllib.parse.urlsplit(url).netloc
                    continue
                hint = "" if self.insecure else " (a registry without valid TLS needs the insecure option)"
                raise SourceError(f"{self.display}: TLS with {parts.netloc} failed: {e}{hint}") from None
            except ConnectionRefusedError:
                conn.close()
                raise SourceError(f"{self.display}: cannot connect to {parts.netloc}: connection refused") from None
            except (TimeoutError, socket.timeout):
                conn.close()
                raise SourceError(f"{self.display}: {parts.netloc} did not answer within {self.timeout:g} s (timed out)") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise SourceError(f"{self.display}: request to {parts.netloc} failed: {_describe(e)}") from None
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                resp.close()
                conn.close()
                if not location:
                    raise SourceError(f"{self.display}: HTTP {resp.status} redirect from {parts.netloc} without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            return resp, conn
        raise SourceError(f"{self.display}: more than {MAX_REDIRECTS} redirects fetching {url}")

    def _get(self, path: str, accept: str | None = None) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """GET a registry path, answering one auth challenge if the registry asks."""
        headers = {"User-Agent": USER_AGENT}
        if accept:
            headers["Accept"] = accept
        resp, conn = self._send_authorized(path, headers)
        if resp.status != 401:
            return resp, conn
        challenge = resp.getheader("WWW-Authenticate") or ""
        body = self._drain(resp, conn)
        used = self._authorization
        self._authorization = self._answer(challenge)
        if self._authorization is None or used is not None and self._authorization == used and used.startswith("Basic "):
            raise self._auth_error(body)  # nothing to answer with, or it was already refused
        resp, conn = self._send_authorized(path, headers)
        if resp.status == 401:
            raise self._auth_error(self._drain(resp, conn))
        return resp, conn

    def _send_authorized(self, path: str, headers: dict[str, str]) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        h = dict(headers)
        if self._authorization:
            h["Authorization"] = self._authorization
        return self._send(self._base + path, h)

    @staticmethod
    def _drain(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, limit: int = 64 << 10) -> bytes:
        try:
            return resp.read(limit)
        except (OSError, http.client.HTTPException):
            return b""
        finally:
            resp.close()
            conn.close()

    # -- auth -----------------------------------------------------------------------

    def _credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            self._creds = find_credentials(_registry(self.ref), self._auth_options)
            self._creds_loaded = True
        return self._creds

    def _auth_error(self, body: bytes) -> SourceError:
        detail = f": {_excerpt(body)}" if body else ""
        if self._creds is not None:
            return SourceError(f"{self.display}: authentication denied (HTTP 401) with the credentials for {self.ref.host} from {self._creds.origin}{detail}")
        return SourceError(f"{self.display}: authentication required (HTTP 401) and no credentials for {self.ref.host} "
                           f"(give --creds USER:PASSWORD, or --authfile; searched {', '.join(auth_files(self._auth_options))}){detail}")

    def _answer(self, challenge: str) -> str | None:
        """The Authorization header that answers ``challenge``; None if we have none."""
        scheme, params = parse_challenge(challenge)
        if not scheme:
            return None  # a 401 without a challenge: nothing to answer
        creds = self._credentials()
        if scheme == "basic":
            if creds is None:
                return None
            return "Basic " + base64.b64encode(f"{creds.user}:{creds.password}".encode()).decode()
        if scheme == "bearer":
            return "Bearer " + self._token(params, creds)
        raise SourceError(f"{self.display}: registry asks for unsupported authentication {challenge!r}")

    def _token(self, params: dict[str, str], creds: Credentials | None) -> str:
        realm = params.get("realm")
        if not realm:
            raise SourceError(f"{self.display}: Bearer challenge without a realm")
        query = {k: v for k, v in (("service", params.get("service")), ("scope", params.get("scope") or f"repository:{self.ref.repo}:pull")) if v}
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {"User-Agent": USER_AGENT}
        if creds is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{creds.user}:{creds.password}".encode()).decode()
        resp, conn = self._send(url, headers)
        body = self._drain(resp, conn, MAX_MANIFEST_SIZE)
        if resp.status in (401, 403):
            raise self._auth_error(body)
        if resp.status != 200:
            raise SourceError(f"{self.display}: token server {urllib.parse.urlsplit(realm).netloc} answered HTTP {resp.status}: {_excerpt(body)}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError, UnicodeDecodeError):
            token = None
        if not isinstance(token, str) or not token:
            raise SourceError(f"{self.display}: token server {urllib.parse.urlsplit(realm).netloc} sent no token")
        return token

    # -- API --------------------------------------------------------------------------

    def _fail(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, what: str, not_found: str) -> SourceError:
        """The error for a non-200 answer to a request for ``what``."""
        body = self._drain(resp, conn)
        if resp.status == 404:
            return SourceError(f"{self.display}: {not_found} (HTTP 404{': ' + _excerpt(body) if body else ''})")
        return SourceError(f"{self.display}: registry answered HTTP {resp.status} {resp.reason} for {what}: {_excerpt(body) or '(empty body)'}")

    def manifest(self, reference: str) -> tuple[bytes, str]:
        """The manifest (or index) bytes and media type at a tag or digest, verified
        against the digest when there is one."""
        resp, conn = self._get(f"/v2/{self.ref.repo}/manifests/{reference}", ", ".join(ACCEPT))
        if resp.status != 200:
            not_found = "manifest unknown" if reference == self.ref.reference else f"manifest {reference} unknown"
            raise self._fail(resp, conn, f"manifest {reference}", not_found)
        try:
            body = read_limited(_BlobStream(resp, conn, f"{self.display}: manifest {reference}"), MAX_MANIFEST_SIZE, f"{self.display}: manifest {reference}")
        finally:
            resp.close()
            conn.close()
        got = sha256_digest(body)
        if reference.startswith("sha256:") and got != reference:
            raise SourceError(f"{self.display}: manifest digest mismatch: asked for {reference}, got {got}")
        header = resp.getheader("Docker-Content-Digest")
        if header and header.startswith("sha256:") and header != got:
            raise SourceError(f"{self.display}: manifest digest mismatch: registry says {header}, content is {got}")
        return body, resp.getheader("Content-Type") or ""

    def open_blob(self, digest: str, what: str = "blob", size: int | None = None) -> BinaryIO:
        """A blob's raw bytes as a stream (not verified here: the caller does that). With
        ``size`` (the descriptor's), a response announcing another length is refused
        before its body is read."""
        resp, conn = self._get(f"/v2/{self.ref.repo}/blobs/{digest}")
        if resp.status != 200:
            raise self._fail(resp, conn, f"{what} {digest}", f"{what} {digest} not found")
        length = resp.getheader("Content-Length")
        if size is not None and length is not None and length.strip().isdigit() and int(length) != size:
            resp.close()
            conn.close()
            raise SourceError(f"{self.display}: {what} {digest}: size mismatch: the manifest says {size} bytes, "
                              f"the registry sends {int(length)}")
        return cast(BinaryIO, _BlobStream(resp, conn, f"{self.display}: {what} {digest}"))


def open_registry(ref: str, platform: str | None = None, insecure: bool = False, *, timeout: float = DEFAULT_TIMEOUT,
                  auth: AuthOptions | None = None) -> ImageSource:
    """Open ``HOST[:PORT]/REPO[:TAG|@DIGEST]`` (the part after ``docker://``)."""
    display = f"docker://{ref}"
    client = RegistryClient(parse_reference(ref), display, insecure=insecure, timeout=timeout, auth=auth)
    top, media_type = client.manifest(client.ref.reference)

    def fetch_manifest(desc: Descriptor) -> tuple[bytes, str]:
        return client.manifest(desc.digest)

    def fetch_config(desc: Descriptor) -> bytes:
        with client.open_blob(desc.digest, "config") as f:
            data = read_limited(f, MAX_CONFIG_SIZE, f"{display}: config {desc.digest}")
        verify_blob(data, desc, f"{display}: config {desc.digest}")
        return data

    def layer_opener(desc: Descriptor) -> Callable[[], BinaryIO]:
        return lambda: client.open_blob(desc.digest, "layer blob", desc.size)

    return resolve_image(display, top, media_type, platform=platform,
                         fetch_manifest=fetch_manifest, fetch_config=fetch_config, layer_opener=layer_opener)
