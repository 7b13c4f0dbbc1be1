"""The relay's Prometheus metrics, in a registry of its own (one per running relay)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


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
        self.register_transactions = Counter(
            "sipis_register_transactions",
            "REGISTER transactions by outcome and final status",
            ["outcome", "status"],
            registry=self.registry,
        )
        self.register_rtt = Histogram(
            "sipis_register_rtt_seconds",
            "From a REGISTER sent to its final response",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 32.0),
            registry=self.registry,
        )

        self.cluster_shards = Gauge(
            "sipis_cluster_shards",
            "Shards whose lease this node holds",
            registry=self.registry,
        )
        self.cluster_nodes = Gauge(
            "sipis_cluster_nodes",
            "Live nodes of the cluster, as this node last saw them",
            registry=self.registry,
        )
        self.shard_moves = Counter(
            "sipis_cluster_shard_moves",
            "Shards this node claimed, released (hand-over) or lost (lease gone)",
            ["direction"],
            registry=self.registry,
        )
        self.fenced_writes = Counter(
            "sipis_cluster_fenced_writes",
            "Writes refused because the lease they were made under had moved on",
            registry=self.registry,
        )

    def register_exchange(self, status: int | None, seconds: float) -> None:
        """A REGISTER transaction ended: with ``status``, or unanswered (None)."""
        if status is None:
            outcome = "timeout"
        elif 200 <= status < 300:
            outcome = "success"
        elif status in (401, 407):
            outcome = "challenge"
        else:
            outcome = "failure"
        self.register_transactions.labels(outcome, "none" if status is None else str(status)).inc()
        if status is not None:
            self.register_rtt.observe(seconds)

    def watch(self, take: Callable[[], Snapshot]) -> None:
        """Add the gauges (and erasure counts) read from the running relay when scraped."""
        self.registry.register(_SnapshotCollector(take))

    def totals(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        """The current values of a counter, summed over the labels not named."""
        out: dict[tuple[str, ...], float] = {}
        for family in self.registry.collect():
            if family.name != name:
                continue
            for sample in family.samples:
                if sample.name != f"{name}_total":
                    continue
                key = tuple(sample.labels[label] for label in labels)
                out[key] = out.get(key, 0.0) + sample.value
        return out


@dataclass(frozen=True)
class Snapshot:
    """What the relay holds now, as the scrape-time metrics show it."""

    instances: Mapping[tuple[str, str], int]  # (platform, active|paused)
    bindings: Mapping[str, int]  # by state
    devices: int
    dialogs: int
    erasures: Mapping[str, int]  # by reason, since the node started
    purge_log_entries: int
    checkpoint_age: float | None  # seconds since the last signed checkpoint
    register_backlog: float  # seconds until the REGISTERs waiting for the rate have left


class _SnapshotCollector(Collector):
    def __init__(self, take: Callable[[], Snapshot]) -> None:
        self._take = take

    def collect(self) -> Iterator[Metric]:
        snapshot = self._take()
        instances = GaugeMetricFamily(
            "sipis_instances", "Instances by platform and state", labels=["platform", "state"]
        )
        for (platform, state), count in sorted(snapshot.instances.items()):
            instances.add_metric([platform, state], count)
        yield instances
        bindings = GaugeMetricFamily("sipis_bindings", "Bindings by state", labels=["state"])
        for state, count in sorted(snapshot.bindings.items()):
            bindings.add_metric([state], count)
        yield bindings
        yield GaugeMetricFamily(
            "sipis_devices_registered", "Apps registered on the device port", value=snapshot.devices
        )
        yield GaugeMetricFamily(
            "sipis_dialogs", "Calls answered by an app and relayed now", value=snapshot.dialogs
        )
        erasures = CounterMetricFamily("sipis_erasures", "Erasures by reason", labels=["reason"])
        for reason, count in sorted(snapshot.erasures.items()):
            erasures.add_metric([reason], count)
        yield erasures
        yield GaugeMetricFamily(
            "sipis_purge_log_entries",
            "Entries in the purge log",
            value=snapshot.purge_log_entries,
        )
        yield GaugeMetricFamily(
            "sipis_register_backlog_seconds",
            "Seconds until the REGISTERs waiting for sip.register_rate have all been sent",
            value=snapshot.register_backlog,
        )
        if snapshot.checkpoint_age is not None:
            yield GaugeMetricFamily(
                "sipis_purge_log_checkpoint_age_seconds",
                "Seconds since the purge log's last signed checkpoint",
                value=snapshot.checkpoint_age,
            )
