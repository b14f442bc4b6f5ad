"""The FUSE side of layerfs: read-only image mounts and writable copy-on-write mounts."""
