"""The repository's building blocks: sealed objects, content IDs, key files, password sources."""

from __future__ import annotations

import json
import sys

import pytest

from layerfs.errors import CorruptObject, LayerfsError
from layerfs.repo import crypto, keys, password
from layerfs.repo.crypto import OVERHEAD, Key, Tampered, associated, content_id, open_, seal
from layerfs.repo.keys import TEST_PARAMS, BadKeyFile, KdfParams, WrongPassword
from layerfs.repo.password import PasswordError, PasswordMissing, get_password

AD = associated("chunk", "ab" * 32)


@pytest.fixture(scope="module")
def key() -> Key:
    return Key.generate()


# -- sealing -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, 65536 + 7])
def test_seal_round_trip(key: Key, size: int) -> None:
    plain = bytes(range(256)) * (size // 256) + bytes(size % 256)
    sealed = seal(key, plain, AD)
    assert len(sealed) == size + OVERHEAD
    assert sealed[0] == crypto.VERSION
    assert open_(key, sealed, AD) == plain
    assert open_(key, memoryview(sealed), AD) == plain


def test_seal_hides_plaintext_and_uses_fresh_nonces(key: Key) -> None:
    plain = b"MARKER-0123456789" * 100
    a, b = seal(key, plain, AD), seal(key, plain, AD)
    assert b"MARKER" not in a
    assert a[1:13] != b[1:13]  # random nonce per object
    assert a != b


def test_every_flipped_byte_is_tampered(key: Key) -> None:
    sealed = seal(key, b"some object bytes", AD)
    for i in range(len(sealed)):
        for bit in (0x01, 0x80):
            damaged = bytearray(sealed)
            damaged[i] ^= bit
            with pytest.raises(Tampered) as info:
                open_(key, bytes(damaged), AD)
            assert "chunk " + "ab" * 32 in str(info.value)


def test_swapped_name_is_tampered(key: Key) -> None:
    sealed = seal(key, b"content of chunk A", associated("chunk", "a" * 64))
    with pytest.raises(Tampered, match=f"object chunk {'b' * 64}: authentication failed"):
        open_(key, sealed, associated("chunk", "b" * 64))
    with pytest.raises(Tampered):  # same name, another kind
        open_(key, sealed, associated("tree", "a" * 64))


def test_truncated_is_tampered(key: Key) -> None:
    sealed = seal(key, b"x" * 100, AD)
    for cut in (0, 1, 13, OVERHEAD - 1, OVERHEAD, len(sealed) - 1):
        with pytest.raises(Tampered):
            open_(key, sealed[:cut], AD)
    with pytest.raises(Tampered, match="truncated: 5 bytes"):
        open_(key, sealed[:5], AD)


def test_other_key_is_tampered(key: Key) -> None:
    with pytest.raises(Tampered):
        open_(Key.generate(), seal(key, b"secret", AD), AD)


def test_unknown_version_names_it(key: Key) -> None:
    sealed = bytearray(seal(key, b"x", AD))
    sealed[0] = 7
    with pytest.raises(Tampered, match="format version 7"):
        open_(key, bytes(sealed), AD)


def test_tampered_is_a_corrupt_object_with_one_line() -> None:
    err = Tampered("tree abc", "authentication failed")
    assert isinstance(err, CorruptObject) and isinstance(err, LayerfsError)
    assert err.object == "tree abc" and "\n" not in str(err)


def test_associated_rejects_nul() -> None:
    with pytest.raises(ValueError):
        associated("chunk\x00tree", "x")
    with pytest.raises(ValueError):
        associated("", "x")


def test_key_validates_and_hides_bytes() -> None:
    k = Key.generate()
    assert k.enc_key != k.id_key
    assert k.enc_key.hex() not in repr(k) and k.id_key.hex() not in repr(k)
    with pytest.raises(ValueError):
        Key(b"short", bytes(32))


# -- content IDs and the chunker seed ---------------------------------------------------


def test_content_id_is_keyed_blake3(key: Key) -> None:
    import blake3

    data = b"chunk data" * 1000
    cid = content_id(key, data)
    assert len(cid) == crypto.ID_HEX_LEN and int(cid, 16) >= 0
    assert cid == content_id(key, memoryview(data))
    assert cid == blake3.blake3(data, key=key.id_key).hexdigest()
    assert cid != blake3.blake3(data).hexdigest()  # not the unkeyed hash
    assert cid != content_id(Key.generate(), data)
    assert cid != content_id(key, data + b"\x00")
    assert content_id(key, b"") != content_id(key, b"\x00")


def test_content_id_does_not_depend_on_enc_key(key: Key) -> None:
    other = Key(bytes(32), key.id_key)
    assert content_id(other, b"abc") == content_id(key, b"abc")


def test_chunker_seed_changes_boundaries(key: Key) -> None:
    import os

    from pyfastcdc import FastCDC

    seed = crypto.chunker_seed(key)
    assert 1 <= seed < 2**63
    assert seed == crypto.chunker_seed(Key(bytes(32), key.id_key))  # from id_key alone
    assert seed != crypto.chunker_seed(Key.generate())
    data = os.urandom(4 << 20)

    def cuts(s: int) -> list[int]:
        cdc = FastCDC(64 << 10, min_size=16 << 10, max_size=256 << 10, seed=s)
        return [c.offset for c in cdc.cut_buf(data)]

    assert cuts(seed) == cuts(seed)
    assert cuts(seed) != cuts(0)
    assert cuts(seed) != cuts(crypto.chunker_seed(Key.generate()))


# -- key files --------------------------------------------------------------------------


def test_wrap_unwrap_round_trip() -> None:
    master = keys.new_master()
    keyfile = keys.wrap(master, "correct horse", TEST_PARAMS, host="h1", user="alice")
    doc = json.loads(keyfile)
    assert set(doc) == {
        "format", "version", "id", "created", "host", "user", "kdf", "params", "salt", "data",
    }  # fmt: skip
    assert doc["kdf"] == "argon2id" and doc["params"] == TEST_PARAMS.params
    assert (doc["host"], doc["user"], doc["version"]) == ("h1", "alice", 1)
    assert doc["format"] == "layerfs-key"
    assert master.enc_key.hex() not in keyfile.decode()
    got = keys.unwrap(keyfile, "correct horse")
    assert got == master
    assert keys.unwrap(keyfile, b"correct horse") == master


def test_wrong_password() -> None:
    keyfile = keys.wrap(keys.new_master(), "right", TEST_PARAMS)
    with pytest.raises(WrongPassword, match="wrong password for key") as info:
        keys.unwrap(keyfile, "wrong")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, LayerfsError)


