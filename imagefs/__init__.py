"""The read side of imagefs: a lazy, read-only FUSE filesystem over an image index,
and the container run on top of it.

``vfs`` holds the filesystem semantics without importing pyfuse3; ``fuse_ops`` is the
thin pyfuse3 adapter; ``mount`` owns the mount lifecycle; ``run`` starts a container;
``cli`` and the ``cli_*`` modules are the ``imagefs`` command.
"""
