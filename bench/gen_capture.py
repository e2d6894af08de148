"""Seeded generator of realistic Kalshi trade captures with planted whales, plus the manifest of expected alerts.

A capture is what `--record` writes and `--replay` reads: one raw WebSocket text frame per line, a `subscribed`
ack first. Frames are in today's format (docs/kalshi-api.md section 4): fixed-point price and count strings,
`taker_outcome_side` + `taker_book_side` (+ sometimes the deprecated `taker_side`), `ts` + `ts_ms` (now and then
without `ts_ms`), `is_block_trade`. Background trades arrive at about 120/s of trade time with bursts, across a
few hundred sports, crypto, politics, economics and weather markets.

Every alert a replay can produce is planted: a background trade is worth at most $2,500 and one ticker and side
never hold more than $15,000 of background trades within 2 sweep windows + 2 s, so no burst can add up to a
whale, and background trades stay off a planted ticker for that long around each planted event. The manifest
(written beside the capture as `<name>.expected.json`) lists each expected alert with its exact value, the
planted cases that must not alert, and the malformed frames with the reason the normalizer gives.

    python bench/gen_capture.py --frames 4000 --out examples/sample.jsonl --seed 20260913 --whales 3

Standard library only, so a bench or CI can run it before anything else is installed.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import math
import random
import sys
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

# Sunday 2026-09-13, 17:05 UTC: NFL week 1 kick-off, the Fed meets two days later.
DEFAULT_START_MS = 1_789_319_100_000
DEFAULT_RATE_PER_S = 120.0
DEFAULT_THRESHOLD_USD = Decimal(100000)
DEFAULT_SWEEP_WINDOW_MS = 1000
SID = 1

# Units: prices in 1/10,000 dollar (4 decimals, as on the wire), counts in 1/100 contract (2 decimals),
# values in 1/1,000,000 dollar: price_e4 * count_e2 is exact, no Decimal on the hot path.
_E4 = 10_000
_USD_E6 = 1_000_000
BACKGROUND_TRADE_CAP_USD = 2_500
BACKGROUND_KEY_CAP_USD = 15_000
_TRADE_CAP_E6 = BACKGROUND_TRADE_CAP_USD * _USD_E6
_KEY_CAP_E6 = BACKGROUND_KEY_CAP_USD * _USD_E6

# Arrivals: quiet stretches (mean 4 s) at the base rate, half of them followed by a burst of 0.3-2 s at 4-10 times
# it, mostly in one market. On average that is 1.754 x the base rate, which sets the base from the asked rate.
_QUIET_MEAN_MS = 4000.0
_BURST_CHANCE = 0.5
_BURST_MS = (300.0, 2000.0)
_BURST_FACTOR = (4.0, 10.0)
_BURST_HOT_SHARE = 0.6
_RATE_GAIN = (_QUIET_MEAN_MS + _BURST_CHANCE * 1150.0 * 7.0) / (_QUIET_MEAN_MS + _BURST_CHANCE * 1150.0)

MALFORMED_REASONS = {
    # case: the `MalformedTrade.reason` valshi_x.trades gives for it
    "truncated_frame": "not_json",
    "plain_text": "not_json",
    "json_array": "not_an_object",
    "json_string": "not_an_object",
    "msg_is_string": "msg_not_an_object",
    "missing_side": "missing_side",
    "side_buy": "bad_side",
    "price_abc": "bad_number",
    "price_1_5": "price_out_of_range",
    "count_zero": "count_not_positive",
    "count_negative": "count_not_positive",
    "count_is_list": "bad_number",
    "price_is_bool": "bad_number",
    "block_is_string": "bad_is_block_trade",
    "ts_ms_is_string": "bad_time",
    "trade_id_is_int": "missing_trade_id",
    "ticker_is_null": "missing_ticker",
    "no_count": "missing_count",
    "no_price": "missing_price",
}


@dataclass(frozen=True, slots=True)
class Fill:
    """One trade frame's content, in exact integer units."""

    trade_id: str
    ticker: str
    side: str  # the taker's outcome side, yes or no
    yes_e4: int
    count_e2: int
    ts_ms: int
    block: bool = False
    legacy: bool = False  # pre-2026-03-12 shape: integer cents, whole contracts, `ts` seconds only
    with_ts_ms: bool = True
    with_taker_side: bool = True

    @property
    def price_e4(self) -> int:
        return self.yes_e4 if self.side == "yes" else _E4 - self.yes_e4

    @property
    def value_e6(self) -> int:
        return self.price_e4 * self.count_e2

    @property
    def effective_ts_ms(self) -> int:
        """The trade time a reader derives: `ts_ms`, else `ts` x 1000."""
        return self.ts_ms if self.with_ts_ms and not self.legacy else self.ts_ms // 1000 * 1000


@dataclass(frozen=True, slots=True)
class MsgFrame:
    """A trade envelope around an arbitrary (broken) `msg`; takes a seq like any frame of the subscription."""

    msg: Any


@dataclass(frozen=True, slots=True)
class RawLine:
    """A line that is not a well-formed envelope at all; it carries no seq."""

    text: str


Payload = Fill | MsgFrame | RawLine


@dataclass(slots=True)
class _Scenario:
    case: str
    ticker: str
    items: list[tuple[int, Payload]] = field(default_factory=list)  # (arrival_ms, payload)
    alerts: list[list[Fill]] = field(default_factory=list)
    must_not_alert: list[dict[str, Any]] = field(default_factory=list)
    malformed: str | None = None  # the malformed case name, for malformed frames

    def span(self) -> tuple[int, int]:
        times = [t for t, _ in self.items]
        times += [p.effective_ts_ms for _, p in self.items if isinstance(p, Fill)]
        return min(times), max(times)


@dataclass(slots=True)
class _Market:
    ticker: str
    mid_e4: int
    tick_e4: int


# ---------------------------------------------------------------------------------------------------- markets

_NFL = "ARI ATL BAL BUF CAR CHI CIN CLE DAL DEN DET GB HOU IND JAC KC LA LAC LV MIA MIN NE NO NYG NYJ PHI PIT SEA SF TB"
_MLB = "ARI ATH ATL BAL BOS CHC CIN CLE COL CWS DET HOU KC LAA LAD MIA MIL MIN NYM NYY PHI PIT SD SEA SF STL TB TEX TOR"
_EPL = "ARS AVL BOU BRE BHA BUR CHE CRY EVE FUL LEE LIV MCI MUN NEW NFO SUN TOT WHU WOL"
_CITIES = "NY CHI AUS MIA LAX DEN PHIL HOU"


