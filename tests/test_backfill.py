"""The Backfiller against the loopback fake Kalshi REST: paging, retries, failures, merging, order and holds."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from tests.fake_kalshi_rest import FakeKalshiRest, Fault, rest_trade
from valshi_x import backfill as backfill_module
from valshi_x.backfill import Backfiller, trade_time_ms
from valshi_x.kalshi.rest import KalshiRest
from valshi_x.pipeline import Pipeline
from valshi_x.trades import trade_from_fields
from valshi_x.whales import Alert, WhaleDetector

UNIT = 0.05  # seconds of real time; every real wait in these tests is a multiple of it
NOW_MS = 1_900_000_000_000  # the tests' wall clock: trade times are laid out around it
THRESHOLD = Decimal(100_000)


class Recorder:
    """A `feed` that records each batch and counts the whales a real pipeline finds in it."""

    def __init__(self, sweep_window_ms: int = 1000) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.detector = WhaleDetector(THRESHOLD, sweep_window_ms)
        self.pipeline = Pipeline(self.detector)
        self.alerts: list[Alert] = []
        self.holds: dict[int, int] = {}  # hold token -> from_ms, as taken and not yet released
        self.released: list[int] = []

    def hold(self, from_ms: int) -> int:
        token = self.detector.hold(from_ms)
        self.holds[token] = from_ms
        return token

    def release(self, token: int) -> None:
        self.released.append(token)
        self.holds.pop(token, None)
        self.detector.release(token)

    async def __call__(self, trades: list[dict[str, Any]]) -> int:
        self.batches.append(trades)
        found: list[Alert] = []
        for fields in trades:
            found.extend(self.pipeline.on_rest_trade(fields))
        self.alerts.extend(found)
        return len(found)

    @property
    def trades(self) -> list[dict[str, Any]]:
        return [t for batch in self.batches for t in batch]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    # A fresh logger bound inside capture_logs, whatever logging set-up earlier tests left cached.
    with capture_logs() as captured:
        monkeypatch.setattr(backfill_module, "log", structlog.get_logger("test_backfill"))
        yield captured


def make_rest(session: aiohttp.ClientSession, fake: FakeKalshiRest, **kwargs: Any) -> KalshiRest:
    options: dict[str, Any] = {
        "max_requests_per_s": 1000.0,
        "timeout_s": 10 * UNIT,
        "backoff_initial_s": UNIT / 5,
        "backoff_max_s": UNIT,
        "max_attempts": 3,
        **kwargs,
    }
    return KalshiRest(session, fake.base_url, **options)


def make_backfiller(rest: KalshiRest, feed: Recorder, **kwargs: Any) -> Backfiller:
    options: dict[str, Any] = {
        "feed": feed,
        "hold": feed.hold,
        "release": feed.release,
        "clock_ms": lambda: NOW_MS,
        "margin_ms": 0,
        "slice_s": 60,
        "retry_delays_s": (UNIT / 5, UNIT / 5),
        "settle_ms": 0,
        **kwargs,
    }
    return Backfiller(rest, **options)


def small_trades(start_ms: int, n: int, step_ms: int, prefix: str = "t") -> list[dict[str, Any]]:
    return [
        rest_trade(f"{prefix}{i:06d}", f"KXSMALL-{i % 7}", ts_ms=start_ms + i * step_ms, count="3.00") for i in range(n)
    ]


async def run_until_idle(backfiller: Backfiller, timeout_s: float = 40 * UNIT) -> None:
    task = asyncio.create_task(backfiller.run())
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.sleep(0)
            await backfiller.wait_idle()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def assert_ascending(trades: list[dict[str, Any]]) -> None:
    keys = [(trade_time_ms(t), t["trade_id"]) for t in trades]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


async def test_pages_over_several_cursors_and_feeds_each_trade_once_in_time_order(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    tape = small_trades(NOW_MS - 150_000, 1500, 97)  # 145 s of trades: three 60 s slices
    random.Random(4).shuffle(tape)
    fake.add_trades(tape)
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed, page_limit=100)
    backfiller.request(NOW_MS - 150_000, NOW_MS, "seq_gap")
    await run_until_idle(backfiller)

    assert {t["trade_id"] for t in feed.trades} == {t["trade_id"] for t in tape}
    assert len(feed.trades) == len(tape)
    assert_ascending(feed.trades)
    assert len(feed.batches) == 3  # one batch per slice, each sorted oldest first
    cursors = [r for r in fake.requests if r.query.get("cursor")]
    assert len(cursors) >= 12 and backfiller.counts.pages >= 15
    slices = sorted({(int(r.query["min_ts"]), int(r.query["max_ts"])) for r in fake.requests})
    assert slices[0][0] == (NOW_MS - 150_000) // 1000 and slices[-1][1] == NOW_MS // 1000
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(slices))  # contiguous, no second left out
    done = events(logs, "backfill_done")
    assert len(done) == 1 and done[0]["trades"] == 1500 and done[0]["whales"] == 0
    assert backfiller.counts.windows == 1 and backfiller.counts.trades == 1500 and backfiller.pending == 0


async def test_429_and_503_before_success_lose_nothing(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    tape = small_trades(NOW_MS - 30_000, 300, 90)
    fake.add_trades(tape)
    # The client's own retries absorb two faults in a row; three exhaust them, and the backfill tries the slice
    # again (twice here); a dropped connection on the third try is retried by the client.
    fake.script("trades", 429, 503, 503, 429, 503, 503, Fault(drop=True))
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed, page_limit=120)
    backfiller.request(NOW_MS - 30_000, NOW_MS, "reconnect")
    await run_until_idle(backfiller)

    assert sorted(t["trade_id"] for t in feed.trades) == sorted(t["trade_id"] for t in tape)
    assert_ascending(feed.trades)
    retries = events(logs, "backfill_retry")
    assert len(retries) == 2 and retries[0]["error"] in {"rate_limited", "server_error", "connection_error"}
    assert events(logs, "backfill_incomplete") == []
    assert backfiller.counts.failures == 0 and backfiller.counts.windows == 1


async def test_slow_answer_within_timeout_is_waited_for(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    tape = small_trades(NOW_MS - 10_000, 50, 100)
    fake.add_trades(tape)
    fake.script("trades", Fault(delay_s=4 * UNIT))
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed)
    backfiller.request(NOW_MS - 10_000, NOW_MS, "seq_gap")
    await run_until_idle(backfiller)
    assert len(feed.trades) == 50
    assert events(logs, "backfill_done")[0]["seconds"] >= 4 * UNIT
    assert fake.counts["trades"] == 1  # answered once, not retried


async def test_permanent_failure_logs_the_uncovered_window_releases_the_hold_and_goes_on(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    fake.add_trades(small_trades(NOW_MS - 200_000, 100, 2000))
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed)
    fake.script("trades", *([503] * 9))  # three tries of three attempts each: all fail
    backfiller.request(NOW_MS - 100_000, NOW_MS - 50_000, "seq_gap")
    backfiller.request(NOW_MS - 200_000, NOW_MS - 190_000, "startup")  # older: fetched first
    task = asyncio.create_task(backfiller.run())
    async with asyncio.timeout(40 * UNIT):
        await asyncio.sleep(0)
        await backfiller.wait_idle()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    failed = events(logs, "backfill_incomplete")
    assert len(failed) == 1
    assert failed[0]["reasons"] == ["startup"]
    assert failed[0]["uncovered_from"] == "2030-03-17T17:43:20.000Z"  # NOW_MS - 200 s
    assert failed[0]["uncovered_to"] == "2030-03-17T17:43:30.000Z"
    assert failed[0]["uncovered_s"] == 10.0 and failed[0]["error"] == "server_error"
    assert backfiller.counts.failures == 1 and backfiller.counts.uncovered_s == 10.0
    # The later window still ran, and every hold is gone: groups can close again.
    assert events(logs, "backfill_done")[0]["reasons"] == ["seq_gap"]
    assert backfiller.counts.windows == 1 and len(feed.trades) == 26
    assert feed.holds == {} and sorted(feed.released) == [1, 2]


async def test_overlapping_and_adjacent_requests_merge_and_windows_go_oldest_first(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    fake.add_trades(small_trades(NOW_MS - 600_000, 600, 1000))
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed)
    backfiller.request(NOW_MS - 100_000, NOW_MS - 90_000, "seq_gap")
    backfiller.request(NOW_MS - 95_000, NOW_MS - 80_000, "seq_gap")  # overlaps the first
    backfiller.request(NOW_MS - 79_999, NOW_MS - 70_000, "reconnect")  # adjacent to it
    backfiller.request(NOW_MS - 500_000, NOW_MS - 499_000, "startup")  # apart, and older
    backfiller.request(NOW_MS - 20_000, None, "seq_gap")
    backfiller.request(NOW_MS - 10_000, None, "frames_dropped")  # open-ended: inside the one before
    assert backfiller.pending == 3
    assert len(events(logs, "backfill_requested")) == 3
    await run_until_idle(backfiller)

    done = events(logs, "backfill_done")
    assert [d["reasons"] for d in done] == [["startup"], ["seq_gap", "reconnect"], ["seq_gap", "frames_dropped"]]
    assert [d["from_time"] for d in done] == sorted(d["from_time"] for d in done)
    assert done[1]["trades"] == 31  # 100 s .. 70 s before now, both ends included
    assert done[2]["to_time"] == "2030-03-17T17:46:40.000Z"  # "now" when it was fetched
    # One hold per window: a request inside a window already held from earlier needs none of its own.
    assert sorted(feed.released) == [1, 2, 3] and feed.holds == {}
    assert_ascending(feed.trades)


async def test_a_hold_keeps_a_split_sweep_open_until_the_backfill_brings_its_middle(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    """Two fills arrive live, two only on REST (lost in a gap), then live trading goes on: one alert, full value."""
    t0 = NOW_MS - 20_000
    sweep = [
        rest_trade(f"s{i}", "KXBIG-1", ts_ms=t0 + 100 * i, count="70000.00", yes_price="0.4000") for i in range(4)
    ]  # 4 x $28k = $112k
    fake.add_trades(sweep)
    feed = Recorder(sweep_window_ms=1000)
    fake.delay_s["trades"] = 4 * UNIT  # the backfill is slow: live trades go on meanwhile
    backfiller = make_backfiller(make_rest(session, fake), feed)
    live = feed.pipeline
    assert live.on_rest_trade(sweep[0]) == []
    assert live.on_rest_trade(sweep[3]) == []
    backfiller.request(t0, None, "seq_gap")  # the gap was noticed: hold from the last trade seen
    task = asyncio.create_task(backfiller.run())
    try:
        await asyncio.sleep(UNIT)
        later = rest_trade("x1", "KXOTHER", ts_ms=t0 + 5_000, count="1.00")
        assert live.on_rest_trade(later) == []  # would close the sweep, but the hold keeps it open
        assert live.detector.close_due(t0 + 60_000) == []
        assert live.detector.open_groups == 2
        async with asyncio.timeout(40 * UNIT):
            await backfiller.wait_idle()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    alerts = feed.alerts + live.detector.close_due(t0 + 60_000)
    assert len(alerts) == 1
    assert alerts[0].trade_ids == ("s0", "s1", "s2", "s3")
    assert alerts[0].value_usd == Decimal("112000.0000")
    assert live.detector.duplicates == 2  # s0 and s3 came again from REST and counted once


async def test_without_a_hold_the_same_split_sweep_would_be_two_non_whales() -> None:
    """The control for the test above: with neither the hold nor the detector's memory of short sweeps (which
    would reopen the closed half), the split sweep is lost."""
    t0 = NOW_MS - 20_000
    fills = [rest_trade(f"s{i}", "KXBIG-1", ts_ms=t0 + 100 * i, count="70000.00", yes_price="0.4000") for i in range(4)]
    detector = WhaleDetector(THRESHOLD, 1000, late_fill_horizon_ms=0)
    for fields in (fills[0], fills[3], rest_trade("x1", "KXOTHER", ts_ms=t0 + 5_000, count="1.00")):
        detector.add(trade_from_fields(fields))
    alerts = detector.add_many(trade_from_fields(f) for f in (fills[1], fills[2]))
    alerts += detector.flush()
    assert alerts == []


async def test_a_window_longer_than_max_span_is_clipped_from_the_old_end_and_logged(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    fake.add_trades(small_trades(NOW_MS - 3_600_000, 360, 10_000))
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed, max_span_s=600, slice_s=300)
    backfiller.request(NOW_MS - 3_600_000, None, "startup")
    await run_until_idle(backfiller)
    clipped = events(logs, "backfill_clipped")
    assert len(clipped) == 1 and clipped[0]["uncovered_to"] == "2030-03-17T17:36:40.000Z"  # now - 600 s
    assert backfiller.counts.uncovered_s == 3000.0
    assert min(int(r.query["min_ts"]) for r in fake.requests) == (NOW_MS - 600_000) // 1000
    assert len(feed.trades) == 60


async def test_open_ended_window_waits_for_late_listed_trades(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    """REST may list a trade a moment after the socket carried it: the newest slice is fetched once settled."""
    clock = {"ms": NOW_MS}

    async def sleep(delay_s: float) -> None:
        clock["ms"] += int(delay_s * 1000)
        await asyncio.sleep(UNIT)  # meanwhile the late trade appears
        fake.add_trades([rest_trade("late", "KXBIG-2", ts_ms=NOW_MS - 200, count="5.00")])

    feed = Recorder()
    backfiller = make_backfiller(
        make_rest(session, fake), feed, clock_ms=lambda: clock["ms"], settle_ms=1500, sleep=sleep
    )
    backfiller.request(NOW_MS - 5_000, None, "seq_gap")
    await run_until_idle(backfiller)
    assert [t["trade_id"] for t in feed.trades] == ["late"]
    assert clock["ms"] == NOW_MS + 1500


async def test_cancelling_the_run_releases_every_hold(fake: FakeKalshiRest, session: aiohttp.ClientSession) -> None:
    fake.delay_s["trades"] = 20 * UNIT
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed, margin_ms=5_000)
    backfiller.request(NOW_MS - 50_000, NOW_MS - 40_000, "seq_gap")
    backfiller.request(NOW_MS - 10_000, None, "reconnect")
    block = rest_trade("b", "KXB", ts_ms=NOW_MS - 1_000, count="1.00", block=True)  # closes at once
    feed.pipeline.on_rest_trade(block)
    assert feed.detector.processed_through_ms() == NOW_MS - 55_001  # held: a restart would resume there
    task = asyncio.create_task(backfiller.run())
    await asyncio.sleep(UNIT)
    assert backfiller.pending == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert feed.holds == {}
    assert feed.detector.processed_through_ms() == NOW_MS - 1_000


async def test_a_hold_token_given_is_the_one_released(fake: FakeKalshiRest, session: aiohttp.ClientSession) -> None:
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed, margin_ms=5_000)
    token = feed.hold(NOW_MS - 30_000)
    backfiller.request(NOW_MS - 25_000, None, "reconnect", hold_token=token)
    assert feed.holds == {token: NOW_MS - 30_000}  # no second hold taken
    await run_until_idle(backfiller)
    assert feed.holds == {} and feed.released == [token]
    query = fake.requests[0].query
    assert int(query["min_ts"]) == (NOW_MS - 30_000) // 1000  # the margin is applied to the window


def test_trade_time_of_rest_and_ws_shapes() -> None:
    assert trade_time_ms(rest_trade("a", "K", ts_ms=NOW_MS + 7)) == NOW_MS + 7
    assert trade_time_ms({"created_time": "2026-09-01T01:46:15.690388Z"}) == 1_788_227_175_690
    assert trade_time_ms({"created_time": "2026-09-01T03:46:15.690+02:00"}) == 1_788_227_175_690
    assert trade_time_ms({"ts_ms": NOW_MS}) == NOW_MS
    assert trade_time_ms({"ts_ms": NOW_MS * 1000}) > NOW_MS * 1000  # microseconds by mistake: unreadable, sorts last
    assert trade_time_ms({"created_time": "yesterday"}) > NOW_MS  # sorts last; the feed reports it


async def test_a_burst_of_gaps_takes_one_hold_and_feeds_in_small_chunks(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    tape = small_trades(NOW_MS - 30_000, 2500, 11)
    fake.add_trades(tape)
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed, feed_chunk=300, margin_ms=1_000)
    for k in range(50):  # one gap after another, each noticed a little later
        backfiller.request(NOW_MS - 29_000 + 100 * k, None, "seq_gap")
    assert len(feed.holds) == 1 and backfiller.pending == 1
    backfiller.request(NOW_MS - 29_500, None, "seq_gap")  # reaches further back: needs a hold of its own
    assert sorted(feed.holds.values()) == [NOW_MS - 30_500, NOW_MS - 30_000]
    await run_until_idle(backfiller)
    assert len(events(logs, "backfill_requested")) == 1
    assert max(len(b) for b in feed.batches) == 300 and len(feed.batches) >= 9
    assert len(feed.trades) == 2500
    assert_ascending(feed.trades)
    assert feed.holds == {}
