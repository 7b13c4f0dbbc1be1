"""Configuration: a TOML file over embedded defaults, every key checked.

An error names the key (``sip.udp_port: expected an integer 0-65535``);
an unknown key is reported as a warning and otherwise ignored, so a typo is
seen rather than silently dropped.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sipis.logs import FORMATS, INSTANCE_ID

DAY = 86400
_NODE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names its key."""


@dataclass(frozen=True)
class SipSection:
    host: str = "0.0.0.0"  # noqa: S104 - SIP is served on every interface unless configured
    udp_port: int = 5060
    tcp_port: int | None = 5060
    advertise: str | None = None
    keepalive: float = 30.0
    # networks where registrars and outbound proxies may be even though their addresses
    # are loopback, private or link-local (refused otherwise: sipis.transport.policy)
    allowed_networks: tuple[str, ...] = ()
    # connections peers open to the TCP port: in all, per source address (IPv6: per /64),
    # and seconds one may stay unused before it is closed (sipis.transport.admission)
    max_connections: int = 1024
    max_connections_per_source: int = 64
    idle_timeout: float = 300.0
    # new REGISTERs (initial, refresh, retry) sent per second at most, by all bindings
    # together (sipis.pacer); 0: no limit
    register_rate: float = 500.0


@dataclass(frozen=True)
class DeviceSection:
    """The device port, where woken apps register to pick up calls and messages."""

    host: str = "0.0.0.0"  # noqa: S104 - apps connect from anywhere unless configured
    advertise: str | None = None
    tls_port: int | None = 5061
    tcp_port: int | None = 5062
    udp_port: int | None = 5062
    certificate: str | None = None
    private_key: str | None = None
    realm: str = "sipis"
    # Digest algorithms offered to apps, in order.  MD5 alone by default: some
    # phones fail a 401 that offers an algorithm they lack, and the secret's 256
    # random bits leave nothing for a stronger hash to protect.
    digest_algorithms: tuple[str, ...] = ("MD5",)
    keepalive: float = 30.0
    grace: float = 10.0
    max_failures: int = 10
    # connections apps open to the TLS and TCP ports: in all, per source address (IPv6:
    # per /64), seconds to finish a TLS handshake, and seconds a connection with no
    # registration over it may stay unused before it is closed (sipis.transport.admission)
    max_connections: int = 4096
    max_connections_per_source: int = 64
    handshake_timeout: float = 10.0
    idle_timeout: float = 30.0

    def __repr__(self) -> str:
        return f"DeviceSection(host={self.host!r}, tls_port={self.tls_port})"


@dataclass(frozen=True)
class DnsSection:
    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 2.0


@dataclass(frozen=True)
class ApiSection:
    host: str = "0.0.0.0"  # noqa: S104 - the API is served on every interface unless configured
    port: int = 8443
    certificate: str | None = None
    private_key: str | None = None
    insecure_http: bool = False
    admin_token: str | None = None
    max_body: int = 64 * 1024
    create_rate: float = 10.0
    create_burst: int = 20

    def __repr__(self) -> str:
        return f"ApiSection(host={self.host!r}, port={self.port})"


@dataclass(frozen=True)
class DataSection:
    dir: str = "data"


@dataclass(frozen=True)
class LifecycleSection:
    min_lifetime_days: float = 3.0
    max_lifetime_days: float = 6.0
    day: float = DAY
    sweep_interval: float = 15.0
    unregister_wait: float = 5.0
    # at start-up, stored accounts register over at most this many seconds (fewer when
    # sip.register_rate lets them register sooner)
    startup_spread: float = 600.0
    # on shutdown, un-REGISTER every binding (else they stay registered until they expire,
    # so calls still reach a node that comes back in time)
    unregister_on_shutdown: bool = False


@dataclass(frozen=True)
class KeysSection:
    hpke_grace_days: float = 7.0
    # where the master, HPKE and audit keys live (default: <data.dir>/keys); every node of
    # a cluster needs the same keys
    dir: str | None = None


@dataclass(frozen=True)
class StoreSection:
    # postgresql://user@host:port/database for a cluster; default: SQLite in data.dir
    url: str | None = None


@dataclass(frozen=True)
class ClusterSection:
    # this node's name in the lease table (default: host name and device port)
    node: str | None = None
    # how long a shard lease lasts unless renewed; a crashed node's shards move after this
    lease: float = 30.0
    # how long a node takes to register the bindings of shards it takes over
    takeover_spread: float = 10.0


@dataclass(frozen=True)
class PushSection:
    ring_timeout: float = 60.0
    relay_uri: str | None = None
    max_message: int = 16 * 1024


@dataclass(frozen=True)
class ApnsSection:
    """Token auth (key_file, key_id, team_id) or certificate auth (certificate)."""

    key_file: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    certificate: str | None = None
    production_server: str = "api.push.apple.com:443"
    sandbox_server: str = "api.sandbox.push.apple.com:443"
    ca_file: str | None = None
    timeout: float = 5.0

    @property
    def configured(self) -> bool:
        return self.key_file is not None or self.certificate is not None


