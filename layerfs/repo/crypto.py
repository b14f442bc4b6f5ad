"""Sealing repository objects and naming them: AEAD encryption and keyed content IDs.

One job: given a repository ``Key``, turn a plaintext into the bytes stored
(``seal``) and back (``open_``), detecting any change, and name a plaintext
by a keyed hash (``content_id``). docs/repository.md gives the byte layout.

Choices, from ``python -m benchmarks.bench_ids`` on this project's machines
(2 × AMD EPYC with AES-NI, VAES, AVX-512 and SHA-NI; one core, MB/s of CPU
time, best of 5, with the test suite running alongside)::

                             4 KiB   64 KiB   1 MiB
    AES-256-GCM seal         2,879   14,170  17,867
    AES-256-GCM open         4,134   14,918  15,026
    ChaCha20-Poly1305 seal   1,877    4,202   4,486
    ChaCha20-Poly1305 open   2,009    4,168   4,385
    HMAC-SHA256                982    1,553   1,582
    keyed BLAKE3             1,834    8,375   8,899
    (xxh3-128, the IDs before  43,684  108,793  94,151)

- **AEAD: AES-256-GCM**, 1.5-4× ChaCha20-Poly1305 at every size (the CPU has
  AES instructions; ChaCha20 wins on CPUs without them, which this project's
  machines are not). A random 96-bit nonce per object: the usual bound
  for random GCM nonces, 2^32 objects under one key, is 256 TiB of 64 KiB
  chunks, far beyond a repository here.
- **Content IDs: keyed BLAKE3** (the key is ``Key.id_key``; 256 bits, hex),
  1.9× HMAC-SHA256 at 4 KiB (trees, documents) and 5.4-5.6× at 64 KiB and
  1 MiB (chunks: 64 KiB on average). Naming and sealing a 64 KiB chunk then
  runs at 5.3 GB/s of one core; with HMAC-SHA256 it would be 1.4 GB/s, the
  ID taking 90% of the time. Both are keyed PRFs of 256 bits; BLAKE3 wins on
  speed alone. Single-threaded: the chunker and the uploads use the other core.
- **Chunker seed: yes.** pyfastcdc 0.3's ``FastCDC(..., seed=N)`` (read in its
  source, ``pyfastcdc/cy/fastcdc.pyx``) XORs ``N`` into each of its 256
  gear-table entries (and ``N << 1`` into the shifted table), so chunk
  boundaries depend on the repository key and stop matching anyone else's
  chunking of the same file. ``N`` must be in [1, 2^63 - 1] (``N << 1`` is
  stored in a uint64; 0 means the public table): ``chunker_seed`` derives
  such a value from ``Key.id_key``. One XORed 64-bit value is weaker than a
  fully random table (borg's seeded buzhash is the same construction): it
  hides boundaries from a passive observer, but is no proven secret against
  someone who can make a repository store files they chose and then watch
  object sizes.

The primitives are imported on first use, so a CLI that imports this module
for its names pays nothing until it seals or hashes.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from layerfs.errors import CorruptObject

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
VERSION = 1  # the only one: AES-256-GCM, 12-byte nonce, 16-byte tag
HEADER_LEN = 1 + NONCE_LEN
OVERHEAD = HEADER_LEN + TAG_LEN  # 29 bytes on top of the plaintext
ID_HEX_LEN = 64
_CHUNKER_CONTEXT = "layerfs repository 2026-12 FastCDC gear seed v1"


class Tampered(CorruptObject):
    """A sealed object failed authentication: damaged, altered, swapped or under another key."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"object {name}: {why}")
        self.object = name


