"""Opening a store as a repository: its config, its keys, and sealing every object.

One job: between a raw backend (local directory, S3 bucket) and everything
above it, make the store a repository. A repository has a ``config`` document
saying whether it is encrypted; an encrypted one also has key files under
``keys/``, each holding the master key sealed under one password (see keys).
Opening an encrypted repository finds the password (see password), unwraps the
master key and returns an ``EncryptedBackend``, which

* seals every blob under its content ID and every document under its name
  (AES-256-GCM, see crypto), so a changed, swapped or moved object fails to
  open with an error naming it;
* names content by keyed BLAKE3 (``content_id``) and seeds the chunker;
* encrypts document names (``NameCipher``), so object names reveal no image,
  layer or volume name;
* gives the raw backend a sealer for what it writes itself (an S3 store's
  indexes, pack trailers and lease bodies).

An unencrypted repository is the raw backend itself (BLAKE3 IDs, the public
chunker table). A store with data but no config was written by an earlier
layerfs and is refused. A new store is made a repository when first opened:
encrypted when a password is given, else unencrypted, which S3 stores allow
only when created with ``insecure=True`` (``layerfs init
--insecure-no-encryption``). docs/repository.md describes the format.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from layerfs.errors import CorruptObject, ObjectMissing, StoreError
from layerfs.repo import crypto, keys
from layerfs.repo.password import PasswordMissing, get_password
from layerfs.store.backend import DATA, Backend, DocVersion, Sealer

log = logging.getLogger(__name__)

CONFIG_DOC = "config"
KEYS_PREFIX = "keys/"
FORMAT = "layerfs-repository"
VERSION = 1
ENCRYPTED = "aes-256-gcm"
UNENCRYPTED = "none"
WEAKEN_KDF_ENV = "LAYERFS_TESTONLY_WEAKEN_KDF"  # 1: new key files use TEST_PARAMS (tests only)
_RESERVED = {"config", "keys"}
_CHECK = b"layerfs-repository-config"


class RepositoryError(StoreError):
    """The store is not a repository this layerfs can open as asked."""


class OldFormat(RepositoryError):
    """The store holds data but no repository config: an earlier layerfs wrote it."""


class AlreadyInitialised(RepositoryError):
    """``init`` on a store that is a repository already."""


@dataclass(frozen=True)
class RepoConfig:
    """The ``config`` document: format version, repository id, encryption.

    ``check`` (encrypted repositories) is a sealed object binding the id and the
    encryption to the master key, so nobody without it can alter the config.
    """

    id: str
    encryption: str
    created: str
    check: str = ""

    @property
    def encrypted(self) -> bool:
        return self.encryption == ENCRYPTED

    def encode(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "id": self.id,
            "encryption": self.encryption,
            "created": self.created,
        }
        if self.check:
            doc["check"] = self.check
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, url: str) -> RepoConfig:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("not a layerfs repository config")
            if doc.get("version") != VERSION:
                raise RepositoryError(
                    f"the repository at {url} has format version {doc.get('version')!r}; "
                    f"this layerfs reads version {VERSION}: upgrade layerfs"
                )
            fields = (doc["id"], doc["encryption"], doc["created"], doc.get("check", ""))
            config = cls(*(str(f) for f in fields))
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(f"the repository config of {url} is damaged ({exc})") from None
        if config.encryption not in (ENCRYPTED, UNENCRYPTED):
            raise RepositoryError(
                f"the repository at {url} uses encryption {config.encryption!r}, "
                "which this layerfs does not know: upgrade layerfs"
            )
        return config

    def check_payload(self) -> bytes:
        return _CHECK + b"\x00" + self.id.encode() + b"\x00" + self.encryption.encode()


def read_config(backend: Backend) -> RepoConfig | None:
    """The store's repository config, or None if it has none."""
    try:
        data = backend.get_doc(CONFIG_DOC)
    except ObjectMissing:
        return None
    return RepoConfig.decode(data, backend.url)


