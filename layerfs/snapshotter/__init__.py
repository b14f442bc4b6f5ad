"""A containerd snapshotter (proxy plugin over gRPC) whose layers live in the layerfs store.

``metadata`` keeps the snapshots (SQLite), ``layers`` turns an applied upper
directory into a layer of the store and mounts a committed chain, ``service``
answers containerd's snapshots API, ``server`` runs it on a unix socket.
The store is opened only by helper processes the server starts: ``storework``
(commits, pins, unpins) and ``chainmount`` (chain mounts).
"""
