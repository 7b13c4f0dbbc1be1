"""Registrar addresses: private, loopback, link-local and the relay's own are refused."""

from __future__ import annotations

import pytest

from sipis.transport.policy import TargetPolicy

POLICY = TargetPolicy.build(["10.20.0.0/16", "fd00:1::/32"], own=[("198.51.100.7", 5060)])


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.9.9.9", "a loopback address"),
        ("::1", "a loopback address"),
        ("[::1]", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("0.0.0.0", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("10.0.0.1", "a private or reserved address"),
        ("172.16.5.5", "a private or reserved address"),
        ("192.168.1.1", "a private or reserved address"),
        ("100.64.0.1", "a private or reserved address"),
        ("192.0.2.1", "a private or reserved address"),
        ("fc00::1", "a private or reserved address"),
    ],
)
def test_addresses_that_are_not_global_are_refused(host: str, reason: str) -> None:
    assert POLICY.refusal(host, 5060) == reason


@pytest.mark.parametrize("host", ["8.8.8.8", "2001:4860:4860::8888", "[2606:4700::1111]"])
def test_global_addresses_are_allowed(host: str) -> None:
    assert POLICY.refusal(host, 5060) is None


def test_allowed_networks_let_the_operator_reach_private_registrars() -> None:
    assert POLICY.refusal("10.20.3.4", 5060) is None
    assert POLICY.refusal("fd00:1::5", 5060) is None
    assert POLICY.refusal("10.21.0.1", 5060) == "a private or reserved address"


def test_the_relay_itself_is_refused_on_its_own_ports_only() -> None:
    assert POLICY.refusal("198.51.100.7", 5060) == "the relay's own address"
    assert POLICY.refusal("::ffff:198.51.100.7", 5060) == "the relay's own address"
    allowed_own = TargetPolicy.build(["127.0.0.0/8"], own=[("127.0.0.1", 5060)])
    assert allowed_own.refusal("127.0.0.1", 5060) == "the relay's own address"
    assert allowed_own.refusal("127.0.0.1", 5070) is None


def test_names_are_judged_by_their_addresses_not_here() -> None:
    assert POLICY.refusal("registrar.example.net", 5060) is None
    assert TargetPolicy().refusal("localhost", None) is None
