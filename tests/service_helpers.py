"""What the service tests need around the daemon: systemd's end of NOTIFY_SOCKET, a fake Kalshi that can go
down, the settings that point at the fakes, and `python -m valshi_x` as a real child process.

    async with NotifySocket.bind(tmp_path) as systemd, DownableKalshi(...) as kalshi, FakeKalshiRest() as rest:
        child = await Child.start("--dry-run", env=child_env(tmp_path, service_env(kalshi, rest, keys)))
        await systemd.wait_for(lambda m: "READY" in m.fields)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from tests.fake_kalshi import Attempt, FakeKalshi, KeyPair, trade_msg
from tests.fake_kalshi_rest import FakeKalshiRest, rest_trade
from valshi_x.backoff import Backoff
from valshi_x.runmode import Tuning

UNIT_S = 0.05  # every timing in the service tests is a multiple of this
REPO = Path(__file__).resolve().parents[1]

# The daemon's stream, made quick for tests: short reconnect delays, no client pings of its own.
FAST_STREAM = Tuning(
    reconnect_backoff=Backoff(initial_s=UNIT_S, factor=2.0, cap_s=4 * UNIT_S),
    rejected_backoff=Backoff(initial_s=4 * UNIT_S, factor=2.0, cap_s=8 * UNIT_S),
    ws_ping_interval_s=None,
)


# ---------------------------------------------------------------------------------------------- systemd


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram as systemd got it: its KEY=value lines and when it arrived (time.monotonic)."""

    at_s: float
    fields: dict[str, str]

    @property
    def pings(self) -> bool:
        return self.fields.get("WATCHDOG") == "1"


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: a bound Unix datagram socket, read by a task as messages arrive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[Notification] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @classmethod
    def bind(cls, directory: Path) -> NotifySocket:
        path = directory / "notify.sock"
        if len(str(path)) > 100:  # sun_path holds 108 bytes; a long test name can overflow tmp_path
            path = Path(tempfile.mkdtemp(prefix="vx")) / "n.sock"
        return cls(path)

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    async def __aenter__(self) -> NotifySocket:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._sock.close()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._sock, 4096)
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append(Notification(time.monotonic(), fields))
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_for(self, condition: Callable[[Notification], bool], timeout_s: float = 40 * UNIT_S) -> Notification:
        """The first message received from now on that matches `condition`."""
        return await self.wait_after(len(self.messages), condition, timeout_s)

    async def wait_after(
        self, index: int, condition: Callable[[Notification], bool], timeout_s: float = 40 * UNIT_S
    ) -> Notification:
        """The first message at position `index` or later that matches `condition`."""
        async with asyncio.timeout(timeout_s):
            while True:
                for message in self.messages[index:]:
                    if condition(message):
                        return message
                index = len(self.messages)
                await self._changed.wait()


# ---------------------------------------------------------------------------------------------- Kalshi


class DownableKalshi(FakeKalshi):
    """The fake Kalshi WebSocket, whose handshakes fail with 503 while `down` is set (an exchange outage)."""

    down = False

    def behaviour_for(self, attempt: int) -> Attempt:
        if self.down:
            return Attempt(reject_status=503)
        return super().behaviour_for(attempt)


def whale_sweep(ticker: str, ts_ms: int | None = None) -> list[dict[str, Any]]:
    """Three fills of one order 20 ms apart: $40k + $41k + $42k = $123k, none a whale alone."""
    start_ms = time.time_ns() // 1_000_000 if ts_ms is None else ts_ms
    return [
        trade_msg(ticker=ticker, count="100000.00", yes_price=price, ts_ms=start_ms + i * 20)
        for i, price in enumerate(["0.4000", "0.4100", "0.4200"])
    ]


def on_rest_tape(rest: FakeKalshiRest, msgs: list[dict[str, Any]]) -> None:
    """Put trades sent on the socket on the REST tape too, as on Kalshi: a backfill finds them again."""
    rest.add_trades(
        rest_trade(
            m["trade_id"],
            m["market_ticker"],
            ts_ms=m["ts_ms"],
            yes_price=m["yes_price_dollars"],
            count=m["count_fp"],
            side=m["taker_outcome_side"],
        )
        for m in msgs
    )


def service_env(kalshi: FakeKalshi, rest: FakeKalshiRest, keys: KeyPair, **extra: str) -> dict[str, str]:
    """Settings (as environment) for a daemon talking to these fakes with this key; `extra` adds or overrides."""
    return {
        "KALSHI_WS_URL": kalshi.url,
        "KALSHI_API_URL": rest.base_url,
        "KALSHI_API_KEY_ID": keys.key_id,
        "KALSHI_PRIVATE_KEY_PATH": str(keys.pkcs8_path),
        "STATS_INTERVAL_S": "3600",
        "SWEEP_WINDOW_MS": "100",
        **extra,
    }


X_KEYS = {
    "X_API_KEY": "test-consumer-key",
    "X_API_SECRET": "test-consumer-secret",
    "X_ACCESS_TOKEN": "1234567890-test-access-token",
    "X_ACCESS_TOKEN_SECRET": "test-access-token-secret",
}


def unique_ticker(prefix: str = "KXWHALE") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6].upper()}"


# ---------------------------------------------------------------------------------------------- the child


def child_env(home: Path, settings: Mapping[str, str] = (), **extra: str) -> dict[str, str]:
    """A clean environment for `python -m valshi_x`: nothing inherited from the test run but PATH."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO),
        **dict(settings),
        **extra,
    }


class Child:
    """`python -m valshi_x ARGS` as a child process; its stdout log lines are parsed and kept as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []  # JSON log lines; other lines as {"event": None, "raw": line}
        self.stderr = ""
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: Mapping[str, str], cwd: Path, wrap: tuple[str, ...] = ()) -> Child:
        """Start it; `wrap` goes before the interpreter (a shell that sets a limit, say)."""
        proc = await asyncio.create_subprocess_exec(
            *wrap,
            sys.executable,
            "-m",
            "valshi_x",
            *args,
            env=dict(env),
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                event = msgspec.json.decode(line)
            except msgspec.DecodeError:
                event = {"event": None, "raw": line.decode(errors="replace")}
            self.events.append(event)
            self._changed.set()
            self._changed = asyncio.Event()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def wait_for_event(self, name: str, timeout_s: float = 200 * UNIT_S) -> dict[str, Any]:
        """The first log line with this event name (waiting for it if need be)."""
        async with asyncio.timeout(timeout_s):
            while not (found := self.named(name)):
                if self._reader.done():
                    raise AssertionError(f"the child ended without logging {name!r}: {self.events[-5:]}")
                await self._changed.wait()
        return found[0]

    async def wait(self, timeout_s: float = 200 * UNIT_S) -> int:
        """Wait for the exit; returns the exit status and keeps stderr."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout_s):
            stderr = await self.proc.stderr.read()
            code = await self.proc.wait()
            await self._reader
        self.stderr = stderr.decode(errors="replace")
        return code

    async def kill(self) -> None:
        """Clean-up after a failed test: never leave the child behind."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
