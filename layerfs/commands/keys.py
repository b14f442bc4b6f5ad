"""`layerfs init` and `layerfs key list|add|remove|passwd`: a repository and its keys."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from layerfs.errors import LayerfsError
from layerfs.store.location import open_backend, open_raw_backend

if TYPE_CHECKING:
    from layerfs.repo.repository import EncryptedBackend


def _new_password(path: str | None) -> bytes:
    """The new password: first line of ``path``, else asked twice on the terminal."""
    from layerfs.repo.password import get_password

    if path:
        return get_password(path).secret
    if not sys.stdin.isatty():
        raise LayerfsError("give the new password with --new-password-file PATH")
    value = click.prompt("new password", hide_input=True, confirmation_prompt=True)
    if not value:
        raise LayerfsError("refusing an empty password")
    return value.encode()


@contextmanager
def _encrypted(store_url: str) -> Iterator[EncryptedBackend]:
    """The encrypted repository at ``store_url``, opened with the configured password."""
    from layerfs.repo.repository import EncryptedBackend

    backend = open_backend(store_url)
    try:
        if not isinstance(backend, EncryptedBackend):
            raise LayerfsError(f"the repository at {store_url} is not encrypted: it has no keys")
        yield backend
    finally:
        backend.close()


@click.command("init")
@click.option(
    "--insecure-no-encryption",
    is_flag=True,
    help="Create an unencrypted repository: anyone who can read the store reads everything.",
)
@click.pass_obj
def init_command(store_url: str, insecure_no_encryption: bool) -> None:
    """Create a repository at --store (encrypted under the password given)."""
    from layerfs.repo.password import get_password
    from layerfs.repo.repository import AlreadyInitialised, init_repository, read_config

    backend = open_raw_backend(store_url)
    try:
        if read_config(backend) is not None:
            raise AlreadyInitialised(f"{backend.url} is a repository already")
        password = None if insecure_no_encryption else get_password().secret
        config = init_repository(backend, password, insecure=insecure_no_encryption)
    finally:
        backend.close()
    kind = "unencrypted" if insecure_no_encryption else "encrypted"
    click.echo(f"created {kind} repository {config.id} at {backend.url}")


@click.group("key")
def key_group() -> None:
    """List, add and remove the passwords that open an encrypted repository."""


@key_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def key_list(store_url: str, as_json: bool) -> None:
    """List the repository's keys (the one the password opened is marked *)."""
    with _encrypted(store_url) as backend:
        current, rows = backend.key_id, backend.keys()
    if as_json:
        out = [
            {
                "id": k.id,
                "current": k.id == current,
                "created": k.created,
                "host": k.host,
                "user": k.user,
                "kdf": k.kdf.kdf,
                "params": k.kdf.params,
            }
            for k in rows
        ]
        click.echo(json.dumps(out))
        return
    click.echo(f"  {'ID':<32}  {'CREATED':<20}  {'HOST':<16}  USER")
    for k in rows:
        mark = "*" if k.id == current else " "
        click.echo(f"{mark} {k.id:<32}  {k.created:<20}  {k.host:<16}  {k.user}")


_NEW_PASSWORD = click.option(
    "--new-password-file", metavar="PATH", help="File holding the new password."
)


@key_group.command("add")
@_NEW_PASSWORD
@click.pass_obj
def key_add(store_url: str, new_password_file: str | None) -> None:
    """Add a key: one more password that opens the repository."""
    with _encrypted(store_url) as backend:
        key_id = backend.add_key(_new_password(new_password_file))
    click.echo(f"added key {key_id}")


@key_group.command("remove")
@click.argument("key_id")
@click.pass_obj
def key_remove(store_url: str, key_id: str) -> None:
    """Remove the key KEY_ID (an id or unique prefix); the last key is never removed."""
    with _encrypted(store_url) as backend:
        backend.remove_key(key_id)
    click.echo(f"removed key {key_id}")


@key_group.command("passwd")
@_NEW_PASSWORD
@click.pass_obj
def key_passwd(store_url: str, new_password_file: str | None) -> None:
    """Change the password: add a key for the new one, then remove the key the old one opened."""
    with _encrypted(store_url) as backend:
        old = backend.key_id
        key_id = backend.change_password(_new_password(new_password_file))
    click.echo(f"password changed: key {old} replaced by {key_id}")


COMMANDS = [init_command, key_group]