def new_key_params() -> keys.KdfParams:
    """Parameters for new key files: the defaults, or weak ones when tests ask for them."""
    if os.environ.get(WEAKEN_KDF_ENV) == "1":
        log.debug("%s=1: new key files use weak KDF parameters (tests only)", WEAKEN_KDF_ENV)
        return keys.TEST_PARAMS
    return keys.DEFAULT_PARAMS


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def init_repository(
    backend: Backend, password: bytes | None, *, insecure: bool = False
) -> RepoConfig:
    """Make an empty store a repository: encrypted under ``password``, or plain if ``insecure``.

    Of two processes initialising one store at once, one wins (its config is
    created with ``create_doc``) and the other's key file is removed again.
    """
    if read_config(backend) is not None:
        raise AlreadyInitialised(f"{backend.url} is a repository already")
    _refuse_old(backend)
    repo_id = secrets.token_hex(16)
    if password is None:
        if not insecure:
            raise RepositoryError(
                f"a new repository at {backend.url} needs a password (or --insecure-no-encryption)"
            )
        config = RepoConfig(repo_id, UNENCRYPTED, _now())
        if not backend.create_doc(CONFIG_DOC, config.encode()):
            raise AlreadyInitialised(f"{backend.url} was made a repository meanwhile")
        log.debug("created an unencrypted repository at %s", backend.url)
        return config
    master = keys.new_master()
    keyfile = keys.wrap(master, password, new_key_params())
    key_name = KEYS_PREFIX + keys.parse(keyfile).id
    backend.put_doc(key_name, keyfile)
    unsealed = RepoConfig(repo_id, ENCRYPTED, _now())
    check = crypto.seal(master, unsealed.check_payload(), crypto.associated("config", CONFIG_DOC))
    config = RepoConfig(repo_id, ENCRYPTED, unsealed.created, base64.b64encode(check).decode())
    if not backend.create_doc(CONFIG_DOC, config.encode()):
        backend.delete_doc(key_name)
        raise AlreadyInitialised(f"{backend.url} was made a repository meanwhile")
    log.debug("created an encrypted repository at %s", backend.url)
    return config


def _refuse_old(backend: Backend) -> None:
    if backend.holds_data():
        raise OldFormat(
            f"the store at {backend.url} was written by an earlier layerfs (it has data but "
            "no repository config); that format is not read any more: use a new store"
        )


def _password(password_file: str | None) -> bytes | None:
    try:
        return get_password(password_file).secret
    except PasswordMissing:
        return None


def open_repository(
    backend: Backend,
    *,
    password_file: str | None = None,
    create: bool = True,
    allow_unencrypted_create: bool = False,
) -> Backend:
    """The store ``backend`` holds, as a repository (see the module docstring).

    A store that is not a repository yet is made one when ``create``: encrypted
    if a password is given, else unencrypted if ``allow_unencrypted_create``
    (the local default store), else an error saying how to create it.
    """
    config = read_config(backend)
    password = _password(password_file)
    if config is None:
        if not create:
            raise RepositoryError(f"{backend.url} is not a repository: run `layerfs init`")
        _refuse_old(backend)
        if password is None and not allow_unencrypted_create:
            raise RepositoryError(
                f"{backend.url} is not a repository yet and no password is given: run "
                f"`layerfs init --store {backend.url}` with a password (--password-file, "
                "LAYERFS_PASSWORD_FILE, LAYERFS_PASSWORD_COMMAND), or with "
                "--insecure-no-encryption"
            )
        try:
            config = init_repository(backend, password, insecure=password is None)
        except AlreadyInitialised:
            config = read_config(backend)
            if config is None:  # pragma: no cover - created then removed at once
                raise
    if not config.encrypted:
        _remember(backend, config)
        if password is not None or backend.list_docs(KEYS_PREFIX):
            raise RepositoryError(
                f"the repository at {backend.url} is not encrypted, but a password was given "
                "(or it has key files): refusing to write plaintext where encryption was "
                "expected; was its config replaced?"
            )
        return backend
    if password is None:
        get_password(password_file)  # raises PasswordMissing, naming every way to give one
    assert password is not None
    key_name, master = unlock(backend, password)
    verify_config(config, master, backend.url)
    _remember(backend, config)
    return EncryptedBackend(backend, master, config, key_name)


SEEN_FILE = "repository-seen.json"


def _remember(backend: Backend, config: RepoConfig) -> None:
    """Trust on first use: refuse a repository that lost its encryption since this host saw it.

    The first open records the repository's id and encryption in the store's
    local cache directory (which, for an S3 store, is on this host). A later
    config that says "none" where this host saw an encrypted repository of that
    bucket means someone replaced it: writing plaintext there is refused.
    """
    path = backend.cache_dir() / SEEN_FILE
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = None
    if isinstance(seen, dict) and seen.get("encryption") == ENCRYPTED and not config.encrypted:
        raise RepositoryError(
            f"the repository at {backend.url} is not encrypted any more (this host saw the "
            f"encrypted repository {seen.get('id')} there); refusing to write plaintext: was "
            f"its config replaced? If it was re-created on purpose, remove {path}"
        )
    if seen == {"id": config.id, "encryption": config.encryption}:
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{SEEN_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps({"id": config.id, "encryption": config.encryption}))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot record the repository seen at %s: %s", backend.url, exc)


def key_files(backend: Backend) -> list[tuple[str, bytes]]:
    """(document name, bytes) of every key file."""
    return [(n, backend.get_doc(n)) for n in backend.list_docs(KEYS_PREFIX)]


