"""The deployment files agree with the code and with each other.

The sample configuration loads and names every key; the dashboard asks only
for metrics the relay exposes, through the provisioned datasource; Prometheus
scrapes /metrics with the admin token compose gives sipis; the image, the
compose file and the systemd unit use the configuration's ports and paths;
the development certificates verify for the loopback names.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import shlex
import shutil
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from sipis.config import _CHECKS, Config, DataSection, _file, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SAMPLE = DEPLOY / "sipis.toml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sipis.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "sipis.yaml"
MAKE_DEV_CERTS = ROOT / "certs" / "make-dev-certs.sh"

# The metrics the relay exposes at /metrics, as prometheus-client writes them.
COUNTERS = (
    "sipis_pushes",
    "sipis_calls",
    "sipis_messages",
    "sipis_register_transactions",
    "sipis_erasures",
)
HISTOGRAMS = ("sipis_invite_to_push_seconds", "sipis_register_rtt_seconds")
GAUGES = (
    "sipis_instances",
    "sipis_bindings",
    "sipis_devices_registered",
    "sipis_dialogs",
    "sipis_register_backlog_seconds",
    "sipis_purge_log_entries",
    "sipis_purge_log_checkpoint_age_seconds",
    "sipis_push_credential_expiry_timestamp_seconds",
)
KNOWN_METRICS = (
    {f"{name}_total" for name in COUNTERS}
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | set(GAUGES)
)
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])sipis_[A-Za-z0-9_:]*")

TOML_SECTION = re.compile(r"^\[(\w+)\]\s*$")
TOML_KEY = re.compile(r"^(#\s*)?(\w+)\s*=")
COMMENTED_KEY = re.compile(r"^#\s*(\w+\s*=.*)$")


def sample_keys(text: str) -> dict[str, dict[str, bool]]:
    """Section -> key -> True if the key is set, False if it is a commented-out line."""
    sections: dict[str, dict[str, bool]] = {}
    current: dict[str, bool] | None = None
    for line in text.splitlines():
        if header := TOML_SECTION.match(line):
            current = sections.setdefault(header[1], {})
        elif current is not None and (key := TOML_KEY.match(line)):
            current[key[2]] = current.get(key[2], False) or key[1] is None
    return sections


def sample_config() -> Config:
    return load_config(SAMPLE)


# -- the sample configuration --------------------------------------------------------


def test_sample_config_loads_with_defaults_and_the_data_directory() -> None:
    config = sample_config()
    assert config.warnings == ()
    assert config.data.dir == "/var/lib/sipis"
    assert dataclasses.replace(config, data=DataSection()) == Config()


def test_sample_config_names_every_key_of_every_section() -> None:
    found = sample_keys(SAMPLE.read_text())
    assert set(found) == set(_CHECKS)
    for section, checks in _CHECKS.items():
        assert set(found[section]) == set(checks), section


def test_sample_config_leaves_keys_naming_files_commented_out() -> None:
    found = sample_keys(SAMPLE.read_text())
    file_keys = {(s, k) for s, checks in _CHECKS.items() for k, c in checks.items() if c is _file}
    assert file_keys == {
        ("apns", "key_file"),
        ("apns", "certificate"),
        ("apns", "ca_file"),
        ("fcm", "service_account"),
        ("fcm", "ca_file"),
    }
    assert all(found[section][key] is False for section, key in file_keys)


def test_sample_config_commented_examples_load_once_their_files_exist(tmp_path: Path) -> None:
    """Every commented-out line is valid as written (certificate auth aside: it excludes
    the token key), with the files under /etc/sipis made in a scratch directory."""
    lines = []
    section = ""
    for line in SAMPLE.read_text().splitlines():
        if header := TOML_SECTION.match(line):
            section = header[1]
        commented = COMMENTED_KEY.match(line)
        if commented and not (section == "apns" and commented[1].startswith("certificate")):
            line = commented[1]
        lines.append(line)
    text = "\n".join(lines).replace('"/etc/sipis/', f'"{tmp_path}/etc/')
    for path in re.findall(rf'"({re.escape(str(tmp_path))}/etc/[^"]+)"', text):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("placeholder\n")
    uncommented = tmp_path / "sipis.toml"
    uncommented.write_text(text)

    config = load_config(uncommented)

    assert config.warnings == ()
    assert config.apns.key_file == f"{tmp_path}/etc/apns/AuthKey.p8"
    assert (config.apns.key_id, config.apns.team_id) == ("ABC123DEFG", "DEF123GHIJ")
    assert config.fcm.service_account == f"{tmp_path}/etc/fcm/service-account.json"
    assert config.api.certificate == config.device.certificate == f"{tmp_path}/etc/tls/server.pem"
    assert config.dns.nameservers == (("192.0.2.53", 53), ("192.0.2.54", 53))
    assert config.push.relay_uri == "sip:relay.example.net:5061;transport=tls"


# -- the dashboard ---------------------------------------------------------------------


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_panels_have_titles_and_ask_only_for_known_metrics() -> None:
    used: set[str] = set()
    for panel in dashboard_panels():
        assert panel["title"].strip(), panel["id"]
        for target in panel.get("targets", []):
            names = set(METRIC_NAME.findall(target["expr"]))
            assert names, target["expr"]
            assert names <= KNOWN_METRICS, target["expr"]
            used |= names
    assert used >= {
        "sipis_bindings",
        "sipis_instances",
        "sipis_pushes_total",
        "sipis_invite_to_push_seconds_bucket",
        "sipis_register_rtt_seconds_bucket",
        "sipis_register_transactions_total",
        "sipis_calls_total",
        "sipis_messages_total",
        "sipis_erasures_total",
        "sipis_devices_registered",
        "sipis_dialogs",
        "sipis_purge_log_checkpoint_age_seconds",
        "sipis_push_credential_expiry_timestamp_seconds",
    }


def test_dashboard_histograms_are_quantiles_over_buckets_by_le() -> None:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    bucket_exprs = [e for e in exprs if "_bucket" in e]
    assert {e.split("(")[1].split(",")[0] for e in bucket_exprs} == {"0.5", "0.99"}
    for expr in bucket_exprs:
        assert expr.startswith("histogram_quantile(") and "by (le)" in expr, expr


def test_dashboard_uses_the_provisioned_datasource() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [(d["type"], d["url"]) for d in datasources] == [
        ("prometheus", "http://prometheus:9090")
    ]
    uid = datasources[0]["uid"]
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid


# -- Prometheus and compose ------------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def interpolate(text: str, environment: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error} over ``environment``."""

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match[1], match[2], match[3]
        if environment.get(name):
            return environment[name]
        if operator == "-":
            return argument
        raise KeyError(f"{name}: {argument}")

    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", value, text)


