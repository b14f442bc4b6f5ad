"""Volumes: directories under the root, their state database, options and users."""
