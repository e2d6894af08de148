"""A fake Kalshi WebSocket server on loopback, scriptable per connection attempt, plus key fixtures.

The server behaves like Kalshi where the daemon can tell: it checks the handshake signature with the
public key (RSA-PSS for an RSA key, Ed25519 for an Ed25519 key) and that the timestamp is fresh, and answers
401 when it is bad, or missing while auth is required; it acks `subscribe` with `subscribed` and a new `sid`
on every connection, numbers frames per sid with `seq` from 1, answers `unsubscribe` / `list_subscriptions`,
sends a `heartbeat` ping every `ping_interval_s`, and keeps a tape of every trade frame it sent.

Each handshake is one attempt (1, 2, 3...). `attempts[i]` says what attempt i+1 does: an `Attempt` (reject
the handshake, refuse the subscription, run a script) or a bare script. Attempts past the list use `default`
(subscribe and stay quiet, pinging). A script is `async def script(session: FakeSession) -> None`; when it
returns with the connection still open, the session stays open until the client leaves.

    async with FakeKalshi(public_key=keys.public_key, key_id=keys.key_id, require_auth=True,
                          attempts=[send_then_drop([trade_msg(count="2000.00")]), accept_then_drop()]) as kalshi:
        ... TradeStream(url=kalshi.url, ...) ...
        await kalshi.wait_for(lambda: len(kalshi.sessions) >= 2)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

WS_PATH = "/trade-api/ws/v2"
TICKER = "KXNFLGAME-26NOV01KCBUF-KC"

Script = Callable[["FakeSession"], Awaitable[None]]


# ---------------------------------------------------------------------------------------------- trade frames


def trade_msg(
    *,
    ticker: str = TICKER,
    side: Literal["yes", "no"] = "yes",
    count: str | Decimal = "100.00",
    yes_price: str | Decimal = "0.6200",
    ts_ms: int | None = None,
    trade_id: str | None = None,
    is_block_trade: bool = False,
) -> dict[str, Any]:
    """The `msg` of a trade frame as Kalshi sends it today: fixed-point strings, taker_outcome_side, ts_ms."""
    yes = Decimal(yes_price)
    if ts_ms is None:
        ts_ms = time.time_ns() // 1_000_000
    return {
        "trade_id": trade_id or str(uuid.uuid4()),
        "market_ticker": ticker,
        "yes_price_dollars": f"{yes:.4f}",
        "no_price_dollars": f"{Decimal(1) - yes:.4f}",
        "count_fp": f"{Decimal(count):.2f}",
        "taker_outcome_side": side,
        "taker_book_side": "bid" if side == "yes" else "ask",
        "taker_side": side,  # deprecated since 2026-05-06 but still on the wire
        "is_block_trade": is_block_trade,
        "ts": ts_ms // 1000,
        "ts_ms": ts_ms,
    }


def trade_frame(msg: dict[str, Any], *, sid: int = 1, seq: int | None = 1) -> dict[str, Any]:
    """A whole trade frame (envelope) around `msg`; `seq=None` leaves seq out like the AsyncAPI schema."""
    frame: dict[str, Any] = {"type": "trade", "sid": sid}
    if seq is not None:
        frame["seq"] = seq
    frame["msg"] = msg
    return frame


def dumps(frame: dict[str, Any]) -> str:
    return msgspec.json.encode(frame).decode()


# ---------------------------------------------------------------------------------------------- keys


PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class KeyPair:
    """A key pair written as Kalshi users have it: a PKCS#8 PEM file, plus a PKCS#1 one for RSA keys."""

    key_id: str
    private_key: PrivateKey
    public_key: PublicKey
    pkcs8_path: Path
    pkcs1_path: Path | None = None  # RSA only: Ed25519 has no PKCS#1 form

    @property
    def pkcs8_pem(self) -> str:
        return self.pkcs8_path.read_text()

    @property
    def pkcs1_pem(self) -> str:
        assert self.pkcs1_path is not None, "PKCS#1 exists for RSA keys only"
        return self.pkcs1_path.read_text()


def write_pem(path: Path, key: PrivateKey, fmt: serialization.PrivateFormat) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    path.write_bytes(pem)
    return path


