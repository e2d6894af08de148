"""Wires the stages: source (Kalshi stream or a capture) -> bounded queue -> pipeline -> outbox -> poster.

Each stage is its own task under the `Supervisor` (valshi_x/supervisor.py), so a failing stage stops the rest, and
the stop is staged: intake first (the socket closes with 1000), then the queue is worked off and open groups are
flushed into the outbox, then an in-flight post gets `SHUTDOWN_DRAIN_S` to finish, the checkpoint is saved, and
only then is everything else cancelled. Whatever was not posted is in the outbox for the next start. Live or
replay is decided once (`ModeProfile`, valshi_x/runmode.py); health and the status line are pure functions of a
snapshot (valshi_x/health.py).

Gaps are recovered here too: a sequence gap, a reconnect, dropped frames or a restart are told to the
`RecoveryPlanner` (valshi_x/recovery/planner.py) with the trade times that bound them; it plans the windows the
`Backfiller` fetches from Kalshi REST and holds only the sweeps a window could still complete, each for at most
`HOLD_MAX_S`, so a sweep split by a gap is still one alert and a live whale is never kept waiting on REST.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from valshi_x.capture import Recorder, read_chunks
from valshi_x.config import Settings
from valshi_x.errors import ConfigError
from valshi_x.health import Snapshot, Today, TradeRate, healthy, status_line
from valshi_x.kalshi.rest import KalshiRest, TitleLookup
from valshi_x.pipeline import Pipeline
from valshi_x.recovery.fetcher import UNREADABLE_TIME_MS, Backfiller, trade_time_ms
from valshi_x.recovery.gapwatch import GapWatch
from valshi_x.recovery.planner import RecoveryPlanner
from valshi_x.runmode import ModeProfile, Tuning
from valshi_x.store import MODE_CHECKPOINT, Store, db_path, wall_ms
from valshi_x.supervisor import Stages, Supervisor
from valshi_x.systemd import HealthWatchdog, Notifier
from valshi_x.trades import MalformedTrade, TradeFrame, utc_from_ms
from valshi_x.whales import Alert, SeenTradeIds, WhaleDetector
from valshi_x.x.poster import Poster, PosterStats, open_transport

if TYPE_CHECKING:  # the live side's libraries load only when a live run starts: a replay needs none (issue 11)
    from aiohttp.client_middlewares import ClientMiddlewareType

    from valshi_x.kalshi.auth import KalshiSigner
    from valshi_x.kalshi.stream import SeqGap, TradeStream

log = structlog.get_logger(__name__)

# How often open groups are checked against the stream clock, and how long a late fill may still join.
_CLOSE_TICK_S = 0.05
_CLOSE_GRACE_MS = 100
# Frames the pipeline takes from the queue before it lets the event loop run again: a few ms of work, so a
# backlog never holds up the socket's reads or the answers to Kalshi's pings for longer.
MAX_FRAMES_PER_TURN = 2048
# At most one overflow warning per this many seconds; the count is in every stats line.
_OVERFLOW_LOG_EVERY_S = 10.0
CHECKPOINT_NAME = "processed_through_ms"
# Silence from Kalshi allowed beyond two idle timeouts before the daemon calls itself wedged (the watchdog then
# restarts it, about three minutes after the last frame). Wider than the reconnect backoff's 15 s cap on purpose:
# a restart cures a wedged process, not an outage at Kalshi, so an outage alone should not cause one.
_RECONNECT_ALLOWANCE_S = 60.0


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What the command line asked for, beyond the settings."""

    dry_run: bool = False
    replay_path: Path | None = None
    record_path: Path | None = None
    state_dir: Path | None = None  # --state-dir: makes a dry run's outbox durable
    lookup_titles: bool | None = None  # None: on when live, off for a replay

    @property
    def live(self) -> bool:
        return self.replay_path is None

    def mode(self, settings: Settings) -> ModeProfile:
        return ModeProfile.choose(settings, replay=self.replay_path is not None, lookup_titles=self.lookup_titles)

    def store_path(self, settings: Settings) -> Path | None:
        """Where the outbox lives; None keeps it in memory, so a dry run never touches the production outbox."""
        if self.state_dir is not None:
            return db_path(self.state_dir)
        return None if self.dry_run else db_path(settings.state_dir)


