"""Which push an event becomes, and to which token (API.md, "Pushes").

iOS: an incoming call is a VoIP push to the call token; everything else
goes to the other token as an alert or background push, never as VoIP (iOS
ends apps that get a VoIP push without reporting a call), and is skipped
when the app gave no other token.  Android: every event is an FCM data
message to the one token.
"""

from __future__ import annotations

from . import payload
from .base import Kind, Push, Routing

# How long a service may hold a push for an offline device: a call push is
# worthless once the call has rung out, a notice stays useful for a day.
CALL_TTL = 0
NOTICE_TTL = 86400


def compose(
    kind: Kind,
    routing: Routing,
    *,
    relay: str | None = None,
    account: str | None = None,
    call: str | None = None,
    caller: str | None = None,
    caller_name: str | None = None,
    ttl: int | None = None,
) -> Push | None:
    """The push for ``kind``, or None when the instance has no token for it."""
    if routing.platform == "ios" and kind is not Kind.CALL:
        token = routing.other_token
    else:
        token = routing.call_token
    if token is None:
        return None
    content = payload.build(
        kind,
        instance=routing.instance_id,
        relay=relay,
        account=account,
        call=call,
        caller=caller,
        caller_name=caller_name,
    )
    if routing.payload_key is not None:
        content = payload.seal(content, routing.payload_key)
    return Push(
        kind=kind,
        platform=routing.platform,
        app_id=routing.app_id,
        token=token,
        environment=routing.environment,
        payload=content,
        instance_id=routing.instance_id,
        collapse_id=call,
        ttl=ttl if ttl is not None else (CALL_TTL if kind is Kind.CALL else NOTICE_TTL),
    )