@functools.cache
def test_private_key() -> rsa.RSAPrivateKey:
    """One 2048-bit RSA key per test run: generating one costs ~50 ms."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def rsa_private_key() -> rsa.RSAPrivateKey:
    return test_private_key()


@pytest.fixture
def kalshi_keys(tmp_path: Path, rsa_private_key: rsa.RSAPrivateKey) -> KeyPair:
    return KeyPair(
        key_id="a952bcbe-ec3b-4b5b-b8f9-11b4c1f1e1a1",
        private_key=rsa_private_key,
        public_key=rsa_private_key.public_key(),
        pkcs8_path=write_pem(tmp_path / "kalshi-pkcs8.pem", rsa_private_key, serialization.PrivateFormat.PKCS8),
        pkcs1_path=write_pem(
            tmp_path / "kalshi-pkcs1.pem", rsa_private_key, serialization.PrivateFormat.TraditionalOpenSSL
        ),
    )


@pytest.fixture
def ed25519_keys(tmp_path: Path) -> KeyPair:
    """An Ed25519 key pair (Kalshi accepts them since 2026-09-24), as the PKCS#8 PEM Kalshi hands out."""
    key = ed25519.Ed25519PrivateKey.generate()
    return KeyPair(
        key_id="5d0c7a9e-3f7b-4d8e-9a51-0b2e6c4f8d17",
        private_key=key,
        public_key=key.public_key(),
        pkcs8_path=write_pem(tmp_path / "kalshi-ed25519.pem", key, serialization.PrivateFormat.PKCS8),
    )


@pytest.fixture(params=["rsa", "ed25519"])
def any_keys(request: pytest.FixtureRequest, tmp_path: Path) -> KeyPair:
    """Each kind of key Kalshi accepts, in turn."""
    fixture = "kalshi_keys" if request.param == "rsa" else "ed25519_keys"
    keys: KeyPair = request.getfixturevalue(fixture)
    return keys


