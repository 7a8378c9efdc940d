"""The parts of ``imagefs run`` that need no container: signals during setup, the seccomp
profile's rules, docker's volume and env-file syntax, capability arithmetic."""

from __future__ import annotations

import os
import signal

import pytest

from imagefs.cli import CLIError
from imagefs.cli_run import read_env_file
from imagefs.container_process import Interrupted, SignalGuard
from imagefs.container_security import DEFAULT_CAPABILITIES, capabilities
from imagefs.run_mounts import parse_mount, parse_tmpfs, parse_volume
from imagefs.run_spec import ConfigError, RunSpec
from imagefs.seccomp_profile import CLONE_NAMESPACE_FLAGS, default_seccomp, to_oci


def test_a_signal_during_setup_unwinds_it_but_not_inside_a_deferred_step() -> None:
    with SignalGuard() as guard:
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGHUP)
            signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a point where Python runs handlers
        assert info.value.status == 128 + signal.SIGHUP
    steps = []
    with SignalGuard() as guard:
        with pytest.raises(Interrupted):
            with guard.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("the step went on")  # not cut in half
        assert steps == ["the step went on"]
    with SignalGuard() as guard:
        guard.finished()
        os.kill(os.getpid(), signal.SIGINT)  # during the clean-up: held off
        guard.check()
        assert guard.received == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def _names(profile: dict) -> set[str]:  # type: ignore[type-arg]
    return {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule
            for n in rule["names"]}


def test_default_seccomp_follows_capabilities_and_architecture() -> None:
    caps = set(DEFAULT_CAPABILITIES)
    x86 = default_seccomp(caps, machine="x86_64", release="6.1.0")
    assert x86["defaultAction"] == "SCMP_ACT_ERRNO" and x86["defaultErrnoRet"] == 1
    assert x86["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    allowed = _names(x86)
    assert {"read", "openat", "chroot", "arch_prctl", "ptrace"} <= allowed  # chroot: CAP_SYS_CHROOT is a default
    assert not {"mount", "unshare", "reboot", "bpf", "clone", "set_tls"} & allowed
    clone = [r for r in x86["syscalls"] if r["names"] == ["clone"]]
    assert clone == [{"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "op": "SCMP_CMP_MASKED_EQ"}]}]
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in x86["syscalls"]
    admin = default_seccomp(caps | {"CAP_SYS_ADMIN"}, machine="aarch64", release="6.1.0")
    assert {"mount", "unshare", "clone", "clone3", "set_tls"} <= _names(admin)
    assert "arch_prctl" not in _names(admin) and admin["architectures"][0] == "SCMP_ARCH_AARCH64"
    old = default_seccomp(caps, machine="x86_64", release="4.4.0")
    assert "ptrace" not in _names(old)  # minKernel 4.8


def test_a_user_profile_in_dockers_format() -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"name": "mkdir", "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        {"names": ["reboot"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_BOOT"]}}]}
    out = to_oci(profile, {"CAP_CHOWN"})
    assert out == {"defaultAction": "SCMP_ACT_ALLOW",
                   "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}
    with pytest.raises(ValueError, match="no defaultAction"):
        to_oci({"syscalls": []}, set())


def test_capability_arithmetic_is_dockers() -> None:
    assert capabilities(RunSpec()) == DEFAULT_CAPABILITIES
    assert capabilities(RunSpec(cap_drop=["ALL"], cap_add=["net_raw", "CAP_CHOWN"])) == ["CAP_NET_RAW", "CAP_CHOWN"]
    assert "CAP_CHOWN" in capabilities(RunSpec(cap_drop=["chown"], cap_add=["CHOWN"]))  # an add wins
    assert "CAP_KILL" not in capabilities(RunSpec(cap_drop=["KILL,MKNOD"]))
    with pytest.raises(ConfigError, match="no such capability"):
        capabilities(RunSpec(cap_add=["FLY"]))


def test_volume_syntax(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = parse_volume(f"{tmp_path}:/data:ro,z")
    assert (m.destination, m.type, m.source, m.options) == ("/data", "bind", str(tmp_path), ("rbind", "ro", "rprivate"))
    assert parse_mount(f"type=bind,src={tmp_path},dst=/d,readonly").options[1] == "ro"
    assert parse_mount("type=tmpfs,target=/t,tmpfs-size=64m,tmpfs-mode=1777").options == \
        ("nosuid", "nodev", "rw", "size=64m", "mode=1777")
    assert parse_tmpfs("/run:exec,size=1m").options == ("nosuid", "nodev", "exec", "size=1m")
    for bad, message in [("rel/path:/d", "must be absolute"), (f"{tmp_path}:relative", "must be absolute"),
                         (f"{tmp_path}:/", "cannot mount over"), (f"{tmp_path}:/d:rx", "unknown option"),
                         ("/x", "anonymous volumes")]:
        with pytest.raises(ConfigError, match=message):
            parse_volume(bad)
    with pytest.raises(ConfigError, match="unknown or unsupported field 'bogus'"):
        parse_mount(f"type=bind,source={tmp_path},target=/d,bogus=1")


def test_env_file_syntax(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "env"
    path.write_text("  # comment\nA=1\n\n  B= spaced value \nC\nD=x=y\n")
    assert read_env_file(str(path)) == ["A=1", "B= spaced value ", "C", "D=x=y"]
    path.write_text("BAD NAME=1\n")
    with pytest.raises(CLIError, match="line 1"):
        read_env_file(str(path))
    with pytest.raises(CLIError, match="No such file"):
        read_env_file(str(tmp_path / "missing"))
