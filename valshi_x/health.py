"""Health and the status line: pure functions of a snapshot of the daemon's components, plus two tiny counters.

No I/O and no clock of their own: the daemon takes a `Snapshot` and a time, these say what it means.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import date, datetime

from valshi_x.trades import utc_from_ms


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the health check and the status line look at, taken at one moment."""

    now_s: float  # monotonic
    now_ms: int  # wall clock, UTC
    started_at_s: float
    tasks_alive: bool
    last_heard_s: float | None  # monotonic time Kalshi was last heard from (a frame or a ping)
    connected_since: datetime | None
    draining: bool
    trades: int
    whales: int
    posts: int
    queue_depth: int
    last_posted_ms: int | None
    dry_run: bool = False  # posts are `would_post` lines: the status line must not say "posts"


def healthy(snap: Snapshot, *, ws_idle_timeout_s: float, max_reconnect_delay_s: float) -> bool:
    """Every task alive and Kalshi heard from lately: the daemon is doing its job.

    Ordinary reconnects (backoff up to its cap) keep the watchdog fed; a long silence does not.
    """
    if not snap.tasks_alive:
        return False
    heard = snap.last_heard_s if snap.last_heard_s is not None else snap.started_at_s
    return snap.now_s - heard <= 2 * ws_idle_timeout_s + max_reconnect_delay_s


class TradeRate:
    """Trades per minute over the last minute or so, from samples taken at each status line."""

    def __init__(self, started_at_s: float) -> None:
        self._samples = deque([(started_at_s, 0)])  # (monotonic s, trades so far)

    def per_min(self, now_s: float, trades: int) -> float:
        samples = self._samples
        samples.append((now_s, trades))
        while len(samples) > 2 and now_s - samples[1][0] >= 60:
            samples.popleft()
        first_s, first_trades = samples[0]
        return (trades - first_trades) * 60 / max(now_s - first_s, 1.0)


class Today:
    """Counts since the UTC day began: the counts since start, re-based when the day changes."""

    def __init__(self) -> None:
        self._day: date | None = None
        self._base = (0, 0)  # (whales, posts) counted before today began

    def counts(self, now_ms: int, whales: int, posts: int) -> tuple[int, int]:
        today = utc_from_ms(now_ms).date()
        if today != self._day:
            self._day, self._base = today, (whales, posts)
        return whales - self._base[0], posts - self._base[1]


def status_line(snap: Snapshot, *, per_min: float, today: tuple[int, int]) -> str:
    """The one-line summary `systemctl status` shows (sd_notify STATUS=)."""
    if snap.draining:
        # The watchdog task ticks on through the drain; `systemctl status` must keep saying what is going on.
        return "draining"
    since, last_ms = snap.connected_since, snap.last_posted_ms
    post = "would-post" if snap.dry_run else "post"
    parts = [
        f"connected since {since:%H:%M:%S}Z" if since else "connecting",
        f"{per_min:.0f} trades/min",
        f"whales today {today[0]}",
        f"{post}s today {today[1]}",
        f"queue {snap.queue_depth}",
        f"last {post} {utc_from_ms(last_ms):%H:%M:%S}Z" if last_ms else f"no {post} yet",
    ]
    return ", ".join(parts)
