"""Helpers shared by the tests and the benchmarks: real daemons and base images."""
