"""The trade record and the normalizer: raw Kalshi frames and REST trades in, one typed `Trade` out.

Pure: no asyncio, no I/O. Everything that can go wrong with input raises `MalformedTrade` with a short
reason; callers count it, log it once and move on, so the daemon never dies on input.

Money is exact by construction: prices lie strictly between 0 and 1 and counts between 0 and 10^9, both with at
most `MAX_DECIMALS` decimals (Kalshi sends 4 to 6 for prices, 2 for counts); anything more precise is refused
(`too_precise`), never rounded. So a fill's value has at most 22 significant digits and a sum of up to a million
fills at most 28: Python's default decimal context never rounds, and no rounding can lift a sum over the whale
threshold. A `Trade` keeps the fixed-point fields as the text they arrived as (canonical decimal strings) and
gives them as `Decimal` on demand: building three Decimals per print was the replay's biggest single cost, and
only the few groups near the threshold ever need them (`valshi_x.whales` screens the rest with floats).
Lengths are bounded too (`MAX_TEXT_LEN` for ids and tickers), and frames go through the one bounded decoder
(`valshi_x.decode`).

Trade time has one rule, `check_trade_time`: a trade stamped more than `FUTURE_TOLERANCE_MS` ahead of the
reference clock is `future_time`, so no single trade can move the stream clock, the checkpoint or a backfill
window by more than that. The caller chooses the clock (see `valshi_x.pipeline`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Final, Literal

import msgspec

from valshi_x.decode import MAX_FRAME_BYTES, DecodeRefused, decode_json

Side = Literal["yes", "no"]

_ZERO = Decimal(0)
_ONE = Decimal(1)
_CENT = Decimal("0.01")
# No market holds anywhere near this many contracts; the bound keeps later sums finite and exact.
_MAX_COUNT = Decimal(10) ** 9
# Decimals a price or a count may have (see the module docstring: this is what keeps every sum exact).
MAX_DECIMALS: Final = 6
_QUANTUM = Decimal(1).scaleb(-MAX_DECIMALS)
# Trade ids are UUIDs and tickers some 60 characters; a megabyte "ticker" is an attack, not a market.
MAX_TEXT_LEN: Final = 128
# How far ahead of the reference clock a trade time may lie: clock skew between Kalshi and this host, no more.
# Beyond it the trade is `future_time`; one such trade would otherwise close sweeps early, move the checkpoint
# into the future and aim backfills at the wrong hour.
FUTURE_TOLERANCE_MS: Final = 3_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Trade times outside these bounds are no trade of today's Kalshi (a microsecond or seconds value in `ts_ms`,
# say); one such time as the stream's watermark would poison the checkpoint and every window after it.
_MIN_TS_MS = 1_577_836_800_000  # 2020-01-01
_MAX_TS_MS = 4_102_444_800_000  # 2100-01-01
_ONE_MS = timedelta(milliseconds=1)
# A fixed-point string longer than this has more digits than any price or count within the bounds above.
_MAX_NUMBER_LEN = 24
_BOOK_SIDE_TO_OUTCOME: dict[str, Side] = {"bid": "yes", "ask": "no"}
_OUTCOMES: dict[str, Side] = {"yes": "yes", "no": "no"}


class MalformedTrade(ValueError):
    """A frame or REST trade that cannot be turned into a `Trade`; `reason` is a short snake_case tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class _TradeFields(msgspec.Struct, frozen=True, gc=False):
    """The fields every typed trade shares, under their wire names; `Trade` and `_SecondsTrade` add the time."""

    trade_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_LEN)]
    ticker: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_LEN)] = msgspec.field(name="market_ticker")
    yes_price_text: str = msgspec.field(name="yes_price_dollars")
    no_price_text: str = msgspec.field(name="no_price_dollars")
    count_text: str = msgspec.field(name="count_fp")
    taker_side: Side = msgspec.field(name="taker_outcome_side")
    is_block_trade: bool