def test_compose_runs_sipis_postgres_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert set(services) == {"sipis", "postgres", "prometheus", "grafana"}
    build = services["sipis"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Containerfile"
    assert services["postgres"]["image"].startswith("postgres:16")
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume


def test_compose_gives_sipis_and_prometheus_the_same_admin_token(tmp_path: Path) -> None:
    document = compose()
    environment = {"SIPIS_ADMIN_TOKEN": "Zm9yLXRoZS10ZXN0LW9ubHk"}
    config_file = tmp_path / "sipis.toml"
    config_file.write_text(interpolate(document["configs"]["sipis-config"]["content"], environment))
    config = load_config(config_file)
    assert config.warnings == ()
    assert config.api.admin_token == environment["SIPIS_ADMIN_TOKEN"]
    assert config.data.dir == sample_config().data.dir
    assert (config.sip.advertise, config.device.advertise) == (None, "localhost")
    assert config.store.url == "postgresql://sipis@postgres:5432/sipis"
    sipis = document["services"]["sipis"]
    assert sipis["depends_on"]["postgres"]["condition"] == "service_healthy"
    postgres = document["services"]["postgres"]["environment"]
    assert sipis["environment"]["PGPASSWORD"] == postgres["POSTGRES_PASSWORD"]
    token = interpolate(document["configs"]["prometheus-token"]["content"], environment)
    assert token == environment["SIPIS_ADMIN_TOKEN"]
    with pytest.raises(KeyError, match="SIPIS_ADMIN_TOKEN"):
        interpolate(document["configs"]["sipis-config"]["content"], {})

    mounted = {c["source"]: c["target"] for c in document["services"]["prometheus"]["configs"]}
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert (job["scheme"], job["metrics_path"]) == ("https", "/metrics")
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": mounted["prometheus-token"],
    }
    assert job["tls_config"] == {"insecure_skip_verify": True}
    assert job["static_configs"] == [{"targets": [f"sipis:{config.api.port}"]}]


def test_grafana_loads_the_dashboard_from_where_compose_mounts_it() -> None:
    volumes = compose()["services"]["grafana"]["volumes"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in volumes}
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# -- the image ---------------------------------------------------------------------------


def sample_ports() -> set[str]:
    config = sample_config()
    sip, device = config.sip, config.device
    return {
        f"{sip.udp_port}/udp",
        f"{sip.tcp_port}/tcp",
        f"{device.tls_port}/tcp",
        f"{device.tcp_port}/tcp",
        f"{device.udp_port}/udp",
        f"{config.api.port}/tcp",
    }


def containerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, one entry per occurrence, continuations joined."""
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.setdefault(word, []).append(rest.strip())
    return instructions


def test_image_exposes_the_configured_ports_and_runs_the_sample_config() -> None:
    image = containerfile()
    assert set(" ".join(image["EXPOSE"]).split()) == sample_ports()
    assert json.loads(image["ENTRYPOINT"][0]) == ["sipis"]
    assert json.loads(image["CMD"][0]) == ["serve", "--config", "/etc/sipis/sipis.toml"]
    assert "deploy/sipis.toml /etc/sipis/sipis.toml" in image["COPY"]
    assert json.loads(image["VOLUME"][0]) == [sample_config().data.dir]
    assert image["USER"] == ["${SIPIS_UID}:${SIPIS_UID}"]
    assert "SIPIS_UID=10001" in image["ARG"]
    published = {p.split(":")[-1] for p in compose()["services"]["sipis"]["ports"]}
    assert published == sample_ports()
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", ".pytest_cache", ".mypy_cache"} <= ignored


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_image_healthcheck_asks_the_api_over_unverified_tls(
    tmp_path: Path, status: int, healthy: bool
) -> None:
    certificate = trustme.CA().issue_cert("127.0.0.1")
    certificate.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem")
    handler = type("Health", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        (healthcheck,) = containerfile()["HEALTHCHECK"]
        command = json.loads(healthcheck.split(" CMD ", 1)[1])
        assert command[:2] == ["python", "-c"]
        api_port = sample_config().api.port
        code = command[2].replace(f":{api_port}/", f":{server.server_address[1]}/")
        assert code != command[2]
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=30, check=False
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert (result.returncode == 0) is healthy, result.stderr


# -- development certificates ------------------------------------------------------------


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> None:
    """A TLS handshake between the two contexts through memory, the client asking for ``host``."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(to_client, to_server, server_hostname=host)
    server_end = server.wrap_bio(to_server, to_client, server_side=True)
    pending = [client_end, server_end]
    for _ in range(10):
        for end in list(pending):
            try:
                end.do_handshake()
                pending.remove(end)
            except ssl.SSLWantReadError:
                pass
        if not pending:
            return
    raise AssertionError("the handshake did not finish")


def make_dev_certs(*args: str, environment: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(MAKE_DEV_CERTS), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(environment or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dev_certificate_verifies_against_the_dev_ca(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    printed = make_dev_certs("--out", str(out), "relay.test", "192.0.2.10")

    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600, key
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(out / "server.pem", out / "server.key")
    client = ssl.create_default_context(cafile=out / "ca.pem")
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    for host in ("127.0.0.1", "::1", "localhost", "relay.test", "192.0.2.10"):
        handshake(server, client, host)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, client, "other.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, ssl.create_default_context(), "127.0.0.1")
    told = "\n".join(line.strip() for line in printed.splitlines())
    for section in ("api", "device"):
        assert (
            f'[{section}]\ncertificate = "{out}/server.pem"\nprivate_key = "{out}/server.key"\n'
            in told
        )


def test_dev_certs_keep_the_ca_and_reissue_the_server_certificate(tmp_path: Path) -> None:
    environment = {"SIPIS_CERT_DIR": str(tmp_path / "dev")}
    make_dev_certs(environment=environment)
    ca = (tmp_path / "dev" / "ca.pem").read_bytes()
    first = (tmp_path / "dev" / "server.pem").read_bytes()

    make_dev_certs("relay.test", environment=environment)

    assert (tmp_path / "dev" / "ca.pem").read_bytes() == ca
    assert (tmp_path / "dev" / "server.pem").read_bytes() != first
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "dev" / "server.pem", tmp_path / "dev" / "server.key")
    handshake(server, ssl.create_default_context(cadata=ca.decode()), "relay.test")


def test_dev_certs_refuse_a_name_that_would_add_entries(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(MAKE_DEV_CERTS), "--out", str(tmp_path / "dev"), "a.test,IP:203.0.113.1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "not a host name or IP address" in result.stderr
    assert not (tmp_path / "dev").exists()


# -- the systemd unit ----------------------------------------------------------------------

UNIT = DEPLOY / "sipis.service"


def unit_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert key not in settings, f"{key} set twice"
            settings[key] = value
    return settings


def test_systemd_unit_runs_sipis_hardened() -> None:
    settings = unit_settings()
    config = sample_config()
    assert {key: settings.get(key) for key in HARDENING} == HARDENING
    assert settings["User"] == settings["Group"] == "sipis"
    assert shlex.split(settings["ExecStart"])[1:] == [
        "serve",
        "--config",
        "/etc/sipis/sipis.toml",
    ]
    assert settings["ReadWritePaths"] == config.data.dir == "/var/lib/" + settings["StateDirectory"]
    # No capability: every port sipis binds is above the privileged range.
    assert settings["CapabilityBoundingSet"] == ""
    assert min(int(p.split("/")[0]) for p in sample_ports()) >= 1024
    # Shutdown may wait for un-REGISTERs and an erasure, each up to unregister_wait.
    assert int(settings["TimeoutStopSec"]) >= 2 * config.lifecycle.unregister_wait + 30
    assert int(settings["LimitNOFILE"]) >= 65536


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "StateDirectory": "sipis",
    "UMask": "0077",
    "Restart": "on-failure",
}


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` reports bad settings on stderr and refuses an ExecStart
    that does not exist, so the copy checked runs this environment's sipis instead of
    /opt/sipis/bin/sipis; every other line is the unit's own."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit's syntax is not verified")
    sipis = Path(sys.executable).with_name("sipis")
    assert sipis.is_file()
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/sipis/bin/sipis ") == 1
    copy = tmp_path / "sipis.service"
    copy.write_text(text.replace("ExecStart=/opt/sipis/bin/sipis ", f"ExecStart={sipis} "))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")
