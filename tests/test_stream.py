"""The trade-channel consumer against the fake Kalshi on loopback: connect, subscribe, deliver, and every way a
connection can go wrong (drops, 1011, accept-then-drop, stalls, refused keys, error frames, sequence gaps)."""

from __future__ import annotations

import asyncio
import random
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

from tests.fake_kalshi import (
    Attempt,
    FakeKalshi,
    FakeSession,
    KeyPair,
    accept_then_drop,
    deflate_bomb,
    dumps,
    kalshi_keys,  # noqa: F401  # fixture
    rsa_private_key,  # noqa: F401  # fixture
    send_errors,
    send_then_close,
    send_then_drop,
    send_then_stall,
    trade_frame,
    trade_msg,
)
from valshi_x.backoff import OutageBackoff, RetryDelays
from valshi_x.kalshi.auth import KalshiSigner
from valshi_x.kalshi.stream import (
    Backoff,
    ObservedConnection,
    SeqGap,
    TradeStream,
    reconnect_backoff,
    rejected_backoff,
)
from valshi_x.trades import MalformedTrade, TradeFrame, careful_trade_frame, trade_from_fields

UNIT = 0.05  # seconds; every timing below is a small multiple of it


def always(value: float) -> Callable[[], float]:
    return lambda: value


class Client:
    """A TradeStream wired to plain recorders, plus ways to wait on what it saw."""

    def __init__(
        self,
        url: str,
        signer: KalshiSigner | None,
        *,
        real_sleep: bool = True,
        idle_timeout_s: float = 40 * UNIT,
        backoff: RetryDelays | None = None,
        slow_backoff: RetryDelays | None = None,
        subscribe_timeout_s: float = 100 * UNIT,
        ack_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.delivered: list[dict[str, Any]] = []
        self.batches: list[int] = []  # the size of each batch delivered
        self.bad: list[tuple[str | bytes, MalformedTrade]] = []
        self.recorded: list[str] = []
        self.sids: list[int] = []
        self.gaps: list[SeqGap] = []
        self.disconnects = 0
        self.delays: list[float] = []
        self._real_sleep = real_sleep
        self._changed = asyncio.Event()
        self.stream = TradeStream(
            url=url,
            signer=signer,
            deliver=self._deliver,
            on_bad_frame=self._on_bad,
            record=self.recorded.append,
            idle_timeout_s=idle_timeout_s,
            backoff=backoff or Backoff(initial_s=UNIT, factor=2.0, cap_s=8 * UNIT, rand=always(1.0)),
            slow_backoff=slow_backoff or Backoff(initial_s=40 * UNIT, factor=2.0, cap_s=160 * UNIT, rand=always(1.0)),
            on_subscribed=self._on_subscribed,
            on_disconnect=self._on_disconnect,
            on_gap=self._on_gap,
            open_timeout_s=20 * UNIT,
            close_timeout_s=4 * UNIT,
            sleep=self._sleep,
            subscribe_timeout_s=subscribe_timeout_s,
            ack_sleep=ack_sleep,
        )
        self.task: asyncio.Task[None] | None = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _deliver(self, batch: list[TradeFrame]) -> None:
        # Back in the wire's shape (prices as their strings), so a test compares them with what the server sent.
        self.delivered.extend(msgspec.to_builtins(frame) for frame in batch)
        self.batches.append(len(batch))
        self._notify()

    def _on_bad(self, raw: str | bytes, exc: MalformedTrade) -> None:
        self.bad.append((raw, exc))
        self._notify()

    def _on_subscribed(self, sid: int) -> None:
        self.sids.append(sid)
        self._notify()

    def _on_disconnect(self) -> None:
        self.disconnects += 1
        self._notify()

    def _on_gap(self, gap: SeqGap) -> None:
        self.gaps.append(gap)

    async def _sleep(self, delay_s: float) -> None:
        self.delays.append(delay_s)
        self._notify()
        # Recorded-only sleeps still yield, so the loop under test cannot starve the server.
        await asyncio.sleep(delay_s if self._real_sleep else 0)

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 100 * UNIT) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await self._changed.wait()

    def start(self) -> None:
        self.task = asyncio.create_task(self.stream.run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def typed(sent: list[dict[str, Any]]) -> list[Any]:
    """The trades the stream should deliver for these `msg`s, in the shape `Client.delivered` holds them."""
    return [msgspec.to_builtins(trade_from_fields(msg)) for msg in sent]


@contextmanager
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def events(captured: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in captured if entry["event"] == name]


def signer_for(keys: KeyPair) -> KalshiSigner:
    return KalshiSigner(keys.key_id, keys.private_key)


# Every test here runs twice: with permessage-deflate (websockets reads each frame) and without it (the stream cuts
# plain text frames out of the socket's bytes itself, `ObservedConnection.take_text_frames`).
_compression: list[str | None] = ["deflate"]


@pytest.fixture(autouse=True, params=["deflate", None], ids=["deflate", "plain"])
def _both_framings(request: pytest.FixtureRequest) -> Iterator[None]:
    _compression[0] = request.param
    yield
    _compression[0] = "deflate"


def server_for(keys: KeyPair, **kwargs: Any) -> FakeKalshi:
    kwargs.setdefault("compression", _compression[0])
    return FakeKalshi(public_key=keys.public_key, key_id=keys.key_id, require_auth=True, **kwargs)


def msgs(n: int, **fields: Any) -> list[dict[str, Any]]:
    return [trade_msg(**fields) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ backoff


def test_backoff_doubles_to_its_cap_with_a_jitter_floor_and_resets() -> None:
    rolls = iter([0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 0.0])
    backoff = Backoff(initial_s=1.0, factor=2.0, cap_s=6.0, rand=lambda: next(rolls))
    delays = [backoff.next_delay() for _ in range(5)]
    # Steps 1, 2, 4, 6, 6; each delay lies in [step/2, step].
    assert delays == [0.5, 2.0, 3.0, 3.0, 6.0]
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_delay() == 0.5


def test_backoff_defaults_never_retry_sooner_than_their_floor() -> None:
    normal, slow = reconnect_backoff(rand=always(0.0)), rejected_backoff(rand=always(0.0))  # the worst roll
    assert normal.next_delay() == 0.5
    assert slow.next_delay() == 30.0
    for _ in range(40):
        normal_delay, slow_delay = normal.next_delay(), slow.next_delay()
    assert normal_delay == 7.5  # half the 15 s cap
    assert 300.0 <= slow_delay <= 600.0


def test_reconnect_delays_follow_the_outage_length() -> None:
    rolls = iter([1.0] * 4 + [0.0] + [1.0] * 50)
    backoff = OutageBackoff(initial_s=1.0, fraction=0.25, cap_s=15.0, rand=lambda: next(rolls))
    delays = [backoff.next_delay() for _ in range(8)]
    # 1 s steps until 4 s were waited (one roll at the bottom: half a step), then a quarter of the time waited.
    assert delays == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5, 1.125, 1.40625, 1.7578125])
    assert backoff.waited_s == pytest.approx(sum(delays))
    # However the rolls fall, a try due after t seconds of outage comes at most max(1, t / 4) later.
    backoff = OutageBackoff(rand=random.Random(7).random)
    waited_s = 0.0
    for _ in range(60):
        delay_s = backoff.next_delay()
        step_s = min(15.0, max(1.0, waited_s / 4))
        assert step_s / 2 <= delay_s <= step_s
        waited_s += delay_s
    assert delay_s >= 7.5  # at the cap, and never hot: 60 tries took minutes
    assert waited_s > 300
    backoff.reset()
    assert (backoff.failures, backoff.waited_s) == (0, 0.0)
    assert backoff.next_delay() <= 1.0


