"""The write side of imagefs: OCI images in, chunks and a metadata index out.

``sources`` reads images (OCI layout, docker archive, registry), ``layers`` merges
layer tars into a :class:`~indexer.tree.Tree`, ``chunker``/``packer`` cut file content
into content-addressed chunks and pack them, ``format`` encodes the index, and
``build`` ties them together and writes to a store. ``index`` is the reader that the
mount uses.
"""