def test_altered_key_file_does_not_open() -> None:
    keyfile = keys.wrap(keys.new_master(), "pw", TEST_PARAMS)
    doc = json.loads(keyfile)
    other = dict(doc, id="0" * 32)  # the id is bound to the sealed master key
    with pytest.raises(WrongPassword):
        keys.unwrap(json.dumps(other).encode(), "pw")
    salted = dict(doc, salt=keys._b64(b"\x01" * 16))
    with pytest.raises(WrongPassword):
        keys.unwrap(json.dumps(salted).encode(), "pw")


def test_two_key_files_for_one_master() -> None:
    master = keys.new_master()
    first = keys.wrap(master, "first password", TEST_PARAMS)
    second = keys.wrap(master, "second password", TEST_PARAMS)
    assert json.loads(first)["id"] != json.loads(second)["id"]
    assert json.loads(first)["salt"] != json.loads(second)["salt"]
    files = [("k1", first), ("k2", second)]
    assert keys.find_key(files, "first password") == ("k1", master)
    assert keys.find_key(files, "second password") == ("k2", master)
    assert keys.find_key([("k2", second)], "second password")[1] == master  # first removed
    with pytest.raises(WrongPassword, match="none of the repository's 2 key file"):
        keys.find_key(files, "third password")


def test_find_key_passes_over_bad_files() -> None:
    master = keys.new_master()
    good = keys.wrap(master, "pw", TEST_PARAMS)
    files = [("junk", b"not json"), ("good", good)]
    assert keys.find_key(files, "pw") == ("good", master)
    with pytest.raises(WrongPassword, match="1 more unreadable: key file junk"):
        keys.find_key(files, "nope")
    with pytest.raises(BadKeyFile, match="no readable key file"):
        keys.find_key([("junk", b"{}")], "pw")
    with pytest.raises(keys.NoKeys):
        keys.find_key([], "pw")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "restic"}, "format is 'restic'"),
        ({"version": 2}, "version 2"),
        ({"kdf": "md5"}, "unknown KDF 'md5'"),
        ({"params": {"time_cost": 1}}, "needs positive integers"),
        ({"params": {"time_cost": 1, "memory_kib": 4 << 20, "parallelism": 1}}, "over the limit"),
        ({"params": {"time_cost": 10**6, "memory_kib": 1024, "parallelism": 1}}, "time_cost"),
        ({"salt": "!!"}, "key file k"),
        ({"salt": keys._b64(b"short")}, "salt of 5 bytes"),
        ({"host": 3}, "'host'"),
    ],
)
def test_bad_key_file_is_refused_before_any_work(change: dict, message: str) -> None:
    doc = json.loads(keys.wrap(keys.new_master(), "pw", TEST_PARAMS))
    doc.update(change)
    with pytest.raises(BadKeyFile, match=message):
        keys.unwrap(json.dumps(doc).encode(), "pw", "k")


def test_scrypt_key_file() -> None:
    params = KdfParams("scrypt", {"n": 1024, "r": 8, "p": 1})
    master = keys.new_master()
    keyfile = keys.wrap(master, "pw", params)
    assert json.loads(keyfile)["kdf"] == "scrypt"
    assert keys.unwrap(keyfile, "pw") == master
    with pytest.raises(WrongPassword):
        keys.unwrap(keyfile, "pW")


def test_kdf_is_deterministic_and_salted() -> None:
    a = keys.derive("pw", b"s" * 16, TEST_PARAMS)
    assert len(a) == 32 and a == keys.derive(b"pw", b"s" * 16, TEST_PARAMS)
    assert a != keys.derive("pw", b"t" * 16, TEST_PARAMS)
    assert a != keys.derive(
        "pw", b"s" * 16, KdfParams("argon2id", dict(TEST_PARAMS.params, time_cost=2))
    )