def other_key_like(keys: KeyPair) -> PrivateKey:
    """A fresh private key of the same kind as `keys`: Kalshi does not know it."""
    if isinstance(keys.private_key, ed25519.Ed25519PrivateKey):
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def verify_kalshi_signature(
    public_key: PublicKey, timestamp_ms: str, method: str, path: str, signature_b64: str
) -> bool:
    """True when `signature_b64` is Kalshi's signature of timestamp + method + path (no query) for this key:
    RSA-PSS (SHA-256, MGF1-SHA-256, salt = digest length) for RSA, plain Ed25519 over the text for Ed25519."""
    text = f"{timestamp_ms}{method}{path.split('?', 1)[0]}".encode()
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, text)
        else:
            public_key.verify(
                signature,
                text,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
                hashes.SHA256(),
            )
    except (InvalidSignature, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class Attempt:
    """What one connection attempt does.

    reject_status: answer the handshake with this HTTP status instead of upgrading.
    subscribe_error: answer `subscribe` with this (code, text) error frame instead of `subscribed`.
    ignore_subscribes: leave the first this many `subscribe` commands unanswered (a script may still answer
        them: `open_subscription` and `send_subscribed`).
    script: runs once the connection is open (concurrently with command handling).
    """

    script: Script | None = None
    reject_status: int | None = None
    subscribe_error: tuple[int, str] | None = None
    ignore_subscribes: int = 0


@dataclass
class Handshake:
    """One handshake as the server saw it."""

    attempt: int
    path: str
    key_id: str | None
    timestamp_ms: int | None
    signed: bool
    signature_ok: bool
    status: int  # 101 when upgraded
    received_monotonic: float
    received_ms: int


@dataclass
class FakeSession:
    """One open connection: the script's handle on it."""

    server: FakeKalshi
    ws: ServerConnection
    attempt: int
    behaviour: Attempt
    sid: int | None = None
    next_seq: int = 1
    commands: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    pinging: bool = True
    pings_sent: int = 0

    async def wait_subscribed(self, timeout_s: float = 5.0) -> int:
        async with asyncio.timeout(timeout_s):
            await self.subscribed.wait()
        assert self.sid is not None
        return self.sid

    async def send(self, frame: dict[str, Any] | str) -> None:
        """Send one raw frame (a dict is JSON-encoded as is, nothing added)."""
        await self.ws.send(frame if isinstance(frame, str) else dumps(frame))
        if isinstance(frame, dict):
            self.sent.append(frame)
        self.server.notify()

    def _take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    async def send_trade(self, msg: dict[str, Any] | None = None, *, with_seq: bool = True) -> dict[str, Any]:
        """Send one trade frame on this session's sid (next seq) and put it on the tape; returns the frame."""
        assert self.sid is not None, "send trades after wait_subscribed()"
        frame = trade_frame(msg or trade_msg(), sid=self.sid, seq=self._take_seq() if with_seq else None)
        # On the tape before sending: it happened on the exchange even if this client never receives it.
        self.server.tape.append(frame)
        await self.send(frame)
        return frame

    async def send_trades(self, msgs: Iterable[dict[str, Any]], *, pause_s: float = 0.0) -> list[dict[str, Any]]:
        frames = []
        for msg in msgs:
            frames.append(await self.send_trade(msg))
            if pause_s:
                await asyncio.sleep(pause_s)
        return frames

    def skip_seq(self, count: int = 1) -> None:
        """Lose `count` frames: the next frame's seq jumps by that much."""
        self.next_seq += count

    async def send_error(self, code: int, text: str, *, command_id: int | None = None, on_sid: bool = False) -> None:
        """An error frame; `on_sid` puts it on the subscription (it then uses up a seq, as on Kalshi)."""
        frame: dict[str, Any] = {"type": "error"}
        if command_id is not None:
            frame["id"] = command_id
        if on_sid and self.sid is not None:
            frame["sid"] = self.sid
            frame["seq"] = self._take_seq()
        frame["msg"] = {"code": code, "msg": text}
        await self.send(frame)

    def open_subscription(self) -> int:
        """Start a subscription without acknowledging it (yet): trades can be sent on its sid from now on."""
        self.sid = self.server.next_sid
        self.server.next_sid += 1
        self.next_seq = 1
        return self.sid

    async def send_subscribed(self, command_id: int) -> None:
        """Acknowledge the subscription opened (as Kalshi does: the sid inside `msg`)."""
        assert self.sid is not None, "open_subscription() first"
        await self.send({"id": command_id, "type": "subscribed", "msg": {"channel": "trade", "sid": self.sid}})
        self.subscribed.set()

    async def wait_command(self, cmd: str, count: int = 1) -> dict[str, Any]:
        """Wait until the client sent `count` commands `cmd`; returns the last of them."""
        await self.server.wait_for(lambda: len([c for c in self.commands if c.get("cmd") == cmd]) >= count)
        return [c for c in self.commands if c.get("cmd") == cmd][count - 1]

    async def send_raw_frame(self, payload: bytes, *, compressed: bool = False, length: int | None = None) -> None:
        """Write one unmasked text frame straight to the socket, past websockets' checks and its compression.

        `compressed` sets RSV1 (the payload is then permessage-deflate data, e.g. `deflate_bomb`); `length` puts
        another payload length in the header than the payload's own.
        """
        size = len(payload) if length is None else length
        first = 0xC1 if compressed else 0x81  # FIN, (RSV1,) text
        if size < 126:
            head = bytes((first, size))
        elif size < 1 << 16:
            head = bytes((first, 126)) + size.to_bytes(2, "big")
        else:
            head = bytes((first, 127)) + size.to_bytes(8, "big")
        self.ws.transport.write(head + payload)
        self.server.notify()

    async def drop(self) -> None:
        """Cut the TCP connection without a close frame: the client sees 1006."""
        self.ws.transport.abort()
        await self.ws.wait_closed()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    def stop_pings(self) -> None:
        self.pinging = False

    def go_deaf(self) -> None:
        """Stop reading the socket: client pings get no pong, commands no answer."""
        self.ws.transport.pause_reading()

    async def stall(self, *, answer_pings: bool = True, deaf_s: float = 5.0) -> None:
        """Stop sending anything (frames and heartbeats) and wait until the client leaves.

        With `answer_pings=False` the socket is not read for `deaf_s` either (a deaf socket cannot notice
        the client leaving), then reading resumes so the session can end.
        """
        self.stop_pings()
        if not answer_pings:
            self.go_deaf()
            # A deaf socket cannot see the client leave; only a local close (server shutdown) ends this early.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ws.wait_closed(), deaf_s)
            self.ws.transport.resume_reading()
        await self.ws.wait_closed()

    async def wait_closed(self) -> None:
        await self.ws.wait_closed()


class FakeKalshi:
    """The fake Kalshi WebSocket endpoint; `async with FakeKalshi(...) as kalshi:` then connect to `kalshi.url`."""

    def __init__(
        self,
        *,
        public_key: PublicKey | None = None,
        key_id: str | None = None,
        require_auth: bool = False,
        attempts: Sequence[Attempt | Script] = (),
        default: Attempt | Script | None = None,
        ping_interval_s: float | None = 10.0,
        max_skew_ms: int = 5_000,
        path: str = WS_PATH,
        close_timeout_s: float = 0.5,
        compression: str | None = "deflate",  # None: refuse permessage-deflate, as a server may
    ) -> None:
        self.public_key = public_key
        self.key_id = key_id
        self.require_auth = require_auth
        self.attempts = [a if isinstance(a, Attempt) else Attempt(script=a) for a in attempts]
        self.default = default if isinstance(default, Attempt) else Attempt(script=default)
        self.ping_interval_s = ping_interval_s
        self.max_skew_ms = max_skew_ms
        self.path = path
        self.compression = compression
        self.close_timeout_s = close_timeout_s
        self.errors: list[BaseException] = []  # exceptions raised by scripts or command handling
        self.handshakes: list[Handshake] = []
        self.sessions: list[FakeSession] = []
        self.tape: list[dict[str, Any]] = []  # every trade frame sent, in order, across sessions
        self.next_sid = 1
        self._behaviour: dict[ServerConnection, tuple[int, Attempt]] = {}
        self._server: Server | None = None
        self._changed = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.path}"

    async def __aenter__(self) -> FakeKalshi:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            ping_interval=None,  # heartbeats are sent by each session so a script can stop them
            close_timeout=self.close_timeout_s,
            compression=self.compression,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        if exc_type is None and self.errors:
            raise AssertionError(f"the fake server failed: {self.errors!r}") from self.errors[0]

    def behaviour_for(self, attempt: int) -> Attempt:
        return self.attempts[attempt - 1] if attempt <= len(self.attempts) else self.default

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until `condition` (about the server's state: handshakes, sessions, commands, tape) holds."""
        async with asyncio.timeout(timeout_s):
            while not condition():
                await self._changed.wait()

    def notify(self) -> None:
        """Wake every `wait_for`; called on each handshake, session start and end, command and frame sent."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- handshake

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        attempt = len(self.handshakes) + 1
        behaviour = self.behaviour_for(attempt)
        headers = request.headers
        key_id = headers.get("KALSHI-ACCESS-KEY")
        timestamp = headers.get("KALSHI-ACCESS-TIMESTAMP")
        signature = headers.get("KALSHI-ACCESS-SIGNATURE")
        now_ms = time.time_ns() // 1_000_000
        signed = key_id is not None or timestamp is not None or signature is not None
        signature_ok = signed and self._signature_ok(key_id, timestamp, signature, request.path, now_ms)

        status = 101
        if request.path.split("?", 1)[0] != self.path:
            status = 404
        elif (signed and not signature_ok and self.public_key is not None) or (self.require_auth and not signed):
            status = 401
        elif behaviour.reject_status is not None:
            status = behaviour.reject_status
        self.handshakes.append(
            Handshake(
                attempt=attempt,
                path=request.path,
                key_id=key_id,
                timestamp_ms=int(timestamp) if timestamp and timestamp.isdigit() else None,
                signed=signed,
                signature_ok=signature_ok,
                status=status,
                received_monotonic=time.monotonic(),
                received_ms=now_ms,
            )
        )
        self.notify()
        if status != 101:
            return connection.respond(status, "authentication failed\n" if status == 401 else "rejected\n")
        self._behaviour[connection] = (attempt, behaviour)
        return None

    def _signature_ok(
        self, key_id: str | None, timestamp: str | None, signature: str | None, path: str, now_ms: int
    ) -> bool:
        if self.public_key is None or key_id is None or timestamp is None or signature is None:
            return False
        if self.key_id is not None and key_id != self.key_id:
            return False
        if not timestamp.isdigit() or abs(now_ms - int(timestamp)) > self.max_skew_ms:
            return False
        return verify_kalshi_signature(self.public_key, timestamp, "GET", path, signature)

    # -- session

    async def _handler(self, ws: ServerConnection) -> None:
        attempt, behaviour = self._behaviour.pop(ws)
        session = FakeSession(server=self, ws=ws, attempt=attempt, behaviour=behaviour)
        self.sessions.append(session)
        self.notify()
        async with asyncio.TaskGroup() as tasks:
            commands = tasks.create_task(self._commands(session))
            heartbeat = tasks.create_task(self._heartbeat(session)) if self.ping_interval_s else None
            try:
                if behaviour.script is not None:
                    await behaviour.script(session)
                await ws.wait_closed()
            except ConnectionClosed:
                pass  # the client left mid-script
            except Exception as exc:
                self.errors.append(exc)  # reported when the server stops, so a broken script fails its test
            finally:
                commands.cancel()
                if heartbeat is not None:
                    heartbeat.cancel()
                self.notify()

    async def _heartbeat(self, session: FakeSession) -> None:
        assert self.ping_interval_s is not None
        try:
            while True:
                await asyncio.sleep(self.ping_interval_s)
                if session.pinging:
                    await session.ws.ping(b"heartbeat")  # the pong is not awaited, as on Kalshi
                    session.pings_sent += 1
                    self.notify()
        except ConnectionClosed:
            return

    async def _commands(self, session: FakeSession) -> None:
        try:
            async for raw in session.ws:
                command = msgspec.json.decode(raw)
                session.commands.append(command)
                self.notify()
                await self._answer(session, command)
        except ConnectionClosed:
            return
        except Exception as exc:
            self.errors.append(exc)

    async def _answer(self, session: FakeSession, command: dict[str, Any]) -> None:
        command_id = command.get("id")
        cmd = command.get("cmd")
        if cmd == "subscribe":
            subscribes = sum(1 for c in session.commands if c.get("cmd") == "subscribe")  # this one included
            if subscribes <= session.behaviour.ignore_subscribes:
                return  # left unanswered (the script may answer it)
            if session.behaviour.subscribe_error is not None:
                code, text = session.behaviour.subscribe_error
                await session.send_error(code, text, command_id=command_id)
            elif session.sid is not None:
                await session.send_error(6, "Already subscribed", command_id=command_id)
            else:
                session.sid = self.next_sid
                self.next_sid += 1
                session.next_seq = 1
                await session.send(
                    {"id": command_id, "type": "subscribed", "msg": {"channel": "trade", "sid": session.sid}}
                )
                session.subscribed.set()
        elif cmd == "unsubscribe":
            sid = session.sid
            session.sid = None
            session.subscribed.clear()
            await session.send({"id": command_id, "sid": sid, "seq": session._take_seq(), "type": "unsubscribed"})
        elif cmd == "list_subscriptions":
            subs = [] if session.sid is None else [{"channel": "trade", "sid": session.sid}]
            await session.send({"id": command_id, "type": "ok", "msg": subs})
        else:
            await session.send_error(5, "Unknown command", command_id=command_id)


# ---------------------------------------------------------------------------------------------- scripts


@functools.cache
def deflate_bomb(decompressed_mib: int) -> bytes:
    """A permessage-deflate message of a few dozen KB that decompresses to this many MiB of "0" characters.

    Raw deflate, sync-flushed, with the final 00 00 ff ff cut off, as RFC 7692 frames a message; it refers to
    nothing before it, so it decodes on a connection whatever was compressed on it before.
    """
    compressor = zlib.compressobj(wbits=-15)
    chunk = b"0" * (1 << 20)
    data = b"".join(
        [compressor.compress(chunk) for _ in range(decompressed_mib)] + [compressor.flush(zlib.Z_SYNC_FLUSH)]
    )
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def accept_then_drop() -> Script:
    """Complete the handshake, then cut the connection at once (before any subscription)."""

    async def script(session: FakeSession) -> None:
        await session.drop()

    return script


def send_then_drop(msgs: Sequence[dict[str, Any]], *, pause_s: float = 0.0) -> Script:
    """Wait for the subscription, send these trades, then cut the connection (1006 at the client)."""

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs, pause_s=pause_s)
        await session.drop()

    return script


def send_then_close(msgs: Sequence[dict[str, Any]], *, code: int = 1011, reason: str = "internal error") -> Script:
    """Wait for the subscription, send these trades, then close with `code`."""

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs)
        await session.close(code, reason)

    return script


def send_then_stall(msgs: Sequence[dict[str, Any]] = (), *, answer_pings: bool = True, deaf_s: float = 5.0) -> Script:
    """Wait for the subscription, send these trades, then go silent (no frames, no heartbeats)."""

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(msgs)
        await session.stall(answer_pings=answer_pings, deaf_s=deaf_s)

    return script


def send_errors(errors: Sequence[tuple[int, str]], *, on_sid: bool = False) -> Script:
    """Wait for the subscription, then send these (code, text) error frames and stay open."""

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        for code, text in errors:
            await session.send_error(code, text, on_sid=on_sid)

    return script
