"""Envelope encryption, key files with rotation, HPKE-sealed passwords, instance secrets."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import pickle
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from sipis import crypto
from sipis.crypto import (
    HPKE_SUITES,
    SUITE_MLKEM768_X25519,
    SUITE_X25519,
    CryptoError,
    DataKey,
    HpkeKeyring,
    MasterKeyring,
    hash_secret,
    new_secret,
    password_info,
    seal,
    secret_matches,
)

AOR = "sip:alice@example.com"
PASSWORD = b"correct horse battery staple"
DAY = 86400.0


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def flipped(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def each_byte_flipped(blob: bytes) -> Iterator[bytes]:
    for index in range(len(blob)):
        yield flipped(blob, index)


def collect_errors(*operations: Callable[[], object]) -> list[CryptoError]:
    errors = []
    for operation in operations:
        with pytest.raises(CryptoError) as caught:
            operation()
        errors.append(caught.value)
    return errors


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "keys"


# --- data keys ------------------------------------------------------------


def test_data_key_round_trip_and_blob_layout() -> None:
    key = DataKey.generate()
    blob = key.encrypt("inst-1", "password", b"hunter2")
    assert blob[0] == 1
    assert len(blob) == 1 + 12 + len(b"hunter2") + 16
    assert key.decrypt("inst-1", "password", blob) == b"hunter2"
    assert key.encrypt("inst-1", "password", b"hunter2") != blob  # fresh nonce each time
    assert key.decrypt("inst-1", "empty", key.encrypt("inst-1", "empty", b"")) == b""


@pytest.mark.parametrize(
    ("instance_id", "field"),
    [("inst-2", "password"), ("inst-1", "auth_username"), ("inst-1password", ""), ("", "")],
)
def test_data_blob_is_bound_to_instance_and_field(instance_id: str, field: str) -> None:
    key = DataKey.generate()
    blob = key.encrypt("inst-1", "password", b"hunter2")
    with pytest.raises(CryptoError) as caught:
        key.decrypt(instance_id, field, blob)
    assert caught.value.code == "authentication_failed"


def test_associated_data_is_length_prefixed_not_concatenated() -> None:
    key = DataKey.generate()
    blob = key.encrypt("ab", "c", b"x")
    with pytest.raises(CryptoError):
        key.decrypt("a", "bc", blob)
    assert crypto._field_ad("ab", "c") != crypto._field_ad("a", "bc")
    assert crypto._field_ad("ab", "c") == (
        b"\x00\x00\x00\x0esipis field v1" + b"\x00\x00\x00\x02ab" + b"\x00\x00\x00\x01c"
    )


def test_any_flipped_bit_or_truncation_of_a_data_blob_is_refused() -> None:
    key = DataKey.generate()
    blob = key.encrypt("inst-1", "password", b"hunter2")
    for bad in each_byte_flipped(blob):
        with pytest.raises(CryptoError) as caught:
            key.decrypt("inst-1", "password", bad)
        assert caught.value.code in {"authentication_failed", "malformed"}
        assert caught.value.__cause__ is None  # no cryptography exception shown as the cause
        assert caught.value.__context__ is None or caught.value.__suppress_context__
    for length in range(len(blob)):
        with pytest.raises(CryptoError):
            key.decrypt("inst-1", "password", blob[:length])


def test_another_data_key_cannot_decrypt() -> None:
    blob = DataKey.generate().encrypt("inst-1", "password", b"hunter2")
    with pytest.raises(CryptoError):
        DataKey.generate().decrypt("inst-1", "password", blob)


def test_destroyed_data_key_refuses_use() -> None:
    key = DataKey(bytes(range(32)))
    blob = key.encrypt("inst-1", "password", b"hunter2")
    buffer = key._key  # the one buffer the object held: emptied in place, not just dropped
    key.destroy()
    assert buffer == bytearray()
    assert key.destroyed
    assert repr(key) == "<DataKey destroyed>"
    errors = collect_errors(
        lambda: key.encrypt("inst-1", "password", b"x"),
        lambda: key.decrypt("inst-1", "password", blob),
    )
    assert [error.code for error in errors] == ["key_destroyed", "key_destroyed"]
    assert DataKey(bytes(range(32))).decrypt("inst-1", "password", blob) == b"hunter2"


def test_data_key_is_never_pickled_or_copied_and_has_exact_length() -> None:
    key = DataKey.generate()
    leaks: list[Callable[[DataKey], object]] = [pickle.dumps, copy.copy, copy.deepcopy]
    for leak in leaks:
        with pytest.raises(TypeError):
            leak(key)
    for length in (0, 16, 31, 33):
        with pytest.raises(CryptoError):
            DataKey(bytes(length))


# --- master keyring -------------------------------------------------------


def test_master_keyring_created_private_on_first_use(key_dir: Path) -> None:
    old_umask = os.umask(0)
    try:
        ring = MasterKeyring.load_or_create(key_dir / "master.json")
    finally:
        os.umask(old_umask)
    path = key_dir / "master.json"
    assert mode(key_dir) == 0o700
    assert mode(path) == 0o600
    document = json.loads(path.read_text())
    assert document["format"] == "sipis-master-keys"
    assert [entry["id"] for entry in document["keys"]] == [ring.current_key_id]
    assert len(base64.b64decode(document["keys"][0]["key"])) == 32
    assert MasterKeyring.load_or_create(path).current_key_id == ring.current_key_id


def test_wrap_unwrap_round_trip_and_blob_layout(key_dir: Path) -> None:
    ring = MasterKeyring.load_or_create(key_dir / "master.json")
    data_key = DataKey.generate()
    field_blob = data_key.encrypt("inst-1", "password", b"hunter2")
    wrapped = ring.wrap("inst-1", data_key)
    key_id = ring.current_key_id
    assert wrapped[0] == 1
    assert wrapped[1] == len(key_id)
    assert wrapped[2 : 2 + len(key_id)] == key_id.encode()
    assert len(wrapped) == 2 + len(key_id) + 12 + 32 + 16
    assert MasterKeyring.key_id_of(wrapped) == key_id
    unwrapped = ring.unwrap("inst-1", wrapped)
    assert unwrapped.decrypt("inst-1", "password", field_blob) == b"hunter2"


def test_wrapped_key_is_bound_to_its_instance_and_tamper_evident(key_dir: Path) -> None:
    ring = MasterKeyring.load_or_create(key_dir / "master.json")
    wrapped = ring.wrap("inst-1", DataKey.generate())
    with pytest.raises(CryptoError) as caught:
        ring.unwrap("inst-2", wrapped)
    assert caught.value.code == "authentication_failed"
    for bad in each_byte_flipped(wrapped):
        with pytest.raises(CryptoError):
            ring.unwrap("inst-1", bad)
    for length in range(len(wrapped)):
        with pytest.raises(CryptoError):
            ring.unwrap("inst-1", wrapped[:length])
    with pytest.raises(CryptoError):
        MasterKeyring.key_id_of(b"\x02\x08deadbeef")


def test_rotation_keeps_old_blobs_and_wraps_under_the_new_key(key_dir: Path) -> None:
    ring = MasterKeyring.load_or_create(key_dir / "master.json")
    first_id = ring.current_key_id
    data_key = DataKey.generate()
    field_blob = data_key.encrypt("inst-1", "password", b"hunter2")
    before = ring.wrap("inst-1", data_key)
    new_id = ring.rotate()
    assert new_id != first_id
    assert ring.current_key_id == new_id
    assert ring.key_ids() == [first_id, new_id]
    after = ring.wrap("inst-1", data_key)
    assert MasterKeyring.key_id_of(before) == first_id
    assert MasterKeyring.key_id_of(after) == new_id
    for blob in (before, after):
        assert ring.unwrap("inst-1", blob).decrypt("inst-1", "password", field_blob) == b"hunter2"


def test_retire_removes_only_the_named_unused_keys_and_never_the_current(key_dir: Path) -> None:
    path = key_dir / "master.json"
    ring = MasterKeyring.load_or_create(path)
    first_id = ring.current_key_id
    under_first = ring.wrap("inst-1", DataKey.generate())
    second_id = ring.rotate()
    under_second = ring.wrap("inst-2", DataKey.generate())
    current_id = ring.rotate()

    with pytest.raises(CryptoError) as caught:
        ring.retire([first_id, current_id])
    assert caught.value.code == "current_key"
    with pytest.raises(CryptoError) as caught:
        ring.retire([first_id, "0badc0de"])
    assert caught.value.code == "unknown_key_id"
    assert ring.key_ids() == [first_id, second_id, current_id]  # refused: nothing changed

    rewrapped = ring.wrap("inst-1", ring.unwrap("inst-1", under_first))
    ring.retire([first_id])
    assert ring.key_ids() == [second_id, current_id]
    assert [entry["id"] for entry in json.loads(path.read_text())["keys"]] == [
        second_id,
        current_id,
    ]
    with pytest.raises(CryptoError) as caught:
        ring.unwrap("inst-1", under_first)
    assert caught.value.code == "unknown_key_id"
    assert first_id in str(caught.value)
    ring.unwrap("inst-1", rewrapped)
    ring.unwrap("inst-2", under_second)


def test_a_second_keyring_on_the_same_file_sees_rotation_and_retirement(key_dir: Path) -> None:
    path = key_dir / "master.json"
    cli = MasterKeyring.load_or_create(path)
    server = MasterKeyring.load_or_create(path)
    old_id = server.current_key_id
    under_old = server.wrap("inst-1", DataKey.generate())

    new_id = cli.rotate()
    under_new = cli.wrap("inst-2", DataKey.generate())
    server.unwrap("inst-2", under_new)  # a key id this object had not seen: reloads
    assert MasterKeyring.key_id_of(server.wrap("inst-3", DataKey.generate())) == new_id

    cli.retire([old_id])
    with pytest.raises(CryptoError) as caught:
        server.unwrap("inst-1", under_old)
    assert caught.value.code == "unknown_key_id"


def test_rotation_replaces_the_file_atomically_with_private_mode(key_dir: Path) -> None:
    path = key_dir / "master.json"
    ring = MasterKeyring.load_or_create(path)
    before = path.stat()
    ring.rotate()
    after = path.stat()
    assert after.st_ino != before.st_ino  # a new file renamed over the old one
    assert after.st_mtime_ns > before.st_mtime_ns
    assert mode(path) == 0o600
    assert sorted(p.name for p in key_dir.iterdir()) == ["master.json", "master.json.lock"]


def test_each_version_of_a_key_file_has_a_later_mtime_even_within_one_tick(
    key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = key_dir / "master.json"
    ring = MasterKeyring.load_or_create(path)
    monkeypatch.setattr(time, "time_ns", lambda: 1)
    mtimes = [path.stat().st_mtime_ns]
    first = ring.current_key_id
    ring.rotate()
    mtimes.append(path.stat().st_mtime_ns)
    ring.retire([first])
    mtimes.append(path.stat().st_mtime_ns)
    assert mtimes[1] == mtimes[0] + 1  # the clock says 1 ns since the epoch: stuck in the past
    assert mtimes[2] == mtimes[1] + 1


def test_a_failed_write_leaves_the_old_file_and_keyring_intact(
    key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = key_dir / "master.json"
    ring = MasterKeyring.load_or_create(path)
    old_id = ring.current_key_id
    content = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(CryptoError) as caught:
        ring.rotate()
    assert caught.value.code == "key_file"
    assert "No space left on device" in str(caught.value)
    monkeypatch.undo()
    assert path.read_bytes() == content
    assert sorted(p.name for p in key_dir.iterdir()) == ["master.json", "master.json.lock"]
    assert MasterKeyring.key_id_of(ring.wrap("inst-1", DataKey.generate())) == old_id


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"format": "sipis-hpke-keys", "version": 1, "keys": []}',
        b'{"format": "sipis-master-keys", "version": 2, "keys": []}',
        b'{"format": "sipis-master-keys", "version": 1, "current": "aa", "keys": []}',
        b'{"format": "sipis-master-keys", "version": 1, "current": "aa",'
        b' "keys": [{"id": "aa", "created": 0, "key": "c2hvcnQ="}]}',
    ],
)
def test_a_broken_master_key_file_is_refused_and_left_alone(key_dir: Path, content: bytes) -> None:
    key_dir.mkdir(parents=True)
    path = key_dir / "master.json"
    path.write_bytes(content)
    with pytest.raises(CryptoError) as caught:
        MasterKeyring.load_or_create(path)
    assert caught.value.code == "key_file"
    assert str(path) in str(caught.value)
    assert path.read_bytes() == content


def test_a_vanished_key_file_is_an_error_not_a_silent_fallback(key_dir: Path) -> None:
    path = key_dir / "master.json"
    ring = MasterKeyring.load_or_create(path)
    path.unlink()
    with pytest.raises(CryptoError) as caught:
        ring.wrap("inst-1", DataKey.generate())
    assert caught.value.code == "key_file"


# --- HPKE -----------------------------------------------------------------


def current_keys(ring: HpkeKeyring) -> dict[str, dict[str, object]]:
    return {key["suite"]: key for key in ring.public_keys() if key["current"]}


def test_hpke_keyring_creates_one_private_key_per_suite(key_dir: Path) -> None:
    path = key_dir / "hpke.json"
    ring = HpkeKeyring.load_or_create(path)
    assert mode(path) == 0o600
    assert mode(key_dir) == 0o700
    published = ring.public_keys()
    assert [key["suite"] for key in published] == list(HPKE_SUITES)
    assert all(key["current"] for key in published)
    document = json.loads(path.read_text())
    assert document["format"] == "sipis-hpke-keys"
    assert {entry["id"] for entry in document["keys"]} == {key["key_id"] for key in published}
    assert all(entry["retired_at"] is None for entry in document["keys"])
    reloaded = HpkeKeyring.load_or_create(path)
    assert reloaded.public_keys() == published


def test_hpke_public_key_encodings_are_as_documented(key_dir: Path) -> None:
    path = key_dir / "hpke.json"
    ring = HpkeKeyring.load_or_create(path)
    entries = {entry["suite"]: entry for entry in json.loads(path.read_text())["keys"]}
    published = current_keys(ring)

    x25519_private = base64.b64decode(entries[SUITE_X25519]["private_key"])
    assert len(x25519_private) == 32
    assert base64.b64decode(str(published[SUITE_X25519]["public_key"])) == (
        x25519.X25519PrivateKey.from_private_bytes(x25519_private).public_key().public_bytes_raw()
    )

    hybrid_private = base64.b64decode(entries[SUITE_MLKEM768_X25519]["private_key"])
    assert len(hybrid_private) == 64 + 32
    kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(hybrid_private[:64])
    dh = x25519.X25519PrivateKey.from_private_bytes(hybrid_private[64:])
    hybrid_public = base64.b64decode(str(published[SUITE_MLKEM768_X25519]["public_key"]))
    assert len(hybrid_public) == 1216
    assert hybrid_public == (
        kem.public_key().public_bytes_raw() + dh.public_key().public_bytes_raw()
    )


@pytest.mark.parametrize(
    ("suite", "enc_length"), [(SUITE_X25519, 32), (SUITE_MLKEM768_X25519, 1120)]
)
def test_sealed_password_opens_for_its_aor_only(key_dir: Path, suite: str, enc_length: int) -> None:
    ring = HpkeKeyring.load_or_create(key_dir / "hpke.json")
    key = current_keys(ring)[suite]
    sealed = seal(str(key["public_key"]), suite, AOR, PASSWORD)
    assert len(sealed) == enc_length + len(PASSWORD) + 16
    assert ring.open(sealed, str(key["key_id"]), AOR) == PASSWORD
    for other_aor in ("sip:bob@example.com", "sip:alice@example.com ", "SIP:alice@example.com"):
        with pytest.raises(CryptoError) as caught:
            ring.open(sealed, str(key["key_id"]), other_aor)
        assert caught.value.code == "authentication_failed"


def test_password_info_encoding() -> None:
    assert password_info("sip:älice@example.com") == (
        b"sipis password v1\x00sip:\xc3\xa4lice@example.com"
    )


@pytest.mark.parametrize("suite", HPKE_SUITES)
def test_any_flipped_bit_or_truncation_of_a_sealed_password_is_refused(
    key_dir: Path, suite: str
) -> None:
    ring = HpkeKeyring.load_or_create(key_dir / "hpke.json")
    key = current_keys(ring)[suite]
    key_id = str(key["key_id"])
    sealed = seal(str(key["public_key"]), suite, AOR, b"pw")
    for bad in each_byte_flipped(sealed):
        with pytest.raises(CryptoError) as caught:
            ring.open(bad, key_id, AOR)
        assert caught.value.code == "authentication_failed"
    for length in (0, 1, len(sealed) // 2, len(sealed) - 1):
        with pytest.raises(CryptoError):
            ring.open(sealed[:length], key_id, AOR)


def test_sealed_password_refused_under_another_or_unknown_key(key_dir: Path) -> None:
    ring = HpkeKeyring.load_or_create(key_dir / "hpke.json")
    keys = current_keys(ring)
    sealed = seal(str(keys[SUITE_X25519]["public_key"]), SUITE_X25519, AOR, PASSWORD)
    with pytest.raises(CryptoError):
        ring.open(sealed, str(keys[SUITE_MLKEM768_X25519]["key_id"]), AOR)
    with pytest.raises(CryptoError) as caught:
        ring.open(sealed, "0badc0de", AOR)
    assert caught.value.code == "unknown_key_id"


@pytest.mark.parametrize(
    ("public_key", "suite"),
    [
        ("not base64!", SUITE_X25519),
        (base64.b64encode(bytes(31)).decode(), SUITE_X25519),
        (base64.b64encode(bytes(32)).decode(), SUITE_MLKEM768_X25519),
        (base64.b64encode(b"\xff" * 1216).decode(), SUITE_MLKEM768_X25519),
        (base64.b64encode(bytes(32)).decode(), "X25519-SHA256-CHACHA20POLY1305"),
    ],
)
def test_seal_refuses_bad_public_keys_and_suites(public_key: str, suite: str) -> None:
    with pytest.raises(CryptoError) as caught:
        seal(public_key, suite, AOR, PASSWORD)
    assert caught.value.code == "malformed"


def test_hpke_rotation_keeps_old_keys_for_the_grace_period(key_dir: Path) -> None:
    path = key_dir / "hpke.json"
    clock = FakeClock()
    ring = HpkeKeyring.load_or_create(path, grace=7 * DAY, clock=clock)
    old = current_keys(ring)
    sealed = {
        suite: seal(str(key["public_key"]), suite, AOR, PASSWORD) for suite, key in old.items()
    }
    new_ids = ring.rotate()
    assert set(new_ids) == set(HPKE_SUITES)
    assert {suite: key["key_id"] for suite, key in current_keys(ring).items()} == new_ids
    retired = {entry["id"]: entry["retired_at"] for entry in json.loads(path.read_text())["keys"]}
    assert {retired[str(key["key_id"])] for key in old.values()} == {clock.now}

    clock.now += 1 * DAY
    for suite, key in old.items():
        assert ring.open(sealed[suite], str(key["key_id"]), AOR) == PASSWORD
    listed = ring.public_keys()
    assert len(listed) == 4
    assert {key["key_id"] for key in listed if not key["current"]} == {
        key["key_id"] for key in old.values()
    }

    clock.now += 7 * DAY  # retired 8 days ago
    for suite, key in old.items():
        with pytest.raises(CryptoError) as caught:
            ring.open(sealed[suite], str(key["key_id"]), AOR)
        assert caught.value.code == "key_expired"
    assert {key["key_id"] for key in ring.public_keys()} == set(new_ids.values())

    HpkeKeyring.load_or_create(path, grace=7 * DAY, clock=clock)  # drops the expired keys
    assert {entry["id"] for entry in json.loads(path.read_text())["keys"]} == set(new_ids.values())


def test_hpke_grace_boundary_and_pruning_on_rotate(key_dir: Path) -> None:
    path = key_dir / "hpke.json"
    clock = FakeClock()
    ring = HpkeKeyring.load_or_create(path, grace=100.0, clock=clock)
    first = current_keys(ring)[SUITE_X25519]
    sealed = seal(str(first["public_key"]), SUITE_X25519, AOR, PASSWORD)
    second_ids = ring.rotate()
    clock.now += 100.0
    assert ring.open(sealed, str(first["key_id"]), AOR) == PASSWORD
    clock.now += 0.5
    with pytest.raises(CryptoError):
        ring.open(sealed, str(first["key_id"]), AOR)
    third_ids = ring.rotate()
    ids_on_disk = {entry["id"] for entry in json.loads(path.read_text())["keys"]}
    assert ids_on_disk == set(second_ids.values()) | set(third_ids.values())


def test_a_second_hpke_keyring_sees_a_rotation(key_dir: Path) -> None:
    path = key_dir / "hpke.json"
    cli = HpkeKeyring.load_or_create(path)
    server = HpkeKeyring.load_or_create(path)
    new_ids = cli.rotate()
    key = current_keys(cli)[SUITE_MLKEM768_X25519]
    sealed = seal(str(key["public_key"]), SUITE_MLKEM768_X25519, AOR, PASSWORD)
    assert server.open(sealed, new_ids[SUITE_MLKEM768_X25519], AOR) == PASSWORD
    assert current_keys(server) == current_keys(cli)


# --- instance secrets -----------------------------------------------------


def test_new_secret_is_256_random_bits_in_base64url() -> None:
    secret = new_secret()
    assert len(secret) == 43
    assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32
    assert len({new_secret() for _ in range(100)}) == 100


def test_secret_hash_and_constant_time_match(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = new_secret()
    stored = hash_secret(secret)
    assert stored == hashlib.sha256(secret.encode()).digest()
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return bool(original(a, b))

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert secret_matches(secret, stored)
    assert not secret_matches(new_secret(), stored)
    assert not secret_matches(secret[:-1], stored)
    assert not secret_matches("\udcff", stored)
    assert len(compared) == 4
    assert all(b == stored for _, b in compared)


# --- nothing secret leaks into text ---------------------------------------


def spellings(secret: bytes) -> set[str]:
    forms = {
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
    }
    return {form for form in forms if len(form) >= 8}


def test_no_key_material_or_plaintext_in_any_repr_str_or_error(key_dir: Path) -> None:
    master_path, hpke_path = key_dir / "master.json", key_dir / "hpke.json"
    master = MasterKeyring.load_or_create(master_path)
    master.rotate()
    hpke_ring = HpkeKeyring.load_or_create(hpke_path)
    data_material = bytes(range(100, 132))
    data_key = DataKey(data_material)
    plaintext = b"plaintext-password-hunter2"
    field_blob = data_key.encrypt("inst-1", "password", plaintext)
    wrapped = master.wrap("inst-1", data_key)
    key = current_keys(hpke_ring)[SUITE_MLKEM768_X25519]
    sealed = seal(str(key["public_key"]), SUITE_MLKEM768_X25519, AOR, plaintext)

    secret_values = [data_material, plaintext, PASSWORD]
    secret_values += [
        base64.b64decode(entry["key"]) for entry in json.loads(master_path.read_text())["keys"]
    ]
    secret_values += [
        base64.b64decode(entry["private_key"])
        for entry in json.loads(hpke_path.read_text())["keys"]
    ]
    errors = collect_errors(
        lambda: data_key.decrypt("inst-2", "password", field_blob),
        lambda: data_key.decrypt("inst-1", "password", flipped(field_blob, 20)),
        lambda: master.unwrap("inst-2", wrapped),
        lambda: master.unwrap("inst-1", flipped(wrapped, 30)),
        lambda: master.retire([master.current_key_id]),
        lambda: hpke_ring.open(sealed, str(key["key_id"]), "sip:bob@example.com"),
        lambda: hpke_ring.open(flipped(sealed, 1130), str(key["key_id"]), AOR),
        lambda: hpke_ring.open(sealed, "0badc0de", AOR),
        lambda: seal("AAAA", SUITE_X25519, AOR, PASSWORD),
        lambda: DataKey(data_material[:31]),
    )
    texts = [repr(data_key), str(data_key), repr(master), str(master), repr(hpke_ring)]
    texts += [text for error in errors for text in (str(error), repr(error), repr(error.args))]
    data_key.destroy()
    texts.append(repr(data_key))
    forms = {form for value in secret_values for form in spellings(value)}
    leaked = [form for form in forms for text in texts if form in text]
    assert leaked == []
    assert all(error.code for error in errors)