def test_default_params_within_limits() -> None:
    keys.DEFAULT_PARAMS.check()
    assert keys.DEFAULT_PARAMS.kdf == "argon2id"
    assert keys.DEFAULT_PARAMS.memory_bytes() <= 256 << 20


def test_empty_password_refused() -> None:
    with pytest.raises(ValueError):
        keys.wrap(keys.new_master(), "", TEST_PARAMS)


# -- password sources -------------------------------------------------------------------


def test_password_file_argument_comes_first(tmp_path) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"s3cret with spaces \r\nsecond line\n")
    env = {"LAYERFS_PASSWORD_FILE": "/nonexistent", "LAYERFS_PASSWORD_COMMAND": "false"}
    got = get_password(f, env)
    assert got.secret == b"s3cret with spaces "
    assert "--password-file" in got.source
    assert "s3cret" not in repr(got)


def test_password_file_env(tmp_path) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"from-env")
    env = {"LAYERFS_PASSWORD_FILE": str(f), "LAYERFS_PASSWORD_COMMAND": "false"}
    assert get_password(None, env).secret == b"from-env"


def test_missing_password_file_is_an_error(tmp_path) -> None:
    with pytest.raises(PasswordError, match=r"cannot read the password file .*nope"):
        get_password(None, {"LAYERFS_PASSWORD_FILE": str(tmp_path / "nope")})
    with pytest.raises(PasswordError, match="--password-file"):
        get_password(tmp_path / "nope", {})
    (tmp_path / "empty").write_bytes(b"\nsecond")
    with pytest.raises(PasswordError, match="empty first line"):
        get_password(tmp_path / "empty", {})


def test_password_command(tmp_path) -> None:
    script = tmp_path / "vault"
    script.write_text("import sys\nprint('from-vault'); print('ignored')\n")
    env = {"LAYERFS_PASSWORD_COMMAND": f"{sys.executable} {script}"}
    got = get_password(None, env)
    assert got.secret == b"from-vault" and got.source == "LAYERFS_PASSWORD_COMMAND"


def test_failing_password_command(tmp_path) -> None:
    script = tmp_path / "vault"
    script.write_text("import sys\nsys.stderr.write('vault is sealed\\n'); sys.exit(3)\n")
    env = {"LAYERFS_PASSWORD_COMMAND": f"{sys.executable} {script}"}
    with pytest.raises(PasswordError, match="exited with status 3: vault is sealed") as info:
        get_password(None, env)
    assert "\n" not in str(info.value)
    with pytest.raises(PasswordError, match="not found"):
        get_password(None, {"LAYERFS_PASSWORD_COMMAND": "/nonexistent/vault get"})
    with pytest.raises(PasswordError, match="printed no password"):
        get_password(None, {"LAYERFS_PASSWORD_COMMAND": "true"})
    with pytest.raises(PasswordError, match="no answer within"):
        get_password(None, {"LAYERFS_PASSWORD_COMMAND": "sleep 5"}, timeout=0.2)


def test_systemd_credential(tmp_path) -> None:
    (tmp_path / "layerfs-password").write_bytes(b"from-systemd\n")
    got = get_password(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert got.secret == b"from-systemd" and "systemd credential" in got.source
    # a command given beforehand wins over the credential
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "LAYERFS_PASSWORD_COMMAND": "echo cmd"}
    assert get_password(None, env).secret == b"cmd"


def test_password_missing_names_every_way(tmp_path) -> None:
    for env in ({}, {"CREDENTIALS_DIRECTORY": str(tmp_path)}, {"LAYERFS_PASSWORD_FILE": ""}):
        with pytest.raises(PasswordMissing) as info:
            get_password(None, env)
        msg = str(info.value)
        for way in ("--password-file", "LAYERFS_PASSWORD_FILE", "LAYERFS_PASSWORD_COMMAND"):
            assert way in msg
        assert "layerfs-password" in msg and "LoadCredential" in msg


def test_password_from_source_opens_key_file(tmp_path, monkeypatch) -> None:
    master = keys.new_master()
    keyfile = keys.wrap(master, "through the credential", TEST_PARAMS)
    (tmp_path / "layerfs-password").write_text("through the credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    for var in ("LAYERFS_PASSWORD_FILE", "LAYERFS_PASSWORD_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    pw = password.get_password()
    assert keys.find_key([("k", keyfile)], pw.secret) == ("k", master)


def test_derive_refuses_huge_params_at_once() -> None:
    huge = KdfParams("argon2id", {"time_cost": 1, "memory_kib": 64 << 20, "parallelism": 1})
    with pytest.raises(ValueError, match="over the limit"):
        keys.derive("pw", b"s" * 16, huge)
    with pytest.raises(ValueError, match="not a power of two"):
        keys.derive("pw", b"s" * 16, KdfParams("scrypt", {"n": 1000, "r": 8, "p": 1}))
