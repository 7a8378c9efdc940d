"""Registry credentials as skopeo, podman and docker users give them, against a real
docker-registry with basic auth: ``imagefs index --creds``, ``--authfile``, and
docker's credential helpers (``credsStore``, ``credHelpers``) through a real
``docker-credential-*`` program."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.sources import SourceError
from indexer.sources.credentials import AuthOptions, Registry, find_credentials
from tests.support.images import make_tar, write_oci_layout
from tests.support.registry import BASIC_PASSWORD, BASIC_USER, Registry as RunningRegistry

LAYERS = [make_tar({"etc/": None, "etc/secret-app": b"private image\n"})]


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment with no credentials of this machine's, and a bin dir first on $PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR")}
    env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "bin").mkdir()
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    return env


@pytest.fixture(scope="module")
def private_image(basic_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("private") / "img"
    write_oci_layout(str(layout), LAYERS, {"Cmd": ["true"]}, compression="gzip", tag="v1")
    basic_registry.push(str(layout), "v1", "private/img")
    return f"docker://{basic_registry.host}/private/img:v1"


def index(ref: str, store: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imagefs", "-q", "index", ref, "--store", str(store), "--name", "p:1", *args],
                          capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


def write_helper(bin_dir: Path, name: str, host: str, user: str, secret: str) -> Path:
    """A docker-credential-NAME that knows one server, and logs what it is asked."""
    log = bin_dir / f"{name}.log"
    helper = bin_dir / f"docker-credential-{name}"
    helper.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
read -r server
echo "$server" >> {log}
if [ "$server" = "{host}" ]; then
  printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}\\n' "$server"
else
  echo "credentials not found in native keychain"; exit 1
fi
""")
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    return log


def auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_without_credentials_the_error_says_how_to_give_them(private_image: str, tmp_path: Path, clean_env) -> None:  # type: ignore[no-untyped-def]
    res = index(private_image, tmp_path / "store", clean_env)
    assert res.returncode == 1
    assert "authentication required (HTTP 401)" in res.stderr and "--creds USER:PASSWORD" in res.stderr
    assert "Traceback" not in res.stderr


def test_creds_flag(private_image: str, tmp_path: Path, clean_env) -> None:  # type: ignore[no-untyped-def]
    res = index(private_image, tmp_path / "store", clean_env, "--creds", f"{BASIC_USER}:{BASIC_PASSWORD}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("blake3:")
    res = index(private_image, tmp_path / "store", clean_env, "--creds", f"{BASIC_USER}:wrong")
    assert res.returncode == 1 and "authentication denied (HTTP 401)" in res.stderr and "from --creds" in res.stderr
    res = index(private_image, tmp_path / "store", clean_env, "--creds", BASIC_USER)  # no terminal to ask on
    assert res.returncode == 1 and "--creds: no password" in res.stderr


def test_authfile_replaces_the_default_files(private_image: str, basic_registry: RunningRegistry, tmp_path: Path, clean_env) -> None:  # type: ignore[no-untyped-def]
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {basic_registry.host: auth_entry(BASIC_USER, BASIC_PASSWORD)}}))
    res = index(private_image, tmp_path / "store", clean_env, "--authfile", str(authfile))
    assert res.returncode == 0, res.stderr
    # Good credentials in the default docker config do not help when --authfile names another file.
    docker_config = Path(clean_env["DOCKER_CONFIG"])
    docker_config.mkdir()
    (docker_config / "config.json").write_text(json.dumps({"auths": {basic_registry.host: auth_entry(BASIC_USER, BASIC_PASSWORD)}}))
    authfile.write_text(json.dumps({"auths": {basic_registry.host: auth_entry(BASIC_USER, "stale")}}))
    res = index(private_image, tmp_path / "store", clean_env, "--authfile", str(authfile))
    assert res.returncode == 1 and f"from {authfile}" in res.stderr
    res = index(private_image, tmp_path / "store", clean_env, "--authfile", str(tmp_path / "missing.json"))
    assert res.returncode == 1 and "no such file" in res.stderr


@pytest.mark.parametrize("how", ["credsStore", "credHelpers"])
def test_docker_credential_helpers(private_image: str, basic_registry: RunningRegistry, tmp_path: Path, clean_env,  # type: ignore[no-untyped-def]
                                   how: str) -> None:
    log = write_helper(tmp_path / "bin", "fake", basic_registry.host, BASIC_USER, BASIC_PASSWORD)
    docker_config = Path(clean_env["DOCKER_CONFIG"])
    docker_config.mkdir()
    doc = {"credsStore": "fake"} if how == "credsStore" else {"credHelpers": {basic_registry.host: "fake"}}
    (docker_config / "config.json").write_text(json.dumps({**doc, "auths": {basic_registry.host: {}}}))
    res = index(private_image, tmp_path / "store", clean_env)
    assert res.returncode == 0, res.stderr
    assert log.read_text().split() == [basic_registry.host]  # asked once, for this registry


def test_a_helper_without_the_entry_falls_back_to_auths_and_a_missing_helper_is_named(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    reg = Registry("reg.example:5000", "reg.example:5000", "team/app")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_helper(bin_dir, "other", "elsewhere.example", "u", "p")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credsStore": "other", "auths": {"reg.example:5000/team": auth_entry("team", "pw")}}))
    found = find_credentials(reg, AuthOptions(authfile=str(config)))
    assert found is not None and (found.user, found.password, found.origin) == ("team", "pw", str(config))
    config.write_text(json.dumps({"credHelpers": {"reg.example:5000": "absent"}}))
    with pytest.raises(SourceError, match="docker-credential-absent .* is not in \\$PATH"):
        find_credentials(reg, AuthOptions(authfile=str(config)))
    hub = Registry("docker.io", "registry-1.docker.io", "library/debian")
    log = write_helper(bin_dir, "hub", "https://index.docker.io/v1/", "hubuser", "hubpw")
    config.write_text(json.dumps({"credsStore": "hub"}))
    found = find_credentials(hub, AuthOptions(authfile=str(config)))
    assert found is not None and found.user == "hubuser" and found.origin == "docker-credential-hub"
    assert log.read_text().split() == ["https://index.docker.io/v1/"]  # docker's key for Docker Hub
