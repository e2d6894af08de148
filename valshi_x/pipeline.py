"""The synchronous heart of the daemon: frames in, whale alerts out, with the counts the stats line shows.

No asyncio and no I/O besides log lines, so live streams, replays and tests drive the very same code.

The trade clock (`valshi_x.trades.check_trade_time`: nothing more than FUTURE_TOLERANCE_MS ahead):
- live (`now_ms` given): the reference is this host's wall clock; a trade stamped further ahead is malformed
  `future_time` at once, stream and REST alike. One within the tolerance is taken, but sweeps never close past
  the wall clock (`stream_now_ms`, `WhaleDetector.add`): a skewed trade must not cut short a sweep still taking
  fills. So with the host clock d (<= the tolerance) behind Kalshi's, sweeps close d late.
- replay (`replay=True`): there is no wall clock, the capture's own trade time is the clock. A trade that leaps
  more than the tolerance ahead of it is held back, not believed: the next trade confirms the leap (it lies at
  or after the held one, less the tolerance: the capture really jumps, e.g. a recording resumed later) and both
  are taken, or contradicts it (it lies well before), and the held trade is malformed `future_time`; one still
  held at the end is taken. So one frame dated an hour ahead costs one held trade, never the replay's clock,
  its pruning or its memory.
- neither: no time check (unit tests of the later stages); the daemon always picks one of the two.

Per-frame conditions are logged through a `WarningBudget`: a storm of bad frames is counted, not printed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from valshi_x.trades import (
    FUTURE_TOLERANCE_MS,
    MalformedTrade,
    Trade,
    TradeFrame,
    check_trade_time,
    fast_trade_from_raw,
    parse_frame,
    trade_from_fields,
    trade_from_frame,
)
from valshi_x.whales import NO_CLOCK_MS, Alert, WhaleDetector

log = structlog.get_logger(__name__)

# Frames that are part of the protocol but carry no trade; a capture holds them too.
_CONTROL_TYPES = frozenset({"subscribed", "unsubscribed", "ok", "error", "list_subscriptions"})
# A malformed-frame storm (a format change) must not drown the journal: this many warnings per reason per minute.
_MALFORMED_WARNINGS_PER_MIN = 20
# Frame types named in a log line at most; a peer inventing a new type per frame must not grow a set forever.
MAX_NOTED_TYPES = 64


class WarningBudget:
    """Rate limit for warnings about per-frame conditions: `per_min` lines per key per minute, the rest counted.

    One line per frame would let a misbehaving peer drown the journal; one line per minute per kind says the
    same. `suppressed` counts what was held back (the stats line shows the totals it belongs to).
    """

    def __init__(
        self, per_min: int = _MALFORMED_WARNINGS_PER_MIN, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_min = per_min
        self.suppressed = 0
        self._monotonic = monotonic
        self._windows: dict[str, tuple[float, int]] = {}

    def allow(self, key: str) -> bool:
        """True when a line about `key` may be logged now."""
        now = self._monotonic()
        started, logged = self._windows.get(key, (now, 0))
        if now - started >= 60.0:
            started, logged = now, 0
        allowed = logged < self.per_min
        if allowed:
            logged += 1
        else:
            self.suppressed += 1
        if allowed or key in self._windows:
            self._windows[key] = (started, logged)
        return allowed


@dataclass(slots=True)
class PipelineCounts:
    """Running totals since start; the stats line and the end-of-replay summary print them."""

    frames: int = 0
    trades: int = 0
    malformed: int = 0
    malformed_unlogged: int = 0
    control: int = 0
    unknown: int = 0


class Pipeline:
    """Normalizes frames and feeds the whale detector; returns the alerts each call produces."""

    def __init__(
        self,
        detector: WhaleDetector,
        *,
        monotonic: Any = time.monotonic,
        now_ms: Callable[[], int] | None = None,
        replay: bool = False,
    ) -> None:
        if now_ms is not None and replay:
            raise ValueError("a replay has no wall clock: pass now_ms or replay, not both")
        self.detector = detector
        self.counts = PipelineCounts()
        self._monotonic = monotonic
        self._now_ms = now_ms  # live: trades are checked against this wall clock (module docstring)
        self._replay = replay
        self._held: Trade | None = None  # replay: a leap ahead, waiting for the next trade to confirm it
        self._warnings = WarningBudget(_MALFORMED_WARNINGS_PER_MIN, monotonic=monotonic)
        self._unknown_types: set[str] = set()
        # When the newest trade time last advanced, on our clock: the base of the stream clock.
        self.watermark_seen_at = monotonic()

    def on_raw(self, raw: str | bytes) -> list[Alert]:
        """One raw frame as received (a line of a capture)."""
        trade = fast_trade_from_raw(raw)
        if trade is not None:
            # The common case: a replay spends most of its time here.
            counts = self.counts
            counts.frames += 1
            detector = self.detector
            if self._replay and self._held is None and detector.watermark_ms >= trade.ts_ms - FUTURE_TOLERANCE_MS > 0:
                # `_take`'s replay case, inline: a trade within the tolerance of the clock.
                counts.trades += 1
                return detector.add(trade)
            return self._take(trade)
        try:
            frame = parse_frame(raw)
        except MalformedTrade as exc:
            self.counts.frames += 1
            self.on_bad_frame(raw, exc)
            return []
        return self.on_frame(frame)

    def on_trades(self, frames: list[TradeFrame]) -> list[Alert]:
        """A batch of trade frames the stream already decoded and typed (live): nothing is dispatched again.

        The clocks are read once per batch, not per trade: the wall clock for the trade-time rule and, when the
        trade time advanced, the monotonic one for the stream clock's base (a batch spans microseconds).
        """
        now_ms = self._now_ms
        if now_ms is None:  # replay and tests: the per-trade path with its own clock rules
            alerts: list[Alert] = []
            for frame in frames:
                self.counts.frames += 1
                alerts.extend(self._take(frame.msg))
            return alerts
        wall_ms = now_ms()
        latest_ms = wall_ms + FUTURE_TOLERANCE_MS
        detector = self.detector
        add = detector.add
        watermark_ms = detector.watermark_ms
        alerts = []
        taken = 0
        for frame in frames:
            trade = frame.msg
            if trade.ts_ms > latest_ms:
                self._refuse_future(trade, latest_ms - FUTURE_TOLERANCE_MS)
                continue
            taken += 1
            found = add(trade, wall_ms)  # closes sweeps up to the wall clock at most (`WhaleDetector.add`)
            if found:
                alerts.extend(found)
        counts = self.counts
        counts.frames += len(frames)
        counts.trades += taken
        if detector.watermark_ms > watermark_ms:
            self.watermark_seen_at = self._monotonic()
        return alerts

    def on_frame(self, frame: dict[str, Any]) -> list[Alert]:
        """One decoded frame; control frames are counted, unknown ones noted once per type."""
        self.counts.frames += 1
        kind = frame.get("type")
        if kind == "trade":
            try:
                trade = trade_from_frame(frame)
            except MalformedTrade as exc:
                self.on_bad_frame(frame, exc)
                return []
            return self._take(trade)
        if isinstance(kind, str) and kind in _CONTROL_TYPES:  # a list as a type must not raise (unhashable)
            self.counts.control += 1
            return []
        self.counts.unknown += 1
        name = str(kind)[:40]
        if name not in self._unknown_types and len(self._unknown_types) < MAX_NOTED_TYPES:
            self._unknown_types.add(name)
            log.info("unknown_frame_type", frame_type=name)
        return []

    def on_rest_trade(self, fields: dict[str, Any]) -> list[Alert]:
        """One trade object from Kalshi REST (backfill): the same path as a live trade."""
        try:
            trade = trade_from_fields(fields)
        except MalformedTrade as exc:
            self.on_bad_frame(fields, exc)
            return []
        return self._take(trade)

    def on_bad_frame(self, raw: object, exc: MalformedTrade) -> None:
        self.counts.malformed += 1
        if self._warnings.allow(exc.reason):
            log.warning("malformed_frame", reason=exc.reason, detail=exc.detail, frame=_excerpt(raw))
        else:
            self.counts.malformed_unlogged += 1

    def stream_now_ms(self) -> int:
        """Trade time now: the newest trade time plus what our clock says has passed since it arrived.

        Closing groups on this clock, not on wall-clock UTC, keeps a skewed host clock from splitting sweeps. A
        replay's clock is its trade time alone (this host's clock says nothing about a capture's pace).

        Live, it never passes the host's wall clock: a trade stamped up to FUTURE_TOLERANCE_MS ahead of it is
        taken, but must not close a sweep still taking fills (on arrival, `WhaleDetector.add` keeps the same
        bound). The price: when the host clock is behind Kalshi's by d (at most the tolerance, or trades would be
        refused), sweeps close d later than they could.
        """
        if self._replay:
            return self.detector.watermark_ms
        elapsed_ms = int((self._monotonic() - self.watermark_seen_at) * 1000)
        stream_ms = self.detector.watermark_ms + elapsed_ms
        if self._now_ms is not None:
            wall_ms = self._now_ms()
            if wall_ms < stream_ms:
                return wall_ms
        return stream_ms

    def close_due(self, grace_ms: int) -> list[Alert]:
        """Close groups whose window (plus `grace_ms` for late fills) has passed on the stream clock."""
        if not self.detector.open_groups:
            return []
        return self.detector.close_due(self.stream_now_ms() - grace_ms)

    def flush(self) -> list[Alert]:
        # A trade still held at the end was contradicted by nothing; with every group closing now, it can no
        # longer move a clock either.
        held, self._held = self._held, None
        alerts = self._add(held) if held is not None else []
        return alerts + self.detector.flush()

    def _take(self, trade: Trade) -> list[Alert]:
        detector = self.detector
        ts_ms = trade.ts_ms
        if self._replay and self._held is None and detector.watermark_ms >= ts_ms - FUTURE_TOLERANCE_MS > 0:
            # The replay's common case: a trade within the tolerance of the clock. (No clock call: a replay's
            # stream clock is its trade time, `stream_now_ms`.)
            self.counts.trades += 1
            return detector.add(trade)
        return self._take_checked(trade)

    def _take_checked(self, trade: Trade) -> list[Alert]:
        now_ms = self._now_ms
        if now_ms is not None:
            wall_ms = now_ms()
            try:
                check_trade_time(trade.ts_ms, wall_ms)
            except MalformedTrade as exc:
                self.on_bad_frame(_trade_excerpt(trade), exc)
                return []
            return self._add(trade, wall_ms)
        if not self._replay:
            return self._add(trade)
        # Replay: the clock is the newest believed trade time (module docstring).
        held = self._held
        if held is not None:
            self._held = None
            if trade.ts_ms >= held.ts_ms - FUTURE_TOLERANCE_MS:
                return self._add(held) + self._take_checked(trade)  # the leap is confirmed
            self._refuse_future(held, trade.ts_ms)
        clock_ms = self.detector.watermark_ms
        if clock_ms and trade.ts_ms <= clock_ms + FUTURE_TOLERANCE_MS:
            return self._add(trade)
        self._held = trade  # the first trade, or a leap ahead: believed once the next trade agrees
        return []

    def _refuse_future(self, trade: Trade, clock_ms: int) -> None:
        try:
            check_trade_time(trade.ts_ms, clock_ms)
        except MalformedTrade as exc:
            self.on_bad_frame(_trade_excerpt(trade), exc)

    def _add(self, trade: Trade, wall_ms: int = NO_CLOCK_MS) -> list[Alert]:
        self.counts.trades += 1
        detector = self.detector
        if trade.ts_ms > detector.watermark_ms:
            self.watermark_seen_at = self._monotonic()
        return detector.add(trade, wall_ms)


def _trade_excerpt(trade: Trade) -> dict[str, object]:
    return {"trade_id": trade.trade_id, "market_ticker": trade.ticker, "ts_ms": trade.ts_ms}


def _excerpt(raw: object) -> str:
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", "replace")
    elif isinstance(raw, dict):
        try:
            text = msgspec.json.encode(raw, enc_hook=repr).decode()
        except UnicodeEncodeError:  # a lone surrogate (a decoder other than msgspec's lets "\ud800" through)
            text = repr(raw)
    else:
        text = str(raw)
    return text if len(text) <= 200 else text[:200] + "..."