@pytest.mark.parametrize(("initial_s", "factor", "cap_s"), [(0.0, 2.0, 1.0), (1.0, 0.5, 2.0), (2.0, 2.0, 1.0)])
def test_backoff_rejects_settings_that_could_hot_loop(initial_s: float, factor: float, cap_s: float) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(initial_s=initial_s, factor=factor, cap_s=cap_s)


@pytest.mark.parametrize(("initial_s", "fraction", "cap_s"), [(0.0, 0.25, 1.0), (1.0, 0.0, 2.0), (2.0, 0.25, 1.0)])
def test_outage_backoff_rejects_settings_that_could_hot_loop(initial_s: float, fraction: float, cap_s: float) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        OutageBackoff(initial_s=initial_s, fraction=fraction, cap_s=cap_s)


# ------------------------------------------------------------------------------------------------ happy path


async def test_first_connect_subscribes_signed_and_delivers_trades(kalshi_keys: KeyPair) -> None:  # noqa: F811
    sent = msgs(3, count="2500.00")

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(sent)

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url + "?ignored=1", signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 3)
            await client.stop()
            await kalshi.wait_for(lambda: kalshi.sessions[0].ws.close_code is not None)

    (handshake,) = kalshi.handshakes
    assert handshake.signature_ok  # verified with the public key, over the path without the query
    assert handshake.status == 101
    (session,) = kalshi.sessions
    assert session.commands == [{"id": 1, "cmd": "subscribe", "params": {"channels": ["trade"]}}]
    assert session.ws.close_code == 1000  # cancelled: a clean close
    assert [frame["msg"] for frame in client.delivered] == typed(sent)
    assert client.delivered == [msgspec.to_builtins(careful_trade_frame(frame)) for frame in kalshi.tape]
    assert client.sids == [1]
    assert client.recorded[0] == dumps({"id": 1, "type": "subscribed", "msg": {"channel": "trade", "sid": 1}})
    assert client.recorded[1:] == [dumps(frame) for frame in kalshi.tape]
    stream = client.stream
    assert (stream.connects, stream.reconnects, stream.frames, stream.error_frames) == (1, 0, 4, 0)
    assert stream.last_frame_monotonic is not None
    assert stream.connected_since is None  # stopped
    (connected,) = events(captured, "ws_connected")
    assert connected["url"] == kalshi.url  # no query string in logs
    assert connected["attempt"] == 1
    assert connected["signed"] is True
    assert events(captured, "ws_subscribed")[0]["sid"] == 1
    assert events(captured, "ws_stopping")
    assert not events(captured, "ws_disconnected")
    assert not events(captured, "subscribe_unacknowledged")
    assert client.delays == []


async def test_connected_since_and_seq_state_are_exposed_while_connected(kalshi_keys: KeyPair) -> None:  # noqa: F811
    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs(2))

    async with server_for(kalshi_keys, attempts=[script]) as kalshi:
        client = Client(kalshi.url, signer_for(kalshi_keys))
        client.start()
        await client.wait_for(lambda: len(client.delivered) == 2)
        stream = client.stream
        assert stream.connected_since is not None
        assert stream.connected_since.tzinfo is not None
        assert stream.sid == 1
        assert stream.last_seq == {1: 2}
        await client.stop()


# ------------------------------------------------------------------------------------------------ reconnects


async def test_abrupt_drop_and_close_1011_reconnect_and_resubscribe_with_new_sid(kalshi_keys: KeyPair) -> None:  # noqa: F811
    first, second, third = msgs(2), msgs(1), msgs(2)

    async def last(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(third)

    attempts = [send_then_drop(first), send_then_close(second, code=1011), last]
    with logs() as captured:
        async with server_for(kalshi_keys, attempts=attempts) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 5)
            await client.stop()

    assert [frame["msg"] for frame in client.delivered] == typed(first + second + third)
    assert client.sids == [1, 2, 3]
    # Command ids are per connection; every connection subscribed again.
    assert [s.commands for s in kalshi.sessions] == [
        [{"id": 1, "cmd": "subscribe", "params": {"channels": ["trade"]}}]
    ] * 3
    assert all(h.signature_ok for h in kalshi.handshakes)
    disconnected = events(captured, "ws_disconnected")
    assert [(e["cause"], e["code"]) for e in disconnected] == [("closed", 1006), ("closed", 1011)]
    assert disconnected[1]["reason"] == "internal error"
    assert all(e["uptime_s"] >= 0 for e in disconnected)
    assert [e["attempt"] for e in events(captured, "ws_connected")] == [1, 2, 3]
    stream = client.stream
    assert (stream.connects, stream.reconnects, client.disconnects) == (3, 2, 2)
    # A new sid starts again at seq 1: that is not a gap.
    assert stream.gaps == 0
    assert not events(captured, "ws_seq_gap")
    # Each connection delivered trades, so each drop starts the backoff over: the first delay every time.
    assert client.delays == [UNIT, UNIT]


async def test_accept_then_drop_server_makes_delays_grow_to_the_cap(kalshi_keys: KeyPair) -> None:  # noqa: F811
    with logs() as captured:
        async with server_for(kalshi_keys, default=accept_then_drop()) as kalshi:
            client = Client(
                kalshi.url,
                signer_for(kalshi_keys),
                real_sleep=False,
                backoff=Backoff(initial_s=UNIT, factor=2.0, cap_s=8 * UNIT, rand=always(0.5)),
            )
            client.start()
            await client.wait_for(lambda: len(client.delays) >= 7)
            await client.stop()

    # Equal jitter at 0.5: three quarters of each step; steps 1, 2, 4, 8, 8... units.
    assert client.delays[:7] == pytest.approx([f * 0.75 * UNIT for f in (1, 2, 4, 8, 8, 8, 8)])
    # Each attempt either failed the handshake or was dropped right after it: logged once each, never silently.
    failures = [e for e in captured if e["event"] in ("ws_connect_failed", "ws_disconnected")]
    assert [e["retry_in_s"] for e in failures] == [round(delay, 3) for delay in client.delays]
    assert len(kalshi.handshakes) >= 7


