"""The README's quick start: `sipis serve` running, `scripts/demo` makes a real call through it."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parents[2]


async def test_the_demo_calls_through_a_running_sipis(tmp_path: Path) -> None:
    config = tmp_path / "sipis.toml"
    config.write_text(
        '[sip]\nhost = "127.0.0.1"\nudp_port = 0\ntcp_port = false\n'
        '[device]\nhost = "127.0.0.1"\ntls_port = 0\ntcp_port = 0\nudp_port = 0\n'
        f'[api]\nhost = "127.0.0.1"\nport = 0\n[data]\ndir = "{tmp_path / "data"}"\n'
    )
    serve = await asyncio.create_subprocess_exec(
        # as the quick start says: Kamailio runs on this machine's loopback
        sys.executable, "-m", "sipis", "serve", "--config", str(config),
        "--allow-network", "127.0.0.0/8",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert serve.stderr is not None
    try:
        api = None
        async with asyncio.timeout(15):
            while api is None:
                line = (await serve.stderr.readline()).decode()
                assert line, "sipis serve exited"
                found = re.search(r"API listening on (https://127\.0\.0\.1:\d+)", line)
                api = found.group(1) if found else None
        draining = asyncio.ensure_future(serve.stderr.read())  # its log must never block it
        demo = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "scripts" / "demo.py"),
            "--api", api, "--data-dir", str(tmp_path / "data"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        async with asyncio.timeout(60):
            output, _ = await demo.communicate()
        text = output.decode()
        assert demo.returncode == 0, text
        assert "demo complete: a call went through sipis" in text
        assert "<- INVITE sip:app@" in text and "Kamailio has no binding for alice" in text
    finally:
        serve.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await serve.wait() == 0
        if api is not None:
            await draining
