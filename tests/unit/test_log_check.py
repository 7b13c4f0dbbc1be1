"""The session-wide log check finds a secret that reaches a log line."""

from __future__ import annotations

import logging

from tests.secrets import RECORDER, SECRETS, remember


def test_a_logged_secret_is_found() -> None:
    remember("canary-secret-value")
    before = len(RECORDER.lines)
    logging.getLogger("sipis.test").debug("leaking %s on purpose", "canary-secret-value")
    try:
        assert [line for line in RECORDER.leaks() if "canary" in line] == [
            "sipis.test: leaking canary-secret-value on purpose"
        ]
    finally:
        del RECORDER.lines[before:]
        SECRETS.discard("canary-secret-value")
    assert not [line for line in RECORDER.leaks() if "canary" in line]
