"""Retry delays shared by every I/O boundary: a geometric step with a cap, and the jitter on top of it.

Each boundary (the Kalshi socket, Kalshi REST, the X poster) owns its own retry policy and numbers; this
module is only the arithmetic they have in common.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def capped_step_s(n: int, *, initial_s: float, cap_s: float, factor: float = 2.0) -> float:
    """The n-th delay in a row (n = 1, 2, ...) before jitter: `initial_s * factor**(n-1)`, at most `cap_s`."""
    return float(min(cap_s, initial_s * factor ** max(n - 1, 0)))


def equal_jitter(step_s: float, rand: float) -> float:
    """Half the step fixed, half random (`rand` in [0, 1)): spreads clients apart yet keeps a floor."""
    return step_s / 2 + rand * step_s / 2


class Backoff:
    """Delays between connection attempts: geometric, capped, equal jitter; `reset` after a stable connection."""

    def __init__(
        self,
        initial_s: float = 1.0,
        factor: float = 2.0,
        cap_s: float = 60.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial_s <= 0 or factor < 1 or cap_s < initial_s:
            raise ValueError("backoff needs initial_s > 0, factor >= 1 and cap_s >= initial_s")
        self.initial_s = initial_s
        self.factor = factor
        self.cap_s = cap_s
        self._rand = rand
        self.failures = 0  # delays handed out since the last reset

    def next_delay(self) -> float:
        """The delay before the next attempt; each call raises the step until the cap."""
        self.failures += 1
        step_s = capped_step_s(self.failures, initial_s=self.initial_s, cap_s=self.cap_s, factor=self.factor)
        return equal_jitter(step_s, self._rand())

    def reset(self) -> None:
        self.failures = 0
