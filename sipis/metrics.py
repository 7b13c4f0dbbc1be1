"""The relay's Prometheus metrics, in a registry of its own (one per running relay)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every metric sipis keeps; labels never carry a user identity, token or address."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pushes = Counter(
            "sipis_pushes",
            "Push attempts by provider, kind and outcome",
            ["provider", "kind", "outcome"],
            registry=self.registry,
        )
        self.push_credential_expiry = Gauge(
            "sipis_push_credential_expiry_timestamp_seconds",
            "When the push credentials of a provider stop working (epoch seconds)",
            ["provider"],
            registry=self.registry,
        )
        self.invite_to_push = Histogram(
            "sipis_invite_to_push_seconds",
            "From an INVITE's arrival to its call push handed to the provider",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.calls = Counter(
            "sipis_calls",
            "Incoming calls by how they ended",
            ["outcome"],
            registry=self.registry,
        )
        self.messages = Counter(
            "sipis_messages",
            "Incoming MESSAGE requests by what became of them",
            ["outcome"],
            registry=self.registry,
        )

    def watch_relay(self, *, devices: Callable[[], int], dialogs: Callable[[], int]) -> None:
        """Gauges read when scraped: apps registered on the device port, dialogs relayed."""
        Gauge(
            "sipis_devices_registered",
            "Apps registered on the device port",
            registry=self.registry,
        ).set_function(devices)
        Gauge(
            "sipis_dialogs",
            "Calls answered by an app and relayed",
            registry=self.registry,
        ).set_function(dialogs)
