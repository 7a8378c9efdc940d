"""Registry credentials, found where skopeo, podman and docker keep them.

In order, the first that has credentials for the registry wins:

1. ``--creds USER[:PASSWORD]`` (skopeo's flag; without a password, it is asked for on
   the terminal);
2. ``--authfile FILE``, which replaces the default files (skopeo and podman);
3. the default files: ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
   then ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``.

In a file, as docker reads one: a ``credHelpers`` entry for the registry names the
helper that holds its credentials; else ``credsStore`` names the helper for every
registry (an entry it does not have falls back to the file); else the ``auths`` entry
that names the registry (or the repository, most specific first), with ``auth``
(base64 of ``user:password``) or ``username``/``password``. A helper is the program
``docker-credential-NAME``, run as ``docker-credential-NAME get`` with the registry on
its stdin; it answers JSON ``{"Username": ..., "Secret": ...}`` (docker's
credential-helper protocol), within :data:`HELPER_TIMEOUT` seconds. Identity tokens
(a helper's ``<token>`` user, for OAuth2 refresh) are not supported, and say so.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from indexer.sources import SourceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"  # the key docker and its helpers use for Docker Hub
HELPER_TIMEOUT = 30.0
_NOT_FOUND = re.compile(r"credentials not found", re.IGNORECASE)


@dataclass(frozen=True)
class AuthOptions:
    """Where the user said credentials are: ``--creds`` and ``--authfile``."""

    creds: str | None = None
    authfile: str | None = None


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str
    origin: str  # where they came from, for messages ("--creds", a file, a helper)


@dataclass(frozen=True)
class Registry:
    """The registry credentials are for: the host as the user wrote it, the host its API
    lives on (they differ for Docker Hub), and the repository."""

    host: str
    api_host: str
    repo: str


def default_auth_files() -> list[str]:
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    docker_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    files.append(os.path.join(docker_dir, "config.json"))
    return files


def auth_files(options: AuthOptions | None) -> list[str]:
    """The files searched, in order."""
    return [options.authfile] if options and options.authfile else default_auth_files()


def parse_creds(value: str) -> Credentials:
    """``USER[:PASSWORD]``; a missing password is asked for on the terminal."""
    user, sep, password = value.partition(":")
    if not user:
        raise SourceError("--creds: no user name (USER[:PASSWORD])")
    if not sep:
        if not sys.stdin.isatty():
            raise SourceError("--creds: no password (give USER:PASSWORD, or run on a terminal to be asked)")
        password = getpass.getpass(f"Password for {user}: ")
    return Credentials(user, password, "--creds")


def _key_matches(key: str, reg: Registry) -> int:
    """How specifically an ``auths`` key names this registry/repo (0: not at all)."""
    key = re.sub(r"^[a-z]+://", "", key).rstrip("/")
    host, _, path = key.partition("/")
    hosts = {reg.host, reg.api_host}
    if reg.host == DOCKER_HUB:
        hosts |= {"index.docker.io"}
        if path == "v1":
            path = ""
    if host not in hosts:
        return 0
    if not path:
        return 1
    if reg.repo == path or reg.repo.startswith(path + "/"):
        return 1 + len(path)
    return 0


def _helper_server(reg: Registry) -> str:
    return DOCKER_HUB_SERVER if reg.host == DOCKER_HUB else reg.host


def run_helper(name: str, reg: Registry, origin: str) -> Credentials | None:
    """Ask ``docker-credential-NAME`` for the registry's credentials; None if it has none."""
    program = f"docker-credential-{name}"
    what = f"credential helper {program} (named by {origin})"
    path = shutil.which(program)
    if path is None:
        raise SourceError(f"{what} is not in $PATH")
    try:
        res = subprocess.run([path, "get"], input=_helper_server(reg).encode(), capture_output=True,
                             timeout=HELPER_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SourceError(f"{what} did not answer within {HELPER_TIMEOUT:g} s") from None
    except OSError as e:
        raise SourceError(f"{what} could not be run: {e.strerror}") from None
    out = res.stdout.decode(errors="replace").strip()
    if res.returncode:
        if _NOT_FOUND.search(out) or _NOT_FOUND.search(res.stderr.decode(errors="replace")):
            return None
        err = (res.stderr.decode(errors="replace").strip() or out)[:200]
        raise SourceError(f"{what} failed (exit {res.returncode}): {err}")
    try:
        doc = json.loads(out)
        user, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"{what} answered something other than JSON with Username and Secret") from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise SourceError(f"{what}: Username and Secret must be strings")
    if user == "<token>":
        raise SourceError(f"{what} holds an identity token for {reg.host}; imagefs supports user and password only")
    return Credentials(user, secret, program)


def _from_file(path: str, reg: Registry) -> Credentials | None:
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read registry credentials from {path}: {e}") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{path}: not a JSON object")
    helpers = doc.get("credHelpers") or {}
    if not isinstance(helpers, dict):
        raise SourceError(f"{path}: credHelpers is not a JSON object")
    for key in (reg.host, reg.api_host, *(("index.docker.io", DOCKER_HUB_SERVER) if reg.host == DOCKER_HUB else ())):
        if isinstance(helpers.get(key), str) and helpers[key]:
            return run_helper(helpers[key], reg, f"{path} credHelpers[{key!r}]")
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        found = run_helper(store, reg, f"{path} credsStore")
        if found is not None:
            return found
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return None
    best = max(auths, key=lambda k: _key_matches(k, reg), default=None)
    if best is None or not _key_matches(best, reg):
        return None
    entry = auths[best]
    if not isinstance(entry, dict):
        raise SourceError(f"{path}: auths entry {best!r} is not a JSON object")
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, TypeError) as e:
            raise SourceError(f"{path}: auths entry {best!r}: 'auth' is not base64 of user:password ({e})") from None
        if not sep:
            raise SourceError(f"{path}: auths entry {best!r}: 'auth' does not decode to user:password")
        return Credentials(user, password, path)
    if entry.get("username") and isinstance(entry.get("password"), str):
        return Credentials(str(entry["username"]), entry["password"], path)
    return None


def find_credentials(reg: Registry, options: AuthOptions | None = None) -> Credentials | None:
    """The credentials for ``reg`` (see the module docstring); None if there are none."""
    if options and options.creds is not None:
        return parse_creds(options.creds)
    if options and options.authfile and not os.path.exists(options.authfile):
        raise SourceError(f"--authfile {options.authfile}: no such file")
    for path in auth_files(options):
        if not os.path.exists(path):
            continue
        found = _from_file(path, reg)
        if found is not None:
            return found
    return None
