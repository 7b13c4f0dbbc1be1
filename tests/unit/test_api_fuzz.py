"""The whole HTTPS API, fuzzed against the OpenAPI document it serves.

Schemathesis reads ``/openapi.json`` from a relay running in-process (on
its own thread: schemathesis sends synchronously) and sends every operation
valid requests and invalid ones (mutated bodies, path parameters and
headers, boundary values, wrong media types and methods).  Whatever comes
in, API.md promises: no 5xx, every rejection is JSON
``{"error": ..., "detail": ...}``, a password is never echoed; and here
also: every answer within ``ANSWER_WITHIN`` seconds.

A second test fuzzes the instance operations as the owner of a real instance
(its id and ``Authorization: Bearer <secret>``), so the paths behind
authentication are fuzzed too: above all PATCH validation against a stored
instance.  About half of the generated bodies are made ``usable`` (SIP URIs,
push tokens), so creations and changes also get past validation with
generated passwords, names and flags.  A third test shows that each check
fails the answer that breaks its rule.

The relay's DNS answers NXDOMAIN to every question, so no account a
generated request creates ever reaches a registrar.  Generation is
reproducible (fixed seed, no example database): CI sends the same requests
on every run.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.errors import FailureGroup

from tests.peers.api import (
    APNS_TOKEN,
    OTHER_TOKEN,
    PAYLOAD_KEY_B64,
    instance_body,
    relay_with_api,
)
from tests.peers.dnsserver import DnsServer
from tests.secrets import remember

Case = schemathesis.Case[Any]
Operation = APIOperation[Any, Any, Any, Any]

SEED = 20240229
EXAMPLES = 150  # random cases per operation, valid and invalid mixed, after the coverage cases
ANSWER_WITHIN = 2.0  # seconds, for every request
START_WITHIN = 30.0  # seconds, for the relay to start or stop
SHORTEST_PASSWORD = 4  # shorter ones match too much innocent text to be looked for
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

FCM_TOKEN = "fcm-registration-token:" + "Q7" * 40
OWNER_PASSWORD = "owner-pa55word-never-echoed"
OWNER_REGISTRAR = "sip:registrar.invalid"


class RelayThread:
    """A relay with its HTTPS API and its DNS server, on their own event loop in a thread.

    Schemathesis sends requests synchronously, so the relay cannot share the
    test's thread.  ``with RelayThread(path) as relay:`` starts it and waits
    (bounded) until it serves; leaving the block stops it and joins the thread.
    """

    def __init__(self, data: Path) -> None:
        self.base_url = ""
        self.ca_file = ""
        self._data = data
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relay-under-fuzz", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(START_WITHIN):
            raise RuntimeError(f"the relay did not start within {START_WITHIN} s")
        if self._failure is not None:
            raise RuntimeError("the relay failed to start") from self._failure
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread.is_alive() and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_WITHIN)
        if self._thread.is_alive():
            raise RuntimeError(f"the relay did not stop within {START_WITHIN} s")
        if self._failure is not None:
            raise RuntimeError("the relay failed while it ran") from self._failure

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with (
            DnsServer() as dns,
            relay_with_api(
                self._data,
                dns={"nameservers": [f"127.0.0.1:{dns.address[1]}"]},
                lifecycle={"unregister_wait": 0.2},
                api={"create_rate": 100000.0, "create_burst": 100000},
            ) as running,
        ):
            self.base_url = running.client.base
            self.ca_file = str(running.relay.config.data_dir / "tls" / "dev-certificate.pem")
            self._ready.set()
            await self._stop.wait()


@dataclass
class Owner:
    """A real instance and its secret; a new one replaces it whenever a request erases it."""

    http: requests.Session
    base_url: str
    instance_id: str = ""
    secret: str = ""

    def create(self) -> None:
        body = instance_body(OWNER_REGISTRAR, user="owner", password=OWNER_PASSWORD)
        answer = self.http.post(f"{self.base_url}/v1/instances", json=body, timeout=ANSWER_WITHIN)
        assert answer.status_code == 201, answer.text
        created = answer.json()
        self.instance_id, self.secret = created["id"], created["secret"]

    @property
    def authorization(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


# -- steering: bodies that get past validation ---------------------------------------------


def usable(body: Any) -> Any:
    """``body`` with what generated text almost never gets right made well-formed.

    Generated text is almost never a SIP URI with a user, an APNs hex token,
    base64 of 32 bytes or an HPKE ciphertext, so without this nearly every
    creation and account change stops at validation.  This puts in unique
    account ids (the generated ones with the index appended), SIP URIs
    under ``.invalid`` (the relay's DNS answers NXDOMAIN), push tokens of the
    platform's kind (a PATCH has no platform: the owner is iOS), a payload
    key, a plain password where a sealed one (or, creating, none) was generated, no
    control characters in text, and integers for integral numbers (JSON
    Schema calls ``600.0`` an integer, the API does not).  Everything else
    generated (ids, passwords, names, flags, missing and extra fields) is kept.
    """
    if not isinstance(body, dict):
        return body
    fixed = dict(body)
    push = fixed.get("push")
    if isinstance(push, dict):
        push = dict(push)
        if fixed.get("platform") == "android":
            push["call_token"] = FCM_TOKEN
            push.pop("other_token", None)
        else:
            push["call_token"] = APNS_TOKEN
            if "other_token" in push:
                push["other_token"] = OTHER_TOKEN
        fixed["push"] = push
    if isinstance(fixed.get("payload_key"), str):
        fixed["payload_key"] = PAYLOAD_KEY_B64
    if "lifetime" in fixed:
        fixed["lifetime"] = _integer(fixed["lifetime"])
    accounts = fixed.get("accounts")
    if isinstance(accounts, list):
        creating = "platform" in fixed
        fixed["accounts"] = [
            _usable_account(index, a, creating=creating) for index, a in enumerate(accounts)
        ]
    return fixed


def _usable_account(index: int, account: Any, *, creating: bool) -> Any:
    if not isinstance(account, dict):
        return account
    fixed = {**account, "aor": f"sip:user{index}@aor.invalid"}
    if isinstance(fixed.get("id"), str):
        fixed["id"] = f"{fixed['id'][:60]}.{index}"
    for name in ("registrar", "outbound_proxy"):
        if isinstance(fixed.get(name), str):
            fixed[name] = f"sip:{name.replace('_', '-')}.invalid"
    sealed = fixed.pop("password_sealed", None) is not None
    fixed.pop("hpke_key_id", None)
    if (creating or sealed) and not isinstance(fixed.get("password"), str):
        fixed["password"] = f"generated-password-{index}"
    for name in ("password", "auth_username", "display_name"):
        if isinstance(fixed.get(name), str):
            fixed[name] = _CONTROL.sub("", fixed[name]) or "-"
    if "expires" in fixed:
        fixed["expires"] = _integer(fixed["expires"])
    return fixed


def _integer(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Schemathesis hook: each generated body is sent as generated or made ``usable``."""
    return st.sampled_from([body, usable(body)])


# -- checks ----------------------------------------------------------------------------------


def rejections_are_json_errors(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case
) -> None:
    """Every 4xx/5xx is ``application/json`` with string ``error`` and ``detail``."""
    if response.status_code < 400:
        return
    assert _is_json(response), (
        f"{response.status_code} answered as {_content_type(response)!r}: "
        f"{response.text_lossy()[:200]!r}"
    )
    body = _json_body(response)
    assert isinstance(body, dict), f"{response.status_code} answered with {body!r}"
    for name in ("error", "detail"):
        assert isinstance(body.get(name), str), f"{response.status_code} without {name!r}: {body}"


def answered_in_time(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case
) -> None:
    assert response.elapsed < ANSWER_WITHIN, f"answered in {response.elapsed:.3f} s"


def no_password_echo(openapi_text: str) -> schemathesis.CheckFunction:
    """A check: no answer carries a submitted password (the owner's, any ``accounts[*].password``).

    The answer is searched as raw text and, when it is JSON, as decoded
    strings (the API escapes non-ASCII).  A password that also occurs in
    text the answer may rightly repeat (the request's other values, the
    owner's stored instance, the OpenAPI document whose names and enums
    schemathesis draws values from) cannot tell a leak from an echo and is
    not looked for.
    """
    known = [openapi_text, *_strings(instance_body(OWNER_REGISTRAR, user="owner", password=""))]

    def no_password_in_answer(
        ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case
    ) -> None:
        innocent = known + list(_strings(_without_passwords(case.body)))
        sent = _passwords(case.body) | {OWNER_PASSWORD}
        wanted = {p for p in sent if not any(p in text for text in innocent)}
        texts = [response.text_lossy()]
        if _is_json(response):
            texts += list(_strings(_json_body(response)))
        leaked = sorted(p for p in wanted if any(p in text for text in texts))
        assert not leaked, f"the answer carries the submitted password(s) {leaked!r}"

    return no_password_in_answer


def _content_type(response: schemathesis.Response) -> str:
    return ", ".join(response.headers.get("content-type", []))


def _is_json(response: schemathesis.Response) -> bool:
    return _content_type(response).startswith("application/json")


def _json_body(response: schemathesis.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise AssertionError(
            f"{response.status_code} is not JSON: {response.text_lossy()[:200]!r}"
        ) from None


def remember_steered_passwords(case: Case) -> None:
    """Hand the passwords the steering wrote to the suite's log check (random ones could
    match log text by chance, these cannot)."""
    remember(OWNER_PASSWORD, *(p for p in _passwords(case.body) if p.startswith("generated-")))


def _passwords(body: Any) -> set[str]:
    if not isinstance(body, dict) or not isinstance(body.get("accounts"), list):
        return set()
    return {
        account["password"]
        for account in body["accounts"]
        if isinstance(account, dict)
        and isinstance(account.get("password"), str)
        and len(account["password"]) >= SHORTEST_PASSWORD
    }


def _without_passwords(body: Any) -> Any:
    if not isinstance(body, dict) or not isinstance(body.get("accounts"), list):
        return body
    accounts = [
        {k: v for k, v in a.items() if k != "password"} if isinstance(a, dict) else a
        for a in body["accounts"]
    ]
    return {**body, "accounts": accounts}


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# -- fixtures and tests ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayThread]:
    with RelayThread(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


@pytest.fixture(scope="module")
def http(relay: RelayThread) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the relay's certificate
        session.verify = relay.ca_file
        yield session


@pytest.fixture(scope="module")
def api_schema(relay: RelayThread) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "base-url": relay.base_url,
            "tls-verify": relay.ca_file,
            "request-timeout": ANSWER_WITHIN,
        }
    )
    schema = schemathesis.openapi.from_url(
        f"{relay.base_url}/openapi.json", config=config, verify=relay.ca_file, timeout=5
    )
    schema.hook(flatmap_body)
    return schema


@pytest.fixture(scope="module")
def checks(http: requests.Session, relay: RelayThread) -> list[schemathesis.CheckFunction]:
    openapi_text = http.get(f"{relay.base_url}/openapi.json", timeout=ANSWER_WITHIN).text
    return [
        not_a_server_error,
        rejections_are_json_errors,
        answered_in_time,
        no_password_echo(openapi_text),
    ]


@pytest.fixture(scope="module")
def owner(http: requests.Session, relay: RelayThread) -> Owner:
    owner = Owner(http, relay.base_url)
    owner.create()
    return owner


def operations(schema: schemathesis.BaseSchema, path: str | None = None) -> list[Operation]:
    """The schema's operations (those under ``path`` only, if given); a broken one fails."""
    found = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        if path is None or result.ok().path == path:
            found.append(result.ok())
    return found


def fuzz(operation: Operation, send: Callable[[Case], None]) -> None:
    """Send ``operation`` its coverage cases, then ``EXAMPLES`` random valid and invalid ones.

    The coverage cases are schemathesis's deterministic boundary values (lengths
    and bounds at and past their limits, missing and mistyped fields, wrong
    media types, unexpected methods), in both generation modes; each body goes
    as generated and, where that differs, made ``usable``.  The cases are
    drawn here rather than through ``schemathesis.pytest.from_fixture``, whose
    lazy schemas rename the pytest item through ``Node._nodeid``, an attribute
    pytest 9.2 no longer has.
    """
    schema = operation.schema
    for case in schema.iter_coverage_cases(
        operation,
        generation_modes=list(GenerationMode),
        generation_config=schema.config.generation_for(operation=operation, phase="coverage"),
    ):
        send(case)
        body = usable(case.body)
        if body != case.body:
            steered = case.derive(keep_auth=True)
            steered.body = body
            send(steered)
    any_mode = st.one_of([operation.as_strategy(generation_mode=mode) for mode in GenerationMode])

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=any_mode)
    def random_cases(case: Case) -> None:
        send(case)

    random_cases()


