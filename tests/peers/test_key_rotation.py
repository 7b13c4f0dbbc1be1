"""``sipis keys rotate`` under a running relay registered at Kamailio.

The relay runs in-process with its HTTPS API; the rotation runs as a separate
process on the same config, as an operator would run it, while the relay
keeps answering.  Afterwards every data key is wrapped under the new master
key only, the running relay reads and writes every instance through the
changed key file, a password sealed to the old HPKE key is still accepted,
and a restarted relay registers every instance again from what it can
decrypt with the new key alone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from sipis.app import start_relay
from sipis.config import load_config
from sipis.crypto import SUITE_MLKEM768_X25519, SUITE_X25519, MasterKeyring, seal
from tests.peers.api import ApiClient, RunningRelay, instance_body, relay_with_api
from tests.peers.kamailio import Kamailio

pytestmark = pytest.mark.peer

TEST_TIMEOUT = 40.0
ROTATE_TIMEOUT = 20.0
USERS = {f"k{n}": f"pw-k{n}-{secrets.token_hex(6)}" for n in range(6)}
BEFORE = ("k0", "k1", "k2")  # created before the rotation
AFTER = "k3"  # created after it, with a plain password
SEALED = {"k4": SUITE_X25519, "k5": SUITE_MLKEM768_X25519}  # sealed to the old HPKE keys


def body(registrar: str, user: str, **extra: Any) -> dict[str, Any]:
    return instance_body(registrar, user=user, password=USERS[user], **extra)


async def rotate(config_path: Path) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sipis", "keys", "rotate", "--config", str(config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(ROTATE_TIMEOUT):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return subprocess.CompletedProcess([], process.returncode, out.decode(), err.decode())


async def call_ids(kamailio: Kamailio, users: list[str]) -> dict[str, set[str]]:
    return {user: {c["call_id"] for c in await kamailio.contacts(user)} for user in users}


async def wrapped_under(running: RunningRelay) -> dict[str, str]:
    """Instance id: id of the master key its stored data key is wrapped under."""
    return {
        instance_id: MasterKeyring.key_id_of(wrapped)
        for instance_id, wrapped in await running.relay.store.wrapped_keys()
    }


async def test_rotation_under_a_running_relay(tmp_path: Path, peer_ca: trustme.CA) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        Kamailio(USERS, ca=peer_ca, min_expires=4, workdir=tmp_path / "kamailio") as kamailio,
    ):
        registrar = kamailio.uri("udp")
        ids: dict[str, tuple[str, str]] = {}  # user: (instance id, secret)
        async with relay_with_api(tmp_path) as running:
            api = running.client
            old_master = running.relay.keys.master.current_key_id
            _, info = await api.call("GET", "/v1/info")
            old_hpke = {k["suite"]: k for k in info["hpke_keys"] if k["current"]}
            assert set(old_hpke) == {SUITE_X25519, SUITE_MLKEM768_X25519}
            sealed = {
                user: seal(old_hpke[suite]["public_key"], suite,
                           f"sip:{user}@example.test", USERS[user].encode())
                for user, suite in SEALED.items()
            }  # fmt: skip

            for user in BEFORE:
                status, created = await api.call(
                    "POST", "/v1/instances", body=body(registrar, user)
                )
                assert status == 201, created
                ids[user] = (created["id"], created["secret"])
            await kamailio.wait_for_new_registrations({user: set() for user in BEFORE})
            assert set((await wrapped_under(running)).values()) == {old_master}

            # Rotate in another process while the relay keeps answering reads.
            reads: list[int] = []
            rotation = asyncio.create_task(rotate(running.config_path))
            while not rotation.done():
                for instance_id, secret in ids.values():
                    status, _ = await api.call("GET", f"/v1/instances/{instance_id}", secret=secret)
                    reads.append(status)
                await asyncio.sleep(0.02)
            rotated = await rotation
            assert rotated.returncode == 0, rotated.stdout + rotated.stderr
            assert len(reads) > 3 * len(BEFORE) and set(reads) == {200}, reads

            match = re.match(
                r"master key ([0-9a-f]+): 3 data key\(s\) re-wrapped, 1 old key\(s\) retired$",
                rotated.stdout.splitlines()[0],
            )
            assert match, rotated.stdout
            new_master = match.group(1)
            master_file = json.loads((running.relay.config.data_dir / "keys" / "master.json")
                                     .read_text())  # fmt: skip
            assert master_file["current"] == new_master != old_master
            assert [k["id"] for k in master_file["keys"]] == [new_master]
            assert running.relay.keys.master.key_ids() == [new_master]
            assert await wrapped_under(running) == {i: new_master for i, _ in ids.values()}

            # The running relay reads and rewrites every instance under the new key file.
            for user, (instance_id, secret) in ids.items():
                path = f"/v1/instances/{instance_id}"
                status, view = await api.call("GET", path, secret=secret)
                assert (status, view["accounts"][0]["aor"]) == (200, f"sip:{user}@example.test")
                token = secrets.token_hex(32)
                status, view = await api.call(
                    "PATCH", path, secret=secret,
                    body={"push": {"call_token": token, "environment": "production"}},
                )  # fmt: skip
                assert status == 200, view
                assert view["push"]["call_token"] == f"{token[:4]}…{token[-4:]}"
                assert view["accounts"][0]["state"] == "registered"

            # New HPKE keys are current; the old ones still open what was sealed to them.
            _, info = await api.call("GET", "/v1/info")
            current = {k["suite"]: k["key_id"] for k in info["hpke_keys"] if k["current"]}
            retired = {k["suite"]: k["key_id"] for k in info["hpke_keys"] if not k["current"]}
            assert set(current) == set(old_hpke)
            assert not set(current.values()) & {k["key_id"] for k in old_hpke.values()}
            assert retired == {suite: k["key_id"] for suite, k in old_hpke.items()}
            for user, suite in SEALED.items():
                account = {"password": None, "hpke_key_id": old_hpke[suite]["key_id"],
                           "password_sealed": base64.b64encode(sealed[user]).decode()}  # fmt: skip
                request = body(registrar, user)
                request["accounts"][0].update(account)
                del request["accounts"][0]["password"]
                status, created = await api.call("POST", "/v1/instances", body=request)
                assert status == 201, created
                ids[user] = (created["id"], created["secret"])

            status, created = await api.call("POST", "/v1/instances", body=body(registrar, AFTER))
            assert status == 201, created
            ids[AFTER] = (created["id"], created["secret"])
            # Kamailio accepts the digest only with the right password: the sealed ones opened.
            await kamailio.wait_for_new_registrations(
                {AFTER: set(), **{user: set() for user in SEALED}}
            )
            assert await wrapped_under(running) == {i: new_master for i, _ in ids.values()}
            config_path = running.config_path

        # A restart on the same config: everything is read with the new master key alone.
        before = await call_ids(kamailio, list(ids))
        config = load_config(config_path)
        relay = await start_relay(config)
        try:
            assert relay.keys.master.key_ids() == [new_master]
            await kamailio.wait_for_new_registrations(before)
            context = ssl.create_default_context(
                cafile=str(config.data_dir / "tls" / "dev-certificate.pem")
            )
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context)
            ) as session:
                api = ApiClient(session, f"https://127.0.0.1:{relay.api_port}")
                for instance_id, secret in ids.values():
                    status, view = await api.call(
                        "GET", f"/v1/instances/{instance_id}", secret=secret
                    )
                    assert status == 200, view
                    assert view["accounts"][0]["state"] == "registered", view
        finally:
            await relay.close()


async def test_patch_overlapping_the_rotation_keeps_the_new_wrapping(
    tmp_path: Path, peer_ca: trustme.CA
) -> None:
    """A PATCH whose write lands after the rotation must not restore the old wrapped key.

    The PATCH reads the row before the rotation re-wraps its data key and
    writes it back after the rotation retired the old master key: its store
    write is held until ``keys rotate`` has exited, as a slow disk would.
    """
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        Kamailio(USERS, ca=peer_ca, min_expires=4, workdir=tmp_path / "kamailio") as kamailio,
        relay_with_api(tmp_path) as running,
    ):
        api = running.client
        status, created = await api.call(
            "POST", "/v1/instances", body=body(kamailio.uri("udp"), "k0")
        )
        assert status == 201, created
        path, secret = f"/v1/instances/{created['id']}", created["secret"]
        store = running.relay.store
        write_reached, release = asyncio.Event(), asyncio.Event()
        original_replace = store.replace

        async def held_replace(row: Any) -> bool:
            write_reached.set()
            await release.wait()
            return await original_replace(row)

        store.replace = held_replace  # type: ignore[method-assign]
        patch = asyncio.create_task(api.call("PATCH", path, secret=secret, body={}))
        await write_reached.wait()
        rotated = await rotate(running.config_path)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        new_master = running.relay.keys.master.current_key_id
        release.set()
        patch_status, _ = await patch
        store.replace = original_replace  # type: ignore[method-assign]

        [(_, wrapped)] = await store.wrapped_keys()
        status, _ = await api.call("GET", path, secret=secret)
        assert (MasterKeyring.key_id_of(wrapped), patch_status, status) == (new_master, 200, 200), (
            "a PATCH overlapping the rotation must keep the data key as the rotation re-wrapped it"
        )
