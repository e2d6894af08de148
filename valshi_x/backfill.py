"""Backfill: fetch the trades the stream missed from Kalshi REST and feed them through the same path as live ones.

The daemon asks for a window (`request`) whenever trades may have been lost: a sequence gap, a reconnect, frames
dropped on a full queue, a restart. `request` is synchronous and never blocks; `run` works the windows off one at
a time, oldest first. A window is fetched in ascending time slices; within a slice every page is collected (Kalshi
answers newest first), sorted by trade time and handed to `feed`, so grouping sees fills in time order.

Every window holds the whale detector's groups open from its start (`hold`), so a sweep split by the gap can
still be completed by the fills the backfill brings; the hold is released once the window is done or has failed
for good. A window that cannot be completed is logged as `backfill_incomplete` with the part that stays
uncovered: an operator can see what may have been missed, never a silent loss.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from valshi_x import trades
from valshi_x.kalshi.rest import KalshiRest, KalshiRestError
from valshi_x.trades import MalformedTrade, utc_from_ms

log = structlog.get_logger(__name__)

Feed = Callable[[list[dict[str, Any]]], Awaitable[int]]
UNREADABLE_TIME_MS = 2**62  # sorts a trade without a readable time last; `feed` reports it as malformed


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _iso(ms: int) -> str:
    return utc_from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def trade_time_ms(trade: dict[str, Any]) -> int:
    """Trade time of a REST (or WebSocket) trade object in Unix ms, for sorting; a huge value if unreadable."""
    try:
        return trades.trade_time_ms(trade)
    except MalformedTrade:
        return UNREADABLE_TIME_MS


def _sort_key(trade: dict[str, Any]) -> tuple[int, str]:
    trade_id = trade.get("trade_id")
    return trade_time_ms(trade), trade_id if isinstance(trade_id, str) else ""


@dataclass(slots=True)
class BackfillCounts:
    """Running totals since start, for the stats line."""

    requests: int = 0  # calls to `request`
    windows: int = 0  # windows fetched to the end
    trades: int = 0  # trades fed, overlap with live trades included
    whales: int = 0  # alerts the fed trades produced
    failures: int = 0  # windows given up after retries
    seconds: float = 0.0  # time spent fetching and feeding
    uncovered_s: float = 0.0  # trade time left uncovered by failed or clipped windows
    pages: int = 0


@dataclass(slots=True)
class _Window:
    """A span of trade time to fetch; `to_ms` None means "up to the moment it is fetched"."""

    from_ms: int
    to_ms: int | None
    reasons: list[str] = field(default_factory=list)
    holds: list[int] = field(default_factory=list)
    held_from_ms: int = 0  # the earliest time one of `holds` keeps groups open from

    def touches(self, from_ms: int, to_ms: int | None) -> bool:
        """Overlapping or adjacent (within a ms) to [from_ms, to_ms]."""
        if self.to_ms is not None and from_ms > self.to_ms + 1:
            return False
        return to_ms is None or to_ms + 1 >= self.from_ms

    def absorb(self, from_ms: int, to_ms: int | None) -> None:
        self.from_ms = min(self.from_ms, from_ms)
        self.to_ms = None if self.to_ms is None or to_ms is None else max(self.to_ms, to_ms)


class Backfiller:
    """Fetches missed windows of trades from Kalshi REST, in order, and feeds them to the pipeline.

    `feed(trades)` takes REST trade objects sorted by trade time and returns the number of whales they produced.
    `hold(from_ms) -> token` / `release(token)` are the detector's: groups that may still get fills from a
    pending window stay open until it is done.
    """

    def __init__(
        self,
        rest: KalshiRest,
        *,
        feed: Feed,
        hold: Callable[[int], int],
        release: Callable[[int], None],
        clock_ms: Callable[[], int] = _wall_ms,
        margin_ms: int = 5_000,
        slice_s: int = 60,
        max_span_s: float = 1800,
        retry_delays_s: Sequence[float] = (2.0, 5.0, 15.0, 30.0),
        settle_ms: int = 1_000,
        page_limit: int = 1000,
        feed_chunk: int = 1000,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if slice_s < 1:
            raise ValueError("slice_s must be at least 1")
        self._rest = rest
        self._feed = feed
        self._hold = hold
        self._release = release
        self._clock_ms = clock_ms
        self.margin_ms = margin_ms
        self.slice_s = slice_s
        self.max_span_ms = int(max_span_s * 1000)
        self.retry_delays_s = tuple(retry_delays_s)
        # Kalshi REST may list a trade a moment after the socket sent it: the newest part of an open-ended window
        # is fetched only once it is this old.
        self.settle_ms = settle_ms
        self._page_limit = page_limit
        # Feeding is synchronous work on the event loop: hand it over in chunks so the socket is read in between.
        self._feed_chunk = max(1, feed_chunk)
        self._monotonic = monotonic
        self._sleep = sleep
        self.counts = BackfillCounts()
        self._queue: list[_Window] = []  # waiting windows, ordered by from_ms
        self._active: _Window | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        """Windows waiting or being fetched."""
        return len(self._queue) + (self._active is not None)

    def request(self, from_ms: int, to_ms: int | None, reason: str, *, hold_token: int | None = None) -> None:
        """Ask for trades from `from_ms` (less the margin) to `to_ms` (None: now, when fetched). Never blocks.

        Without `hold_token` the groups from `from_ms - margin_ms` on are held here; with one, that hold is
        released with the window.
        """
        start_ms = from_ms - self.margin_ms
        if to_ms is not None and to_ms < start_ms:
            to_ms = start_ms
        self.counts.requests += 1
        self._idle.clear()
        for window in self._queue:
            if window.touches(start_ms, to_ms):
                window.absorb(start_ms, to_ms)
                if hold_token is not None:
                    window.holds.append(hold_token)
                    window.held_from_ms = min(start_ms, window.held_from_ms)
                elif start_ms < window.held_from_ms:
                    # A hold from earlier already covers this one; gaps in a burst take one hold, not hundreds.
                    window.holds.append(self._hold(start_ms))
                    window.held_from_ms = start_ms
                if reason not in window.reasons:
                    window.reasons.append(reason)
                self._queue.sort(key=_window_start)
                # Many gaps in a row merge into one window: one line per window, not per gap.
                log.debug("backfill_merged", reason=reason, from_time=_iso(start_ms))
                self._merge_queued()
                return
        token = self._hold(start_ms) if hold_token is None else hold_token
        self._queue.append(_Window(start_ms, to_ms, [reason], [token], start_ms))
        self._queue.sort(key=_window_start)
        log.info(
            "backfill_requested",
            reason=reason,
            from_time=_iso(start_ms),
            to_time=_iso(to_ms) if to_ms is not None else "now",
            pending=self.pending,
        )
        self._wake.set()

    def _merge_queued(self) -> None:
        """A window that grew may now touch its neighbours: merge them."""
        merged: list[_Window] = []
        for window in self._queue:
            last = merged[-1] if merged else None
            if last is not None and last.touches(window.from_ms, window.to_ms):
                last.absorb(window.from_ms, window.to_ms)
                last.holds += window.holds
                last.held_from_ms = min(last.held_from_ms, window.held_from_ms)
                last.reasons += [r for r in window.reasons if r not in last.reasons]
            else:
                merged.append(window)
        self._queue = merged

    async def wait_idle(self) -> None:
        """Return once no window is waiting or being fetched."""
        await self._idle.wait()

    async def run(self) -> None:
        """Fetch windows, oldest first, until cancelled; on cancellation every hold is released."""
        try:
            while True:
                if not self._queue:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                window = self._queue.pop(0)
                self._active = window
                try:
                    await self._fetch(window)
                finally:
                    self._active = None
                    for token in window.holds:
                        self._release(token)
        finally:
            for window in self._queue:
                for token in window.holds:
                    self._release(token)

    async def _fetch(self, window: _Window) -> None:
        started_s = self._monotonic()
        open_ended = window.to_ms is None
        to_ms = self._clock_ms() if window.to_ms is None else window.to_ms
        from_ms = window.from_ms
        counts = self.counts
        if to_ms - from_ms > self.max_span_ms + self.margin_ms:
            clipped_ms = to_ms - self.max_span_ms
            log.warning(
                "backfill_clipped",
                reasons=window.reasons,
                uncovered_from=_iso(from_ms),
                uncovered_to=_iso(clipped_ms),
                max_span_s=self.max_span_ms / 1000,
            )
            counts.uncovered_s += (clipped_ms - from_ms) / 1000
            from_ms = clipped_ms

        trades_before, whales_before = counts.trades, counts.whales
        first_s, last_s = from_ms // 1000, to_ms // 1000  # Kalshi filters by whole seconds, both ends inclusive
        slice_start_s = first_s
        while slice_start_s <= last_s:
            slice_end_s = min(slice_start_s + self.slice_s - 1, last_s)
            if open_ended and slice_end_s == last_s:
                # The newest trades may not be listed yet: let them settle before the last slice.
                wait_ms = to_ms + self.settle_ms - self._clock_ms()
                if wait_ms > 0:
                    await self._sleep(wait_ms / 1000)
            try:
                trades = await self._slice(slice_start_s, slice_end_s, window)
            except KalshiRestError as exc:
                counts.failures += 1
                counts.seconds += self._monotonic() - started_s
                uncovered_from_ms = max(from_ms, slice_start_s * 1000)
                counts.uncovered_s += (to_ms - uncovered_from_ms) / 1000
                log.error(
                    "backfill_incomplete",
                    reasons=window.reasons,
                    uncovered_from=_iso(uncovered_from_ms),
                    uncovered_to=_iso(to_ms),
                    uncovered_s=round((to_ms - uncovered_from_ms) / 1000, 3),
                    error=exc.reason,
                    status=exc.status,
                    tries=len(self.retry_delays_s) + 1,
                    trades=counts.trades - trades_before,
                    whales=counts.whales - whales_before,
                    hint="whales in the uncovered window may have been missed",
                )
                return
            trades.sort(key=_sort_key)
            chunk = self._feed_chunk
            for start in range(0, len(trades), chunk):
                part = trades[start : start + chunk]
                counts.whales += await self._feed(part)
                counts.trades += len(part)
            slice_start_s = slice_end_s + 1

        counts.windows += 1
        seconds = self._monotonic() - started_s
        counts.seconds += seconds
        log.info(
            "backfill_done",
            reasons=window.reasons,
            from_time=_iso(from_ms),
            to_time=_iso(to_ms),
            trades=counts.trades - trades_before,
            whales=counts.whales - whales_before,
            seconds=round(seconds, 3),
        )

    async def _slice(self, min_ts_s: int, max_ts_s: int, window: _Window) -> list[dict[str, Any]]:
        """Every trade of one slice; tries again after each of `retry_delays_s`, then raises KalshiRestError."""
        delays = iter(self.retry_delays_s)
        while True:
            trades: list[dict[str, Any]] = []
            try:
                async for page in self._rest.iter_trades(min_ts_s, max_ts_s, limit=self._page_limit):
                    self.counts.pages += 1
                    trades.extend(page)
            except KalshiRestError as exc:
                delay_s = next(delays, None)
                if delay_s is None:
                    raise
                log.warning(
                    "backfill_retry",
                    reasons=window.reasons,
                    slice_from=_iso(min_ts_s * 1000),
                    slice_to=_iso(max_ts_s * 1000 + 999),
                    error=exc.reason,
                    status=exc.status,
                    wait_s=delay_s,
                )
                await self._sleep(delay_s)
                continue
            return trades


def _window_start(window: _Window) -> int:
    return window.from_ms
