"""Talking to systemd: sd_notify over $NOTIFY_SOCKET (no libsystemd needed) and a health-gated watchdog.

`Notifier` sends READY=1, WATCHDOG=1, STATUS=..., STOPPING=1 as datagrams on the socket systemd names in
NOTIFY_SOCKET; without that variable (not under systemd, or a test) every call is a no-op. The socket is
non-blocking: a full receive queue drops the message instead of stalling the event loop.

`HealthWatchdog` is the task that decides whether to send WATCHDOG=1: only while the daemon says it is healthy,
so a wedged feed stops the pings and systemd restarts the service after WatchdogSec.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger(__name__)


def notify_address(raw: str) -> str | bytes | None:
    """The socket address in NOTIFY_SOCKET: a path, or an abstract name written with a leading '@'.

    Other forms (systemd's `vsock:` for virtual machines) are not supported and yield None.
    """
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        # Linux abstract namespace: a NUL byte where the '@' is.
        return b"\0" + raw[1:].encode()
    return None


def watchdog_interval_s(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """How often to send WATCHDOG=1: half of WATCHDOG_USEC, as sd_watchdog_enabled advises; None when not asked.

    WATCHDOG_PID, when set, names the process systemd watches; any other process (a child that inherited the
    environment) must not ping.
    """
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec.isdigit() or int(raw_usec) == 0:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        own_pid = os.getpid() if pid is None else pid
        if not raw_pid.isdigit() or int(raw_pid) != own_pid:
            return None
    return int(raw_usec) / 2 / 1_000_000


class Notifier:
    """sd_notify for one process: one datagram per call; never raises, never blocks."""

    def __init__(self, address: str | bytes | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._failing = False
        self.ready_sent = False
        self.stopping_sent = False
        self.dropped = 0  # messages lost to a full queue or a socket error

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Notifier:
        raw = env.get("NOTIFY_SOCKET", "")
        if not raw:
            return cls(None)
        address = notify_address(raw)
        if address is None:
            log.warning("sd_notify_unsupported_socket", notify_socket=raw)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one message; True when systemd's socket took it (always False when disabled)."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # BlockingIOError (queue full) included: a lost ping or status is better than a stalled loop.
            self.dropped += 1
            if not self._failing:
                self._failing = True
                log.warning("sd_notify_failed", error=f"{type(exc).__name__}: {exc}", message=assignments[0])
            return False
        if self._failing:
            self._failing = False
            log.info("sd_notify_recovered", dropped=self.dropped)
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete (the feed is subscribed): systemd marks the unit active and arms the watchdog."""
        self.ready_sent = True
        return self.send("READY=1", *([_status_line(status)] if status else []))

    def watchdog(self, status: str | None = None) -> bool:
        """The keep-alive ping. Ignored before `ready` and after `stopping`: an early ping would arm the
        watchdog during a long start-up, and a late one is pointless."""
        if not self.ready_sent or self.stopping_sent:
            return False
        return self.send("WATCHDOG=1", *([_status_line(status)] if status else []))

    def status(self, text: str) -> bool:
        """The one line `systemctl status` shows under the unit name."""
        return self.send(_status_line(text))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (the drain is running)."""
        self.stopping_sent = True
        return self.send("STOPPING=1", *([_status_line(status)] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before systemd gives up on a start or stop in progress (EXTEND_TIMEOUT_USEC)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_line(text: str) -> str:
    # One message, one line: a newline would start a new assignment.
    return "STATUS=" + " ".join(text.split())


class HealthWatchdog:
    """Every `interval_s`: send WATCHDOG=1 if `healthy()` says so, with `status()` as the STATUS= line.

    `healthy` is the daemon's judgement (frames or pings arrived recently, every task alive); while it is False
    the pings stop, one warning line says so, and systemd restarts the unit once WatchdogSec passes. Pings start
    only after `Notifier.ready` (see `Notifier.watchdog`); STATUS lines are sent from the start. Without a
    systemd watchdog (`watchdog=False`) only STATUS lines are sent.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        healthy: Callable[[], bool],
        status: Callable[[], str] | None = None,
        interval_s: float,
        watchdog: bool = True,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._notifier = notifier
        self._healthy = healthy
        self._status = status
        self.interval_s = interval_s
        self.watchdog_enabled = watchdog
        self._sleep = sleep
        self.pings = 0
        self.withheld = 0
        self._was_healthy = True

    @classmethod
    def from_env(
        cls,
        notifier: Notifier,
        env: Mapping[str, str],
        *,
        healthy: Callable[[], bool],
        status: Callable[[], str] | None = None,
        status_interval_s: float = 15.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> HealthWatchdog:
        """Ping at half of WatchdogSec when systemd asks for pings; refresh STATUS at least every
        `status_interval_s` either way."""
        watchdog_s = watchdog_interval_s(env)
        interval_s = status_interval_s if watchdog_s is None else min(watchdog_s, status_interval_s)
        return cls(
            notifier,
            healthy=healthy,
            status=status,
            interval_s=interval_s,
            watchdog=watchdog_s is not None,
            sleep=sleep,
        )

    def tick(self) -> bool:
        """One round: judge health, send what is due. True when a WATCHDOG=1 ping was sent."""
        status = self._status_text()
        is_healthy = self._is_healthy()
        if is_healthy != self._was_healthy:
            self._was_healthy = is_healthy
            if is_healthy:
                log.info("watchdog_resumed")
            else:
                log.warning("watchdog_withheld", status=status)
        if is_healthy and self.watchdog_enabled and self._notifier.watchdog(status):
            self.pings += 1
            return True
        if not is_healthy:
            self.withheld += 1
        if status is not None:
            self._notifier.status(status)
        return False

    async def run(self) -> None:
        """Tick forever; cancel the task to stop (before or after `Notifier.stopping`)."""
        if not self._notifier.enabled:
            return
        while True:
            self.tick()
            await self._sleep(self.interval_s)

    def _is_healthy(self) -> bool:
        try:
            return bool(self._healthy())
        except Exception:
            # A broken health check must not look healthy: withholding pings lets systemd restart us.
            log.exception("health_check_failed")
            return False

    def _status_text(self) -> str | None:
        if self._status is None:
            return None
        try:
            return self._status()
        except Exception:
            # The status line is cosmetic; the pings must go on without it.
            log.exception("status_line_failed")
            return None
