"""The bottom layer of imagefs: chunks and the tiers that hold them.

This package knows content-addressed chunks and where they sit in pack objects; it
never knows files, trees or images. It imports nothing from ``indexer`` or ``imagefs``.
"""
