"""Backfill: fetch the windows the recovery planner asks for from Kalshi REST, and feed them through the live path.

The planner (valshi_x/recovery/planner.py) decides which spans of trade time may hold missed trades and when each can be
fetched; `run` asks it every tick for the windows due and fetches up to `max_concurrent` of them at once (the REST
client's token bucket keeps the whole within Kalshi's budget). A window is fetched in ascending time slices;
within a slice every page is collected (Kalshi answers newest first), sorted by trade time and handed to `feed`,
so grouping sees fills in time order. A few slices of a window are fetched ahead, side by side, and fed in order.

This is Kalshi REST's one retry layer: a slice that fails is tried again from its start after a jittered,
doubling wait (valshi_x/backoff.py), for as long as the window is still within `max_span_s`; meanwhile the
planner's holds run out on their own deadline, so live alerts never wait for REST. A window that cannot be
completed (a permanent error, or retried past its age) is logged as `backfill_incomplete` with the part that
stays uncovered: an operator can see what may have been missed, never a silent loss.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from valshi_x import trades
from valshi_x.backoff import capped_step_s, equal_jitter
from valshi_x.kalshi.rest import KalshiRest, KalshiRestError
from valshi_x.recovery.planner import RecoveryPlanner, Window
from valshi_x.store import wall_ms
from valshi_x.trades import MalformedTrade, utc_from_ms

log = structlog.get_logger(__name__)

Feed = Callable[[list[dict[str, Any]]], Awaitable[int]]
UNREADABLE_TIME_MS = 2**62  # sorts a trade without a readable time last; `feed` reports it as malformed
# Failures worth trying again: the rest (a 4xx, a cursor loop) would fail the same way.
_RETRYABLE = frozenset({"rate_limited", "server_error", "timeout", "connection_error", "bad_response"})
# How often the planner is asked for windows that became due.
_POLL_S = 0.05


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

    windows: int = 0  # windows fetched to the end
    trades: int = 0  # trades fetched, overlap with live trades included
    whales: int = 0  # alerts the fed trades produced
    failures: int = 0  # windows given up
    retries: int = 0  # slices tried again
    seconds: float = 0.0  # time spent fetching and feeding
    uncovered_s: float = 0.0  # trade time left uncovered by failed or clipped windows
    pages: int = 0  # REST pages fetched (one request each)


class Backfiller:
    """Fetches the planner's windows from Kalshi REST, a few at once, and feeds them to the pipeline.

    `feed(trades)` takes REST trade objects sorted by trade time and returns the number of whales they produced.
    """

    def __init__(
        self,
        rest: KalshiRest,
        *,
        feed: Feed,
        planner: RecoveryPlanner,
        clock_ms: Callable[[], int] = wall_ms,
        slice_s: int = 10,
        slices_ahead: int = 3,
        max_span_s: float = 1800,
        max_concurrent: int = 4,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 15.0,
        page_limit: int = 1000,
        feed_chunk: int = 1000,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if slice_s < 1:
            raise ValueError("slice_s must be at least 1")
        self._rest = rest
        self._feed = feed
        self.planner = planner
        self._clock_ms = clock_ms
        self.slice_s = slice_s
        self.slices_ahead = max(1, slices_ahead)
        self.max_span_ms = int(max_span_s * 1000)
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._page_limit = page_limit
        # Feeding is synchronous work on the event loop: hand it over in chunks so the socket is read in between.
        self._feed_chunk = max(1, feed_chunk)
        self._monotonic = monotonic
        self._sleep = sleep
        self._rand = rand
        self._slots = asyncio.Semaphore(max_concurrent)
        self._wake = asyncio.Event()
        self.counts = BackfillCounts()

    @property
    def pending(self) -> int:
        """Windows planned, waiting or being fetched."""
        return self.planner.pending

    def wake(self) -> None:
        """Look for due windows now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Fetch windows as the planner makes them due, until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            while True:
                now_ms = self._clock_ms()
                self.planner.tick(now_ms)
                for window in self.planner.due(now_ms):
                    tasks.create_task(self._fetch_in_slot(window), name=f"backfill-{window.window_id}")
                self._wake.clear()
                try:
                    async with asyncio.timeout(_POLL_S):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _fetch_in_slot(self, window: Window) -> None:
        async with self._slots:
            done = await self.fetch(window)
        if done:
            self.planner.on_done(window.window_id, self._clock_ms())
        else:
            self.planner.on_given_up(window.window_id, self._clock_ms())

    async def fetch(self, window: Window) -> bool:
        """Fetch and feed one window; True when it was covered whole (a clipped old end aside)."""
        started_s = self._monotonic()
        from_ms, to_ms = window.from_ms, window.to_ms
        counts = self.counts
        oldest_ms = self._clock_ms() - self.max_span_ms
        if from_ms < oldest_ms:
            log.warning(
                "backfill_clipped",
                reasons=list(window.reasons),
                uncovered_from=_iso(from_ms),
                uncovered_to=_iso(oldest_ms),
                max_span_s=self.max_span_ms / 1000,
            )
            counts.uncovered_s += (oldest_ms - from_ms) / 1000
            from_ms = min(oldest_ms, to_ms)

        fed = whales = 0  # this window's own (windows are fetched side by side: the totals move meanwhile)
        first_s, last_s = from_ms // 1000, to_ms // 1000  # Kalshi filters by whole seconds, both ends inclusive
        slices = [
            (start_s, min(start_s + self.slice_s - 1, last_s)) for start_s in range(first_s, last_s + 1, self.slice_s)
        ]
        # A few slices are fetched ahead, side by side (a slice's pages must come one after another, cursor by
        # cursor); they are fed strictly in order, so grouping still sees fills in time order.
        ahead: deque[asyncio.Task[list[dict[str, Any]]]] = deque()
        try:
            for index, (slice_start_s, _) in enumerate(slices):
                while len(ahead) < self.slices_ahead and index + len(ahead) < len(slices):
                    start_s, end_s = slices[index + len(ahead)]
                    ahead.append(asyncio.create_task(self._slice_with_retries(start_s, end_s, window)))
                try:
                    fetched = await ahead.popleft()
                except KalshiRestError as exc:
                    counts.failures += 1
                    counts.seconds += self._monotonic() - started_s
                    uncovered_from_ms = max(from_ms, slice_start_s * 1000)
                    counts.uncovered_s += (to_ms - uncovered_from_ms) / 1000
                    log.error(
                        "backfill_incomplete",
                        reasons=list(window.reasons),
                        uncovered_from=_iso(uncovered_from_ms),
                        uncovered_to=_iso(to_ms),
                        uncovered_s=round((to_ms - uncovered_from_ms) / 1000, 3),
                        error=exc.reason,
                        status=exc.status,
                        trades=fed,
                        whales=whales,
                        hint="whales in the uncovered window may have been missed",
                    )
                    return False
                fetched.sort(key=_sort_key)
                chunk = self._feed_chunk
                for start in range(0, len(fetched), chunk):
                    part = fetched[start : start + chunk]
                    found = await self._feed(part)
                    whales += found
                    fed += len(part)
                    counts.whales += found
                    counts.trades += len(part)
        finally:
            for task in ahead:
                task.cancel()
            await asyncio.gather(*ahead, return_exceptions=True)

        counts.windows += 1
        seconds = self._monotonic() - started_s
        counts.seconds += seconds
        log.info(
            "backfill_done",
            reasons=list(window.reasons),
            from_time=_iso(from_ms),
            to_time=_iso(to_ms),
            trades=fed,
            whales=whales,
            seconds=round(seconds, 3),
        )
        return True

    async def _slice_with_retries(self, min_ts_s: int, max_ts_s: int, window: Window) -> list[dict[str, Any]]:
        """Every trade of one slice; a failed slice is tried again from its start while that can still help."""
        failures = 0
        while True:
            try:
                return await self._slice(min_ts_s, max_ts_s)
            except KalshiRestError as exc:
                failures += 1
                # Kalshi keeps its tape, but a slice wholly older than the span a start-up would fetch is given up
                # (judged by its end: the oldest slice of a clipped window starts right at that edge).
                too_old = max_ts_s * 1000 + 999 < self._clock_ms() - self.max_span_ms
                if exc.reason not in _RETRYABLE or too_old:
                    raise
                step_s = capped_step_s(failures, initial_s=self.retry_initial_s, cap_s=self.retry_max_s)
                wait_s = equal_jitter(step_s, self._rand())
                self.counts.retries += 1
                log.warning(
                    "backfill_retry",
                    reasons=list(window.reasons),
                    slice_from=_iso(min_ts_s * 1000),
                    slice_to=_iso(max_ts_s * 1000 + 999),
                    error=exc.reason,
                    status=exc.status,
                    tries=failures,
                    wait_s=round(wait_s, 3),
                )
                await self._sleep(wait_s)

    async def _slice(self, min_ts_s: int, max_ts_s: int) -> list[dict[str, Any]]:
        fetched: list[dict[str, Any]] = []
        async for page in self._rest.iter_trades(min_ts_s, max_ts_s, limit=self._page_limit):
            self.counts.pages += 1
            fetched.extend(page)
        return fetched
