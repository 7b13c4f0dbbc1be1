"""The baresip fixture: a real softphone registers at Kamailio and answers sipp's calls.

Kamailio is the registrar and the record-routing proxy; sipp calls
sip:alice@example.test over UDP through it, and Kamailio forwards the INVITE
over the flow baresip registered from (UDP, TCP or TLS).  Every assertion
rests on what a peer reported: baresip's ctrl_tcp events, Kamailio's
location table, sipp's statistics and message trace.
"""

import asyncio
from pathlib import Path

import pytest

from tests.conftest import PEER_USERS
from tests.peers.baresip import Baresip, BaresipError, Transport
from tests.peers.kamailio import Kamailio
from tests.peers.sipp import CALLER_INVITE, SipMessage, SippResult, run_sipp_client

pytestmark = pytest.mark.peer

ALICE = "sip:alice@example.test"
CALL_TIMEOUT = 6.0

# A caller through a record-routing proxy: INVITE to [service]@example.test,
# then ACK and BYE along the route set the 200 OK established (rrs="true"
# keeps Record-Route and Contact; [routes] and [next_url] use them).

_ANSWERED = """\
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="200" rrs="true"/>
  <send>
    <![CDATA[

      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      [routes]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""

CALLER_HANGS_UP = f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="call answered, then ended by the caller">
  <send retrans="500"><![CDATA[

{CALLER_INVITE}
  ]]></send>
{_ANSWERED}
  <pause milliseconds="300"/>
  <send retrans="500">
    <![CDATA[

      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      [routes]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: 2 BYE
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
</scenario>
"""

CALLEE_HANGS_UP = f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="call answered, then ended by the callee">
  <send retrans="500"><![CDATA[

{CALLER_INVITE}
  ]]></send>
{_ANSWERED}
  <recv request="BYE"/>
  <send>
    <![CDATA[

      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
</scenario>
"""


def baresip_for(
    kamailio: Kamailio,
    tmp_path: Path,
    transport: Transport,
    *,
    password: str = PEER_USERS["alice"],
    answer_delay: float = 0.0,
) -> Baresip:
    return Baresip(
        tmp_path / f"baresip-{transport}",
        aor=ALICE,
        registrar=kamailio.uri(transport),
        username="alice",
        password=password,
        transport=transport,
        ca_file=kamailio.ca_certificate,
        answer_delay=answer_delay,
    )


async def call_alice(kamailio: Kamailio, tmp_path: Path, scenario: str) -> SippResult:
    """Run one sipp call to alice through Kamailio's UDP listener."""
    scenario_file = tmp_path / "caller.xml"
    scenario_file.write_text(scenario)
    return await run_sipp_client(
        scenario_file,
        kamailio.address("udp"),
        service="alice",
        timeout=CALL_TIMEOUT,
        workdir=tmp_path / "sipp",
    )


def first(messages: tuple[SipMessage, ...], direction: str, status: int) -> SipMessage:
    return next(m for m in messages if m.direction == direction and m.status == status)


def invite_call_id(result: SippResult) -> str:
    invite = next(m for m in result.messages if m.method == "INVITE")
    call_id = invite.header("Call-ID")
    assert call_id is not None
    return call_id


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_registers_and_answers_a_call_that_the_caller_ends(
    kamailio: Kamailio, tmp_path: Path, transport: Transport
) -> None:
    async with baresip_for(kamailio, tmp_path, transport) as phone:
        registered = await phone.wait_registered()
        assert (registered.aor, registered.param) == (ALICE, "200 OK")
        [binding] = await kamailio.contacts("alice")
        assert binding["socket"] == f"{transport}:127.0.0.1:{kamailio.address(transport)[1]}"
        assert binding["uri"].startswith("sip:alice")

        result = await call_alice(kamailio, tmp_path, CALLER_HANGS_UP)

        assert result.returncode == 0, result.errors + result.screen
        assert (result.stats.successful_calls, result.stats.failed_calls) == (1, 0)
        call_id = invite_call_id(result)
        incoming = await phone.wait_event("CALL_INCOMING")
        established = await phone.wait_event("CALL_ESTABLISHED")
        closed = await phone.wait_event("CALL_CLOSED")
        assert {incoming.call_id, established.call_id, closed.call_id} == {call_id}
        assert incoming.peer_uri == "sip:bob@example.test"
        assert incoming.fields["direction"] == "incoming"
        answer = first(result.messages, "received", 200)
        assert answer.header("Content-Type") == "application/sdp"
        assert "\r\nc=IN IP4 127.0.0.1\r\n" in answer.text
        assert "\r\nm=audio " in answer.text and " RTP/AVP 0" in answer.text
        assert first(result.messages, "received", 180).header("Call-ID") == call_id


async def test_hangup_ends_the_call_with_a_bye_over_tls(kamailio: Kamailio, tmp_path: Path) -> None:
    async with baresip_for(kamailio, tmp_path, "tls") as phone:
        await phone.wait_registered()
        caller = asyncio.create_task(call_alice(kamailio, tmp_path, CALLEE_HANGS_UP))
        established = await phone.wait_event("CALL_ESTABLISHED", CALL_TIMEOUT)
        await phone.hangup()
        result = await caller

        assert result.returncode == 0, result.errors + result.screen
        assert result.stats.successful_calls == 1
        [bye] = [m for m in result.messages if m.method == "BYE"]
        assert bye.direction == "received"
        assert bye.header("Call-ID") == established.call_id == invite_call_id(result)
        closed = await phone.wait_event("CALL_CLOSED")
        assert closed.call_id == established.call_id


async def test_answer_delay_holds_the_200_back(kamailio: Kamailio, tmp_path: Path) -> None:
    delay = 1.0
    async with baresip_for(kamailio, tmp_path, "udp", answer_delay=delay) as phone:
        await phone.wait_registered()
        result = await call_alice(kamailio, tmp_path, CALLER_HANGS_UP)

        assert result.returncode == 0, result.errors + result.screen
        incoming = await phone.wait_event("CALL_INCOMING")
        established = await phone.wait_event("CALL_ESTABLISHED")
        assert established.received_at - incoming.received_at >= delay


async def test_wrong_password_fails_the_registration(kamailio: Kamailio, tmp_path: Path) -> None:
    async with baresip_for(kamailio, tmp_path, "udp", password="not-the-password") as phone:
        with pytest.raises(BaresipError, match="REGISTER_FAIL"):
            await phone.wait_registered()
        [failure] = [event for event in phone.events if event.type == "REGISTER_FAIL"]
        assert failure.param is not None and failure.param.startswith("401")
        assert await kamailio.contacts("alice") == []
