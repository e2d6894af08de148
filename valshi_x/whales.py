"""Whale detection: fills of one taker order grouped into sweeps, then the dollar threshold.

Pure: no asyncio, no I/O, no clock of its own. Time is trade time in Unix milliseconds, passed in by the
caller, so the same code serves live streams, replays and tests.

A sweep is a run of fills on the same ticker and taker side whose trade times lie within `sweep_window_ms`
of the group's first fill. Kalshi gives no order id, so this is the best link there is. Block trades are
negotiated off-book and always stand alone.

Exact without a Decimal per print: each group also sums its fills' values as floats, and a float sum can only
prove "clearly below" a limit; any group within `SCREEN_MARGIN` of the threshold (or of the near-whale mark), and
every alert's numbers, are computed with `Decimal` from the fills' original text. Why the margin is safe: each
`float(text)` is correctly rounded (relative error at most u = 2^-53), a product adds one more rounding, and a
recursive sum of n non-negative terms is off by at most gamma(n+2) = (n+2)u / (1 - (n+2)u) of the exact sum;
the float threshold carries two more roundings. For n below 10^9 fills (a group that large cannot fit in memory),
that is under 1.2e-7 of the value, far inside the margin of 1e-6: a float sum below `threshold x (1 - 1e-6)`
means an exact sum below the threshold. A $100,000 threshold leaves $0.10 of margin, so groups within ten cents
of it are summed exactly, which almost never happens.

Cheaper still, a first screen: no price exceeds $1, so a group's value is at most its contract count, and a float
sum of counts below the limit (same margin, same argument: one rounding fewer per term) already proves the group
below it. Only the rare group with that many contracts gets the float sum of values (`_value_f`, summed in arrival
order, once per fill), and only a group that passes both is summed exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import chain
from typing import Final, Protocol

import msgspec

from valshi_x.trades import Side, Trade, utc_from_ms

_TWO_PLACES = Decimal("0.01")
# Relative margin of the float screen (module docstring): a float sum below limit x (1 - SCREEN_MARGIN) is an exact
# sum below the limit.
SCREEN_MARGIN = 1e-6


@dataclass(slots=True, frozen=True)
class Alert:
    """A whale: one group of fills whose total value reached the threshold."""

    trade_ids: tuple[str, ...]
    ticker: str
    side: Side
    contracts: Decimal
    value_usd: Decimal  # exact sum of count x taker-side price over the fills
    fills: int
    price_low: Decimal  # taker-side price range over the fills, dollars
    price_high: Decimal
    is_block_trade: bool
    first_ts_ms: int
    last_ts_ms: int
    # The market's YES price (dollars) at its last trade before the sweep (None: none seen since start) and at the
    # sweep's last fill: the move a post shows.
    yes_before: Decimal | None = None
    yes_after: Decimal | None = None
    # Whales on this market in the 24 h up to this one, itself included: set by the poster from the outbox.
    market_whales_24h: int | None = None

    @property
    def alert_id(self) -> str:
        """Stable key of the alert: its first fill's trade id."""
        return self.trade_ids[0]

    @property
    def created_time(self) -> datetime:
        """Time of the first fill, UTC."""
        return utc_from_ms(self.first_ts_ms)

    @property
    def value_usd_2dp(self) -> str:
        return str(self.value_usd.quantize(_TWO_PLACES))

    @property
    def payout_usd(self) -> Decimal:
        """What the contracts pay if the side bought is right: $1 each."""
        return self.contracts


class _OpenGroup(msgspec.Struct, gc=False, eq=False):
    """Fills collected so far for one (ticker, side); mutable while the window is open.

    A msgspec Struct because half of all trades open a group of their own: built in C, it costs a third of a
    plain class. (Not tracked by the garbage collector: it refers to trades, and nothing refers back.) Compared
    by identity, like a plain object.
    """

    key: tuple[str, Side]
    first_ts_ms: int
    trades: list[Trade]
    count_f: float  # float sum of the fills' counts: bounds the value (module docstring); `exact_value` decides
    yes_before: str | None  # the market's YES price (text) at its last trade before this group opened
    value_f: float = 0.0  # float sum of the values of the first `valued` fills (`WhaleDetector._value_f`)
    valued: int = 0
    closed: bool = False
    alerted: bool = False  # closed as a whale: a late fill joins it without a second alert
    near: bool = False  # reached half the threshold once (`on_near_whale` was called)
    alert_id: str = ""  # set when it closed as a whale


