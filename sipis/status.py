"""``sipis status``: a running node's numbers at a glance, as a table.

The numbers come from the node's ``GET /v1/stats`` (admin token), so the
command shows exactly what the API shows, from any machine that can reach
the API.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Mapping
from typing import Any

from sipis.config import Config


class StatusError(Exception):
    """The node could not be asked; the message says why."""


def stats_url(config: Config) -> str:
    host = config.api.host
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1"
    scheme = "http" if config.api.insecure_http else "https"
    return f"{scheme}://{host}:{config.api.port}/v1/stats"


def fetch(config: Config, url: str | None = None, *, timeout: float = 5.0) -> dict[str, Any]:
    """The node's stats; its certificate is checked against the configured one."""
    token = config.api.admin_token
    if token is None:
        raise StatusError("api.admin_token is not set: the node shows its stats to no one")
    context = None
    if not config.api.insecure_http:
        context = ssl.create_default_context()
        certificate = config.api.certificate or config.data_dir / "tls" / "dev-certificate.pem"
        try:
            context.load_verify_locations(cafile=str(certificate))
        except (OSError, ssl.SSLError) as exc:
            raise StatusError(f"cannot read the API certificate {certificate}: {exc}") from None
    request = urllib.request.Request(  # noqa: S310 - the URL is http(s) by construction
        url or stats_url(config), headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:  # noqa: S310
            data: dict[str, Any] = json.load(answer)
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read {request.full_url}: {exc}") from None
    return data


def render(stats: Mapping[str, Any]) -> str:
    """The stats as a two-column table."""
    rows = [
        ("node", f"sipis {stats.get('version', '?')}, up {_duration(stats.get('uptime'))}"),
        ("instances", _nested(stats.get("instances", {})) or "none"),
        ("bindings", _flat(stats.get("bindings", {})) or "none"),
        (
            "device port",
            f"{stats.get('devices', 0)} app(s) registered, "
            f"{stats.get('dialogs', 0)} call(s) relayed now",
        ),
        ("pushes", _nested(stats.get("pushes", {})) or "none yet"),
        ("calls", _flat(stats.get("calls", {})) or "none yet"),
        ("messages", _flat(stats.get("messages", {})) or "none yet"),
        ("erasures", _flat(stats.get("purges", {})) or "none"),
        ("purge log", _purge_log(stats.get("purge_log", {}))),
    ]
    cluster = stats.get("cluster")
    if isinstance(cluster, Mapping):
        nodes = cluster.get("nodes", [])
        held = f"node {cluster.get('node')}, {cluster.get('shards', 0):,} shard(s)"
        rows.insert(1, ("cluster", f"{held} of {len(nodes)} node(s): {', '.join(nodes)}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows) + "\n"


def _flat(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items()))


def _nested(groups: Mapping[str, Mapping[str, int]]) -> str:
    return "; ".join(f"{group}: {_flat(counts)}" for group, counts in sorted(groups.items()))


def _purge_log(log: Mapping[str, Any]) -> str:
    age = log.get("checkpoint_age")
    signed = "never signed yet" if age is None else f"last signed {_duration(age)} ago"
    return f"{log.get('entries', 0):,} entries, {signed}"


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
