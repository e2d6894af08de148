"""The stream's side of recovery: its callbacks turned into the recovery planner's events, with trade times.

Sits on the reader's path (called for every frame queued), so a frame's trade time is read only when the planner
needs one: the frame after a seq gap, the first frame queued after a subscription or a drop, the last one queued
before a gap, a drop, a disconnect or a stall. No I/O; the clock comes in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from valshi_x import trades
from valshi_x.recovery import CLOCK_SLACK_MS, RecoveryPlanner


def frame_ts_ms(frame: dict[str, Any], now_ms: int) -> int | None:
    """Trade time of a trade frame, or None when unreadable or dated past the trade-time rule (the pipeline
    reports that frame): a stamp the pipeline refuses must not aim a backfill window either."""
    msg = frame.get("msg")
    if not isinstance(msg, dict):
        return None
    try:
        ts_ms = trades.trade_time_ms(msg)
        trades.check_trade_time(ts_ms, now_ms)
    except trades.MalformedTrade:
        return None
    return ts_ms


class GapWatch:
    """Tells the planner about gaps, drops, disconnects, subscriptions and stalls, with the trade times around them."""

    def __init__(
        self, planner: RecoveryPlanner, *, now_ms: Callable[[], int], started_ms: int, wake: Callable[[], None]
    ) -> None:
        self.planner = planner
        self._now_ms = now_ms
        self._wake = wake  # a window may have become due: the backfill looks now rather than at its next poll
        self._last_queued: dict[str, Any] | None = None  # read lazily, see `last_queued_ms`
        self._queued_before: dict[str, Any] | None = None  # the one before it, in case its time is refused
        self._last_queued_ms = started_ms  # before any trade: the start of the run
        self._gap_before_ms: int | None = None  # a seq gap waiting for the frame after it

    def last_queued_ms(self) -> int:
        """Trade time of the last frame queued (or, before any, of the run's start)."""
        now_ms = self._now_ms()
        for frame in (self._last_queued, self._queued_before):
            ts_ms = frame_ts_ms(frame, now_ms) if frame is not None else None
            if ts_ms is not None:
                self._last_queued_ms = ts_ms
                break
        self._last_queued = self._queued_before = None
        return self._last_queued_ms

    # --- the reader's path --------------------------------------------------------------------------------------

    def on_gap(self) -> None:
        """The stream saw a seq gap; the frame after it comes next (to `before_queue`)."""
        self._gap_before_ms = self.last_queued_ms()

    def before_queue(self, frame: dict[str, Any]) -> None:
        """Every trade frame, before it is queued (or dropped)."""
        before_ms = self._gap_before_ms
        if before_ms is not None:
            now_ms = self._now_ms()
            after_ms = frame_ts_ms(frame, now_ms)
            if after_ms is not None:  # else the gap waits for the next frame whose time can be read
                self._gap_before_ms = None
                self.planner.on_gap(before_ms, after_ms, now_ms)
                self._wake()

    def queued(self, frame: dict[str, Any]) -> None:
        """Every trade frame that made it into the queue."""
        self._queued_before, self._last_queued = self._last_queued, frame
        if self.planner.wants_first_trade:
            ts_ms = frame_ts_ms(frame, self._now_ms())
            if ts_ms is not None:
                self.planner.on_first_trade(ts_ms, self._now_ms())
                self._wake()

    def dropped(self) -> None:
        """A frame was dropped on a full queue: from the newest trade queued to the next one queued."""
        self.planner.on_overflow(self.last_queued_ms(), self._now_ms())

    # --- the connection -------------------------------------------------------------------------------------------

    def on_disconnect(self) -> None:
        self.planner.on_disconnect(self.last_queued_ms(), self._now_ms())

    def on_subscribed(self) -> None:
        self.planner.on_subscribed(self._now_ms())

    def on_stall(self) -> None:
        """No trade for a long while on a live-looking socket: the quiet span may have had trades after all."""
        now_ms = self._now_ms()
        self.planner.on_gap(self.last_queued_ms(), now_ms + CLOCK_SLACK_MS, now_ms, reason="stall")
