"""``imagefs run`` as a docker user expects it (issue 15), against real runc containers.

The container's defaults (capabilities, no_new_privs, seccomp, masked /proc paths,
its own /etc/hosts, resolv.conf and hostname), docker's flags and exit statuses, and
signals: every terminating signal is forwarded and answered with a full clean-up, and
what a SIGKILL of ``imagefs run`` leaves is removed by the next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Iterator

import pytest

from cache.localstore import LocalStore
from indexer.build import build_image
from tests.support.containers import RunHost, busybox_entries, can_run_containers, static_euid_program
from tests.support.images import write_oci_layout
from tests.support.tars import directory, file, make_tar

pytestmark = pytest.mark.skipif(not can_run_containers(), reason="needs root and Debian's busybox-static")

CONFIG = {"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo default"], "User": "root"}
DEFAULT_CAPS_MASK = 0x00000000A80425FB  # Docker's 14 default capabilities as /proc/self/status shows them
ALL_CAPS_MASK = next(int(line.split()[1], 16) for line in open("/proc/self/status") if line.startswith("CapBnd:"))


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunHost]:
    root = tmp_path_factory.mktemp("docker")
    layer = make_tar([
        *busybox_entries(),
        file("bin/euid", static_euid_program(str(root)), mode=0o4755),  # setuid root
        file("etc/not-executable", b"#!/bin/sh\necho hi\n", mode=0o644),
        directory("srv"),
    ])
    write_oci_layout(str(root / "layout"), [layer], CONFIG)
    store = str(root / "store")
    build_image(f"oci:{root / 'layout'}:latest", LocalStore(store), "bb:1")
    yield RunHost(store, str(root))


def status_field(text: bytes, name: str) -> str:
    for line in text.decode().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in {text!r}")


def run_ok(host: RunHost, *args: str, **kw: object) -> bytes:
    res = host.run(*args, **kw)  # type: ignore[arg-type]
    assert res.returncode == 0, res.stderr
    return res.stdout


# -- the container's defaults --------------------------------------------------------------


def test_root_has_dockers_capabilities_and_a_user_has_none(host: RunHost) -> None:
    out = run_ok(host, "bb:1", "--", "cat /proc/self/status; touch /tmp/f; chown 1000:1000 /tmp/f && echo chowned")
    assert int(status_field(out, "CapEff"), 16) == DEFAULT_CAPS_MASK
    assert int(status_field(out, "CapBnd"), 16) == DEFAULT_CAPS_MASK
    assert status_field(out, "NoNewPrivs") == "0"  # setuid programs work, as under docker
    assert status_field(out, "Seccomp") == "2"  # filtered
    assert b"chowned" in out
    out = run_ok(host, "-u", "app", "bb:1", "--", "cat /proc/self/status")
    assert int(status_field(out, "CapEff"), 16) == 0 and int(status_field(out, "CapPrm"), 16) == 0
    assert host.leftovers() == []


def test_su_and_setuid_work_and_no_new_privileges_stops_setuid(host: RunHost) -> None:
    assert run_ok(host, "bb:1", "--", "su app -c 'id -u'") == b"1000\n"
    assert run_ok(host, "-u", "app", "bb:1", "--", "/bin/euid") == b"0\n"
    out = run_ok(host, "-u", "app", "--security-opt", "no-new-privileges", "bb:1", "--", "/bin/euid")
    assert out == b"1000\n"


def test_cap_drop_and_cap_add(host: RunHost) -> None:
    res = host.run("--cap-drop", "CHOWN", "bb:1", "--", "touch /tmp/f; chown 1000 /tmp/f")
    assert res.returncode != 0 and b"Operation not permitted" in res.stderr
    out = run_ok(host, "--cap-drop", "ALL", "--cap-add", "chown", "bb:1", "--", "grep CapEff /proc/self/status")
    assert int(out.split()[1], 16) == 1  # CAP_CHOWN alone
    out = run_ok(host, "--cap-add", "SYS_ADMIN", "bb:1", "--", "grep CapEff /proc/self/status")
    assert int(out.split()[1], 16) == DEFAULT_CAPS_MASK | 1 << 21
    res = host.run("--cap-add", "BOGUS", "bb:1", "--", "true")
    assert res.returncode == 125 and b"no such capability" in res.stderr


def test_seccomp_default_profile_and_unconfined(host: RunHost) -> None:
    # A user namespace needs unshare(2), which Docker's profile allows only with CAP_SYS_ADMIN.
    res = host.run("bb:1", "--", "unshare -U true")
    assert res.returncode != 0 and b"Operation not permitted" in res.stderr
    run_ok(host, "--security-opt", "seccomp=unconfined", "bb:1", "--", "unshare -U true")
    out = run_ok(host, "--security-opt", "seccomp=unconfined", "bb:1", "--", "grep Seccomp: /proc/self/status")
    assert out.split()[1] == b"0"


def test_masked_and_read_only_proc_paths_and_privileged(host: RunHost) -> None:
    out = run_ok(host, "bb:1", "--", "cat /proc/self/mountinfo; echo 1 > /proc/sys/kernel/ns_last_pid || echo ro-sys")
    mounted = {line.split()[4] for line in out.decode().splitlines() if len(line.split()) > 4}
    expected = {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sys", "/proc/sysrq-trigger", "/proc/acpi"}
    present = {p for p in expected if os.path.exists(p)}  # runc masks only what this kernel has
    assert len(present) >= 3 and present <= mounted
    assert out.endswith(b"ro-sys\n")
    out = run_ok(host, "--privileged", "bb:1", "--", "cat /proc/self/status /proc/self/mountinfo; ls /dev")
    assert int(status_field(out, "CapEff"), 16) == ALL_CAPS_MASK
    assert status_field(out, "Seccomp") == "0"
    assert b" /proc/keys " not in out and b" /proc/sys " not in out
    assert b"loop0" in out or b"tty1" in out  # the host's devices


def test_private_hosts_resolv_conf_and_hostname(host: RunHost) -> None:
    with open("/etc/hosts", "rb") as f:
        host_hosts = f.read()
    out = run_ok(host, "--hostname", "box1", "--add-host", "db.internal:10.1.2.3", "bb:1", "--",
                 "hostname; cat /etc/hostname; echo $HOSTNAME; grep -c localhost /etc/hosts; grep db.internal /etc/hosts;"
                 " test -s /etc/resolv.conf && echo resolv; echo '9.9.9.9 scribble' >> /etc/hosts")
    lines = out.decode().splitlines()
    assert lines[:3] == ["box1", "box1", "box1"]
    assert int(lines[3]) >= 1 and lines[4] == "10.1.2.3\tdb.internal" and lines[5] == "resolv"
    with open("/etc/hosts", "rb") as f:
        assert f.read() == host_hosts  # the container's copy is its own
    out = run_ok(host, "--network", "none", "bb:1", "--", "hostname; cat /etc/hosts")
    assert out.splitlines()[1] == b"127.0.0.1\tlocalhost"
    default = run_ok(host, "bb:1", "--", "hostname")  # host network: the host's name, as docker
    assert default.decode().strip() == os.uname().nodename[:64]


# -- flags -----------------------------------------------------------------------------------


def test_bind_mounts_read_write_and_read_only(host: RunHost, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    data.mkdir()
    (data / "in").write_bytes(b"from host\n")
    out = run_ok(host, "-v", f"{data}:/data", "bb:1", "--", "cat /data/in; echo from-container > /data/out")
    assert out == b"from host\n" and (data / "out").read_bytes() == b"from-container\n"
    res = host.run("-v", f"{data}:/data:ro", "bb:1", "--", "echo x > /data/other")
    assert res.returncode != 0 and b"Read-only file system" in res.stderr
    res = host.run("--mount", f"type=bind,source={data},target=/srv/d,readonly", "bb:1", "--", "cat /srv/d/in; touch /srv/d/x")
    assert res.stdout == b"from host\n" and b"Read-only file system" in res.stderr
    made = tmp_path / "made-by-v"
    run_ok(host, "-v", f"{made}:/m", "bb:1", "--", "true")
    assert made.is_dir()  # -v makes a missing host directory, as docker does
    res = host.run("--mount", f"type=bind,source={tmp_path / 'missing'},target=/m", "bb:1", "--", "true")
    assert res.returncode == 125 and b"does not exist" in res.stderr
    for bad in (["-v", "myvolume:/data"], ["--mount", "type=volume,target=/data"]):
        res = host.run(*bad, "bb:1", "--", "true")
        assert res.returncode == 125 and b"no named volumes" in res.stderr
    out = run_ok(host, "--read-only", "--tmpfs", "/scratch", "bb:1", "--",
                 "touch /x 2>/dev/null || echo ro-root; touch /scratch/y && echo tmpfs-ok")
    assert out == b"ro-root\ntmpfs-ok\n"
    assert host.leftovers() == []


def test_stdin_only_with_i_and_env_file(host: RunHost, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert run_ok(host, "bb:1", "--", "cat", input=b"ignored\n") == b""  # docker: no -i, no stdin
    assert run_ok(host, "-i", "bb:1", "--", "cat", input=b"passed\n") == b"passed\n"
    env_file = tmp_path / "env"
    env_file.write_text("# comment\n\nA=1\nB=two words\nFROM_HOST\n")
    out = run_ok(host, "--env-file", str(env_file), "-e", "A=override", "bb:1", "--", 'echo "$A|$B|$FROM_HOST"',
                 env_extra={"FROM_HOST": "yes"})
    assert out == b"override|two words|yes\n"


def test_init_is_pid_1(host: RunHost) -> None:
    out = run_ok(host, "--init", "bb:1", "--", "cat /proc/1/cmdline | tr '\\0' ' '; echo")
    assert out.startswith(b"/sbin/docker-init -- /bin/sh -c")


def test_tty_needs_a_terminal_and_works_in_one(host: RunHost) -> None:
    res = host.run("-t", "bb:1", "--", "true")
    assert res.returncode == 125 and b"not a TTY" in res.stderr
    cmd = " ".join(f"'{a}'" for a in host.command("-it", "bb:1", "--", "tty; test -t 0 && echo is-a-tty"))
    res = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, timeout=60, env=host.env(),
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert b"/dev/pts/" in res.stdout and b"is-a-tty" in res.stdout


@pytest.mark.parametrize(("args", "status", "message"), [
    (["bb:1", "--", "exit 3"], 3, b""),
    (["--entrypoint", "nonexistent", "bb:1"], 127, b'exec: "nonexistent": executable file not found in $PATH'),
    (["--entrypoint", "/bin/nope", "bb:1"], 127, b"no such file or directory"),
    (["--entrypoint", "/etc/not-executable", "bb:1"], 126, b"permission denied"),
    (["--entrypoint", "/srv", "bb:1"], 126, b"permission denied"),
    (["--bogus-flag", "bb:1"], 125, b"unknown flag --bogus-flag"),
    (["-d", "bb:1"], 125, b"-d is not supported"),
    (["--memory", "1g", "bb:1"], 125, b"--memory is not supported"),
    (["--network", "bridge", "bb:1"], 125, b"no bridge networks"),
    (["nope:1"], 125, b"no such image"),
])
def test_docker_exit_statuses(host: RunHost, args: list[str], status: int, message: bytes) -> None:
    res = host.run(*args)
    assert res.returncode == status, res.stderr
    assert message in res.stderr
    assert b"Traceback" not in res.stderr
    assert host.leftovers() == []


# A docker user's most common invocations, each unchanged (the image name aside).
COMMON = [
    (["bb:1"], b"default\n"),
    (["bb:1", "echo hi"], b"hi\n"),  # the image's Entrypoint is sh -c: the command is its script
    (["--rm", "bb:1", "--", "echo rm"], b"rm\n"),
    (["--rm", "-i", "bb:1", "--", "cat"], b"stdin\n"),
    (["-e", "X=1", "bb:1", "--", "echo $X"], b"1\n"),
    (["--env", "X=2", "bb:1", "--", "echo $X"], b"2\n"),
    (["-w", "/tmp", "bb:1", "--", "pwd"], b"/tmp\n"),
    (["--workdir=/srv", "bb:1", "--", "pwd"], b"/srv\n"),
    (["-u", "1000:1000", "bb:1", "--", "id -u; id -g"], b"1000\n1000\n"),
    (["--user", "app", "bb:1", "--", "id -un"], b"app\n"),
    (["--name", "web-1", "bb:1", "--", "echo named"], b"named\n"),
    (["--entrypoint", "/bin/echo", "bb:1", "entry"], b"entry\n"),
    (["-h", "myhost", "bb:1", "--", "hostname"], b"myhost\n"),
    (["--hostname=other", "bb:1", "--", "cat /etc/hostname"], b"other\n"),
    (["--network", "none", "bb:1", "--", "echo isolated"], b"isolated\n"),
    (["--net=host", "bb:1", "--", "echo host"], b"host\n"),
    (["--init", "--rm", "bb:1", "--", "echo init"], b"init\n"),
    (["--read-only", "bb:1", "--", "echo ro"], b"ro\n"),
    (["--cap-add=NET_ADMIN", "bb:1", "--", "echo cap"], b"cap\n"),
    (["--security-opt", "no-new-privileges:true", "bb:1", "--", "echo nnp"], b"nnp\n"),
    (["-p", "8080:80", "bb:1", "--", "echo published"], b"published\n"),
    (["--rm", "-it", "bb:1", "sh"], None),  # needs a terminal: a clear error without one
]


@pytest.mark.parametrize(("args", "stdout"), COMMON, ids=[" ".join(a) for a, _ in COMMON])
def test_common_docker_invocations(host: RunHost, args: list[str], stdout: bytes | None) -> None:
    res = host.run(*args, input=b"stdin\n")
    if stdout is None:
        assert res.returncode == 125 and b"not a TTY" in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        assert res.stdout == stdout
    assert host.leftovers() == []


def test_run_v_is_not_the_global_verbose(host: RunHost, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run_ok(host, "-v", f"{tmp_path}:/host", "bb:1", "--", "test -d /host && echo mounted")
    assert out == b"mounted\n"


# -- signals and clean-up ----------------------------------------------------------------------


def _started(host: RunHost, script: str, *args: str) -> subprocess.Popen[bytes]:
    proc = host.popen("--stop-timeout", "2", *args, "bb:1", "--", f"{script}; echo started; while true; do sleep 0.1; done",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"started\n", proc.stderr.read() if proc.stderr else b""
    return proc


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM],
                         ids=lambda s: signal.Signals(s).name)
def test_each_terminating_signal_is_forwarded_and_cleaned_up(host: RunHost, sig: int) -> None:
    name = signal.Signals(sig).name[3:]
    proc = _started(host, f"trap 'echo got-{name}; exit 42' {name}")
    proc.send_signal(sig)  # to imagefs run alone, as a supervisor or a dropped SSH session does
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 42, err
    assert out == f"got-{name}\n".encode()
    assert host.leftovers() == []


def test_a_container_that_ignores_the_signal_is_killed_after_the_grace(host: RunHost) -> None:
    proc = _started(host, "trap '' TERM")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL
    assert host.leftovers() == []


def test_sigkill_leftovers_are_removed_by_the_next_run(host: RunHost) -> None:
    proc = _started(host, "true", "--name", "killed-1")
    with open(os.path.join(host.containers_dir, "killed-1", "pid")) as f:
        container_pid = int(f.read())
    proc.kill()
    proc.wait(timeout=30)
    assert host.leftovers() != []  # nothing can answer SIGKILL: container, overlay, bundle, mount stay
    os.kill(container_pid, 0)  # the container still runs
    out = run_ok(host, "bb:1", "--", "echo next")
    assert out == b"next\n"
    assert host.leftovers() == []
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{container_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{container_pid}")
    assert not os.path.isdir(os.path.join(host.run_dir, "runc", "killed-1"))
