"""Kalshi REST client against the loopback fake: titles, cache, one try per request, the bucket, paging."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from tests.fake_kalshi_rest import FakeKalshiRest, Fault, rest_trade
from valshi_x.kalshi import rest as rest_module
from valshi_x.kalshi.rest import (
    KalshiRest,
    KalshiRestError,
    RateLimiter,
    TitleBreaker,
    TitleLookup,
    TTLCache,
    _category,
    _Event,
    label_from,
)
from valshi_x.markets import MarketLabel
from valshi_x.trades import trade_from_fields

UNIT = 0.05  # seconds of real time; every real wait in these tests is a multiple of it


class FakeClock:
    """Monotonic time that moves only when the code under test sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(round(delay_s, 6))
        self.now += delay_s
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    # A fresh logger bound inside capture_logs, whatever logging set-up earlier tests left cached.
    with capture_logs() as captured:
        monkeypatch.setattr(rest_module, "log", structlog.get_logger("test_rest"))
        yield captured


def make_rest(session: aiohttp.ClientSession, fake: FakeKalshiRest, clock: FakeClock, **kwargs: Any) -> KalshiRest:
    options: dict[str, Any] = {
        "max_requests_per_s": float("inf"),  # no spacing: the fake clock stands still between requests
        "timeout_s": 20 * UNIT,
        "pause_initial_s": 1.0,
        "pause_max_s": 8.0,
        "clock": clock,
        "sleep": clock.sleep,
        "jitter": lambda: 1.0,  # the top of the jitter range: pauses are exactly the step
    }
    options.update(kwargs)
    return KalshiRest(session, fake.base_url, **options)


def nfl(fake: FakeKalshiRest) -> None:
    fake.add_event("KXNFLGAME-26NOV01KCBUF", "Kansas City at Buffalo Winner?", series_ticker="KXNFLGAME")
    fake.add_market("KXNFLGAME-26NOV01KCBUF-KC", "KXNFLGAME-26NOV01KCBUF", yes_sub_title="Kansas City")
    fake.add_market("KXNFLGAME-26NOV01KCBUF-BUF", "KXNFLGAME-26NOV01KCBUF", yes_sub_title="Buffalo")


# ---------------------------------------------------------------------------------------------------------------
# Titles


async def test_titles_from_market_and_event(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    nfl(fake)
    fake.add_event("KXFED-26DEC", "Fed rate after the December 2026 meeting?", series_ticker="KXFED")
    fake.add_market("KXFED-26DEC-T4.00", "KXFED-26DEC", yes_sub_title="Above 4.00%")
    fake.add_event("KXSHUT-26", "Will the government shut down in 2026?", series_ticker="KXSHUT")
    fake.add_market("KXSHUT-26-Y", "KXSHUT-26", yes_sub_title="Government shut down in 2026", title="x")
    fake.add_event("KXMVESPORTS-S2026AB", "", series_ticker="KXMVESPORTS", sub_title="MVE")
    fake.add_market(
        "KXMVESPORTS-S2026AB-CD",
        "KXMVESPORTS-S2026AB",
        yes_sub_title="yes Atlas",
        title="yes Atlas,yes Cruz Azul,no Over 2.5 goals",
    )
    rest = make_rest(session, fake, clock)

    assert await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC") == MarketLabel(
        "Kansas City at Buffalo Winner? — Kansas City", "KXNFLGAME"
    )
    assert await rest.market_label("KXFED-26DEC-T4.00") == MarketLabel(
        "Fed rate after the December 2026 meeting? — Above 4.00%", "KXFED"
    )
    # A sub-title the event's title already says adds nothing.
    assert await rest.market_label("KXSHUT-26-Y") == MarketLabel("Will the government shut down in 2026?", "KXSHUT")
    assert await rest.market_label("KXMVESPORTS-S2026AB-CD") == MarketLabel(
        "Combo: yes Atlas, yes Cruz Azul, no Over 2.5 goals", None
    )
    # One request each: the guessed event, which lists its markets; a combo's own market (its legs).
    assert fake.counts == {"event": 3, "market": 1}


