"""Hostile input (issue 9): each numbered attack of the issue as a test, plus a property test over generated
hostile frames. Each test is the attack itself and asserts what the daemon does with it instead of what it did.

Item 7 (`"seq": "2"`) lives with the other sequence tests in tests/test_stream.py
(`test_frames_without_a_readable_seq_are_skipped_and_gaps_after_them_still_found`). Items 3, 5, 6, 10, 14 and 16
(X headers, state directory, disk, recorder, status, file permissions) are tested with the store and poster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_kalshi import FakeSession, KeyPair, kalshi_keys, rsa_private_key, trade_msg  # noqa: F401
from tests.fake_kalshi_rest import FakeKalshiRest
from tests.test_stream import Client, server_for, signer_for
from valshi_x import pipeline as pipeline_module
from valshi_x.backoff import Backoff
from valshi_x.config import load_settings
from valshi_x.daemon import CHECKPOINT_NAME, Daemon, RunOptions
from valshi_x.decode import MAX_FRAME_BYTES, MAX_REST_BODY_BYTES, DecodeRefused, decode_json
from valshi_x.kalshi import stream as stream_module
from valshi_x.kalshi.auth import KalshiSigner, load_private_key
from valshi_x.kalshi.rest import KalshiRest, KalshiRestError, TitleLookup
from valshi_x.logs import LogFormat, configure_logging
from valshi_x.pipeline import MAX_NOTED_TYPES, Pipeline
from valshi_x.runmode import Tuning
from valshi_x.sanitize import clean_log_text, find_link
from valshi_x.store import Store, db_path, wall_ms
from valshi_x.trades import FUTURE_TOLERANCE_MS, MalformedTrade, Trade, fast_trade_frame, parse_frame
from valshi_x.whales import Alert, WhaleDetector
from valshi_x.x.poster import OutcomeKind, SendResult, classify, post_renderer
from valshi_x.x.text import render_post


def fast_trade(raw: str | bytes) -> Trade | None:
    """The trade the fast decode makes of a raw frame (None: the careful path decides)."""
    typed = fast_trade_frame(raw)
    return typed.msg if typed is not None else None


NOW_MS = 1_793_000_000_000  # the tests' wall clock
THRESHOLD = Decimal(100000)
WINDOW_MS = 1000
BIDI_AND_FRIENDS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
SEPARATORS = "\u2028\u2029\x85\r\n\x0b\x0c\x1c\x1d\x1e"


def frame_of(msg: dict[str, Any], **envelope: Any) -> str:
    return json.dumps({"type": "trade", "sid": 1, "seq": 1, **envelope, "msg": msg})


def msg_at(ts_ms: int, **fields: Any) -> dict[str, Any]:
    return trade_msg(ts_ms=ts_ms, **fields)


def live_pipeline(now_ms: int = NOW_MS, **detector: Any) -> tuple[Pipeline, list[float]]:
    """A live pipeline on a fixed wall clock and a hand-moved monotonic clock (`clock[0]`, seconds)."""
    clock = [0.0]
    pipeline = Pipeline(
        WhaleDetector(THRESHOLD, WINDOW_MS, **detector), monotonic=lambda: clock[0], now_ms=lambda: now_ms
    )
    return pipeline, clock


def replay_pipeline(**detector: Any) -> Pipeline:
    return Pipeline(WhaleDetector(THRESHOLD, WINDOW_MS, **detector), replay=True)


@pytest.fixture
def fresh_loggers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh module loggers, so neither a logger cached by an earlier logging set-up nor one cached here leaks."""
    monkeypatch.setattr(pipeline_module, "log", structlog.get_logger("valshi_x.pipeline"))
    monkeypatch.setattr(stream_module, "log", structlog.get_logger("valshi_x.kalshi.stream"))


@pytest.fixture
def captured(fresh_loggers: None) -> Iterator[list[MutableMapping[str, Any]]]:
    """The events the pipeline and the stream log during the test."""
    with structlog.testing.capture_logs() as events:
        yield events


def reasons(events: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["reason"] for e in events if e["event"] == "malformed_frame"]


# ---------------------------------------------------------------------------------------------------------------
# Item 1: a trade stamped in the future


