"""Image files are read inside the image: no symlink, ``..`` or special file reaches the host."""

from __future__ import annotations

import os
import threading

import pytest

from imagefs.image_files import ImageFileError, read_image_file
from imagefs.runtime_config import ConfigError, resolve_user


@pytest.fixture
def tree(tmp_path):  # type: ignore[no-untyped-def]
    """An image tree beside a host file that its symlinks point at."""
    host_file = tmp_path / "host-secret"
    host_file.write_bytes(b"root:x:HOST-SECRET:0::/:/bin/sh\n")
    root = tmp_path / "image"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "real").write_bytes(b"in the image\n")
    return root, str(host_file)


def test_symlinks_resolve_inside_the_image(tree) -> None:  # type: ignore[no-untyped-def]
    root, host_file = tree
    os.symlink(host_file, root / "etc" / "abs")  # absolute: re-rooted at the image's /
    os.symlink("../../../../../../.." + host_file, root / "etc" / "dotdot")
    os.symlink("/etc/real", root / "etc" / "inside")
    os.symlink("../etc/./real", root / "etc" / "relative")
    assert read_image_file(str(root), "/etc/abs") is None
    assert read_image_file(str(root), "/etc/dotdot") is None
    assert read_image_file(str(root), "../../.." + host_file) is None
    assert read_image_file(str(root), "/etc/inside") == b"in the image\n"
    assert read_image_file(str(root), "etc/relative") == b"in the image\n"
    assert read_image_file(str(root), "/etc/missing") is None
    assert read_image_file(str(root), "/etc/real/below") is None  # ENOTDIR: absent as well


def test_special_and_oversized_files_are_errors(tree) -> None:  # type: ignore[no-untyped-def]
    root, _ = tree
    os.mkfifo(root / "etc" / "fifo")
    os.symlink("loop", root / "etc" / "loop")
    (root / "etc" / "big").write_bytes(b"x" * 2048)
    done = threading.Event()

    def opener() -> None:  # a FIFO with no writer must not block whoever opens it
        with pytest.raises(ImageFileError, match="not a regular file"):
            read_image_file(str(root), "/etc/fifo")
        done.set()

    t = threading.Thread(target=opener, daemon=True)
    t.start()
    t.join(timeout=30)
    assert done.is_set()
    with pytest.raises(ImageFileError, match="not a regular file"):
        read_image_file(str(root), "/etc")
    with pytest.raises(ImageFileError, match="Too many levels of symbolic links"):
        read_image_file(str(root), "/etc/loop")
    with pytest.raises(ImageFileError, match="2048 bytes, more than the 1024 allowed"):
        read_image_file(str(root), "/etc/big", max_bytes=1024)
    assert read_image_file(str(root), "/etc/big", max_bytes=2048) == b"x" * 2048


def test_user_lookup_reads_the_images_files_only(tree) -> None:  # type: ignore[no-untyped-def]
    root, host_file = tree
    os.symlink(host_file, root / "etc" / "passwd")
    with pytest.raises(ConfigError, match="user 'root' not found in the image's /etc/passwd"):
        resolve_user("root", str(root))
    assert resolve_user("42", str(root)) == (42, 0, [])


@pytest.mark.parametrize(("passwd", "user", "message"), [
    (b"app:x:HOST-SECRET:1:::\n", "app", "/etc/passwd line 1: uid 'HOST-SECRET' is not a number"),
    (b"# c\n\nroot:x:0:0:::\napp:x:5:-1:::\n", "app", "/etc/passwd line 4: gid '-1' is not a number"),
    (b"app:x:4294967295:1:::\n", "app", "line 1: uid '4294967295' is not a number from 0 to 4294967294"),
    (b"app:x:1:1:::\n", "99999999999", "user '99999999999': not a name or a number"),
])
def test_bad_entries_are_clear_errors(tree, passwd: bytes, user: str, message: str) -> None:  # type: ignore[no-untyped-def]
    root, _ = tree
    (root / "etc" / "passwd").write_bytes(passwd)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_user(user, str(root))


def test_a_bad_line_elsewhere_does_not_matter(tree) -> None:  # type: ignore[no-untyped-def]
    root, _ = tree
    (root / "etc" / "passwd").write_bytes(b"junk\nbad:x:y:z:::\napp:x:7:8:::\n")
    (root / "etc" / "group").write_bytes(b"bad:x:nope:app\nstaff:x:50:app\n")
    with pytest.raises(ConfigError, match="/etc/group line 1: gid 'nope'"):
        resolve_user("app", str(root))  # the bad group lists app: it matters
    (root / "etc" / "group").write_bytes(b"bad:x:nope:other\nstaff:x:50:app\n")
    assert resolve_user("app", str(root)) == (7, 8, [50])
