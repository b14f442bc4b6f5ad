"""Key files: the repository's master key, wrapped under keys derived from passwords.

One job: turn a master ``Key`` and a password into a key file (JSON bytes) and
back. Each key file holds the master key sealed (AES-256-GCM, crypto.seal_raw)
under a user key that a memory-hard KDF derives from the password and a random
salt; the KDF and its parameters are recorded in the file, so they can change
without breaking older key files. Storage-agnostic: bytes in, bytes out;
docs/repository.md lists every field.

Default KDF: Argon2id (RFC 9106, argon2-cffi's low-level API) with RFC 9106's
second recommended parameters (section 4): time_cost 3, memory
64 MiB, parallelism 4. Every process that opens the repository pays one
derivation (the CLI, each mount daemon, the plugin), so it must stay well
under a second on a loaded host: on this project's 2-core machines with the
test suite running it took 0.61-0.65 s, against 2.4-2.7 s for the 192 MiB,
4-pass parameters tried first. ``python -m benchmarks.bench_ids --kdf`` has
more figures, scrypt's too (``hashlib.scrypt`` is accepted when
reading and writing; Argon2id is the default as RFC 9106 recommends it and
it uses both cores). Tests use ``TEST_PARAMS`` (1 MiB, one pass). A key file
whose parameters exceed the limits below is refused before any work, so a
planted key file cannot make an open take gigabytes or minutes.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from layerfs.errors import LayerfsError
from layerfs.repo.crypto import KEY_LEN, Key, Tampered, open_raw, seal_raw

FORMAT = "layerfs-key"
FORMAT_VERSION = 1
SALT_LEN = 16
ID_BYTES = 16
MAX_KDF_MEMORY = 1 << 30  # 1 GiB: 8× the default
MAX_ARGON2_TIME = 64
MAX_PARALLELISM = 16
ARGON2_VERSION = 19  # 0x13, the version RFC 9106 specifies


class KeyFileError(LayerfsError):
    """Base of the key-file errors."""


class WrongPassword(KeyFileError):
    """The password opens no key file offered."""


class BadKeyFile(KeyFileError):
    """A key file is not one this layerfs can read: malformed, or parameters out of range."""


class NoKeys(KeyFileError):
    """There is no key file to try."""


@dataclass(frozen=True)
class KdfParams:
    """A password KDF and its parameters, as recorded in a key file.

    argon2id: ``time_cost`` (passes), ``memory_kib``, ``parallelism`` (lanes);
    scrypt: ``n`` (a power of two), ``r``, ``p``.
    """

    kdf: str
    params: dict[str, int] = field(default_factory=dict)

    def memory_bytes(self) -> int:
        """What one derivation allocates."""
        if self.kdf == "argon2id":
            return self.params["memory_kib"] << 10
        return 128 * self.params["r"] * (self.params["n"] + self.params["p"])

    def check(self) -> None:
        """Raise ValueError unless these are parameters this layerfs derives with."""
        p = self.params
        if self.kdf == "argon2id":
            want = {"time_cost", "memory_kib", "parallelism"}
        elif self.kdf == "scrypt":
            want = {"n", "r", "p"}
        else:
            raise ValueError(f"unknown KDF {self.kdf!r} (argon2id or scrypt)")
        if set(p) != want or not all(type(v) is int and v >= 1 for v in p.values()):
            raise ValueError(f"{self.kdf} needs positive integers {sorted(want)}, got {p!r}")
        if self.kdf == "argon2id":
            if not 1 <= p["parallelism"] <= MAX_PARALLELISM:
                raise ValueError(f"argon2id parallelism {p['parallelism']} not in 1..16")
            if p["memory_kib"] < 8 * p["parallelism"]:
                raise ValueError("argon2id memory_kib must be at least 8 × parallelism")
            if p["time_cost"] > MAX_ARGON2_TIME:
                raise ValueError(f"argon2id time_cost {p['time_cost']} over {MAX_ARGON2_TIME}")
        else:
            if p["n"] < 2 or p["n"] & (p["n"] - 1):
                raise ValueError(f"scrypt n {p['n']} is not a power of two")
            if p["p"] > MAX_PARALLELISM:
                raise ValueError(f"scrypt p {p['p']} over {MAX_PARALLELISM}")
        if self.memory_bytes() > MAX_KDF_MEMORY:
            raise ValueError(
                f"{self.kdf} would use {self.memory_bytes() >> 20} MiB, "
                f"over the limit of {MAX_KDF_MEMORY >> 20} MiB"
            )


DEFAULT_PARAMS = KdfParams("argon2id", {"time_cost": 3, "memory_kib": 64 << 10, "parallelism": 4})
TEST_PARAMS = KdfParams("argon2id", {"time_cost": 1, "memory_kib": 1024, "parallelism": 1})


def derive(password: str | bytes, salt: bytes, params: KdfParams) -> bytes:
    """The 32-byte user key for ``password`` (UTF-8 if a str, as given) and ``salt``."""
    params.check()
    secret = password.encode() if isinstance(password, str) else bytes(password)
    p = params.params
    if params.kdf == "argon2id":
        from argon2.low_level import Type, hash_secret_raw

        return hash_secret_raw(
            secret,
            salt,
            time_cost=p["time_cost"],
            memory_cost=p["memory_kib"],
            parallelism=p["parallelism"],
            hash_len=KEY_LEN,
            type=Type.ID,
            version=ARGON2_VERSION,
        )
    import hashlib

    return hashlib.scrypt(
        secret,
        salt=salt,
        n=p["n"],
        r=p["r"],
        p=p["p"],
        maxmem=params.memory_bytes() + (1 << 20),
        dklen=KEY_LEN,
    )


def new_master() -> Key:
    """A new random master key for a new repository."""
    return Key.generate()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a base64 string")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _keyfile_ad(key_id: str) -> bytes:
    return b"keyfile\x00" + key_id.encode()


def _user_label() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def wrap(
    master: Key,
    password: str | bytes,
    params: KdfParams = DEFAULT_PARAMS,
    *,
    host: str | None = None,
    user: str | None = None,
) -> bytes:
    """A new key file (JSON bytes) holding ``master`` sealed under ``password``.

    ``host`` and ``user`` label it (default: this host and user); each call
    makes a new salt and id, so one master key can have many key files.
    """
    if not password:
        raise ValueError("refusing an empty password")
    salt = os.urandom(SALT_LEN)
    key_id = secrets.token_hex(ID_BYTES)
    inner = json.dumps(
        {"enc_key": _b64(master.enc_key), "id_key": _b64(master.id_key)}, sort_keys=True
    ).encode()
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "id": key_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname() if host is None else host,
        "user": _user_label() if user is None else user,
        "kdf": params.kdf,
        "params": dict(params.params),
        "salt": _b64(salt),
        "data": _b64(seal_raw(derive(password, salt, params), inner, _keyfile_ad(key_id))),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


@dataclass(frozen=True)
class KeyFile:
    """A parsed key file: its labels and what unwrapping it needs."""

    id: str
    created: str
    host: str
    user: str
    kdf: KdfParams
    salt: bytes = field(repr=False)
    data: bytes = field(repr=False)


def parse(keyfile: bytes, name: str = "") -> KeyFile:
    """A key file's fields, checked; raises ``BadKeyFile`` naming it (``name`` or its id)."""
    label = name or "(unnamed)"
    try:
        doc = json.loads(keyfile)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        label = name or str(doc.get("id", label))
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT!r}")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"version {doc.get('version')!r}; this layerfs reads version {FORMAT_VERSION}"
            )
        for f in ("id", "created", "host", "user", "kdf"):
            if not isinstance(doc.get(f), str):
                raise ValueError(f"field {f!r} missing or not a string")
        if not isinstance(doc.get("params"), dict):
            raise ValueError("field 'params' missing or not an object")
        kdf = KdfParams(doc["kdf"], dict(doc["params"]))
        kdf.check()
        salt = _unb64(doc.get("salt"), "salt")
        if len(salt) < SALT_LEN:
            raise ValueError(f"salt of {len(salt)} bytes, fewer than {SALT_LEN}")
        data = _unb64(doc.get("data"), "data")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and binascii.Error too
        raise BadKeyFile(f"key file {label}: {e}") from None
    return KeyFile(doc["id"], doc["created"], doc["host"], doc["user"], kdf, salt, data)


