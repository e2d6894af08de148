"""How a run is set up, decided once: the mode profile (live or replay) and the tuning tests shorten.

Pure data: the daemon reads these instead of asking "live?" at every turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from valshi_x.backoff import Backoff
from valshi_x.config import Settings

# A replay has no backfill, only re-deliveries seconds apart: ten minutes of trade ids is plenty (and 20 MB less).
_REPLAY_DEDUP_HORIZON_S = 600.0
# Live, closed short sweeps are kept this long in stream time for late fills (backfills) to reopen them.
_LIVE_LATE_FILL_HORIZON_MS = 120_000


@dataclass(frozen=True, slots=True)
class ModeProfile:
    """What differs between a live run and the replay of a capture."""

    name: str  # "live" or "replay", as logged in `daemon_starting`
    live: bool
    dedup_horizon_s: float  # trade ids are remembered this far back in trade time
    late_fill_horizon_ms: int  # closed short sweeps are kept this long for late fills; 0 keeps none
    recovery: bool  # gaps, reconnects and restarts are recovered from Kalshi REST (planner, backfill, checkpoint)
    lookup_titles: bool
    poster_task: bool  # the poster runs as its own task (live), or is driven after each alert (replay: in order)
    max_alert_age_applies: bool  # a capture's trades are old by nature

    @classmethod
    def choose(cls, settings: Settings, *, replay: bool, lookup_titles: bool | None) -> ModeProfile:
        if replay:
            return cls(
                name="replay",
                live=False,
                dedup_horizon_s=_REPLAY_DEDUP_HORIZON_S,
                # Late fills come from backfills, which a replay never has; keeping short sweeps costs it a quarter.
                late_fill_horizon_ms=0,
                recovery=False,
                lookup_titles=bool(lookup_titles),
                poster_task=False,
                max_alert_age_applies=False,
            )
        return cls(
            name="live",
            live=True,
            # As far back as a start-up backfill reaches, so its overlap with what was seen counts once.
            dedup_horizon_s=settings.backfill_max_s + 300,
            late_fill_horizon_ms=_LIVE_LATE_FILL_HORIZON_MS,
            recovery=True,
            lookup_titles=True if lookup_titles is None else lookup_titles,
            poster_task=True,
            max_alert_age_applies=True,
        )


@dataclass(frozen=True, slots=True)
class Tuning:
    """Timings tests shorten (loopback peers answer at once); production runs with the defaults."""

    reconnect_backoff: Backoff | None = None  # None: the stream's own (kalshi/stream.py)
    rejected_backoff: Backoff | None = None  # after a refused handshake (401/403); None: the stream's own
    ws_ping_interval_s: float | None = 20.0  # None: no client pings
    rest_pause_initial_s: float = 1.0  # first pause of every REST request after a 429
    rest_pause_max_s: float = 30.0
    backfill_retry_initial_s: float = 1.0  # first wait before a failed backfill slice is tried again
    backfill_retry_max_s: float = 15.0
    checkpoint_every_s: float = 2.0

    @property
    def max_reconnect_delay_s(self) -> float | None:
        """The longest ordinary reconnect delay, when the backoff is set here."""
        return self.reconnect_backoff.cap_s if self.reconnect_backoff is not None else None
