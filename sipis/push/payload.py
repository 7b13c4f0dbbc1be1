"""What a push tells the app, and how it is sealed for the app's eyes only.

The payload is a flat JSON object of strings (FCM data messages carry only
strings; APNs gets the same object):

    type         call | call_cancelled | call_missed | answered_elsewhere |
                 message | expiring | erased
    instance     the instance id
    account      the account id the event is about (calls, messages)
    call         a reference to the call, stable across its pushes
    caller       the caller's URI; caller_name its display name, if any
    relay        the SIP URI the woken app connects to
    ts           when sipis sent it, seconds since the epoch

With a payload key the object is replaced by ``{"v": "1", "enc": E}``:
E is base64url (no padding) of nonce (12 bytes) || AES-256-GCM ciphertext
and tag of the JSON text (UTF-8, sorted keys), with associated data
``b"sipis push v1"``.  Apple and Google then see only ``v`` and ``enc``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .base import Kind

ASSOCIATED_DATA = b"sipis push v1"


def call_reference(call_id: str, from_tag: str | None) -> str:
    """A short, stable name for a call (the dialog's caller side), not its Call-ID."""
    digest = hashlib.sha256(f"{call_id}\x00{from_tag or ''}".encode()).hexdigest()
    return digest[:24]


def build(
    kind: Kind,
    *,
    instance: str,
    relay: str | None = None,
    account: str | None = None,
    call: str | None = None,
    caller: str | None = None,
    caller_name: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    fields = {
        "type": kind.value,
        "instance": instance,
        "account": account,
        "call": call,
        "caller": caller,
        "caller_name": caller_name,
        "relay": relay,
        "ts": f"{time.time() if now is None else now:.3f}",
    }
    return {k: v for k, v in fields.items() if v is not None}


def seal(payload: dict[str, str], key: bytes) -> dict[str, str]:
    nonce = os.urandom(12)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    sealed = nonce + AESGCM(key).encrypt(nonce, text, ASSOCIATED_DATA)
    return {"v": "1", "enc": base64.urlsafe_b64encode(sealed).decode().rstrip("=")}


def unseal(sealed: dict[str, str], key: bytes) -> dict[str, str]:
    """What the app does with a sealed payload (its key is the instance's payload key)."""
    raw = base64.urlsafe_b64decode(sealed["enc"] + "=" * (-len(sealed["enc"]) % 4))
    plain = AESGCM(key).decrypt(raw[:12], raw[12:], ASSOCIATED_DATA)
    result: dict[str, str] = json.loads(plain)
    return result
