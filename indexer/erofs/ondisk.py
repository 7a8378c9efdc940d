"""The EROFS on-disk structures imagefs writes: constants and fixed-size records.

Only the subset of the format that the metadata writer uses is here, laid out as the
kernel reads it (``fs/erofs/erofs_fs.h``; little endian, no padding):

- the superblock, 128 bytes at byte 1024 of the primary device; the 1024 bytes
  before it are free for other uses;
- the device table: one 128-byte slot per extra device, at ``devt_slotoff * 128``;
- inodes, addressed by ``nid`` = byte offset / 32 from block ``meta_blkaddr``; only
  the 64-byte *extended* form (32-bit uid/gid/nlink, 64-bit size, mtime with
  nanoseconds), followed by the inline xattr body and then, per data layout, the
  chunk indexes (8-byte aligned) or the inline tail of the data;
- directory blocks: ``dirent`` records (nid, name offset, file type) sorted by name,
  then the names, back to back and NUL-padded at the block's end;
- chunk indexes: device id and start block of each chunk of a chunk-based file.

Block size is 4 KiB (the page size here: file-backed mounts need block <= page).
"""

from __future__ import annotations

import stat
import struct

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
ISLOT_BITS = 5  # nid = byte offset >> 5 (inodes are 32-byte aligned)
NAME_LEN = 255
NULL_ADDR = 0xFFFFFFFF  # a block address meaning "no block" (a hole)

FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8

# Inode data layouts (i_format bits 1-3); bit 0 is the inode version (1 = extended).
FLAT_PLAIN = 0
FLAT_INLINE = 2
CHUNK_BASED = 4
INODE_EXTENDED = 1

CHUNK_FORMAT_INDEXES = 0x20  # 8-byte chunk indexes (with a device id), not a 4-byte block map
CHUNK_FORMAT_BLKBITS_MASK = 0x1F

# Xattr name prefixes the format knows by index (a name is stored without its prefix).
XATTR_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", 1),
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"trusted.", 4),
    (b"security.", 6),
)

# magic checksum feature_compat blkszbits sb_extslots root_nid inos build_time build_time_nsec
# blocks meta_blkaddr xattr_blkaddr uuid volume_name feature_incompat u1 extra_devices
# devt_slotoff dirblkbits xattr_prefix_count xattr_prefix_start packed_nid filter_reserved reserved
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
# tag blocks mapped_blkaddr reserved
DEVICE_SLOT = struct.Struct("<64sII56s")
# i_format i_xattr_icount i_mode i_reserved i_size i_u i_ino i_uid i_gid i_mtime i_mtime_nsec
# i_nlink i_reserved2
INODE = struct.Struct("<HHHHQIIIIQII16s")
# h_name_filter h_shared_count h_reserved2
XATTR_IBODY_HEADER = struct.Struct("<IB7s")
# e_name_len e_name_index e_value_size
XATTR_ENTRY = struct.Struct("<BBH")
# startblk_hi (0 here: 32-bit block addresses) device_id startblk_lo
CHUNK_INDEX = struct.Struct("<HHI")
# nid nameoff file_type reserved
DIRENT = struct.Struct("<QHBB")

assert SUPERBLOCK.size == 128 and DEVICE_SLOT.size == 128 and INODE.size == 64
assert XATTR_IBODY_HEADER.size == 12 and XATTR_ENTRY.size == 4 and CHUNK_INDEX.size == 8 and DIRENT.size == 12

_FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5,
               stat.S_IFSOCK: 6, stat.S_IFLNK: 7}


def file_type(mode: int) -> int:
    """The dirent file type (the kernel's FT_* numbering) of an st_mode."""
    return _FILE_TYPES[stat.S_IFMT(mode)]


def encode_dev(rdev: int) -> int | None:
    """The 32-bit device number EROFS stores (the kernel's ``new_encode_dev``), or None
    when the major/minor pair does not fit it (major < 2**12, minor < 2**20)."""
    import os

    major, minor = os.major(rdev), os.minor(rdev)
    if major >= 1 << 12 or minor >= 1 << 20:
        return None
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def xattr_index(name: bytes) -> tuple[int, bytes] | None:
    """(name index, suffix) of an xattr name, or None if its prefix has no index."""
    for prefix, index in XATTR_PREFIXES:
        if name.startswith(prefix):
            suffix = name[len(prefix):]
            # The ACL names are whole names; the others need a non-empty rest.
            if (index in (2, 3)) == bool(suffix):
                return None
            return index, suffix
    return None


def align(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit
