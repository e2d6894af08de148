"""Retry delays shared by every I/O boundary: a geometric step with a cap, and the jitter on top of it.

Each boundary (the Kalshi socket, Kalshi REST, the X poster) owns its own retry policy and numbers; this
module is only the arithmetic they have in common.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol


def capped_step_s(n: int, *, initial_s: float, cap_s: float, factor: float = 2.0) -> float:
    """The n-th delay in a row (n = 1, 2, ...) before jitter: `initial_s * factor**(n-1)`, at most `cap_s`."""
    return float(min(cap_s, initial_s * factor ** max(n - 1, 0)))


def equal_jitter(step_s: float, rand: float) -> float:
    """Half the step fixed, half random (`rand` in [0, 1)): spreads clients apart yet keeps a floor."""
    return step_s / 2 + rand * step_s / 2


class RetryDelays(Protocol):
    """What a retry loop needs of its delays: the next one, a reset after success, and the longest one."""

    cap_s: float

    def next_delay(self) -> float: ...

    def reset(self) -> None: ...


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


class OutageBackoff:
    """Delays that follow the length of an outage: each step is `fraction` of the time already waited, at least
    `initial_s` and at most `cap_s`, with equal jitter.

    So the first tries come about a second apart, and once the server is back the next try comes within
    `fraction` of the outage's length (never more than `cap_s`): a 6 s outage costs at most 1.5 s more, a
    minute-long one at most 15 s. The waits still rise geometrically (by 12-25 % a try with fraction 0.25),
    so a server that keeps failing, or accepts and drops at once, is tried less and less often.
    """

    def __init__(
        self,
        initial_s: float = 1.0,
        fraction: float = 0.25,
        cap_s: float = 15.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial_s <= 0 or not 0 < fraction <= 1 or cap_s < initial_s:
            raise ValueError("backoff needs initial_s > 0, 0 < fraction <= 1 and cap_s >= initial_s")
        self.initial_s = initial_s
        self.fraction = fraction
        self.cap_s = cap_s
        self._rand = rand
        self.failures = 0  # delays handed out since the last reset
        self.waited_s = 0.0  # their sum

    def next_delay(self) -> float:
        """The delay before the next attempt, from the time waited so far."""
        self.failures += 1
        step_s = min(self.cap_s, max(self.initial_s, self.fraction * self.waited_s))
        delay_s = equal_jitter(step_s, self._rand())
        self.waited_s += delay_s
        return delay_s

    def reset(self) -> None:
        self.failures = 0
        self.waited_s = 0.0
