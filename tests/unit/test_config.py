"""Configuration: defaults, overrides, errors that name the key, warnings for unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipis.config import Config, ConfigError, load_config, parse_config


def test_embedded_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert (config.sip.udp_port, config.sip.tcp_port, config.log.level) == (5060, 5060, "info")


def test_file_overrides(tmp_path: Path) -> None:
    path = tmp_path / "sipis.toml"
    path.write_text(
        '[sip]\nudp_port = 5070\ntcp_port = false\nadvertise = "198.51.100.1"\n'
        '[dns]\nnameservers = ["127.0.0.1:5353", "192.0.2.53"]\n[log]\nlevel = "DEBUG"\n'
    )
    config = load_config(path)
    assert (config.sip.udp_port, config.sip.tcp_port) == (5070, None)
    assert config.sip.advertise == "198.51.100.1"
    assert config.dns.nameservers == (("127.0.0.1", 5353), ("192.0.2.53", 53))
    assert config.log.level == "debug"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"sip": {"udp_port": 70000}}, "sip.udp_port"),
        ({"sip": {"udp_port": "5060"}}, "sip.udp_port"),
        ({"sip": {"keepalive": 0}}, "sip.keepalive"),
        ({"sip": {"host": ""}}, "sip.host"),
        ({"dns": {"nameservers": "127.0.0.1"}}, "dns.nameservers"),
        ({"sip": {"allowed_networks": "10.0.0.0/8"}}, "sip.allowed_networks"),
        ({"sip": {"allowed_networks": ["10.0.0.0/33"]}}, "sip.allowed_networks"),
        ({"store": {"url": "mysql://db/sipis"}}, "store.url"),
        ({"cluster": {"node": "two words"}}, "cluster.node"),
        ({"cluster": {"lease": 0.5}}, "cluster.lease"),
        ({"dns": {"nameservers": ["127.0.0.1:x"]}}, "dns.nameservers"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"sip": {"register_rate": -1}}, "sip.register_rate"),
        ({"lifecycle": {"startup_spread": -0.5}}, "lifecycle.startup_spread"),
        ({"cluster": {"takeover_spread": -0.5}}, "cluster.takeover_spread"),
        ({"sip": 5}, "sip"),
    ],
)
def test_errors_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        parse_config(data)


def test_zero_rate_and_spreads_are_allowed() -> None:
    config = parse_config(
        {
            "sip": {"register_rate": 0},
            "lifecycle": {"startup_spread": 0},
            "cluster": {"takeover_spread": 0},
        }
    )
    assert (config.sip.register_rate, config.lifecycle.startup_spread) == (0.0, 0.0)
    assert config.cluster.takeover_spread == 0.0
    with pytest.raises(
        ConfigError, match=r"^sip.register_rate: expected a number in \[0, 100000\]"
    ):
        parse_config({"sip": {"register_rate": 100001}})


def test_unknown_keys_are_warned_not_fatal() -> None:
    config = parse_config({"sip": {"udp_prot": 1}, "nope": {}})
    assert config.warnings == ("unknown key sip.udp_prot ignored", "unknown section 'nope' ignored")
    assert config.sip.udp_port == 5060


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sip\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
