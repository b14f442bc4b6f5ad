"""Lazy volumes: usable at once from a backup, filled in the background."""
