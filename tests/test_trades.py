"""The normalizer: today's frames, legacy frames, REST trades, and every kind of bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valshi_x.trades import (
    MalformedTrade,
    Trade,
    fast_trade_frame,
    parse_frame,
    trade_from_fields,
    trade_from_frame,
)


def fast_trade(raw: str | bytes) -> Trade | None:
    """The trade the fast decode makes of a raw frame (None: the careful path decides)."""
    typed = fast_trade_frame(raw)
    return typed.msg if typed is not None else None


TODAY: dict[str, Any] = {
    "trade_id": "d91bc706-ee49-470d-82d8-11418bda6fed",
    "market_ticker": "KXNFLGAME-26NOV01KCBUF-KC",
    "yes_price_dollars": "0.6200",
    "no_price_dollars": "0.3800",
    "count_fp": "147.53",
    "taker_outcome_side": "no",
    "taker_book_side": "ask",
    "taker_side": "no",
    "is_block_trade": False,
    "ts": 1793000000,
    "ts_ms": 1793000000123,
}


def frame(**changes: Any) -> dict[str, Any]:
    msg = {**TODAY, **changes}
    return {"type": "trade", "sid": 3, "seq": 9, "msg": {k: v for k, v in msg.items() if v is not ...}}


def test_todays_frame_is_read_exactly() -> None:
    trade = trade_from_frame(frame())
    assert trade == Trade(
        trade_id=TODAY["trade_id"],
        ticker="KXNFLGAME-26NOV01KCBUF-KC",
        yes_price_text="0.6200",
        no_price_text="0.3800",
        count_text="147.53",
        taker_side="no",
        is_block_trade=False,
        ts_ms=1793000000123,
    )
    assert trade.created_time == datetime(2026, 10, 26, 7, 33, 20, 123000, tzinfo=UTC)
    assert trade.value_usd == Decimal("56.0614")  # 147.53 x 0.38, the NO side's price


@pytest.mark.parametrize(
    ("changes", "side"),
    [
        ({}, "no"),
        ({"taker_outcome_side": "yes", "taker_book_side": "ask"}, "yes"),  # the canonical field wins
        ({"taker_outcome_side": ..., "taker_book_side": "bid"}, "yes"),
        ({"taker_outcome_side": ..., "taker_book_side": "ask", "taker_side": "yes"}, "no"),
        ({"taker_outcome_side": ..., "taker_book_side": ..., "taker_side": "yes"}, "yes"),
    ],
)
def test_side_precedence(changes: dict[str, Any], side: str) -> None:
    assert trade_from_frame(frame(**changes)).taker_side == side


@pytest.mark.parametrize(
    ("changes", "ts_ms"),
    [({}, 1793000000123), ({"ts_ms": ...}, 1793000000000), ({"ts_ms": ..., "ts": 1793000001.5}, 1793000001500)],
)
def test_time_falls_back_to_seconds(changes: dict[str, Any], ts_ms: int) -> None:
    assert trade_from_frame(frame(**changes)).ts_ms == ts_ms


def test_six_decimal_and_three_decimal_prices() -> None:
    trade = trade_from_frame(frame(yes_price_dollars="0.123456", no_price_dollars="0.360"))
    assert (trade.yes_price_dollars, trade.no_price_dollars) == (Decimal("0.123456"), Decimal("0.360"))


def test_missing_no_price_is_the_complement() -> None:
    assert trade_from_frame(frame(no_price_dollars=...)).no_price_dollars == Decimal("0.3800")


def test_legacy_integer_frame_is_understood_in_cents() -> None:
    legacy = {
        "type": "trade",
        "msg": {
            "trade_id": "legacy-1",
            "market_ticker": "KXBTC-25DEC31-T100000",
            "yes_price": 36,
            "no_price": 64,
            "count": 250,
            "taker_side": "yes",
            "ts": 1735000000,
        },
    }
    trade = trade_from_frame(legacy)
    assert (trade.yes_price_dollars, trade.no_price_dollars, trade.count_fp) == (
        Decimal("0.36"),
        Decimal("0.64"),
        Decimal(250),
    )
    assert trade.value_usd == Decimal("90.00")


def test_fixed_point_fields_win_over_legacy_ones() -> None:
    trade = trade_from_frame(frame(yes_price=99, no_price=1, count=5))
    assert (trade.yes_price_dollars, trade.count_fp) == (Decimal("0.6200"), Decimal("147.53"))


def test_rest_trade_uses_ticker_and_created_time() -> None:
    rest = {k: v for k, v in TODAY.items() if k not in {"market_ticker", "ts", "ts_ms"}}
    rest |= {"ticker": "KXNFLGAME-26NOV01KCBUF-KC", "created_time": "2026-09-01T01:46:15.690388Z"}
    trade = trade_from_fields(rest)
    assert trade.ticker == "KXNFLGAME-26NOV01KCBUF-KC"
    assert trade.created_time == datetime(2026, 9, 1, 1, 46, 15, 690000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"trade"', "not_an_object"),
    ],
)
def test_undecodable_frames(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedTrade) as caught:
        parse_frame(raw)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"trade_id": ...}, "missing_trade_id"),
        ({"trade_id": 17}, "missing_trade_id"),
        ({"market_ticker": ...}, "missing_ticker"),
        ({"taker_outcome_side": ..., "taker_book_side": ..., "taker_side": ...}, "missing_side"),
        ({"taker_outcome_side": "maybe"}, "bad_side"),
        ({"taker_outcome_side": ..., "taker_book_side": "mid"}, "bad_side"),
        ({"yes_price_dollars": "abc"}, "bad_number"),
        ({"yes_price_dollars": "NaN"}, "bad_number"),
        ({"yes_price_dollars": True}, "bad_number"),
        ({"yes_price_dollars": None, "no_price_dollars": None}, "missing_price"),
        ({"yes_price_dollars": "1.5", "no_price_dollars": "-0.5"}, "price_out_of_range"),
        ({"no_price_dollars": "1.0001"}, "price_out_of_range"),
        ({"count_fp": "0"}, "count_not_positive"),
        ({"count_fp": "-3.00"}, "count_not_positive"),
        ({"count_fp": "1e30"}, "count_too_large"),
        ({"count_fp": [1]}, "bad_number"),
        ({"is_block_trade": "yes"}, "bad_is_block_trade"),
        ({"ts_ms": "soon"}, "bad_time"),
        ({"ts_ms": 1793000000123000}, "bad_time"),  # microseconds: would poison the watermark and checkpoint
        ({"ts_ms": 1793000000}, "bad_time"),  # seconds in the milliseconds field
        ({"ts_ms": ..., "ts": 1e300}, "bad_time"),
        ({"ts_ms": ..., "ts": ...}, "missing_time"),
    ],
)
def test_malformed_trades_name_their_reason(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(MalformedTrade) as caught:
        trade_from_frame(frame(**changes))
    assert caught.value.reason == reason


def test_msg_must_be_an_object() -> None:
    with pytest.raises(MalformedTrade) as caught:
        trade_from_frame({"type": "trade", "msg": "hello"})
    assert caught.value.reason == "msg_not_an_object"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
field_values = (
    st.sampled_from(["0.5", "1", "0", "-1", "abc", "1e400", "NaN", "yes", "no", "bid", "ask", "", "0.00", "147.53"])
    | json_values
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_never_raises_anything_but_malformed(raw: bytes) -> None:
    try:
        frame = parse_frame(raw)
    except MalformedTrade as exc:
        assert exc.reason in {"not_json", "not_an_object"}
        return
    assert isinstance(frame, dict)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted({*TODAY, "yes_price", "no_price", "count", "ticker"})), field_values))
def test_normalize_never_raises_anything_but_malformed(changes: dict[str, Any]) -> None:
    try:
        trade = trade_from_frame(frame(**changes))
    except MalformedTrade:
        return
    assert trade.count_fp > 0
    assert Decimal(0) <= trade.price_dollars <= Decimal(1)
    assert trade.taker_side in {"yes", "no"}
    json.dumps(trade.trade_id)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted({*TODAY, "yes_price", "no_price", "count", "ticker"})), field_values))
def test_fast_path_agrees_with_the_careful_path(changes: dict[str, Any]) -> None:
    raw = json.dumps(frame(**changes)).encode()
    fast = fast_trade(raw)
    if fast is None:
        return  # not today's exact shape: the careful path decides alone
    assert fast == trade_from_frame(parse_frame(raw))


def test_fast_path_reads_todays_frame_and_declines_the_rest() -> None:
    assert fast_trade(json.dumps(frame())) == trade_from_frame(frame())
    assert fast_trade(json.dumps(frame(taker_outcome_side=...))) is None  # book side only: careful path
    assert fast_trade(json.dumps(frame(yes_price_dollars="NaN"))) is None
    assert fast_trade(b'{"type":"subscribed","msg":{"sid":1}}') is None
    assert fast_trade(b"{not json") is None


def test_fast_path_keeps_the_exact_text_and_refuses_what_it_cannot_prove() -> None:
    raw = json.dumps(frame(count_fp="199999.999998", yes_price_dollars="0.000999", no_price_dollars="0.999001"))
    trade = fast_trade(raw)
    assert trade is not None and trade == trade_from_frame(parse_frame(raw))
    assert (trade.count_fp, trade.yes_price_dollars) == (Decimal("199999.999998"), Decimal("0.000999"))
    # Over-precise, out of range, zero, signed, exponent, blank or non-ASCII digits: the careful path decides.
    for changes in (
        {"count_fp": "199999.9999999"},
        {"yes_price_dollars": "0.1234567"},
        {"yes_price_dollars": "0.000000"},
        {"count_fp": "0.00"},
        {"count_fp": "1000000000.00"},  # 10^9 itself is allowed, but only the careful path proves it
        {"count_fp": "1E+2"},
        {"yes_price_dollars": "+0.5"},
        {"yes_price_dollars": " 0.5"},
        {"yes_price_dollars": "0.5\n"},
        {"yes_price_dollars": "0.\u0665"},
        {"count_fp": "01.00"},
    ):
        assert fast_trade(json.dumps(frame(**changes))) is None, changes
    assert trade_from_frame(frame(count_fp="1000000000.00")).count_fp == Decimal(10**9)
