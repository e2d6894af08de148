"""sd_notify against a real Unix datagram socket standing in for systemd, and the health-gated watchdog."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from valshi_x.systemd import HealthWatchdog, Notifier, notify_address, watchdog_interval_s

UNIT_S = 0.01


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a bound datagram socket that we read without blocking."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket
        self.notifiers: list[Notifier] = []

    def messages(self) -> list[dict[str, str]]:
        """Every datagram received so far, each parsed into its KEY=value assignments."""
        received = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return received
            received.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def notifier(self) -> Notifier:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": self.notify_socket})
        self.notifiers.append(notifier)
        return notifier

    def close(self) -> None:
        for notifier in self.notifiers:
            notifier.close()
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes; a long test name can overflow tmp_path
        path = Path(tempfile.mkdtemp(prefix="vx")) / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    fake = FakeSystemd(sock, str(path))
    try:
        yield fake
    finally:
        fake.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("anything") is False
    assert notifier.stopping() is False


async def test_health_watchdog_returns_at_once_when_not_under_systemd() -> None:
    watchdog = HealthWatchdog(Notifier.from_env({}), healthy=lambda: True, interval_s=UNIT_S)
    await asyncio.wait_for(watchdog.run(), timeout=100 * UNIT_S)
    assert watchdog.pings == 0


def test_ready_status_stopping_arrive_as_systemd_reads_them(systemd: FakeSystemd) -> None:
    notifier = systemd.notifier()
    assert notifier.enabled
    assert notifier.ready(status="subscribed")
    assert notifier.status("connected 12:00Z | 41 trades/min\nsecond line")
    assert notifier.stopping(status="draining")
    assert notifier.extend_timeout(2.5)
    assert systemd.messages() == [
        {"READY": "1", "STATUS": "subscribed"},
        # A newline would start another assignment: the status is folded onto one line.
        {"STATUS": "connected 12:00Z | 41 trades/min second line"},
        {"STOPPING": "1", "STATUS": "draining"},
        {"EXTEND_TIMEOUT_USEC": "2500000"},
    ]
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"valshi-x-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    fake = FakeSystemd(sock, "@" + name)
    try:
        assert fake.notifier().ready()
        assert fake.messages() == [{"READY": "1"}]
    finally:
        fake.close()


def test_address_forms() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abc") == b"\0abc"
    assert notify_address("vsock:2:1234") is None
    assert notify_address("@") is None


def test_unsupported_socket_is_disabled_and_said_once() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert [e["event"] for e in logs] == ["sd_notify_unsupported_socket"]


def test_watchdog_pings_wait_for_ready_and_stop_after_stopping(systemd: FakeSystemd) -> None:
    notifier = systemd.notifier()
    # An early ping would arm systemd's watchdog during start-up (backfill), so it is held back.
    assert notifier.watchdog() is False
    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.watchdog() is False
    assert systemd.messages() == [{"READY": "1"}, {"WATCHDOG": "1"}, {"STOPPING": "1"}]


def test_interval_is_half_of_watchdog_usec_for_the_watched_pid() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4242"}, pid=4242) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    # Another process (a child that inherited the environment) must not ping.
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4242"}, pid=4243) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "x"}, pid=4242) is None
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "-5"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None


def test_health_decides_each_ping_and_the_status_line_always_goes(systemd: FakeSystemd) -> None:
    notifier = systemd.notifier()
    health = {"ok": True}
    counter = iter(range(100))
    watchdog = HealthWatchdog(
        notifier, healthy=lambda: health["ok"], status=lambda: f"tick {next(counter)}", interval_s=UNIT_S
    )

    # Before READY: the status is shown, no ping.
    assert watchdog.tick() is False
    assert systemd.messages() == [{"STATUS": "tick 0"}]

    notifier.ready()
    assert watchdog.tick() is True
    assert systemd.messages() == [{"READY": "1"}, {"WATCHDOG": "1", "STATUS": "tick 1"}]

    health["ok"] = False
    with capture_logs() as logs:
        assert watchdog.tick() is False
        assert watchdog.tick() is False
    assert systemd.messages() == [{"STATUS": "tick 2"}, {"STATUS": "tick 3"}]
    # One line when the pings stop, not one per tick.
    assert [(e["event"], e["log_level"]) for e in logs] == [("watchdog_withheld", "warning")]
    assert logs[0]["status"] == "tick 2"

    health["ok"] = True
    with capture_logs() as logs:
        assert watchdog.tick() is True
    assert systemd.messages() == [{"WATCHDOG": "1", "STATUS": "tick 4"}]
    assert [e["event"] for e in logs] == ["watchdog_resumed"]
    assert (watchdog.pings, watchdog.withheld) == (2, 2)


def test_a_failing_health_check_withholds_the_ping(systemd: FakeSystemd) -> None:
    notifier = systemd.notifier()
    notifier.ready()
    systemd.messages()

    def broken() -> bool:
        raise RuntimeError("bug in the predicate")

    watchdog = HealthWatchdog(notifier, healthy=broken, interval_s=UNIT_S)
    with capture_logs() as logs:
        assert watchdog.tick() is False
    assert systemd.messages() == []
    assert "health_check_failed" in [e["event"] for e in logs]


def test_a_failing_status_line_does_not_stop_the_pings(systemd: FakeSystemd) -> None:
    notifier = systemd.notifier()
    notifier.ready()
    systemd.messages()

    def broken() -> str:
        raise KeyError("missing counter")

    watchdog = HealthWatchdog(notifier, healthy=lambda: True, status=broken, interval_s=UNIT_S)
    with capture_logs() as logs:
        assert watchdog.tick() is True
    assert systemd.messages() == [{"WATCHDOG": "1"}]
    assert [e["event"] for e in logs] == ["status_line_failed"]


def test_without_a_systemd_watchdog_only_status_is_sent(systemd: FakeSystemd) -> None:
    notifier = systemd.notifier()
    notifier.ready()
    systemd.messages()
    watchdog = HealthWatchdog.from_env(
        notifier, {"NOTIFY_SOCKET": systemd.notify_socket}, healthy=lambda: True, status=lambda: "ok"
    )
    assert (watchdog.watchdog_enabled, watchdog.interval_s) == (False, 15.0)
    assert watchdog.tick() is False
    assert systemd.messages() == [{"STATUS": "ok"}]


def test_from_env_pings_at_half_the_watchdog_timeout() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    watchdog = HealthWatchdog.from_env(Notifier.from_env(env), env, healthy=lambda: True)
    assert (watchdog.watchdog_enabled, watchdog.interval_s) == (True, 10.0)
    slow = {**env, "WATCHDOG_USEC": "120000000"}
    # STATUS still refreshes every 15 s when the watchdog is slower than that.
    assert HealthWatchdog.from_env(Notifier.from_env(slow), slow, healthy=lambda: True).interval_s == 15.0


async def test_run_pings_while_healthy_and_stops_when_the_feed_stalls(systemd: FakeSystemd) -> None:
    notifier = systemd.notifier()
    notifier.ready()
    systemd.messages()
    health = {"ok": True}
    watchdog = HealthWatchdog(notifier, healthy=lambda: health["ok"], status=lambda: "running", interval_s=UNIT_S)
    task = asyncio.create_task(watchdog.run())
    try:
        await asyncio.sleep(10 * UNIT_S)
        healthy_msgs = systemd.messages()
        assert len(healthy_msgs) >= 3
        assert all(m == {"WATCHDOG": "1", "STATUS": "running"} for m in healthy_msgs)

        health["ok"] = False
        await asyncio.sleep(2 * UNIT_S)  # a tick already under way may still ping once
        systemd.messages()
        await asyncio.sleep(10 * UNIT_S)
        stalled_msgs = systemd.messages()
        assert len(stalled_msgs) >= 3
        assert all("WATCHDOG" not in m for m in stalled_msgs)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_full_queue_drops_instead_of_blocking(systemd: FakeSystemd) -> None:
    notifier = systemd.notifier()
    # Nobody reads: the receive queue (net.unix.max_dgram_qlen) fills and sends must fail fast, not wait.
    results = [notifier.status(f"n{i}") for i in range(5000)]
    assert results[0] is True
    assert results[-1] is False
    assert notifier.dropped == results.count(False) > 0
    received = systemd.messages()
    assert len(received) == results.count(True)
    # Room again: sending works and says so once.
    with capture_logs() as logs:
        assert notifier.status("after")
    assert [e["event"] for e in logs] == ["sd_notify_recovered"]


def test_a_vanished_socket_is_reported_once_and_never_raises(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.status("x") is False
    notifier.close()
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
    assert notifier.dropped == 2
