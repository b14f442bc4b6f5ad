"""Least-privilege sockets for sidekicks: one plugin socket per volume, scoped to it."""
