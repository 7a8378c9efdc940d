"""The docker:// transport against a real docker-registry on loopback, plus tiny
servers for token auth, redirects, errors and non-loopback plain HTTP."""

from __future__ import annotations

import base64
import http.server
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator

import pytest

from indexer.sources import SourceError, open_source
from indexer.sources.registry import RegistryClient, open_registry, parse_reference
from tests.support.images import LAYER_MEDIA_TYPES, make_tar, sha256, write_oci_layout
from tests.support.netns import veth_pair
from tests.support.registry import (  # the registry fixtures are registered in conftest.py
    BASIC_PASSWORD, BASIC_USER, Registry, SilentServer, TinyServer, bearer_proxy, forward,
    free_port, reply, status_server,
)

_rng = random.Random(99)
TAR1 = make_tar({"usr/": None, "usr/lib/big": _rng.randbytes(1_500_000), "usr/lib/text": b"layer one " * 100_000})
TAR2 = make_tar({"etc/os-release": b"ID=test\n"})
LAYERS = [TAR1, TAR2]
CONFIG = {"Env": ["A=1"], "Entrypoint": ["/bin/true"]}
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.fixture(autouse=True)
def no_host_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials come only from files a test writes, never from this machine's."""
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


@pytest.fixture(scope="module")
def images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Images pushed once per module; repo name -> local manifest digest."""
    root = tmp_path_factory.mktemp("registry-images")
    out = {}
    for comp in ("gzip", "zstd"):
        out[comp] = write_oci_layout(str(root / comp), LAYERS, CONFIG, compression=comp, tag="v1")
        registry.push(str(root / comp), "v1", f"test/{comp}")
    out["none"] = write_oci_layout(str(root / "none"), LAYERS, CONFIG, compression="none", tag="v1")
    registry.upload(str(root / "none"), out["none"], "test/none", "v1")
    write_oci_layout(str(root / "docker"), LAYERS, CONFIG, compression="gzip", tag="v1")
    registry.push(str(root / "docker"), "v1", "test/docker", fmt="v2s2")
    out["multi"] = write_oci_layout(str(root / "multi"), LAYERS, CONFIG, compression="gzip", tag="v1",
                                    extra_platforms=[("linux", "arm64", "v8"), ("linux", "ppc64le")])
    registry.push(str(root / "multi"), "v1", "test/multi", extra=("--all",))
    registry.push(str(root / "multi"), "v1", "test/multi-docker", extra=("--all",), fmt="v2s2")  # a manifest list
    return out


def read_all(src: Any) -> list[bytes]:
    out = []
    for layer in src.layers:
        with layer.open() as f:
            out.append(f.read())
    return out


def write_auth(path: Path, host: str, user: str, password: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))


# -- pulls ------------------------------------------------------------------------------


@pytest.mark.parametrize("comp", ["gzip", "zstd", "none"])
def test_pull_by_tag_yields_original_tars(registry: Registry, images: dict[str, str], comp: str) -> None:
    src = open_source(f"docker://{registry.host}/test/{comp}:v1")
    assert src.reference == f"docker://{registry.host}/test/{comp}:v1"
    assert src.manifest_digest == images[comp]
    assert [lb.media_type for lb in src.layers] == [LAYER_MEDIA_TYPES[comp]] * 2
    assert src.config["config"] == CONFIG
    assert read_all(src) == LAYERS


def test_pull_by_digest(registry: Registry, images: dict[str, str]) -> None:
    digest = images["zstd"]
    src = open_source(f"docker://{registry.host}/test/zstd@{digest}")
    assert src.manifest_digest == digest
    assert read_all(src) == LAYERS


def test_docker_schema2_manifest(registry: Registry, images: dict[str, str]) -> None:
    src = open_source(f"docker://{registry.host}/test/docker:v1")
    assert [lb.media_type for lb in src.layers] == [DOCKER_GZIP] * 2
    assert src.config["config"] == CONFIG
    assert read_all(src) == LAYERS


@pytest.mark.parametrize("repo", ["test/multi", "test/multi-docker"])
def test_platform_selection_from_a_pushed_index(registry: Registry, images: dict[str, str], repo: str) -> None:
    ref = f"docker://{registry.host}/{repo}:v1"
    if repo == "test/multi":
        assert open_source(ref).manifest_digest == images["multi"]
    else:
        client = RegistryClient(parse_reference(f"{registry.host}/{repo}:v1"), ref)
        assert client.manifest("v1")[1] == "application/vnd.docker.distribution.manifest.list.v2+json"
        assert [lb.media_type for lb in open_source(ref).layers] == [DOCKER_GZIP] * 2
    arm = open_source(ref, platform="linux/arm64/v8")
    assert arm.config["architecture"] == "arm64"
    assert read_all(arm) == LAYERS
    with pytest.raises(SourceError) as e:
        open_source(ref, platform="linux/riscv64")
    assert str(e.value).startswith(f"{ref}: index sha256:")
    assert "no image for platform linux/riscv64 (available: linux/amd64, linux/arm64/v8, linux/ppc64le)" in str(e.value)


def test_reference_parsing() -> None:
    r = parse_reference("127.0.0.1:5000/a/b")
    assert (r.host, r.repo, r.tag, r.digest, r.reference) == ("127.0.0.1:5000", "a/b", "latest", None, "latest")
    r = parse_reference("[::1]:5000/a:v2")
    assert (r.host, r.repo, r.tag) == ("[::1]:5000", "a", "v2")
    r = parse_reference("busybox")
    assert (r.host, r.api_host, r.repo) == ("docker.io", "registry-1.docker.io", "library/busybox")
    d = "sha256:" + "a" * 64
    assert parse_reference(f"localhost/x@{d}").reference == d
    with pytest.raises(SourceError, match=r"docker://host.io/UPPER: invalid repository name 'UPPER'"):
        parse_reference("host.io/UPPER")
    with pytest.raises(SourceError, match=r"docker://host.io/x@sha256:12: invalid digest 'sha256:12'"):
        parse_reference("host.io/x@sha256:12")


# -- auth -------------------------------------------------------------------------------


def test_bearer_token_flow_anonymous(registry: Registry, images: dict[str, str]) -> None:
    with bearer_proxy(registry.host) as front:
        src = open_source(f"docker://{front.host}/test/gzip:v1")
        assert read_all(src) == LAYERS
    token_requests = [r for r in front.requests if r.path.startswith("/token")]
    assert len(token_requests) == 1  # the token is reused for every later request
    assert "scope=repository%3Atest%2Fgzip%3Apull" in token_requests[0].path and "service=tiny" in token_requests[0].path
    api = [r for r in front.requests if r.path.startswith("/v2/")]
    assert api[0].headers.get("authorization") is None
    assert all(r.headers.get("authorization") == "Bearer tok-123" for r in api[1:])


def test_bearer_token_flow_with_credentials(registry: Registry, images: dict[str, str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with bearer_proxy(registry.host, creds=("alice", "pw")) as front:
        ref = f"docker://{front.host}/test/zstd:v1"
        with pytest.raises(SourceError) as e:
            open_source(ref)
        assert str(e.value).startswith(f"{ref}: authentication required (HTTP 401) and no credentials for {front.host}")
        auth_file = tmp_path / "auth.json"  # skopeo's REGISTRY_AUTH_FILE
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
        write_auth(auth_file, front.host, "alice", "pw")
        assert read_all(open_source(ref)) == LAYERS
        write_auth(auth_file, front.host, "alice", "wrong")
        with pytest.raises(SourceError) as e:
            open_source(ref)
        assert str(e.value).startswith(f"{ref}: authentication denied (HTTP 401) with the credentials for {front.host} from {auth_file}")


def test_basic_auth_against_htpasswd_registry(basic_registry: Registry, tmp_path: Path) -> None:
    layout = tmp_path / "img"
    digest = write_oci_layout(str(layout), LAYERS, CONFIG, compression="gzip", tag="v1")
    basic_registry.push(str(layout), "v1", "private/img")
    ref = f"docker://{basic_registry.host}/private/img:v1"
    with pytest.raises(SourceError) as e:
        open_source(ref)
    assert str(e.value).startswith(f"{ref}: authentication required (HTTP 401) and no credentials for {basic_registry.host}")
    docker_config = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    write_auth(docker_config, basic_registry.host, BASIC_USER, BASIC_PASSWORD)
    src = open_source(ref)
    assert src.manifest_digest == digest
    assert read_all(src) == LAYERS
    write_auth(docker_config, f"http://{basic_registry.host}", BASIC_USER, "not-the-password")
    with pytest.raises(SourceError) as e:
        open_source(ref)
    assert f"{ref}: authentication denied (HTTP 401) with the credentials for {basic_registry.host} from {docker_config}" in str(e.value)


def test_cross_host_redirect_drops_authorization(registry: Registry, images: dict[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    want = "Basic " + base64.b64encode(b"bob:pw").decode()
    with TinyServer(lambda srv, h: forward(h, registry.host)) as storage:
        storage_port = storage.host.rsplit(":", 1)[1]

        def front_handler(srv: TinyServer, h: http.server.BaseHTTPRequestHandler) -> None:
            if h.headers.get("Authorization") != want:
                reply(h, 401, b"", {"WWW-Authenticate": 'Basic realm="front"'})
            elif "/blobs/" in h.path:  # blobs live elsewhere, as with pre-signed URLs
                reply(h, 307, b"", {"Location": f"http://localhost:{storage_port}{h.path}"})
            else:
                forward(h, registry.host)

        with TinyServer(front_handler) as front:
            write_auth(Path(os.environ["DOCKER_CONFIG"]) / "config.json", front.host, "bob", "pw")
            src = open_source(f"docker://{front.host}/test/gzip:v1")
            assert read_all(src) == LAYERS
    assert len(storage.requests) == 3  # config + 2 layers
    assert all("authorization" not in r.headers for r in storage.requests)


# -- errors -----------------------------------------------------------------------------


def test_manifest_and_blob_not_found(registry: Registry, images: dict[str, str], tmp_path: Path) -> None:
    ref = f"docker://{registry.host}/test/gzip:nope"
    with pytest.raises(SourceError) as e:
        open_source(ref)
    assert str(e.value).startswith(f"{ref}: manifest unknown (HTTP 404")
    ref = f"docker://{registry.host}/no/such/repo"
    with pytest.raises(SourceError, match=r"docker://\S+/no/such/repo: manifest unknown \(HTTP 404"):
        open_source(ref)

    # a layer whose data vanished from the registry's storage
    unique = make_tar({"only-here": os.urandom(1000)})
    layout = tmp_path / "lost"
    write_oci_layout(str(layout), [unique], compression="gzip", tag="v1")
    registry.push(str(layout), "v1", "test/lost")
    src = open_source(f"docker://{registry.host}/test/lost:v1")
    layer = src.layers[0]
    data_dir = Path(registry.root) / "data"
    hexd = layer.digest.split(":")[1]
    (data_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data").unlink()
    with pytest.raises(SourceError) as e:
        layer.open()
    assert str(e.value).startswith(f"docker://{registry.host}/test/lost:v1: layer blob {layer.digest} not found (HTTP 404")


def test_server_error_names_status_and_body() -> None:
    with status_server(500, b"storage backend exploded\n" * 3) as srv:
        ref = f"docker://{srv.host}/app:1"
        with pytest.raises(SourceError) as e:
            open_source(ref)
    msg = str(e.value)
    assert msg.startswith(f"{ref}: registry answered HTTP 500 Internal Server Error for manifest 1: storage backend exploded")


def test_manifest_that_does_not_match_its_digest() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}).encode()
    asked = "sha256:" + "4" * 64
    with TinyServer(lambda srv, h: reply(h, 200, body, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})) as srv:
        with pytest.raises(SourceError) as e:
            open_source(f"docker://{srv.host}/app@{asked}")
        assert str(e.value) == f"docker://{srv.host}/app@{asked}: manifest digest mismatch: asked for {asked}, got {sha256(body)}"
    lying = {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Docker-Content-Digest": asked}
    with TinyServer(lambda srv, h: reply(h, 200, body, lying)) as srv:
        with pytest.raises(SourceError, match=rf"manifest digest mismatch: registry says {asked}, content is {sha256(body)}"):
            open_source(f"docker://{srv.host}/app:v1")
    with TinyServer(lambda srv, h: reply(h, 200, b"<html>login page</html>", {"Content-Type": "text/html"})) as srv:
        with pytest.raises(SourceError, match=rf"docker://{srv.host}/app:v1: manifest sha256:\S+ is not JSON"):
            open_source(f"docker://{srv.host}/app:v1")


def test_a_layer_whose_length_differs_from_its_descriptor_is_refused_before_its_body() -> None:
    layer = b"x" * 50
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_MEDIA_TYPES["none"], "digest": sha256(layer), "size": 100}],
    }).encode()

    def handler(srv: Any, h: http.server.BaseHTTPRequestHandler) -> None:
        if "/manifests/" in h.path:
            reply(h, 200, manifest, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        elif h.path.endswith(sha256(config)):
            reply(h, 200, config)
        else:
            reply(h, 200, layer)

    with TinyServer(handler) as srv:
        src = open_source(f"docker://{srv.host}/app:1")
        with pytest.raises(SourceError) as e:
            src.layers[0].open()
    assert str(e.value) == (f"docker://{srv.host}/app:1: layer blob {sha256(layer)}: size mismatch: the manifest "
                            "says 100 bytes, the registry sends 50")


def test_connection_refused_and_timeout() -> None:
    port = free_port()
    with pytest.raises(SourceError) as e:
        open_source(f"docker://127.0.0.1:{port}/app:1")
    assert str(e.value) == f"docker://127.0.0.1:{port}/app:1: cannot connect to 127.0.0.1:{port}: connection refused"
    with SilentServer() as silent:
        with pytest.raises(SourceError) as e:
            open_registry(f"{silent.host}/app:1", timeout=0.3)
        assert str(e.value) == f"docker://{silent.host}/app:1: {silent.host} did not answer within 0.3 s (timed out)"


@pytest.fixture(scope="module")
def outside_address() -> Iterator[str]:
    """A non-loopback address of our own: the host end of a veth pair to a test namespace."""
    with veth_pair() as (host_addr, _ns_addr):
        yield host_addr


def test_plain_http_token_realm_off_loopback_needs_insecure(registry: Registry, images: dict[str, str],
                                                            outside_address: str) -> None:
    with bearer_proxy(registry.host, bind=outside_address) as tokens:
        with bearer_proxy(registry.host, realm_host=tokens.host) as front:
            ref = f"docker://{front.host}/test/gzip:v1"
            with pytest.raises(SourceError) as e:
                open_source(ref)
            assert str(e.value).startswith(f"{ref}: refusing plain HTTP to {tokens.host}")
            assert tokens.requests == []  # refused before connecting
            assert read_all(open_source(ref, insecure=True)) == LAYERS
            assert [r.path.split("?")[0] for r in tokens.requests] == ["/token"]


def test_registry_off_loopback_uses_tls_unless_insecure(registry: Registry, images: dict[str, str],
                                                        outside_address: str) -> None:
    with TinyServer(lambda srv, h: forward(h, registry.host), bind=outside_address) as plain:
        ref = f"docker://{plain.host}/test/zstd:v1"
        with pytest.raises(SourceError) as e:
            open_source(ref)
        assert str(e.value).startswith(f"{ref}: TLS with {plain.host} failed")
        assert "needs the insecure option" in str(e.value)
        assert plain.requests == []  # not one plain-HTTP request
        assert read_all(open_source(ref, insecure=True)) == LAYERS
        assert plain.requests

