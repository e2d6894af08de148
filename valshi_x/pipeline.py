"""The synchronous heart of the daemon: frames in, whale alerts out, with the counts the stats line shows.

No asyncio and no I/O besides log lines, so live streams, replays and tests drive the very same code.

The trade clock (`valshi_x.trades.check_trade_time`: nothing more than FUTURE_TOLERANCE_MS ahead):
- live (`now_ms` given): the reference is this host's wall clock; a trade stamped further ahead is malformed
  `future_time` at once, stream and REST alike. One within the tolerance is taken, but sweeps never close past
  the wall clock (`stream_now_ms`, and `WhaleDetector.add_batch(now_ms=...)` on arrival): a skewed trade must
  not cut short a sweep still taking fills. So with the host clock d (<= the tolerance) behind Kalshi's, sweeps
  close d late.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from valshi_x.logs import WarningBudget
from valshi_x.trades import (
    FUTURE_TOLERANCE_MS,
    MalformedTrade,
    Trade,
    TradeFrame,
    check_trade_time,
    parse_frame,
    trade_from_fields,
    trade_from_frame,
    trades_of_lines,
)
from valshi_x.whales import Alert, WhaleDetector

log = structlog.get_logger(__name__)

# Frames that are part of the protocol but carry no trade; a capture holds them too.
_CONTROL_TYPES = frozenset({"subscribed", "unsubscribed", "ok", "error", "list_subscriptions"})
# A malformed-frame storm (a format change) must not drown the journal: this many warnings per reason per minute.
_MALFORMED_WARNINGS_PER_MIN = 20
# Frame types named in a log line at most; a peer inventing a new type per frame must not grow a set forever.
MAX_NOTED_TYPES = 64


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

    def on_lines(self, lines: Sequence[str | bytes]) -> list[Alert]:
        """A chunk of raw frames as received (a replay's capture lines): decoded in one pass, taken as one batch.

        The decode is the stream's (`valshi_x.trades.trades_of_lines`: the typed frame in C, the careful dict decode
        for any other line), so live and replay read a frame the same way.
        """
        self.counts.frames += len(lines)
        return self._take_all(trades_of_lines(lines, self._careful))

    def on_raw(self, raw: str | bytes) -> list[Alert]:
        """One raw frame (a line of a capture); `on_lines` for a chunk of them."""
        return self.on_lines((raw,))

    def on_trades(self, frames: list[TradeFrame]) -> list[Alert]:
        """A batch of trade frames the stream already decoded and typed (live): nothing is decoded again."""
        self.counts.frames += len(frames)
        return self._take_all([frame.msg for frame in frames])

    def on_frame(self, frame: dict[str, Any]) -> list[Alert]:
        """One decoded frame; control frames are counted, unknown ones noted once per type."""
        self.counts.frames += 1
        trade = self._trade_of(frame)
        return self._take_all([trade]) if trade is not None else []

    def on_rest_trade(self, fields: dict[str, Any]) -> list[Alert]:
        """One trade object from Kalshi REST (backfill): the same path as a live trade."""
        try:
            trade = trade_from_fields(fields)
        except MalformedTrade as exc:
            self.on_bad_frame(fields, exc)
            return []
        return self._take_all([trade])

    def _careful(self, raw: str | bytes) -> Trade | None:
        """A frame the fast decode refused, decoded as a dict: its trade, or None (counted and noted here)."""
        try:
            frame = parse_frame(raw)
        except MalformedTrade as exc:
            self.on_bad_frame(raw, exc)
            return None
        return self._trade_of(frame)

    def _trade_of(self, frame: dict[str, Any]) -> Trade | None:
        kind = frame.get("type")
        if kind == "trade":
            try:
                return trade_from_frame(frame)
            except MalformedTrade as exc:
                self.on_bad_frame(frame, exc)
                return None
        if isinstance(kind, str) and kind in _CONTROL_TYPES:  # a list as a type must not raise (unhashable)
            self.counts.control += 1
            return None
        self.counts.unknown += 1
        name = str(kind)[:40]
        if name not in self._unknown_types and len(self._unknown_types) < MAX_NOTED_TYPES:
            self._unknown_types.add(name)
            log.info("unknown_frame_type", frame_type=name)
        return None

    def _take_all(self, trades: list[Trade]) -> list[Alert]:
        """Trades in order, under the trade clock's rules (module docstring), into the detector as one batch.

        The clocks are read once per batch, not per trade: the wall clock for the trade-time rule (live) and, when
        the trade time advanced, the monotonic one for the stream clock's base (a batch spans microseconds).
        """
        alerts: list[Alert] = []
        if not trades:
            return alerts
        detector = self.detector
        watermark_ms = detector.watermark_ms
        now_ms = self._now_ms
        if now_ms is not None:
            wall_ms = now_ms()
            latest_ms = wall_ms + FUTURE_TOLERANCE_MS
            taken = [trade for trade in trades if trade.ts_ms <= latest_ms]
            if len(taken) < len(trades):
                for trade in trades:
                    if trade.ts_ms > latest_ms:
                        self._refuse_future(trade, wall_ms)
            detector.add_batch(taken, alerts, now_ms=wall_ms)  # closes sweeps up to the wall clock at most
            self.counts.trades += len(taken)
        elif self._replay:
            self._take_replay(trades, alerts)
        else:
            detector.add_batch(trades, alerts)
            self.counts.trades += len(trades)
        if detector.watermark_ms > watermark_ms:
            self.watermark_seen_at = self._monotonic()
        return alerts

    def _take_replay(self, trades: list[Trade], alerts: list[Alert]) -> None:
        """Replay: trades within the tolerance of the clock go to the detector in one run (it stops at a leap);
        a leap, and every trade while one is held, take the held-trade rule (`_take_checked`)."""
        detector = self.detector
        rest = iter(trades)
        checked = 0
        while True:
            if self._held is None and detector.watermark_ms:
                leap = detector.add_batch(rest, alerts, max_leap_ms=FUTURE_TOLERANCE_MS)
            else:  # the first trade, or one is held
                leap = next(rest, None)
            if leap is None:
                break
            checked += 1
            alerts.extend(self._take_checked(leap))
        self.counts.trades += len(trades) - checked  # the checked ones count themselves when taken (`_add`)

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
        taken, but must not close a sweep still taking fills (on arrival, `WhaleDetector.add_batch` keeps the same
        bound). The price: when the host clock is behind Kalshi's by d (at most the tolerance, or trades would be
        refused), sweeps close d later than they could. It holds back by at most the tolerance: a host clock
        stepped back (an NTP step, a restored VM) must not stop sweeps from closing until it catches up.
        """
        if self._replay:
            return self.detector.watermark_ms
        elapsed_ms = int((self._monotonic() - self.watermark_seen_at) * 1000)
        stream_ms = self.detector.watermark_ms + elapsed_ms
        if self._now_ms is not None:
            wall_ms = self._now_ms()
            if wall_ms < stream_ms:
                return max(wall_ms, stream_ms - FUTURE_TOLERANCE_MS)
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

    def _take_checked(self, trade: Trade) -> list[Alert]:
        """Replay: the clock is the newest believed trade time (module docstring)."""
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

    def _add(self, trade: Trade) -> list[Alert]:
        self.counts.trades += 1
        return self.detector.add(trade)


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