def unwrap(keyfile: bytes, password: str | bytes, name: str = "") -> Key:
    """The master key in ``keyfile``; ``WrongPassword`` if ``password`` does not open it."""
    kf = parse(keyfile, name)
    try:
        inner = open_raw(derive(password, kf.salt, kf.kdf), kf.data, _keyfile_ad(kf.id))
    except Tampered:
        raise WrongPassword(
            f"wrong password for key {name or kf.id} (or its key file was altered)"
        ) from None
    try:
        fields = json.loads(inner)
        return Key(_unb64(fields["enc_key"], "enc_key"), _unb64(fields["id_key"], "id_key"))
    except (ValueError, KeyError, TypeError) as e:
        raise BadKeyFile(f"key file {name or kf.id}: its master key is malformed ({e})") from None


def find_key(
    keyfiles: Iterable[tuple[str, bytes]],
    password: str | bytes,
    *,
    url: str = "",
    opener: Callable[[bytes, bytes | str, str], Key] | None = None,
) -> tuple[str, Key]:
    """The first of ``keyfiles`` (name, bytes) that ``password`` opens, as (name, master key).

    Malformed key files are passed over (and named if nothing opens);
    ``WrongPassword`` when none opens, ``NoKeys`` when there are none. ``url``
    names the repository in the messages; ``opener`` replaces ``unwrap`` (a
    caller that remembers derived keys).
    """
    opener = opener or unwrap
    at = f" at {url}" if url else ""
    tried = 0
    bad: list[str] = []
    for name, data in keyfiles:
        try:
            return name, opener(data, password, name)
        except WrongPassword:
            tried += 1
        except BadKeyFile as e:
            bad.append(str(e))
    if not tried and not bad:
        raise NoKeys(f"the repository{at} has no key files: it cannot be opened by any password")
    if not tried:
        raise BadKeyFile(f"no readable key file{at}: " + "; ".join(bad))
    msg = f"wrong password: it opens none of the repository's {tried} key file(s){at}"
    if bad:
        msg += f" ({len(bad)} more unreadable: " + "; ".join(bad) + ")"
    raise WrongPassword(msg)
