"""Keys and ciphers: per-instance data at rest, sealed passwords, instance secrets.

Theory of operation
-------------------
*Envelope encryption.*  Every instance gets its own random 256-bit
:class:`DataKey`; each stored field is AES-256-GCM encrypted under it with the
instance id and the field name as associated data, so a blob copied into
another row or column does not decrypt.  The data key is stored only wrapped
(AES-256-GCM again) by a master key from the :class:`MasterKeyring`, and the
wrapped blob names the master key id it was wrapped under.  Erasing an
instance deletes its wrapped data key: without it the instance's ciphertext
is noise, wherever a copy of it survives (crypto-shredding).

*Master keyring.*  A JSON file, mode 0600 in a 0700 directory, holds several
master keys and names the current one.  ``rotate`` adds a new current key;
blobs wrapped earlier keep unwrapping under their own key id until the caller
has re-wrapped them and ``retire`` removes the old key.  Every change takes an
``flock`` on a sibling ``.lock`` file, re-reads the file, and replaces it
atomically (temporary file, fsync, rename, fsync of the directory).  Every
use checks the file with one ``os.stat`` and reloads it when its inode, size
or mtime changed, so a server sees a rotation that the CLI did in another
process.

*Sealed passwords.*  An app may seal a SIP password to the relay with HPKE
(RFC 9180, base mode, single shot), bound to the account's AOR through
``info``; see :func:`password_info` and :func:`seal`.  :class:`HpkeKeyring`
keeps one current key per suite in a second JSON file; ``rotate`` retires the
current keys, which stay accepted for a grace period.

*Instance secrets.*  The bearer secret handed to an app is 256 random bits;
only its SHA-256 is stored (:func:`hash_secret`).

Formats
-------
Data blob (:meth:`DataKey.encrypt`)::

    0x01 | nonce (12) | AES-256-GCM ciphertext || tag (16)
    associated data = field_ad(instance id, field)

Wrapped data key (:meth:`MasterKeyring.wrap`)::

    0x01 | len(key id) (1) | key id (ASCII hex) | nonce (12) | ciphertext (32) || tag (16)
    associated data = length_prefixed("data-key", instance id)

where ``length_prefixed(a, b, ...)`` is each part's UTF-8 bytes preceded by
its length as a 4-byte big-endian integer, and ``field_ad(i, f)`` is
``length_prefixed("sipis field v1", i, f)``: no two different tuples encode
to the same bytes, and the two contexts cannot be confused.

HPKE public keys (``public_keys()[...]["public_key"]``, standard base64):

- ``X25519-SHA256-AES256GCM``: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
  AES-256-GCM (KEM 0x0020, KDF 0x0001, AEAD 0x0002); the 32-byte X25519
  public key.
- ``MLKEM768X25519-SHA256-AES256GCM``: the ML-KEM-768 + X25519 hybrid KEM
  MLKEM768-X25519, also known as X-Wing (KEM 0x647A), HKDF-SHA256,
  AES-256-GCM; 1216 bytes = the ML-KEM-768 encapsulation key (1184 bytes)
  followed by the X25519 public key (32 bytes), the X-Wing public key
  encoding.

The sealed value is HPKE ``enc || ciphertext`` (``enc`` is 32 bytes for
X25519 and 1120 for the hybrid suite) with ``info`` =
``b"sipis password v1\\x00" + AOR`` (the AOR exactly as sent in the account's
``aor`` field, UTF-8, not normalised) and no AAD.

Limits
------
Python cannot reliably wipe memory: :meth:`DataKey.destroy` zeroes and drops
the one buffer this module holds, but copies made on the way (the bytes a key
was decrypted into, the cipher library's own key schedule) are freed without
being overwritten.  The classes here are meant for one thread (the event
loop) and do blocking file I/O only when loading, rotating and retiring.
"""

from __future__ import annotations

import abc
import base64
import binascii
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sipis.keyfiles import private_directory, write_private

__all__ = [
    "HPKE_SUITES",
    "SUITE_MLKEM768_X25519",
    "SUITE_X25519",
    "CryptoError",
    "DataKey",
    "HpkeKeyring",
    "MasterKeyring",
    "hash_secret",
    "new_secret",
    "password_info",
    "seal",
    "secret_matches",
]

Clock: TypeAlias = Callable[[], float]