class Trade(_TradeFields, frozen=True, gc=False):
    """One maker fill, in the shape of Kalshi's REST trade schema; prices and count are exact `Decimal`s on demand.

    A frozen msgspec Struct: immutable, cheap to build, and decodable straight from today's wire format (the
    encoded names are the WebSocket's: `market_ticker`, `yes_price_dollars`, `taker_outcome_side`), which is the
    replay's hot path. The fixed-point fields are kept as their canonical decimal text (`*_text`): `Decimal(text)`
    is exact, and `float(text)` is what the whale screen sums. The constraints on the fields (here and in
    `_TradeFields`) are checked when decoding (the fast path); the careful path checks the same and more by hand.
    """

    ts_ms: Annotated[int, msgspec.Meta(ge=_MIN_TS_MS, lt=_MAX_TS_MS)]  # trade time, Unix ms; see `created_time`

    @property
    def created_time(self) -> datetime:
        return utc_from_ms(self.ts_ms)

    @property
    def yes_price_dollars(self) -> Decimal:
        return Decimal(self.yes_price_text)

    @property
    def no_price_dollars(self) -> Decimal:
        return Decimal(self.no_price_text)

    @property
    def count_fp(self) -> Decimal:
        """Contracts, exact."""
        return Decimal(self.count_text)

    @property
    def price_text(self) -> str:
        """The taker side's price as text (see `price_dollars`)."""
        return self.yes_price_text if self.taker_side == "yes" else self.no_price_text

    @property
    def price_dollars(self) -> Decimal:
        """What the taker paid per contract: the price of the side it bought."""
        return Decimal(self.price_text)

    @property
    def value_usd(self) -> Decimal:
        """What the taker paid for this fill: contracts x the taker side's price, exact."""
        return Decimal(self.count_text) * Decimal(self.price_text)


def utc_from_ms(ts_ms: int) -> datetime:
    """Unix milliseconds as an exact, timezone-aware UTC datetime."""
    return _EPOCH + timedelta(milliseconds=ts_ms)


def check_trade_time(ts_ms: int, now_ms: int) -> None:
    """The one trade-time rule: raise `future_time` for a trade more than FUTURE_TOLERANCE_MS ahead of `now_ms`."""
    if ts_ms > now_ms + FUTURE_TOLERANCE_MS:
        raise MalformedTrade("future_time", f"{ts_ms - now_ms} ms ahead of the clock (frequent? check the host clock)")


def parse_frame(raw: str | bytes) -> dict[str, Any]:
    """Decode one WebSocket text frame (or capture line) into its JSON object, within the frame limits."""
    try:
        frame = decode_json(raw, max_bytes=MAX_FRAME_BYTES)
    except DecodeRefused as exc:
        raise MalformedTrade(exc.reason, exc.detail) from None
    if not isinstance(frame, dict):
        raise MalformedTrade("not_an_object", type(frame).__name__)
    return frame


def _exact_money(yes: Decimal, no: Decimal, count: Decimal) -> bool:
    """Prices in (0, 1), count in (0, 10^9], each with at most MAX_DECIMALS decimals. NaN raises InvalidOperation."""
    # Below one quantum a value has more than 6 decimals anyway; the floor also keeps the remainders from underflow.
    return (
        _QUANTUM <= yes < _ONE
        and _QUANTUM <= no < _ONE
        and _QUANTUM <= count <= _MAX_COUNT
        # A remainder is exact (and, in these ranges, cheaper than quantize): zero means at most 6 decimals.
        and not yes % _QUANTUM
        and not no % _QUANTUM
        and not count % _QUANTUM
    )


def trade_from_frame(frame: dict[str, Any]) -> Trade:
    """Normalize the `msg` of a WebSocket frame of type `trade`."""
    msg = frame.get("msg")
    if not isinstance(msg, dict):
        raise MalformedTrade("msg_not_an_object", type(msg).__name__)
    return trade_from_fields(msg)