async def test_accept_then_drop_server_cannot_cause_a_hot_loop_in_real_time(kalshi_keys: KeyPair) -> None:  # noqa: F811
    async with server_for(kalshi_keys, default=accept_then_drop()) as kalshi:
        client = Client(
            kalshi.url,
            signer_for(kalshi_keys),
            backoff=Backoff(initial_s=2 * UNIT, factor=2.0, cap_s=8 * UNIT, rand=always(1.0)),
        )
        started = time.monotonic()
        client.start()
        await asyncio.sleep(16 * UNIT)
        await client.stop()
        elapsed_units = (time.monotonic() - started) / UNIT

    # Delays of 2, 4, 8, 8 units leave room for at most 4 attempts in 16 units (plus one in flight at the end).
    assert 3 <= len(kalshi.handshakes) <= 5, (len(kalshi.handshakes), elapsed_units)


async def test_backoff_resets_once_a_subscribed_connection_delivered_a_trade(kalshi_keys: KeyPair) -> None:  # noqa: F811
    async def quiet_then_drop(session: FakeSession) -> None:
        await session.wait_subscribed()
        await asyncio.sleep(4 * UNIT)  # up and subscribed a while, but nothing delivered
        await session.drop()

    attempts = [accept_then_drop(), accept_then_drop(), quiet_then_drop, send_then_drop(msgs(1)), accept_then_drop()]
    async with server_for(kalshi_keys, attempts=attempts) as kalshi:
        client = Client(kalshi.url, signer_for(kalshi_keys), real_sleep=False)
        client.start()
        await client.wait_for(lambda: len(client.delays) >= 5)
        await client.stop()

    # 1, 2, 4 units while no connection delivered (staying up proves nothing); the trade resets: 1, 2 again.
    assert client.delays[:5] == pytest.approx([UNIT, 2 * UNIT, 4 * UNIT, UNIT, 2 * UNIT])


async def test_after_an_outage_the_reconnect_comes_soon_after_the_server_is_back(kalshi_keys: KeyPair) -> None:  # noqa: F811
    unit = 4 * UNIT  # stands for 1 s of the production policy; the outage is "6 s"
    outage_started = asyncio.Event()

    async def deliver_until_the_outage(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs(2))
        await outage_started.wait()
        await session.drop()

    async def back(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs(1))

    # Failures before the good connection: its trades must reset the backoff they raised (to 1.25 units).
    attempts = [*(accept_then_drop() for _ in range(5)), deliver_until_the_outage]
    with logs() as captured:
        async with server_for(kalshi_keys, attempts=attempts) as kalshi:
            policy = OutageBackoff(initial_s=unit, fraction=0.25, cap_s=15 * unit, rand=always(1.0))
            client = Client(kalshi.url, signer_for(kalshi_keys), backoff=policy)
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 2)
            kalshi.default = Attempt(reject_status=503)  # the outage: handshakes refused
            outage_started.set()
            await asyncio.sleep(6 * unit)
            kalshi.default = Attempt(script=back)
            accepting_at = time.monotonic()
            await client.wait_for(lambda: len(client.delivered) == 3)
            await client.stop()

    refused = [h for h in kalshi.handshakes if h.status == 503]
    assert len(refused) >= 4  # tried about once a unit through the outage, never hot
    reconnected = kalshi.handshakes[-1]
    assert reconnected.status == 101
    # Within a quarter of the outage (1.5 units) by the policy; the bound leaves room for a busy machine.
    assert reconnected.received_monotonic - accepting_at < 4 * unit
    disconnected = events(captured, "ws_disconnected")
    assert disconnected[-1]["retry_in_s"] == pytest.approx(unit, abs=0.001)  # reset by the delivered trades


async def test_the_default_policy_keeps_backing_off_from_an_accept_then_drop_server(kalshi_keys: KeyPair) -> None:  # noqa: F811
    async with server_for(kalshi_keys, default=accept_then_drop()) as kalshi:
        policy = OutageBackoff(initial_s=UNIT, fraction=0.25, cap_s=15 * UNIT, rand=always(0.5))
        client = Client(kalshi.url, signer_for(kalshi_keys), real_sleep=False, backoff=policy)
        client.start()
        await client.wait_for(lambda: len(client.delays) >= 30)
        await client.stop()

    delays = client.delays[:30]
    assert delays == sorted(delays)  # never reset: these connections delivered nothing
    assert delays[0] == pytest.approx(0.75 * UNIT)
    assert delays[-1] == pytest.approx(0.75 * 15 * UNIT)  # the cap


async def test_connection_refused_and_5xx_use_the_normal_backoff(kalshi_keys: KeyPair) -> None:  # noqa: F811
    async with FakeKalshi(default=Attempt(reject_status=503)) as kalshi:
        port = kalshi.port
        with logs() as captured:
            client = Client(kalshi.url, signer_for(kalshi_keys), real_sleep=False)
            client.start()
            await client.wait_for(lambda: len(client.delays) >= 2)
            await client.stop()
    failed = events(captured, "ws_connect_failed")
    assert [e["status"] for e in failed[:2]] == [503, 503]
    assert client.delays[:2] == pytest.approx([UNIT, 2 * UNIT])
    assert not events(captured, "ws_handshake_rejected")

    # The server is gone now: nothing listens on that port any more.
    with logs() as captured:
        client = Client(f"ws://127.0.0.1:{port}/trade-api/ws/v2", signer_for(kalshi_keys), real_sleep=False)
        client.start()
        await client.wait_for(lambda: len(client.delays) >= 2)
        await client.stop()
    failed = events(captured, "ws_connect_failed")
    assert failed[0]["error"] == "ConnectionRefusedError"
    assert failed[0]["retry_in_s"] == pytest.approx(UNIT)


# ------------------------------------------------------------------------------------------------ stalls


async def test_stall_reconnects_within_the_idle_timeout(kalshi_keys: KeyPair) -> None:  # noqa: F811
    idle_s = 6 * UNIT
    stalled_at: list[float] = []

    async def stall(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs(1))
        stalled_at.append(time.monotonic())
        await session.stall()

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[stall], ping_interval_s=UNIT) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys), idle_timeout_s=idle_s)
            client.start()
            await kalshi.wait_for(lambda: len(kalshi.sessions) == 2)
            reconnected_at = kalshi.handshakes[1].received_monotonic
            await client.stop()

    # Silence began at the last frame or heartbeat (at most one ping interval before the stall).
    waited = reconnected_at - stalled_at[0]
    assert idle_s - UNIT <= waited <= idle_s + 6 * UNIT, waited
    (idle,) = events(captured, "ws_idle_timeout")
    assert idle["idle_timeout_s"] == idle_s
    (disconnected,) = events(captured, "ws_disconnected")
    assert disconnected["cause"] == "idle_timeout"
    assert client.stream.idle_timeouts == 1
    assert kalshi.sessions[0].ws.close_code == 1000  # we closed it, cleanly