@dataclass(frozen=True)
class Key:
    """A repository's master key: what encrypts objects and what names them.

    ``enc_key`` is the AES-256-GCM key of every object; ``id_key`` keys the
    content IDs (and the chunker seed). Both are 32 random bytes, independent.
    """

    enc_key: bytes = field(repr=False)
    id_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("enc_key", "id_key"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != KEY_LEN:
                raise ValueError(f"Key.{name} must be {KEY_LEN} bytes")

    @classmethod
    def generate(cls) -> Key:
        """A new random key (os.urandom)."""
        return cls(os.urandom(KEY_LEN), os.urandom(KEY_LEN))

    @cached_property
    def _aead(self) -> AESGCM:
        return _aesgcm(self.enc_key)


def _aesgcm(enc_key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(enc_key)


def associated(kind: str, name: str) -> bytes:
    """The associated data for object ``name`` of ``kind`` ("blob", "doc", "index", ...)."""
    if not kind or "\x00" in kind or "\x00" in name:
        raise ValueError(f"bad object kind or name: {kind!r} {name!r}")
    return kind.encode() + b"\x00" + name.encode()


def _describe(aad: bytes) -> str:
    """The object's kind and name as a user reads them, from its associated data."""
    return aad.decode("utf-8", "backslashreplace").replace("\x00", " ") or "(unnamed)"


def _seal(aead: AESGCM, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_LEN)
    head = bytes((VERSION,)) + nonce
    return head + aead.encrypt(nonce, plaintext, head[:1] + aad)


def _open(aead: AESGCM, data: bytes | memoryview, aad: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    view = memoryview(data)
    if len(view) < OVERHEAD:
        raise Tampered(
            _describe(aad),
            f"truncated: {len(view)} bytes, less than the {OVERHEAD} of an empty sealed object",
        )
    if view[0] != VERSION:
        raise Tampered(
            _describe(aad),
            f"format version {view[0]}, this layerfs reads version {VERSION} "
            "(written by a newer layerfs, or damaged)",
        )
    try:
        return aead.decrypt(view[1:HEADER_LEN], view[HEADER_LEN:], bytes(view[:1]) + aad)
    except InvalidTag:
        raise Tampered(
            _describe(aad),
            "authentication failed: damaged, altered, stored under another name, "
            "or sealed with another key",
        ) from None


def seal(key: Key, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    """``plaintext`` encrypted and authenticated, bound to ``aad`` (see ``associated``).

    Layout: version (1 byte) || nonce (12) || ciphertext || tag (16).
    """
    return _seal(key._aead, plaintext, aad)


def open_(key: Key, data: bytes | memoryview, aad: bytes) -> bytes:
    """The plaintext of a sealed object; raises ``Tampered`` naming it if anything changed."""
    return _open(key._aead, data, aad)


def seal_raw(enc_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``seal`` under a bare 32-byte key (the key a password derives, for key files)."""
    return _seal(_aesgcm(enc_key), plaintext, aad)


def open_raw(enc_key: bytes, data: bytes, aad: bytes) -> bytes:
    """``open_`` under a bare 32-byte key."""
    return _open(_aesgcm(enc_key), data, aad)


def content_id(key: Key, data: bytes | memoryview) -> str:
    """The ID of a plaintext: keyed BLAKE3 under ``key.id_key``, 64 lowercase hex digits."""
    from blake3 import blake3

    return blake3(data, key=key.id_key).hexdigest()


def chunker_seed(key: Key) -> int:
    """The repository's pyfastcdc seed, in [1, 2^63 - 1], derived from ``key.id_key``.

    BLAKE3's key-derivation mode with its own context string, so the seed is
    independent of every content ID (no plaintext hashes to it).
    """
    from blake3 import blake3

    raw = blake3(key.id_key, derive_key_context=_CHUNKER_CONTEXT).digest(8)
    return (int.from_bytes(raw, "big") & (2**63 - 1)) or 1


_NAMES_CONTEXT = "layerfs repository 2026-12 document names AES-SIV v1"
NAME_PAD = 32  # names are padded with NULs to a multiple of this before encryption
NAME_PART = 200  # characters per path component of an encrypted name (file name limits)


class NameCipher:
    """Deterministic, reversible encryption of document names (AES-256-SIV).

    The same name always encrypts to the same object name, so a document can be
    found by its name; listing a folder decrypts the names it finds. The folder
    (``images``, ``backups``, ...) stays readable and is bound as associated data;
    the rest is padded with NULs to a multiple of NAME_PAD bytes, encrypted,
    written in lowercase base32 without padding and cut into components of at
    most NAME_PART characters. What leaks: which documents have equal names and
    their length rounded up to NAME_PAD bytes.
    """

    def __init__(self, key: Key) -> None:
        from blake3 import blake3
        from cryptography.hazmat.primitives.ciphers.aead import AESSIV

        self._siv = AESSIV(blake3(key.enc_key, derive_key_context=_NAMES_CONTEXT).digest(64))

    def encrypt(self, folder: str, rest: str) -> str:
        plain = rest.encode()
        plain += b"\x00" * (-len(plain) % NAME_PAD or (NAME_PAD if not plain else 0))
        sealed = self._siv.encrypt(plain, [folder.encode()])
        text = base64.b32encode(sealed).decode().rstrip("=").lower()
        return "/".join(text[i : i + NAME_PART] for i in range(0, len(text), NAME_PART))

    def decrypt(self, folder: str, encrypted: str) -> str:
        """The name ``encrypt`` made; ValueError if it is not one (damaged or foreign)."""
        from cryptography.exceptions import InvalidTag

        text = encrypted.replace("/", "").upper()
        try:
            sealed = base64.b32decode(text + "=" * (-len(text) % 8))
            plain = self._siv.decrypt(sealed, [folder.encode()])
        except (ValueError, InvalidTag, binascii.Error):
            msg = f"{folder}/{encrypted} is not an encrypted name of this repository"
            raise ValueError(msg) from None
        return plain.rstrip(b"\x00").decode()