@dataclass(frozen=True)
class FcmSection:
    service_account: str | None = None
    send_url: str | None = None
    token_uri: str | None = None
    ca_file: str | None = None
    timeout: float = 5.0
    call_ttl: float = 30.0

    @property
    def configured(self) -> bool:
        return self.service_account is not None


@dataclass(frozen=True)
class LogSection:
    level: str = "info"
    format: str = "text"
    debug_instance: str | None = None


@dataclass(frozen=True)
class Config:
    sip: SipSection = field(default_factory=SipSection)
    device: DeviceSection = field(default_factory=DeviceSection)
    dns: DnsSection = field(default_factory=DnsSection)
    api: ApiSection = field(default_factory=ApiSection)
    data: DataSection = field(default_factory=DataSection)
    lifecycle: LifecycleSection = field(default_factory=LifecycleSection)
    keys: KeysSection = field(default_factory=KeysSection)
    push: PushSection = field(default_factory=PushSection)
    apns: ApnsSection = field(default_factory=ApnsSection)
    fcm: FcmSection = field(default_factory=FcmSection)
    log: LogSection = field(default_factory=LogSection)
    store: StoreSection = field(default_factory=StoreSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    warnings: tuple[str, ...] = ()

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir)

    @property
    def keys_dir(self) -> Path:
        return Path(self.keys.dir) if self.keys.dir else self.data_dir / "keys"

    @property
    def clustered(self) -> bool:
        """Whether nodes share a PostgreSQL store (and so divide the instances by lease)."""
        return self.store.url is not None


def _port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{key}: expected an integer 0-65535, got {value!r}")
    return value