@pytest.mark.parametrize(
    ("market", "event", "expected"),
    [
        ({"yes_sub_title": "Yes"}, _Event("Will it rain?", "", "KXRAIN", 1), "Will it rain?"),
        ({"yes_sub_title": "rain"}, _Event("Will it rain?", "", "KXRAIN", 1), "Will it rain?"),
        ({"yes_sub_title": "Will it rain?"}, _Event("Will it rain?", "", "KXRAIN", 2), "Will it rain?"),
        (
            {"yes_sub_title": "Buffalo"},
            _Event("Kansas City at Buffalo?", "", "KXG", 2),
            "Kansas City at Buffalo? — Buffalo",
        ),
        (
            {"yes_sub_title": "Buffalo"},
            _Event("Kansas City at Buffalo?", "", "KXG", None),
            "Kansas City at Buffalo? — Buffalo",
        ),
        ({"yes_sub_title": ""}, _Event("Will it rain?", "", "KXRAIN", 2), "Will it rain?"),
        ({"yes_sub_title": "Same", "title": "Same"}, _Event("Event?", "", "KXE", 1), "Event?"),
        (
            {"yes_sub_title": "85° to 86°"},
            _Event("Highest temperature in NYC?", "", "KXHIGH", 6),
            "Highest temperature in NYC? — 85° to 86°",
        ),
        ({"yes_sub_title": "Alice", "title": "Old title"}, None, "Old title — Alice"),
        ({}, None, "KXA-1"),
        ({"yes_sub_title": "", "title": ""}, _Event("Combo", "MVE", "KXMVE", None), "Combo"),
    ],
)
def test_label_rules(market: dict[str, Any], event: _Event | None, expected: str) -> None:
    assert label_from("KXA-1", market, event).title == expected