class Daemon:
    """One run of valshi-x: live from Kalshi, or a replay of a capture, until the source ends or `stop` is set."""

    def __init__(
        self,
        settings: Settings,
        options: RunOptions,
        *,
        signer: KalshiSigner | None = None,
        stop: asyncio.Event | None = None,
        env: Mapping[str, str] | None = None,
        x_middlewares: Sequence[ClientMiddlewareType] = (),
        tuning: Tuning | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.settings = settings
        self.options = options
        self.signer = signer
        self.stop = stop or asyncio.Event()
        self._env = env or {}
        self._x_middlewares = x_middlewares
        self.mode = mode = options.mode(settings)
        # Tests pass faster backoffs and retries through this; production uses the defaults.
        self.tuning = tuning = tuning or Tuning()
        # Health allows for the longest ordinary reconnect delay: the cap of the backoff the stream really uses.
        self._max_reconnect_delay_s = tuning.max_reconnect_delay_s or _RECONNECT_ALLOWANCE_S
        self._monotonic = monotonic
        self._now_ms = now_ms
        dedup_horizon_s = mode.dedup_horizon_s
        # The recovery planner decides which sweeps a pending backfill may still complete (a replay has none).
        self.planner = RecoveryPlanner(hold_max_ms=int(settings.hold_max_s * 1000)) if mode.recovery else None
        detector = WhaleDetector(
            settings.whale_threshold_dollars,
            settings.sweep_window_ms,
            dedup_horizon_ms=int(dedup_horizon_s * 1000),
            late_fill_horizon_ms=mode.late_fill_horizon_ms,
            gate=self.planner,
            # Set to the title lookup's prefetch once it exists (in `run`), when titles are looked up at all.
            on_near_whale=None,
            on_grew_after_alert=_log_grew_after_alert,
        )
        self.pipeline = Pipeline(
            detector, monotonic=monotonic, replay=not options.live, now_ms=now_ms if options.live else None
        )
        # Batches of typed trade frames, as the socket had them ready; bounded in frames (`_enqueue`), not batches.
        self.queue: asyncio.Queue[list[TradeFrame] | None] = asyncio.Queue()
        self.queue_max_frames = settings.frame_queue_size
        self.frames_queued = 0
        self.frames_dropped = 0
        self._last_overflow_log = -_OVERFLOW_LOG_EVERY_S
        self.recorder = Recorder(options.record_path) if options.record_path else None
        self.stream: TradeStream | None = None
        self.poster: Poster | None = None
        self.titles: TitleLookup | None = None  # made in `run`, with the REST client it asks
        self.store: Store | None = None
        self.backfiller: Backfiller | None = None
        self.notifier = Notifier.from_env(self._env)
        self.supervisor = Supervisor(self.stop, on_stopping=lambda: self.notifier.stopping("draining"))
        self.started_at = monotonic()
        self._started_ms = now_ms()
        self.alerts_refused = 0
        self.whales_from_backfill = 0
        self.stall_resubscribes = 0
        self._last_heard: float | None = None
        self._last_trade_seen_at = monotonic()
        # The stream's events, with the trade times around them, for the planner.
        self.gap_watch = (
            GapWatch(self.planner, now_ms=now_ms, started_ms=self._started_ms, wake=self._wake_backfill)
            if self.planner is not None
            else None
        )
        # Alerts on their way into the outbox (first trade time -> how many): the checkpoint must not pass them.
        self._submitting: dict[int, int] = {}
        self.alerts_unconfirmed = 0
        self.trades_already_seen = 0  # backfilled trades skipped because the socket had brought them
        # Trade ids only a backfill brought (the stream never delivered them), for the counts.
        self._recovered_ids = SeenTradeIds(horizon_ms=int(dedup_horizon_s * 1000), max_ids=100_000)
        self._trade_rate = TradeRate(self.started_at)
        self._today = Today()

    # --- the run ----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until the replay ends or `stop` is set, then drain in stages."""
        settings, options, mode = self.settings, self.options, self.mode
        log.info(
            "daemon_starting",
            mode=mode.name,
            dry_run=options.dry_run,
            threshold_usd=str(settings.whale_threshold_dollars),
            sweep_window_ms=settings.sweep_window_ms,
            state=str(options.store_path(settings) or "memory"),
        )
        async with AsyncExitStack() as resources:
            resources.callback(self.notifier.close)  # its socket, opened at the first message
            self.store = await Store.open(options.store_path(settings), dry_run=options.dry_run)
            resources.push_async_callback(self.store.close)
            await self._check_store_mode()
            lookup_titles = mode.lookup_titles
            rest: KalshiRest | None = None
            if mode.recovery or lookup_titles:
                http = _http_session()
                resources.push_async_callback(http.close)
                tuning = self.tuning
                rest = KalshiRest(
                    http,
                    settings.kalshi_api_url,
                    pause_initial_s=tuning.rest_pause_initial_s,
                    pause_max_s=tuning.rest_pause_max_s,
                )
            self.titles = titles = TitleLookup(rest if lookup_titles else None)
            resources.push_async_callback(titles.aclose)
            if lookup_titles:
                # A sweep at half the threshold starts its title lookup, so the post rarely waits for one.
                self.pipeline.detector.on_near_whale = titles.prefetch
            transport = await open_transport(settings, dry_run=options.dry_run, middlewares=self._x_middlewares)
            resources.push_async_callback(transport.close)
            overrides: dict[str, Any] = {}
            if options.dry_run:
                # A dry run posts nothing, so it spends no budget: every whale is shown as it comes.
                overrides |= {"posts_per_15min": 10**9, "posts_per_24h": 10**9}
            if not mode.max_alert_age_applies:
                overrides["max_alert_age_s"] = None
            self.poster = Poster.from_settings(
                settings,
                self.store,
                transport,
                lookup_label=titles.label_for if lookup_titles else None,
                peek_label=titles.cached_label if lookup_titles else None,  # issue 18: the filters' category
                **overrides,
            )
            if self.planner is not None and rest is not None:
                self.backfiller = Backfiller(
                    rest,
                    feed=self._feed_backfill,
                    planner=self.planner,
                    clock_ms=self._now_ms,
                    max_span_s=settings.backfill_max_s,
                    retry_initial_s=self.tuning.backfill_retry_initial_s,
                    retry_max_s=self.tuning.backfill_retry_max_s,
                )
                await self._request_startup_backfill()
            await self._run_stages()
        self._log_stats("daemon_stopped")

    async def _run_stages(self) -> None:
        """The run's jobs and the steps of its stop, handed to the supervisor (which owns their order)."""
        assert self.poster is not None
        poster = self.poster
        background: dict[str, Any] = {"stats": self._stats_loop()}
        if self.recorder is not None:
            background["recorder"] = self.recorder.run()
        if self.options.replay_path is not None:
            source, processor = self._replay(self.options.replay_path), None
        else:
            source, processor = self._live(), self._process_queue()
            background |= {
                "group-closer": self._close_on_stream_clock(),
                "checkpoint": self._checkpoint_loop(),
                "stall-watch": self._stall_watch(),
                "watchdog": self._watchdog().run(),
            }
            if self.backfiller is not None:
                background["backfill"] = self.backfiller.run()

        async def end_intake() -> None:
            await self.queue.put(None)

        async def flush() -> int:
            # Resume before the groups still open: a sweep cut by the stop is fetched whole again on restart.
            resume_from_ms = self._checkpoint_ms()
            await self._submit(self.pipeline.flush())
            return resume_from_ms

        async def drain_posts() -> None:
            if not await poster.drain(self.settings.shutdown_drain_s):
                log.warning("post_in_flight_at_stop", budget_s=self.settings.shutdown_drain_s)

        await self.supervisor.run(
            Stages(
                source=source,
                processor=processor,
                # A replay drives the poster itself, chunk by chunk (see `_submit`); live, it is a task of its own.
                poster=poster.run() if self.mode.poster_task else None,
                background=background,
                end_intake=end_intake,
                flush=flush,
                drain_posts=drain_posts,
                save=self._save_checkpoint,
            )
        )

    # --- sources ----------------------------------------------------------------------------------------------

    async def _live(self) -> None:
        from valshi_x.kalshi.stream import TradeStream  # noqa: PLC0415  (lazy: see the imports)

        self.stream = TradeStream(
            url=self.settings.kalshi_ws_url,
            signer=self.signer,
            deliver=self._enqueue,
            on_bad_frame=self._on_bad_frame,
            record=self.recorder.record if self.recorder else None,
            idle_timeout_s=self.settings.ws_idle_timeout_s,
            on_subscribed=self._on_subscribed,
            on_disconnect=self._on_disconnect,
            on_gap=self._on_gap,
            backoff=self.tuning.reconnect_backoff,
            slow_backoff=self.tuning.rejected_backoff,
            ping_interval_s=self.tuning.ws_ping_interval_s,
        )
        await self.stream.run()

    def _enqueue(self, batch: list[TradeFrame]) -> None:
        """Called by the reader with each batch of trade frames: it must never wait on the pipeline.

        The bound is in frames, as it was when frames were queued one by one: what fits is queued, the rest of
        the batch is dropped and told to the planner once, as the first dropped frame was.
        """
        watch = self.gap_watch
        if watch is not None:
            watch.before_queue(batch[0].msg.ts_ms)  # only a batch's first frame can follow a seq gap
        room = self.queue_max_frames - self.frames_queued
        dropped = len(batch) - room
        if dropped > 0:
            batch = batch[:room] if room > 0 else []
        if batch:
            self.queue.put_nowait(batch)
            self.frames_queued += len(batch)
            if watch is not None:
                watch.queued(batch[0].msg.ts_ms, batch[-1].msg.ts_ms)
        if dropped > 0:
            self.frames_dropped += dropped
            if watch is not None:
                watch.dropped()  # the dropped trades are still on Kalshi
            now = self._monotonic()
            if now - self._last_overflow_log >= _OVERFLOW_LOG_EVERY_S:
                self._last_overflow_log = now
                log.warning("frame_queue_full", frames_dropped=self.frames_dropped, queue_size=self.queue_max_frames)

    def _wake_backfill(self) -> None:
        if self.backfiller is not None:
            self.backfiller.wake()

    def _on_bad_frame(self, raw: str | bytes, exc: MalformedTrade) -> None:
        self.pipeline.counts.frames += 1
        self.pipeline.on_bad_frame(raw, exc)

    async def _process_queue(self) -> None:
        queue, pipeline = self.queue, self.pipeline
        while True:
            batch = await queue.get()
            alerts: list[Alert] = []
            taken = 0
            # Take the batches already waiting in one go (the outbox is written once for all of them), up to a
            # bound: a backlog is worked off in turns, with the socket read and pings answered in between.
            while batch is not None:
                self.frames_queued -= len(batch)
                taken += len(batch)
                found = pipeline.on_trades(batch)
                if found:
                    alerts.extend(found)
                if queue.empty() or taken >= MAX_FRAMES_PER_TURN:
                    break
                batch = queue.get_nowait()
            self._last_trade_seen_at = self._monotonic()
            if alerts:
                await self._submit(alerts)
            if batch is None:
                return
            if taken >= MAX_FRAMES_PER_TURN:
                await asyncio.sleep(0)  # `queue.get` would not yield while batches wait

    async def _replay(self, path: Path) -> None:
        pipeline = self.pipeline
        async for lines in read_chunks(path):
            alerts = pipeline.on_lines(lines)  # one call per chunk of about a megabyte (`Pipeline.on_lines`)
            if alerts:
                await self._submit(alerts)
            await asyncio.sleep(0)  # let signals and the poster run between chunks

    async def _submit(self, alerts: list[Alert]) -> None:
        assert self.poster is not None
        if not alerts:
            return
        # Until the whole batch is in the outbox, the checkpoint must not pass its oldest alert (the outbox
        # writer's low-water mark, see `_checkpoint_ms`).
        oldest_ms = min(alert.first_ts_ms for alert in alerts)
        self._submitting[oldest_ms] = self._submitting.get(oldest_ms, 0) + 1
        try:
            self._note_unconfirmed(alerts)
            await self._submit_each(alerts)
        finally:
            left = self._submitting.pop(oldest_ms) - 1
            if left:
                self._submitting[oldest_ms] = left

    def _note_unconfirmed(self, alerts: list[Alert]) -> None:
        """An alert whose hold ran out before a backfill window it touches was fetched: say which window."""
        planner = self.planner
        if planner is None or not planner.pending:
            return
        window_ms = self.settings.sweep_window_ms
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
                    hold_max_s=self.settings.hold_max_s,
                    hint="closed with the fills known; a late fill is logged as sweep_grew_after_alert",
                )

    async def _submit_each(self, alerts: list[Alert]) -> None:
        assert self.poster is not None
        for alert in alerts:
            if any(trade_id in self._recovered_ids for trade_id in alert.trade_ids):
                # Held sweeps close later on the stream clock, so the backfill's own return value misses them.
                self.whales_from_backfill += 1
                log.info("whale_recovered_by_backfill", alert_id=alert.alert_id, value_usd=alert.value_usd_2dp)
            if not await self.poster.submit(alert):
                # Its trades already belong to an alert (a restart, a backfill overlap): never post twice.
                self.alerts_refused += 1
            if not self.mode.poster_task:
                await self._post_pending()  # one at a time, or the outbox's biggest-first rule would reorder them

    async def _post_pending(self) -> None:
        """Replay only: work the outbox off now, so the dry-run lines come in stream order and all before exit."""
        assert self.poster is not None
        while (delay_s := await self.poster.step()) is not None:
            if delay_s > 0:
                await asyncio.sleep(delay_s)

    # --- gaps, reconnects and backfill -------------------------------------------------------------------------

    async def _check_store_mode(self) -> None:
        """A state directory is either a dry run's or a poster's, never both.

        A dry run marks whales posted and claims their trade ids; in the production outbox that would keep the
        real poster from ever posting them.
        """
        assert self.store is not None
        mode = "dry_run" if self.options.dry_run else "posting"
        found = await self.store.get_checkpoint(MODE_CHECKPOINT)
        if found is None:
            await self.store.set_checkpoint(MODE_CHECKPOINT, mode)
        elif found != mode:
            where = self.options.state_dir or self.settings.state_dir
            raise ConfigError(
                [f"--state-dir: {where} holds a {found.replace('_', ' ')} outbox; use another directory for a {mode}"]
            )

    async def _request_startup_backfill(self) -> None:
        assert self.store is not None and self.planner is not None
        saved = await self.store.get_checkpoint(CHECKPOINT_NAME)
        now_ms = self._now_ms()
        if saved is None:
            # First start: nothing before now is ours to post (the old bot may have), but from now on a crash
            # must find a checkpoint, even one in the first seconds before any trade has arrived.
            log.info("no_checkpoint", hint="first start: nothing to backfill")
            await self.store.set_checkpoint(CHECKPOINT_NAME, str(self._started_ms))
            return
        # A checkpoint older than BACKFILL_MAX_S is clipped (and logged, `backfill_clipped`) by the backfill itself.
        from_ms = int(saved)
        # The window ends at the first trade after the subscription (the planner waits for it), so the trades of
        # the connect and subscribe in between are fetched too.
        self.planner.on_startup(from_ms, now_ms)

    def _on_gap(self, gap: SeqGap) -> None:
        if self.gap_watch is not None:
            self.gap_watch.on_gap()

    def _on_disconnect(self) -> None:
        if self.gap_watch is not None:
            self.gap_watch.on_disconnect()

    def _on_subscribed(self, sid: int) -> None:
        self.notifier.ready(f"subscribed to trades (sid {sid})")
        if self.gap_watch is not None:
            self.gap_watch.on_subscribed()

    async def _feed_backfill(self, trades: list[dict[str, Any]]) -> int:
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
            await self._submit(alerts)
        await asyncio.sleep(0)  # a chunk at a time: the socket is read between chunks
        return len(alerts)

    # --- periodic work ----------------------------------------------------------------------------------------

    async def _close_on_stream_clock(self) -> None:
        while True:
            await asyncio.sleep(_CLOSE_TICK_S)
            if self.planner is not None:
                self.planner.tick(self._now_ms())  # holds past their deadline end here
            alerts = self.pipeline.close_due(_CLOSE_GRACE_MS)
            if alerts:
                await self._submit(alerts)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tuning.checkpoint_every_s)
            await self._save_checkpoint()

    def _checkpoint_ms(self) -> int:
        """Where a restart may resume: before every open group, every window still to fetch and every alert on
        its way into the outbox."""
        through_ms = self.pipeline.detector.processed_through_ms()
        low_water_ms = self.planner.low_water_ms() if self.planner is not None else None
        if low_water_ms is not None:
            through_ms = min(through_ms, low_water_ms - 1)
        if self._submitting:
            through_ms = min(through_ms, min(self._submitting) - 1)
        return through_ms

    async def _save_checkpoint(self, through_ms: int | None = None) -> None:
        if through_ms is None:
            through_ms = self._checkpoint_ms()
        if self.store is not None and through_ms > 0 and self.mode.recovery:
            await self.store.set_checkpoint(CHECKPOINT_NAME, str(through_ms))

    async def _stall_watch(self) -> None:
        """No trade for STALL_RESUBSCRIBE_S while the socket looks alive: resubscribe, then reconnect."""
        limit_s = self.settings.stall_resubscribe_s
        resubscribed_at: float | None = None
        while True:
            await asyncio.sleep(min(limit_s / 4, 5.0))
            stream = self.stream
            if stream is None or stream.connected_since is None:
                continue  # not connected: the reconnect path recovers what is missed
            quiet_s = self._monotonic() - max(self._last_trade_seen_at, stream.connected_at_monotonic or 0.0)
            if quiet_s < limit_s:
                resubscribed_at = None
                continue
            if resubscribed_at is None:
                log.warning("trade_stall", quiet_s=round(quiet_s, 1), action="resubscribe")
                self.stall_resubscribes += 1
                resubscribed_at = self._monotonic()
                # If trades did happen, the dead subscription missed them: fetch the quiet span back.
                if self.gap_watch is not None:
                    self.gap_watch.on_stall()
                await stream.resubscribe()
            elif self._monotonic() - resubscribed_at >= limit_s:
                log.warning("trade_stall", quiet_s=round(quiet_s, 1), action="reconnect")
                resubscribed_at = None
                self._last_trade_seen_at = self._monotonic()
                await stream.reconnect("no trades after resubscribing")

    def _watchdog(self) -> HealthWatchdog:
        return HealthWatchdog.from_env(self.notifier, self._env, healthy=self.healthy, status=self.status_line)

    def _snapshot(self) -> Snapshot:
        stream, poster = self.stream, self.poster
        if stream is not None and stream.last_heard_monotonic is not None:
            self._last_heard = stream.last_heard_monotonic
        return Snapshot(
            now_s=self._monotonic(),
            now_ms=self._now_ms(),
            started_at_s=self.started_at,
            tasks_alive=self.supervisor.all_alive(),
            last_heard_s=self._last_heard,
            connected_since=stream.connected_since if stream is not None else None,
            draining=self.notifier.stopping_sent,
            trades=self.pipeline.counts.trades,
            whales=self.pipeline.detector.alerts,
            posts=poster.stats.posted if poster else 0,
            queue_depth=self.frames_queued,
            last_posted_ms=poster.stats.last_posted_ms if poster else None,
            dry_run=self.options.dry_run,
        )

    def healthy(self) -> bool:
        """Every task alive and Kalshi heard from lately: the daemon is doing its job."""
        return healthy(
            self._snapshot(),
            ws_idle_timeout_s=self.settings.ws_idle_timeout_s,
            max_reconnect_delay_s=self._max_reconnect_delay_s,
        )

    def status_line(self) -> str:
        """The one-line summary `systemctl status` shows (sd_notify STATUS=)."""
        snap = self._snapshot()
        if snap.draining:
            return status_line(snap, per_min=0.0, today=(0, 0))
        per_min = self._trade_rate.per_min(snap.now_s, snap.trades)
        return status_line(snap, per_min=per_min, today=self._today.counts(snap.now_ms, snap.whales, snap.posts))

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            self._log_stats("stats")

    def _log_stats(self, event: str) -> None:
        counts, detector, stream = self.pipeline.counts, self.pipeline.detector, self.stream
        last_frame_age_s = None
        if stream is not None and stream.last_frame_monotonic is not None:
            last_frame_age_s = round(self._monotonic() - stream.last_frame_monotonic, 1)
        backfill: dict[str, Any] = {}
        if self.backfiller is not None:
            b, planner = self.backfiller.counts, self.backfiller.planner
            backfill = {
                "backfill_windows": b.windows,
                "backfill_pending": planner.pending,
                "backfill_merged": planner.counts.merged,
                "backfill_pages": b.pages,
                "trades_backfilled": b.trades,
                "backfill_s": round(b.seconds, 1),
                "whales_from_backfill": self.whales_from_backfill,
                "backfill_failures": b.failures,
                "backfill_retries": b.retries,
                "backfill_uncovered_s": round(b.uncovered_s, 1),
                "trades_already_seen": self.trades_already_seen,
                "held_groups": detector.held_groups,
                "holds_expired": planner.counts.expired,
                "alerts_unconfirmed": self.alerts_unconfirmed,
            }
        # No poster yet (a stop during start-up): zeros, named for the run's mode all the same.
        poster = self.poster.stats if self.poster is not None else PosterStats(dry_run=self.options.dry_run)
        log.info(
            event,
            frames=counts.frames,
            trades=counts.trades,
            malformed=counts.malformed,
            duplicates=detector.duplicates,
            groups=detector.groups_closed,
            open_groups=detector.open_groups,
            alerts=detector.alerts,
            alerts_refused=self.alerts_refused,
            **poster.posted_field(),
            **poster.lost_fields(),
            reconnects=stream.reconnects if stream else 0,
            gaps=stream.gaps if stream else 0,
            late_fills_rejoined=detector.late_fills_rejoined,
            late_fills_after_alert=detector.late_fills_after_alert,
            sweeps_forgotten_early=detector.kept_forgotten_early,
            stall_resubscribes=self.stall_resubscribes,
            frames_missing=stream.frames_missing if stream else 0,
            queue_depth=self.frames_queued,
            frames_dropped=self.frames_dropped,
            last_frame_age_s=last_frame_age_s,
            uptime_s=round(self._monotonic() - self.started_at, 1),
            **backfill,
            **(self.titles.stats_fields() if self.titles is not None else {}),
        )


def _http_session() -> Any:
    """An aiohttp session for Kalshi REST; aiohttp is imported here, so a replay without titles never loads it."""
    import aiohttp  # noqa: PLC0415

    return aiohttp.ClientSession()


def _log_grew_after_alert(alert_id: str, ticker: str, extra_usd: Decimal, trade_id: str) -> None:
    # Already posted: never a second post for one order, but the operator sees what the alert left out.
    log.warning(
        "sweep_grew_after_alert", alert_id=alert_id, ticker=ticker, extra_value_usd=str(extra_usd), trade_id=trade_id
    )
