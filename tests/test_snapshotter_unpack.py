"""Applying a layer tar as an overlayfs layer (the snapshotter's materialized
placeholders): whiteouts and opaque directories in overlayfs's form, and a stranger's
tar cannot write outside the directory."""

from __future__ import annotations

import io
import os
import stat
import tarfile

import pytest

from imagefs.snapshotter.unpack import LayerError, apply_tar


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, **kw: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    for k, v in kw.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
    return info, data


def test_files_whiteouts_and_opaque_dirs(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    apply_tar(tar_of(entry("etc", tarfile.DIRTYPE), entry("etc/hosts", data=b"127.0.0.1 x\n", uid=5, gid=6),
                     entry("etc/.wh.gone"), entry("var", tarfile.DIRTYPE), entry("var/.wh..wh..opq"),
                     entry("bin", tarfile.DIRTYPE), entry("bin/sh", tarfile.SYMTYPE, linkname="busybox"),
                     entry("bin/hard", tarfile.LNKTYPE, linkname="etc/hosts")), root, "test layer")
    assert open(os.path.join(root, "etc/hosts"), "rb").read() == b"127.0.0.1 x\n"
    st = os.lstat(os.path.join(root, "etc/hosts"))
    assert (st.st_uid, st.st_gid, st.st_nlink) == (5, 6, 2)
    wh = os.lstat(os.path.join(root, "etc/gone"))
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0)
    assert os.getxattr(os.path.join(root, "var"), "trusted.overlay.opaque") == b"y"
    assert os.readlink(os.path.join(root, "bin/sh")) == "busybox"


def test_dotdot_stays_inside(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "layer")
    os.mkdir(root)
    apply_tar(tar_of(entry("../escape", data=b"x")), root, "layer")  # clamped at the root, as containerd does
    assert os.listdir(str(tmp_path)) == ["layer"] and os.listdir(root) == ["escape"]


@pytest.mark.parametrize("members", [
    [entry("link", tarfile.SYMTYPE, linkname="/"), entry("link/tmp/evil", data=b"x")],
    [entry("h", tarfile.LNKTYPE, linkname="../../etc/passwd")],
])
def test_a_tar_cannot_write_outside(tmp_path: os.PathLike[str], members: list) -> None:
    root = os.path.join(str(tmp_path), "layer")
    os.mkdir(root)
    with pytest.raises(LayerError):
        apply_tar(tar_of(*members), root, "bad layer")
    assert not os.path.exists(os.path.join(str(tmp_path), "escape"))
    assert not os.path.exists("/tmp/evil")
