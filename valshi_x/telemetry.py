"""Telemetry: the periodic stats line and the watchdog's health, each part answering for its own fields.

Every part of a run contributes its counts to the stats line through `stats_fields()` (the `StatsPart`
protocol): the pipeline, the sink, the poster, the stream, recovery, the intake, the title lookup. `Telemetry`
gathers them into the `stats` and `daemon_stopped` lines in one stable order (`_ORDER`: the order these lines
have always had; a field no one named there comes after them, in the order the parts gave it). `Health` takes
one `Snapshot` of the same parts for the watchdog's two questions (valshi_x/health.py says what they mean).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import structlog

from valshi_x.health import Snapshot, Today, TradeRate, healthy, status_line
from valshi_x.pipeline import Pipeline
from valshi_x.x.poster import Poster

log = structlog.get_logger(__name__)

# The stats line's fields in the order they have always been logged (the console and journal lines show them so).
_ORDER = (
    *("frames", "trades", "malformed", "duplicates", "groups", "open_groups", "alerts", "alerts_refused"),
    *("posted", "would_have_posted", "alerts_stale", "alerts_failed", "reconnects", "gaps"),
    *("late_fills_rejoined", "late_fills_after_alert", "sweeps_forgotten_early", "stall_resubscribes"),
    *("frames_missing", "seq_repeated", "subscribes_unacknowledged"),
    *("queue_depth", "frames_dropped", "last_frame_age_s", "uptime_s"),
    *("backfill_windows", "backfill_pending", "backfill_merged", "backfill_pages", "trades_backfilled"),
    *("backfill_s", "whales_from_backfill", "backfill_failures", "backfill_retries", "backfill_uncovered_s"),
    *("trades_already_seen", "held_groups", "holds_expired", "alerts_unconfirmed"),
)
_RANK = {name: rank for rank, name in enumerate(_ORDER)}


class StatsPart(Protocol):
    """A part of the run with counts of its own for the stats line."""

    def stats_fields(self) -> Mapping[str, Any]: ...


class StreamView(Protocol):
    """The stream as telemetry sees it (`TradeStream`; a replay's `IdleStream`)."""

    @property
    def connected_since(self) -> datetime | None: ...
    @property
    def last_frame_monotonic(self) -> float | None: ...
    @property
    def last_heard_monotonic(self) -> float | None: ...
    @property
    def reconnects(self) -> int: ...
    @property
    def gaps(self) -> int: ...
    @property
    def frames_missing(self) -> int: ...
    def stats_fields(self) -> Mapping[str, int]: ...


class QueueDepth(Protocol):
    @property
    def frames_queued(self) -> int: ...


class PipelineStats:
    """The pipeline's and the whale detector's counts."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def stats_fields(self) -> dict[str, int]:
        counts, detector = self._pipeline.counts, self._pipeline.detector
        return {
            "frames": counts.frames,
            "trades": counts.trades,
            "malformed": counts.malformed,
            "duplicates": detector.duplicates,
            "groups": detector.groups_closed,
            "open_groups": detector.open_groups,
            "alerts": detector.alerts,
            "late_fills_rejoined": detector.late_fills_rejoined,
            "late_fills_after_alert": detector.late_fills_after_alert,
            "sweeps_forgotten_early": detector.kept_forgotten_early,
        }


class PosterCounts:
    """The poster's counts: posts (or would-be posts in a dry run) and the whales that will not go out."""

    def __init__(self, poster: Poster) -> None:
        self._poster = poster

    def stats_fields(self) -> dict[str, int]:
        stats = self._poster.stats
        return {**stats.posted_field(), **stats.lost_fields()}


class StreamStats:
    """The stream's counts, and how long ago it last delivered a frame."""

    def __init__(self, stream: StreamView, monotonic: Callable[[], float]) -> None:
        self._stream = stream
        self._monotonic = monotonic

    def stats_fields(self) -> dict[str, Any]:
        stream = self._stream
        last = stream.last_frame_monotonic
        return {
            "reconnects": stream.reconnects,
            "gaps": stream.gaps,
            "frames_missing": stream.frames_missing,
            "last_frame_age_s": round(self._monotonic() - last, 1) if last is not None else None,
            **stream.stats_fields(),  # the stream's own counters (repeated seqs, unacknowledged subscribes)
        }


class Telemetry:
    """The `stats` line every `STATS_INTERVAL_S` and the `daemon_stopped` line, from the parts' own fields."""

    def __init__(self, parts: Sequence[StatsPart], *, monotonic: Callable[[], float], started_at_s: float) -> None:
        self._parts = parts
        self._monotonic = monotonic
        self._started_at_s = started_at_s

    def fields(self) -> dict[str, Any]:
        gathered: dict[str, Any] = {"uptime_s": round(self._monotonic() - self._started_at_s, 1)}
        for part in self._parts:
            gathered.update(part.stats_fields())
        return dict(sorted(gathered.items(), key=lambda item: _RANK.get(item[0], len(_RANK))))

    def log(self, event: str) -> None:
        log.info(event, **self.fields())

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.log("stats")


class Health:
    """The watchdog's two questions: is the daemon doing its job, and what does `systemctl status` show."""

    def __init__(
        self,
        *,
        stream: StreamView,
        pipeline: Pipeline,
        poster: Poster,
        queue: QueueDepth,
        tasks_alive: Callable[[], bool],
        draining: Callable[[], bool],
        ws_idle_timeout_s: float,
        max_reconnect_delay_s: float,
        dry_run: bool,
        monotonic: Callable[[], float],
        now_ms: Callable[[], int],
        started_at_s: float,
    ) -> None:
        self._stream, self._pipeline, self._poster, self._queue = stream, pipeline, poster, queue
        self._tasks_alive, self._draining = tasks_alive, draining
        self._ws_idle_timeout_s = ws_idle_timeout_s
        self._max_reconnect_delay_s = max_reconnect_delay_s
        self._dry_run = dry_run
        self._monotonic, self._now_ms = monotonic, now_ms
        self._started_at_s = started_at_s
        self._last_heard_s: float | None = None  # kept across reconnects: the stream forgets it with its socket
        self._trade_rate = TradeRate(started_at_s)
        self._today = Today()

    def snapshot(self) -> Snapshot:
        stream, poster = self._stream, self._poster.stats
        if stream.last_heard_monotonic is not None:
            self._last_heard_s = stream.last_heard_monotonic
        return Snapshot(
            now_s=self._monotonic(),
            now_ms=self._now_ms(),
            started_at_s=self._started_at_s,
            tasks_alive=self._tasks_alive(),
            last_heard_s=self._last_heard_s,
            connected_since=stream.connected_since,
            draining=self._draining(),
            trades=self._pipeline.counts.trades,
            whales=self._pipeline.detector.alerts,
            posts=poster.posted,
            queue_depth=self._queue.frames_queued,
            last_posted_ms=poster.last_posted_ms,
            dry_run=self._dry_run,
        )

    def healthy(self) -> bool:
        """Every task alive and Kalshi heard from lately: the daemon is doing its job."""
        return healthy(
            self.snapshot(),
            ws_idle_timeout_s=self._ws_idle_timeout_s,
            max_reconnect_delay_s=self._max_reconnect_delay_s,
        )

    def status_line(self) -> str:
        """The one-line summary `systemctl status` shows (sd_notify STATUS=)."""
        snap = self.snapshot()
        if snap.draining:
            return status_line(snap, per_min=0.0, today=(0, 0))
        per_min = self._trade_rate.per_min(snap.now_s, snap.trades)
        return status_line(snap, per_min=per_min, today=self._today.counts(snap.now_ms, snap.whales, snap.posts))
