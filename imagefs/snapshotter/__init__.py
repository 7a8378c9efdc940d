"""``imagefs snapshotter``: containerd's snapshots API, so that ``ctr``, nerdctl and
Kubernetes (CRI) start imagefs images lazily.

containerd plugs it in as a proxy plugin (``[proxy_plugins.imagefs] type = "snapshot"``)
and calls it over a unix socket. When containerd unpacks an image it first asks, layer
by layer, for a *remote* snapshot: ``Prepare`` with the label ``containerd.io/snapshot.ref``
naming the layer's chain ID. Where the store holds an imagefs image whose layers have
those chain IDs, the snapshotter commits that snapshot itself and answers AlreadyExists,
so containerd neither downloads nor unpacks the layer. A container's rootfs is then an
overlay whose lower layer is one lazy imagefs mount of the whole flattened image, shared
by every container of that image on the host. Layers imagefs does not have become
ordinary snapshots (directories that containerd unpacks into, stacked with overlayfs),
so any image runs.

One module per job:

- :mod:`.errors`: containerd's error codes (NotFound, AlreadyExists, ...).
- :mod:`.chain`: chain IDs, and which of them a store image provides.
- :mod:`.images`: the store's images, by the chain IDs of their layers.
- :mod:`.metadata`: the snapshots themselves, kept in SQLite under the root.
- :mod:`.filters`: containerd's filter syntax, for List.
- :mod:`.mounts`: the host's image mounts, and the mounts handed to containerd.
- :mod:`.snapshots`: the snapshotter's semantics, tying those together.
- :mod:`.service`: the gRPC servicer and the server on the unix socket.
- :mod:`.pull`: ``imagefs pull``, containerd's pull with unpack through this snapshotter.
"""
