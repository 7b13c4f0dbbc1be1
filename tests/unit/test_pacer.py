"""The REGISTER pacer: slots one interval apart, reserved in order, no saved-up burst."""

from __future__ import annotations

import pytest

from sipis.pacer import Pacer


def test_requests_at_one_moment_get_slots_one_interval_apart() -> None:
    pacer = Pacer(rate=4.0)
    assert [pacer.slot(10.0) for _ in range(5)] == [10.0, 10.25, 10.5, 10.75, 11.0]


def test_a_request_after_the_backlog_is_served_goes_at_once() -> None:
    pacer = Pacer(rate=2.0)
    assert pacer.slot(0.0) == 0.0
    assert pacer.slot(0.1) == 0.5
    assert pacer.slot(3.0) == 3.0


def test_idle_time_builds_up_no_burst() -> None:
    pacer = Pacer(rate=10.0)
    pacer.slot(0.0)
    slots = [pacer.slot(100.0) for _ in range(3)]
    assert slots == pytest.approx([100.0, 100.1, 100.2])


def test_any_window_holds_at_most_rate_times_width_plus_one() -> None:
    pacer = Pacer(rate=50.0)
    slots = [pacer.slot(now / 7) for now in range(700) for _ in range(3)]
    for start in slots:
        assert sum(start <= s < start + 1.0 for s in slots) <= 51


def test_no_limit_sends_at_once() -> None:
    pacer = Pacer(rate=0.0)
    assert [pacer.slot(5.0) for _ in range(3)] == [5.0, 5.0, 5.0]
    assert pacer.span(100_000) == 0.0


def test_span_is_the_time_count_registers_take() -> None:
    assert Pacer(rate=500.0).span(100_000) == pytest.approx(200.0)


def test_a_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Pacer(rate=-1.0)


def test_backlog_is_the_time_until_the_last_reserved_slot_has_passed() -> None:
    pacer = Pacer(rate=10.0)
    assert pacer.backlog(0.0) == 0.0
    for _ in range(20):
        pacer.slot(0.0)
    assert pacer.backlog(0.0) == pytest.approx(2.0)
    assert pacer.backlog(1.5) == pytest.approx(0.5)
    assert pacer.backlog(5.0) == 0.0
