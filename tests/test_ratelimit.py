"""The token bucket that paces API-server requests and continued traces (probe.ratelimit)."""

from __future__ import annotations

import pytest

from probe.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_take_spends_the_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.4  # 0.8 of a token
    assert not bucket.take()
    clock.now += 0.1  # one whole token
    assert bucket.take() and not bucket.take()
    clock.now += 60  # refills up to the burst, no further
    assert sum(bucket.take() for _ in range(10)) == 3


def test_delay_borrows_from_the_future_like_client_go() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=5.0, burst=2, clock=clock)
    assert [bucket.delay() for _ in range(2)] == [0.0, 0.0]
    assert bucket.delay() == pytest.approx(0.2)
    assert bucket.delay() == pytest.approx(0.4)  # queued behind the one before
    assert not bucket.take()  # a debt leaves nothing to take
    clock.now += 0.4
    assert bucket.delay() == pytest.approx(0.2)


def test_a_burst_below_one_still_lets_one_through() -> None:
    bucket = TokenBucket(rate=1.0, burst=0, clock=Clock())
    assert bucket.take() and not bucket.take()
