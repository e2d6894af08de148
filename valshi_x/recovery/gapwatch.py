"""The stream's side of recovery: its callbacks turned into the recovery planner's events, with trade times.

Sits on the reader's path (called for every batch queued). The stream hands over typed trades, so a trade time
costs nothing to read; the planner hears one only when it needs one: the frame after a seq gap (the stream starts
a new batch there), the first frame queued after a subscription or a drop, the last one queued before a gap, a
drop, a disconnect or a stall. No I/O; the clock comes in.
"""

from __future__ import annotations

from collections.abc import Callable

from valshi_x.recovery.planner import CLOCK_SLACK_MS, RecoveryPlanner
from valshi_x.trades import FUTURE_TOLERANCE_MS


class GapWatch:
    """Tells the planner about gaps, drops, disconnects, subscriptions and stalls, with the trade times around them."""

    def __init__(
        self, planner: RecoveryPlanner, *, now_ms: Callable[[], int], started_ms: int, wake: Callable[[], None]
    ) -> None:
        self.planner = planner
        self._now_ms = now_ms
        self._wake = wake  # a window may have become due: the backfill looks now rather than at its next poll
        self._last_queued_ms = started_ms  # before any trade: the start of the run
        self._gap_before_ms: int | None = None  # a seq gap waiting for the frame after it

    def last_queued_ms(self) -> int:
        """Trade time of the last frame queued (or, before any, of the run's start)."""
        return self._last_queued_ms

    # --- the reader's path --------------------------------------------------------------------------------------

    def on_gap(self) -> None:
        """The stream saw a seq gap; the frame after it comes next (first in the next batch, to `before_queue`)."""
        self._gap_before_ms = self._last_queued_ms

    def before_queue(self, first_ts_ms: int) -> None:
        """Every batch of trade frames, before it is queued (or dropped), with its first frame's trade time."""
        before_ms = self._gap_before_ms
        if before_ms is not None:
            now_ms = self._now_ms()
            if first_ts_ms <= now_ms + FUTURE_TOLERANCE_MS:  # else the gap waits for a time that can be believed
                self._gap_before_ms = None
                self.planner.on_gap(before_ms, first_ts_ms, now_ms)
                self._wake()

    def queued(self, first_ts_ms: int, last_ts_ms: int) -> None:
        """Every batch that made it into the queue, with the trade times of its first and last frame.

        A time past the trade-time rule (the pipeline refuses that trade) aims no window: the last believable one
        stands.
        """
        now_ms = self._now_ms()
        latest_ms = now_ms + FUTURE_TOLERANCE_MS
        if last_ts_ms <= latest_ms:
            self._last_queued_ms = last_ts_ms
        elif first_ts_ms <= latest_ms:
            self._last_queued_ms = first_ts_ms
        if self.planner.wants_first_trade and first_ts_ms <= latest_ms:
            self.planner.on_first_trade(first_ts_ms, now_ms)
            self._wake()

    def dropped(self) -> None:
        """A batch was dropped on a full queue: from the newest trade queued to the next one queued."""
        self.planner.on_overflow(self._last_queued_ms, self._now_ms())

    # --- the connection -------------------------------------------------------------------------------------------

    def on_disconnect(self) -> None:
        self.planner.on_disconnect(self.last_queued_ms(), self._now_ms())

    def on_subscribed(self) -> None:
        self.planner.on_subscribed(self._now_ms())

    def on_stall(self) -> None:
        """No trade for a long while on a live-looking socket: the quiet span may have had trades after all."""
        now_ms = self._now_ms()
        self.planner.on_gap(self.last_queued_ms(), now_ms + CLOCK_SLACK_MS, now_ms, reason="stall")
