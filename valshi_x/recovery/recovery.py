"""Recovery's one object: a loss's whole life, from the stream's event to the checkpoint.

A loss starts as an event: a seq gap, a disconnect, a drop on the full queue, a stall, a restart. `Recovery`
hears them (the stream's callbacks and the intake's queue watch, through `GapWatch`, which adds the trade times
around them) and tells the `RecoveryPlanner`, which plans the window to fetch and holds only the sweeps that
window could still complete, each for at most `HOLD_MAX_S`. `start` makes the `Backfiller` on the run's REST
client; its loop is the one loop that ticks the planner: it fetches the windows as they come due and feeds their
trades through the same pipeline as the socket's (`feed`: a trade the socket brought is skipped), into the sink.
A window fetched, or given up, releases its holds. The checkpoint never passes a window not fetched yet, an open
group or an alert on its way into the outbox, so a restart fetches from there again. The stall watch turns a
socket that looks alive but brings no trades into a window, then a resubscribe, then a reconnect.

For a replay (no stream, no REST, no checkpoint) `NoRecovery` answers the same questions and does nothing.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from valshi_x.config import Settings
from valshi_x.pipeline import Pipeline
from valshi_x.recovery.fetcher import UNREADABLE_TIME_MS, BackfillCounts, Backfiller, trade_time_ms
from valshi_x.recovery.gapwatch import GapWatch
from valshi_x.recovery.planner import RecoveryPlanner
from valshi_x.runmode import Tuning
from valshi_x.sink import AlertSink
from valshi_x.trades import utc_from_ms
from valshi_x.whales import Alert, SeenTradeIds

if TYPE_CHECKING:  # the live side's libraries load only when a live run starts: a replay needs none (issue 11)
    from valshi_x.kalshi.rest import KalshiRest
    from valshi_x.kalshi.stream import SeqGap
    from valshi_x.store import Store

log = structlog.get_logger(__name__)

Job = Coroutine[Any, Any, None]
CHECKPOINT_NAME = "processed_through_ms"


class StallTarget(Protocol):
    """The stream as the stall watch sees it (`TradeStream`; a replay's `IdleStream`)."""

    @property
    def connected_since(self) -> datetime | None: ...
    @property
    def connected_at_monotonic(self) -> float | None: ...
    async def resubscribe(self) -> bool: ...
    async def reconnect(self, reason: str) -> None: ...


class DaemonRecovery(Protocol):
    """What the daemon asks of recovery: `Recovery` live, `NoRecovery` for a replay."""

    @property
    def gate(self) -> RecoveryPlanner | None:
        """The whale detector's gate (the planner's holds); None: nothing is ever held."""

    @property
    def pending(self) -> int:
        """Windows planned, waiting or being fetched."""

    # The stream's events (its callbacks).
    def on_gap(self, gap: SeqGap) -> None: ...
    def on_disconnect(self) -> None: ...
    def on_subscribed(self) -> None: ...

    # The intake's queue (`valshi_x.intake.QueueWatch`).
    def before_queue(self, first_ts_ms: int) -> None: ...
    def queued(self, first_ts_ms: int, last_ts_ms: int) -> None: ...
    def dropped(self) -> None: ...

    # The sink's screen (`valshi_x.sink.OutboxScreen`).
    def before_outbox(self, alerts: list[Alert]) -> None: ...
    def entering_outbox(self, alert: Alert) -> None: ...

    async def start(
        self, store: Store, rest: KalshiRest | None, sink: AlertSink, stream: StallTarget
    ) -> dict[str, Job]:
        """The run's resources are open: plan what a restart missed; the loops to run beside the stages."""

    def resume_point_ms(self, in_flight_ms: int | None) -> int:
        """Where a restart may resume (0: nothing is saved)."""

    async def save_checkpoint(self, store: Store, through_ms: int) -> None: ...
    def stats_fields(self) -> dict[str, Any]: ...


def _nothing() -> None:
    return None


class Recovery:
    """A live run's recovery: the planner, the gap watch, the fetcher, the feed, the holds, the checkpoint and the
    stall watch (see the module docstring)."""

    def __init__(
        self,
        planner: RecoveryPlanner,
        pipeline: Pipeline,
        settings: Settings,
        tuning: Tuning,
        *,
        dedup_horizon_ms: int,
        started_ms: int,
        now_ms: Callable[[], int],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.planner = planner
        self.pipeline = pipeline
        self._settings = settings
        self._tuning = tuning
        self._now_ms = now_ms
        self._monotonic = monotonic
        self._started_ms = started_ms
        # The stream's events, with the trade times around them, for the planner.
        self.watch = GapWatch(planner, now_ms=now_ms, started_ms=started_ms, wake=self._wake)
        # The fetcher's, once `start` has made it: until then nothing is fetched and nothing counted.
        self._wake_fetcher: Callable[[], None] = _nothing
        self.fetched = BackfillCounts()
        self.whales_from_backfill = 0
        self.trades_already_seen = 0  # backfilled trades skipped because the socket had brought them
        self.alerts_unconfirmed = 0
        self.stall_resubscribes = 0
        # Trade ids only a backfill brought (the stream never delivered them), for the counts.
        self._recovered_ids = SeenTradeIds(horizon_ms=dedup_horizon_ms, max_ids=100_000)
        self._last_batch_s = monotonic()  # when a batch of trades was last queued (the stall watch's clock)

    @property
    def gate(self) -> RecoveryPlanner:
        return self.planner

    @property
    def pending(self) -> int:
        return self.planner.pending

    # --- the stream's events ------------------------------------------------------------------------------

    def on_gap(self, gap: SeqGap) -> None:
        self.watch.on_gap()

    def on_disconnect(self) -> None:
        self.watch.on_disconnect()

    def on_subscribed(self) -> None:
        self.watch.on_subscribed()

    # --- the queue's (the reader's path: a few calls per batch) ----------------------------------------------

    def before_queue(self, first_ts_ms: int) -> None:
        self.watch.before_queue(first_ts_ms)

    def queued(self, first_ts_ms: int, last_ts_ms: int) -> None:
        self._last_batch_s = self._monotonic()
        self.watch.queued(first_ts_ms, last_ts_ms)

    def dropped(self) -> None:
        self.watch.dropped()

    def _wake(self) -> None:
        self._wake_fetcher()  # a window may have become due: the fetcher looks now rather than at its next poll

    # --- the run ------------------------------------------------------------------------------------------

    async def start(
        self, store: Store, rest: KalshiRest | None, sink: AlertSink, stream: StallTarget
    ) -> dict[str, Job]:
        """The run's resources are open: make the fetcher, plan the restart's window from the saved checkpoint,
        and hand back the loops to run: the checkpoint, the stall watch and the fetcher (which ticks the planner)."""
        if rest is None:
            raise ValueError("live recovery needs Kalshi REST")
        settings, tuning = self._settings, self._tuning
        fetcher = Backfiller(
            rest,
            feed=functools.partial(self.feed, sink),
            planner=self.planner,
            clock_ms=self._now_ms,
            max_span_s=settings.backfill_max_s,
            retry_initial_s=tuning.backfill_retry_initial_s,
            retry_max_s=tuning.backfill_retry_max_s,
        )
        self._wake_fetcher, self.fetched = fetcher.wake, fetcher.counts
        await self._plan_startup(store)
        return {
            "checkpoint": self._checkpoint_loop(store, sink),
            "stall-watch": self.stall_watch(stream),
            "backfill": fetcher.run(),
        }

    async def _plan_startup(self, store: Store) -> None:
        saved = await store.get_checkpoint(CHECKPOINT_NAME)
        now_ms = self._now_ms()
        if saved is None:
            # First start: nothing before now is ours to post (the old bot may have), but from now on a crash
            # must find a checkpoint, even one in the first seconds before any trade has arrived.
            log.info("no_checkpoint", hint="first start: nothing to backfill")
            await store.set_checkpoint(CHECKPOINT_NAME, str(self._started_ms))
            return
        # A checkpoint older than BACKFILL_MAX_S is clipped (and logged, `backfill_clipped`) by the backfill itself.
        # The window ends at the first trade after the subscription (the planner waits for it), so the trades of
        # the connect and subscribe in between are fetched too.
        self.planner.on_startup(int(saved), now_ms)

    async def feed(self, sink: AlertSink, trades: list[dict[str, Any]]) -> int:
        """REST trades (sorted by trade time) through the live path; the number of whales they made."""
        seen = self.pipeline.detector.seen
        alerts: list[Alert] = []
        for fields in trades:
            trade_id = fields.get("trade_id")
            if isinstance(trade_id, str):
                if trade_id in seen:
                    # The socket brought it already (windows overlap live trades by design): not processed twice.
                    self.trades_already_seen += 1
                    continue
                ts_ms = trade_time_ms(fields)
                if ts_ms != UNREADABLE_TIME_MS:  # the normalizer reports that one as malformed
                    self._recovered_ids.add(trade_id, ts_ms)
            alerts.extend(self.pipeline.on_rest_trade(fields))
        if alerts:
            await sink.submit(alerts)
        await asyncio.sleep(0)  # a chunk at a time: the socket is read between chunks
        return len(alerts)

    # --- alerts on their way into the outbox ----------------------------------------------------------------

    def before_outbox(self, alerts: list[Alert]) -> None:
        """An alert whose hold ran out before a backfill window it touches was fetched: say which window."""
        planner = self.planner
        if not planner.pending:
            return
        window_ms = self._settings.sweep_window_ms
        for alert in alerts:
            uncovered = planner.uncovered(alert.first_ts_ms - window_ms, alert.first_ts_ms + window_ms)
            if uncovered:
                self.alerts_unconfirmed += 1
                from_ms = min(f for f, _ in uncovered)
                ends = [t for _, t in uncovered]
                log.warning(
                    "alert_unconfirmed",
                    alert_id=alert.alert_id,
                    value_usd=alert.value_usd_2dp,
                    uncovered_from=utc_from_ms(from_ms).isoformat(),
                    uncovered_to=utc_from_ms(max(e for e in ends if e is not None)).isoformat()
                    if None not in ends
                    else "open",
                    hold_max_s=self._settings.hold_max_s,
                    hint="closed with the fills known; a late fill is logged as sweep_grew_after_alert",
                )

    def entering_outbox(self, alert: Alert) -> None:
        if any(trade_id in self._recovered_ids for trade_id in alert.trade_ids):
            # Held sweeps close later on the stream clock, so the backfill's own return value misses them.
            self.whales_from_backfill += 1
            log.info("whale_recovered_by_backfill", alert_id=alert.alert_id, value_usd=alert.value_usd_2dp)

    # --- the checkpoint -------------------------------------------------------------------------------------

    def resume_point_ms(self, in_flight_ms: int | None) -> int:
        """Where a restart may resume: before every open group, every window still to fetch and every alert on
        its way into the outbox (`in_flight_ms`, the sink's low-water mark)."""
        through_ms = self.pipeline.detector.processed_through_ms()
        low_water_ms = self.planner.low_water_ms()
        if low_water_ms is not None:
            through_ms = min(through_ms, low_water_ms - 1)
        if in_flight_ms is not None:
            through_ms = min(through_ms, in_flight_ms - 1)
        return through_ms

    async def save_checkpoint(self, store: Store, through_ms: int) -> None:
        if through_ms > 0:
            await store.set_checkpoint(CHECKPOINT_NAME, str(through_ms))

    async def _checkpoint_loop(self, store: Store, sink: AlertSink) -> None:
        while True:
            await asyncio.sleep(self._tuning.checkpoint_every_s)
            await self.save_checkpoint(store, self.resume_point_ms(sink.oldest_in_flight_ms()))

    # --- the stall watch ------------------------------------------------------------------------------------

    async def stall_watch(self, stream: StallTarget) -> None:
        """No trade for STALL_RESUBSCRIBE_S while the socket looks alive: resubscribe, then reconnect."""
        limit_s = self._settings.stall_resubscribe_s
        resubscribed_at: float | None = None
        while True:
            await asyncio.sleep(min(limit_s / 4, 5.0))
            if stream.connected_since is None:
                continue  # not connected: the reconnect path recovers what is missed
            quiet_s = self._monotonic() - max(self._last_batch_s, stream.connected_at_monotonic or 0.0)
            if quiet_s < limit_s:
                resubscribed_at = None
                continue
            if resubscribed_at is None:
                log.warning("trade_stall", quiet_s=round(quiet_s, 1), action="resubscribe")
                self.stall_resubscribes += 1
                resubscribed_at = self._monotonic()
                # If trades did happen, the dead subscription missed them: fetch the quiet span back.
                self.watch.on_stall()
                await stream.resubscribe()
            elif self._monotonic() - resubscribed_at >= limit_s:
                log.warning("trade_stall", quiet_s=round(quiet_s, 1), action="reconnect")
                resubscribed_at = None
                self._last_batch_s = self._monotonic()
                await stream.reconnect("no trades after resubscribing")

    def stats_fields(self) -> dict[str, Any]:
        fetched, planner = self.fetched, self.planner
        return {
            "stall_resubscribes": self.stall_resubscribes,
            "backfill_windows": fetched.windows,
            "backfill_pending": planner.pending,
            "backfill_merged": planner.counts.merged,
            "backfill_pages": fetched.pages,
            "trades_backfilled": fetched.trades,
            "backfill_s": round(fetched.seconds, 1),
            "whales_from_backfill": self.whales_from_backfill,
            "backfill_failures": fetched.failures,
            "backfill_retries": fetched.retries,
            "backfill_uncovered_s": round(fetched.uncovered_s, 1),
            "trades_already_seen": self.trades_already_seen,
            "held_groups": self.pipeline.detector.held_groups,
            "holds_expired": planner.counts.expired,
            "alerts_unconfirmed": self.alerts_unconfirmed,
        }


class NoRecovery:
    """A replay's recovery: nothing is missed, held, fetched or checkpointed."""

    gate: RecoveryPlanner | None = None
    pending = 0

    def on_gap(self, gap: SeqGap) -> None:
        return None

    def on_disconnect(self) -> None:
        return None

    def on_subscribed(self) -> None:
        return None

    def before_queue(self, first_ts_ms: int) -> None:
        return None

    def queued(self, first_ts_ms: int, last_ts_ms: int) -> None:
        return None

    def dropped(self) -> None:
        return None

    def before_outbox(self, alerts: list[Alert]) -> None:
        return None

    def entering_outbox(self, alert: Alert) -> None:
        return None

    async def start(
        self, store: Store, rest: KalshiRest | None, sink: AlertSink, stream: StallTarget
    ) -> dict[str, Job]:
        return {}

    def resume_point_ms(self, in_flight_ms: int | None) -> int:
        return 0

    async def save_checkpoint(self, store: Store, through_ms: int) -> None:
        return None

    def stats_fields(self) -> dict[str, Any]:
        return {"stall_resubscribes": 0}