def trade_from_fields(msg: dict[str, Any]) -> Trade:
    """Normalize a trade object: a WebSocket `msg` or a REST trade (`ticker`, `created_time`) alike."""
    # Fast path for today's well-formed frame; anything unusual takes the careful path, which names the reason.
    trade_id = msg.get("trade_id")
    ticker = msg.get("market_ticker")
    yes_raw = msg.get("yes_price_dollars")
    no_raw = msg.get("no_price_dollars")
    count_raw = msg.get("count_fp")
    ts_ms = msg.get("ts_ms")
    side = msg.get("taker_outcome_side")
    block = msg.get("is_block_trade", False)
    if (
        type(trade_id) is str
        and type(ticker) is str
        and type(yes_raw) is str
        and type(no_raw) is str
        and type(count_raw) is str
        and type(ts_ms) is int
        and type(side) is str
        and side in _OUTCOMES
        and (block is False or block is True)
        and 0 < len(trade_id) <= MAX_TEXT_LEN
        and 0 < len(ticker) <= MAX_TEXT_LEN
        and len(yes_raw) <= _MAX_NUMBER_LEN
        and len(no_raw) <= _MAX_NUMBER_LEN
        and len(count_raw) <= _MAX_NUMBER_LEN
        and _MIN_TS_MS <= ts_ms < _MAX_TS_MS
    ):
        try:
            yes = Decimal(yes_raw)
            no = Decimal(no_raw)
            count = Decimal(count_raw)
            # NaN makes these comparisons raise; infinities, out-of-range and over-precise values fail them.
            if _exact_money(yes, no, count):
                return Trade(trade_id, ticker, str(yes), str(no), str(count), _OUTCOMES[side], block, ts_ms)
        except InvalidOperation:
            pass
    return _trade_from_fields_checked(msg)


def _trade_from_fields_checked(msg: dict[str, Any]) -> Trade:
    trade_id = msg.get("trade_id")
    if not isinstance(trade_id, str) or not trade_id:
        raise MalformedTrade("missing_trade_id")
    if len(trade_id) > MAX_TEXT_LEN:
        raise MalformedTrade("trade_id_too_long", f"{len(trade_id)} characters")
    ticker = msg.get("market_ticker")
    if ticker is None:
        ticker = msg.get("ticker")
    if not isinstance(ticker, str) or not ticker:
        raise MalformedTrade("missing_ticker")
    if len(ticker) > MAX_TEXT_LEN:
        raise MalformedTrade("ticker_too_long", f"{len(ticker)} characters")

    side = _taker_side(msg)
    yes_price, no_price = _prices(msg)
    count = _count(msg)
    block = msg.get("is_block_trade", False)
    if not isinstance(block, bool):
        raise MalformedTrade("bad_is_block_trade", repr(block)[:40])
    # Canonical text: `str` of a Decimal reads back as the very same Decimal (digits and exponent).
    return Trade(trade_id, ticker, str(yes_price), str(no_price), str(count), side, block, trade_time_ms(msg))


def _taker_side(msg: dict[str, Any]) -> Side:
    # Canonical field first; the book side and the deprecated `taker_side` are fallbacks. Never default.
    outcome = msg.get("taker_outcome_side")
    if outcome is not None:
        if isinstance(outcome, str) and outcome in _OUTCOMES:
            return _OUTCOMES[outcome]
        raise MalformedTrade("bad_side", repr(outcome)[:40])
    book = msg.get("taker_book_side")
    if book is not None:
        if isinstance(book, str) and book in _BOOK_SIDE_TO_OUTCOME:
            return _BOOK_SIDE_TO_OUTCOME[book]
        raise MalformedTrade("bad_side", repr(book)[:40])
    legacy = msg.get("taker_side")
    if legacy is not None:
        if isinstance(legacy, str) and legacy in _OUTCOMES:
            return _OUTCOMES[legacy]
        raise MalformedTrade("bad_side", repr(legacy)[:40])
    raise MalformedTrade("missing_side")


