"""Mounts: the image view (FUSE), kernel overlay mounts over it, and the mount service."""
