"""Pieces shared by the `layerfs` and `volplugin` command lines.

* ``OneLineErrors``: a click group that prints any LayerfsError as one line
  (``PROG: error: MESSAGE``) and exits with status 1, never a traceback.
* ``store_option``: the ``--store`` option (also read from ``LAYERFS_STORE``).
* ``password_option``: ``--password-file``, the repository password's file.
* ``human_bytes``: sizes for people (binary units).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from layerfs.errors import LayerfsError

STORE_METAVAR = "PATH|s3://BUCKET/PREFIX"


class OneLineErrors(click.Group):
    """A click group whose LayerfsErrors end the program with one line on stderr."""

    prog = "layerfs"

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LayerfsError as exc:
            click.echo(f"{self.prog}: error: {exc}", err=True)
            sys.exit(1)


def store_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--store`` option: a local directory or ``s3://BUCKET/PREFIX``."""
    return click.option(
        "--store", envvar="LAYERFS_STORE", default=None, metavar=STORE_METAVAR, help=help
    )


def _use_password_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Pass --password-file on as LAYERFS_PASSWORD_FILE, which child processes inherit too."""
    if value:
        from layerfs.repo.password import ENV_FILE

        os.environ[ENV_FILE] = os.path.abspath(value)


def password_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--password-file PATH``: where the repository password is (first line)."""
    return click.option(
        "--password-file",
        metavar="PATH",
        default=None,
        expose_value=False,
        callback=_use_password_file,
        help="File whose first line is the repository password (also "
        "LAYERFS_PASSWORD_FILE, LAYERFS_PASSWORD_COMMAND, or the systemd credential "
        "layerfs-password).",
    )


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A size such as 512, 100M, 20G or 1.5T (powers of 1024; an optional B or iB) in bytes."""
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if found is None:
        raise ValueError(f"{text!r} is not a size (e.g. 512, 100M, 20G)")
    return int(float(found[1]) * _SIZE_UNITS[found[2].upper()])


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