async def test_a_deaf_stall_is_also_left_in_time(kalshi_keys: KeyPair) -> None:  # noqa: F811
    idle_s = 6 * UNIT
    attempts = [send_then_stall(msgs(1), answer_pings=False, deaf_s=14 * UNIT)]
    with logs() as captured:
        async with server_for(kalshi_keys, attempts=attempts, ping_interval_s=UNIT) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys), idle_timeout_s=idle_s)
            client.start()
            await client.wait_for(lambda: len(client.sids) == 2)
            await client.stop()
    (disconnected,) = events(captured, "ws_disconnected")
    assert disconnected["cause"] == "idle_timeout"
    # No close frame came back from the deaf server: the close timed out and the link was cut.
    assert disconnected["code"] == 1006


async def test_server_pings_alone_keep_a_quiet_connection(kalshi_keys: KeyPair) -> None:  # noqa: F811
    # No trades for three idle periods, but Kalshi-style heartbeats every unit: that is a live connection.
    with logs() as captured:
        async with server_for(kalshi_keys, ping_interval_s=UNIT) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys), idle_timeout_s=4 * UNIT)
            client.start()
            await kalshi.wait_for(lambda: bool(kalshi.sessions) and kalshi.sessions[0].pings_sent >= 12, 40 * UNIT)
            await client.stop()
    assert len(kalshi.handshakes) == 1
    assert not events(captured, "ws_idle_timeout")


# ------------------------------------------------------------------------------------------------ subscribe timeout


