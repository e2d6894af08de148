"""Decode once: the stream's typed decode (`fast_trade_frame`) against the careful dict decode it falls back to.

The fast path may refuse anything (the careful path then decides), but whatever it accepts must be exactly what
the careful path makes of the same frame: the same trade, the same sid and seq. And through the stream as a
whole, every generated frame ends as the careful path says: one delivered trade, or one refusal with the
careful path's reason, or (a control frame) neither. One difference is deliberate (`fast_trade_frame`'s
docstring): an unknown field is skipped without the careful path's shape bounds.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valshi_x.kalshi.stream import TradeStream
from valshi_x.trades import MalformedTrade, TradeFrame, careful_trade_frame, fast_trade_frame, parse_frame

NOW_MS = 1_796_126_073_613
_MISSING = object()

GOOD_MSG: dict[str, Any] = {
    "trade_id": "52d63a7e-6391-4608-ba33-bd71bed05061",
    "market_ticker": "KXNFLGAME-26NOV01KCBUF-KC",
    "yes_price_dollars": "0.6200",
    "no_price_dollars": "0.3800",
    "count_fp": "2500.00",
    "taker_outcome_side": "yes",
    "taker_book_side": "bid",
    "is_block_trade": False,
    "ts_ms": NOW_MS,
}

odd_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.just([]),
    st.just({}),
)
number_texts = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True, places=None).map(str),
    st.sampled_from(
        ["0.5", "0.50", "0.999999", "0.9999999", "1", "0", "-0", "1e-7", "5E-1", " 0.5", "0.5_0", "NaN", "1E+2"]
    ),
    st.from_regex(r"\A-?[0-9]{0,10}(\.[0-9]{0,8})?\Z"),
)
field_values: dict[str, st.SearchStrategy[Any]] = {
    "trade_id": st.one_of(st.text(max_size=3), st.text(min_size=120, max_size=140), odd_scalars),
    "market_ticker": st.one_of(st.text(max_size=3), st.text(min_size=120, max_size=140), odd_scalars),
    "yes_price_dollars": st.one_of(number_texts, odd_scalars),
    "no_price_dollars": st.one_of(number_texts, odd_scalars),
    "count_fp": st.one_of(number_texts, odd_scalars),
    "taker_outcome_side": st.one_of(st.sampled_from(["yes", "no", "YES", "bid"]), odd_scalars),
    "taker_book_side": st.one_of(st.sampled_from(["bid", "ask"]), odd_scalars),
    "is_block_trade": odd_scalars,
    "ts_ms": st.one_of(
        st.integers(min_value=1_500_000_000_000, max_value=4_200_000_000_000), st.just(NOW_MS / 1), odd_scalars
    ),
}


@st.composite
def frames(draw: st.DrawFn) -> str:
    """A trade frame with some fields changed, dropped or added, at the envelope and in the trade."""
    msg = dict(GOOD_MSG)
    for name in draw(st.sets(st.sampled_from(sorted(field_values)), max_size=3)):
        if draw(st.booleans()):
            msg[name] = draw(field_values[name])
        else:
            del msg[name]
    if draw(st.booleans()):
        msg["ts"] = draw(st.one_of(st.just(NOW_MS // 1000), st.integers(1_577_836_790, 4_102_444_810), odd_scalars))
    frame: dict[str, Any] = {"type": draw(st.sampled_from(["trade", "trade", "trade", "ok", "ticker"])), "msg": msg}
    for name in ("sid", "seq"):
        value = draw(st.one_of(st.integers(min_value=-2, max_value=2**66), odd_scalars, st.just(_MISSING)))
        if value is not _MISSING:
            frame[name] = value
    if draw(st.booleans()):
        frame["msg"] = draw(st.one_of(odd_scalars, st.just(msg)))
    if draw(st.booleans()):
        frame["extra"] = draw(st.one_of(odd_scalars, st.just([[[{"deep": [1, 2]}]]])))
    return json.dumps(frame, ensure_ascii=draw(st.booleans()))


def careful(raw: str) -> TradeFrame | str | None:
    """What the careful path makes of a frame: the typed frame, a refusal's reason, or None (not a trade)."""
    try:
        frame = parse_frame(raw)
        if frame.get("type") != "trade":
            return None
        return careful_trade_frame(frame)
    except MalformedTrade as exc:
        return exc.reason


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_what_the_fast_path_accepts_the_careful_path_makes_the_same(raw: str) -> None:
    fast = fast_trade_frame(raw)
    if fast is not None:
        assert careful(raw) == fast
        assert fast.seq is None or (type(fast.seq) is int and fast.seq >= 1)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_the_stream_delivers_or_refuses_each_frame_as_the_careful_path_does(raw: str) -> None:
    delivered: list[TradeFrame] = []
    refused: list[str] = []
    stream = TradeStream(
        url="ws://127.0.0.1/trade-api/ws/v2",
        signer=None,
        deliver=delivered.extend,
        on_bad_frame=lambda _raw, exc: refused.append(exc.reason),
    )
    stream._handle(raw)
    stream._flush()
    expected = careful(raw)
    if isinstance(expected, TradeFrame):
        assert (delivered, refused) == ([expected], [])
    elif isinstance(expected, str):
        assert (delivered, refused) == ([], [expected])
    else:
        assert (delivered, refused) == ([], [])


def test_today_s_frame_takes_the_fast_path_and_odd_ones_the_careful_one() -> None:
    good = {"type": "trade", "sid": 3, "seq": 7, "msg": GOOD_MSG}
    fast = fast_trade_frame(json.dumps(good))
    assert fast is not None and (fast.sid, fast.seq, fast.msg.trade_id) == (3, 7, GOOD_MSG["trade_id"])
    for seq in ("7", 7.0, True, 0, None):
        odd = json.dumps(good | {"seq": seq})
        assert fast_trade_frame(odd) is None or seq is None
        typed = careful(odd)
        assert isinstance(typed, TradeFrame) and typed.seq is None and typed.msg == fast.msg
    # Stamped in whole seconds only (older captures): a second typed decode, still the same as the careful path.
    seconds = json.dumps(good | {"msg": {k: v for k, v in GOOD_MSG.items() if k != "ts_ms"} | {"ts": NOW_MS // 1000}})
    typed_seconds = fast_trade_frame(seconds)
    assert typed_seconds is not None and typed_seconds == careful(seconds)
    assert typed_seconds.msg.ts_ms == NOW_MS // 1000 * 1000
    legacy = {"trade_id": "t-1", "market_ticker": "KX-1", "yes_price": 62, "count": 3, "taker_side": "yes", "ts": 1}
    assert fast_trade_frame(json.dumps(good | {"msg": legacy | {"ts": NOW_MS // 1000}})) is None  # integer cents
    assert isinstance(careful(json.dumps(good | {"msg": legacy | {"ts": NOW_MS // 1000}})), TradeFrame)


def test_an_unknown_field_is_skipped_without_the_careful_shape_bounds() -> None:
    # Deliberate (fast_trade_frame's docstring): the trade is taken as it is, the deep field never looked at.
    raw = json.dumps(
        {
            "type": "trade",
            "sid": 1,
            "seq": 5,
            "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
            "msg": GOOD_MSG,
        }
    )
    fast = fast_trade_frame(raw)
    assert fast is not None and fast.seq == 5
    assert fast.msg == careful_trade_frame({"type": "trade", "sid": 1, "seq": 5, "msg": GOOD_MSG}).msg
    try:
        parse_frame(raw)
    except MalformedTrade as exc:
        assert exc.reason == "too_deep"
    else:
        raise AssertionError("the careful path should refuse 40 levels")
