"""The ``sipis`` command: version, config errors, and ``serve`` answering SIP."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest

from sipis import __version__
from sipis.cli import main
from sipis.config import ConfigError, parse_config, with_allowed_networks

OPTIONS = (
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;rport;branch=z9hG4bKcli\r\n"
    b"From: <sip:probe@example.test>;tag=1\r\nTo: <sip:127.0.0.1>\r\nCall-ID: cli-1\r\n"
    b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


def test_version(capsys) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"sipis {__version__}"


def test_config_error_names_the_key(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[sip]\nudp_port = -1\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "sip.udp_port" in capsys.readouterr().err


async def test_serve_answers_options_and_stops_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "sipis.toml"
    path.write_text(
        '[sip]\nhost = "127.0.0.1"\nudp_port = 0\ntcp_port = false\n'
        '[device]\nhost = "127.0.0.1"\ntls_port = 0\ntcp_port = 0\nudp_port = 0\n'
        f'[api]\nhost = "127.0.0.1"\nport = 0\n[data]\ndir = "{tmp_path / "data"}"\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sipis",
        "serve",
        "--config",
        str(path),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        match = None
        async with asyncio.timeout(10):
            while match is None:
                line = (await process.stderr.readline()).decode()
                assert line, "sipis serve exited"
                match = re.search(r"listening on 127\.0\.0\.1 \(udp (\d+)\)", line)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()

        class Probe(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                answer.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Probe, local_addr=("127.0.0.1", 0))
        transport.sendto(OPTIONS, ("127.0.0.1", int(match.group(1))))
        async with asyncio.timeout(5):
            data = await answer
        transport.close()
        assert data.startswith(b"SIP/2.0 200 OK\r\n")
        assert b"Call-ID: cli-1\r\n" in data
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0


def test_serve_allow_network_adds_to_the_configured_networks() -> None:
    config = with_allowed_networks(
        parse_config({"sip": {"allowed_networks": ["10.0.0.0/8"]}}), ["127.0.0.0/8"]
    )
    assert config.sip.allowed_networks == ("10.0.0.0/8", "127.0.0.0/8")
    with pytest.raises(ConfigError, match="--allow-network: 'nowhere' is not a network"):
        with_allowed_networks(config, ["nowhere"])