class AckTimer:
    """Stands in for the stream's wait for a `subscribed`: each wait is over when the test calls `fire()`."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.on_wait: Callable[[], None] = lambda: None
        self._fired = asyncio.Semaphore(0)

    async def sleep(self, delay_s: float) -> None:
        self.waits.append(delay_s)
        self.on_wait()
        await self._fired.acquire()

    def fire(self) -> None:
        self._fired.release()


SUBSCRIBE = {"cmd": "subscribe", "params": {"channels": ["trade"]}}


async def test_an_unacknowledged_subscribe_is_sent_again_then_the_connection_replaced(kalshi_keys: KeyPair) -> None:  # noqa: F811
    # Kalshi-style pings keep the connection alive all along: only the subscribe's own timeout can act.
    timer = AckTimer()
    attempts = [Attempt(ignore_subscribes=2)]
    with logs() as captured:
        async with server_for(kalshi_keys, attempts=attempts, ping_interval_s=UNIT) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys), subscribe_timeout_s=5.0, ack_sleep=timer.sleep)
            timer.on_wait = client._notify
            client.start()
            await client.wait_for(lambda: len(timer.waits) == 1)
            await kalshi.wait_for(lambda: len(kalshi.sessions) == 1)
            session = kalshi.sessions[0]
            await session.wait_command("subscribe")
            await kalshi.wait_for(lambda: session.pings_sent >= 3)
            assert len(session.commands) == 1  # pings and time alone change nothing

            timer.fire()  # no ack within the timeout: subscribe again
            await session.wait_command("subscribe", 2)
            await client.wait_for(lambda: len(timer.waits) == 2)
            assert len(kalshi.handshakes) == 1

            timer.fire()  # still none: a new connection
            await client.wait_for(lambda: len(client.sids) == 1)
            await client.stop()

    assert session.commands == [{"id": 1, **SUBSCRIBE}, {"id": 2, **SUBSCRIBE}]
    unacknowledged = events(captured, "subscribe_unacknowledged")
    assert [(e["action"], e["timeout_s"], e["log_level"]) for e in unacknowledged] == [
        ("resubscribe", 5.0, "warning"),
        ("reconnect", 5.0, "warning"),
    ]
    assert timer.waits[:2] == [5.0, 5.0]
    (disconnected,) = events(captured, "ws_disconnected")
    assert (disconnected["cause"], disconnected["code"]) == ("subscribe_timeout", 1000)
    assert not events(captured, "ws_idle_timeout")
    assert client.stream.subscribes_unacknowledged == 2
    assert client.delays == [UNIT]  # the normal backoff
    assert len(kalshi.sessions) == 2 and kalshi.sessions[1].sid == 1  # the second connection subscribed


async def test_a_resubscribe_that_is_acknowledged_keeps_the_connection(kalshi_keys: KeyPair) -> None:  # noqa: F811
    timer = AckTimer()
    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[Attempt(ignore_subscribes=1)]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys), ack_sleep=timer.sleep)
            timer.on_wait = client._notify
            client.start()
            await client.wait_for(lambda: len(timer.waits) == 1)
            timer.fire()
            await client.wait_for(lambda: client.sids == [1])
            watch = client.stream._ack_watch
            assert watch is not None
            timer.fire()  # the second wait: over, and the ack is in
            await asyncio.wait_for(watch, 100 * UNIT)
            assert len(kalshi.handshakes) == 1
            await client.stop()

    assert kalshi.sessions[0].commands == [{"id": 1, **SUBSCRIBE}, {"id": 2, **SUBSCRIBE}]
    assert [e["action"] for e in events(captured, "subscribe_unacknowledged")] == ["resubscribe"]
    assert not events(captured, "ws_disconnected")
    assert client.stream.subscribes_unacknowledged == 1


async def test_a_subscribe_never_acknowledged_is_left_within_twice_its_timeout(kalshi_keys: KeyPair) -> None:  # noqa: F811
    # The same in real time, with pings every unit: the connection is replaced after two timeouts, not after the
    # minutes the stall watch would take.
    timeout_s = 4 * UNIT
    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[Attempt(ignore_subscribes=2)], ping_interval_s=UNIT) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys), subscribe_timeout_s=timeout_s)
            client.start()
            await client.wait_for(lambda: len(client.sids) == 1)
            await client.stop()

    first, second = kalshi.handshakes[:2]
    waited_s = second.received_monotonic - first.received_monotonic
    assert 2 * timeout_s <= waited_s <= 2 * timeout_s + 30 * UNIT, waited_s
    assert [e["action"] for e in events(captured, "subscribe_unacknowledged")] == ["resubscribe", "reconnect"]
    (disconnected,) = events(captured, "ws_disconnected")
    assert disconnected["cause"] == "subscribe_timeout"


# ------------------------------------------------------------------------------------------------ auth


async def test_wrong_key_is_rejected_once_with_one_line_and_the_slow_backoff(kalshi_keys: KeyPair) -> None:  # noqa: F811
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with logs() as captured:
        async with server_for(kalshi_keys) as kalshi:
            client = Client(kalshi.url, KalshiSigner(kalshi_keys.key_id, other_key), real_sleep=False)
            client.start()
            await client.wait_for(lambda: len(client.delays) >= 1)
            await client.stop()

    (handshake,) = kalshi.handshakes
    assert handshake.signed and not handshake.signature_ok and handshake.status == 401
    (rejected,) = events(captured, "ws_handshake_rejected")
    assert rejected["status"] == 401
    assert rejected["log_level"] == "error"
    assert "KALSHI_API_KEY_ID" in rejected["hint"]
    assert [e["event"] for e in captured if e["log_level"] in ("warning", "error")] == ["ws_handshake_rejected"]
    assert client.delays == [40 * UNIT]  # the slow backoff, not the normal one
    assert rejected["retry_in_s"] == pytest.approx(40 * UNIT)
    assert client.stream.handshake_rejections == 1
    assert client.stream.connects == 0


async def test_rejected_handshakes_keep_backing_off_slowly(kalshi_keys: KeyPair) -> None:  # noqa: F811
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with server_for(kalshi_keys) as kalshi:
        client = Client(kalshi.url, KalshiSigner(kalshi_keys.key_id, other_key), real_sleep=False)
        client.start()
        await client.wait_for(lambda: len(client.delays) >= 4)
        await client.stop()
    assert client.delays[:4] == pytest.approx([40 * UNIT, 80 * UNIT, 160 * UNIT, 160 * UNIT])


async def test_unsigned_client_is_warned_once_and_told_what_to_configure(kalshi_keys: KeyPair) -> None:  # noqa: F811
    with logs() as captured:
        async with server_for(kalshi_keys) as kalshi:
            client = Client(kalshi.url, None, real_sleep=False)
            client.start()
            await client.wait_for(lambda: len(client.delays) >= 2)
            await client.stop()
    assert [h.signed for h in kalshi.handshakes[:2]] == [False, False]
    assert len(events(captured, "ws_unsigned")) == 1
    rejected = events(captured, "ws_handshake_rejected")
    assert rejected[0]["signed"] is False
    assert "KALSHI_PRIVATE_KEY_PATH" in rejected[0]["hint"]


async def test_unsigned_client_works_where_auth_is_optional() -> None:
    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs(1))

    async with FakeKalshi(attempts=[script]) as kalshi:
        client = Client(kalshi.url, None)
        client.start()
        await client.wait_for(lambda: len(client.delivered) == 1)
        await client.stop()
    assert kalshi.handshakes[0].signed is False


async def test_every_attempt_is_signed_with_a_fresh_timestamp(kalshi_keys: KeyPair) -> None:  # noqa: F811
    attempts = [accept_then_drop(), accept_then_drop(), accept_then_drop()]
    async with server_for(kalshi_keys, attempts=attempts, max_skew_ms=1000) as kalshi:
        client = Client(kalshi.url, signer_for(kalshi_keys))
        client.start()
        await client.wait_for(lambda: len(client.sids) == 1)
        await client.stop()

    assert [h.status for h in kalshi.handshakes] == [101, 101, 101, 101]
    assert all(h.signature_ok for h in kalshi.handshakes)
    stamps = [h.timestamp_ms or 0 for h in kalshi.handshakes]
    assert all(stamps)
    assert stamps == sorted(set(stamps))  # strictly increasing: signed again for each attempt
    for handshake in kalshi.handshakes:
        assert handshake.timestamp_ms is not None
        assert abs(handshake.received_ms - handshake.timestamp_ms) < 1000


# ------------------------------------------------------------------------------------------------ error frames


async def refused_subscription(
    keys: KeyPair, attempts: list[Attempt]
) -> tuple[Client, list[dict[str, Any]], FakeKalshi]:
    """Run a client until its second subscription is acked (the first is refused); its logs and server too."""
    with logs() as captured:
        async with server_for(keys, attempts=attempts) as kalshi:
            client = Client(kalshi.url, signer_for(keys), real_sleep=False)
            client.start()
            await client.wait_for(lambda: len(client.sids) == 1)
            await client.stop()
    return client, captured, kalshi


async def test_error_9_on_an_unsigned_connection_asks_for_a_key_and_backs_off_slowly() -> None:
    attempts = [Attempt(subscribe_error=(9, "Authentication required"))]
    with logs() as captured:
        async with FakeKalshi(attempts=attempts, compression=_compression[0]) as kalshi:  # unsigned accepted
            client = Client(kalshi.url, None, real_sleep=False)
            client.start()
            await client.wait_for(lambda: len(client.sids) == 1)
            await client.stop()

    (error,) = events(captured, "ws_error_frame")
    assert (error["code"], error["msg"], error["log_level"], error["signed"]) == (
        9,
        "Authentication required",
        "error",
        False,
    )
    assert "set KALSHI_API_KEY_ID" in error["hint"]
    (disconnected,) = events(captured, "ws_disconnected")
    assert disconnected["cause"] == "auth_required"
    assert client.delays == [40 * UNIT]  # the slow backoff: retrying sooner cannot help
    assert client.stream.error_frames == 1
    assert len(kalshi.sessions) == 2


@pytest.mark.parametrize("code_json", ["9", "9.0"])
async def test_error_9_on_a_signed_connection_points_at_the_key_and_clock(
    kalshi_keys: KeyPair,  # noqa: F811
    code_json: str,
) -> None:
    # Issue 17: `code: 9.0` after a signed, accepted handshake got the unsigned hint and a minute's pause.
    async def script(session: FakeSession) -> None:
        command = await session.wait_command("subscribe")
        await session.send(
            f'{{"id":{command["id"]},"type":"error","msg":{{"code":{code_json},"msg":"Authentication required"}}}}'
        )

    attempts = [Attempt(script=script, ignore_subscribes=1)]
    client, captured, kalshi = await refused_subscription(kalshi_keys, attempts)

    (error,) = events(captured, "ws_error_frame")
    assert (error["code"], error["log_level"], error["signed"]) == (9, "error", True)
    assert "set KALSHI_API_KEY_ID" not in error["hint"]
    assert "clock" in error["hint"] and "belongs to this private key" in error["hint"]
    (disconnected,) = events(captured, "ws_disconnected")
    assert disconnected["cause"] == "auth_required"
    assert client.delays == [UNIT]  # the normal backoff: a fresh signature may well be taken
    assert kalshi.handshakes[0].signature_ok and len(kalshi.sessions) == 2


def offline_stream(signer: KalshiSigner | None = None) -> TradeStream:
    """A stream that is never connected: frames are fed to `_handle` as if read from a socket."""
    return TradeStream(
        url="ws://127.0.0.1/trade-api/ws/v2", signer=signer, deliver=lambda batch: None, on_bad_frame=lambda r, e: None
    )


# The code of an error frame in each JSON form: the code it is read as (None: none), and how it is logged then.
ERROR_CODE_FORMS: list[tuple[str, int | None, str | None]] = [
    ("9", 9, None),
    ("9.0", 9, None),
    ("9e0", 9, None),
    ("9E+0", 9, None),
    ("0.9e1", 9, None),
    ("900e-2", 9, None),
    ("9.000", 9, None),
    ("25.0", 25, None),
    ("6e0", 6, None),
    ("17", 17, None),
    ("9.5", None, "9.5"),
    ("9.000000000000001", None, "9.000000000000001"),
    ("8.99999999999999999999", None, "8.99999999999999999999"),  # 9.0 as a float: exactness decides
    ("1e-999999", None, "1E-999999"),  # 0.0 as a float
    ("true", None, "true"),
    ("false", None, "false"),
    ('"9"', None, '"9"'),
    ("-9", None, "-9"),
    ("2147483648", None, "2147483648"),
    ("9" * 400, None, "9" * 40 + "…[+360 chars]"),
    ("null", None, "null"),
    ("[9]", None, "[9]"),
    ('{"code":9}', None, '{"code":9}'),
    ('"\\u202e9\\n"', None, '"\\u202e9\\n"'),  # a bidi control and a newline: shown as escapes
]


@pytest.mark.parametrize(("code_json", "code", "code_raw"), ERROR_CODE_FORMS)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_error_codes_are_read_by_their_exact_value(
    kalshi_keys: KeyPair,  # noqa: F811
    code_json: str,
    code: int | None,
    code_raw: str | None,
    signed: bool,
) -> None:
    stream = offline_stream(signer_for(kalshi_keys) if signed else None)
    with logs() as captured:
        stream._handle(f'{{"type":"error","id":7,"msg":{{"code":{code_json},"msg":"odd\u2028text"}}}}')
    (error,) = events(captured, "ws_error_frame")
    assert error["code"] == code
    assert error.get("code_raw") == code_raw
    assert error["msg"] == "odd\\u2028text"  # the line separator shown as an escape
    assert error["id"] == 7
    expected_end = {9: "auth_required", 25: "buffer_overflow"}.get(code) if code is not None else None
    assert stream._end == expected_end
    if code == 9:
        assert error["log_level"] == "error"
        assert ("set KALSHI_API_KEY_ID" in error["hint"]) is not signed
    elif code is None:
        assert (error["log_level"], error["hint"]) == ("warning", "unknown error code: not taken for any known error")
    assert stream.error_frames == 1


def test_an_error_code_too_large_for_a_float_refuses_the_frame() -> None:
    refused: list[str] = []
    stream = TradeStream(
        url="ws://127.0.0.1/trade-api/ws/v2",
        signer=None,
        deliver=lambda batch: None,
        on_bad_frame=lambda raw, exc: refused.append(exc.reason),
    )
    with logs() as captured:
        stream._handle('{"type":"error","msg":{"code":9e999,"msg":"x"}}')
    assert refused == ["not_json"]  # the frame decoder's own rule
    assert not events(captured, "ws_error_frame") and stream._end is None


async def test_error_frames_with_odd_codes_are_logged_and_the_connection_kept(kalshi_keys: KeyPair) -> None:  # noqa: F811
    good = msgs(1)
    odd = ["9.5", "true", '"9"', "9.000000000000001", "-9", "1" * 30]

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        for code_json in odd:
            await session.send(f'{{"type":"error","msg":{{"code":{code_json},"msg":"Authentication required"}}}}')
        await session.send_trades(good)

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 1)
            await client.stop()

    errors = events(captured, "ws_error_frame")
    assert [(e["code"], e["code_raw"], e["log_level"]) for e in errors] == [(None, c, "warning") for c in odd]
    assert not events(captured, "ws_disconnected") and len(kalshi.handshakes) == 1
    assert [frame["msg"] for frame in client.delivered] == typed(good)


async def test_error_25_buffer_overflow_warns_and_reconnects(kalshi_keys: KeyPair) -> None:  # noqa: F811
    attempts = [send_errors([(25, "Subscription buffer overflow")], on_sid=True)]
    with logs() as captured:
        async with server_for(kalshi_keys, attempts=attempts) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys), real_sleep=False)
            client.start()
            await client.wait_for(lambda: len(client.sids) == 2)
            await client.stop()

    (error,) = events(captured, "ws_error_frame")
    assert (error["code"], error["log_level"]) == (25, "warning")
    assert "too slowly" in error["hint"]
    (disconnected,) = events(captured, "ws_disconnected")
    assert disconnected["cause"] == "buffer_overflow"
    assert client.delays == [UNIT]  # the normal backoff


async def test_error_6_already_subscribed_is_ignored(kalshi_keys: KeyPair) -> None:  # noqa: F811
    after = msgs(1)

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_error(6, "Already subscribed", command_id=1)
        await session.send_trades(after)

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 1)
            await client.stop()

    assert [frame["msg"] for frame in client.delivered] == typed(after)
    assert client.stream.error_frames == 1
    assert len(kalshi.handshakes) == 1
    assert not [e for e in captured if e["log_level"] in ("warning", "error")]


async def test_other_error_frames_are_logged_and_a_refused_subscribe_reconnects(kalshi_keys: KeyPair) -> None:  # noqa: F811
    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_error(17, "Internal error")  # unrelated to our command: logged, connection kept
        await session.send_trades(msgs(1))  # delivered after it: the error frame was handled by then

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys), real_sleep=False)
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 1)
            assert len(kalshi.handshakes) == 1 and client.disconnects == 0
            await client.stop()
    (error,) = events(captured, "ws_error_frame")
    assert (error["code"], error["msg"], error["log_level"]) == (17, "Internal error", "warning")

    attempts2 = [Attempt(subscribe_error=(17, "Internal error"))]
    client, captured, kalshi = await refused_subscription(kalshi_keys, attempts2)
    (disconnected,) = events(captured, "ws_disconnected")
    assert disconnected["cause"] == "subscribe_failed"
    assert client.delays == [UNIT]


async def test_an_error_frame_whose_id_is_no_number_is_logged_not_fatal(kalshi_keys: KeyPair) -> None:  # noqa: F811
    # An unhashable id once ended the reader with TypeError, and with it the daemon (a peer could loop it).
    good = msgs(1)

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        for odd_id in ([1], {"a": 1}, "1", None):
            await session.send({"id": odd_id, "type": "error", "msg": {"code": 17, "msg": "odd"}})
        await session.send_trades(good)

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 1)
            await client.stop()

    assert [frame["msg"] for frame in client.delivered] == typed(good)
    assert len(kalshi.handshakes) == 1  # the connection was kept
    assert len(events(captured, "ws_error_frame")) == 4


async def test_malformed_and_unknown_frames_are_reported_not_fatal(kalshi_keys: KeyPair) -> None:  # noqa: F811
    good = msgs(1)

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send("{not json")
        await session.send("[1, 2]")
        await session.send({"type": "ticker_v3", "msg": {}})
        await session.send({"type": "ticker_v3", "msg": {}})
        await session.send({"id": 9, "type": "ok", "msg": []})
        await session.send_trades(good)

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 1)
            await client.stop()

    assert [(raw, exc.reason) for raw, exc in client.bad] == [("{not json", "not_json"), ("[1, 2]", "not_an_object")]
    assert [frame["msg"] for frame in client.delivered] == typed(good)
    (unknown,) = events(captured, "ws_unknown_frame_type")
    assert unknown["type"] == "ticker_v3"
    assert len(client.recorded) == 7  # every frame is recorded as received, even the bad ones
    assert client.stream.frames == 7
    assert len(kalshi.handshakes) == 1


# ------------------------------------------------------------------------------------------------ sequence


async def test_seq_gaps_are_logged_counted_and_reported(kalshi_keys: KeyPair) -> None:  # noqa: F811
    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs(2))  # seq 1, 2
        await session.send_error(17, "Internal error", on_sid=True)  # seq 3: error frames count too
        session.skip_seq(3)  # 4, 5, 6 lost
        await session.send_trades(msgs(2))  # seq 7, 8

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 4)
            await client.stop()

    assert client.gaps == [SeqGap(sid=1, expected=4, got=7)]
    assert client.gaps[0].missing == 3
    (gap,) = events(captured, "ws_seq_gap")
    assert (gap["sid"], gap["expected"], gap["got"], gap["missing"]) == (1, 4, 7, 3)
    assert (client.stream.gaps, client.stream.frames_missing) == (1, 3)
    assert len(client.delivered) == 4  # the frame after the gap is still delivered


async def test_frames_without_a_readable_seq_are_skipped_and_gaps_after_them_still_found(
    kalshi_keys: KeyPair,  # noqa: F811
) -> None:
    # The attack of issue 9 item 7: one frame with "seq": "2" used to turn gap detection off for the connection,
    # and the whale in the following gap was never fetched back.
    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trade()  # seq 1
        await session.send_trade(with_seq=False)
        await session.send({"type": "trade", "sid": session.sid, "seq": "2", "msg": trade_msg()})
        await session.send({"type": "trade", "sid": session.sid, "seq": True, "msg": trade_msg()})
        session.skip_seq(5)  # 2..6 lost
        await session.send_trade()  # seq 7

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 5)
            await client.stop()

    (missing,) = events(captured, "ws_seq_missing")  # once per sid, not once per frame
    assert missing["sid"] == 1
    assert client.stream.seq_unreadable == 3
    assert client.gaps == [SeqGap(sid=1, expected=2, got=7)]
    assert client.stream.gaps == 1


async def test_trades_before_the_subscribed_ack_are_taken_and_are_no_gap(kalshi_keys: KeyPair) -> None:  # noqa: F811
    # Kalshi's race: the first trades of a new subscription can arrive before its `subscribed`.
    before, after = msgs(2), msgs(2)

    async def script(session: FakeSession) -> None:
        command = await session.wait_command("subscribe")
        session.open_subscription()
        await session.send_trades(before)  # seq 1, 2
        await session.send_subscribed(command["id"])
        await session.send_trades(after)  # seq 3, 4

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[Attempt(script=script, ignore_subscribes=1)]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 4)
            assert client.stream.last_seq == {1: 4}
            await client.stop()

    assert [frame["msg"] for frame in client.delivered] == typed(before + after)
    assert (client.gaps, client.stream.gaps, client.stream.seq_repeated) == ([], 0, 0)
    assert not events(captured, "ws_seq_gap")
    assert client.sids == [1]


async def test_a_second_ack_for_the_same_sid_starts_nothing_over(kalshi_keys: KeyPair) -> None:  # noqa: F811
    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs(2))  # seq 1, 2
        await session.send_subscribed(1)  # the same ack once more
        await session.send_trades(msgs(2))  # seq 3, 4

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 4)
            assert client.stream.last_seq == {1: 4}
            await client.stop()

    assert (client.gaps, client.stream.gaps) == ([], 0)
    assert client.sids == [1]  # `on_subscribed` once: nothing new began
    assert len(events(captured, "ws_subscribed")) == 1
    assert len(kalshi.handshakes) == 1


async def test_a_repeated_or_late_seq_is_no_gap_and_is_counted(kalshi_keys: KeyPair) -> None:  # noqa: F811
    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        frames = await session.send_trades(msgs(3))  # seq 1, 2, 3
        await session.send(frames[1])  # seq 2 delivered twice
        session.skip_seq(1)  # seq 4 is late...
        await session.send_trade()  # ... so 5 shows a gap
        await session.send(trade_frame(trade_msg(), sid=session.sid, seq=4))  # and here it comes
        await session.send_trade()  # seq 6

    with logs() as captured:
        async with server_for(kalshi_keys, attempts=[script]) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            client.start()
            await client.wait_for(lambda: len(client.delivered) == 7)
            assert client.stream.last_seq == {1: 6}
            await client.stop()

    assert [frame["seq"] for frame in client.delivered] == [1, 2, 3, 2, 5, 4, 6]  # all delivered: dedup is downstream
    assert client.gaps == [SeqGap(sid=1, expected=4, got=5)]  # the one real gap, once
    assert (client.stream.gaps, client.stream.frames_missing, client.stream.seq_repeated) == (1, 1, 2)
    assert client.stream.stats_fields() == {"seq_repeated": 2, "subscribes_unacknowledged": 0}
    repeated = events(captured, "ws_seq_repeated")
    assert [(e["seq"], e["last_seq"]) for e in repeated] == [(2, 3), (4, 5)]


# ------------------------------------------------------------------------------------------------ control


async def test_resubscribe_and_requested_reconnect(kalshi_keys: KeyPair) -> None:  # noqa: F811
    with logs() as captured:
        async with server_for(kalshi_keys) as kalshi:
            client = Client(kalshi.url, signer_for(kalshi_keys))
            assert await client.stream.resubscribe() is False  # not connected yet
            client.start()
            await client.wait_for(lambda: len(client.sids) == 1)

            assert await client.stream.resubscribe() is True
            await client.wait_for(lambda: len(client.sids) == 2)
            assert kalshi.sessions[0].commands[1:] == [
                {"id": 2, "cmd": "unsubscribe", "params": {"sids": [1]}},
                {"id": 3, "cmd": "subscribe", "params": {"channels": ["trade"]}},
            ]
            assert client.stream.sid == 2

            await client.stream.reconnect("watchdog: no trades")
            await client.wait_for(lambda: len(client.sids) == 3)
            await client.stop()

    (disconnected,) = events(captured, "ws_disconnected")
    assert (disconnected["cause"], disconnected["code"], disconnected["log_level"]) == ("requested", 1000, "info")
    assert kalshi.sessions[0].ws.close_code == 1000
    assert len(kalshi.sessions) == 2


# ------------------------------------------------------------------------------------------------ framing


async def test_frames_keep_their_order_whatever_their_framing(kalshi_keys: KeyPair) -> None:  # noqa: F811
    """Text, binary and fragmented trade frames and pings, mixed: delivered in the order sent, no gap seen.

    Without deflate the stream cuts plain text frames out of the socket's bytes itself and leaves the rest to
    websockets; a frame websockets still holds must not be overtaken by the text frames after it."""
    sent: list[dict[str, Any]] = []

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        for round_ in range(20):
            frames = [trade_frame(trade_msg(), sid=session.sid, seq=session._take_seq()) for _ in range(4)]
            sent.extend(frame["msg"] for frame in frames)
            await session.ws.send(dumps(frames[0]))
            await session.ws.send(dumps(frames[1]).encode())  # binary
            text = dumps(frames[2])
            await session.ws.send([text[:50], text[50:120], text[120:]])  # fragmented
            await session.ws.ping()
            await session.ws.send(dumps(frames[3]))
            if round_ % 5 == 0:
                await asyncio.sleep(0)

    async with server_for(kalshi_keys, attempts=[script]) as kalshi:
        client = Client(kalshi.url, signer_for(kalshi_keys))
        client.start()
        await client.wait_for(lambda: len(client.delivered) == 80)
        ws = client.stream._ws
        assert ws is not None
        cut_here = ws._text_sink is not None
        await client.stop()
    assert [frame["msg"] for frame in client.delivered] == typed(sent)
    assert (client.stream.gaps, client.stream.seq_unreadable, client.bad) == (0, 0, [])
    # Without deflate the plain text frames were cut out here, with it websockets read them all.
    assert cut_here == (_compression[0] is None)


async def test_a_frame_over_the_size_limit_ends_the_connection_and_nothing_of_it_is_delivered(
    kalshi_keys: KeyPair,  # noqa: F811
) -> None:
    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trade()
        await session.ws.send('{"type":"trade","msg":"' + "x" * 2**20 + '"}')  # over websockets' 1 MiB
        await session.send_trade()

    async with server_for(kalshi_keys, attempts=[script]) as kalshi:
        client = Client(kalshi.url, signer_for(kalshi_keys), real_sleep=False)
        client.start()
        await client.wait_for(lambda: client.disconnects >= 1)
        await client.stop()
    assert len(client.delivered) == 1
    assert client.bad == []
    assert kalshi.sessions[0].ws.close_code == 1009  # message too big, as websockets always answered


@pytest.mark.parametrize("oversize", ["deflate_bomb", "announced_length"])
async def test_an_oversized_message_is_refused_and_its_close_names_the_cause(
    kalshi_keys: KeyPair,  # noqa: F811
    oversize: str,
) -> None:
    # Issue 17: a decompression bomb's close was logged as a bare `code=1006 reason=null`.
    bomb = deflate_bomb(64)  # 64 MiB once decompressed, about 64 KB on the wire
    first = msgs(1)

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(first)
        if oversize == "deflate_bomb":
            await session.send_raw_frame(bomb, compressed=True)
        else:
            await session.send_raw_frame(b'{"type":"trade"', length=2**40)  # a header announcing a terabyte
        await session.send_trade()  # never delivered: the connection ends at the frame before

    tracemalloc.start()
    try:
        with logs() as captured:
            async with server_for(kalshi_keys, attempts=[script]) as kalshi:
                client = Client(kalshi.url, signer_for(kalshi_keys), real_sleep=False)
                client.start()
                await client.wait_for(lambda: client.disconnects == 1)
                await kalshi.wait_for(lambda: len(kalshi.handshakes) == 2)  # and the stream connects again
                await client.stop()
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert [frame["msg"] for frame in client.delivered] == typed(first)
    assert client.bad == []
    (disconnected,) = events(captured, "ws_disconnected")
    assert disconnected["code"] == 1006  # what the socket says: the server's close frame is no longer read
    if oversize == "deflate_bomb" and _compression[0] is None:
        # Without permessage-deflate a compressed frame is a protocol error (RSV1 set), named as one.
        assert (disconnected["cause"], disconnected["reason"], disconnected["sent_code"]) == (
            "protocol_error",
            "ProtocolError",
            1002,
        )
    else:
        assert disconnected["cause"] == "message_too_large"
        assert (disconnected["reason"], disconnected["sent_code"], disconnected["limit_bytes"]) == (
            "message_too_large",
            1009,
            2**20,
        )
        # A bomb's size is never known: decompression stops at the limit, which is what bounds the memory.
        assert disconnected["size_bytes"] == (None if oversize == "deflate_bomb" else 2**40)
        assert disconnected["compressed"] is (_compression[0] is not None)
    assert kalshi.sessions[0].ws.close_code == disconnected["sent_code"]
    assert peak_bytes < 16 * 2**20, peak_bytes  # a quarter of the bomb: it was never decompressed whole


async def test_text_frames_split_anywhere_across_reads_are_cut_whole() -> None:
    """The frame cutter keeps a frame's start until its end arrives, whatever the length form (7, 16, 64 bits)."""
    protocol = ClientProtocol(parse_uri("ws://127.0.0.1/trade-api/ws/v2"))
    protocol.state = State.OPEN
    connection = ObservedConnection(protocol)
    connection.connection_made(NullTransport())
    texts: list[str] = []
    reads: list[int] = []

    def sink(payloads: list[bytes | str]) -> None:  # once per read that completed a frame
        assert all(isinstance(p, str) or p.isascii() for p in payloads)  # bytes only where they are ASCII
        texts.extend(p if isinstance(p, str) else p.decode() for p in payloads)
        reads.append(len(texts))

    assert connection.take_text_frames(sink)
    sent = ["{}", "é" * 200, "x" * 70_000, '{"type":"trade"}']
    wire = b"".join(frame_bytes(text) for text in sent)
    for at in range(0, len(wire), 7):  # seven bytes a read
        connection.data_received(wire[at : at + 7])
    assert texts == sent
    assert reads[-1] == len(sent) and len(reads) == len(sent)  # the sink after each read that completed a frame
    connection.data_received(wire)  # all in one read: one call of the sink
    assert texts == sent * 2 and reads[-1] == 2 * len(sent) and len(reads) == len(sent) + 1


class NullTransport(asyncio.Transport):
    """A socket that is never written to here (the test only feeds what was read)."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def frame_bytes(text: str) -> bytes:
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 1 << 16:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload
