"""EROFS metadata written from an imagefs index: the on-disk structures (``ondisk``),
the virtual blob's address map (``slots``) and the writer (``writer``).

Pure and file-system free: the index side writes it (at index time, into the store
beside the index: :mod:`indexer.erofs.store`), and the read side (:mod:`imagefs.erofs`)
mounts it, or writes it itself for an image indexed before.
"""
