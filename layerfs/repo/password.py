"""Where the repository password comes from.

One job: find the password, from the first of these that is given:

1. ``--password-file PATH`` (the caller passes it as ``password_file``);
2. ``LAYERFS_PASSWORD_FILE=PATH``;
3. ``LAYERFS_PASSWORD_COMMAND=CMD``: CMD is split like a shell would
   (``shlex.split``, no shell: write ``sh -c '...'`` for pipes), run with
   this process's stdin, and the first line of its stdout is the password;
   it must exit 0 within ``COMMAND_TIMEOUT`` seconds;
4. ``$CREDENTIALS_DIRECTORY/layerfs-password``, the file systemd makes from
   ``LoadCredential=layerfs-password:/etc/layerfs/password`` (or
   ``SetCredentialEncrypted=``) in the unit.

A way that is given must work: a named file that cannot be read, or a command
that fails, is an error, not a reason to try the next way (only the systemd
credential is optional: a unit may hold credentials for other programs). An
empty variable counts as not set. From a file, as from a command, the password
is the first line without its line ending ("\\n" or "\\r\\n"); other
whitespace is part of it. It is bytes: no decoding, no Unicode normalisation.
An empty password is refused. When no way is given, ``PasswordMissing`` names
them all.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from layerfs.errors import LayerfsError

ENV_FILE = "LAYERFS_PASSWORD_FILE"
ENV_COMMAND = "LAYERFS_PASSWORD_COMMAND"
CREDENTIAL = "layerfs-password"
COMMAND_TIMEOUT = 60.0


class PasswordError(LayerfsError):
    """A password source was given but gave no password."""


class PasswordMissing(PasswordError):
    """No password source was given."""


@dataclass(frozen=True)
class Password:
    """A password and where it came from (for messages; the secret never shows in a repr)."""

    secret: bytes = field(repr=False)
    source: str


def _first_line(data: bytes) -> bytes:
    line = data.split(b"\n", 1)[0]
    return line[:-1] if line.endswith(b"\r") else line


def _from_file(path: str, source: str) -> Password:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as e:
        raise PasswordError(
            f"cannot read the password file {path} ({source}): {e.strerror}"
        ) from None
    secret = _first_line(data)
    if not secret:
        raise PasswordError(f"the password file {path} ({source}) has an empty first line")
    return Password(secret, f"{source} {path}")


def _from_command(command: str, timeout: float) -> Password:
    source = f"{ENV_COMMAND} ({command})"
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise PasswordError(f"{source}: cannot split it into words: {e}") from None
    if not argv:
        raise PasswordError(f"{ENV_COMMAND} is set but has no command in it")
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise PasswordError(f"{source}: command {argv[0]} not found") from None
    except PermissionError:
        raise PasswordError(f"{source}: {argv[0]} is not executable") from None
    except subprocess.TimeoutExpired:
        raise PasswordError(f"{source}: no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        said = f": {lines[-1].strip()}" if lines else ""
        how = (
            f"was killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited with status {proc.returncode}"
        )
        raise PasswordError(f"{source} {how}{said}")
    secret = _first_line(proc.stdout)
    if not secret:
        raise PasswordError(f"{source} printed no password (its first line is empty)")
    return Password(secret, ENV_COMMAND)


def get_password(
    password_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    timeout: float = COMMAND_TIMEOUT,
) -> Password:
    """The password from the first source given (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    if password_file is not None:
        return _from_file(os.fspath(password_file), "--password-file")
    if env.get(ENV_FILE):
        return _from_file(env[ENV_FILE], ENV_FILE)
    if env.get(ENV_COMMAND):
        return _from_command(env[ENV_COMMAND], timeout)
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = os.path.join(creds, CREDENTIAL)
        if os.path.exists(path):
            return _from_file(path, "systemd credential")
    raise PasswordMissing(
        "no password given: use --password-file PATH, "
        f"{ENV_FILE}=PATH, {ENV_COMMAND}=CMD, or a systemd credential "
        f"named {CREDENTIAL} (LoadCredential=)"
    )
