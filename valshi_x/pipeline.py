"""The synchronous heart of the daemon: frames in, whale alerts out, with the counts the stats line shows.

No asyncio and no I/O besides log lines, so live streams, replays and tests drive the very same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from valshi_x.trades import (
    MalformedTrade,
    Trade,
    fast_trade_from_raw,
    parse_frame,
    trade_from_fields,
    trade_from_frame,
)
from valshi_x.whales import Alert, WhaleDetector

log = structlog.get_logger(__name__)

# Frames that are part of the protocol but carry no trade; a capture holds them too.
_CONTROL_TYPES = frozenset({"subscribed", "unsubscribed", "ok", "error", "list_subscriptions"})
# A malformed-frame storm (a format change) must not drown the journal: this many warnings per reason per minute.
_MALFORMED_WARNINGS_PER_MIN = 20


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

    def __init__(self, detector: WhaleDetector, *, monotonic: Any = time.monotonic) -> None:
        self.detector = detector
        self.counts = PipelineCounts()
        self._monotonic = monotonic
        self._warn_window: dict[str, tuple[float, int]] = {}
        self._unknown_types: set[str] = set()
        # When the newest trade time last advanced, on our clock: the base of the stream clock.
        self.watermark_seen_at = monotonic()

    def on_raw(self, raw: str | bytes) -> list[Alert]:
        """One raw frame as received (a line of a capture)."""
        trade = fast_trade_from_raw(raw)
        if trade is not None:
            # The common case: a replay spends most of its time here.
            self.counts.frames += 1
            return self._take(trade)
        try:
            frame = parse_frame(raw)
        except MalformedTrade as exc:
            self.counts.frames += 1
            self.on_bad_frame(raw, exc)
            return []
        return self.on_frame(frame)

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
        if kind in _CONTROL_TYPES:
            self.counts.control += 1
            return []
        self.counts.unknown += 1
        name = str(kind)[:40]
        if name not in self._unknown_types:
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
        now = self._monotonic()
        started, logged = self._warn_window.get(exc.reason, (now, 0))
        if now - started >= 60.0:
            started, logged = now, 0
        if logged < _MALFORMED_WARNINGS_PER_MIN:
            log.warning("malformed_frame", reason=exc.reason, detail=exc.detail, frame=_excerpt(raw))
            logged += 1
        else:
            self.counts.malformed_unlogged += 1
        self._warn_window[exc.reason] = (started, logged)

    def stream_now_ms(self) -> int:
        """Trade time now: the newest trade time plus what our clock says has passed since it arrived.

        Closing groups on this clock, not on wall-clock UTC, keeps a skewed host clock from splitting sweeps.
        """
        elapsed_ms = int((self._monotonic() - self.watermark_seen_at) * 1000)
        return self.detector.watermark_ms + elapsed_ms

    def close_due(self, grace_ms: int) -> list[Alert]:
        """Close groups whose window (plus `grace_ms` for late fills) has passed on the stream clock."""
        if not self.detector.open_groups:
            return []
        return self.detector.close_due(self.stream_now_ms() - grace_ms)

    def flush(self) -> list[Alert]:
        return self.detector.flush()

    def _take(self, trade: Trade) -> list[Alert]:
        self.counts.trades += 1
        detector = self.detector
        if trade.ts_ms > detector.watermark_ms:
            self.watermark_seen_at = self._monotonic()
        return detector.add(trade)


def _excerpt(raw: object) -> str:
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", "replace")
    elif isinstance(raw, dict):
        text = msgspec.json.encode(raw, enc_hook=repr).decode()
    else:
        text = str(raw)
    return text if len(text) <= 200 else text[:200] + "..."
