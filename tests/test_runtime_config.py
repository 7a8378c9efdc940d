"""Image config -> OCI runtime config: the rules docker users expect."""

from __future__ import annotations

import os

import pytest

from imagefs.runtime_config import ConfigError, RunSpec, command_line, merge_env, resolve_user, runtime_config

BASE = {
    "process": {"terminal": True, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": [], "cwd": "/"},
    "root": {"path": "rootfs", "readonly": True},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]},
}


@pytest.fixture
def rootfs(tmp_path):  # type: ignore[no-untyped-def]
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\napp:x:1001:\nvideo:x:44:app,other\n")
    return str(tmp_path)


def test_cmd_and_entrypoint_rules() -> None:
    cfg = {"Entrypoint": ["/init"], "Cmd": ["serve", "--port", "80"]}
    assert command_line(cfg, RunSpec()) == ["/init", "serve", "--port", "80"]
    assert command_line(cfg, RunSpec(command=["shell"])) == ["/init", "shell"]
    assert command_line(cfg, RunSpec(entrypoint=["/bin/sh"])) == ["/bin/sh"]
    assert command_line(cfg, RunSpec(entrypoint=["/bin/sh"], command=["-c", "x"])) == ["/bin/sh", "-c", "x"]
    with pytest.raises(ConfigError, match="no command"):
        command_line({}, RunSpec())


def test_env_overrides_by_name_and_defaults_path(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert merge_env(["A=1", "B=2"], ["B=3", "C=x=y"]) == ["A=1", "B=3", "C=x=y", "PATH=" + "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert merge_env(["PATH=/only"], []) == ["PATH=/only"]
    monkeypatch.setenv("FROM_HOST", "yes")
    assert "FROM_HOST=yes" in merge_env([], ["FROM_HOST"])
    with pytest.raises(ConfigError, match="invalid environment variable"):
        merge_env([], ["=nokey"])


def test_users_resolve_through_the_images_own_databases(rootfs: str) -> None:
    assert resolve_user(None, rootfs) == (0, 0, [])
    assert resolve_user("app", rootfs) == (1000, 1001, [44])
    assert resolve_user("1000", rootfs) == (1000, 1001, [44])
    assert resolve_user("app:video", rootfs) == (1000, 44, [])
    assert resolve_user("4242:4243", rootfs) == (4242, 4243, [])
    with pytest.raises(ConfigError, match="user 'ghost' not found"):
        resolve_user("ghost", rootfs)
    with pytest.raises(ConfigError, match="group 'nogroup' not found"):
        resolve_user("app:nogroup", rootfs)


def test_runtime_config_applies_the_image(rootfs: str) -> None:
    image = {"Env": ["A=1"], "Cmd": ["/bin/sh"], "WorkingDir": "/srv", "User": "app"}
    cfg = runtime_config(BASE, image, RunSpec(env=["B=2"]), "/merged", rootfs)
    p = cfg["process"]
    assert p["args"] == ["/bin/sh"] and p["cwd"] == "/srv" and p["terminal"] is False
    assert p["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [44]}
    assert "A=1" in p["env"] and "B=2" in p["env"]
    assert cfg["root"] == {"path": "/merged", "readonly": False}
    assert {"type": "network"} not in cfg["linux"]["namespaces"]  # host network by default
    assert BASE["root"]["readonly"] is True  # the base spec is not modified
    private = runtime_config(BASE, image, RunSpec(network="none", workdir="/tmp"), "/m", rootfs)
    assert {"type": "network"} in private["linux"]["namespaces"] and private["process"]["cwd"] == "/tmp"
    with pytest.raises(ConfigError, match="must be absolute"):
        runtime_config(BASE, image, RunSpec(workdir="rel"), "/m", rootfs)
    assert os.path.isdir(rootfs)
