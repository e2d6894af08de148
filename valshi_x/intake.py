"""Frames into the pipeline: the bounded queue between the socket reader and the pipeline, or a capture replayed.

Live, the reader hands each batch of trade frames to `Intake.enqueue`, which never waits: the queue is bounded in
frames (`FRAME_QUEUE_SIZE`), what does not fit is dropped and counted, and recovery hears of every batch queued
and every drop (`QueueWatch`: the trade times that bound a gap, a reconnect or an overflow). `Intake.run` works
the queue off in turns of at most `MAX_FRAMES_PER_TURN` frames, so a backlog never holds up the socket's reads or
Kalshi's pings; `close_on_stream_clock` closes sweeps whose window has passed.
The alerts go to the sink (valshi_x/sink.py).

A replay has no socket and no queue: `replay` feeds the capture to the pipeline chunk by chunk, and `IdleStream`
stands in for the stream (never connected, nothing missed), so health and the stats line read the same fields.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog

from valshi_x.capture import read_chunks
from valshi_x.pipeline import Pipeline
from valshi_x.trades import MalformedTrade, TradeFrame
from valshi_x.whales import Alert

log = structlog.get_logger(__name__)

# Frames the pipeline takes from the queue before it lets the event loop run again: a few ms of work, so a
# backlog never holds up the socket's reads or the answers to Kalshi's pings for longer.
MAX_FRAMES_PER_TURN = 2048
# At most one overflow warning per this many seconds; the count is in every stats line.
_OVERFLOW_LOG_EVERY_S = 10.0
# How often open groups are checked against the stream clock, and how long a late fill may still join.
_CLOSE_TICK_S = 0.05
_CLOSE_GRACE_MS = 100


class QueueWatch(Protocol):
    """What recovery hears of the queue: the trade times that bound a gap, an overflow or a reconnect."""

    def before_queue(self, first_ts_ms: int) -> None: ...
    def queued(self, first_ts_ms: int, last_ts_ms: int) -> None: ...
    def dropped(self) -> None: ...


class AlertsOut(Protocol):
    """Where alerts go (valshi_x/sink.py's `AlertSink`)."""

    async def submit(self, alerts: list[Alert]) -> None: ...


class Intake:
    """The live queue of trade-frame batches, bounded in frames, and the loops that feed the pipeline from it."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_frames: int,
        watch: QueueWatch,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipeline = pipeline
        self.watch = watch
        self._monotonic = monotonic
        # Batches of typed trade frames, as the socket had them ready; bounded in frames (`enqueue`), not batches.
        self.queue: asyncio.Queue[list[TradeFrame] | None] = asyncio.Queue()
        self.max_frames = max_frames
        self.frames_queued = 0
        self.frames_dropped = 0
        self._last_overflow_log = -_OVERFLOW_LOG_EVERY_S

    def enqueue(self, batch: list[TradeFrame]) -> None:
        """Called by the reader with each batch of trade frames: it must never wait on the pipeline.

        The bound is in frames, as it was when frames were queued one by one: what fits is queued, the rest of
        the batch is dropped and told to recovery once, as the first dropped frame was.
        """
        watch = self.watch
        watch.before_queue(batch[0].msg.ts_ms)  # only a batch's first frame can follow a seq gap
        room = self.max_frames - self.frames_queued
        dropped = len(batch) - room
        if dropped > 0:
            batch = batch[:room] if room > 0 else []
        if batch:
            self.queue.put_nowait(batch)
            self.frames_queued += len(batch)
            watch.queued(batch[0].msg.ts_ms, batch[-1].msg.ts_ms)
        if dropped > 0:
            self.frames_dropped += dropped
            watch.dropped()  # the dropped trades are still on Kalshi
            now = self._monotonic()
            if now - self._last_overflow_log >= _OVERFLOW_LOG_EVERY_S:
                self._last_overflow_log = now
                log.warning("frame_queue_full", frames_dropped=self.frames_dropped, queue_size=self.max_frames)

    def on_bad_frame(self, raw: str | bytes, exc: MalformedTrade) -> None:
        """Called by the reader with a frame it could not read: counted and logged by the pipeline."""
        self.pipeline.counts.frames += 1
        self.pipeline.on_bad_frame(raw, exc)

    async def end(self) -> None:
        """Nothing more comes: `run` returns once it has worked off what is queued."""
        await self.queue.put(None)

    async def run(self, sink: AlertsOut) -> None:
        """Work the queue off into the pipeline, its alerts into `sink`, until `end`."""
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
            if alerts:
                await sink.submit(alerts)
            if batch is None:
                return
            if taken >= MAX_FRAMES_PER_TURN:
                await asyncio.sleep(0)  # `queue.get` would not yield while batches wait

    async def close_on_stream_clock(self, sink: AlertsOut) -> None:
        """Close the sweeps whose window has passed on the stream clock (and held ones recovery let go)."""
        pipeline = self.pipeline
        while True:
            await asyncio.sleep(_CLOSE_TICK_S)
            alerts = pipeline.close_due(_CLOSE_GRACE_MS)
            if alerts:
                await sink.submit(alerts)

    def stats_fields(self) -> dict[str, int]:
        return {"queue_depth": self.frames_queued, "frames_dropped": self.frames_dropped}


async def replay(path: Path, pipeline: Pipeline, sink: AlertsOut) -> None:
    """Feed a capture to the pipeline, one chunk of about a megabyte at a time (`Pipeline.on_lines`)."""
    async for lines in read_chunks(path):
        alerts = pipeline.on_lines(lines)
        if alerts:
            await sink.submit(alerts)
        await asyncio.sleep(0)  # let signals and the poster run between chunks


@dataclass(slots=True)
class IdleStream:
    """A replay's stand-in for the Kalshi stream: never connected, nothing missed (health and stats read it)."""

    connected_since: datetime | None = None
    connected_at_monotonic: float | None = None
    last_frame_monotonic: float | None = None
    last_heard_monotonic: float | None = None
    reconnects: int = 0
    gaps: int = 0
    frames_missing: int = 0

    async def run(self) -> None:
        """Nothing to read: a replay's frames come from its capture (`replay`)."""

    def stats_fields(self) -> dict[str, int]:
        return {}

    async def resubscribe(self) -> bool:
        return False

    async def reconnect(self, reason: str) -> None:
        return None
