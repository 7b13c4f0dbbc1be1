"""The README's first commands exist, and its sealing example works against a relay."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.peers.api import relay_with_api

README = (Path(__file__).parent.parent.parent / "README.md").read_text()


def test_the_two_commands_come_first_and_exist() -> None:
    commands = re.findall(r"^\./(scripts/\w+)", README.split("```")[1], re.MULTILINE)
    assert commands == ["scripts/serve", "scripts/test"]
    root = Path(__file__).parent.parent.parent
    assert all((root / c).stat().st_mode & 0o111 for c in commands)
    assert "exec ./scripts/test" in (root / ".ci" / "run").read_text()


async def test_sealing_example_is_accepted(tmp_path: Path) -> None:
    example = README.split("### Sealed passwords (HPKE)")[1].split("```python")[1].split("```")[0]
    namespace: dict[str, Any] = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    async with relay_with_api(tmp_path) as running:
        _, info = await running.client.call("GET", "/v1/info")
        account = {"id": "work", "aor": "sip:alice@example.test",
                   "registrar": "sip:192.0.2.1;transport=udp"}  # fmt: skip
        sealed = namespace["sealed_account"](info, account, "from-the-readme")
        body = {"app_id": "com.example.phone", "platform": "android",
                "push": {"call_token": "f" * 40}, "accounts": [sealed]}  # fmt: skip
        status, created = await running.client.call("POST", "/v1/instances", body=body)
        assert status == 201, created
        binding = running.relay.bindings.get(f"{created['id']}/work")
        assert binding is not None and binding.session.config.password == "from-the-readme"


def test_push_opening_example_decrypts_a_sealed_payload() -> None:
    from sipis.push.payload import seal

    example = README.split("### The payload, and how an app opens it")[1]
    code = example.split("```python")[1].split("```")[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    key = bytes(range(32))
    content = {"type": "call", "caller": "sip:bob@example.test"}
    assert namespace["open_push"](seal(content, key), key) == content
    assert namespace["open_push"](content, key) == content
