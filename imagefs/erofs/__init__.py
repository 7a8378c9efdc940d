"""The EROFS way of mounting an image: the kernel serves the tree, imagefs serves bytes.

A plain imagefs mount answers every lookup, open, readdir and read in Python, through
FUSE. Here the kernel's EROFS answers all of the metadata itself, from an image that
imagefs writes from the index (:mod:`.writer`), and file data lives on an extra device
that is a *virtual blob* file (:mod:`.slots`) served by the imagefs daemon over a
private FUSE mount (:mod:`.blobfs`), chunk by chunk through the same verified chunk
chain as a plain mount. Once a page is in the kernel's page cache, nothing reaches
imagefs at all. :mod:`.kernel` talks to mount(2); :mod:`.session` ties it together
for the daemon and falls back to the plain mount where the kernel cannot do this.
"""
