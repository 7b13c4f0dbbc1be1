"""`sipis check-config`, the status table and progress lines."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sipis.cli import main
from sipis.progress import Progress
from sipis.status import render


def test_check_config_accepts_a_good_file_and_warns_of_unknown_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sipis.toml"
    path.write_text('[device]\nrealm = "example"\ngrace = 5\n[sip]\nudp_prot = 5070\n')
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"configuration OK: {path}"
    assert "unknown key sip.udp_prot ignored" in err


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[device]\ntls_port = 70000\n", "device.tls_port"),
        ('[device]\nrealm = "has \\"quotes\\""\n', "device.realm"),
        ('[device]\ndigest_algorithms = ["SHA-1"]\n', "device.digest_algorithms"),
        ("[lifecycle]\nunregister_on_shutdown = 1\n", "lifecycle.unregister_on_shutdown"),
        ('[device]\ncertificate = "a.pem"\n', "device.certificate"),
        ("[device]\ntls_port = false\ntcp_port = false\nudp_port = false\n", "device.tls_port"),
        ("[sip\n", "not valid TOML"),
    ],
)
def test_check_config_names_the_broken_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    path = tmp_path / "sipis.toml"
    path.write_text(text)
    assert main(["check-config", "--config", str(path)]) == 2
    assert key in capsys.readouterr().err


def test_status_without_an_admin_token_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sipis.toml"
    path.write_text(f'[data]\ndir = "{tmp_path}"\n')
    assert main(["status", "--config", str(path)]) == 1
    assert "api.admin_token is not set" in capsys.readouterr().err


def test_the_status_table() -> None:
    stats = {
        "version": "0.1.0",
        "uptime": 7384.2,
        "instances": {"ios": {"active": 3, "paused": 1}, "android": {"active": 2}},
        "bindings": {"registered": 5, "failed": 1},
        "devices": 1,
        "dialogs": 0,
        "pushes": {"apns": {"delivered": 1200, "retry_after": 2}},
        "calls": {"relayed": 4, "missed": 1},
        "messages": {},
        "purges": {"expired": 7},
        "purge_log": {"entries": 7, "checkpoint_age": 65.0},
    }
    assert render(stats).splitlines() == [
        "node         sipis 0.1.0, up 2h 03m",
        "instances    android: active 2; ios: active 3, paused 1",
        "bindings     failed 1, registered 5",
        "device port  1 app(s) registered, 0 call(s) relayed now",
        "pushes       apns: delivered 1,200, retry_after 2",
        "calls        missed 1, relayed 4",
        "messages     none yet",
        "erasures     expired 7",
        "purge log    7 entries, last signed 1m 05s ago",
    ]


def test_the_status_table_of_a_cluster_node() -> None:
    stats = {
        "version": "0.1.0",
        "uptime": 5.0,
        "cluster": {"node": "n2", "shards": 1366, "nodes": ["n1", "n2", "n3"]},
    }
    assert render(stats).splitlines()[:2] == [
        "node         sipis 0.1.0, up 5s",
        "cluster      node n2, 1,366 shard(s) of 3 node(s): n1, n2, n3",
    ]


def test_progress_writes_a_line_at_most_every_interval_and_always_the_last() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress("keys", 5, stream=stream, every=1.0, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 0.4
        progress.step()
    assert stream.getvalue().splitlines() == ["keys: 3 of 5"]  # at 1.2 s
    progress.step()
    progress.finish()
    assert stream.getvalue().splitlines() == ["keys: 3 of 5", "keys: 5 of 5"]
    assert list(Progress("items", stream=io.StringIO()).over("abc")) == ["a", "b", "c"]