def test_the_checks_catch_what_they_look_for(
    api_schema: schemathesis.BaseSchema,
    http: requests.Session,
    checks: list[schemathesis.CheckFunction],
) -> None:
    """A real creation passes every check, and each check fails the answer that breaks its rule."""
    password = "pr\u00f6be-pa55word"  # the API escapes the umlaut: only decoding finds it
    body = instance_body(OWNER_REGISTRAR, user="probe", password=password)
    case = api_schema["/v1/instances"]["POST"].Case(body=body, media_type="application/json")
    real = case.call(session=http)
    assert real.status_code == 201
    case.validate_response(real, checks=checks)
    leaking = json.dumps({**real.json(), "note": f"password {password}"}).encode()
    broken = {
        "Server error": (500, "application/json", b'{"error":"x","detail":"y"}', 0.01),
        "rejections_are_json_errors": (400, "text/plain", b"400: Bad Request", 0.01),
        "answered_in_time": (201, "application/json", real.content, ANSWER_WITHIN + 0.5),
        "no_password_in_answer": (201, "application/json", leaking, 0.01),
    }
    for culprit, (status, content_type, content, elapsed) in broken.items():
        answer = schemathesis.Response(
            status, {"content-type": [content_type]}, content, real.request, elapsed, verify=True
        )
        with pytest.raises(FailureGroup) as raised:
            case.validate_response(answer, checks=checks)
        assert [f.title for f in raised.value.exceptions] == [
            culprit if culprit == "Server error" else f"Custom check failed: `{culprit}`"
        ]