def _decimal(value: object, field: str) -> Decimal:
    # Fixed-point fields are strings on the wire; a JSON number is tolerated but never a bool.
    if isinstance(value, str):
        if len(value) > _MAX_NUMBER_LEN:
            raise MalformedTrade("too_precise", f"{field} has {len(value)} characters")
        try:
            number = Decimal(value)
        except InvalidOperation:
            raise MalformedTrade("bad_number", f"{field}={value[:40]!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))
    else:
        raise MalformedTrade("bad_number", f"{field}={value!r}"[:60])
    if not number.is_finite():
        raise MalformedTrade("bad_number", f"{field}={value!r}"[:60])
    return number


def _check_precision(number: Decimal, field: str) -> None:
    # Called once the value is known to be in range; below one quantum the remainder could underflow to zero.
    if number < _QUANTUM or number % _QUANTUM:
        raise MalformedTrade("too_precise", f"{field} has more than {MAX_DECIMALS} decimals")


def _legacy_cents(value: object, field: str) -> Decimal:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedTrade("bad_number", f"{field}={value!r}"[:60])
    return Decimal(value) * _CENT


def _prices(msg: dict[str, Any]) -> tuple[Decimal, Decimal]:
    yes_raw = msg.get("yes_price_dollars")
    no_raw = msg.get("no_price_dollars")
    if yes_raw is not None:
        yes = _decimal(yes_raw, "yes_price_dollars")
        no = _decimal(no_raw, "no_price_dollars") if no_raw is not None else _ONE - yes
    elif no_raw is not None:
        no = _decimal(no_raw, "no_price_dollars")
        yes = _ONE - no
    elif "yes_price" in msg or "no_price" in msg:
        # Captures from before 2026-03-12 carry integer cents.
        if "yes_price" in msg:
            yes = _legacy_cents(msg["yes_price"], "yes_price")
            no = _legacy_cents(msg["no_price"], "no_price") if "no_price" in msg else _ONE - yes
        else:
            no = _legacy_cents(msg["no_price"], "no_price")
            yes = _ONE - no
    else:
        raise MalformedTrade("missing_price")
    # A price of 0 or 1 is no trade (and "-0" or "0E+999999999" no price at all).
    if not (_ZERO < yes < _ONE and _ZERO < no < _ONE):
        raise MalformedTrade("price_out_of_range", f"yes={yes} no={no}"[:80])
    _check_precision(yes, "yes_price_dollars")
    _check_precision(no, "no_price_dollars")
    return yes, no


def _count(msg: dict[str, Any]) -> Decimal:
    raw = msg.get("count_fp")
    if raw is not None:
        count = _decimal(raw, "count_fp")
    elif "count" in msg:
        # Captures from before 2026-03-12 carry a whole number of contracts.
        legacy = msg["count"]
        if not isinstance(legacy, int) or isinstance(legacy, bool):
            raise MalformedTrade("bad_number", f"count={legacy!r}"[:60])
        count = Decimal(legacy)
    else:
        raise MalformedTrade("missing_count")
    if count <= _ZERO:
        raise MalformedTrade("count_not_positive", str(count))
    if count > _MAX_COUNT:
        raise MalformedTrade("count_too_large", str(count)[:40])
    _check_precision(count, "count_fp")
    return count


def trade_time_ms(msg: dict[str, Any]) -> int:
    """Trade time in Unix ms of a WebSocket `msg` (`ts_ms`, else `ts`) or a REST trade (`created_time`)."""
    ts_ms = msg.get("ts_ms")
    if ts_ms is not None:
        if isinstance(ts_ms, int) and not isinstance(ts_ms, bool) and _MIN_TS_MS <= ts_ms < _MAX_TS_MS:
            return ts_ms
        raise MalformedTrade("bad_time", f"ts_ms={ts_ms!r}"[:60])
    ts = msg.get("ts")
    if ts is not None:
        if isinstance(ts, int | float) and not isinstance(ts, bool) and _MIN_TS_MS <= ts * 1000 < _MAX_TS_MS:
            return int(ts * 1000)
        raise MalformedTrade("bad_time", f"ts={ts!r}"[:60])
    created = msg.get("created_time")
    if created is not None:
        if not isinstance(created, str) or len(created) > 40:
            raise MalformedTrade("bad_time", f"created_time={created!r}"[:60])
        try:
            when = datetime.fromisoformat(created)
        except ValueError:
            raise MalformedTrade("bad_time", f"created_time={created[:40]!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        created_ms = (when - _EPOCH) // _ONE_MS
        if _MIN_TS_MS <= created_ms < _MAX_TS_MS:
            return created_ms
        raise MalformedTrade("bad_time", f"created_time={created[:40]!r}")
    raise MalformedTrade("missing_time")


# ------------------------------------------------------------------ the typed frame (decode once, live and replay)


class TradeFrame(msgspec.Struct, gc=False, omit_defaults=True):
    """A trade frame decoded once: the trade, its subscription and its seq (None unless a plain positive integer).

    The stream makes one from every trade frame (`fast_trade_frame` in C for today's shape, `careful_trade_frame`
    for the rest) and the pipeline takes it as it is, so no frame is decoded or dispatched twice; a replay decodes
    its lines the same way (`trades_of_lines`). A `sid` that is not an integer is None as well (such a frame is
    not checked for gaps, as before). Lengths and the time range are checked by the decoder (`Trade`'s schema).
    """

    type: Literal["trade"]
    msg: Trade
    sid: int | None = None
    seq: Annotated[int, msgspec.Meta(ge=1)] | None = None


class _SecondsTrade(_TradeFields, frozen=True, gc=False):
    """A trade stamped in whole seconds only (`ts`, no `ts_ms`), as in older captures: `trade_time_ms`'s second case.

    About one frame in fifty of a capture; typed here, it costs a second decode instead of the careful path's dict,
    three Decimals and a dozen checks.
    """

    ts: Annotated[int, msgspec.Meta(ge=_MIN_TS_MS // 1000, lt=_MAX_TS_MS // 1000)]  # both bounds are whole seconds
    ts_ms: None = None  # absent or null: `trade_time_ms` reads `ts` then


class _SecondsTradeFrame(msgspec.Struct, gc=False):
    type: Literal["trade"]
    msg: _SecondsTrade
    sid: int | None = None
    seq: Annotated[int, msgspec.Meta(ge=1)] | None = None


_decode_typed_frame = msgspec.json.Decoder(TradeFrame).decode
_decode_seconds_frame = msgspec.json.Decoder(_SecondsTradeFrame).decode

# The fast path's format check, by regular expression: today's canonical fixed-point text only (ASCII digits, at most
# MAX_DECIMALS decimals, no sign, exponent, blank or underscore), a price in (0, 1) and a count in (0, 10^9).
# Anything else (10^9 itself, "1E+2", " 0.5") is left to the careful path, which reads it or names the problem.
_PRICE_TEXT = re.compile(r"0\.(?=[0-9]*[1-9])[0-9]{1,6}")
_COUNT_TEXT = re.compile(r"(?:[1-9][0-9]{0,8}(?:\.[0-9]{1,6})?|0\.(?=[0-9]*[1-9])[0-9]{1,6})")
# Texts that passed, so the check runs once per distinct text, not per print (a set lookup costs a tenth of the
# match). Bounded: a capture of a million prints holds some 500 prices and 22,000 counts; when full, a cache is
# emptied and fills again with what is current (about 3 MB at most).
_KNOWN_MAX = 32_768
_known_prices: set[str] = set()
_known_counts: set[str] = set()


def fast_trade_frame(raw: str | bytes) -> TradeFrame | None:
    """A trade frame of today's exact shape, decoded and type-checked in one pass; None for anything else.

    Bounds: the size is checked first; nesting is bounded by the schema (unknown fields are skipped, and a
    skipped value nested past msgspec's depth limit raises RecursionError, caught here); the trade's ranges and
    precision are those of `_exact_money`, proven on the text (`_money_text_ok`, no Decimal built), lengths and the
    time range those of the careful path, checked by the decoder. None is no verdict: the caller takes the careful
    path, which names what is wrong (a property test keeps the two equal).

    One difference on purpose: a field the trade does not use is skipped here without the careful path's shape
    bounds (its bracket count, its depth of 32, UTF-8 of a capture line), so a well-formed trade beside a deep or
    odd unknown field is taken here and refused there. Those bounds protect the dict decoder; this skip is
    already bounded by the frame size and msgspec's own depth limit, and no skipped byte reaches a trade or a log.
    """
    if len(raw) > MAX_FRAME_BYTES:
        return None
    return _typed_frame(raw)


def _typed_frame(raw: str | bytes) -> TradeFrame | None:
    """`fast_trade_frame` once the size is known to be within bounds."""
    try:
        frame = _decode_typed_frame(raw)
    except (msgspec.DecodeError, RecursionError):
        return _seconds_frame(raw)
    trade = frame.msg
    if (
        trade.yes_price_text in _known_prices
        and trade.no_price_text in _known_prices
        and trade.count_text in _known_counts
    ) or _money_text_ok(trade):
        return frame
    return None


def _seconds_frame(raw: str | bytes) -> TradeFrame | None:
    try:
        frame = _decode_seconds_frame(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    msg = frame.msg
    trade = Trade(
        msg.trade_id,
        msg.ticker,
        msg.yes_price_text,
        msg.no_price_text,
        msg.count_text,
        msg.taker_side,
        msg.is_block_trade,
        msg.ts * 1000,
    )
    return TradeFrame("trade", trade, frame.sid, frame.seq) if _money_text_ok(trade) else None


def trades_of_lines(lines: Sequence[str | bytes], careful: Callable[[str | bytes], Trade | None]) -> list[Trade]:
    """The trades of a chunk of raw frames (a replay's lines), in order, decoded as `fast_trade_frame` does.

    Any line the fast path refuses goes to `careful`, which returns its trade or None (and counts and logs what it
    is: a control frame, a malformed one). One loop per chunk, no Python call per frame for today's shape with
    prices and counts seen before: this is the replay's hot path.
    """
    if max(map(len, lines), default=0) > MAX_FRAME_BYTES:  # one huge line: per line, sizes checked
        found = (fast_trade_frame(raw) for raw in lines)
        return [t for raw, f in zip(lines, found, strict=True) if (t := f.msg if f else careful(raw)) is not None]
    decode = _decode_typed_frame
    prices, counts = _known_prices, _known_counts
    trades: list[Trade] = []
    append = trades.append
    for raw in lines:
        try:
            trade = decode(raw).msg
        except (msgspec.DecodeError, RecursionError):
            frame = _seconds_frame(raw)  # the rest of the fast path: a trade time in seconds only
            caught = frame.msg if frame is not None else careful(raw)
        else:
            if (
                trade.yes_price_text in prices and trade.no_price_text in prices and trade.count_text in counts
            ) or _money_text_ok(trade):
                append(trade)
                continue
            caught = careful(raw)
        if caught is not None:
            append(caught)
    return trades


def _money_text_ok(trade: Trade) -> bool:
    """Prices and count of a freshly decoded trade in today's canonical form (remembered when they are)."""
    yes, no, count = trade.yes_price_text, trade.no_price_text, trade.count_text
    if not (_PRICE_TEXT.fullmatch(yes) and _PRICE_TEXT.fullmatch(no) and _COUNT_TEXT.fullmatch(count)):
        return False
    for known, text in ((_known_prices, yes), (_known_prices, no), (_known_counts, count)):
        if len(known) >= _KNOWN_MAX:
            known.clear()
        known.add(text)
    return True


def careful_trade_frame(frame: dict[str, Any]) -> TradeFrame:
    """The typed frame of a decoded `trade` frame of any shape (legacy cents, `ts`, odd seq); raises MalformedTrade."""
    trade = trade_from_frame(frame)
    sid = frame.get("sid")
    seq = frame.get("seq")
    return TradeFrame(
        "trade",
        trade,
        sid if type(sid) is int else None,
        seq if type(seq) is int and seq >= 1 else None,
    )