def _pairs(rng: random.Random, teams: str, games: int) -> list[tuple[str, str]]:
    names = teams.split()
    rng.shuffle(names)
    return [(names[2 * i], names[2 * i + 1]) for i in range(min(games, len(names) // 2))]


def build_markets(rng: random.Random) -> list[_Market]:
    """A day's worth of Kalshi tickers, most popular first."""
    day = "26SEP13"
    tickers: list[str] = []
    for away, home in _pairs(rng, _NFL, 13):
        game = f"{day}{away}{home}"
        tickers += [f"KXNFLGAME-{game}-{away}", f"KXNFLGAME-{game}-{home}"]
        fav = rng.choice((away, home))
        tickers += [f"KXNFLSPREAD-{game}-{fav}{n}" for n in (3, 7, 10)]
        tickers += [f"KXNFLTOTAL-{game}-{n}" for n in (41, 44, 47)]
    for away, home in _pairs(rng, _MLB, 14):
        game = f"{day}{away}{home}"
        tickers += [f"KXMLBGAME-{game}-{away}", f"KXMLBGAME-{game}-{home}"]
    for away, home in _pairs(rng, _EPL, 3):
        game = f"{day}{home}{away}"
        tickers += [f"KXEPLGAME-{game}-{home}", f"KXEPLGAME-{game}-{away}", f"KXEPLGAME-{game}-TIE"]
    for hour in ("14", "15", "16"):
        base = 117_000 + rng.randrange(0, 2000, 250)
        tickers += [f"KXBTCD-{day}{hour}-T{base + 250 * k - 0.01:.2f}" for k in range(-4, 5)]
        tickers += [f"KXBTC-{day}{hour}-B{base + 250 * k + 125}" for k in range(-3, 4)]
        eth = 4_400 + rng.randrange(0, 200, 25)
        tickers += [f"KXETHD-{day}{hour}-T{eth + 25 * k - 0.01:.2f}" for k in range(-3, 4)]
        tickers += [f"KXSOLD-{day}{hour}-T{212 + 2 * k - 0.01:.2f}" for k in range(-2, 3)]
    tickers += [f"KXFEDDECISION-26SEP-{code}" for code in ("H0", "C25", "C50", "H25")]
    tickers += [f"KXRATECUTCOUNT-26DEC31-T{n}" for n in (1, 2, 3)]
    tickers += [f"KXCPIYOY-26AUG-T{v}" for v in ("2.7", "2.8", "2.9", "3.0")]
    tickers += [f"KXPAYROLLS-26SEP-T{v}" for v in (25000, 50000, 75000, 100000)]
    tickers += [f"KXSENATE{st}-26-{p}" for st in ("GA", "ME", "NC", "MI", "OH", "TX") for p in ("D", "R")]
    tickers += ["KXCONTROLH-26-D", "KXCONTROLH-26-R", "KXCONTROLS-26-D", "KXCONTROLS-26-R"]
    tickers += ["KXGOVSHUT-26OCT01", "KXAPRPOTUS-26SEP19-B44", "KXAPRPOTUS-26SEP19-B45"]
    for city in _CITIES.split():
        high = rng.randint(74, 96)
        tickers += [f"KXHIGH{city}-{day}-B{high + 2 * k + 0.5}" for k in range(-2, 3)]
        tickers += [f"KXHIGH{city}-{day}-T{high + 6}", f"KXHIGH{city}-{day}-T{high - 5}"]
    tickers += [f"KXRAIN{city}-{day}" for city in ("NYC", "CHI", "HOU")]
    for _ in range(25):
        tickers.append(f"KXMVENFLMULTIGAMEEXTENDED-S2026{rng.getrandbits(40):010X}-{rng.getrandbits(44):011X}")

    rng.shuffle(tickers)
    markets = []
    for ticker in tickers:
        mid = rng.randint(3, 97) * 100
        # Some long shots trade in tenths of a cent.
        tick = 10 if (mid <= 1000 or mid >= 9000) and rng.random() < 0.5 else 100
        markets.append(_Market(ticker, mid, tick))
    return markets


# ---------------------------------------------------------------------------------------------------- rendering


def _fmt_e4(value: int) -> str:
    return f"{value // _E4}.{value % _E4:04d}"


def _fmt_e2(value: int) -> str:
    return f"{value // 100}.{value % 100:02d}"


def render_fill(fill: Fill, seq: int) -> str:
    """The frame Kalshi would send for this fill."""
    if fill.legacy:
        return (
            f'{{"type":"trade","sid":{SID},"seq":{seq},"msg":{{"trade_id":"{fill.trade_id}",'
            f'"market_ticker":"{fill.ticker}","yes_price":{fill.yes_e4 // 100},"no_price":{(_E4 - fill.yes_e4) // 100},'
            f'"count":{fill.count_e2 // 100},"taker_side":"{fill.side}","ts":{fill.ts_ms // 1000}}}}}'
        )
    book = "bid" if fill.side == "yes" else "ask"
    deprecated = f'"taker_side":"{fill.side}",' if fill.with_taker_side else ""
    ts_ms = f',"ts_ms":{fill.ts_ms}' if fill.with_ts_ms else ""
    return (
        f'{{"type":"trade","sid":{SID},"seq":{seq},"msg":{{"trade_id":"{fill.trade_id}",'
        f'"market_ticker":"{fill.ticker}","yes_price_dollars":"{_fmt_e4(fill.yes_e4)}",'
        f'"no_price_dollars":"{_fmt_e4(_E4 - fill.yes_e4)}","count_fp":"{_fmt_e2(fill.count_e2)}",'
        f'{deprecated}"taker_outcome_side":"{fill.side}","taker_book_side":"{book}",'
        f'"is_block_trade":{"true" if fill.block else "false"},"ts":{fill.ts_ms // 1000}{ts_ms}}}}}'
    )


def _fill_msg(fill: Fill) -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(render_fill(fill, 0))
    msg: dict[str, Any] = envelope["msg"]
    return msg


def subscribed_ack() -> str:
    return f'{{"id":1,"type":"subscribed","msg":{{"channel":"trade","sid":{SID}}}}}'


# ---------------------------------------------------------------------------------------------------- expectations


def _usd(value_e6: int) -> Decimal:
    return Decimal(value_e6).scaleb(-6)


def _iso_ms(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def expected_alert(case: str, fills: list[Fill]) -> dict[str, Any]:
    """What `would_post` must say for a group made of exactly these fills (fields of `alert_log_fields`)."""
    ordered = sorted(fills, key=lambda f: (f.effective_ts_ms, f.trade_id))
    value_e6 = sum(f.value_e6 for f in ordered)
    prices = [f.price_e4 for f in ordered]
    return {
        "case": case,
        "alert_id": ordered[0].trade_id,
        "trade_ids": [f.trade_id for f in ordered],
        "ticker": ordered[0].ticker,
        "side": ordered[0].side,
        "contracts": _fmt_e2(sum(f.count_e2 for f in ordered)),
        "value_usd": str(_usd(value_e6).quantize(Decimal("0.01"))),
        "value_usd_exact": str(_usd(value_e6)),
        "fills": len(ordered),
        "price_low": _fmt_e4(min(prices)),
        "price_high": _fmt_e4(max(prices)),
        "is_block_trade": ordered[0].block,
        "created_time": _iso_ms(ordered[0].effective_ts_ms),
    }


def _not_alert(case: str, fills: list[Fill], why: str) -> dict[str, Any]:
    return {
        "case": case,
        "ticker": fills[0].ticker,
        "side": fills[0].side,
        "trade_ids": [f.trade_id for f in fills],
        "value_usd_exact": str(_usd(sum(f.value_e6 for f in fills))),
        "why": why,
    }


# ---------------------------------------------------------------------------------------------------- generator


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What to generate. `whales` is the number of random whales on top of the fixed edge cases (default: one
    per 20,000 frames); `malformed_sets` how many times the malformed catalog is planted (default: one per
    100,000 frames, at least one)."""

    frames: int
    seed: int
    whales: int | None = None
    malformed_sets: int | None = None
    rate_per_s: float = DEFAULT_RATE_PER_S
    bursts: bool = True
    start_ms: int = DEFAULT_START_MS
    threshold_usd: Decimal = DEFAULT_THRESHOLD_USD
    sweep_window_ms: int = DEFAULT_SWEEP_WINDOW_MS
    edge_cases: bool = True

    @property
    def extra_whales(self) -> int:
        return self.frames // 20_000 if self.whales is None else self.whales

    @property
    def malformed_repeats(self) -> int:
        return max(1, self.frames // 100_000) if self.malformed_sets is None else self.malformed_sets


class CaptureGenerator:
    """Plans the planted events up front (so `expected_alerts` is known at once), then streams the frames.

    `frames()` yields `(arrival_ms, line, trade_id)` in arrival order; `manifest()` is complete once it is
    exhausted.
    """

    def __init__(self, spec: CaptureSpec) -> None:
        if spec.sweep_window_ms < 200:
            raise ValueError("the planted sweeps assume a sweep window of at least 200 ms")
        self.spec = spec
        self._plan_rng = random.Random(f"plan-{spec.seed}")
        self._bg_rng = random.Random(f"background-{spec.seed}")
        self._id_rng = random.Random(f"ids-{spec.seed}")
        self.markets = build_markets(random.Random(f"markets-{spec.seed}"))
        self._threshold_e6 = int(spec.threshold_usd * _USD_E6)
        if Decimal(self._threshold_e6) != spec.threshold_usd * _USD_E6:
            raise ValueError("threshold must be a whole number of micro-dollars")
        self._margin_ms = 2 * spec.sweep_window_ms + 2000
        self.scenarios = self._plan()
        planted = sum(len(s.items) for s in self.scenarios)
        self.background_frames = spec.frames - 1 - planted
        if self.background_frames < 0:
            raise ValueError(f"{spec.frames} frames cannot hold the {planted} planted frames; ask for more")
        self._stats: dict[str, Any] | None = None

    # ---- planning

    def _new_id(self) -> str:
        return str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))

    def _plan(self) -> list[_Scenario]:
        spec, rng = self.spec, self._plan_rng
        builders: list[Any] = []
        if spec.edge_cases:
            builders += [
                self._single_fill,
                self._sweep,
                self._block_trade,
                self._block_beside_fills,
                self._under_threshold,
                self._exact_threshold,
                self._opposite_sides_under,
                self._opposite_sides_one_over,
                self._duplicate_big_fill,
                self._duplicate_in_near_miss,
                self._legacy_frame,
                self._split_by_window,
            ]
        builders += [self._single_fill if rng.random() < 0.35 else self._sweep for _ in range(spec.extra_whales)]
        builders += [
            (lambda t0, ticker, case=case: self._malformed(case, t0, ticker))
            for _ in range(spec.malformed_repeats)
            for case in MALFORMED_REASONS
        ]
        rng.shuffle(builders)

        # Spread them over the trade time the background will cover, clear of the first and last seconds.
        background_estimate = max(1, spec.frames - 1 - 6 * len(builders))
        span_ms = background_estimate / spec.rate_per_s * 1000
        lead_ms = min(2000.0, span_ms * 0.05)
        usable_ms = max(1.0, span_ms * 0.95 - 2 * lead_ms - 3 * spec.sweep_window_ms)
        # Whales happen where the volume is: popular markets are picked more often.
        cum = list(itertools.accumulate(1.0 / (rank + 8) for rank in range(len(self.markets))))
        last_used: dict[str, int] = {}
        scenarios = []
        for i, build in enumerate(builders):
            t0 = spec.start_ms + int(lead_ms + usable_ms * (i + rng.random() * 0.5) / len(builders))
            for _ in range(1000):
                market = self.markets[bisect.bisect(cum, rng.random() * cum[-1])]
                if t0 - last_used.get(market.ticker, -(10**15)) > 4 * self._margin_ms:
                    break
            else:
                raise ValueError("too many planted events for the markets and time available")
            scenario: _Scenario = build(t0, market.ticker)
            last_used[market.ticker] = scenario.span()[1]
            scenarios.append(scenario)
        return scenarios

    def _fill(self, ticker: str, side: str, price_e4: int, count_e2: int, ts_ms: int, **kw: Any) -> Fill:
        yes_e4 = price_e4 if side == "yes" else _E4 - price_e4
        return Fill(self._new_id(), ticker, side, yes_e4, count_e2, ts_ms, **kw)

    def _offsets(self, n: int) -> list[int]:
        # Fills of one order share a millisecond or trail by a few; the whole walk stays well inside the window.
        limit = self.spec.sweep_window_ms * 6 // 10
        out, t = [0], 0
        for _ in range(n - 1):
            t = min(limit, t + self._plan_rng.choice((0, 0, 1, 2, 3, 5, 8, 13, 40, 120)))
            out.append(t)
        return out

    def _fills_for_values(
        self, ticker: str, side: str, t0: int, values_e6: list[int], price_e4: int, **kw: Any
    ) -> list[Fill]:
        """Fills walking the book from `price_e4` (a cent up now and then), each worth about its target value."""
        rng = self._plan_rng
        fills = []
        for value_e6, offset in zip(values_e6, self._offsets(len(values_e6)), strict=True):
            if rng.random() < 0.3:
                count_e2 = max(1, round(value_e6 / price_e4))  # a fractional count
            else:
                count_e2 = max(1, round(value_e6 / price_e4 / 100)) * 100
            fills.append(self._fill(ticker, side, price_e4, count_e2, t0 + offset, **kw))
            if rng.random() < 0.7:
                price_e4 = min(9900, price_e4 + 100)
        return fills

    def _half_cent_tie(self, fills: list[Fill]) -> bool:
        # A value ending in exactly half a cent rounds differently by rounding mode; keep the manifest unambiguous.
        return sum(f.value_e6 for f in fills) % 10_000 == 5_000

    def _random_price(self) -> int:
        return self._plan_rng.randint(8, 92) * 100

    def _single_fill(self, t0: int, ticker: str) -> _Scenario:
        rng, th = self._plan_rng, self._threshold_e6
        while True:
            value_e6 = int(th * math.exp(rng.uniform(0.0, math.log(6.0))))
            fills = self._fills_for_values(ticker, rng.choice(("yes", "no")), t0, [value_e6], self._random_price())
            if fills[0].value_e6 >= th and not self._half_cent_tie(fills):
                return _Scenario("single_fill", ticker, [(t0, f) for f in fills], alerts=[fills])

    def _sweep(self, t0: int, ticker: str) -> _Scenario:
        rng, th = self._plan_rng, self._threshold_e6
        while True:
            total = int(th * rng.uniform(1.08, 3.2))
            n = max(2, math.ceil(total / (th * 0.9))) + rng.randint(0, 4)
            weights = [rng.uniform(0.5, 1.5) for _ in range(n)]
            values = [int(total * w / sum(weights)) for w in weights]
            fills = self._fills_for_values(ticker, rng.choice(("yes", "no")), t0, values, self._random_price())
            value = sum(f.value_e6 for f in fills)
            if value >= th and max(f.value_e6 for f in fills) < th and not self._half_cent_tie(fills):
                return _Scenario("sweep", ticker, [(f.ts_ms, f) for f in fills], alerts=[fills])

    def _block_trade(self, t0: int, ticker: str) -> _Scenario:
        rng = self._plan_rng
        value_e6 = int(self._threshold_e6 * rng.uniform(1.5, 5.0)) // 10**8 * 10**8
        price = self._random_price()
        count_e2 = -(-value_e6 // price // 100) * 100
        fill = self._fill(ticker, rng.choice(("yes", "no")), price, count_e2, t0, block=True)
        return _Scenario("block_trade", ticker, [(t0, fill)], alerts=[[fill]])

    def _block_beside_fills(self, t0: int, ticker: str) -> _Scenario:
        # A block trade and ordinary fills on the same side at the same moment: grouped they would be a whale.
        th, side, price = self._threshold_e6, "yes", self._random_price()
        block = self._fill(ticker, side, price, -(-th * 6 // 10 // price // 100) * 100, t0 + 2, block=True)
        fills = self._fills_for_values(ticker, side, t0, [th // 4, th // 4], price)
        assert block.value_e6 < th and sum(f.value_e6 for f in fills) < th <= block.value_e6 + sum(
            f.value_e6 for f in fills
        )
        items = [(f.ts_ms, f) for f in [*fills, block]]
        why = "a block trade stands alone; the fills beside it add up to less than the threshold"
        return _Scenario(
            "block_beside_fills",
            ticker,
            items,
            must_not_alert=[_not_alert("block_beside_fills", [block, *fills], why)],
        )

    def _boundary_sweep(self, t0: int, ticker: str, side: str, target_e6: int) -> list[Fill]:
        """A sweep worth exactly `target_e6`: whole-cent fills walking up to 50 cents, the last one taking the rest."""
        rng = self._plan_rng
        fills = []
        offsets = self._offsets(4)
        for k, price in enumerate((4700, 4800, 4900)):
            count_e2 = rng.randint(40_000, 50_000) * target_e6 // self._threshold_e6 * 100
            fills.append(self._fill(ticker, side, price, count_e2, t0 + offsets[k]))
        rest_e6 = target_e6 - sum(f.value_e6 for f in fills)
        # At 50 cents any whole-cent rest is a count with two decimals: count = 2 x rest.
        assert rest_e6 > 0 and rest_e6 % 10_000 == 0
        fills.append(self._fill(ticker, side, 5000, rest_e6 // 5000, t0 + offsets[3]))
        assert sum(f.value_e6 for f in fills) == target_e6
        return fills

    def _under_threshold(self, t0: int, ticker: str) -> _Scenario:
        fills = self._boundary_sweep(t0, ticker, "no", self._threshold_e6 - 10_000)
        why = "one cent under the threshold"
        return _Scenario(
            "under_threshold_by_a_cent",
            ticker,
            [(f.ts_ms, f) for f in fills],
            must_not_alert=[_not_alert("under_threshold_by_a_cent", fills, why)],
        )

    def _exact_threshold(self, t0: int, ticker: str) -> _Scenario:
        fills = self._boundary_sweep(t0, ticker, "yes", self._threshold_e6)
        return _Scenario("exact_threshold", ticker, [(f.ts_ms, f) for f in fills], alerts=[fills])

    def _opposite_sides_under(self, t0: int, ticker: str) -> _Scenario:
        th, price = self._threshold_e6, self._random_price()
        yes = self._fills_for_values(ticker, "yes", t0, [th * 3 // 10, th * 3 // 10], price)
        no = self._fills_for_values(ticker, "no", t0 + 1, [th * 3 // 10, th * 3 // 10], _E4 - price)
        why = "each side is under the threshold; only both sides together would cross it"
        return _Scenario(
            "opposite_sides_under",
            ticker,
            sorted(((f.ts_ms, f) for f in [*yes, *no]), key=lambda item: item[0]),
            must_not_alert=[
                _not_alert("opposite_sides_under", yes, why),
                _not_alert("opposite_sides_under", no, why),
            ],
        )

    def _opposite_sides_one_over(self, t0: int, ticker: str) -> _Scenario:
        th, price = self._threshold_e6, self._random_price()
        while True:
            yes = self._fills_for_values(ticker, "yes", t0, [th * 45 // 100] * 3, price)
            if not self._half_cent_tie(yes):
                break
        no = self._fills_for_values(ticker, "no", t0 + 3, [th * 3 // 20, th * 3 // 20], _E4 - price)
        why = "the other side of a whale, at the same time: not part of it"
        return _Scenario(
            "opposite_sides_one_over",
            ticker,
            sorted(((f.ts_ms, f) for f in [*yes, *no]), key=lambda item: item[0]),
            alerts=[yes],
            must_not_alert=[_not_alert("opposite_sides_one_over", no, why)],
        )

    def _duplicate_big_fill(self, t0: int, ticker: str) -> _Scenario:
        scenario = self._single_fill(t0, ticker)
        fill = scenario.alerts[0][0]
        # The same trade delivered again 3 s later, long after its group closed: must not post twice.
        scenario.items.append((t0 + 3000, fill))
        scenario.case = "duplicate_redelivered"
        return scenario

    def _duplicate_in_near_miss(self, t0: int, ticker: str) -> _Scenario:
        th = self._threshold_e6
        fills = self._fills_for_values(ticker, "yes", t0, [th * 40 // 100, th * 35 // 100], self._random_price())
        assert sum(f.value_e6 for f in fills) < th <= sum(f.value_e6 for f in fills) + fills[1].value_e6
        items = [(f.ts_ms, f) for f in fills] + [(fills[1].ts_ms + 150, fills[1])]
        why = "under the threshold; one fill is re-delivered inside the window and must count once"
        return _Scenario(
            "duplicate_in_near_miss",
            ticker,
            items,
            must_not_alert=[_not_alert("duplicate_in_near_miss", fills, why)],
        )

    def _legacy_frame(self, t0: int, ticker: str) -> _Scenario:
        rng = self._plan_rng
        price = rng.randint(30, 70) * 100
        count_e2 = -(-int(self._threshold_e6 * rng.uniform(1.1, 2.0)) // price // 100) * 100
        fill = self._fill(ticker, "yes", price, count_e2, t0, legacy=True)
        return _Scenario("legacy_integer_frame", ticker, [(t0, fill)], alerts=[[fill]])

    def _split_by_window(self, t0: int, ticker: str) -> _Scenario:
        th, price = self._threshold_e6, self._random_price()
        first = self._fills_for_values(ticker, "no", t0, [th * 6 // 10], price)
        later = t0 + self.spec.sweep_window_ms + 500
        second = self._fills_for_values(ticker, "no", later, [th * 6 // 10], price)
        why = "two orders more than a sweep window apart; each is under the threshold"
        return _Scenario(
            "split_by_window",
            ticker,
            [(f.ts_ms, f) for f in [*first, *second]],
            must_not_alert=[_not_alert("split_by_window", first, why), _not_alert("split_by_window", second, why)],
        )

    def _malformed(self, case: str, t0: int, ticker: str) -> _Scenario:
        # Whale-sized on purpose: a normalizer that let one through would show up as an extra alert.
        fill = self._fill(ticker, "yes", 5000, 30_000_000, t0)
        msg = _fill_msg(fill)
        payload: Payload
        if case == "truncated_frame":
            payload = RawLine(render_fill(fill, 0).replace(',"seq":0', "")[:110])
        elif case == "plain_text":
            payload = RawLine(f"trade {ticker} yes 0.5000 x 300000")
        elif case == "json_array":
            payload = RawLine(json.dumps([{"type": "trade", "sid": SID, "msg": msg}], separators=(",", ":")))
        elif case == "json_string":
            payload = RawLine('"heartbeat"')
        elif case == "msg_is_string":
            payload = MsgFrame(json.dumps(msg, separators=(",", ":")))
        else:
            broken = dict(msg)
            if case == "missing_side":
                for key in ("taker_side", "taker_outcome_side", "taker_book_side"):
                    broken.pop(key, None)
            elif case == "side_buy":
                broken["taker_outcome_side"] = "buy"
            elif case == "price_abc":
                broken["yes_price_dollars"] = "abc"
            elif case == "price_1_5":
                broken["yes_price_dollars"], broken["no_price_dollars"] = "1.5000", "-0.5000"
            elif case == "count_zero":
                broken["count_fp"] = "0"
            elif case == "count_negative":
                broken["count_fp"] = "-300000.00"
            elif case == "count_is_list":
                broken["count_fp"] = [300000]
            elif case == "price_is_bool":
                broken["yes_price_dollars"] = True
            elif case == "block_is_string":
                broken["is_block_trade"] = "true"
            elif case == "ts_ms_is_string":
                broken["ts_ms"] = str(broken["ts_ms"])
            elif case == "trade_id_is_int":
                broken["trade_id"] = 12345
            elif case == "ticker_is_null":
                broken["market_ticker"] = None
            elif case == "no_count":
                del broken["count_fp"]
            elif case == "no_price":
                del broken["yes_price_dollars"], broken["no_price_dollars"]
            else:
                raise ValueError(case)
            payload = MsgFrame(broken)
        return _Scenario(f"malformed:{case}", ticker, [(t0, payload)], malformed=case)

    # ---- streaming

    @property
    def expected_alerts(self) -> list[dict[str, Any]]:
        alerts = [expected_alert(s.case, fills) for s in self.scenarios for fills in s.alerts]
        return sorted(alerts, key=lambda a: (a["created_time"], a["alert_id"]))

    def _blocked(self) -> dict[str, list[tuple[int, int]]]:
        blocked: dict[str, list[tuple[int, int]]] = {}
        for s in self.scenarios:
            if s.malformed is not None:
                continue
            lo, hi = s.span()
            blocked.setdefault(s.ticker, []).append((lo - self._margin_ms, hi + self._margin_ms))
        return blocked

    def _background(self) -> Iterator[Fill]:
        """Ordinary trades in arrival order; no ticker and side ever adds up to more than the key cap."""
        spec, rng, markets = self.spec, self._bg_rng, self.markets
        cum = list(itertools.accumulate(1.0 / (rank + 8) ** 1.1 for rank in range(len(markets))))
        total_weight = cum[-1]
        blocked = self._blocked()
        base_per_ms = spec.rate_per_s / 1000 / (_RATE_GAIN if spec.bursts else 1.0)
        recent: dict[tuple[int, str], deque[tuple[int, int]]] = {}
        held: dict[tuple[int, str], int] = {}
        span_ms = self._margin_ms
        new_id = self._new_id
        t = float(spec.start_ms)
        regime_end, rate_per_ms, hot = t + rng.expovariate(1 / _QUIET_MEAN_MS), base_per_ms, -1
        for _ in range(self.background_frames):
            t += rng.expovariate(rate_per_ms)
            while t >= regime_end:
                if spec.bursts and hot < 0 and rng.random() < _BURST_CHANCE:
                    hot = bisect.bisect(cum, rng.random() * total_weight)
                    rate_per_ms = base_per_ms * rng.uniform(*_BURST_FACTOR)
                    regime_end += rng.uniform(*_BURST_MS)
                else:
                    hot, rate_per_ms = -1, base_per_ms
                    regime_end += rng.expovariate(1 / _QUIET_MEAN_MS)
            ts_ms = int(t)
            while True:
                if hot >= 0 and rng.random() < _BURST_HOT_SHARE:
                    index = hot
                else:
                    index = bisect.bisect(cum, rng.random() * total_weight)
                market = markets[index]
                spans = blocked.get(market.ticker)
                if spans and any(lo <= ts_ms <= hi for lo, hi in spans):
                    hot = -1 if index == hot else hot
                    continue
                side = "yes" if rng.random() < 0.55 else "no"
                if rng.random() < 0.08:
                    step = market.tick_e4 * rng.choice((-2, -1, 1, 2))
                    market.mid_e4 = min(_E4 - market.tick_e4, max(market.tick_e4, market.mid_e4 + step))
                yes_e4 = market.mid_e4
                price_e4 = yes_e4 if side == "yes" else _E4 - yes_e4
                contracts = rng.lognormvariate(2.4, 1.5)
                fractional = rng.random() < 0.2  # a fifth of trades are in fractions of a contract
                count_e2 = max(1, int(contracts * 100)) if fractional else max(1, round(contracts)) * 100
                key = (index, side)
                queue = recent.get(key)
                if queue is None:
                    queue = recent[key] = deque()
                    held[key] = 0
                while queue and queue[0][0] < ts_ms - span_ms:
                    held[key] -= queue.popleft()[1]
                room_e6 = min(_TRADE_CAP_E6, _KEY_CAP_E6 - held[key])
                if count_e2 * price_e4 > room_e6:
                    count_e2 = room_e6 // price_e4
                    if count_e2 < 100:
                        continue  # this ticker and side are busy enough; take another market
                    count_e2 = count_e2 // 100 * 100
                value_e6 = count_e2 * price_e4
                queue.append((ts_ms, value_e6))
                held[key] += value_e6
                break
            yield Fill(
                new_id(),
                market.ticker,
                side,
                yes_e4,
                count_e2,
                ts_ms,
                block=rng.random() < 0.0005,
                with_ts_ms=rng.random() >= 0.02,
                with_taker_side=rng.random() < 0.7,
            )

    def frames(self, first_seq: int = 1) -> Iterator[tuple[int, str, str | None]]:
        """`(arrival_ms, line, trade_id or None)` for every line of the capture, in order.

        `first_seq` lets a live bench continue one subscription's numbering across several generated parts.
        """
        planted: list[tuple[int, int, Payload, str]] = []
        for order, (arrival_ms, payload, case) in enumerate((t, p, s.case) for s in self.scenarios for t, p in s.items):
            planted.append((arrival_ms, order, payload, case))
        heapq.heapify(planted)
        seq = first_seq - 1
        line_no = 1
        malformed: list[dict[str, Any]] = []
        reasons: Counter[str] = Counter()
        duplicates = trades = 0
        seen: set[str] = set()
        first_ms = last_ms = self.spec.start_ms
        yield self.spec.start_ms, subscribed_ack(), None

        def emit_planted(arrival_ms: int, payload: Payload, case: str) -> tuple[int, str, str | None]:
            nonlocal seq, duplicates, trades
            if isinstance(payload, RawLine):
                name = case.removeprefix("malformed:")
                malformed.append({"line": line_no, "case": name, "reason": MALFORMED_REASONS[name]})
                reasons[MALFORMED_REASONS[name]] += 1
                return arrival_ms, payload.text, None
            seq += 1
            if isinstance(payload, MsgFrame):
                name = case.removeprefix("malformed:")
                malformed.append({"line": line_no, "case": name, "reason": MALFORMED_REASONS[name]})
                reasons[MALFORMED_REASONS[name]] += 1
                envelope = {"type": "trade", "sid": SID, "seq": seq, "msg": payload.msg}
                return arrival_ms, json.dumps(envelope, separators=(",", ":")), None
            trades += 1
            if payload.trade_id in seen:
                duplicates += 1
            seen.add(payload.trade_id)
            return arrival_ms, render_fill(payload, seq), payload.trade_id

        for fill in self._background():
            while planted and planted[0][0] <= fill.ts_ms:
                arrival_ms, _, payload, case = heapq.heappop(planted)
                line_no += 1
                yield emit_planted(arrival_ms, payload, case)
            seq += 1
            trades += 1
            line_no += 1
            last_ms = fill.ts_ms
            yield fill.ts_ms, render_fill(fill, seq), fill.trade_id
        while planted:
            arrival_ms, _, payload, case = heapq.heappop(planted)
            line_no += 1
            last_ms = max(last_ms, arrival_ms)
            yield emit_planted(arrival_ms, payload, case)

        self._stats = {
            "lines": line_no,
            "trades": trades,
            "duplicates": duplicates,
            "first_ms": first_ms,
            "last_ms": last_ms,
            "malformed": malformed,
            "reasons": dict(sorted(reasons.items())),
        }

    def manifest(self, capture_name: str) -> dict[str, Any]:
        """The expected result of replaying the capture with the spec's threshold and sweep window."""
        if self._stats is None:
            raise RuntimeError("call frames() to the end first")
        spec, stats = self.spec, self._stats
        seconds = (stats["last_ms"] - stats["first_ms"]) / 1000
        return {
            "capture": capture_name,
            "generator": "bench/gen_capture.py",
            "spec": {
                "frames": spec.frames,
                "seed": spec.seed,
                "whales": spec.extra_whales,
                "malformed_sets": spec.malformed_repeats,
                "rate_per_s": spec.rate_per_s,
                "bursts": spec.bursts,
                "start_ms": spec.start_ms,
                "edge_cases": spec.edge_cases,
            },
            "settings": {
                "WHALE_THRESHOLD_DOLLARS": str(spec.threshold_usd),
                "SWEEP_WINDOW_MS": spec.sweep_window_ms,
            },
            "frames": stats["lines"],
            "control_frames": 1,
            "trade_frames": stats["trades"],
            "duplicates": stats["duplicates"],
            "trade_seconds": round(seconds, 3),
            "trades_per_s": round(stats["trades"] / seconds, 1) if seconds else None,
            "alerts": self.expected_alerts,
            "must_not_alert": [entry for s in self.scenarios for entry in s.must_not_alert],
            "malformed": {"count": len(stats["malformed"]), "reasons": stats["reasons"], "frames": stats["malformed"]},
        }


def manifest_path(capture: Path) -> Path:
    return capture.with_name(capture.name.removesuffix(".jsonl") + ".expected.json")


def write_capture(path: Path, spec: CaptureSpec) -> dict[str, Any]:
    """Write the capture and its manifest beside it; return the manifest."""
    generator = CaptureGenerator(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as out:
        batch: list[str] = []
        for _, line, _ in generator.frames():
            batch.append(line)
            if len(batch) >= 10_000:
                out.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            out.write("\n".join(batch) + "\n")
    manifest = generator.manifest(path.name)
    manifest_path(path).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, required=True, help="lines in the capture, all included")
    parser.add_argument("--out", type=Path, required=True, help="capture path; the manifest goes beside it")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--whales", type=int, help="random whales besides the edge cases (default frames/20,000)")
    parser.add_argument("--malformed-sets", type=int, help="copies of the malformed catalog (default frames/100,000)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_S, help="average trades per second")
    parser.add_argument("--no-bursts", action="store_true", help="a steady (Poisson) rate instead of bursts")
    parser.add_argument("--start-ms", type=int, default=DEFAULT_START_MS, help="trade time of the first frame")
    parser.add_argument("--threshold", type=Decimal, default=DEFAULT_THRESHOLD_USD, help="whale threshold, dollars")
    parser.add_argument("--window-ms", type=int, default=DEFAULT_SWEEP_WINDOW_MS, help="sweep window, ms")
    args = parser.parse_args(argv)
    spec = CaptureSpec(
        frames=args.frames,
        seed=args.seed,
        whales=args.whales,
        malformed_sets=args.malformed_sets,
        rate_per_s=args.rate,
        bursts=not args.no_bursts,
        start_ms=args.start_ms,
        threshold_usd=args.threshold,
        sweep_window_ms=args.window_ms,
    )
    manifest = write_capture(args.out, spec)
    print(
        f"{args.out}: {manifest['frames']} frames, {manifest['trade_frames']} trades over "
        f"{manifest['trade_seconds']} s ({manifest['trades_per_s']}/s), {len(manifest['alerts'])} expected alerts, "
        f"{manifest['malformed']['count']} malformed; manifest {manifest_path(args.out)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
