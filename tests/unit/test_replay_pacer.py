"""Unit tests of the replay pacer, the JSON-lines reader and event keying."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from relata.runtime.replay import TokenBucket, event_key, iter_jsonl


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("rate", [1.0, 50.0, 500.0, 5000.0])
def test_token_bucket_holds_the_offered_rate(rate: float) -> None:
    fake = FakeClock()
    bucket = TokenBucket(rate, clock=fake.clock, sleep=fake.sleep)
    n = int(rate * 10)
    for _ in range(n):
        bucket.acquire()
    # n acquisitions take (n - burst) / rate seconds: the initial burst is free.
    assert fake.now == pytest.approx((n - bucket.burst) / rate, abs=bucket.min_sleep_s)


def test_token_bucket_burst_caps_catch_up_after_idle() -> None:
    fake = FakeClock()
    bucket = TokenBucket(100.0, burst=5, clock=fake.clock, sleep=fake.sleep)
    for _ in range(5):
        bucket.acquire()
    assert fake.now == 0.0
    fake.now += 10.0  # idle for 10 s: only 5 tokens may accumulate, not 1000
    for _ in range(5):
        bucket.acquire()
    assert fake.now == 10.0
    bucket.acquire()
    assert fake.now == pytest.approx(10.01)


def test_token_bucket_zero_rate_never_sleeps() -> None:
    fake = FakeClock()
    bucket = TokenBucket(0, clock=fake.clock, sleep=fake.sleep)
    for _ in range(10_000):
        bucket.acquire()
    assert fake.slept == []


def test_token_bucket_rejects_negative_rate() -> None:
    with pytest.raises(ValueError, match="rate must be >= 0"):
        TokenBucket(-1)


def test_iter_jsonl_reads_gzip_and_plain_and_skips_blank_lines(tmp_path: Path) -> None:
    content = b'{"a": 1}\n\n  \nnot json\r\n{"b": 2}'
    plain = tmp_path / "x.jsonl"
    plain.write_bytes(content)
    packed = tmp_path / "x.jsonl.gz"
    packed.write_bytes(gzip.compress(content))
    expected = [(1, b'{"a": 1}'), (4, b"not json"), (5, b'{"b": 2}')]
    assert list(iter_jsonl(plain)) == expected
    assert list(iter_jsonl(packed)) == expected


def test_event_key_reads_user_and_event_id() -> None:
    assert event_key(b'{"user_id": "u1", "event_id": "e1"}') == (b"u1", "e1")
    assert event_key(b'{"user_id": 17850}') == (b"17850", None)
    assert event_key(b"{broken") == (None, None)
    assert event_key(b"[1, 2]") == (None, None)