def _optional_port(key: str, value: Any) -> int | None:
    return None if value is False else _port(key, value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string")
    return value


def _optional_text(key: str, value: Any) -> str | None:
    return None if value == "" else _text(key, value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _number(low: float, high: float, *, low_allowed: bool = False) -> Callable[[str, Any], float]:
    """A number above ``low`` (or equal to it, with ``low_allowed``) and at most ``high``."""
    bounds = f"{'[' if low_allowed else '('}{low:g}, {high:g}]"

    def check(key: str, value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (low <= value if low_allowed else low < value)
            or not value <= high
        ):
            raise ConfigError(f"{key}: expected a number in {bounds}, got {value!r}")
        return float(value)

    return check


def _count(low: int, high: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{key}: expected an integer {low}-{high}, got {value!r}")
        return value

    return check


def _lifetime_days(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 3 <= value <= 6:
        raise ConfigError(f"{key}: lifetimes stay within 3 to 6 days, got {value!r}")
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


def _networks(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f'{key}: expected a list of networks such as "10.0.0.0/8"')
    for item in value:
        try:
            ipaddress.ip_network(_text(key, item), strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not a network") from None
    return tuple(value)


def _file(key: str, value: Any) -> str | None:
    if value == "":
        return None
    path = Path(_text(key, value))
    if not path.is_file():
        raise ConfigError(f"{key}: no such file {str(path)!r}")
    return str(path)


def _server(key: str, value: Any) -> str:
    text = _text(key, value)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    return text


def _https_url(key: str, value: Any) -> str | None:
    if value == "":
        return None
    text = _text(key, value)
    if not text.startswith("https://"):
        raise ConfigError(f"{key}: expected an https:// URL, got {value!r}")
    return text


def _realm(key: str, value: Any) -> str:
    text = _text(key, value)
    if not text.isascii() or not text.isprintable() or '"' in text or "\\" in text:
        raise ConfigError(f"{key}: expected printable ASCII without quotes or backslashes")
    return text


def _digest_algorithms(key: str, value: Any) -> tuple[str, ...]:
    known = {"md5": "MD5", "sha-256": "SHA-256"}
    if not isinstance(value, list) or not value:
        raise ConfigError(f'{key}: expected a list of "MD5" and/or "SHA-256"')
    names = []
    for item in value:
        name = known.get(item.lower()) if isinstance(item, str) else None
        if name is None or name in names:
            raise ConfigError(f'{key}: expected "MD5" and/or "SHA-256" once each, got {item!r}')
        names.append(name)
    return tuple(names)


def _log_format(key: str, value: Any) -> str:
    text = _text(key, value).lower()
    if text not in FORMATS:
        raise ConfigError(f"{key}: expected text, json or keyvalue, got {value!r}")
    return text


def _instance_id(key: str, value: Any) -> str | None:
    if value == "":
        return None
    text = _text(key, value)
    if not INSTANCE_ID.fullmatch(text):
        raise ConfigError(f"{key}: expected an instance id (26 lowercase base32 characters)")
    return text


def _level(key: str, value: Any) -> str:
    text = _text(key, value).lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{key}: expected debug, info, warning or error, got {value!r}")
    return text


_SECONDS = _number(0, 86400)
_CONNECTIONS = _count(1, 1_000_000)


def _store_url(key: str, value: Any) -> str | None:
    """A PostgreSQL URL (the password is never repeated in an error)."""
    text = _optional_text(key, value)
    if text is not None and urlsplit(text).scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{key}: expected a postgresql:// URL")
    return text


def _node_name(key: str, value: Any) -> str | None:
    text = _optional_text(key, value)
    if text is not None and not _NODE_NAME.fullmatch(text):
        raise ConfigError(f"{key}: expected 1-64 letters, digits, '.', '_', ':' or '-'")
    return text


_CHECKS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "sip": {
        "host": _text,
        "udp_port": _port,
        "tcp_port": _optional_port,
        "advertise": _optional_text,
        "keepalive": _SECONDS,
        "allowed_networks": _networks,
        "max_connections": _CONNECTIONS,
        "max_connections_per_source": _CONNECTIONS,
        "idle_timeout": _SECONDS,
        "register_rate": _number(0, 100000, low_allowed=True),
    },
    "device": {
        "host": _text,
        "advertise": _optional_text,
        "tls_port": _optional_port,
        "tcp_port": _optional_port,
        "udp_port": _optional_port,
        "certificate": _optional_text,
        "private_key": _optional_text,
        "realm": _realm,
        "digest_algorithms": _digest_algorithms,
        "keepalive": _SECONDS,
        "grace": _number(0, 600),
        "max_failures": _count(1, 10000),
        "max_connections": _CONNECTIONS,
        "max_connections_per_source": _CONNECTIONS,
        "handshake_timeout": _number(0, 600),
        "idle_timeout": _SECONDS,
    },
    "dns": {"nameservers": _nameservers, "timeout": _SECONDS},
    "api": {
        "host": _text,
        "port": _port,
        "certificate": _optional_text,
        "private_key": _optional_text,
        "insecure_http": _flag,
        "admin_token": _optional_text,
        "max_body": _count(1024, 16 * 1024 * 1024),
        "create_rate": _number(0, 100000),
        "create_burst": _count(1, 100000),
    },
    "data": {"dir": _text},
    "lifecycle": {
        "min_lifetime_days": _lifetime_days,
        "max_lifetime_days": _lifetime_days,
        "day": _number(0, DAY),
        "sweep_interval": _SECONDS,
        "unregister_wait": _SECONDS,
        "startup_spread": _number(0, DAY, low_allowed=True),
        "unregister_on_shutdown": _flag,
    },
    "keys": {"hpke_grace_days": _number(0, 365), "dir": _optional_text},
    "store": {"url": _store_url},
    "cluster": {
        "node": _node_name,
        "lease": _number(1, 3600),
        "takeover_spread": _number(0, 3600, low_allowed=True),
    },
    "push": {
        "ring_timeout": _number(0, 600),
        "relay_uri": _optional_text,
        "max_message": _count(1, 1024 * 1024),
    },
    "apns": {
        "key_file": _file,
        "key_id": _optional_text,
        "team_id": _optional_text,
        "certificate": _file,
        "production_server": _server,
        "sandbox_server": _server,
        "ca_file": _file,
        "timeout": _SECONDS,
    },
    "fcm": {
        "service_account": _file,
        "send_url": _https_url,
        "token_uri": _https_url,
        "ca_file": _file,
        "timeout": _SECONDS,
        "call_ttl": _SECONDS,
    },
    "log": {"level": _level, "format": _log_format, "debug_instance": _instance_id},
}
_SECTIONS: dict[str, type] = {
    "sip": SipSection,
    "device": DeviceSection,
    "dns": DnsSection,
    "api": ApiSection,
    "data": DataSection,
    "lifecycle": LifecycleSection,
    "keys": KeysSection,
    "push": PushSection,
    "apns": ApnsSection,
    "fcm": FcmSection,
    "log": LogSection,
    "store": StoreSection,
    "cluster": ClusterSection,
}


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
    config = Config(**{k: v for k, v in sections.items() if k in known}, warnings=tuple(warnings))
    _check_together(config)
    return config


def _check_together(config: Config) -> None:
    life = config.lifecycle
    if life.min_lifetime_days > life.max_lifetime_days:
        raise ConfigError("lifecycle.min_lifetime_days: larger than lifecycle.max_lifetime_days")
    api = config.api
    if (api.certificate is None) != (api.private_key is None):
        raise ConfigError("api.certificate: give both api.certificate and api.private_key")
    device = config.device
    if (device.certificate is None) != (device.private_key is None):
        raise ConfigError("device.certificate: give both device.certificate and device.private_key")
    if device.tls_port is None and device.tcp_port is None and device.udp_port is None:
        raise ConfigError("device.tls_port: apps need at least one device port")
    apns = config.apns
    if apns.key_file is not None and apns.certificate is not None:
        raise ConfigError("apns.key_file: give a signing key or a certificate, not both")
    if apns.key_file is not None and (apns.key_id is None or apns.team_id is None):
        missing = "apns.key_id" if apns.key_id is None else "apns.team_id"
        raise ConfigError(f"{missing}: required with apns.key_file")


def with_allowed_networks(config: Config, networks: list[str]) -> Config:
    """``config`` whose registrars may also be in ``networks`` (checked like the key)."""
    extra = _networks("--allow-network", networks)
    sip = replace(config.sip, allowed_networks=(*config.sip.allowed_networks, *extra))
    return replace(config, sip=sip)


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