_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_DATA_BLOB_VERSION = 1
_WRAPPED_KEY_VERSION = 1
_FIELD_CONTEXT = b"sipis field v1"
_WRAP_CONTEXT = b"data-key"
_PASSWORD_INFO_PREFIX = b"sipis password v1\x00"
_KEY_ID = re.compile(r"[0-9a-f]{1,64}")
_FILE_VERSION = 1
_MASTER_FORMAT = "sipis-master-keys"
_HPKE_FORMAT = "sipis-hpke-keys"


class CryptoError(Exception):
    """A key, blob, sealed value or key file was refused.

    ``str()`` says what failed and why; it never holds key material or
    plaintext.  ``code`` is a short machine-readable reason: ``malformed``,
    ``authentication_failed``, ``unknown_key_id``, ``key_expired``,
    ``key_destroyed``, ``current_key`` or ``key_file``.
    """

    def __init__(self, detail: str, *, code: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code


# --- encodings ------------------------------------------------------------


def _utf8(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise CryptoError(f"{what} is not encodable as UTF-8", code="malformed") from None


def _length_prefixed(*parts: bytes) -> bytes:
    """Each part as a 4-byte big-endian length and its bytes: an injective encoding."""
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def _field_ad(instance_id: str, field_name: str) -> bytes:
    return _length_prefixed(
        _FIELD_CONTEXT, _utf8(instance_id, "instance id"), _utf8(field_name, "field name")
    )


def _wrap_ad(instance_id: str) -> bytes:
    return _length_prefixed(_WRAP_CONTEXT, _utf8(instance_id, "instance id"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _new_key_id(taken: Iterable[str]) -> str:
    used = set(taken)
    while True:
        key_id = secrets.token_hex(4)
        if key_id not in used:
            return key_id


# --- data keys ------------------------------------------------------------


class DataKey:
    """One instance's AES-256-GCM key; see the module docstring for the blob format.

    Random 96-bit nonces are safe for far more than the few fields one
    instance ever stores (the bound is 2**32 encryptions per key).
    """

    __slots__ = ("_key",)

    def __init__(self, material: bytes | bytearray) -> None:
        if len(material) != _KEY_BYTES:
            raise CryptoError("a data key is 32 bytes", code="malformed")
        self._key = bytearray(material)

    @classmethod
    def generate(cls) -> DataKey:
        return cls(secrets.token_bytes(_KEY_BYTES))

    @property
    def destroyed(self) -> bool:
        return not self._key

    def encrypt(self, instance_id: str, field: str, plaintext: bytes) -> bytes:
        """Encrypt one stored field of one instance."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = AESGCM(self._material()).encrypt(nonce, plaintext, _field_ad(instance_id, field))
        return bytes([_DATA_BLOB_VERSION]) + nonce + sealed

    def decrypt(self, instance_id: str, field: str, blob: bytes) -> bytes:
        """Decrypt a blob from :meth:`encrypt`, made for the same instance and field."""
        if len(blob) < 1 + _NONCE_BYTES + _TAG_BYTES or blob[0] != _DATA_BLOB_VERSION:
            raise CryptoError("not a data blob (wrong version or too short)", code="malformed")
        nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            return AESGCM(self._material()).decrypt(nonce, sealed, _field_ad(instance_id, field))
        except InvalidTag:
            raise CryptoError(
                "data blob does not authenticate: another key, instance or field, or altered",
                code="authentication_failed",
            ) from None

    def destroy(self) -> None:
        """Overwrite the key bytes with zeros and drop them; any later use raises.

        Only this object's buffer is wiped (see "Limits" in the module docstring).
        """
        self._key[:] = bytes(len(self._key))
        self._key.clear()

    def _material(self) -> bytearray:
        if not self._key:
            raise CryptoError("data key was destroyed", code="key_destroyed")
        return self._key

    def __repr__(self) -> str:
        return "<DataKey destroyed>" if self.destroyed else "<DataKey>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a DataKey is never pickled or copied; store it wrapped")


# --- key files ------------------------------------------------------------

_Stamp: TypeAlias = tuple[int, int, int]  # inode, mtime in ns, size: changes with every replace


class _KeyFile:
    """One JSON key file: read with the stamp of what was read, replaced atomically,
    and locked across processes while it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, problem: str) -> NoReturn:
        raise CryptoError(f"key file {self.path}: {problem}", code="key_file")

    def stamp(self) -> _Stamp:
        try:
            status = os.stat(self.path)
        except OSError as exc:
            self.fail(exc.strerror or "cannot stat")
        return (status.st_ino, status.st_mtime_ns, status.st_size)

    def read(self) -> tuple[Any, _Stamp] | None:
        """The parsed document and its stamp, or None when the file does not exist."""
        try:
            with open(self.path, "rb") as handle:
                status = os.fstat(handle.fileno())
                raw = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.fail(exc.strerror or "cannot read")
        try:
            document = json.loads(raw)
        except ValueError:
            self.fail("not valid JSON")
        return document, (status.st_ino, status.st_mtime_ns, status.st_size)

    def write(self, document: dict[str, Any]) -> _Stamp:
        """Replace the file atomically with mode 0600; returns the new stamp.

        The new file's mtime is later than the old one's even within one
        timestamp tick, so that no reader can take a new version for one it
        has seen (inode numbers are reused, sizes can repeat).
        """
        data = json.dumps(document, indent=2).encode("utf-8") + b"\n"
        try:
            status = write_private(self.path, data, replace=True)
        except OSError as exc:
            self.fail(f"cannot write: {exc.strerror or 'I/O error'}")
        return (status.st_ino, status.st_mtime_ns, status.st_size)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive ``flock`` on ``<file>.lock``, creating the 0700 directory first."""
        try:
            private_directory(self.path.parent)
        except OSError as exc:
            self.fail(f"cannot create its directory: {exc.strerror}")
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self.fail(f"cannot open its lock file: {exc.strerror}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _get(entry: Any, name: str, kinds: tuple[type, ...], where: _KeyFile) -> Any:
    value = entry.get(name) if isinstance(entry, dict) else None
    if not isinstance(value, kinds) or isinstance(value, bool):
        where.fail(f"field {name!r} is missing or has the wrong type")
    return value


def _get_time(entry: Any, name: str, where: _KeyFile) -> float:
    return float(_get(entry, name, (int, float), where))


def _get_key_id(entry: Any, where: _KeyFile) -> str:
    key_id: str = _get(entry, "id", (str,), where)
    if not _KEY_ID.fullmatch(key_id):
        where.fail("a key id is not lowercase hex")
    return key_id


def _get_bytes(entry: Any, name: str, where: _KeyFile) -> bytes:
    try:
        return base64.b64decode(_get(entry, name, (str,), where), validate=True)
    except binascii.Error:
        where.fail(f"field {name!r} is not base64")


def _check_header(document: Any, file_format: str, where: _KeyFile) -> list[Any]:
    """Check format and version; return the list of key entries."""
    if _get(document, "format", (str,), where) != file_format:
        where.fail(f"not a {file_format} file")
    if _get(document, "version", (int,), where) != _FILE_VERSION:
        where.fail(f"unsupported version (this code reads version {_FILE_VERSION})")
    entries: list[Any] = _get(document, "keys", (list,), where)
    return entries


class _WatchedKeyring(abc.ABC):
    """A keyring mirrored from a key file and reloaded when the file changes."""

    def __init__(self, path: Path) -> None:
        self._file = _KeyFile(path)
        self._stamp: _Stamp | None = None

    @property
    def path(self) -> Path:
        return self._file.path

    @abc.abstractmethod
    def _apply(self, document: Any) -> None:
        """Replace the in-memory state with the parsed document (or raise CryptoError)."""

    @abc.abstractmethod
    def _document(self) -> dict[str, Any]:
        """The in-memory state as a key file document."""

    @abc.abstractmethod
    def _complete(self) -> None:
        """Add the keys a usable keyring needs and does not have yet."""

    def _open(self) -> None:
        """Load the file, creating or completing it as needed, under the lock."""
        with self._file.locked():
            found = self._file.read()
            if found is not None:
                self._apply(found[0])
                self._stamp = found[1]
            self._complete()
            document = self._document()
            if found is None or document != found[0]:
                self._stamp = self._file.write(document)

    def _reload(self) -> None:
        found = self._file.read()
        if found is None:
            self._file.fail("no longer exists")
        self._apply(found[0])
        self._stamp = found[1]

    def _refresh(self) -> None:
        """Reload when another process replaced the file (one ``stat`` when it did not)."""
        if self._file.stamp() != self._stamp:
            self._reload()


# --- master keys ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _MasterKey:
    key_id: str
    created: float
    material: bytes = dataclasses.field(repr=False)


class MasterKeyring(_WatchedKeyring):
    """The master keys that wrap data keys, kept in a JSON file.

    File: ``{"format": "sipis-master-keys", "version": 1, "current": ID,
    "keys": [{"id": ID, "created": UNIX_SECONDS, "key": BASE64_32_BYTES}]}``.
    """

    def __init__(self, path: Path, *, clock: Clock = time.time) -> None:
        super().__init__(path)
        self._clock = clock
        self._keys: dict[str, _MasterKey] = {}
        self._current = ""

    @classmethod
    def load_or_create(
        cls, path: str | os.PathLike[str], *, clock: Clock = time.time
    ) -> MasterKeyring:
        """Load the keyring; on first use create it with one key (file 0600, directory 0700)."""
        keyring = cls(Path(path), clock=clock)
        keyring._open()
        return keyring

    @property
    def current_key_id(self) -> str:
        self._refresh()
        return self._current

    def key_ids(self) -> list[str]:
        """Every key id in the keyring, oldest first."""
        self._refresh()
        return [key.key_id for key in sorted(self._keys.values(), key=lambda k: k.created)]

    def wrap(self, instance_id: str, data_key: DataKey) -> bytes:
        """Wrap ``data_key`` under the current master key, bound to ``instance_id``."""
        self._refresh()
        master = self._keys[self._current]
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = AESGCM(master.material).encrypt(nonce, data_key._material(), _wrap_ad(instance_id))
        key_id = master.key_id.encode("ascii")
        return bytes([_WRAPPED_KEY_VERSION, len(key_id)]) + key_id + nonce + sealed

    def unwrap(self, instance_id: str, blob: bytes) -> DataKey:
        """The data key in ``blob``, wrapped for ``instance_id`` under any key in the ring."""
        key_id, nonce, sealed = _parse_wrapped(blob)
        self._refresh()
        master = self._keys.get(key_id)
        if master is None:
            raise CryptoError(f"master key {key_id} is not in the keyring", code="unknown_key_id")
        try:
            material = AESGCM(master.material).decrypt(nonce, sealed, _wrap_ad(instance_id))
        except InvalidTag:
            raise CryptoError(
                "wrapped data key does not authenticate: another instance, or altered",
                code="authentication_failed",
            ) from None
        return DataKey(material)

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        """The id of the master key a wrapped data key was wrapped under."""
        return _parse_wrapped(blob)[0]

    def rotate(self) -> str:
        """Add a new current master key and save; returns its id.

        Earlier keys stay in the ring, so everything wrapped before still unwraps.
        """
        with self._file.locked():
            self._reload()
            new = _MasterKey(
                _new_key_id(self._keys), self._clock(), secrets.token_bytes(_KEY_BYTES)
            )
            keys = {**self._keys, new.key_id: new}
            self._stamp = self._file.write(self._render(keys, new.key_id))
            self._keys, self._current = keys, new.key_id
        return new.key_id

    def retire(self, key_ids: Iterable[str]) -> None:
        """Remove keys that nothing is wrapped under any more, and save.

        The caller proves that: it has re-wrapped every data key under another
        key (``key_id_of`` tells which key a blob needs).  The current key is
        never retired; an unknown id is refused too, and then nothing changes.
        """
        doomed = set(key_ids)
        with self._file.locked():
            self._reload()
            if self._current in doomed:
                raise CryptoError(
                    f"refusing to retire the current master key {self._current}",
                    code="current_key",
                )
            unknown = doomed - self._keys.keys()
            if unknown:
                raise CryptoError(
                    f"no such master key: {', '.join(sorted(unknown))}", code="unknown_key_id"
                )
            keys = {key_id: key for key_id, key in self._keys.items() if key_id not in doomed}
            self._stamp = self._file.write(self._render(keys, self._current))
            self._keys = keys

    def _apply(self, document: Any) -> None:
        keys: dict[str, _MasterKey] = {}
        for entry in _check_header(document, _MASTER_FORMAT, self._file):
            key_id = _get_key_id(entry, self._file)
            material = _get_bytes(entry, "key", self._file)
            if len(material) != _KEY_BYTES or key_id in keys:
                self._file.fail(f"master key {key_id} is not 32 bytes or appears twice")
            keys[key_id] = _MasterKey(key_id, _get_time(entry, "created", self._file), material)
        current = _get(document, "current", (str,), self._file)
        if current not in keys:
            self._file.fail("the current key is not in the file")
        self._keys, self._current = keys, current

    def _complete(self) -> None:
        if not self._keys:
            first = self._new_key({})
            self._keys, self._current = {first.key_id: first}, first.key_id

    def _new_key(self, taken: dict[str, _MasterKey]) -> _MasterKey:
        return _MasterKey(_new_key_id(taken), self._clock(), secrets.token_bytes(_KEY_BYTES))

    def _document(self) -> dict[str, Any]:
        return self._render(self._keys, self._current)

    @staticmethod
    def _render(keys: dict[str, _MasterKey], current: str) -> dict[str, Any]:
        return {
            "format": _MASTER_FORMAT,
            "version": _FILE_VERSION,
            "current": current,
            "keys": [
                {"id": key.key_id, "created": key.created, "key": _b64(key.material)}
                for key in keys.values()
            ],
        }

    def __repr__(self) -> str:
        return f"<MasterKeyring {str(self.path)!r} current={self._current} keys={len(self._keys)}>"


def _parse_wrapped(blob: bytes) -> tuple[str, bytes, bytes]:
    """Split a wrapped data key into (key id, nonce, ciphertext || tag)."""
    if len(blob) < 2 or blob[0] != _WRAPPED_KEY_VERSION:
        raise CryptoError("not a wrapped data key (wrong version)", code="malformed")
    id_end = 2 + blob[1]
    if len(blob) != id_end + _NONCE_BYTES + _KEY_BYTES + _TAG_BYTES:
        raise CryptoError("not a wrapped data key (wrong length)", code="malformed")
    key_id = blob[2:id_end].decode("ascii", "replace")
    if not _KEY_ID.fullmatch(key_id):
        raise CryptoError("not a wrapped data key (bad key id)", code="malformed")
    return key_id, blob[id_end : id_end + _NONCE_BYTES], blob[id_end + _NONCE_BYTES :]


# --- instance secrets -----------------------------------------------------


def new_secret() -> str:
    """A fresh instance secret: 32 random bytes, base64url without padding (43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def hash_secret(secret: str) -> bytes:
    """The value stored for an instance secret.

    Plain SHA-256 is right here: the secret is 256 uniformly random bits, so
    no guess can be tested faster than brute force over 2**256, and a slow
    password KDF (made for low-entropy passwords) would only cost CPU per
    request.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def secret_matches(secret: str, stored: bytes) -> bool:
    """Whether ``secret`` hashes to ``stored``, compared in constant time."""
    return hmac.compare_digest(hash_secret(secret), stored)


# --- HPKE -----------------------------------------------------------------

SUITE_X25519 = "X25519-SHA256-AES256GCM"
SUITE_MLKEM768_X25519 = "MLKEM768X25519-SHA256-AES256GCM"
HPKE_SUITES = (SUITE_X25519, SUITE_MLKEM768_X25519)

_HpkePrivateKey: TypeAlias = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
_HpkePublicKey: TypeAlias = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
_MLKEM_SEED_BYTES = 64
_MLKEM_PUBLIC_BYTES = 1184
_X25519_BYTES = 32


class _Suite(abc.ABC):
    """How one HPKE suite generates, stores and publishes its keys."""

    name: str
    suite: hpke.Suite
    enc_bytes: int

    @abc.abstractmethod
    def generate(self) -> bytes:
        """New private key material, as stored in the key file."""

    @abc.abstractmethod
    def private_key(self, material: bytes) -> tuple[_HpkePrivateKey, bytes]:
        """The private key and the public key bytes (raises ValueError on bad material)."""

    @abc.abstractmethod
    def public_key(self, public: bytes) -> _HpkePublicKey:
        """The public key from its published bytes (raises ValueError on bad bytes)."""


class _X25519Suite(_Suite):
    """Private material: the raw 32-byte X25519 key; public: the raw 32-byte key."""

    name = SUITE_X25519
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    enc_bytes = hpke.KEM.X25519.enc_length()

    def generate(self) -> bytes:
        return x25519.X25519PrivateKey.generate().private_bytes_raw()

    def private_key(self, material: bytes) -> tuple[_HpkePrivateKey, bytes]:
        key = x25519.X25519PrivateKey.from_private_bytes(material)
        return key, key.public_key().public_bytes_raw()

    def public_key(self, public: bytes) -> _HpkePublicKey:
        return x25519.X25519PublicKey.from_public_bytes(public)


class _HybridSuite(_Suite):
    """Private material: ML-KEM-768 seed (64) || X25519 key (32);
    public: ML-KEM-768 key (1184) || X25519 key (32)."""

    name = SUITE_MLKEM768_X25519
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    enc_bytes = hpke.KEM.MLKEM768_X25519.enc_length()

    def generate(self) -> bytes:
        return (
            mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
            + x25519.X25519PrivateKey.generate().private_bytes_raw()
        )

    def private_key(self, material: bytes) -> tuple[_HpkePrivateKey, bytes]:
        if len(material) != _MLKEM_SEED_BYTES + _X25519_BYTES:
            raise ValueError("hybrid private key material is 96 bytes")
        kem_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(material[:_MLKEM_SEED_BYTES])
        dh_key = x25519.X25519PrivateKey.from_private_bytes(material[_MLKEM_SEED_BYTES:])
        public = kem_key.public_key().public_bytes_raw() + dh_key.public_key().public_bytes_raw()
        return hpke.MLKEM768X25519PrivateKey(kem_key, dh_key), public

    def public_key(self, public: bytes) -> _HpkePublicKey:
        if len(public) != _MLKEM_PUBLIC_BYTES + _X25519_BYTES:
            raise ValueError("hybrid public key is 1216 bytes")
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(public[:_MLKEM_PUBLIC_BYTES]),
            x25519.X25519PublicKey.from_public_bytes(public[_MLKEM_PUBLIC_BYTES:]),
        )


_SUITES: dict[str, _Suite] = {suite.name: suite for suite in (_X25519Suite(), _HybridSuite())}


def password_info(aor: str) -> bytes:
    """HPKE ``info`` binding a sealed password to its account: prefix + AOR in UTF-8."""
    return _PASSWORD_INFO_PREFIX + _utf8(aor, "AOR")


def seal(public_key_b64: str, suite_name: str, aor: str, password: bytes) -> bytes:
    """Seal ``password`` for the account ``aor`` to a key from ``public_keys()``.

    This is what an app does (HPKE base mode, single shot); it returns
    ``enc || ciphertext``, to be sent base64-encoded with the key id.
    """
    suite = _SUITES.get(suite_name)
    if suite is None:
        raise CryptoError("unknown HPKE suite", code="malformed")
    try:
        public_key = suite.public_key(base64.b64decode(public_key_b64, validate=True))
        return suite.suite.encrypt(password, public_key, info=password_info(aor))
    except (binascii.Error, ValueError):
        raise CryptoError(f"not a valid {suite_name} public key", code="malformed") from None


@dataclasses.dataclass(frozen=True)
class _HpkeKey:
    key_id: str
    suite: str
    created: float
    retired_at: float | None
    material: bytes = dataclasses.field(repr=False)
    private_key: _HpkePrivateKey = dataclasses.field(repr=False)
    public: bytes = dataclasses.field(repr=False)


class HpkeKeyring(_WatchedKeyring):
    """The relay's HPKE keys, one current key per suite, in a JSON file (mode 0600).

    File: ``{"format": "sipis-hpke-keys", "version": 1, "keys": [{"id": ID,
    "suite": NAME, "private_key": BASE64, "created": UNIX_SECONDS,
    "retired_at": UNIX_SECONDS | null}]}`` with the private key material
    described on each suite.  A key with ``retired_at`` set still opens
    passwords for ``grace`` seconds; after that it is refused, and dropped
    from the file at the next load or rotation.
    """

    def __init__(self, path: Path, *, grace: float, clock: Clock) -> None:
        super().__init__(path)
        self._grace = grace
        self._clock = clock
        self._keys: dict[str, _HpkeKey] = {}

    @classmethod
    def load_or_create(
        cls,
        path: str | os.PathLike[str],
        *,
        grace: float = 7 * 86400,
        clock: Clock = time.time,
    ) -> HpkeKeyring:
        """Load the keyring, dropping expired keys and adding a key for any suite without one."""
        keyring = cls(Path(path), grace=grace, clock=clock)
        keyring._open()
        return keyring

    def public_keys(self) -> list[dict[str, Any]]:
        """Every key still accepted: ``{"suite", "key_id", "public_key" (base64), "current"}``.

        Apps seal to a ``current`` key; the others are retired keys inside
        their grace period, listed so an app can tell that its cached key
        still works.
        """
        self._refresh()
        now = self._clock()
        accepted = [key for key in self._keys.values() if not self._expired(key, now)]
        accepted.sort(key=lambda k: (HPKE_SUITES.index(k.suite), k.retired_at is not None))
        return [
            {
                "suite": key.suite,
                "key_id": key.key_id,
                "public_key": _b64(key.public),
                "current": key.retired_at is None,
            }
            for key in accepted
        ]

    def open(self, sealed: bytes, key_id: str, aor: str) -> bytes:
        """The password sealed by :func:`seal` to ``key_id`` for the account ``aor``."""
        self._refresh()
        key = self._keys.get(key_id)
        if key is None:
            raise CryptoError("unknown HPKE key id", code="unknown_key_id")
        if self._expired(key, self._clock()):
            raise CryptoError(
                "HPKE key was retired longer ago than the grace period", code="key_expired"
            )
        suite = _SUITES[key.suite]
        if len(sealed) < suite.enc_bytes + _TAG_BYTES:
            raise CryptoError(
                f"sealed password is shorter than a {key.suite} encapsulation and tag",
                code="malformed",
            )
        try:
            return suite.suite.decrypt(sealed, key.private_key, info=password_info(aor))
        except (InvalidTag, ValueError):
            raise CryptoError(
                "sealed password does not open: sealed for another AOR or key, or altered",
                code="authentication_failed",
            ) from None

    def rotate(self) -> dict[str, str]:
        """Retire the current keys (accepted for the grace period) and add a new
        current key per suite; returns the new key id of each suite."""
        with self._file.locked():
            self._reload()
            now = self._clock()
            keys = {
                key_id: key
                if key.retired_at is not None
                else dataclasses.replace(key, retired_at=now)
                for key_id, key in self._keys.items()
            }
            added = {name: self._new_key(suite, keys) for name, suite in _SUITES.items()}
            for key in added.values():
                keys[key.key_id] = key
            self._stamp = self._file.write(self._render(keys))
            self._keys = keys
        return {name: key.key_id for name, key in added.items()}

    def _expired(self, key: _HpkeKey, now: float) -> bool:
        return key.retired_at is not None and now - key.retired_at > self._grace

    def _new_key(self, suite: _Suite, taken: dict[str, _HpkeKey]) -> _HpkeKey:
        material = suite.generate()
        private_key, public = suite.private_key(material)
        return _HpkeKey(
            _new_key_id(taken), suite.name, self._clock(), None, material, private_key, public
        )

    def _apply(self, document: Any) -> None:
        now = self._clock()
        keys: dict[str, _HpkeKey] = {}
        for entry in _check_header(document, _HPKE_FORMAT, self._file):
            key_id = _get_key_id(entry, self._file)
            suite = _SUITES.get(_get(entry, "suite", (str,), self._file))
            if suite is None or key_id in keys:
                self._file.fail(f"HPKE key {key_id} has an unknown suite or appears twice")
            material = _get_bytes(entry, "private_key", self._file)
            try:
                private_key, public = suite.private_key(material)
            except ValueError:
                self._file.fail(f"HPKE key {key_id} has malformed key material")
            retired = _get(entry, "retired_at", (int, float, type(None)), self._file)
            key = _HpkeKey(
                key_id,
                suite.name,
                _get_time(entry, "created", self._file),
                None if retired is None else float(retired),
                material,
                private_key,
                public,
            )
            if not self._expired(key, now):
                keys[key_id] = key
        self._keys = keys

    def _complete(self) -> None:
        for name, suite in _SUITES.items():
            if not any(key.suite == name and key.retired_at is None for key in self._keys.values()):
                key = self._new_key(suite, self._keys)
                self._keys[key.key_id] = key

    def _document(self) -> dict[str, Any]:
        return self._render(self._keys)

    @staticmethod
    def _render(keys: dict[str, _HpkeKey]) -> dict[str, Any]:
        return {
            "format": _HPKE_FORMAT,
            "version": _FILE_VERSION,
            "keys": [
                {
                    "id": key.key_id,
                    "suite": key.suite,
                    "private_key": _b64(key.material),
                    "created": key.created,
                    "retired_at": key.retired_at,
                }
                for key in keys.values()
            ],
        }

    def __repr__(self) -> str:
        return f"<HpkeKeyring {str(self.path)!r} keys={sorted(self._keys)}>"
