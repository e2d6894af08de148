"""Recovery planner: the one owner of "which trades may we have missed, and who must wait for them".

Pure: no asyncio, no I/O, no clock of its own. Every event carries `now_ms` (this host's wall clock, which is
what Kalshi REST's "now" is compared with) and, where it matters, trade times (`ts_ms`) as Kalshi stamped them.

Events in: a seq gap (with the trade times of the frames before and after it), a disconnect, a subscription, a
queue overflow, the start-up checkpoint, the first trade delivered after any of those, a window fetched or given
up, and `tick`. Answers out: windows to fetch (`due`), whether a sweep may close (`may_close`), which pending
windows an alert was closed without (`uncovered`), and how far a restart may skip (`low_water_ms`).

Windows are exact: a gap between two frames is `[before - 1 s, after + 1 s]` (REST filters whole seconds, and
trade times are only nearly ordered); a reconnect or a start-up runs from the last trade seen (or the checkpoint)
to the first trade after subscribing; an overflow from the newest trade queued to the first trade queued after
the drops. Windows not yet fetched that overlap merge. Holds are narrow and bounded: a pending window keeps open
only sweeps whose reach comes within `hold_margin_ms` of the frames that bound it, for at most `hold_max_ms` after
its end became known (a merged window keeps its first gap's deadline); then they close with what is known
and the window goes on being fetched (a whale it finds later is still alerted; a fill of an alerted sweep is only
logged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from valshi_x.trades import FUTURE_TOLERANCE_MS

# A window's ends reach this far past the frames that bound it: REST filters whole seconds, and trade times of
# neighbouring frames are only nearly ordered.
MARGIN_MS = 1_000
# But only sweeps within this much of those frames are held: a lost trade lies between the frames around it in
# seq order, so its time lies between theirs but for the small disorder of Kalshi's stamps. (One further out still
# joins its sweep when it comes: a short sweep reopens, an alerted one is logged as having grown.)
HOLD_MARGIN_MS = 250
# With no trade after (re)subscribing for this long, the open window ends at "now" plus the clock slack.
QUIET_BOUND_MS = 2_000
# Kalshi's clock may run ahead of ours: a window ending "now" reaches this far past it.
CLOCK_SLACK_MS = 2_000

OpenCause = Literal["reconnect", "startup", "overflow"]


@dataclass(frozen=True, slots=True)
class Window:
    """A span of trade time to fetch from REST, both ends inclusive, in Unix ms."""

    window_id: int
    from_ms: int
    to_ms: int
    reasons: tuple[str, ...]


@dataclass(slots=True)
class _Pending:
    window_id: int
    from_ms: int
    to_ms: int | None  # None: the end is not known yet (disconnected, or waiting for the first trade)
    reasons: list[str]
    ready_at_ms: int = 0  # wall time from which REST lists every missing trade
    merge_until_ms: int = 0  # a waiting window stops absorbing later gaps (and growing its wait) after this
    hold_until_ms: int | None = None  # None: holds until the end is known
    state: Literal["open", "waiting", "fetching"] = "open"
    opened_at_ms: int = 0

    def touches(self, lo_ms: int, hi_ms: int) -> bool:
        return self.from_ms <= hi_ms and (self.to_ms is None or self.to_ms >= lo_ms)

    def holds(self, lo_ms: int, hi_ms: int, shrink_ms: int) -> bool:
        """Does this window keep a sweep reaching [lo_ms, hi_ms] open? (Its span less the REST rounding margin.)"""
        return self.from_ms + shrink_ms <= hi_ms and (self.to_ms is None or self.to_ms - shrink_ms >= lo_ms)


@dataclass(slots=True)
class RecoveryCounts:
    windows: int = 0  # windows created (after merging)
    merged: int = 0  # gaps (and stalls) absorbed by a window already waiting
    expired: int = 0  # windows whose holds ran out before they were fetched
    given_up: int = 0


class RecoveryPlanner:
    """Plans backfill windows and bounded holds from the stream's events (see the module docstring)."""

    def __init__(
        self,
        *,
        hold_max_ms: int = 5_000,
        settle_ms: int = 500,
        merge_max_ms: int = 1_000,
        margin_ms: int = MARGIN_MS,
        hold_margin_ms: int = HOLD_MARGIN_MS,
    ) -> None:
        self.hold_max_ms = hold_max_ms
        # Kalshi REST may list a trade a moment after the socket sent it: a window is fetched this long after the
        # frame that showed its gap.
        self.settle_ms = settle_ms
        self.merge_max_ms = merge_max_ms
        self.margin_ms = margin_ms
        self.hold_margin_ms = hold_margin_ms
        self.counts = RecoveryCounts()
        self.version = 0  # bumped whenever a hold may have ended: the detector asks its held sweeps again
        self.now_ms = 0
        self._windows: dict[int, _Pending] = {}
        # The windows whose holds are not over (the rest are still fetched but hold nothing): the detector asks
        # `may_close` for every sweep it closes, and a long REST outage leaves many windows pending whose holds
        # ran out long ago; only these few need asking.
        self._holding: dict[int, _Pending] = {}
        # The oldest `from_ms` of all windows, kept as windows come and grow (the detector asks per trade);
        # `_low_water_stale` when the oldest one left, recomputed on the next ask.
        self._low_water_ms: int | None = None
        self._low_water_stale = False
        self._next_id = 0
        self._open: dict[str, int] = {}  # cause -> window id of its open-ended window
        self._awaiting_first_trade: set[str] = set()  # causes whose end is the next trade queued
        self._subscribed_at_ms: int | None = None
        self._connected = False

    # --- events ---------------------------------------------------------------------------------------------

    def on_gap(self, before_ts_ms: int, after_ts_ms: int, now_ms: int, *, reason: str = "seq_gap") -> None:
        """Frames were lost between two frames of one subscription with these trade times."""
        self._advance(now_ms)
        lo, hi = min(before_ts_ms, after_ts_ms), max(before_ts_ms, after_ts_ms)
        self._add_bounded(lo - self.margin_ms, hi + self.margin_ms, reason, now_ms)

    def on_disconnect(self, last_ts_ms: int, now_ms: int) -> None:
        """The connection is gone: everything after the last trade seen may be missed until the next one."""
        self._advance(now_ms)
        self._connected = False
        self._subscribed_at_ms = None
        if "reconnect" not in self._open:
            window_id = self._open_window("reconnect", last_ts_ms - self.margin_ms, now_ms)
            # Every hold has a deadline, an outage's too: a whale seen just before the drop is not kept from its
            # post for as long as Kalshi is away (it closes unconfirmed; the backfill completes the picture).
            self._windows[window_id].hold_until_ms = now_ms + self.hold_max_ms
        self._awaiting_first_trade.discard("reconnect")

    def on_startup(self, checkpoint_ms: int, now_ms: int) -> None:
        """A restart: everything after the saved checkpoint may be missed until the first trade (the margin is for
        trades stamped a little before the last one processed but never seen)."""
        self._advance(now_ms)
        window_id = self._open_window("startup", checkpoint_ms - self.margin_ms, now_ms)
        self._windows[window_id].hold_until_ms = now_ms + self.hold_max_ms

    def on_subscribed(self, now_ms: int) -> None:
        """Trades flow again: open windows end at the next trade delivered."""
        self._advance(now_ms)
        self._connected = True
        self._subscribed_at_ms = now_ms
        for cause in ("reconnect", "startup"):
            window_id = self._open.get(cause)
            if window_id is not None:
                self._awaiting_first_trade.add(cause)
                # Its holds start again and last at most `hold_max_ms` once its end is known: a sweep in progress
                # as trades resume may still get fills from the window's last second.
                pending = self._windows[window_id]
                pending.hold_until_ms = now_ms + QUIET_BOUND_MS + self.hold_max_ms
                self._holding[window_id] = pending
        self.version += 1

    def on_overflow(self, last_queued_ts_ms: int, now_ms: int) -> None:
        """A frame was dropped on a full queue: from the newest trade queued to the next one queued."""
        self._advance(now_ms)
        if "overflow" not in self._open:
            window_id = self._open_window("overflow", last_queued_ts_ms - self.margin_ms, now_ms)
            self._windows[window_id].hold_until_ms = now_ms + self.hold_max_ms
        self._awaiting_first_trade.add("overflow")

    @property
    def wants_first_trade(self) -> bool:
        """True while an open window waits for the next delivered trade's time (the caller reads it only then)."""
        return bool(self._awaiting_first_trade)

    def on_first_trade(self, ts_ms: int, now_ms: int) -> None:
        """The first trade delivered (queued) after a subscription or an overflow: open windows end here."""
        self._advance(now_ms)
        for cause in sorted(self._awaiting_first_trade):
            self._bound(cause, ts_ms + self.margin_ms, now_ms)
        self._awaiting_first_trade.clear()

    def tick(self, now_ms: int) -> None:
        """Time passes: quiet open windows get an end, holds past their deadline end."""
        self._advance(now_ms)
        overflow_id = self._open.get("overflow")
        if (
            self._connected
            and overflow_id is not None
            and now_ms - self._windows[overflow_id].opened_at_ms >= QUIET_BOUND_MS
            and "overflow" in self._awaiting_first_trade
        ):
            # Frames were dropped and none has been queued since: what is missing lies before now.
            self._awaiting_first_trade.discard("overflow")
            self._bound("overflow", now_ms + CLOCK_SLACK_MS, now_ms)
        subscribed_at_ms = self._subscribed_at_ms
        if self._connected and subscribed_at_ms is not None and now_ms - subscribed_at_ms >= QUIET_BOUND_MS:
            # No trade since subscribing: nothing after now can be missed, the socket will bring it.
            for cause in ("reconnect", "startup"):
                if cause in self._awaiting_first_trade:
                    self._awaiting_first_trade.discard(cause)
                    self._bound(cause, now_ms + CLOCK_SLACK_MS, now_ms)

    def due(self, now_ms: int) -> list[Window]:
        """Windows to fetch now (each handed out once); oldest first."""
        self._advance(now_ms)
        out = []
        waiting = [p for p in self._windows.values() if p.state == "waiting"]  # few: most are being fetched
        for pending in sorted(waiting, key=lambda p: p.from_ms):
            if pending.ready_at_ms <= now_ms and pending.to_ms is not None:
                pending.state = "fetching"
                out.append(Window(pending.window_id, pending.from_ms, pending.to_ms, tuple(pending.reasons)))
        return out

    def on_done(self, window_id: int, now_ms: int) -> None:
        """A window was fetched and fed whole: its holds end."""
        self._advance(now_ms)
        if self._drop(window_id):
            self.version += 1

    def on_given_up(self, window_id: int, now_ms: int) -> None:
        """A window could not be fetched (the fetcher logged it): its holds end, it no longer holds the checkpoint."""
        self._advance(now_ms)
        if self._drop(window_id):
            self.counts.given_up += 1
            self.version += 1

    # --- answers --------------------------------------------------------------------------------------------

    def may_close(self, lo_ms: int, hi_ms: int) -> bool:
        """May a sweep that can still take fills with trade times in [lo_ms, hi_ms] close now?"""
        shrink_ms = self.margin_ms - self.hold_margin_ms
        return not any(p.holds(lo_ms, hi_ms, shrink_ms) for p in self._holding.values())

    def uncovered(self, lo_ms: int, hi_ms: int) -> list[tuple[int, int | None]]:
        """Pending windows (from_ms, to_ms or None) touching [lo_ms, hi_ms]: what an alert closed without."""
        shrink_ms = self.margin_ms - self.hold_margin_ms
        return [(p.from_ms, p.to_ms) for p in self._windows.values() if p.holds(lo_ms, hi_ms, shrink_ms)]

    def low_water_ms(self) -> int | None:
        """The start of the oldest window not fetched yet: a restart must fetch from there again."""
        if self._low_water_stale:
            self._low_water_stale = False
            self._low_water_ms = min((p.from_ms for p in self._windows.values()), default=None)
        return self._low_water_ms

    @property
    def pending(self) -> int:
        return len(self._windows)

    # --- inside ---------------------------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _add(self, pending: _Pending) -> None:
        self._windows[pending.window_id] = pending
        self._holding[pending.window_id] = pending
        self._lower_water(pending.from_ms)
        self.counts.windows += 1

    def _drop(self, window_id: int) -> bool:
        """Forget a window (fetched, or given up); False if it was gone already."""
        pending = self._windows.pop(window_id, None)
        if pending is None:
            return False
        self._holding.pop(window_id, None)
        if pending.from_ms == self._low_water_ms:
            self._low_water_stale = True
        return True

    def _lower_water(self, from_ms: int) -> None:
        """A window starts at `from_ms` now (new, or grown back in time)."""
        if not self._low_water_stale and (self._low_water_ms is None or from_ms < self._low_water_ms):
            self._low_water_ms = from_ms

    def _open_window(self, cause: OpenCause, from_ms: int, now_ms: int) -> int:
        window_id = self._new_id()
        self._add(_Pending(window_id, from_ms, None, [cause], opened_at_ms=now_ms))
        self._open[cause] = window_id
        return window_id

    def _bound(self, cause: str, to_ms: int, now_ms: int) -> None:
        window_id = self._open.pop(cause, None)
        if window_id is None:
            return
        pending = self._windows[window_id]
        if to_ms < pending.from_ms:
            # An end stamped before the start (a trade dated in the past) cannot be believed: this host's clock
            # says when trades resumed.
            to_ms = now_ms + CLOCK_SLACK_MS
        pending.to_ms = min(to_ms, self._latest_end_ms(now_ms))
        pending.from_ms = min(pending.from_ms, pending.to_ms)
        self._lower_water(pending.from_ms)
        pending.state = "waiting"
        pending.ready_at_ms = now_ms + self.settle_ms
        pending.merge_until_ms = pending.ready_at_ms
        pending.hold_until_ms = now_ms + self.hold_max_ms
        self.version += 1

    def _add_bounded(self, from_ms: int, to_ms: int, reason: str, now_ms: int) -> None:
        to_ms = min(to_ms, self._latest_end_ms(now_ms))
        from_ms = min(from_ms, to_ms)
        for pending in self._windows.values():
            if pending.state == "waiting" and now_ms < pending.merge_until_ms and pending.touches(from_ms, to_ms):
                assert pending.to_ms is not None
                pending.from_ms = min(pending.from_ms, from_ms)
                self._lower_water(pending.from_ms)
                pending.to_ms = max(pending.to_ms, to_ms)
                # The new gap's trades are listed `settle_ms` from now; a burst of gaps waits at most
                # `merge_max_ms` more than its first, so a steady drizzle of gaps never postpones a fetch for good.
                # Its holds keep the first gap's deadline: a merge never makes any sweep wait longer.
                pending.ready_at_ms = max(pending.ready_at_ms, min(now_ms + self.settle_ms, pending.merge_until_ms))
                if reason not in pending.reasons:
                    pending.reasons.append(reason)
                self.counts.merged += 1
                return
        window_id = self._new_id()
        ready_at_ms = now_ms + self.settle_ms
        self._add(
            _Pending(
                window_id,
                from_ms,
                to_ms,
                [reason],
                ready_at_ms=ready_at_ms,
                merge_until_ms=now_ms + self.merge_max_ms,
                hold_until_ms=now_ms + self.hold_max_ms,
                state="waiting",
            )
        )

    def _latest_end_ms(self, now_ms: int) -> int:
        """No window reaches further ahead than the newest trade the pipeline accepts (the trade-time rule), plus
        REST's one-second edge: whatever a frame's stamp said, Kalshi has no trade from the future to give."""
        return now_ms + FUTURE_TOLERANCE_MS + self.margin_ms

    def _advance(self, now_ms: int) -> None:
        """Move the clock; end holds past their deadline (the window is still fetched)."""
        if now_ms > self.now_ms:
            self.now_ms = now_ms
        ended = [
            p.window_id
            for p in self._holding.values()
            if p.hold_until_ms is not None and p.hold_until_ms <= self.now_ms
        ]
        for window_id in ended:
            del self._holding[window_id]
            self.counts.expired += 1
            self.version += 1