async def test_context_comes_with_the_title_in_the_same_request(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    # Category (the event's), close times and 24 h volume (the market's) ride along: no request more.
    fake.add_event(
        "KXNFLGAME-26NOV01KCBUF", "Kansas City at Buffalo Winner?", series_ticker="KXNFLGAME", category="Sports"
    )
    fake.add_market(
        "KXNFLGAME-26NOV01KCBUF-KC",
        "KXNFLGAME-26NOV01KCBUF",
        yes_sub_title="Kansas City",
        close_time="2026-11-15T18:00:00Z",
        expected_expiration_time="2026-11-02T00:30:00.000000Z",
        volume_24h_fp="123456.78",
        volume_24h=99,
    )
    fake.add_market("KXNFLGAME-26NOV01KCBUF-BUF", "KXNFLGAME-26NOV01KCBUF", yes_sub_title="Buffalo", volume_24h=4000)
    rest = make_rest(session, fake, clock)
    label = await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC")
    assert (label.category, label.volume_24h) == ("Sports", Decimal("123456.78"))
    assert label.close_time == datetime(2026, 11, 15, 18, 0, tzinfo=UTC)
    assert label.expected_expiration_time == datetime(2026, 11, 2, 0, 30, tzinfo=UTC)
    sibling = await rest.market_label("KXNFLGAME-26NOV01KCBUF-BUF")
    assert (sibling.category, sibling.volume_24h, sibling.close_time) == ("Sports", Decimal(4000), None)
    assert fake.counts == {"event": 1}


@pytest.mark.parametrize(
    "odd",
    [
        {"volume_24h_fp": "1e9", "volume_24h": True, "close_time": "tomorrow", "category": "<b>Sports</b>"},
        {"volume_24h_fp": "-5", "volume_24h": 10**20, "close_time": "2026-13-45T99:00:00Z", "category": "x" * 100},
        {"volume_24h_fp": "9" * 400, "volume_24h": "NaN", "close_time": "2026-11-15T18:00:00+05:00", "category": 7},
        {"volume_24h_fp": ["1"], "volume_24h": -1, "close_time": 1789319100, "category": "Sports\n@x"},
    ],
)
def test_odd_context_fields_are_left_out(odd: dict[str, Any]) -> None:
    label = label_from(
        "KXA-1", {"yes_sub_title": "A", **odd}, _Event("Event?", "", "KXA", 2, _category(odd["category"]))
    )
    assert (label.title, label.category, label.close_time, label.volume_24h) == ("Event? — A", None, None, None)


async def test_cache_hits_and_expiry(fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    nfl(fake)
    rest = make_rest(session, fake, clock, label_ttl_s=6 * 3600.0)
    first = await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC")
    assert await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC") == first
    # Same event: its answer listed this market too, so nothing is asked for.
    assert (await rest.market_label("KXNFLGAME-26NOV01KCBUF-BUF")).title.endswith("— Buffalo")
    assert fake.counts == {"event": 1}

    clock.now += 6 * 3600 - 1
    await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC")
    assert fake.counts == {"event": 1}
    clock.now += 2
    await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC")
    assert fake.counts == {"event": 2}


async def test_failures_are_cached_briefly(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    rest = make_rest(session, fake, clock, failure_ttl_s=60.0)
    with pytest.raises(KalshiRestError) as first:
        await rest.market_label("KXNOPE-1")
    assert (first.value.reason, first.value.status) == ("not_found", 404)
    with pytest.raises(KalshiRestError, match="cached failure"):
        await rest.market_label("KXNOPE-1")
    assert fake.counts == {"event": 1, "market": 1}  # the guessed event "KXNOPE" (404), then the market
    clock.now += 61
    nfl(fake)
    fake.add_market("KXNOPE-1", "KXNFLGAME-26NOV01KCBUF", yes_sub_title="Now it exists")
    assert (await rest.market_label("KXNOPE-1")).title.endswith("— Now it exists")
    assert fake.counts["market"] == 2


async def test_bad_tickers_never_reach_the_server(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    rest = make_rest(session, fake, clock)
    with pytest.raises(KalshiRestError, match="bad_ticker"):
        await rest.market_label("../portfolio/balance")
    assert fake.counts == {}


def test_cache_is_bounded_least_recently_used_first() -> None:
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(2, clock)
    cache.put("a", 1, 10.0)
    cache.put("b", 2, 10.0)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3, 10.0)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)


# ---------------------------------------------------------------------------------------------------------------
# Retries and waits


async def test_each_request_is_tried_once_and_a_429_pauses_every_later_request(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """One retry layer: the client classifies and pauses, the caller (the backfill) decides to try again."""
    nfl(fake)
    fake.script("market", 429, 429)
    rest = make_rest(session, fake, clock)
    for _ in range(2):
        with pytest.raises(KalshiRestError) as caught:
            await rest.get_json("/markets/KXNFLGAME-26NOV01KCBUF-KC")
        assert (caught.value.reason, caught.value.status) == ("rate_limited", 429)
    assert fake.counts == {"market": 2}
    label = await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC")  # market + event, after the pause
    assert label.title.endswith("— Kansas City")
    assert clock.sleeps == [1.0, 2.0]  # the pause doubles for 429s in a row; jitter pinned at its top
    assert rest.rate_limited == 0  # a success ends the run of 429s


async def test_hold_delays_every_later_request() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock, sleep=clock.sleep)
    await limiter.wait()
    limiter.hold(3.0)  # what a 429 does: every request after it waits, not only the one that failed
    await limiter.wait()
    await limiter.wait()
    assert clock.sleeps == [3.0, 0.1]


async def test_token_bucket_lets_a_burst_through_then_keeps_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(20.0, burst=5, clock=clock, sleep=clock.sleep)
    for _ in range(7):
        await limiter.wait()
    assert clock.sleeps == [0.05, 0.05]  # five at once, then one every 50 ms
    clock.now += 10.0  # idle: the bucket fills up again, but no further than the burst
    for _ in range(6):
        await limiter.wait()
    assert clock.sleeps == [0.05, 0.05, 0.05]


async def test_jitter_spreads_pauses(fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    nfl(fake)
    fake.script("event", 429)  # a title asks for the market's event first
    rest = make_rest(session, fake, clock, jitter=lambda: 0.0, pause_initial_s=2.0)
    with pytest.raises(KalshiRestError):
        await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC")
    await rest.get_json("/markets/KXNFLGAME-26NOV01KCBUF-KC")
    assert clock.sleeps == [1.0]  # the bottom of the range: half of 2 s


@pytest.mark.parametrize(
    "case",
    [
        (503, "server_error", 503),
        (500, "server_error", 500),
        (404, "not_found", 404),
        (400, "http_error", 400),
        (Fault(drop=True), "connection_error", None),
    ],
)
async def test_failures_are_classified_once_without_a_retry(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock, case: tuple[int | Fault, str, int | None]
) -> None:
    fault, reason, status = case
    nfl(fake)
    # aiohttp itself resends an idempotent request once when the server drops it; the second drop reaches us.
    fake.script("market", *([fault, fault] if isinstance(fault, Fault) else [fault]))
    rest = make_rest(session, fake, clock)
    with pytest.raises(KalshiRestError) as caught:
        await rest.get_json("/markets/KXNFLGAME-26NOV01KCBUF-KC")
    assert (caught.value.reason, caught.value.status) == (reason, status)
    assert rest.requests == 1 and clock.sleeps == []


async def test_a_slow_answer_is_a_timeout(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    nfl(fake)
    fake.script("market", Fault(delay_s=4 * UNIT))
    rest = make_rest(session, fake, clock, timeout_s=2 * UNIT)
    with pytest.raises(KalshiRestError, match="timeout"):
        await rest.get_json("/markets/KXNFLGAME-26NOV01KCBUF-KC")
    assert (await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC")).title.endswith("Kansas City")


async def test_rate_limiter_spaces_requests(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    nfl(fake)
    rest = make_rest(session, fake, clock, max_requests_per_s=10.0, burst=1)
    for _ in range(3):
        await rest.get_json("/markets/KXNFLGAME-26NOV01KCBUF-KC")
    assert clock.sleeps == [0.1, 0.1]


async def test_real_spacing_on_the_wire(fake: FakeKalshiRest, session: aiohttp.ClientSession) -> None:
    nfl(fake)
    rest = KalshiRest(session, fake.base_url, max_requests_per_s=1 / (2 * UNIT), burst=1)
    await asyncio.gather(*(rest.get_json("/markets/KXNFLGAME-26NOV01KCBUF-KC") for _ in range(4)))
    times = [r.at_s for r in fake.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    assert all(gap >= 2 * UNIT * 0.8 for gap in gaps), gaps


# ---------------------------------------------------------------------------------------------------------------
# Waiting for a lookup (the poster bounds the wait: tests/test_poster.py)


async def stop_waiting(lookup: TitleLookup, ticker: str, after_s: float) -> None:
    """What the poster does with a lookup slower than its budget: stops waiting for it."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(after_s):
            await lookup.label_for(ticker)


async def at_once(lookup: TitleLookup, ticker: str) -> MarketLabel | None:
    """The label without waiting at all (a cached one): a lookup that had to wait would be cut off here."""
    async with asyncio.timeout(0):
        return await lookup.label_for(ticker)


async def test_a_lookup_nobody_waits_for_any_more_goes_on(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, logs: list[dict[str, Any]]
) -> None:
    nfl(fake)
    fake.delay_s["event"] = 10 * UNIT
    rest = KalshiRest(session, fake.base_url, timeout_s=20 * UNIT)
    lookup = TitleLookup(rest)
    await stop_waiting(lookup, "KXNFLGAME-26NOV01KCBUF-KC", 2 * UNIT)
    assert not [e for e in logs if e["event"].startswith("title_")]  # lateness is the waiter's to log

    # The lookup went on in the background; once done, its answer is cached and comes at once.
    await asyncio.sleep(12 * UNIT)
    label = await at_once(lookup, "KXNFLGAME-26NOV01KCBUF-KC")
    assert label is not None
    assert label.title.endswith("Kansas City")
    assert fake.counts == {"event": 1}
    await lookup.aclose()


async def test_one_request_gives_the_label_and_its_siblings(
    fake: FakeKalshiRest, session: aiohttp.ClientSession
) -> None:
    nfl(fake)
    lookup = TitleLookup(KalshiRest(session, fake.base_url))
    label = await lookup.label_for("KXNFLGAME-26NOV01KCBUF-KC")
    assert label == MarketLabel("Kansas City at Buffalo Winner? — Kansas City", "KXNFLGAME")
    assert [r.path.rsplit("/", 1)[1] for r in fake.requests] == ["KXNFLGAME-26NOV01KCBUF"]
    # The other side of the game came with it: its alert needs no request and no wait.
    sibling = await at_once(lookup, "KXNFLGAME-26NOV01KCBUF-BUF")
    assert sibling == MarketLabel("Kansas City at Buffalo Winner? — Buffalo", "KXNFLGAME")
    assert fake.counts == {"event": 1}
    await lookup.aclose()


async def test_a_wrong_event_guess_is_dropped_for_the_event_the_market_names(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake.add_event("KXODD-EV", "Odd event?", series_ticker="KXODD")
    fake.add_market("KXODD-26-A", "KXODD-EV", yes_sub_title="A")
    rest = make_rest(session, fake, clock)
    assert await rest.market_label("KXODD-26-A") == MarketLabel("Odd event? — A", "KXODD")
    events = [r.path.rsplit("/", 1)[1] for r in fake.requests if r.route == "event"]
    assert sorted(events) == ["KXODD-26", "KXODD-EV"]  # the guess (a 404, ignored), then the named one
    # The named event is cached: another market of it needs only its own request (and a guess already known).
    fake.add_market("KXODD-EV-B", "KXODD-EV", yes_sub_title="B")
    assert (await rest.market_label("KXODD-EV-B")).title == "Odd event? — B"
    assert fake.counts == {"market": 2, "event": 2}


async def test_an_odd_answer_for_the_guessed_event_falls_back_to_the_market(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    nfl(fake)
    fake.script("event", 400)  # not a sign of a struggling Kalshi: the market is asked, and names its event
    rest = make_rest(session, fake, clock)
    assert (await rest.market_label("KXNFLGAME-26NOV01KCBUF-KC")).title.endswith("— Kansas City")
    assert fake.counts == {"event": 2, "market": 1}


async def test_titles_are_never_retried_and_a_transient_failure_is_not_cached(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    nfl(fake)
    fake.script("event", 503)
    rest = make_rest(session, fake, clock)
    lookup = TitleLookup(rest, retry_after_s=10.0, clock=clock)
    lookup.prefetch("KXNFLGAME-26NOV01KCBUF-KC")  # a sweep nears the threshold; Kalshi answers 503
    await fake_wait(lambda: not lookup._running)
    assert fake.counts == {"event": 1}
    assert clock.sleeps == []
    failed = [e for e in logs if e["event"] == "title_lookup_failed"]
    assert [(e["reason"], e["status"]) for e in failed] == [("server_error", 503)]
    assert not [e for e in logs if e["event"] == "kalshi_rest_retry"]
    # The alert a moment later does not ask again (that would be a retry): the ticker, at once.
    assert await lookup.label_for("KXNFLGAME-26NOV01KCBUF-KC") is None
    lookup.prefetch("KXNFLGAME-26NOV01KCBUF-KC")
    assert fake.counts == {"event": 1}
    assert (lookup.skipped_recent_failure, lookup.skipped_breaker) == (1, 0)
    # A 5xx says nothing lasting about the market: a later alert asks again, and gets the title.
    clock.now += 10
    label = await lookup.label_for("KXNFLGAME-26NOV01KCBUF-KC")
    assert label is not None
    assert fake.counts == {"event": 2}
    assert lookup.failures == 1
    await lookup.aclose()


async def test_concurrent_lookups_share_one_request(fake: FakeKalshiRest, session: aiohttp.ClientSession) -> None:
    nfl(fake)
    fake.delay_s["event"] = 2 * UNIT
    lookup = TitleLookup(KalshiRest(session, fake.base_url))
    lookup.prefetch("KXNFLGAME-26NOV01KCBUF-KC")
    labels = await asyncio.gather(*(lookup.label_for("KXNFLGAME-26NOV01KCBUF-KC") for _ in range(5)))
    assert len(set(labels)) == 1
    assert labels[0] is not None
    assert fake.counts == {"event": 1}
    await lookup.aclose()


async def test_prefetch_lets_the_alert_find_the_title_at_once(
    fake: FakeKalshiRest, session: aiohttp.ClientSession
) -> None:
    nfl(fake)
    fake.delay_s["event"] = 4 * UNIT  # an alert that did not wait at all would miss it
    lookup = TitleLookup(KalshiRest(session, fake.base_url))
    lookup.prefetch("KXNFLGAME-26NOV01KCBUF-KC")  # a sweep is nearing the threshold
    lookup.prefetch("KXNFLGAME-26NOV01KCBUF-KC")  # running already: nothing more is asked
    await fake_wait(lambda: not lookup._running)
    label = await at_once(lookup, "KXNFLGAME-26NOV01KCBUF-KC")  # the alert
    assert label is not None
    assert label.title.endswith("Kansas City")
    lookup.prefetch("KXNFLGAME-26NOV01KCBUF-KC")  # cached: nothing is asked
    assert fake.counts == {"event": 1}
    await lookup.aclose()


async def test_prefetch_is_bounded(fake: FakeKalshiRest, session: aiohttp.ClientSession) -> None:
    fake.delay_s["market"] = 10 * UNIT
    lookup = TitleLookup(KalshiRest(session, fake.base_url, max_requests_per_s=float("inf")), max_running=2)
    for n in range(5):
        lookup.prefetch(f"KXA-{n}")
    assert sorted(lookup._running) == ["KXA-0", "KXA-1"]
    # An alert's own lookup is never refused for want of room.
    await stop_waiting(lookup, "KXA-9", 0)
    assert sorted(lookup._running) == ["KXA-0", "KXA-1", "KXA-9"]
    await lookup.aclose()


def test_breaker_opens_after_failures_in_a_row_probes_once_and_closes(logs: list[dict[str, Any]]) -> None:
    clock = FakeClock()
    breaker = TitleBreaker(failures_to_open=3, open_s=30.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(ok=False, reason="timeout")
    breaker.record(ok=True)  # an answer in between: the count starts again
    for _ in range(3):
        assert breaker.allow()
        breaker.record(ok=False, reason="server_error")
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.record(ok=False, reason="timeout")  # the probe failed: another pause, not another log line
    assert (breaker.state, breaker.allow()) == ("open", False)
    clock.now += 30
    assert breaker.allow()
    breaker.record(ok=True)
    assert breaker.state == "closed"
    assert breaker.allow()
    assert breaker.opened == 1
    names = [e["event"] for e in logs if e["event"].startswith("title_lookups_")]
    assert names == ["title_lookups_paused", "title_lookups_resumed"]
    paused = next(e for e in logs if e["event"] == "title_lookups_paused")
    assert (paused["failures_in_row"], paused["reason"], paused["retry_in_s"]) == (3, "server_error", 30.0)
    resumed = next(e for e in logs if e["event"] == "title_lookups_resumed")
    assert resumed["paused_s"] == pytest.approx(60.0)


async def test_failing_lookups_open_the_breaker_and_a_probe_closes_it(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    nfl(fake)
    # A 503, a dropped connection (twice: aiohttp resends an idempotent request once), a timeout.
    fake.script("market", 503, Fault(drop=True), Fault(drop=True), Fault(delay_s=10 * UNIT))
    rest = make_rest(session, fake, clock, timeout_s=4 * UNIT)
    lookup = TitleLookup(rest, breaker=TitleBreaker(failures_to_open=3, open_s=30.0, clock=clock))
    for ticker in ("KXA-1", "KXB-1", "KXC-1"):
        assert await lookup.label_for(ticker) is None
    assert lookup.breaker.state == "open"
    asked = fake.counts.total()
    # Open: alerts get the ticker at once, and Kalshi is not asked.
    assert await lookup.label_for("KXNFLGAME-26NOV01KCBUF-KC") is None
    lookup.prefetch("KXNFLGAME-26NOV01KCBUF-BUF")
    assert fake.counts.total() == asked
    assert (lookup.skipped_breaker, lookup.skipped_recent_failure) == (1, 0)
    clock.now += 30
    label = await lookup.label_for("KXNFLGAME-26NOV01KCBUF-KC")  # the probe
    assert label is not None
    assert lookup.breaker.state == "closed"
    names = [e["event"] for e in logs if e["event"].startswith("title_")]
    assert names == ["title_lookup_failed"] * 3 + [
        "title_lookups_paused",
        "title_skipped_paused",
        "title_lookups_resumed",
    ]
    await lookup.aclose()


async def test_an_untitled_post_is_logged_once_per_pause_and_counted(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    breaker = TitleBreaker(failures_to_open=1, open_s=30.0, clock=clock)
    lookup = TitleLookup(make_rest(session, fake, clock), breaker=breaker)
    breaker.record(ok=False, reason="timeout")  # the first pause
    for n in range(3):
        assert await lookup.label_for(f"KXA-{n}") is None
    clock.now += 30
    assert breaker.allow()  # the probe fails: the same pause goes on
    breaker.record(ok=False, reason="timeout")
    assert await lookup.label_for("KXA-3") is None
    clock.now += 30
    assert breaker.allow()
    breaker.record(ok=True)
    breaker.record(ok=False, reason="server_error")  # a second pause
    for n in range(4, 6):
        assert await lookup.label_for(f"KXA-{n}") is None
    assert fake.counts.total() == 0
    skipped = [e for e in logs if e["event"] == "title_skipped_paused"]
    assert [e["ticker"] for e in skipped] == ["KXA-0", "KXA-4"]
    assert all(set(e) == {"event", "log_level", "ticker", "hint"} for e in skipped)  # no title text, no market
    assert lookup.stats_fields() == {
        "title_lookups_failed": 0,
        "titles_skipped_breaker": 6,
        "titles_skipped_recent_failure": 0,
        "title_breaker_opened": 2,
    }
    assert TitleLookup(None).stats_fields() == {}  # titles not looked up: no title counts on the stats line


async def test_a_404_is_an_answer_not_a_reason_to_pause(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    rest = make_rest(session, fake, clock)
    lookup = TitleLookup(rest, breaker=TitleBreaker(failures_to_open=2, clock=clock))
    for n in range(4):
        assert await lookup.label_for(f"KXGONE-{n}") is None
    assert lookup.breaker.state == "closed"
    assert lookup.failures == 4
    await lookup.aclose()


async def test_disabled_lookup_asks_nothing() -> None:
    lookup = TitleLookup(None)
    lookup.prefetch("KXA-1")
    assert await lookup.label_for("KXA-1") is None


async def test_aclose_cancels_background_lookups(fake: FakeKalshiRest, session: aiohttp.ClientSession) -> None:
    nfl(fake)
    fake.delay_s["event"] = 100 * UNIT
    lookup = TitleLookup(KalshiRest(session, fake.base_url, timeout_s=200 * UNIT))
    await stop_waiting(lookup, "KXNFLGAME-26NOV01KCBUF-KC", UNIT)
    lookup.prefetch("KXNFLGAME-26NOV01KCBUF-BUF")
    await lookup.aclose()
    assert lookup._running == {}


async def fake_wait(condition: Callable[[], bool], timeout_s: float = 100 * UNIT) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110  (polls the fake's counters, which have no event of their own)
            await asyncio.sleep(UNIT / 5)


# ---------------------------------------------------------------------------------------------------------------
# Trades pager

T0_S = 1_788_000_000


def tape(count: int, *, start_s: int = T0_S, step_ms: int = 250) -> list[dict[str, Any]]:
    return [
        rest_trade(f"id-{n:05d}", "KXA-1" if n % 3 else "KXB-2", ts_ms=start_s * 1000 + n * step_ms, count="5.00")
        for n in range(count)
    ]


async def collect(rest: KalshiRest, min_ts_s: int, max_ts_s: int, **kwargs: Any) -> list[list[dict[str, Any]]]:
    return [page async for page in rest.iter_trades(min_ts_s, max_ts_s, **kwargs)]


async def test_pages_over_several_cursors(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    trades = tape(2500)
    fake.add_trades(reversed(trades))  # any order in
    rest = make_rest(session, fake, clock)
    pages = await collect(rest, T0_S, T0_S + 10_000, limit=1000)
    assert [len(p) for p in pages] == [1000, 1000, 500]
    ids = [t["trade_id"] for page in pages for t in page]
    assert ids == [t["trade_id"] for t in reversed(trades)]  # newest first, each once
    assert fake.counts == {"trades": 3}
    cursors = [r.query.get("cursor") for r in fake.requests]
    assert cursors[0] is None
    assert all(cursors[1:]) and len(set(cursors[1:])) == 2
    # Every page is the same trade records the live path normalizes.
    assert trade_from_fields(pages[0][0]).ts_ms == (T0_S * 1000) + 2499 * 250


async def test_window_bounds_are_whole_seconds(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake.add_trades(tape(40))  # 4 trades a second for 10 s
    rest = make_rest(session, fake, clock)
    pages = await collect(rest, T0_S + 2, T0_S + 4, limit=5)
    trades = [t for page in pages for t in page]
    assert len(trades) == 12  # seconds 2, 3 and 4
    assert [len(p) for p in pages] == [5, 5, 2]


async def test_ticker_filter(fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    fake.add_trades(tape(30))
    rest = make_rest(session, fake, clock)
    pages = await collect(rest, T0_S, T0_S + 100, limit=1000, ticker="KXB-2")
    assert {t["ticker"] for page in pages for t in page} == {"KXB-2"}
    assert sum(len(p) for p in pages) == 10


async def test_trades_added_while_paging_do_not_shift_pages(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    trades = tape(300)
    fake.add_trades(trades)
    rest = make_rest(session, fake, clock)
    seen: list[str] = []
    async for page in rest.iter_trades(T0_S, T0_S + 10_000, limit=100):
        seen.extend(t["trade_id"] for t in page)
        if len(seen) == 100:  # the live tape grows between two pages
            fake.add_trades([rest_trade("late", "KXA-1", ts_ms=(T0_S + 500) * 1000)])
    assert seen == [t["trade_id"] for t in reversed(trades)]


async def test_pager_raises_when_a_page_cannot_be_had(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    fake.add_trades(tape(1500))
    fake.script("trades", Fault(), 503)  # the first page arrives, then the server fails
    rest = make_rest(session, fake, clock)
    pages: list[list[dict[str, Any]]] = []
    with pytest.raises(KalshiRestError) as caught:
        async for page in rest.iter_trades(T0_S, T0_S + 10_000):
            pages.append(page)
    assert [len(p) for p in pages] == [1000]
    assert (caught.value.reason, caught.value.path) == ("server_error", "/markets/trades")


async def test_empty_window(fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    fake.add_trades(tape(10))
    rest = make_rest(session, fake, clock)
    assert await collect(rest, T0_S + 100, T0_S + 200) == []
    assert fake.counts == {"trades": 1}


async def test_bad_pager_arguments(fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock) -> None:
    rest = make_rest(session, fake, clock)
    with pytest.raises(ValueError, match="limit"):
        await collect(rest, T0_S, T0_S + 1, limit=1001)
    with pytest.raises(ValueError, match="min_ts_s"):
        await collect(rest, T0_S + 1, T0_S)


async def test_a_probe_that_ends_in_an_unexpected_error_still_gives_the_breaker_its_verdict(
    fake: FakeKalshiRest, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    # A half-open breaker that never hears how its probe went would keep titles off for the rest of the run.
    nfl(fake)
    fake.script("event", 503, 503, 503, Fault(body=b"[" * 100_000))  # the probe's answer: nesting past any limit
    rest = make_rest(session, fake, clock)
    lookup = TitleLookup(rest, breaker=TitleBreaker(failures_to_open=3, open_s=30.0, clock=clock))
    for ticker in ("KXA-1", "KXB-1", "KXC-1"):
        assert await lookup.label_for(ticker) is None
    assert lookup.breaker.state == "open"
    clock.now += 30
    await lookup.label_for("KXNFLGAME-26NOV01KCBUF-KC")  # the probe meets the hostile answer
    assert lookup.breaker.state != "probing"  # a verdict either way (the bounded decoder calls it a bad answer)
    clock.now += 30
    assert await lookup.label_for("KXNFLGAME-26NOV01KCBUF-BUF") is not None
    assert lookup.breaker.state == "closed"
    await lookup.aclose()