class RecoveryGate(Protocol):
    """What the detector asks the recovery planner (valshi_x/recovery/planner.py) before a sweep closes."""

    version: int  # changes whenever a hold may have ended: held sweeps are asked again

    def may_close(self, lo_ms: int, hi_ms: int) -> bool:
        """May a sweep that can still take fills with trade times in [lo_ms, hi_ms] close now?"""
        ...

    def low_water_ms(self) -> int | None:
        """The oldest trade time a pending backfill may still bring, if any."""
        ...


# `WhaleDetector.add_batch` without a wall clock (replay, tests): trade time alone closes sweeps.
NO_CLOCK_MS: Final = 1 << 62
# `WhaleDetector.add_batch` without a leap limit (live and tests: the pipeline checked the trade time already).
NO_LEAP_LIMIT_MS: Final = 1 << 62

# (alert id, ticker, extra value in USD, trade id of the late fill)
GrewAfterAlert = Callable[[str, str, Decimal, str], None]


def exact_value(trades: list[Trade]) -> Decimal:
    """Exact value of a group: count x taker-side price per fill, summed in arrival order from the fills' text."""
    values = [Decimal(t.count_text) * Decimal(t.price_text) for t in trades]
    # Started from the first term, not Decimal(0), so the sum keeps the form (exponent) it had when summed per
    # fill; the digits are exact either way.
    return sum(values[1:], values[0])


def _alert_from(trades: list[Trade], value_usd: Decimal, yes_before: str | None) -> Alert:
    # Report fills in trade-time order; ids break ties so the alert id is stable across regrouping.
    fills = sorted(trades, key=lambda t: (t.ts_ms, t.trade_id))
    prices = [t.price_dollars for t in fills]
    first = fills[0]
    return Alert(
        trade_ids=tuple(t.trade_id for t in fills),
        ticker=first.ticker,
        side=first.taker_side,
        contracts=sum((t.count_fp for t in fills), Decimal(0)),
        value_usd=value_usd,
        fills=len(fills),
        price_low=min(prices),
        price_high=max(prices),
        is_block_trade=first.is_block_trade,
        first_ts_ms=first.ts_ms,
        last_ts_ms=fills[-1].ts_ms,
        yes_before=Decimal(yes_before) if yes_before is not None else None,
        yes_after=fills[-1].yes_price_dollars,
    )


class SeenTradeIds:
    """Trade ids seen lately, to count a re-delivered trade once, with bounded memory.

    Ids are forgotten once they are `horizon_ms` older (in trade time) than the newest trade seen, or when more
    than `max_ids` are held. Overlap older than that is the durable store's job. Ids are kept in one-second
    buckets of arrival order rather than one (time, id) pair each: at 250,000 ids that saves about 20 MB.
    """

    def __init__(self, horizon_ms: int, max_ids: int) -> None:
        self._horizon_s = horizon_ms // 1000
        self._max_ids = max_ids
        self._ids: set[str] = set()
        self._buckets: deque[tuple[int, list[str]]] = deque()  # (trade second, ids), oldest first
        # Below any trade's second, so the first id always starts a bucket (the hot path then only appends).
        self._newest_s = -(1 << 62)
        self._newest_ids: list[str] = []  # the newest bucket's ids (the hot path appends here)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, trade_id: object) -> bool:
        return trade_id in self._ids

    def add(self, trade_id: str, ts_ms: int) -> bool:
        """Remember the id; False if it was already known. (`WhaleDetector.add_batch` has this inline.)"""
        ids = self._ids
        if trade_id in ids:
            return False
        ids.add(trade_id)
        second = ts_ms // 1000
        if second > self._newest_s:
            self._start_second(second, trade_id)
        else:
            # Same second, or an older trade (a backfill): it rides in the newest bucket and leaves with it.
            self._newest_ids.append(trade_id)
        if len(ids) > self._max_ids:
            self._forget_over_cap()
        return True

    def _start_second(self, second: int, trade_id: str) -> list[str]:
        """A newer second begins with `trade_id` (already in the set): a new bucket, and the oldest ones go."""
        self._newest_s = second
        self._newest_ids = newest = [trade_id]
        buckets = self._buckets
        buckets.append((second, newest))
        oldest_kept = second - self._horizon_s
        ids = self._ids
        while buckets[0][0] < oldest_kept:
            ids.difference_update(buckets.popleft()[1])
        return newest

    def _forget_over_cap(self) -> None:
        """Oldest seconds first; within the newest second too, should one second alone hold more than the cap."""
        ids, buckets = self._ids, self._buckets
        while len(ids) > self._max_ids and len(buckets) > 1:
            ids.difference_update(buckets.popleft()[1])
        excess = len(ids) - self._max_ids
        if excess > 0:
            newest = self._newest_ids
            ids.difference_update(newest[:excess])
            del newest[:excess]


