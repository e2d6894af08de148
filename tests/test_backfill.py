"""The Backfiller against the loopback fake Kalshi REST: paging, the one retry layer, failures, concurrency, order."""

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
from valshi_x.kalshi.rest import KalshiRest
from valshi_x.pipeline import Pipeline
from valshi_x.recovery import fetcher as backfill_module
from valshi_x.recovery.fetcher import Backfiller, trade_time_ms
from valshi_x.recovery.planner import RecoveryPlanner, Window
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
        "pause_initial_s": UNIT / 5,
        "pause_max_s": UNIT,
        **kwargs,
    }
    return KalshiRest(session, fake.base_url, **options)


def make_backfiller(rest: KalshiRest, feed: Recorder, **kwargs: Any) -> Backfiller:
    options: dict[str, Any] = {
        "feed": feed,
        "planner": RecoveryPlanner(settle_ms=0),
        "clock_ms": lambda: NOW_MS,
        "slice_s": 60,
        "retry_initial_s": UNIT / 5,
        "retry_max_s": UNIT / 5,
        "rand": lambda: 1.0,
        **kwargs,
    }
    return Backfiller(rest, **options)


def window(from_ms: int, to_ms: int, reason: str = "seq_gap", window_id: int = 1) -> Window:
    return Window(window_id, from_ms, to_ms, (reason,))


def small_trades(start_ms: int, n: int, step_ms: int, prefix: str = "t") -> list[dict[str, Any]]:
    return [
        rest_trade(f"{prefix}{i:06d}", f"KXSMALL-{i % 7}", ts_ms=start_ms + i * step_ms, count="3.00") for i in range(n)
    ]


async def run_until_idle(backfiller: Backfiller, timeout_s: float = 40 * UNIT) -> None:
    """Run the backfiller until the planner has nothing left to fetch."""
    task = asyncio.create_task(backfiller.run())
    try:
        async with asyncio.timeout(timeout_s):
            while backfiller.pending:  # noqa: ASYNC110 - the planner is pure: nothing to wait on but time
                await asyncio.sleep(UNIT / 5)
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
    assert await backfiller.fetch(window(NOW_MS - 150_000, NOW_MS))

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
    assert backfiller.counts.windows == 1 and backfiller.counts.trades == 1500


