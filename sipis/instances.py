"""Instances: what an app hands over, kept encrypted, registered while active, erased on time.

Theory of operation
-------------------
An instance is one app install: push routing, a lifetime, and one or more
SIP accounts.  ``Instances`` is the only way in: the API calls ``create``,
``authenticate``, ``view``, ``update`` and ``erase``; the lifecycle sweeper
calls ``erase`` for expired instances and ``expiring`` for warnings.

Every personal field goes into the store encrypted under the instance's own
data key (AES-256-GCM, associated data = instance id + field name); the data
key goes in wrapped under the master key.  Plaintext lives only in memory,
in the registration sessions that need it to answer digest challenges.

The instance secret itself is kept nowhere: the API checks it against its
SHA-256, and the device port checks the app's digest answers (username =
instance id, password = secret) against the H(A1) values computed from it
when it was made (``device_digest``), encrypted like everything else.

Each active (not paused) account has a binding in the ``BindingManager``,
keyed ``<instance id>/<account id>``; the bindings follow every change:
accounts added, changed, removed, pause and resume, erasure.

Erasure: un-REGISTER every binding (bounded wait), then delete the rows and
append the purge-log entry in one transaction, then scrub the database
files.  Deleting the row destroys the only copy of the wrapped data key
(crypto-shredding); ``secure_delete`` and the WAL truncation leave no
ciphertext behind.

In a cluster every node answers the API, but only the node owning an
instance's shard (``Ownership.owns``) holds it live: its bindings, its
push routing, its device digest.  A change made on another node reaches
the owner as a ``Change`` (``apply``): the owner reloads the instance and
its bindings follow, or, for an erasure, un-REGISTERs them and runs the
erasure hooks.  Shards gained and lost move instances in (``adopt``) and
out (``release``: no un-REGISTER, the new owner's REGISTER replaces the
contact).  Writes only the owner may make carry its lease (``fence``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from sipis.audit import CHECKPOINT_EVERY, AuditKeys, PurgeEntry, make_checkpoint
from sipis.bindings import BindingManager
from sipis.crypto import (
    CryptoError,
    DataKey,
    MasterKeyring,
    hash_secret,
    new_secret,
    secret_matches,
)
from sipis.keyed_lock import KeyedLock
from sipis.push.base import Routing
from sipis.sip.digest_server import HA1_ALGORITHMS, digest_ha1
from sipis.sip.registration import RegistrationConfig, RegistrationState
from sipis.sip.uri import SipUri, parse_sip_uri
from sipis.store import AccountRow, InstanceRow, Store, StoreError
from sipis.store.base import Change, Fence

log = logging.getLogger(__name__)

DAY = 86400.0
# Erasures a sweep runs at once: each may wait for un-REGISTER answers.
SWEEP_CONCURRENCY = 32
REASONS = ("expired", "disabled", "token_invalid", "admin")
# The realm of the device port's digest challenges, unless configured.
DEFAULT_REALM = "sipis"


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """One SIP account as the app gave it, validated, password in clear."""

    id: str
    aor: str
    auth_username: str
    password: str
    registrar: str
    outbound_proxy: str | None = None
    transport: str | None = None
    expires: int = 600
    display_name: str | None = None
    verify_tls: bool = True

    def __repr__(self) -> str:
        return f"AccountSpec(id={self.id!r})"


@dataclass(frozen=True, slots=True)
class PushSpec:
    call_token: str
    other_token: str | None
    environment: str

    def __repr__(self) -> str:
        return f"PushSpec(environment={self.environment!r})"


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    app_id: str
    platform: str
    push: PushSpec
    accounts: tuple[AccountSpec, ...]
    payload_key: bytes | None = None
    lifetime: float | None = None


@dataclass(frozen=True, slots=True)
class InstanceChange:
    """A PATCH: every field optional; ``accounts`` replaces the whole list.

    An account in the new list whose password is None keeps the password it
    had under the same id.
    """

    push: PushSpec | None = None
    payload_key: bytes | None = None
    lifetime: float | None = None
    paused: bool | None = None
    accounts: tuple[AccountSpec | KeepPassword, ...] | None = None


@dataclass(frozen=True, slots=True)
class KeepPassword:
    """An account to keep or change without repeating its password."""

    spec: AccountSpec


@dataclass(frozen=True, slots=True)
class LifetimeBounds:
    """The operator's bounds, inside the [3 days, 6 days] the product promises.

    ``day`` is the length of a day in these bounds: the app is warned one
    day before its instance expires.
    """

    minimum: float = 3 * DAY
    maximum: float = 6 * DAY
    day: float = DAY

    def clamp(self, requested: float | None) -> float:
        return min(
            max(requested if requested is not None else self.maximum, self.minimum), self.maximum
        )


class InstanceGone(Exception):
    """The instance does not exist (any more)."""


@dataclass(slots=True)
class _Account:
    """An account as held in memory while its instance lives."""

    spec: AccountSpec
    contact_user: str
    instance_urn: str


@dataclass(slots=True)
class _Live:
    """An instance's decrypted accounts and push routing, for its bindings and pushes."""

    paused: bool
    routing: Routing
    accounts: list[_Account] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DeviceDigest:
    """What checking an app's digest answer needs: the realm and H(A1) by algorithm."""

    realm: str
    ha1: dict[str, str] = field(repr=False)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A MESSAGE held for the app until it connects."""

    id: int
    account_id: str
    received_at: float
    sender: str
    content_type: str
    body: bytes = field(repr=False)


class Ownership(Protocol):
    """Which instances this node holds, when nodes share a store (``sipis.cluster``)."""

    def owns(self, instance_id: str) -> bool: ...

    def fence(self, instance_id: str) -> Fence:
        """The lease a write that only the owner may make is made under."""

    async def binding_states(self, instance_id: str) -> dict[str, dict[str, Any]]:
        """Account id -> state, last status and reason, as the owning node wrote them."""


def _owns_all(_instance_id: str) -> bool:
    """A node alone owns every instance."""
    return True


ExpiringHook = Callable[[Routing], Awaitable[None]]
ErasedHook = Callable[[Routing, str], Awaitable[None]]


class Instances:
    """Create, read, change and erase instances; keep their bindings in step."""

    def __init__(
        self,
        store: Store,
        keyring: MasterKeyring,
        audit: AuditKeys,
        bindings: BindingManager,
        *,
        bounds: LifetimeBounds = LifetimeBounds(),
        unregister_wait: float = 5.0,
        realm: str = DEFAULT_REALM,
        clock: Callable[[], float] = time.time,
        ownership: Ownership | None = None,
    ) -> None:
        self._store = store
        self._realm = realm
        self._keyring = keyring
        self._audit = audit
        self._bindings = bindings
        self.bounds = bounds
        self._unregister_wait = unregister_wait
        self._clock = clock
        self._ownership = ownership
        self._owns = ownership.owns if ownership is not None else _owns_all
        self._live: dict[str, _Live] = {}
        self._locks = KeyedLock()
        self.expiring_hooks: list[ExpiringHook] = []
        self.erased_hooks: list[ErasedHook] = []
        # for the operator's numbers: erasures since start, the purge log, its last checkpoint
        self.erasures: dict[str, int] = {}
        self.purge_entries = 0
        self.checkpointed_at: float | None = None
        # an erasure committed but the files were not scrubbed after it
        self._scrub_owed = False

    # -- start-up -------------------------------------------------------------------

    async def start(self, *, spread: float = 600.0) -> int:
        """Register every active instance's accounts, spread over at most ``spread`` seconds."""
        self.purge_entries, self.checkpointed_at = await self._store.purge_status()
        return self.adopt(await self._store.all(), spread=spread)

    def adopt(self, rows: list[InstanceRow], *, spread: float) -> int:
        """Hold the owned ones of ``rows`` live and register their accounts; returns how
        many accounts start registering.

        They are spread over ``spread`` seconds, or over the time the REGISTER rate
        needs for them when that is shorter: a few accounts register at once, many go
        out at the rate's steady pace (the pacer holds that rate either way).
        """
        rows = [r for r in rows if r.id not in self._live and self._owns(r.id)]
        count = sum(len(r.accounts) for r in rows if not r.paused)
        paced = self._bindings.pacer.span(count)
        if paced:
            spread = min(spread, paced)
        started = 0
        for row in rows:
            try:
                live = self._decrypt(row)
            except CryptoError as exc:
                log.error("instance %s cannot be read (%s): left unregistered", row.id, exc)
                continue
            self._live[row.id] = live
            if live.paused:
                continue
            for account in live.accounts:
                delay = spread * started / count if count else 0.0
                self._bind(row.id, account, delay)
                started += 1
        return started

    async def release(self, instance_ids: list[str]) -> None:
        """Stop holding instances whose shard moved to another node; no un-REGISTER."""
        for instance_id in instance_ids:
            live = self._live.pop(instance_id, None)
            if live is not None and not live.paused:
                for account in live.accounts:
                    await self._bindings.remove(
                        _binding_key(instance_id, account.spec.id), unregister=False
                    )

    def live_ids(self) -> list[str]:
        """The instances this node holds live."""
        return list(self._live)

    async def apply(self, change: Change) -> None:
        """Follow a change made by any node to an instance this node owns."""
        if not self._owns(change.instance_id):
            return
        async with self._locks.hold(change.instance_id):
            if change.kind == "erased":
                live = self._live.pop(change.instance_id, None)
                if live is not None:
                    await self._unbind_all(change.instance_id, live)
            else:
                row = await self._store.get(change.instance_id)
                if row is None:
                    return
                fresh = self._decrypt(row)
                live = self._live.get(row.id)
                if live is None:
                    self._live[row.id] = fresh
                    if not fresh.paused:
                        for account in fresh.accounts:
                            self._bind(row.id, account, 0.0)
                    return
                await self._follow(row.id, live, fresh.accounts, fresh.paused)
                live.routing = fresh.routing
                return
        if live is not None and change.reason is not None:
            for hook in self.erased_hooks:
                await self._run_hook(hook(live.routing, change.reason))

    # -- the API's operations ------------------------------------------------------------

    async def create(self, spec: InstanceSpec) -> tuple[str, str, InstanceRow]:
        """A new instance; returns its id, its secret (shown once) and its row."""
        instance_id = _new_instance_id()
        secret = new_secret()
        now = self._clock()
        key = DataKey.generate()
        accounts = [
            _Account(a, secrets.token_hex(10), f"urn:uuid:{uuid.uuid4()}") for a in spec.accounts
        ]
        row = InstanceRow(
            id=instance_id,
            secret_hash=hash_secret(secret),
            platform=spec.platform,
            app_id=spec.app_id,
            environment=spec.push.environment,
            data_key=self._keyring.wrap(instance_id, key),
            push=_seal_push(key, instance_id, spec.push),
            payload_key=None
            if spec.payload_key is None
            else key.encrypt(instance_id, "payload_key", spec.payload_key),
            paused=False,
            created_at=now,
            expires_at=now + self.bounds.clamp(spec.lifetime),
            warned_at=None,
            accounts=tuple(_seal_account(key, instance_id, a) for a in accounts),
            digest=_seal_digest(key, instance_id, self._realm, secret),
        )
        key.destroy()
        routing = Routing(
            instance_id,
            spec.platform,
            spec.app_id,
            spec.push.environment,
            spec.push.call_token,
            spec.push.other_token,
            spec.payload_key,
        )
        # under the lock: the owner may hear of the new row (``apply``) before this goes on
        async with self._locks.hold(instance_id):
            await self._store.insert(row)
            if self._owns(instance_id):
                self._live[instance_id] = _Live(paused=False, routing=routing, accounts=accounts)
                for account in accounts:
                    self._bind(instance_id, account, 0.0)
        log.info("instance %s created with %d account(s)", instance_id, len(accounts))
        return instance_id, secret, row

    async def authenticate(self, instance_id: str, secret: str) -> InstanceRow | None:
        """The instance if ``secret`` is its secret; None otherwise (unknown id included)."""
        row = await self._store.get(instance_id)
        stored = row.secret_hash if row is not None else _NO_SECRET
        matches = secret_matches(secret, stored)
        if row is None or not matches:
            return None
        if row.digest is None:  # made before the device port checked digests
            key = self._keyring.unwrap(row.id, row.data_key)
            try:
                digest = _seal_digest(key, row.id, self._realm, secret)
            finally:
                key.destroy()
            await self._store.set_digest(row.id, digest)
            row = replace(row, digest=digest)
        return row

    async def device_digest(self, instance_id: str) -> DeviceDigest | None:
        """The digest data of a live instance; None if unknown, erased or without any."""
        if instance_id not in self._live:
            return None
        row = await self._store.get(instance_id)
        if row is None or row.digest is None:
            return None
        key = self._keyring.unwrap(row.id, row.data_key)
        try:
            data = json.loads(key.decrypt(row.id, "digest", row.digest))
        finally:
            key.destroy()
        return DeviceDigest(realm=data["realm"], ha1=data["ha1"])

    def counts(self) -> dict[tuple[str, str], int]:
        """Live instances by (platform, "active" or "paused")."""
        counts: dict[tuple[str, str], int] = {}
        for live in self._live.values():
            key = (live.routing.platform, "paused" if live.paused else "active")
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def view(self, row: InstanceRow) -> dict[str, Any]:
        """Everything held about an instance except secrets (API.md, GET)."""
        key = self._keyring.unwrap(row.id, row.data_key)
        try:
            push = json.loads(key.decrypt(row.id, "push", row.push))
        finally:
            key.destroy()
        live = self._live.get(row.id)
        if live is not None or self._ownership is None:
            accounts = [
                self._account_view(row.id, a, row.paused) for a in (live.accounts if live else [])
            ]
        else:
            states = await self._ownership.binding_states(row.id)
            accounts = [
                _spec_view(a.spec) | states.get(a.spec.id, {"state": "registering"})
                if not row.paused
                else _spec_view(a.spec) | {"state": "paused"}
                for a in self._decrypt(row).accounts
            ]
        return {
            "id": row.id,
            "app_id": row.app_id,
            "platform": row.platform,
            "push": {
                "call_token": _mask(push["call_token"]),
                "other_token": _mask(push["other_token"]) if push.get("other_token") else None,
                "environment": row.environment,
            },
            "payload_key": row.payload_key is not None,
            "paused": row.paused,
            "created_at": row.created_at,
            "expires_at": row.expires_at,
            "accounts": accounts,
        }

    async def update(self, row: InstanceRow, change: InstanceChange) -> InstanceRow:
        """Apply a PATCH and renew the lifetime; the bindings follow."""
        async with self._locks.hold(row.id):
            current = await self._store.get(row.id)
            if current is None:
                raise InstanceGone(row.id)
            now = self._clock()
            key = self._keyring.unwrap(current.id, current.data_key)
            owned = self._owns(current.id)
            live = self._live.get(current.id) or self._decrypt(current)
            if owned:
                self._live.setdefault(current.id, live)
            try:
                accounts = live.accounts
                if change.accounts is not None:
                    accounts = self._merge_accounts(live.accounts, change.accounts)
                updated = replace(
                    current,
                    push=current.push
                    if change.push is None
                    else _seal_push(key, current.id, change.push),
                    environment=current.environment
                    if change.push is None
                    else change.push.environment,
                    payload_key=current.payload_key
                    if change.payload_key is None
                    else key.encrypt(current.id, "payload_key", change.payload_key),
                    paused=current.paused if change.paused is None else change.paused,
                    expires_at=now + self.bounds.clamp(change.lifetime),
                    warned_at=None,
                    accounts=tuple(_seal_account(key, current.id, a) for a in accounts),
                )
            finally:
                key.destroy()
            if not await self._store.replace(updated):
                raise InstanceGone(row.id)
            if owned:
                await self._follow(current.id, live, accounts, updated.paused)
            live.routing = replace(
                live.routing,
                environment=updated.environment,
                call_token=live.routing.call_token
                if change.push is None
                else change.push.call_token,
                other_token=live.routing.other_token
                if change.push is None
                else change.push.other_token,
                payload_key=live.routing.payload_key
                if change.payload_key is None
                else change.payload_key,
            )
            log.debug("instance %s changed, lifetime renewed", current.id)
            stored = await self._store.get(current.id)  # with the data key as now wrapped
            if stored is None:
                raise InstanceGone(row.id)
            return stored

    async def erase(self, instance_id: str, reason: str) -> PurgeEntry | None:
        """Un-REGISTER, delete, log and scrub; None if the instance was already gone."""
        if reason not in REASONS:
            raise ValueError(f"unknown erasure reason {reason!r}")
        async with self._locks.hold(instance_id):
            row = await self._store.get(instance_id)
            live = self._live.pop(instance_id, None)
            if live is not None:
                await self._unbind_all(instance_id, live)
            if row is None:
                return None
            erased = {
                "accounts": len(row.accounts),
                "push_tokens": self._token_count(row),
                "payload_key": int(row.payload_key is not None),
                "data_key": 1,
            }
            try:
                entry = await self._store.erase(
                    instance_id,
                    at=self._clock(),
                    reason=reason,
                    subject=self._audit.subject(instance_id),
                    erased=erased,
                )
            except StoreError:
                if live is not None:  # still stored: hold it and register it again
                    self._live[instance_id] = live
                    if not live.paused:
                        for account in live.accounts:
                            self._bind(instance_id, account, 0.0)
                raise
        if entry is not None:
            log.info("instance %s erased (%s), purge-log entry %d", instance_id, reason, entry.seq)
            self.erasures[reason] = self.erasures.get(reason, 0) + 1
            self.purge_entries = entry.seq
            if live is not None:
                for hook in self.erased_hooks:
                    await self._run_hook(hook(live.routing, reason))
            if entry.seq % CHECKPOINT_EVERY == 0:
                await self._after_erasure(self.checkpoint())
            await self._scrub()
        return entry

    async def checkpoint(self) -> None:
        """Sign the head of the purge log, if there is anything new to sign."""
        entries = await self._store.purge_log(
            after=max((c.seq for c in await self._store.checkpoints()), default=0)
        )
        if entries:
            checkpoint = make_checkpoint(self._audit, entries[-1], self._clock())
            await self._store.add_checkpoint(checkpoint)
            self.checkpointed_at = checkpoint.at

    # -- the lifecycle's operations ------------------------------------------------------------

    async def _scrub(self) -> None:
        """Leave nothing of erased rows in the database files, or owe it to the next sweep."""
        self._scrub_owed = not await self._after_erasure(self._store.scrub())
        if self._scrub_owed:
            log.warning("database files not scrubbed yet: the next sweep tries again")

    async def _after_erasure(self, work: Awaitable[Any]) -> Any:
        """Work that follows a committed erasure: a failure is logged, never raised, since
        the erasure itself is done and its answer must say so."""
        try:
            return await work
        except StoreError as exc:
            log.warning("after an erasure: %s", exc)
            return False

    async def sweep(self) -> int:
        """Erase every instance past its lifetime; warn those within a day of it."""
        if self._scrub_owed:
            await self._scrub()
        now = self._clock()
        gate = asyncio.Semaphore(SWEEP_CONCURRENCY)

        async def expire(instance_id: str) -> bool:
            async with gate:
                return await self.erase(instance_id, "expired") is not None

        expired = [i for i in await self._store.expired(now) if self._owns(i)]
        erased = sum(await asyncio.gather(*(expire(i) for i in expired)))
        for row in await self._store.expiring(now + self.bounds.day):
            if not self._owns(row.id):
                continue
            live = self._live.get(row.id)
            if live is not None:
                for hook in self.expiring_hooks:
                    await self._run_hook(hook(live.routing))
            await self._store.mark_warned(row.id, now, fence=self._fence_for(row.id))
        return erased

    def routing(self, instance_id: str) -> Routing | None:
        """Where the instance's pushes go, if it is alive."""
        live = self._live.get(instance_id)
        return None if live is None else live.routing

    async def queue_message(
        self,
        instance_id: str,
        account_id: str,
        sender: str,
        content_type: str,
        body: bytes,
        *,
        request_key: str | None = None,
    ) -> int:
        """Store a MESSAGE for the app, encrypted under the instance's data key, once per
        ``request_key``.  Taken in turn with an erasure: a MESSAGE arriving while its
        instance is erased is refused (InstanceGone), never stored after the count."""
        async with self._locks.hold(instance_id):
            row = await self._store.get(instance_id)
            if row is None:
                raise InstanceGone(instance_id)
            return await self._store.queue_message(
                row.id,
                account_id,
                self._clock(),
                self._seal_message(row, account_id, sender, content_type, body),
                key=request_key,
                fence=self._fence_for(row.id),
            )

    def _seal_message(
        self, row: InstanceRow, account_id: str, sender: str, content_type: str, body: bytes
    ) -> bytes:
        key = self._keyring.unwrap(row.id, row.data_key)
        content = json.dumps(
            {"from": sender, "type": content_type, "body": base64.b64encode(body).decode()}
        ).encode()
        try:
            return key.encrypt(row.id, f"message:{account_id}", content)
        finally:
            key.destroy()

    async def delivered(self, instance_id: str, message_id: int) -> None:
        """The app took a queued message: erase it."""
        await self._store.delete_message(message_id)
        log.debug("instance %s: message %d delivered", instance_id, message_id)

    async def queued_messages(self, instance_id: str) -> list[QueuedMessage]:
        row = await self._store.get(instance_id)
        if row is None:
            return []
        key = self._keyring.unwrap(row.id, row.data_key)
        try:
            messages = []
            for message_id, account_id, received, sealed in await self._store.messages(row.id):
                content = json.loads(key.decrypt(row.id, f"message:{account_id}", sealed))
                messages.append(
                    QueuedMessage(
                        message_id,
                        account_id,
                        received,
                        content["from"],
                        content["type"],
                        base64.b64decode(content["body"]),
                    )
                )
        finally:
            key.destroy()
        return messages

    # -- internals -------------------------------------------------------------------------------

    async def _run_hook(self, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception:
            log.exception("instance hook failed")

    def _fence_for(self, instance_id: str) -> Fence | None:
        return None if self._ownership is None else self._ownership.fence(instance_id)

    async def _unbind_all(self, instance_id: str, live: _Live) -> None:
        """Un-REGISTER and forget every binding of an instance (bounded wait)."""
        await asyncio.gather(
            *(
                self._bindings.remove(
                    _binding_key(instance_id, a.spec.id), timeout=self._unregister_wait
                )
                for a in live.accounts
            )
        )

    def _token_count(self, row: InstanceRow) -> int:
        key = self._keyring.unwrap(row.id, row.data_key)
        try:
            push = json.loads(key.decrypt(row.id, "push", row.push))
        finally:
            key.destroy()
        return sum(1 for name in ("call_token", "other_token") if push.get(name))

    def _decrypt(self, row: InstanceRow) -> _Live:
        key = self._keyring.unwrap(row.id, row.data_key)
        try:
            accounts = []
            for account in row.accounts:
                settings = json.loads(
                    key.decrypt(row.id, f"account:{account.account_id}", account.settings)
                )
                password = key.decrypt(
                    row.id, f"password:{account.account_id}", account.password
                ).decode()
                contact_user = settings.pop("contact_user")
                instance_urn = settings.pop("instance_urn")
                accounts.append(
                    _Account(AccountSpec(password=password, **settings), contact_user, instance_urn)
                )
            routing = _routing(key, row)
        finally:
            key.destroy()
        return _Live(paused=row.paused, routing=routing, accounts=accounts)

    def _merge_accounts(
        self, old: list[_Account], new: tuple[AccountSpec | KeepPassword, ...]
    ) -> list[_Account]:
        by_id = {a.spec.id: a for a in old}
        merged = []
        for item in new:
            spec = item.spec if isinstance(item, KeepPassword) else item
            previous = by_id.get(spec.id)
            if isinstance(item, KeepPassword):
                if previous is None:
                    raise ValueError(f"accounts: {spec.id!r} is new and needs a password")
                spec = replace(spec, password=previous.spec.password)
            if previous is not None:
                merged.append(_Account(spec, previous.contact_user, previous.instance_urn))
            else:
                merged.append(_Account(spec, secrets.token_hex(10), f"urn:uuid:{uuid.uuid4()}"))
        return merged

    async def _follow(
        self, instance_id: str, live: _Live, accounts: list[_Account], paused: bool
    ) -> None:
        """Make the bindings match ``accounts`` and ``paused``."""
        old = {a.spec.id: a for a in live.accounts} if not live.paused else {}
        new = {a.spec.id: a for a in accounts} if not paused else {}
        stale = [k for k, a in old.items() if k not in new or new[k].spec != a.spec]
        await asyncio.gather(
            *(
                self._bindings.remove(_binding_key(instance_id, k), timeout=self._unregister_wait)
                for k in stale
            )
        )
        for account_id, account in new.items():
            if account_id not in old or account_id in stale:
                self._bind(instance_id, account, 0.0)
        live.accounts = accounts
        live.paused = paused

    def _bind(self, instance_id: str, account: _Account, delay: float) -> None:
        spec = account.spec
        registrar = parse_sip_uri(spec.registrar)
        if spec.transport is not None:
            registrar = _with_transport(registrar, spec.transport)
        config = RegistrationConfig(
            aor=parse_sip_uri(spec.aor),
            registrar=registrar,
            username=spec.auth_username,
            password=spec.password,
            contact_user=account.contact_user,
            instance_id=account.instance_urn,
            expires=spec.expires,
            outbound_proxy=parse_sip_uri(spec.outbound_proxy) if spec.outbound_proxy else None,
            display_name=spec.display_name,
        )
        self._bindings.add(
            _binding_key(instance_id, spec.id), config, verify_tls=spec.verify_tls, delay=delay
        )

    def _account_view(self, instance_id: str, account: _Account, paused: bool) -> dict[str, Any]:
        spec = account.spec
        view = _spec_view(spec)
        binding = None if paused else self._bindings.get(_binding_key(instance_id, spec.id))
        if binding is None:
            view["state"] = "paused"
            return view
        status = binding.session.status(asyncio.get_running_loop().time())
        to_wall = self._clock() - asyncio.get_running_loop().time()
        view.update(
            state=STATE_NAMES[status.state],
            last_status=status.last_status,
            reason=status.reason,
            registered_until=None
            if status.registered_until is None
            else status.registered_until + to_wall,
            next_action_at=None
            if status.next_action_at is None
            else status.next_action_at + to_wall,
        )
        return view


def _spec_view(spec: AccountSpec) -> dict[str, Any]:
    """An account's settings as the API shows them: everything but the password."""
    return {
        "id": spec.id,
        "aor": spec.aor,
        "auth_username": spec.auth_username,
        "registrar": spec.registrar,
        "outbound_proxy": spec.outbound_proxy,
        "transport": spec.transport,
        "expires": spec.expires,
        "display_name": spec.display_name,
        "verify_tls": spec.verify_tls,
    }


STATE_NAMES = {
    RegistrationState.STOPPED: "paused",
    RegistrationState.REGISTERING: "registering",
    RegistrationState.REGISTERED: "registered",
    RegistrationState.FAILED: "failed",
    RegistrationState.UNREGISTERING: "paused",
}

# Compared against when the id is unknown, so that both cases take the same time.
_NO_SECRET = hash_secret("")


def _new_instance_id() -> str:
    """26 lowercase base32 characters (130 random bits), usable as a SIP user part."""
    return base64.b32encode(secrets.token_bytes(17)).decode().lower()[:26]


def _binding_key(instance_id: str, account_id: str) -> str:
    return f"{instance_id}/{account_id}"


def _seal_push(key: DataKey, instance_id: str, push: PushSpec) -> bytes:
    data = {"call_token": push.call_token, "other_token": push.other_token}
    return key.encrypt(instance_id, "push", json.dumps(data).encode())


async def stored_routing(store: Store, keyring: MasterKeyring, instance_id: str) -> Routing | None:
    """Where a stored instance's pushes go, read from the store (for tools beside a node)."""
    row = await store.get(instance_id)
    if row is None:
        return None
    key = keyring.unwrap(row.id, row.data_key)
    try:
        return _routing(key, row)
    finally:
        key.destroy()


def _routing(key: DataKey, row: InstanceRow) -> Routing:
    push = json.loads(key.decrypt(row.id, "push", row.push))
    payload_key = (
        None if row.payload_key is None else key.decrypt(row.id, "payload_key", row.payload_key)
    )
    return Routing(
        row.id,
        row.platform,
        row.app_id,
        row.environment,
        push["call_token"],
        push.get("other_token"),
        payload_key,
    )


def _seal_digest(key: DataKey, instance_id: str, realm: str, secret: str) -> bytes:
    ha1 = {name: digest_ha1(name, instance_id, realm, secret) for name in HA1_ALGORITHMS}
    return key.encrypt(instance_id, "digest", json.dumps({"realm": realm, "ha1": ha1}).encode())


def _seal_account(key: DataKey, instance_id: str, account: _Account) -> AccountRow:
    settings = asdict(account.spec)
    password = settings.pop("password")
    settings.update(contact_user=account.contact_user, instance_urn=account.instance_urn)
    return AccountRow(
        account_id=account.spec.id,
        settings=key.encrypt(
            instance_id, f"account:{account.spec.id}", json.dumps(settings).encode()
        ),
        password=key.encrypt(instance_id, f"password:{account.spec.id}", password.encode()),
    )


def _mask(token: str) -> str:
    return f"{token[:4]}…{token[-4:]}" if len(token) > 12 else "…"


def _with_transport(uri: SipUri, transport: str) -> SipUri:
    params = dict(uri.params)
    params["transport"] = transport
    return SipUri(uri.host, uri.user, uri.port, uri.scheme, uri.password, params, uri.headers)
