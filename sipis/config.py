"""Configuration: a TOML file over embedded defaults, every key checked.

An error names the key (``sip.udp_port: expected an integer 0-65535``);
an unknown key is reported as a warning and otherwise ignored, so a typo is
seen rather than silently dropped.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names its key."""


@dataclass(frozen=True)
class SipSection:
    host: str = "0.0.0.0"  # noqa: S104 - SIP is served on every interface unless configured
    udp_port: int = 5060
    tcp_port: int | None = 5060
    advertise: str | None = None
    keepalive: float = 30.0


@dataclass(frozen=True)
class DnsSection:
    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 2.0


@dataclass(frozen=True)
class LogSection:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    sip: SipSection = field(default_factory=SipSection)
    dns: DnsSection = field(default_factory=DnsSection)
    log: LogSection = field(default_factory=LogSection)
    warnings: tuple[str, ...] = ()


def _port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{key}: expected an integer 0-65535, got {value!r}")
    return value


def _optional_port(key: str, value: Any) -> int | None:
    return None if value is False else _port(key, value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _optional_text(key: str, value: Any) -> str | None:
    return None if value == "" else _text(key, value)


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
        raise ConfigError(f"{key}: expected seconds (0 < s <= 86400), got {value!r}")
    return float(value)


def _nameservers(key: str, value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise ConfigError(f'{key}: expected a list of "address" or "address:port"')
    servers = []
    for item in value:
        text = _text(key, item)
        host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "53")
        if not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"{key}: bad port in {text!r}")
        servers.append((host or text, int(port)))
    return tuple(servers)


def _level(key: str, value: Any) -> str:
    text = _text(key, value).lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{key}: expected debug, info, warning or error, got {value!r}")
    return text


_CHECKS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "sip": {
        "host": _text,
        "udp_port": _port,
        "tcp_port": _optional_port,
        "advertise": _optional_text,
        "keepalive": _seconds,
    },
    "dns": {"nameservers": _nameservers, "timeout": _seconds},
    "log": {"level": _level},
}
_SECTIONS = {"sip": SipSection, "dns": DnsSection, "log": LogSection}


def parse_config(data: Mapping[str, Any]) -> Config:
    """Build a Config from parsed TOML; raise ConfigError naming the first bad key."""
    warnings: list[str] = []
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _CHECKS:
            warnings.append(f"unknown section {name!r} ignored")
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table")
        checks = _CHECKS[name]
        values = {}
        for key, item in value.items():
            check = checks.get(key)
            if check is None:
                warnings.append(f"unknown key {name}.{key} ignored")
                continue
            values[key] = check(f"{name}.{key}", item)
        sections[name] = _SECTIONS[name](**values)
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in sections.items() if k in known}, warnings=tuple(warnings))


def load_config(path: Path | None) -> Config:
    """The embedded defaults, overridden by the TOML file at ``path`` if given."""
    if path is None:
        return Config()
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data)