async def test_a_failed_slice_is_tried_again_from_its_start_and_nothing_is_lost(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    tape = small_trades(NOW_MS - 150_000, 300, 490)  # three 60 s slices
    fake.add_trades(tape)
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed, page_limit=60, slices_ahead=1)
    # The first slice's first page arrives, its second fails three ways, then the rest goes through.
    fake.script("trades", Fault(), 429, 503, Fault(drop=True), Fault(drop=True))
    assert await backfiller.fetch(window(NOW_MS - 150_000, NOW_MS, "reconnect"))

    assert sorted(t["trade_id"] for t in feed.trades) == sorted(t["trade_id"] for t in tape)
    assert_ascending(feed.trades)
    retries = events(logs, "backfill_retry")
    assert [(r["error"], r["tries"]) for r in retries] == [
        ("rate_limited", 1),
        ("server_error", 2),
        ("connection_error", 3),
    ]
    assert {r["slice_from"] for r in retries} == {"2030-03-17T17:44:10.000Z"}  # the first slice, from its start
    # Each request went out once (aiohttp's own resend of a dropped idempotent request aside): one retry layer.
    first_slice = [r for r in fake.requests if int(r.query["min_ts"]) == (NOW_MS - 150_000) // 1000]
    assert len(first_slice) == 1 + 4 + 3  # a page, the four failures, then its three pages again
    assert events(logs, "backfill_incomplete") == [] and backfiller.counts.retries == 3


async def test_slow_answer_within_timeout_is_waited_for(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    tape = small_trades(NOW_MS - 10_000, 50, 100)
    fake.add_trades(tape)
    fake.script("trades", Fault(delay_s=4 * UNIT))
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed)
    assert await backfiller.fetch(window(NOW_MS - 10_000, NOW_MS))
    assert len(feed.trades) == 50
    assert events(logs, "backfill_done")[0]["seconds"] >= 4 * UNIT
    assert fake.counts["trades"] == 1  # answered once, not retried


async def test_a_permanent_failure_logs_the_uncovered_window_and_the_others_go_on(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    fake.add_trades(small_trades(NOW_MS - 200_000, 100, 2000))
    feed = Recorder()
    planner = RecoveryPlanner(settle_ms=0)
    backfiller = make_backfiller(make_rest(session, fake), feed, planner=planner, max_concurrent=1)
    fake.script("trades", 400)  # a 4xx would fail the same way again: not retried
    planner.on_startup(NOW_MS - 199_000, NOW_MS - 1000)  # from 200 s ago (a 1 s margin), fetched first
    planner.on_subscribed(NOW_MS - 1000)
    planner.on_first_trade(NOW_MS - 190_000 - 1000, NOW_MS - 1000)
    planner.on_gap(NOW_MS - 99_000, NOW_MS - 51_000, NOW_MS - 1000)
    await run_until_idle(backfiller)

    failed = events(logs, "backfill_incomplete")
    assert len(failed) == 1
    assert failed[0]["reasons"] == ["startup"]
    assert failed[0]["uncovered_from"] == "2030-03-17T17:43:20.000Z"  # NOW_MS - 200 s
    assert failed[0]["uncovered_to"] == "2030-03-17T17:43:30.000Z"
    assert failed[0]["uncovered_s"] == 10.0 and failed[0]["error"] == "http_error"
    assert backfiller.counts.failures == 1 and backfiller.counts.uncovered_s == 10.0
    # The later window still ran, and the planner holds nothing any more: groups can close again.
    assert events(logs, "backfill_done")[0]["reasons"] == ["seq_gap"]
    assert backfiller.counts.windows == 1 and len(feed.trades) == 26
    assert planner.pending == 0 and planner.counts.given_up == 1 and planner.may_close(0, 2**62)


async def test_windows_are_fetched_concurrently(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    fake.add_trades(small_trades(NOW_MS - 600_000, 600, 1000))
    fake.delay_s["trades"] = 4 * UNIT
    feed = Recorder()
    planner = RecoveryPlanner(settle_ms=0)
    backfiller = make_backfiller(make_rest(session, fake), feed, planner=planner, max_concurrent=3)
    for k in range(3):  # three gaps far apart: three windows
        planner.on_gap(NOW_MS - 500_000 + 100_000 * k, NOW_MS - 499_000 + 100_000 * k, NOW_MS - 1000)
    started = asyncio.get_running_loop().time()
    await run_until_idle(backfiller)
    assert len(events(logs, "backfill_done")) == 3
    # Three slow requests side by side take about one request's time, not three.
    assert asyncio.get_running_loop().time() - started < 3 * 4 * UNIT


async def test_a_window_older_than_max_span_is_clipped_from_the_old_end_and_logged(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    fake.add_trades(small_trades(NOW_MS - 3_600_000, 360, 10_000))
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed, max_span_s=600, slice_s=300)
    assert await backfiller.fetch(window(NOW_MS - 3_600_000, NOW_MS, "startup"))
    clipped = events(logs, "backfill_clipped")
    assert len(clipped) == 1 and clipped[0]["uncovered_to"] == "2030-03-17T17:36:40.000Z"  # now - 600 s
    assert backfiller.counts.uncovered_s == 3000.0
    assert min(int(r.query["min_ts"]) for r in fake.requests) == (NOW_MS - 600_000) // 1000
    assert len(feed.trades) == 60


async def test_a_clipped_window_whose_oldest_slice_fails_once_is_tried_again_not_given_up(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    # The oldest slice of a clipped window starts right at the span's edge: one 503 there once gave up the whole
    # catch-up of a restart after a long stop.
    fake.add_trades(small_trades(NOW_MS - 3_600_000, 360, 10_000))
    fake.script("trades", 503)
    feed = Recorder()
    clock = iter(range(NOW_MS, NOW_MS + 10**9, 1_500))  # time passes while it works: 1.5 s a look at the clock
    backfiller = make_backfiller(
        make_rest(session, fake), feed, max_span_s=600, slice_s=300, clock_ms=lambda: next(clock)
    )
    assert await backfiller.fetch(window(NOW_MS - 3_600_000, NOW_MS, "startup"))
    assert len(events(logs, "backfill_retry")) == 1 and not events(logs, "backfill_incomplete")
    assert len(feed.trades) == 60


def test_trade_time_of_rest_and_ws_shapes() -> None:
    assert trade_time_ms(rest_trade("a", "K", ts_ms=NOW_MS + 7)) == NOW_MS + 7
    assert trade_time_ms({"created_time": "2026-09-01T01:46:15.690388Z"}) == 1_788_227_175_690
    assert trade_time_ms({"created_time": "2026-09-01T03:46:15.690+02:00"}) == 1_788_227_175_690
    assert trade_time_ms({"ts_ms": NOW_MS}) == NOW_MS
    assert trade_time_ms({"ts_ms": NOW_MS * 1000}) > NOW_MS * 1000  # microseconds by mistake: unreadable, sorts last
    assert trade_time_ms({"created_time": "yesterday"}) > NOW_MS  # sorts last; the feed reports it


async def test_feeds_in_small_chunks(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    tape = small_trades(NOW_MS - 30_000, 2500, 11)
    fake.add_trades(tape)
    feed = Recorder()
    backfiller = make_backfiller(make_rest(session, fake), feed, feed_chunk=300)
    assert await backfiller.fetch(window(NOW_MS - 30_000, NOW_MS))
    assert max(len(b) for b in feed.batches) == 300 and len(feed.batches) >= 9
    assert len(feed.trades) == 2500
    assert_ascending(feed.trades)


async def test_a_held_split_sweep_is_completed_by_the_backfill(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    """Two fills arrive live, two only on REST (lost in a gap), then live trading goes on: one alert, full value."""
    t0 = NOW_MS - 20_000
    sweep = [
        rest_trade(f"s{i}", "KXBIG-1", ts_ms=t0 + 100 * i, count="70000.00", yes_price="0.4000") for i in range(4)
    ]  # 4 x $28k = $112k
    fake.add_trades(sweep)
    feed = Recorder(sweep_window_ms=1000)
    planner = RecoveryPlanner(settle_ms=0, hold_max_ms=60_000)
    feed.detector.gate = planner
    fake.delay_s["trades"] = 4 * UNIT  # the backfill is slow: live trades go on meanwhile
    backfiller = make_backfiller(make_rest(session, fake), feed, planner=planner)
    live = feed.pipeline
    assert live.on_rest_trade(sweep[0]) == []
    assert live.on_rest_trade(sweep[3]) == []
    planner.on_gap(t0, t0 + 300, NOW_MS - 1000)  # the frames of s1 and s2 were lost
    task = asyncio.create_task(backfiller.run())
    try:
        await asyncio.sleep(UNIT)
        later = rest_trade("x1", "KXOTHER", ts_ms=t0 + 5_000, count="1.00")
        assert live.on_rest_trade(later) == []  # would close the sweep, but the window holds it open
        assert live.detector.close_due(t0 + 60_000) == []
        assert live.detector.open_groups == 1 and live.detector.held_groups == 1  # KXOTHER closed: out of reach
        async with asyncio.timeout(40 * UNIT):
            while planner.pending:  # noqa: ASYNC110 - the planner is pure: nothing to wait on but time
                await asyncio.sleep(UNIT / 5)
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