def test_item1_a_trade_ahead_of_the_wall_clock_is_future_time_and_the_next_sweep_stays_whole(
    captured: list[MutableMapping[str, Any]],
) -> None:
    pipeline, clock = live_pipeline()
    assert pipeline.on_frame(json.loads(frame_of(msg_at(NOW_MS + 5_000, ticker="KXOTHER")))) == []
    (bad,) = [e for e in captured if e["event"] == "malformed_frame"]
    assert bad["reason"] == "future_time"
    assert pipeline.detector.watermark_ms == 0  # the clock did not move

    # Three fills of $60k, 300 ms apart, ticking the group closer in between like the daemon does.
    alerts: list[Alert] = []
    for i in range(3):
        alerts += pipeline.on_frame(
            json.loads(frame_of(msg_at(NOW_MS - 1_000 + 300 * i, count="120000.00", yes_price="0.5")))
        )
        clock[0] += 0.3
        alerts += pipeline.close_due(100)
    alerts += pipeline.flush()
    (alert,) = alerts
    assert (alert.value_usd, alert.fills) == (Decimal("180000.00000000"), 3)


async def test_item1_live_daemon_a_frame_an_hour_ahead_moves_neither_sweep_nor_backfill_nor_checkpoint(
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The whole attack on the real daemon: loopback Kalshi (WebSocket and REST), durable state, a reconnect."""
    sent_at_ms = wall_ms()
    sweep = [
        msg_at(sent_at_ms - 1_000 + 300 * i, ticker="KXBIG-1", count="120000.00", yes_price="0.5") for i in range(3)
    ]

    async def first(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trade(sweep[0])
        await session.send_trade(msg_at(sent_at_ms + 3_600_000, ticker="KXOTHER-1"))  # between two fills
        await session.send_trades(sweep[1:], pause_s=0.3)  # 300 ms apart in real time too
        await asyncio.sleep(2.0)  # the sweep closes on the stream clock
        await session.drop()

    async def second(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.wait_closed()

    async with (
        server_for(kalshi_keys, attempts=[first, second]) as kalshi,
        FakeKalshiRest() as rest,
    ):
        settings = load_settings(
            {
                "KALSHI_WS_URL": kalshi.url,
                "KALSHI_API_URL": rest.base_url,
                "KALSHI_API_KEY_ID": kalshi_keys.key_id,
                "KALSHI_PRIVATE_KEY_PATH": str(kalshi_keys.pkcs8_path),
                "STATS_INTERVAL_S": "3600",
            },
            need_x=False,
        )
        signer = KalshiSigner(settings.kalshi_api_key_id, load_private_key(settings.kalshi_private_key_path, None))
        fast = Tuning(reconnect_backoff=Backoff(initial_s=0.05, factor=2.0, cap_s=0.2), ws_ping_interval_s=None)
        daemon = Daemon(settings, RunOptions(dry_run=True, state_dir=tmp_path / "state"), signer=signer, tuning=fast)
        with structlog.testing.capture_logs() as events:
            run = asyncio.create_task(daemon.run())
            async with asyncio.timeout(30):
                while not any(e["event"] == "backfill_done" for e in events):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            daemon.stop.set()
            await run
    stopped_at_ms = wall_ms()

    posted = [(e["value_usd"], e["fills"]) for e in events if e["event"] == "would_post"]
    assert posted == [("180000.00", 3)]  # one sweep, whole (it was $120,000 of 2 fills)
    for done in (e for e in events if e["event"] == "backfill_done"):  # the reconnect's window is this hour
        assert datetime.fromisoformat(done["to_time"]).timestamp() * 1000 <= stopped_at_ms + 5_000
    store = await Store.open(db_path(tmp_path / "state"))
    checkpoint = await store.get_checkpoint(CHECKPOINT_NAME)
    await store.close()
    assert checkpoint is not None and int(checkpoint) <= stopped_at_ms + FUTURE_TOLERANCE_MS
    assert [e["reason"] for e in events if e["event"] == "malformed_frame"] == ["future_time"]


def test_item1_a_rest_trade_ahead_of_the_wall_clock_is_future_time_too(
    captured: list[MutableMapping[str, Any]],
) -> None:
    pipeline, _ = live_pipeline()
    rest = {k: v for k, v in msg_at(NOW_MS).items() if k not in {"market_ticker", "ts", "ts_ms"}}
    rest |= {"ticker": "KXA-1", "created_time": "2026-10-26T08:33:20.000Z"}  # NOW_MS + 1 h
    assert pipeline.on_rest_trade(rest) == []
    assert reasons(captured) == ["future_time"]
    assert pipeline.detector.watermark_ms == 0
    assert pipeline.detector.processed_through_ms() <= NOW_MS  # the checkpoint derives from this


def test_item1_within_the_tolerance_a_trade_is_taken() -> None:
    pipeline, _ = live_pipeline()
    pipeline.on_frame(json.loads(frame_of(msg_at(NOW_MS + FUTURE_TOLERANCE_MS))))
    assert pipeline.counts.trades == 1
    assert pipeline.detector.watermark_ms == NOW_MS + FUTURE_TOLERANCE_MS


def test_item1_a_replay_with_one_frame_an_hour_ahead_keeps_its_clock_and_its_pruning(
    captured: list[MutableMapping[str, Any]],
) -> None:
    pipeline = replay_pipeline(dedup_horizon_ms=10_000, late_fill_horizon_ms=0)
    start_ms = NOW_MS - 3_600_000
    lines = [frame_of(msg_at(start_ms + 20 * i)) for i in range(3_000)]  # one minute of trades
    lines[1_500] = frame_of(msg_at(start_ms + 3_600_000 + 1_500 * 20))
    for line in lines:
        pipeline.on_raw(line)
        # The clock is the capture's own time: never more than the tolerance past its newest believed trade.
        assert pipeline.detector.watermark_ms <= start_ms + 60_000
    assert reasons(captured) == ["future_time"]
    assert pipeline.counts.trades == 2_999
    assert pipeline.detector.watermark_ms == start_ms + 2_999 * 20
    # Ids older than the ten-second horizon were forgotten: the hour-ahead frame did not stop the pruning.
    assert len(pipeline.detector.seen) <= 12 * 50


def test_item1_a_replay_believes_a_leap_that_the_next_trades_confirm() -> None:
    pipeline = replay_pipeline()
    later_ms = NOW_MS + 3_600_000  # a recording resumed an hour later
    for ts_ms in (NOW_MS, NOW_MS + 10, later_ms, later_ms + 10, later_ms + 20):
        pipeline.on_raw(frame_of(msg_at(ts_ms)))
    assert pipeline.counts.malformed == 0
    assert pipeline.counts.trades == 5
    assert pipeline.detector.watermark_ms == later_ms + 20


def test_item1_a_replay_whose_first_frame_is_an_hour_ahead_starts_from_the_real_trades() -> None:
    pipeline = replay_pipeline()
    pipeline.on_raw(frame_of(msg_at(NOW_MS + 3_600_000)))
    for i in range(5):
        pipeline.on_raw(frame_of(msg_at(NOW_MS + 10 * i)))
    pipeline.flush()
    assert (pipeline.counts.trades, pipeline.counts.malformed) == (5, 1)
    assert pipeline.detector.watermark_ms == NOW_MS + 40


# ---------------------------------------------------------------------------------------------------------------
# Item 2: "[" x 1000 in one frame, a REST page or a title answer

DEEP = "[" * 1000 + "]" * 1000


def test_item2_a_deeply_nested_line_is_a_malformed_frame_not_a_crash() -> None:
    pipeline, _ = live_pipeline()
    deep_field = frame_of(msg_at(NOW_MS)).replace('"ts_ms"', '"junk":' + "[" * 3000 + "]" * 3000 + ',"ts_ms"')
    for raw in (DEEP, DEEP.encode(), deep_field):
        assert pipeline.on_raw(raw) == []
    nested_junk = '{"type":"trade","msg":' + '{"a":' * 2000 + "1" + "}" * 2000 + "}"
    assert pipeline.on_raw(nested_junk) == []
    assert pipeline.counts.malformed == 4
    with pytest.raises(MalformedTrade) as caught:
        parse_frame(DEEP)
    assert caught.value.reason == "too_deep"


async def test_item2_a_deep_frame_on_the_socket_is_reported_and_the_stream_goes_on(
    kalshi_keys: KeyPair,  # noqa: F811
) -> None:
    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        for _ in range(3):
            await session.send(DEEP)  # a peer that repeats it
        await session.send_trade()

    async with server_for(kalshi_keys, attempts=[script]) as kalshi:
        client = Client(kalshi.url, signer_for(kalshi_keys))
        client.start()
        await client.wait_for(lambda: len(client.delivered) == 1)
        await client.stop()
    assert [exc.reason for _, exc in client.bad] == ["too_deep"] * 3
    assert len(kalshi.handshakes) == 1  # no reconnect, no restart: the same connection goes on


@pytest.fixture
async def hostile_rest() -> AsyncIterator[tuple[TestServer, dict[str, bytes]]]:
    """A loopback server answering every Kalshi REST path with the body set in `bodies[path]`."""
    bodies: dict[str, bytes] = {}

    async def answer(request: web.Request) -> web.StreamResponse:
        body = bodies.get(request.path.removeprefix("/trade-api/v2"))
        if body is None:
            return web.json_response({"error": "not found"}, status=404)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(body), 1 << 20):
            await response.write(body[start : start + (1 << 20)])
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield server, bodies
    finally:
        await server.close()


def rest_client(http: aiohttp.ClientSession, server: TestServer) -> KalshiRest:
    async def no_sleep(_delay_s: float) -> None:
        return None

    return KalshiRest(http, str(server.make_url("/trade-api/v2")), sleep=no_sleep)


async def test_item2_a_deep_rest_page_or_title_answer_is_a_rest_error(
    hostile_rest: tuple[TestServer, dict[str, bytes]],
) -> None:
    server, bodies = hostile_rest
    bodies["/markets/trades"] = ('{"trades":' + DEEP + ',"cursor":""}').encode()
    bodies["/markets/KXA-1"] = ('{"market":' + "[" * 5000 + "]" * 5000 + "}").encode()
    async with aiohttp.ClientSession() as http:
        rest = rest_client(http, server)
        with pytest.raises(KalshiRestError) as caught:
            async for _ in rest.iter_trades(1, 2):
                pass
        assert (caught.value.reason, caught.value.detail) == ("bad_response", "too_deep")
        with pytest.raises(KalshiRestError) as caught:
            await rest.market_label("KXA-1")
        assert (caught.value.reason, caught.value.detail) == ("bad_response", "too_deep")
        titles = TitleLookup(rest)
        assert await titles.label_for("KXA-1") is None  # the post falls back to the ticker
        await titles.aclose()


def test_item2_a_deep_answer_from_x_is_classified_not_raised() -> None:
    outcome = classify(SendResult(status=503, body=DEEP.encode()))
    assert outcome.kind is OutcomeKind.TRANSIENT


# ---------------------------------------------------------------------------------------------------------------
# Item 4 (and 9 for logs): a log line injected through a ticker


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_structlog = structlog.get_config()
    yield
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    structlog.configure(**saved_structlog)


INJECTED = "KXA-1\u2028<6>posted alert_id=x value_usd=999999.00\u2029\x85\r\n\x1b[2J\u202eevil\ud800"


@pytest.mark.usefixtures("_restore_logging", "fresh_loggers")
@pytest.mark.parametrize("fmt", ["journal", "json", "console"])
def test_item4_a_ticker_cannot_start_a_log_line_of_its_own(fmt: LogFormat) -> None:
    out = io.StringIO()
    configure_logging(fmt, stream=out)
    pipeline, _ = live_pipeline()
    pipeline.on_frame(json.loads(frame_of(msg_at(NOW_MS, ticker=INJECTED, count="0.0000001"))))
    structlog.get_logger("valshi_x.test").info("title_lookup_failed", ticker=INJECTED, nested={INJECTED: [INJECTED]})
    lines = out.getvalue().split("\n")[:-1]  # only "\n" ends a line, as journald reads it
    assert len(lines) == 2
    for line in lines:
        assert line.isprintable()  # no separator, control or bidi character reaches the output
        assert not re.search(r"(^|<\d>)posted ", line.split(" ", 1)[0])
    assert "\\u2028" in lines[1]  # what came in is still visible, escaped


def test_item4_9_clean_log_text_escapes_every_invisible_or_line_breaking_character() -> None:
    for ch in SEPARATORS + BIDI_AND_FRIENDS + "\u200b\u200d\u2060\ufeff\x00\x7f":
        cleaned = clean_log_text(f"a{ch}b")
        assert cleaned.isprintable() and len(cleaned.splitlines()) == 1, repr(ch)
    assert clean_log_text("x" * 10_000).endswith("…[+8000 chars]")


# ---------------------------------------------------------------------------------------------------------------
# Items 8, 9, 11: links and bidi controls in titles; POST_LINKS with an odd series

WHALE = Alert(
    trade_ids=("t1",),
    ticker="KXA-26NOV01-B",
    side="yes",
    contracts=Decimal("250000"),
    value_usd=Decimal("150000"),
    fills=1,
    price_low=Decimal("0.6"),
    price_high=Decimal("0.6"),
    is_block_trade=False,
    first_ts_ms=NOW_MS,
    last_ts_ms=NOW_MS,
)
URL_LIKE = re.compile(r"https?://|[^\s\u2024]\.[^\W\d_]{2}|[\u3002\uff0e\uff61]", re.IGNORECASE)


@pytest.mark.parametrize(
    "title",
    [
        "See https://♥.com/x now",
        "See https://kalshi\u200d.com/x now",
        "kalshi\u200b.com and kalshi\u2060.com",
        "Visit KALSHI.COM or xn--g6h.com",
        "kalshi\u3002com, kalshi\uff0ecom, kalshi\uff61com",
        "http://1.2.3.4/x and ftp://files",
        "evil\u202e.com\u202c ok",
    ],
)
def test_item8_no_link_from_a_title_reaches_a_post(title: str) -> None:
    text = render_post(WHALE, title=title)
    assert find_link(text) is None
    assert not URL_LIKE.search(text), text


def test_item8_the_final_check_refuses_a_link_the_cleaning_did_not_make() -> None:
    with pytest.raises(ValueError, match="link"):
        render_post(WHALE, title=None, template="{value} {time} kalshi.com/markets")
    # The market's own link, asked for with POST_LINKS, is the one link allowed.
    text = render_post(WHALE, title="T", link="https://kalshi.com/markets/kxa")
    assert text.endswith("https://kalshi.com/markets/kxa")
    with pytest.raises(ValueError, match="link"):
        render_post(WHALE, title=None, template="{value} {time} evil.com {link}", link="https://kalshi.com/markets/k")


def test_item9_bidi_controls_in_a_title_never_reach_a_post() -> None:
    text = render_post(WHALE, title=f"Who wins{BIDI_AND_FRIENDS} the\u2028game?\x85")
    assert not any(ch in text for ch in BIDI_AND_FRIENDS + SEPARATORS.replace("\n", ""))
    assert "Who wins the game?" in text


@pytest.mark.parametrize("ticker", ["KX$ODD-1", "../etc-1", "KX.COM-1", "KX" * 100 + "-1", "KX\u202eA-1"])
def test_item11_post_links_with_an_odd_series_posts_without_a_link(ticker: str) -> None:
    render = post_renderer("", post_links=True)
    text = render(dataclasses.replace(WHALE, ticker=ticker), None)
    assert "$150,000" in text
    assert find_link(text) is None


# ---------------------------------------------------------------------------------------------------------------
# Item 12: length bounds


@pytest.mark.usefixtures("_restore_logging", "fresh_loggers")
def test_item12_a_ten_million_digit_price_is_refused_at_once_with_a_short_log_line() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)
    pipeline, _ = live_pipeline()
    raw = frame_of(msg_at(NOW_MS, yes_price="0.5")).replace('"0.5000"', '"0.' + "5" * 10_000_000 + '"')
    started = time.perf_counter()
    assert pipeline.on_raw(raw) == []
    assert time.perf_counter() - started < 2.0  # generous: it is a length check
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["reason"] == "too_large"
    assert len(line) < 2_000


def test_item12_a_megabyte_ticker_is_refused_in_a_frame_and_in_a_rest_trade(
    captured: list[MutableMapping[str, Any]],
) -> None:
    pipeline, _ = live_pipeline()
    big = "KX" + "A" * 1_000_000
    started = time.perf_counter()
    pipeline.on_raw(frame_of(msg_at(NOW_MS, ticker=big)))
    rest = {k: v for k, v in msg_at(NOW_MS).items() if k not in {"market_ticker", "ts", "ts_ms"}}
    pipeline.on_rest_trade(rest | {"ticker": big, "created_time": "2026-10-26T07:33:20.000Z"})
    pipeline.on_rest_trade(rest | {"ticker": "KX-1", "created_time": "2" * 1_000_000})
    assert time.perf_counter() - started < 2.0
    assert reasons(captured) == ["too_large", "ticker_too_long", "bad_time"]
    with pytest.raises(DecodeRefused, match="too_large"):
        decode_json(b" " * (MAX_FRAME_BYTES + 1), max_bytes=MAX_FRAME_BYTES)


async def test_item12_a_rest_body_past_the_limit_is_not_read_to_its_end(
    hostile_rest: tuple[TestServer, dict[str, bytes]],
) -> None:
    server, bodies = hostile_rest
    bodies["/markets/trades"] = b'{"trades":[],"cursor":"' + b"x" * (MAX_REST_BODY_BYTES + 1) + b'"}'
    async with aiohttp.ClientSession() as http:
        rest = rest_client(http, server)
        with pytest.raises(KalshiRestError) as caught:
            async for _ in rest.iter_trades(1, 2):
                pass
    assert caught.value.reason == "bad_response"
    assert "body over" in caught.value.detail


async def test_item12_a_megabyte_title_is_cut_before_it_is_cached(
    hostile_rest: tuple[TestServer, dict[str, bytes]],
) -> None:
    server, bodies = hostile_rest
    market = {"ticker": "KXA-1", "event_ticker": "KXA", "title": "Will it? " * 500_000, "yes_sub_title": ""}
    event = {"event_ticker": "KXA", "series_ticker": "KXA", "title": "Who? " * 500_000, "sub_title": ""}
    bodies["/markets/KXA-1"] = json.dumps({"market": market}).encode()
    bodies["/events/KXA"] = json.dumps({"event": event, "markets": [market]}).encode()
    async with aiohttp.ClientSession() as http:
        label = await rest_client(http, server).market_label("KXA-1")
    assert 0 < len(label.title) <= 1_000


# ---------------------------------------------------------------------------------------------------------------
# Item 13: precision and impossible prices


def whale_total(*fills: tuple[str, str]) -> list[Alert]:
    """Alerts from one sweep of (count_fp, yes_price) fills on one ticker and side, through both decode paths."""
    pipeline, _ = live_pipeline()
    alerts: list[Alert] = []
    for i, (count, price) in enumerate(fills):
        msg = msg_at(NOW_MS - 500 + i, trade_id=f"f{i}")
        msg |= {"count_fp": count, "yes_price_dollars": price, "no_price_dollars": str(1 - Decimal(price))}
        alerts += pipeline.on_raw(frame_of(msg))
    return alerts + pipeline.flush()


def test_item13_the_threshold_is_exact_to_the_cent() -> None:
    (exactly,) = whale_total(("200000.00", "0.5000"))
    assert exactly.value_usd == Decimal("100000.00")
    assert whale_total(("199999.98", "0.5000")) == []  # $99,999.99
    (summed,) = whale_total(("66666.67", "0.500000"), ("66666.66", "0.500000"), ("66666.67", "0.500000"))
    assert summed.value_usd == Decimal("100000.00")


def test_item13_a_count_beyond_the_decimals_kalshi_sends_is_refused_not_rounded_up_to_a_whale(
    captured: list[MutableMapping[str, Any]],
) -> None:
    assert whale_total(("199999.9999999999999999999999999", "0.50")) == []
    pipeline, _ = live_pipeline()
    pipeline.on_raw(frame_of(msg_at(NOW_MS) | {"count_fp": "199999.9999999999999999999999999"}))
    pipeline.on_raw(frame_of(msg_at(NOW_MS) | {"count_fp": "199999.9999999"}))
    assert reasons(captured) == ["too_precise"] * 3  # whale_total's, then these two


@pytest.mark.parametrize(
    "price",
    ["-0", "0", "0E+999999999", "1E-999999999", "NaN", "sNaN", "Infinity", "-Infinity", "1", "1.0", "0.1234567"],
)
def test_item13_impossible_prices_are_refused(price: str) -> None:
    msg = msg_at(NOW_MS) | {"yes_price_dollars": price}
    assert fast_trade(frame_of(msg)) is None
    pipeline, _ = live_pipeline()
    pipeline.on_raw(frame_of(msg))
    assert (pipeline.counts.trades, pipeline.counts.malformed) == (0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Item 15: per-frame warnings are rate-limited, unknown frame types a bounded set


async def test_item15_swapped_seq_numbers_give_a_few_warnings_not_one_per_frame(
    kalshi_keys: KeyPair,  # noqa: F811
    captured: list[MutableMapping[str, Any]],
) -> None:
    frames = 2_000

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        for pair in range(frames // 2):
            for seq in (2 * pair + 2, 2 * pair + 1):
                await session.send({"type": "trade", "sid": session.sid, "seq": seq, "msg": trade_msg()})

    async with server_for(kalshi_keys, attempts=[script]) as kalshi:
        client = Client(kalshi.url, signer_for(kalshi_keys))
        client.start()
        await client.wait_for(lambda: len(client.delivered) == frames, timeout_s=60)
        await client.stop()
    warnings = [e for e in captured if e["event"].startswith("ws_seq_")]
    assert client.stream.gaps >= frames // 2 - 1  # still counted and reported for backfill
    assert len(warnings) <= 2 * 20


def test_item15_unknown_frame_types_are_a_bounded_set(captured: list[MutableMapping[str, Any]]) -> None:
    pipeline, _ = live_pipeline()
    for i in range(10_000):
        pipeline.on_frame({"type": f"kind-{i}"})
    assert pipeline.counts.unknown == 10_000
    assert len([e for e in captured if e["event"] == "unknown_frame_type"]) == MAX_NOTED_TYPES


def test_item15_a_malformed_storm_is_counted_not_printed(captured: list[MutableMapping[str, Any]]) -> None:
    pipeline, _ = live_pipeline()
    for _ in range(2_000):
        pipeline.on_raw("{not json")
    assert len(captured) == 20
    assert (pipeline.counts.malformed, pipeline.counts.malformed_unlogged) == (2_000, 1_980)


# ---------------------------------------------------------------------------------------------------------------
# Property: generated hostile frames never raise, stay fast, and every alert's value is exact

HOSTILE_NUMBERS = st.sampled_from(
    [
        "-0",
        "0",
        "0E+999999999",
        "1E-999999999",
        "NaN",
        "Infinity",
        "1e400",
        "0.5",
        "0.123456",
        "0.1234567",
        "199999.9999999999999999999999999",
        "100000.00",
        "1000000000",
        "1000000000.000001",
        "9" * 400,
        "0." + "3" * 5_000,
    ]
) | st.decimals(min_value=Decimal("0.000001"), max_value=Decimal(10**9), places=6).map(str)
HOSTILE_TEXT = st.text(
    alphabet=st.sampled_from(list("KXA-.:/ 19") + list(BIDI_AND_FRIENDS + SEPARATORS + "\u200d♥\x00\ud800")),
    max_size=40,
) | st.just("K" * 100_000)
HOSTILE_TIMES = st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers(
    min_value=NOW_MS - 600_000, max_value=NOW_MS + 7_200_000
)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def hostile_lines(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """One capture line: mostly a trade frame with some fields replaced by hostile values, sometimes worse."""
    kind = draw(st.sampled_from(["trade", "trade", "trade", "deep", "junk"]))
    if kind == "deep":
        depth = draw(st.integers(min_value=1, max_value=3_000))
        return "[" * depth + "]" * depth, {}
    if kind == "junk":
        return json.dumps({"type": draw(JUNK), "seq": draw(JUNK), "msg": draw(JUNK)}), {}
    # A trade comes back as ("", msg): the test gives it a unique trade id and renders it.
    msg = msg_at(draw(st.integers(min_value=NOW_MS - 5_000, max_value=NOW_MS)))
    msg["market_ticker"] = draw(st.sampled_from(["KXA-1", "KXB-1"]))
    msg["count_fp"] = draw(st.sampled_from(["100000.00", "150000.50", "33333.33"]))
    for name, values in (
        ("yes_price_dollars", HOSTILE_NUMBERS),
        ("no_price_dollars", HOSTILE_NUMBERS),
        ("count_fp", HOSTILE_NUMBERS),
        ("market_ticker", HOSTILE_TEXT),
        ("ts_ms", HOSTILE_TIMES),
        ("taker_outcome_side", JUNK),
    ):
        if draw(st.integers(0, 4)) == 0:
            msg[name] = draw(values)
    msg["_seq"] = draw(JUNK)
    return "", msg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(hostile_lines(), min_size=1, max_size=12), st.booleans())
def test_property_hostile_frames_never_raise_stay_fast_and_keep_values_exact(
    lines: list[tuple[str, dict[str, Any]]], replay: bool
) -> None:
    pipeline = replay_pipeline() if replay else live_pipeline()[0]
    raws, sent = [], {}
    for i, (raw, msg) in enumerate(lines):
        if msg:
            fields = {k: v for k, v in msg.items() if k != "_seq"} | {"trade_id": f"id{i}"}
            sent[f"id{i}"] = fields
            raw = frame_of(fields, seq=msg["_seq"])  # noqa: PLW2901
        raws.append(raw)
    alerts: list[Alert] = []
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory(), cache_logger_on_first_use=False)
    try:
        for raw in raws:
            started = time.perf_counter()
            alerts += pipeline.on_raw(raw)
            assert time.perf_counter() - started < 1.0  # generous: every bound is a length or a count
        alerts += pipeline.flush()
    finally:
        structlog.reset_defaults()
    for alert in alerts:
        exact = Fraction(0)
        for trade_id in alert.trade_ids:
            msg = sent[trade_id]
            price = msg["yes_price_dollars"] if alert.side == "yes" else msg["no_price_dollars"]
            exact += Fraction(msg["count_fp"]) * Fraction(price)
        assert Fraction(alert.value_usd) == exact  # never rounded
        assert exact >= THRESHOLD


def test_the_property_test_can_see_an_alert() -> None:
    # A guard on the property test above: frames of its shape do make alerts, so "exact" is really checked there.
    (alert,) = whale_total(("150000.50", "0.9000"))
    assert alert.value_usd == Decimal("135000.450000")


@pytest.mark.parametrize(
    "body",
    [b"[" + b"{}," * 2_700_000 + b"{}]", b"[" + b"[[1]]," * 1_300_000 + b"1]"],
    ids=["empty_objects", "nested_pairs"],
)
def test_item12_a_body_of_millions_of_containers_is_refused_unread(body: bytes) -> None:
    # Decoding (or scanning in Python) millions of tiny containers held the event loop for seconds; the count of
    # brackets, taken at C speed, refuses it before anything is decoded.
    with pytest.raises(DecodeRefused) as caught:
        decode_json(body, max_bytes=MAX_REST_BODY_BYTES)
    assert caught.value.reason == "too_large"


def test_item2_nesting_is_judged_on_the_decoded_shape() -> None:
    assert decode_json(b"[" * 32 + b"1" + b"]" * 32, max_bytes=MAX_FRAME_BYTES) is not None
    with pytest.raises(DecodeRefused, match="too_deep"):
        decode_json(b"[" * 33 + b"1" + b"]" * 33, max_bytes=MAX_FRAME_BYTES)
    # Brackets inside strings are no nesting.
    assert decode_json(b'["' + b"[" * 500 + b'"]', max_bytes=MAX_FRAME_BYTES) == ["[" * 500]