class WhaleDetector:
    """Groups fills into sweeps and yields an `Alert` for every group whose value reaches the threshold.

    `add` closes groups whose window has passed in stream time (a later trade beyond it); `close_due` closes
    them on the caller's clock when the stream goes quiet; `flush` closes everything (end of replay, shutdown).

    Late fills (a backfill after a gap) still find their sweep: a key may have several open groups, and a sweep
    that is due to close is first asked about at the `gate` (the recovery planner): while a pending backfill
    window could still bring one of its fills, it is held open (bounded by the planner's deadline). Closed sweeps
    are kept for `late_fill_horizon_ms` of stream time (and while a pending window may still bring their fills):
    a late fill inside the window of one that closed short reopens it (a gap noticed only after the window
    ended); one inside the window of a sweep already alerted joins it silently (`on_grew_after_alert`), so one
    order is never alerted twice.

    Memory is bounded by count as well as by time (issue 11): at most `max_kept_trades` fills in kept closed
    sweeps (the oldest sweeps go first; `kept_forgotten_early` counts those that left before their time) and at
    most `dedup_max_ids` trade ids (`SeenTradeIds`). The defaults fit the live budget of 150 MB peak RSS: some
    58 MB are interpreter and libraries, and a detector held at both caps (50,000 kept fills, 200,000 ids: 25 s of
    closed sweeps and 100 s of ids at 2,000 trades/s) measured about 60 MB more, flat over 10 minutes of trade time
    at that rate. Ids cover more than the kept fills on purpose, so a re-delivered fill is never added twice to a
    kept sweep; a whale re-delivered after its ids left is refused by the durable outbox, which never lets one
    trade belong to two alerts.
    """

    def __init__(
        self,
        threshold_usd: Decimal,
        sweep_window_ms: int,
        *,
        dedup_horizon_ms: int = 35 * 60 * 1000,
        dedup_max_ids: int = 200_000,
        late_fill_horizon_ms: int = 120_000,
        max_kept_trades: int = 50_000,
        max_priced_markets: int = 20_000,
        gate: RecoveryGate | None = None,
        on_near_whale: Callable[[str], None] | None = None,
        on_grew_after_alert: GrewAfterAlert | None = None,
    ) -> None:
        self.threshold_usd = threshold_usd
        # Below this float sum a group is no whale (module docstring); at or above it, Decimal decides.
        self._clearly_below_f = float(threshold_usd) * (1 - SCREEN_MARGIN)
        self.exact_sums = 0  # groups whose value was summed exactly: alerts and the few near a limit
        self.late_fill_horizon_ms = late_fill_horizon_ms
        self.sweep_window_ms = sweep_window_ms
        self.seen = SeenTradeIds(dedup_horizon_ms, dedup_max_ids)
        self.gate = gate
        self.on_near_whale = on_near_whale  # also sets `_near_usd`
        self.on_grew_after_alert = on_grew_after_alert
        # Open groups per (ticker, side), oldest first; almost always one.
        self._open: dict[tuple[str, Side], list[_OpenGroup]] = {}
        self._open_count = 0
        # Open groups in the order they were opened. Trade times arrive nearly in order, so the front is (nearly)
        # the oldest; a group slightly out of order merely closes a little late. Cheaper than a heap per trade.
        self._opened: deque[_OpenGroup] = deque()
        # Groups opened by a trade stamped ahead of the caller's wall clock (live, clock skew): kept apart, so that
        # one such group cannot hold up the groups opened after it until the wall clock passes it. None while the
        # host clock keeps step with Kalshi's; most new groups when it runs a little behind (closed from the front).
        self._ahead: deque[_OpenGroup] = deque()
        # Groups due to close that the gate holds open; asked again when the gate's version changes.
        self._held: list[_OpenGroup] = []
        self._held_version = -1
        # Closed sweeps, per key and in closing order, for late fills to find (see the class docstring).
        self._kept: dict[tuple[str, Side], list[_OpenGroup]] = {}
        self._closed_order: deque[_OpenGroup] = deque()
        self.max_kept_trades = max_kept_trades
        self.kept_trades = 0  # fills in kept closed sweeps, held at or below max_kept_trades
        self.kept_forgotten_early = 0  # kept sweeps dropped by the count cap before their time was up
        self.late_fills_rejoined = 0
        self.late_fills_after_alert = 0
        self.watermark_ms = 0  # newest trade time seen
        # Each market's YES price (text) at its latest trade taken in order (block trades and late fills leave it
        # alone: they say nothing of the book now): a new sweep notes it, so its post can show the move. One dict
        # store per trade; bounded by `max_priced_markets` (the oldest half goes when over).
        self.last_yes: dict[str, str] = {}
        self.max_priced_markets = max_priced_markets
        self.duplicates = 0
        self.groups_closed = 0
        self.alerts = 0

    @property
    def on_near_whale(self) -> Callable[[str], None] | None:
        """Called with the ticker once a sweep reaches half the threshold (to look its title up ahead)."""
        return self._on_near_whale

    @on_near_whale.setter
    def on_near_whale(self, hook: Callable[[str], None] | None) -> None:
        self._on_near_whale = hook
        # Half the threshold, when someone listens; otherwise never reached, so no hook is asked.
        self._near_usd = self.threshold_usd / 2 if hook is not None else Decimal("Infinity")
        near_f = float(self._near_usd)
        self._near_below_f = near_f * (1 - SCREEN_MARGIN)  # inf without a hook: never reached
        self._near_above_f = near_f * (1 + SCREEN_MARGIN)  # clearly reached

    @property
    def open_groups(self) -> int:
        return self._open_count

    @property
    def held_groups(self) -> int:
        return len(self._held)

    def processed_through_ms(self) -> int:
        """Trade time before which every trade seen is in a closed group: where a restart may resume."""
        through = self.watermark_ms
        oldest_open = min((g.first_ts_ms for g in chain(self._opened, self._ahead) if not g.closed), default=None)
        if oldest_open is not None:
            through = min(through, oldest_open - 1)
        oldest_held = min((g.first_ts_ms for g in self._held if not g.closed), default=None)
        if oldest_held is not None:
            through = min(through, oldest_held - 1)
        return through

    def add(self, trade: Trade) -> list[Alert]:
        """Take one trade; return the alerts of any groups this closes (possibly its own). See `add_batch`."""
        alerts: list[Alert] = []
        self.add_batch((trade,), alerts)
        return alerts

    def add_batch(
        self,
        trades: Iterable[Trade],
        alerts: list[Alert],
        *,
        now_ms: int = NO_CLOCK_MS,
        max_leap_ms: int = NO_LEAP_LIMIT_MS,
    ) -> Trade | None:
        """Take trades in order, appending the alerts of the groups they close (possibly their own) to `alerts`.

        A trade that advances the trade time closes the groups whose window ended before it, but never past
        `now_ms` (live: the host's wall clock): a trade stamped a little ahead of it (clock skew, within
        FUTURE_TOLERANCE_MS) is taken, yet must not close a sweep that is still taking fills. A replay passes
        nothing: its clock is its trade time.

        Stops at the first trade lying more than `max_leap_ms` after the newest trade time taken so far (a replay's
        clock rule, `valshi_x.pipeline`) and returns it, not taken; the rest of an iterator can be passed again.
        None when every trade was taken. One loop for every caller, its state in locals: this is the hot path.
        """
        seen = self.seen
        ids = seen._ids  # `SeenTradeIds.add`, inline
        remember = ids.add
        max_ids = seen._max_ids
        newest_s = seen._newest_s
        remember_in_newest = seen._newest_ids.append
        open_groups = self._open
        opened = self._opened
        kept = self._kept
        closed_order = self._closed_order
        window = self.sweep_window_ms
        near_below_f = self._near_below_f
        watermark = self.watermark_ms
        last_yes = self.last_yes
        for trade in trades:
            ts_ms = trade.ts_ms
            if ts_ms - watermark > max_leap_ms:
                return trade
            trade_id = trade.trade_id
            if trade_id in ids:
                self.duplicates += 1
                continue
            remember(trade_id)
            second = ts_ms // 1000
            if second > newest_s:
                remember_in_newest = seen._start_second(second, trade_id).append
                newest_s = second
                if len(last_yes) > self.max_priced_markets:
                    self._forget_prices()
            else:
                remember_in_newest(trade_id)  # same second, or an older trade: it leaves with the newest bucket
            if len(ids) > max_ids:
                seen._forget_over_cap()
            if ts_ms > watermark:
                self.watermark_ms = watermark = ts_ms
                # Never past the wall clock. (The pipeline refused every trade more than the tolerance ahead of
                # `now_ms`, so this holds back by the tolerance at most, as `Pipeline.stream_now_ms` does.)
                close_ms = ts_ms if ts_ms <= now_ms else now_ms
                if opened and opened[0].first_ts_ms + window < close_ms:
                    self._close_until(close_ms - window - 1, alerts)
                if closed_order and closed_order[0].first_ts_ms < ts_ms - self.late_fill_horizon_ms:
                    self._forget_closed(ts_ms - self.late_fill_horizon_ms)

            side = trade.taker_side
            count_f = float(trade.count_text)  # the first screen: a bound of the value (module docstring)
            if trade.is_block_trade or window <= 0:
                self._add_alone(trade, alerts)
                continue
            ticker = trade.ticker
            key = (ticker, side)
            groups = open_groups.get(key)
            if groups is not None:
                # Newest first: a fill belongs to the sweep whose window holds it; one a little early still belongs.
                newest = groups[-1]
                found = newest if -window <= ts_ms - newest.first_ts_ms <= window else self._older_open(groups, ts_ms)
                if found is not None:
                    found.trades.append(trade)
                    last_yes[ticker] = trade.yes_price_text
                    count_f = found.count_f = found.count_f + count_f
                    if count_f >= near_below_f and not found.near:
                        self._near_check(found)
                    continue
            if kept and ts_ms + window < watermark:
                # A late fill: its sweep may have closed already.
                closed = self._closed_sweep(key, ts_ms)
                if closed is not None:
                    self._late_fill(closed, trade, count_f)
                    continue
            group = _OpenGroup(key, ts_ms, [trade], count_f, last_yes.get(ticker))
            last_yes[ticker] = trade.yes_price_text
            if count_f >= near_below_f:
                self._near_check(group)
            if groups is None:
                open_groups[key] = [group]
            else:
                groups.append(group)
                groups.sort(key=_first_ts)
            self._open_count += 1
            if ts_ms <= now_ms:
                opened.append(group)
            else:
                self._ahead.append(group)  # ahead of the wall clock: it must not hold up the groups opened after it
        return None

    def _add_alone(self, trade: Trade, alerts: list[Alert]) -> None:
        """A block trade (or no sweep window): a group of its own, judged at once."""
        value_f = float(trade.count_text) * float(trade.price_text)
        if (
            self.on_near_whale is not None
            and value_f >= self._clearly_below_f
            and trade.value_usd >= self.threshold_usd
        ):
            self.on_near_whale(trade.ticker)
        self._close_group([trade], value_f, alerts, self.last_yes.get(trade.ticker))

    def _forget_prices(self) -> None:
        """Over the cap of priced markets: the half noted first goes (a market still trading is noted again)."""
        last_yes = self.last_yes
        for ticker in list(last_yes)[: len(last_yes) // 2]:
            del last_yes[ticker]

    def _late_fill(self, closed: _OpenGroup, trade: Trade, count_f: float) -> None:
        """A fill for a kept closed sweep: it joins silently if that was alerted, else the sweep reopens."""
        closed.trades.append(trade)
        closed.count_f += count_f
        self.kept_trades += 1
        if closed.alerted:
            # Already posted: never a second alert for one order; the caller logs what it grew by.
            self.late_fills_after_alert += 1
            if self.on_grew_after_alert is not None:
                self.on_grew_after_alert(closed.alert_id, trade.ticker, trade.value_usd, trade.trade_id)
        else:
            self._reopen(closed)

    def _older_open(self, groups: list[_OpenGroup], ts_ms: int) -> _OpenGroup | None:
        """The open group of one key, older than its newest, whose window holds `ts_ms` (newest first)."""
        if len(groups) < 2:
            return None
        window = self.sweep_window_ms
        for group in reversed(groups[:-1]):
            if -window <= ts_ms - group.first_ts_ms <= window:
                return group
        return None

    def add_many(self, trades: Iterable[Trade]) -> list[Alert]:
        alerts: list[Alert] = []
        self.add_batch(trades, alerts)
        return alerts

    def close_due(self, now_ms: int) -> list[Alert]:
        """Close groups whose window ended before `now_ms` (stream time, from the caller's clock), and held ones
        the gate now lets go."""
        alerts: list[Alert] = []
        self._close_until(now_ms - self.sweep_window_ms - 1, alerts)
        self.release_held(alerts)
        return alerts

    def release_held(self, alerts: list[Alert]) -> None:
        """Ask the gate again about held groups (only when its answers may have changed)."""
        gate = self.gate
        if not self._held or gate is None or gate.version == self._held_version:
            return
        self._held_version = gate.version
        window = self.sweep_window_ms
        still: list[_OpenGroup] = []
        for group in self._held:
            if group.closed:
                continue
            if gate.may_close(group.first_ts_ms - window, group.first_ts_ms + window):
                self._finish(group, alerts)
            else:
                still.append(group)
        self._held = still

    def flush(self) -> list[Alert]:
        """Close every open group, held or not."""
        alerts: list[Alert] = []
        while self._opened:
            group = self._opened.popleft()
            if not group.closed:
                self._finish(group, alerts)
        ahead, self._ahead = self._ahead, deque()
        for group in ahead:
            if not group.closed:
                self._finish(group, alerts)
        held, self._held = self._held, []
        for group in held:
            if not group.closed:
                self._finish(group, alerts)
        return alerts

    def _near_check(self, group: _OpenGroup) -> None:
        """The count screen says the group may be at half the threshold: make sure, exactly if need be."""
        value_f = self._value_f(group)
        if value_f >= self._near_below_f and (
            value_f >= self._near_above_f or exact_value(group.trades) >= self._near_usd
        ):
            self._near(group)

    @staticmethod
    def _value_f(group: _OpenGroup) -> float:
        """The second screen: the float sum of the group's fill values, extended by the fills added since last time."""
        trades = group.trades
        valued = group.valued
        if valued < len(trades):
            value_f = group.value_f
            for trade in trades[valued:]:
                value_f += float(trade.count_text) * float(trade.price_text)
            group.value_f = value_f
            group.valued = len(trades)
        return group.value_f

    def _near(self, group: _OpenGroup) -> None:
        group.near = True
        if self.on_near_whale is not None:
            self.on_near_whale(group.key[0])

    def _close_until(self, first_ts_ms_at_most: int, alerts: list[Alert]) -> None:
        opened, gate, window = self._opened, self.gate, self.sweep_window_ms
        ahead = self._ahead
        if ahead and ahead[0].first_ts_ms <= first_ts_ms_at_most:
            self._close_ahead(first_ts_ms_at_most, alerts)
        open_groups = self._open
        clearly_below_f = self._clearly_below_f
        keeping = self.late_fill_horizon_ms > 0
        quietly_closed = 0
        while opened and opened[0].first_ts_ms <= first_ts_ms_at_most:
            group = opened.popleft()
            if group.closed:
                continue
            if gate is not None and not gate.may_close(group.first_ts_ms - window, group.first_ts_ms + window):
                # A pending backfill window may still bring one of its fills: keep it open, ask again later.
                self._held.append(group)
                continue
            if not keeping and group.count_f < clearly_below_f:
                # `_finish`'s common case, inline: the key's only open group, clearly no whale, nothing kept.
                key = group.key
                groups = open_groups.get(key)
                if groups is not None and len(groups) == 1 and groups[0] is group:
                    group.closed = True
                    del open_groups[key]
                    quietly_closed += 1
                    continue
            self._finish(group, alerts)
        if quietly_closed:
            self._open_count -= quietly_closed
            self.groups_closed += quietly_closed

    def _close_ahead(self, first_ts_ms_at_most: int, alerts: list[Alert]) -> None:
        """`_close_until` for the groups opened ahead of the wall clock (`_ahead`), from the front as `_opened` is.

        A host clock a little behind Kalshi's puts most new groups here, so this runs per closing trade and must
        not scan them all; one slightly out of order merely closes a little late, as in `_opened`.
        """
        ahead, gate, window = self._ahead, self.gate, self.sweep_window_ms
        while ahead and ahead[0].first_ts_ms <= first_ts_ms_at_most:
            group = ahead.popleft()
            if group.closed:
                continue
            if gate is not None and not gate.may_close(group.first_ts_ms - window, group.first_ts_ms + window):
                self._held.append(group)
            else:
                self._finish(group, alerts)

    def _finish(self, group: _OpenGroup, alerts: list[Alert]) -> None:
        group.closed = True
        key = group.key
        groups = self._open.get(key)
        if groups is not None:
            if len(groups) == 1 and groups[0] is group:  # the common case, without a scan
                del self._open[key]
                self._open_count -= 1
            elif group in groups:
                groups.remove(group)
                self._open_count -= 1
        if group.count_f < self._clearly_below_f:  # the first screen, inline: the common case
            self.groups_closed += 1
        elif self._close_group(group.trades, self._value_f(group), alerts, group.yes_before):
            group.alerted = True
            group.alert_id = alerts[-1].alert_id
        if self.late_fill_horizon_ms > 0:
            self._kept.setdefault(group.key, []).append(group)
            self._closed_order.append(group)
            self.kept_trades += len(group.trades)
            if self.kept_trades > self.max_kept_trades:
                self._forget_kept_over_cap()

    def _closed_sweep(self, key: tuple[str, Side], ts_ms: int) -> _OpenGroup | None:
        """The kept closed sweep of `key` whose window holds `ts_ms`, if any."""
        window = self.sweep_window_ms
        for group in reversed(self._kept.get(key, ())):
            if -window <= ts_ms - group.first_ts_ms <= window:
                return group
        return None

    def _reopen(self, group: _OpenGroup) -> None:
        """Open a sweep that closed short again; it closes (and is judged) anew with its late fills."""
        self._unkeep(group)
        group.closed = False
        self.groups_closed -= 1  # it will be closed (and counted) again
        self.late_fills_rejoined += 1
        if not group.near and group.count_f >= self._near_below_f:
            self._near_check(group)
        groups = self._open.setdefault(group.key, [])
        groups.append(group)
        groups.sort(key=_first_ts)
        self._open_count += 1
        self._opened.append(group)

    def _forget_closed(self, first_ts_ms_before: int) -> None:
        low_water_ms = self.gate.low_water_ms() if self.gate is not None else None
        if low_water_ms is not None:
            # A pending backfill may still bring fills of these: keep them until it is done.
            first_ts_ms_before = min(first_ts_ms_before, low_water_ms - self.sweep_window_ms)
        closed = self._closed_order
        while closed and closed[0].first_ts_ms < first_ts_ms_before:
            self._unkeep(closed.popleft())

    def _forget_kept_over_cap(self) -> None:
        """Drop the oldest kept sweeps until the count cap holds again (even ones a pending window may need)."""
        closed = self._closed_order
        while self.kept_trades > self.max_kept_trades and closed:
            if self._unkeep(closed.popleft()):
                self.kept_forgotten_early += 1

    def _unkeep(self, group: _OpenGroup) -> bool:
        """Stop keeping a closed sweep (an entry of `_closed_order` may be stale: reopened, or kept again)."""
        candidates = self._kept.get(group.key)
        if candidates is None or group not in candidates:
            return False
        candidates.remove(group)
        if not candidates:
            del self._kept[group.key]
        self.kept_trades -= len(group.trades)
        return True

    def _close_group(self, trades: list[Trade], value_f: float, alerts: list[Alert], yes_before: str | None) -> bool:
        """Count the group closed; alert if it is a whale (decided exactly; module docstring). True when it was one."""
        self.groups_closed += 1
        if value_f < self._clearly_below_f:
            return False
        self.exact_sums += 1
        value_usd = exact_value(trades)
        if value_usd >= self.threshold_usd:
            self.alerts += 1
            alerts.append(_alert_from(trades, value_usd, yes_before))
            return True
        return False


def _first_ts(group: _OpenGroup) -> int:
    return group.first_ts_ms


def alert_log_fields(alert: Alert) -> dict[str, object]:
    """The fields of an alert as logged (`would_post`, `whale_detected`): plain JSON types, decimals as strings."""
    return {
        "alert_id": alert.alert_id,
        "trade_ids": list(alert.trade_ids),
        "ticker": alert.ticker,
        "side": alert.side,
        "contracts": str(alert.contracts),
        "value_usd": alert.value_usd_2dp,
        "fills": alert.fills,
        "price_low": str(alert.price_low),
        "price_high": str(alert.price_high),
        "is_block_trade": alert.is_block_trade,
        "created_time": alert.created_time.isoformat().replace("+00:00", "Z"),
    }
