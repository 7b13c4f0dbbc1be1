"""The HTTPS API: validation errors that name the field, auth, limits, info, and no secret leaks."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sipis.app import start_relay
from sipis.crypto import SUITE_MLKEM768_X25519, SUITE_X25519, seal
from tests.peers.api import RunningRelay, instance_body, relay_with_api
from tests.peers.relay import relay_config

REGISTRAR = "sip:192.0.2.1:5060;transport=udp"  # never reached: TEST-NET-1, and DNS is not asked


@pytest.fixture
async def running(tmp_path: Path, store_sections: dict[str, dict[str, Any]]):
    async with relay_with_api(
        tmp_path,
        api={"admin_token": "admin-token-for-tests", "create_burst": 50},
        **store_sections,
    ) as running:
        yield running


def body(**extra: Any) -> dict[str, Any]:
    return instance_body(REGISTRAR, user="alice", password="pa55-word", **extra)


def with_account(**fields: Any) -> dict[str, Any]:
    result = body()
    result["accounts"][0].update(fields)
    for name, value in fields.items():
        if value is None:
            del result["accounts"][0][name]
    return result


@pytest.mark.parametrize(
    ("payload", "status", "error", "field"),
    [
        (with_account(aor="mailto:alice@example.test"), 400, "invalid_field", "accounts.0.aor"),
        (with_account(aor="sip:example.test"), 400, "invalid_field", "accounts.0.aor"),
        (with_account(registrar="sip:a b"), 400, "invalid_field", "accounts.0.registrar"),
        (with_account(password=None), 400, "invalid_field", "accounts.0.password"),
        (with_account(password_sealed="AAAA", hpke_key_id="k"), 400, "invalid_field", "accounts.0"),
        (with_account(expires="600"), 400, "invalid_field", "accounts.0.expires"),
        (with_account(transport="sctp"), 400, "invalid_field", "accounts.0.transport"),
        (with_account(colour="blue"), 400, "unknown_field", "accounts.0.colour"),
        (body(platform="windows"), 400, "invalid_field", "platform"),
        (body(push={"call_token": "xyz"}), 400, "invalid_field", "push.call_token"),
        (body(payload_key="c2hvcnQ="), 400, "invalid_field", "payload_key"),
        (body(accounts=[]), 400, "invalid_field", "accounts"),
        (body(accounts=[body()["accounts"][0]] * 9), 400, "invalid_field", "accounts"),
        (body(extra=1), 400, "unknown_field", "extra"),
        ({"platform": "ios"}, 400, "missing_field", "app_id"),
    ],
)
async def test_create_rejections_name_the_field(
    running: RunningRelay, payload: dict[str, Any], status: int, error: str, field: str
) -> None:
    got, answer = await running.client.call("POST", "/v1/instances", body=payload)
    assert (got, answer["error"], answer["field"]) == (status, error, field), answer
    assert "pa55-word" not in str(answer)


async def test_body_problems(running: RunningRelay) -> None:
    session, base = running.client.session, running.client.base
    async with session.post(
        f"{base}/v1/instances", data=b"{not json", headers={"Content-Type": "application/json"}
    ) as r:
        assert (r.status, (await r.json())["error"]) == (400, "invalid_json")
    async with session.post(f"{base}/v1/instances", data=b"a=b") as r:
        assert (r.status, (await r.json())["error"]) == (415, "unsupported_media_type")
    huge = b'{"app_id": "' + b"x" * 200_000 + b'"}'
    async with session.post(
        f"{base}/v1/instances", data=huge, headers={"Content-Type": "application/json"}
    ) as r:
        assert (r.status, (await r.json())["error"]) == (413, "body_too_large")
    async with session.put(f"{base}/v1/instances") as r:
        assert (r.status, (await r.json())["error"]) == (405, "method_not_allowed")
    async with session.get(f"{base}/nowhere") as r:
        assert (r.status, (await r.json())["error"]) == (404, "not_found")


async def test_secret_is_shown_once_and_checked(running: RunningRelay) -> None:
    api = running.client
    status, created = await api.call("POST", "/v1/instances", body=body())
    assert status == 201
    instance_id, secret = created["id"], created["secret"]
    assert len(secret) >= 43 and len(instance_id) == 26
    for wrong in (None, secret[:-1] + ("A" if secret[-1] != "A" else "B"), "x"):
        status, answer = await api.call("GET", f"/v1/instances/{instance_id}", secret=wrong)
        assert (status, answer["error"]) == (401, "unauthorized")
    status, answer = await api.call("GET", "/v1/instances/unknown", secret=secret)
    assert status == 401
    status, view = await api.call("GET", f"/v1/instances/{instance_id}", secret=secret)
    assert status == 200 and "secret" not in view
    stored = await running.relay.store.get(instance_id)
    assert stored is not None and secret.encode() not in stored.secret_hash


async def test_lifetime_is_clamped_and_renewed(running: RunningRelay) -> None:
    api = running.client
    status, short = await api.call("POST", "/v1/instances", body=body(lifetime=60))
    assert short["expires_at"] - short["created_at"] == pytest.approx(3 * 86400)
    status, long = await api.call("POST", "/v1/instances", body=body(lifetime=9 * 86400))
    assert long["expires_at"] - long["created_at"] == pytest.approx(6 * 86400)
    status, renewed = await api.call(
        "PATCH", f"/v1/instances/{short['id']}", secret=short["secret"], body={}
    )
    assert status == 200 and renewed["expires_at"] > short["expires_at"] + 2 * 86400


async def test_patch_tokens_accounts_and_keep_password(running: RunningRelay) -> None:
    api = running.client
    _, created = await api.call("POST", "/v1/instances", body=body())
    path, secret = f"/v1/instances/{created['id']}", created["secret"]
    accounts = copy.deepcopy(body()["accounts"])
    del accounts[0]["password"]
    accounts[0]["expires"] = 900
    accounts.append({**accounts[0], "id": "home", "aor": "sip:bob@example.test", "password": "b0b"})
    status, view = await api.call(
        "PATCH", path, secret=secret,
        body={"accounts": accounts, "push": {"call_token": "c3" * 32, "environment": "production"}},
    )  # fmt: skip
    assert status == 200, view
    assert [a["id"] for a in view["accounts"]] == ["work", "home"]
    assert view["accounts"][0]["expires"] == 900
    assert (
        view["push"]["call_token"].startswith("c3c3")
        and view["push"]["environment"] == "production"
    )
    binding = running.relay.bindings.get(f"{created['id']}/work")
    assert binding is not None and binding.session.config.password == "pa55-word"
    new_only = [{**accounts[1], "id": "third"}]
    del new_only[0]["password"]
    status, answer = await api.call("PATCH", path, secret=secret, body={"accounts": new_only})
    assert (status, answer["error"]) == (400, "invalid_field")
    status, answer = await api.call(
        "PATCH", path, secret=secret, body={"push": {"call_token": "not-hex"}}
    )
    assert (status, answer["field"]) == (400, "push")


@pytest.mark.parametrize("suite", [SUITE_X25519, SUITE_MLKEM768_X25519])
async def test_sealed_password_is_opened_for_its_aor_only(
    running: RunningRelay, suite: str
) -> None:
    api = running.client
    status, info = await api.call("GET", "/v1/info")
    [key] = [k for k in info["hpke_keys"] if k["suite"] == suite and k["current"]]
    sealed = seal(key["public_key"], suite, "sip:alice@example.test", b"s3aled-pw")
    account = {"password": None, "hpke_key_id": key["key_id"],
               "password_sealed": base64.b64encode(sealed).decode()}  # fmt: skip
    status, created = await api.call("POST", "/v1/instances", body=with_account(**account))
    assert status == 201, created
    binding = running.relay.bindings.get(f"{created['id']}/work")
    assert binding is not None and binding.session.config.password == "s3aled-pw"
    other = with_account(**account, aor="sip:mallory@example.test")
    status, answer = await api.call("POST", "/v1/instances", body=other)
    assert (status, answer["field"]) == (400, "accounts.0.password_sealed")


async def test_create_is_rate_limited_per_address(tmp_path: Path) -> None:
    async with relay_with_api(tmp_path, api={"create_rate": 1.0, "create_burst": 2}) as running:
        statuses = [
            (await running.client.call("POST", "/v1/instances", body=body()))[0] for _ in range(4)
        ]
        assert statuses == [201, 201, 429, 429]


async def test_info_health_stats_and_openapi(running: RunningRelay) -> None:
    api = running.client
    status, info = await api.call("GET", "/v1/info")
    assert status == 200 and info["lifetime"] == {"min": 3 * 86400, "max": 6 * 86400}
    assert {k["suite"] for k in info["hpke_keys"]} == {SUITE_X25519, SUITE_MLKEM768_X25519}
    assert info["sip"][0].startswith("sip:127.0.0.1:")
    assert await api.call("GET", "/healthz") == (200, {"status": "ok"})
    status, _ = await api.call("GET", "/v1/stats", secret="wrong")
    assert status == 401
    await api.call("POST", "/v1/instances", body=body())
    status, stats = await api.call("GET", "/v1/stats", secret="admin-token-for-tests")
    assert status == 200 and stats["instances"] == {"ios": {"active": 1}}
    status, document = await api.call("GET", "/openapi.json")
    assert status == 200 and "/v1/instances" in document["paths"]


async def test_plain_http_only_with_the_development_flag(
    running: RunningRelay, tmp_path: Path
) -> None:
    session = running.client.session
    with pytest.raises(aiohttp.ClientError):
        async with session.get(f"http://127.0.0.1:{running.relay.api_port}/healthz") as r:
            await r.read()
    config, _ = relay_config(
        tmp_path / "plain", api={"host": "127.0.0.1", "port": 0, "insecure_http": True}
    )
    relay = await start_relay(config)
    try:
        async with session.get(f"http://127.0.0.1:{relay.api_port}/healthz") as r:
            assert (r.status, await r.json()) == (200, {"status": "ok"})
    finally:
        await relay.close()


async def test_a_whole_number_written_as_a_float_is_an_integer(running: RunningRelay) -> None:
    status, created = await running.client.call(
        "POST", "/v1/instances", body=with_account(expires=900.0)
    )
    assert status == 201, created
    assert created["accounts"][0]["expires"] == 900
    status, answer = await running.client.call(
        "POST", "/v1/instances", body=with_account(expires=900.5)
    )
    assert (status, answer["field"]) == (400, "accounts.0.expires")