def test_every_operation(
    api_schema: schemathesis.BaseSchema,
    http: requests.Session,
    checks: list[schemathesis.CheckFunction],
    subtests: pytest.Subtests,
) -> None:
    def send(case: Case) -> None:
        remember_steered_passwords(case)
        response = case.call(session=http)
        case.validate_response(response, checks=checks)

    found = operations(api_schema)
    served = [(path, method) for path, item in api_schema.raw_schema["paths"].items()
              for method in item if method != "parameters"]  # fmt: skip
    assert len(found) == len(served) > 0, ([o.label for o in found], served)
    for operation in found:
        with subtests.test(msg=operation.label):
            fuzz(operation, send)


def test_instance_operations_as_owner(
    api_schema: schemathesis.BaseSchema,
    http: requests.Session,
    checks: list[schemathesis.CheckFunction],
    owner: Owner,
    subtests: pytest.Subtests,
) -> None:
    def send(case: Case) -> None:
        remember_steered_passwords(case)
        case.path_parameters = {"instance_id": owner.instance_id}
        response = case.call(session=http, headers=owner.authorization)
        case.validate_response(response, checks=checks, headers=owner.authorization)
        if case.method == "DELETE" and response.status_code == 204:
            owner.create()

    found = operations(api_schema, "/v1/instances/{instance_id}")
    assert sorted(o.method.upper() for o in found) == ["DELETE", "GET", "PATCH"]
    for operation in found:
        with subtests.test(msg=operation.label):
            fuzz(operation, send)
