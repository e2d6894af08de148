"""The alert sink: every alert the pipeline closes goes into the outbox through here, live, backfilled or replayed.

Before a batch goes in, recovery sees it (`OutboxScreen`: which alerts closed before a window they touch was
fetched, which ones only a backfill brought; the place to ask "may this go out yet"). Until the whole batch is
in the outbox, the checkpoint must not pass its oldest alert: `oldest_in_flight_ms` is the sink's low-water
mark, which recovery's checkpoint respects. An alert whose trades already belong to one in the outbox is
refused (never posted twice) and counted. A replay drives the poster itself, one alert at a time, so its
dry-run lines come in stream order.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from valshi_x.whales import Alert
from valshi_x.x.poster import Poster


class OutboxScreen(Protocol):
    """What recovery does with alerts on their way into the outbox (valshi_x/recovery/recovery.py)."""

    def before_outbox(self, alerts: list[Alert]) -> None:
        """A batch about to go in: the alerts recovery could not confirm yet are said so here."""

    def entering_outbox(self, alert: Alert) -> None:
        """Each alert, just before it goes in: the whales only a backfill brought are counted here."""


class AlertSink:
    """Alerts into the outbox, with the low-water mark the checkpoint must respect."""

    def __init__(self, poster: Poster, screen: OutboxScreen, *, drive_poster: bool) -> None:
        self._poster = poster
        self._screen = screen
        self._drive_poster = drive_poster  # a replay: the outbox is worked off after each alert
        # Alerts on their way into the outbox (first trade time -> how many batches): the checkpoint must not pass them.
        self._submitting: dict[int, int] = {}
        self.alerts_refused = 0

    async def submit(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        # Until the whole batch is in the outbox, the checkpoint must not pass its oldest alert.
        oldest_ms = min(alert.first_ts_ms for alert in alerts)
        self._submitting[oldest_ms] = self._submitting.get(oldest_ms, 0) + 1
        try:
            self._screen.before_outbox(alerts)
            await self._submit_each(alerts)
        finally:
            left = self._submitting.pop(oldest_ms) - 1
            if left:
                self._submitting[oldest_ms] = left

    def oldest_in_flight_ms(self) -> int | None:
        """First trade time of the oldest alert not yet in the outbox; None when none is on its way."""
        return min(self._submitting) if self._submitting else None

    async def _submit_each(self, alerts: list[Alert]) -> None:
        poster = self._poster
        for alert in alerts:
            self._screen.entering_outbox(alert)
            if not await poster.submit(alert):
                # Its trades already belong to an alert (a restart, a backfill overlap): never post twice.
                self.alerts_refused += 1
            if self._drive_poster:
                await self._post_pending()  # one at a time, or the outbox's biggest-first rule would reorder them

    async def _post_pending(self) -> None:
        """Replay only: work the outbox off now, so the dry-run lines come in stream order and all before exit."""
        while (delay_s := await self._poster.step()) is not None:
            if delay_s > 0:
                await asyncio.sleep(delay_s)

    def stats_fields(self) -> dict[str, int]:
        return {"alerts_refused": self.alerts_refused}