@lru_cache(maxsize=16)
def _unwrap(keyfile: bytes, password: bytes | str, name: str) -> crypto.Key:
    """keys.unwrap, remembered: a process opens its store many times, the KDF costs ~0.5 s."""
    return keys.unwrap(keyfile, password, name)


def unlock(backend: Backend, password: bytes) -> tuple[str, crypto.Key]:
    """(key file name, master key) for the first key file ``password`` opens."""
    return keys.find_key(key_files(backend), password, url=backend.url, opener=_unwrap)


def verify_config(config: RepoConfig, master: crypto.Key, url: str) -> None:
    """Raise RepositoryError unless ``config`` was written by a holder of ``master``."""
    try:
        sealed = base64.b64decode(config.check, validate=True)
        plain = crypto.open_(master, sealed, crypto.associated("config", CONFIG_DOC))
    except (ValueError, CorruptObject):
        plain = b""
    if plain != config.check_payload():
        raise RepositoryError(
            f"the repository config of {url} does not match its keys: it was altered"
        )


class _RepoSealer(Sealer):
    """Seals what a raw backend writes for itself, under the master key."""

    def __init__(self, key: crypto.Key) -> None:
        self.key = key

    def seal(self, kind: str, name: str, data: bytes) -> bytes:
        return crypto.seal(self.key, data, crypto.associated(kind, name))

    def open(self, kind: str, name: str, data: bytes) -> bytes:
        return crypto.open_(self.key, data, crypto.associated(kind, name))

    def blob_intact(self, digest: str, blob: bytes | memoryview) -> bool:
        try:
            crypto.open_(self.key, blob, crypto.associated("blob", digest))
        except CorruptObject:
            return False
        return True


