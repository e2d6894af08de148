"""The composition root: builds one run's parts and hands their jobs to the supervisor.

A frame's path: the Kalshi stream (valshi_x/kalshi/stream.py) or a capture -> the intake's bounded queue
(valshi_x/intake.py) -> the pipeline (valshi_x/pipeline.py) -> the alert sink (valshi_x/sink.py) -> the outbox
-> the poster (valshi_x/x/poster.py). A loss's path is recovery's alone (valshi_x/recovery/recovery.py): the
stream's events and the queue's drops become windows, fetched from Kalshi REST and fed through the same
pipeline, with bounded holds and a checkpoint that never passes what is still missing. The stats line and the
watchdog's health are the parts' own fields (valshi_x/telemetry.py).

Each stage is its own task under the `Supervisor` (valshi_x/supervisor.py), so a failing stage stops the rest, and
the stop is staged: intake first (the socket closes with 1000), then the queue is worked off and open groups are
flushed into the outbox, then an in-flight post gets `SHUTDOWN_DRAIN_S` to finish, the checkpoint is saved, and
only then is everything else cancelled. Whatever was not posted is in the outbox for the next start. Live or
replay is decided once (`ModeProfile`, valshi_x/runmode.py): a replay has `NoRecovery` and an `IdleStream`.
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

from valshi_x.capture import Recorder
from valshi_x.config import Settings
from valshi_x.intake import IdleStream, Intake, replay
from valshi_x.pipeline import Pipeline
from valshi_x.recovery.planner import RecoveryPlanner
from valshi_x.recovery.recovery import CHECKPOINT_NAME, DaemonRecovery, NoRecovery, Recovery
from valshi_x.runmode import ModeProfile, Tuning
from valshi_x.sink import AlertSink
from valshi_x.store import db_path, wall_ms
from valshi_x.supervisor import Stages, Supervisor
from valshi_x.systemd import HealthWatchdog, Notifier
from valshi_x.telemetry import Health, PipelineStats, PosterCounts, StreamStats, Telemetry
from valshi_x.whales import WhaleDetector
from valshi_x.wiring import Resources, open_resources

if TYPE_CHECKING:  # the live side's libraries load only when a live run starts: a replay needs none (issue 11)
    from aiohttp.client_middlewares import ClientMiddlewareType

    from valshi_x.kalshi.auth import KalshiSigner
    from valshi_x.kalshi.stream import TradeStream

__all__ = ["CHECKPOINT_NAME", "Daemon", "RunOptions"]

log = structlog.get_logger(__name__)

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
    """One run of valshi-x: live from Kalshi, or a replay of a capture, until the source ends or `stop` is set.

    The parts that need no I/O are built here; the run's outside resources (store, REST, X) are opened by `run`.
    """

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
        self.stop = stop or asyncio.Event()
        self._env = env or {}
        self._x_middlewares = x_middlewares
        self.mode = mode = options.mode(settings)
        # Tests pass faster backoffs and retries through this; production uses the defaults.
        self.tuning = tuning = tuning or Tuning()
        self._monotonic = monotonic
        self._now_ms = now_ms
        self.started_at = monotonic()
        started_ms = now_ms()
        self.notifier = Notifier.from_env(self._env)
        self.supervisor = Supervisor(self.stop, on_stopping=lambda: self.notifier.stopping("draining"))
        # The planner decides which sweeps a pending backfill may still complete (a replay has none).
        planner = RecoveryPlanner(hold_max_ms=int(settings.hold_max_s * 1000)) if mode.recovery else None
        detector = WhaleDetector(
            settings.whale_threshold_dollars,
            settings.sweep_window_ms,
            dedup_horizon_ms=int(mode.dedup_horizon_s * 1000),
            late_fill_horizon_ms=mode.late_fill_horizon_ms,
            gate=planner,
            on_near_whale=None,  # the title lookup's prefetch, once `run` has it (when titles are looked up)
            on_grew_after_alert=_log_grew_after_alert,
        )
        self.pipeline = Pipeline(
            detector, monotonic=monotonic, replay=not options.live, now_ms=now_ms if options.live else None
        )
        self.recovery: DaemonRecovery = (
            Recovery(
                planner,
                self.pipeline,
                settings,
                tuning,
                dedup_horizon_ms=int(mode.dedup_horizon_s * 1000),
                started_ms=started_ms,
                now_ms=now_ms,
                monotonic=monotonic,
            )
            if planner is not None
            else NoRecovery()
        )
        self.intake = Intake(
            self.pipeline, max_frames=settings.frame_queue_size, watch=self.recovery, monotonic=monotonic
        )
        self.recorder = Recorder(options.record_path) if options.record_path else None
        self.stream: TradeStream | IdleStream = self._stream(signer) if options.live else IdleStream()

    def _stream(self, signer: KalshiSigner | None) -> TradeStream:
        from valshi_x.kalshi.stream import TradeStream  # noqa: PLC0415  (lazy: see the imports)

        settings, tuning, recovery = self.settings, self.tuning, self.recovery
        return TradeStream(
            url=settings.kalshi_ws_url,
            signer=signer,
            deliver=self.intake.enqueue,
            on_bad_frame=self.intake.on_bad_frame,
            record=self.recorder.record if self.recorder else None,
            idle_timeout_s=settings.ws_idle_timeout_s,
            on_subscribed=self._on_subscribed,
            on_disconnect=recovery.on_disconnect,
            on_gap=recovery.on_gap,
            backoff=tuning.reconnect_backoff,
            slow_backoff=tuning.rejected_backoff,
            ping_interval_s=tuning.ws_ping_interval_s,
        )

    def _on_subscribed(self, sid: int) -> None:
        self.notifier.ready(f"subscribed to trades (sid {sid})")
        self.recovery.on_subscribed()

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
            opened = await open_resources(
                resources,
                settings,
                mode,
                self.tuning,
                store_path=options.store_path(settings),
                state_dir=options.state_dir or settings.state_dir,
                dry_run=options.dry_run,
                x_middlewares=self._x_middlewares,
            )
            if mode.lookup_titles:
                # A sweep at half the threshold starts its title lookup, so the post rarely waits for one.
                self.pipeline.detector.on_near_whale = opened.titles.prefetch
            sink = AlertSink(opened.poster, self.recovery, drive_poster=not mode.poster_task)
            recovery_jobs = await self.recovery.start(opened.store, opened.rest, sink, self.stream)
            telemetry = Telemetry(
                [
                    PipelineStats(self.pipeline),
                    sink,
                    PosterCounts(opened.poster),
                    StreamStats(self.stream, self._monotonic),
                    self.recovery,
                    self.intake,
                    opened.titles,
                ],
                monotonic=self._monotonic,
                started_at_s=self.started_at,
            )
            await self._run_stages(opened, sink, telemetry, recovery_jobs)
        telemetry.log("daemon_stopped")

    async def _run_stages(
        self, opened: Resources, sink: AlertSink, telemetry: Telemetry, recovery_jobs: dict[str, Any]
    ) -> None:
        """The run's jobs and the steps of its stop, handed to the supervisor (which owns their order)."""
        poster, store, recovery, intake = opened.poster, opened.store, self.recovery, self.intake
        background: dict[str, Any] = {"stats": telemetry.run(self.settings.stats_interval_s)}
        if self.recorder is not None:
            background["recorder"] = self.recorder.run()
        if self.options.replay_path is not None:
            source, processor = replay(self.options.replay_path, self.pipeline, sink), None
        else:
            source, processor = self.stream.run(), intake.run(sink)
            background |= {
                "group-closer": intake.close_on_stream_clock(sink),
                **recovery_jobs,
                "watchdog": self._watchdog(opened).run(),
            }

        async def flush() -> int:
            # Resume before the groups still open: a sweep cut by the stop is fetched whole again on restart.
            resume_from_ms = recovery.resume_point_ms(sink.oldest_in_flight_ms())
            await sink.submit(self.pipeline.flush())
            return resume_from_ms

        async def drain_posts() -> None:
            if not await poster.drain(self.settings.shutdown_drain_s):
                log.warning("post_in_flight_at_stop", budget_s=self.settings.shutdown_drain_s)

        async def save(through_ms: int) -> None:
            await recovery.save_checkpoint(store, through_ms)

        await self.supervisor.run(
            Stages(
                source=source,
                processor=processor,
                # A replay drives the poster itself, chunk by chunk (see the sink); live, it is a task of its own.
                poster=poster.run() if self.mode.poster_task else None,
                background=background,
                end_intake=intake.end,
                flush=flush,
                drain_posts=drain_posts,
                save=save,
            )
        )

    def _watchdog(self, opened: Resources) -> HealthWatchdog:
        # Health allows for the longest ordinary reconnect delay: the cap of the backoff the stream really uses.
        health = Health(
            stream=self.stream,
            pipeline=self.pipeline,
            poster=opened.poster,
            queue=self.intake,
            tasks_alive=self.supervisor.all_alive,
            draining=lambda: self.notifier.stopping_sent,
            ws_idle_timeout_s=self.settings.ws_idle_timeout_s,
            max_reconnect_delay_s=self.tuning.max_reconnect_delay_s or _RECONNECT_ALLOWANCE_S,
            dry_run=self.options.dry_run,
            monotonic=self._monotonic,
            now_ms=self._now_ms,
            started_at_s=self.started_at,
        )
        return HealthWatchdog.from_env(self.notifier, self._env, healthy=health.healthy, status=health.status_line)


def _log_grew_after_alert(alert_id: str, ticker: str, extra_usd: Decimal, trade_id: str) -> None:
    # Already posted: never a second post for one order, but the operator sees what the alert left out.
    log.warning(
        "sweep_grew_after_alert", alert_id=alert_id, ticker=ticker, extra_value_usd=str(extra_usd), trade_id=trade_id
    )