class EncryptedBackend(Backend):
    """A raw backend with every object sealed and every document name encrypted."""

    def __init__(
        self, inner: Backend, master: crypto.Key, config: RepoConfig, key_name: str
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.config = config
        self.key_name = key_name
        self._key = master
        self._names = crypto.NameCipher(master)
        self.chunker_seed = crypto.chunker_seed(master)
        inner.sealer = _RepoSealer(master)

    def __getattr__(self, name: str) -> object:
        """What the raw backend offers beyond the Backend interface (a local store's
        ``blob_path``, an S3 store's ``stats``), about the stored (sealed) objects."""
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- naming -------------------------------------------------------------
    def content_id(self, data: bytes | memoryview) -> str:
        return crypto.content_id(self._key, data)

    def _seal_blob(self, digest: str, data: bytes | memoryview) -> bytes:
        return crypto.seal(self._key, data, crypto.associated("blob", digest))

    def _open_blob(self, digest: str, blob: bytes | memoryview) -> bytes:
        try:
            return crypto.open_(self._key, blob, crypto.associated("blob", digest))
        except CorruptObject as exc:
            log.error("damaged object %s in %s: %s", digest, self.url, exc)
            raise

    def _doc_object(self, name: str) -> str:
        folder, sep, rest = name.partition("/")
        if not sep or not rest or folder in _RESERVED:
            raise StoreError(f"invalid document name {name!r}")
        return f"{folder}/{self._names.encrypt(folder, rest)}"

    # -- blobs --------------------------------------------------------------
    def put_blob(self, digest: str, data: bytes, kind: str = DATA) -> bool:
        return self.inner.put_blob(digest, self._seal_blob(digest, data), kind)

    def get_blob(self, digest: str) -> bytes:
        return self._open_blob(digest, self.inner.get_blob(digest))

    def read_blobs(
        self,
        digests: Iterable[str],
        consume: Callable[[str, bytes], None],
        fail: Callable[[str, Exception], None],
        workers: int = 1,
    ) -> None:
        def opened(digest: str, blob: bytes) -> None:
            try:
                plain = self._open_blob(digest, blob)
            except CorruptObject as exc:
                fail(digest, exc)
                return
            consume(digest, plain)

        self.inner.read_blobs(digests, opened, fail, workers)

    def read_blobs_in_order(
        self, digests: Iterable[str], ahead: int = 32
    ) -> Generator[bytes, None, None]:
        asked: deque[str] = deque()

        def names() -> Iterator[str]:
            for digest in digests:
                asked.append(digest)
                yield digest

        blobs = self.inner.read_blobs_in_order(names(), ahead)
        try:
            for blob in blobs:
                yield self._open_blob(asked.popleft(), blob)
        finally:
            blobs.close()

    def has_blob(self, digest: str) -> bool:
        return self.inner.has_blob(digest)

    def delete_blobs(self, digests: list[str]) -> int:
        return self.inner.delete_blobs(digests)

    def iter_blobs(self) -> Iterator[tuple[str, int]]:
        return self.inner.iter_blobs()

    def iter_blob_times(self) -> Iterator[tuple[str, int, float | None]]:
        return self.inner.iter_blob_times()

    def flush(self) -> None:
        self.inner.flush()

    def refresh(self) -> None:
        self.inner.refresh()

    def check_lease(self) -> None:
        self.inner.check_lease()

    def clean_tmp(self) -> int:
        return self.inner.clean_tmp()

    # -- docs ---------------------------------------------------------------
    def put_doc(self, name: str, data: bytes) -> None:
        sealed = crypto.seal(self._key, data, crypto.associated("doc", name))
        self.inner.put_doc(self._doc_object(name), sealed)

    def create_doc(self, name: str, data: bytes) -> bool:
        sealed = crypto.seal(self._key, data, crypto.associated("doc", name))
        return self.inner.create_doc(self._doc_object(name), sealed)

    def get_doc(self, name: str) -> bytes:
        obj = self._doc_object(name)
        try:
            sealed = self.inner.get_doc(obj)
        except ObjectMissing:
            raise ObjectMissing(f"document {name} is missing from the store {self.url}") from None
        return crypto.open_(self._key, sealed, crypto.associated("doc", name))

    def delete_doc(self, name: str) -> None:
        self.inner.delete_doc(self._doc_object(name))

    def get_doc_version(self, name: str) -> DocVersion:
        try:
            found = self.inner.get_doc_version(self._doc_object(name))
        except ObjectMissing:
            raise ObjectMissing(f"document {name} is missing from the store {self.url}") from None
        data = crypto.open_(self._key, found.data, crypto.associated("doc", name))
        return DocVersion(data, found.tag, found.age)

    def swap_doc(self, name: str, data: bytes, tag: str | None) -> str | None:
        sealed = crypto.seal(self._key, data, crypto.associated("doc", name))
        return self.inner.swap_doc(self._doc_object(name), sealed, tag)

    def list_docs(self, prefix: str) -> list[str]:
        folder = prefix.split("/", 1)[0]
        if not folder or folder in _RESERVED:
            folders = {n.split("/", 1)[0] for n in self.inner.list_docs("")} - _RESERVED
        else:
            folders = {folder}
        out = []
        for f in sorted(folders):
            for obj in self.inner.list_docs(f + "/"):
                try:
                    name = f"{f}/{self._names.decrypt(f, obj[len(f) + 1 :])}"
                except ValueError as exc:
                    log.warning("ignoring the object docs/%s in %s: %s", obj, self.url, exc)
                    continue
                if name.startswith(prefix):
                    out.append(name)
        return sorted(out)

    def holds_data(self) -> bool:
        return self.inner.holds_data()

    # -- coordination and local state -----------------------------------------
    def lock(self, exclusive: bool) -> AbstractContextManager[None]:
        return self.inner.lock(exclusive)

    def cache_dir(self) -> Path:
        return self.inner.cache_dir()

    def close(self) -> None:
        self.inner.close()

    # -- keys -----------------------------------------------------------------
    @property
    def key_id(self) -> str:
        """The id of the key file the password opened."""
        return self.key_name[len(KEYS_PREFIX) :]

    def keys(self) -> list[keys.KeyFile]:
        """The repository's key files, parsed (unreadable ones are skipped and logged)."""
        out = []
        for name, data in key_files(self.inner):
            try:
                out.append(keys.parse(data, name))
            except keys.BadKeyFile as exc:
                log.warning("%s", exc)
        return out

    def add_key(self, password: bytes) -> str:
        """Add a key file for ``password``; return its id."""
        keyfile = keys.wrap(self._key, password, new_key_params())
        key_id = keys.parse(keyfile).id
        self.inner.put_doc(KEYS_PREFIX + key_id, keyfile)
        return key_id

    def remove_key(self, key_id: str) -> None:
        """Remove a key file by id or unique id prefix.

        The last one is never removed, nor the one this backend's password
        opened (that would lock the caller out: see ``change_password``).
        """
        names = self.inner.list_docs(KEYS_PREFIX)
        matches = [n for n in names if n[len(KEYS_PREFIX) :].startswith(key_id)] if key_id else []
        if not matches:
            raise RepositoryError(f"no key {key_id!r} in {self.url}: see `layerfs key list`")
        if len(matches) > 1:
            raise RepositoryError(f"key id prefix {key_id!r} is ambiguous: give more characters")
        if len(names) == 1:
            raise RepositoryError(
                f"refusing to remove the last key of {self.url}: nobody could open it any more"
            )
        if matches[0] == self.key_name:
            raise RepositoryError(
                f"refusing to remove key {key_id}: it is the one your password opened; "
                "open the repository with another key's password, or use `layerfs key passwd`"
            )
        self.inner.delete_doc(matches[0])

    def change_password(self, password: bytes) -> str:
        """Replace the key file the password opened by one for ``password``; return its id."""
        key_id = self.add_key(password)
        self.inner.delete_doc(self.key_name)
        self.key_name = KEYS_PREFIX + key_id
        return key_id
