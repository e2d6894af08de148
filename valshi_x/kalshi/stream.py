"""The Kalshi `trade` channel consumer: one WebSocket session after another, for as long as the daemon runs.

Each session: sign the handshake afresh, connect, subscribe to `trade`, then read frames. Each frame is decoded
once, straight into a typed `TradeFrame` (`valshi_x.trades.fast_trade_frame`; the careful dict decode for any other
shape, which also names what is wrong with a malformed frame), and the trade frames the socket has ready are handed
to `deliver` as one batch (synchronous, never blocking: the daemon puts it on a bounded queue). The loop owns its
retries: every way a session ends is classified in `_end_of_session` / `_connect_failure_delay`, and the next delay
comes from a jittered, capped backoff that is reset only once a connection has subscribed and delivered a trade, so
a server that accepts and drops at once cannot cause a hot reconnect loop, while after an outage the next try comes
soon (`reconnect_backoff`).

Liveness: Kalshi pings every 10 s. A connection that delivers neither a frame nor a server ping for
`idle_timeout_s` is treated as stalled and replaced. Our own keepalive pings (`ping_interval_s`) notice a dead
TCP link from our side.

Subscribing: a `subscribe` that no `subscribed` answers within `subscribe_timeout_s` is sent once more, and if
that is not answered either the connection is replaced (`subscribe_unacknowledged`). Server pings keep a
connection alive whether or not it is subscribed, so nothing else would notice.

Sequence numbers: Kalshi numbers the frames of each subscription (`sid`) 1, 2, 3... The stream tracks the last
`seq` per `sid` for the current connection, logs and counts jumps, and calls `on_gap` so a backfill can fill
them. Only a plain positive integer is a `seq`: a frame without one (or with `"seq": "2"`, `2.0`, `true`) is
not checked and not counted as a step, and the frames around it still are, so one odd frame can never turn
gap detection off. What is not a gap: a trade on a sid before its `subscribed` (it is taken and starts that
sid's tracking), a second `subscribed` for a sid already tracked (tracking goes on), and a seq at or below the
last one seen on its sid (a repeat: counted as `seq_repeated`, delivered, left to the trade-id dedup).
Warnings about single frames go through a `WarningBudget` (a few per minute per kind).

Error frames are classified by the exact value of their `code` (9, 9.0 and 9e0 alike; 9.5, true, "9" or a
number out of range are no code at all), and only an unsigned client is told to configure a key.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, PayloadTooBig, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

from valshi_x.backoff import Backoff, OutageBackoff, RetryDelays
from valshi_x.kalshi.auth import KalshiSigner
from valshi_x.logs import WarningBudget
from valshi_x.sanitize import clean_log_text
from valshi_x.trades import MalformedTrade, TradeFrame, careful_trade_frame, fast_trade_frame, parse_frame

log = structlog.get_logger(__name__)

# Error codes Kalshi sends in `error` frames (kalshi-api.md section 3).
ERR_ALREADY_SUBSCRIBED: Final = 6
ERR_AUTH_REQUIRED: Final = 9
ERR_BUFFER_OVERFLOW: Final = 25
# An error code is a whole number in this range; anything else in `code` is unreadable, never a known error.
_MAX_ERROR_CODE: Final = 2**31 - 1
# For an error frame whose `code` decoded as a float: decoded again with numbers exact (9.000000000000001 is no 9).
_EXACT_JSON: Final = msgspec.json.Decoder(float_hook=Decimal)

# How long a `subscribe` may go unanswered before it is sent again (once), then the connection replaced.
SUBSCRIBE_TIMEOUT_S: Final = 5.0

# Frames that prove the server is alive: data, and the server's own pings. Pongs only answer our pings.
_ALIVE_OPCODES: Final = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING})
_MAX_LOGGED_TYPES: Final = 64
# Frames handed over in one batch at most, even if the socket keeps having more ready.
MAX_BATCH_FRAMES: Final = 1024
# Complete frames the connection may buffer before it stops reading the socket (websockets' default is 16): a
# busy moment then arrives as one batch rather than as many small ones.
_RECV_QUEUE_FRAMES: Final = 1024

_UNSIGNED_HINT = "set KALSHI_API_KEY_ID and KALSHI_PRIVATE_KEY_PATH: Kalshi may require a signed handshake"
_REJECTED_HINT = (
    "check that KALSHI_API_KEY_ID belongs to this private key and to this environment (demo or production), "
    "and that the system clock is right"
)
_SIGNED_AUTH_HINT = (
    "the handshake was signed and accepted, yet Kalshi asked for authentication; reconnecting with a fresh "
    "signature. If this repeats, " + _REJECTED_HINT
)

# Why a session ended; decides the log level, the backoff used and the fields logged.
Cause = Literal[
    "closed",  # the server or the network closed the connection
    "idle_timeout",  # nothing arrived for idle_timeout_s
    "auth_required",  # error frame 9
    "buffer_overflow",  # error frame 25
    "subscribe_failed",  # our subscribe command was refused
    "subscribe_timeout",  # our subscribe, sent twice, was never acknowledged
    "message_too_large",  # a frame (or what it decompresses to) over websockets' max_size: we closed with 1009
    "protocol_error",  # a frame websockets could not parse (bad framing, bad deflate data, invalid UTF-8)
    "requested",  # reconnect() was called
]


def reconnect_backoff(rand: Callable[[], float] = random.random) -> OutageBackoff:
    """For transient failures: 0.5-1 s at first, then a quarter of the time already waited, at most 15 s.

    A late reconnect is missed whales (their backfill holds alerts back), so after a 6 s outage the next
    try comes within 1.5 s of Kalshi accepting again; a long outage is still tried only every 7.5-15 s.
    """
    return OutageBackoff(initial_s=1.0, fraction=0.25, cap_s=15.0, rand=rand)


def rejected_backoff(rand: Callable[[], float] = random.random) -> Backoff:
    """For refused credentials: at least 30 s, doubling, at most 10 min (retrying sooner cannot help)."""
    return Backoff(initial_s=60.0, factor=2.0, cap_s=600.0, rand=rand)


def error_code(value: object) -> int | None:
    """The whole-number value of an error frame's `code`, whatever its JSON number form; None when it has none.

    `value` comes from a decode that keeps numbers exact (an int, or a Decimal for a number with a fraction or
    exponent part): 9, 9.0 and 9e0 are code 9; 9.5, 9.000000000000001, true, "9", a negative or a huge number
    are not codes at all, so they can never take the path of a known error.
    """
    if type(value) is int:
        return value if 0 <= value <= _MAX_ERROR_CODE else None
    # The range first: it bounds the work of the rest (Decimal("9e999999999") is cheap to compare, not to int).
    if isinstance(value, Decimal) and value.is_finite() and 0 <= value <= _MAX_ERROR_CODE:
        return int(value) if value == value.to_integral_value() else None
    return None


def _json_excerpt(value: object, max_len: int = 40) -> str:
    """A short, log-safe text of a JSON value as it came (a Decimal as its digits)."""
    text = str(value) if isinstance(value, Decimal) else msgspec.json.encode(value).decode()
    return clean_log_text(text, max_len=max_len)


def _error_text(value: object) -> str | None:
    """An error frame's text for a log line: cleaned and cut short (any other JSON value as an excerpt)."""
    if value is None:
        return None
    if isinstance(value, str):
        return clean_log_text(value, max_len=200)
    return _json_excerpt(value, 200)


@dataclass(frozen=True, slots=True)
class SeqGap:
    """Frames of one subscription that never arrived: seq `expected` up to `got - 1`."""

    sid: int
    expected: int
    got: int

    @property
    def missing(self) -> int:
        return self.got - self.expected


class ObservedConnection(ClientConnection):
    """A client connection that notes (loop time) when the server last sent a data frame or a ping, and that can
    hand the complete text frames of each read from the socket straight to a callback (`take_text_frames`).

    Why the second part: websockets parses each frame with a generator and queues it for `recv()`, a few µs per
    frame, as much as everything else the daemon does with a trade. A Kalshi trade frame is always one unmasked,
    unfragmented, uncompressed text frame, and those are cheap to cut out of the byte stream. Every other frame
    (pings, pongs, close, binary, fragments, compressed or masked frames, one too big, invalid UTF-8) is handed to
    websockets whole and in order, which answers, queues or fails it exactly as before; while websockets still
    holds a data frame for `recv()`, text frames queue behind it, so frames are never reordered.
    """

    last_heard: float = 0.0
    pings_received: int = 0
    _text_sink: Callable[[list[bytes | str]], None] | None = None
    _partial: bytes = b""  # the start of a frame whose end has not arrived yet

    def process_event(self, event: Event) -> None:
        super().process_event(event)
        # The handshake response comes through here too; only frames count as life.
        if isinstance(event, Frame) and event.opcode in _ALIVE_OPCODES:
            self.last_heard = self.loop.time()
            if event.opcode is Opcode.PING:
                self.pings_received += 1

    def frames_ready(self) -> int:
        """Frames received and not yet read by `recv()`: zero means the next `recv()` would wait."""
        return len(self.recv_messages.frames)

    def take_text_frames(self, sink: Callable[[list[bytes | str]], None]) -> bool:
        """From now on, hand the complete plain text frames of each read from the socket to `sink`, in one list
        per read (a payload in ASCII stays bytes, which is valid UTF-8 as it is; any other is decoded to str);
        False (and nothing changes) unless the connection is open and websockets holds no unparsed bytes, so the
        byte stream is cut at a frame boundary."""
        if self.protocol.state is not State.OPEN or self.protocol.reader.buffer or self.protocol.extensions:
            return False
        self._text_sink = sink
        return True

    def data_received(self, data: bytes) -> None:
        sink = self._text_sink
        if sink is None:
            super().data_received(data)
            return
        buffer = self._partial + data if self._partial else data
        size = len(buffer)
        max_size = self.protocol.max_message_size
        held = self.recv_messages.frames  # data frames websockets keeps for `recv()`: text frames queue behind
        # A trade frame's form, checked first with the fewest steps: text, final, unmasked, a 16-bit length
        # (126 to 65,535 bytes), no larger than max_size. Whatever else arrives takes the general path below.
        short_ok = max_size is None or max_size >= 0xFFFF
        plain = short_ok and not held
        payloads: list[bytes | str] = []
        take = payloads.append
        at = 0
        while True:
            if plain and size - at >= 4 and buffer[at] == 0x81 and buffer[at + 1] == 126:
                start = at + 4
                end = start + ((buffer[at + 2] << 8) | buffer[at + 3])
                if end > size:
                    break
                payload = buffer[start:end]  # a slice: cheaper than a memoryview for a few hundred bytes
                if payload.isascii():
                    take(payload)
                    at = end
                    continue
                # Else decoded (below), and invalid UTF-8 goes to websockets, which fails the connection.
            if size - at < 2:
                break
            first, second = buffer[at], buffer[at + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if size - at < 4:
                    break
                length = (buffer[at + 2] << 8) | buffer[at + 3]
                head = 4
            elif length == 127:
                if size - at < 10:
                    break
                length = int.from_bytes(buffer[at + 2 : at + 10])
                head = 10
            if second >= 0x80:
                head += 4  # masked: a protocol error from a server, websockets fails it
            end = at + head + length
            if max_size is not None and length > max_size:
                end = size  # websockets fails the connection at this header; nothing after it matters
            elif end > size:
                break
            elif first == 0x81 and second < 0x80 and not held:
                payload = buffer[at + head : end]
                try:
                    take(payload if payload.isascii() else payload.decode())
                except UnicodeDecodeError:
                    pass  # websockets fails the connection, as it always did
                else:
                    at = end
                    continue
            super().data_received(buffer[at:end])  # whole frames only: websockets stays at a boundary
            at = end
            plain = short_ok and not held  # websockets may hold a data frame now
            if self.protocol.state is not State.OPEN:  # closing: websockets takes everything from here on
                self._text_sink = None
                if at < size:
                    super().data_received(buffer[at:])
                at = size
                break
        self._partial = buffer[at:] if at < size else b""
        if payloads:
            self.last_heard = self.loop.time()
            sink(payloads)


def _closed_cause(ws: ObservedConnection) -> Cause:
    """Why a connection closed that nobody here asked to close: a frame websockets refused, or just closed."""
    failure = ws.protocol.parser_exc
    if isinstance(failure, PayloadTooBig):
        return "message_too_large"
    if isinstance(failure, ProtocolError | UnicodeDecodeError):
        return "protocol_error"
    return "closed"


def _parser_failure(ws: ObservedConnection) -> dict[str, Any]:
    """Log fields naming the frame websockets refused (the close it sent for it, the limit it hit), if any.

    Our close frame is all the trace such a close leaves: the peer's answer is not read any more, so `code` shows
    1006 (no close frame received). With permessage-deflate the size cannot be known: websockets stops
    decompressing at the limit, which is what keeps a decompression bomb from taking the memory.
    """
    failure = ws.protocol.parser_exc
    if failure is None or isinstance(failure, EOFError):  # EOF: the TCP connection ended, nothing was refused
        return {}
    sent = ws.protocol.close_sent
    fields: dict[str, Any] = {"sent_code": sent.code if sent is not None else None}
    if isinstance(failure, PayloadTooBig):
        fields.update(
            reason="message_too_large",
            limit_bytes=failure.max_size,
            size_bytes=failure.size,  # None when compressed: the size is unknown
            compressed=bool(ws.protocol.extensions),
        )
    else:
        fields.update(reason=type(failure).__name__, error=clean_log_text(str(failure), max_len=200))
    return fields


def public_url(url: str) -> str:
    """The URL without query or fragment, safe to log."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class TradeStream:
    """Reconnecting consumer of Kalshi's `trade` channel; `run()` until cancelled."""

    def __init__(
        self,
        *,
        url: str,
        signer: KalshiSigner | None,
        deliver: Callable[[list[TradeFrame]], None],
        on_bad_frame: Callable[[str | bytes, MalformedTrade], None],
        record: Callable[[str], None] | None = None,
        idle_timeout_s: float = 30.0,
        backoff: RetryDelays | None = None,
        on_subscribed: Callable[[int], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_gap: Callable[[SeqGap], None] | None = None,
        slow_backoff: RetryDelays | None = None,
        open_timeout_s: float = 10.0,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        close_timeout_s: float = 3.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        subscribe_timeout_s: float = SUBSCRIBE_TIMEOUT_S,
        ack_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = url
        self._path = urlsplit(url).path or "/"
        self._public_url = public_url(url)
        self._signer = signer
        self._deliver_trade = deliver
        self._deliver = deliver  # `_first_trade` in its place until a connection proves itself
        self._on_bad_frame = on_bad_frame
        self._record = record
        self.idle_timeout_s = idle_timeout_s
        self._backoff = backoff or reconnect_backoff()
        self._slow_backoff = slow_backoff or rejected_backoff()
        self._on_subscribed = on_subscribed
        self._on_disconnect = on_disconnect
        self._on_gap = on_gap
        self._open_timeout_s = open_timeout_s
        self._ping_interval_s = ping_interval_s
        self._ping_timeout_s = ping_timeout_s
        self._close_timeout_s = close_timeout_s
        self._sleep = sleep
        self._clock = clock
        self.subscribe_timeout_s = subscribe_timeout_s
        self._ack_sleep = ack_sleep  # the wait for a `subscribed` (tests decide when it is over)

        # Counters for the stats line (never reset).
        self.attempts = 0
        self.connects = 0
        self.reconnects = 0
        self.frames = 0
        self.last_frame_monotonic: float | None = None
        self.connected_since: datetime | None = None
        self.connected_at_monotonic: float | None = None
        self.handshake_rejections = 0
        self.error_frames = 0
        self.idle_timeouts = 0
        self.gaps = 0
        self.frames_missing = 0
        self.seq_unreadable = 0  # frames on a sid whose seq was absent or not a plain positive integer
        self.seq_repeated = 0  # frames whose seq was at or below the last one seen on their sid: not gaps
        self.subscribes_unacknowledged = 0  # subscribe timeouts (each resubscribe and each reconnect they caused)
        self._warnings = WarningBudget(monotonic=clock)

        # State of the current connection (reset on each connect).
        self.sid: int | None = None
        self.last_seq: dict[int, int] = {}
        self._seq_missing_noted: set[int] = set()
        self._next_id = 1
        self._pending_subscribes: set[int] = set()
        self._acks = 0  # `subscribed` frames with a sid on this connection
        self._ack_watch: asyncio.Task[None] | None = None
        self._ws: ObservedConnection | None = None
        self._end: Cause | None = None

        self._unknown_types: set[str] = set()
        self._warned_unsigned = False
        self._batch: list[TradeFrame] = []  # trade frames read and not yet delivered
        self._closing: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Connect, read, reconnect, forever. Cancel to stop: the socket is closed with code 1000."""
        while True:
            self.attempts += 1
            try:
                ws = await self._connect()
            except InvalidStatus as exc:
                await self._sleep(self._connect_failure_delay(exc, exc.response.status_code))
                continue
            # InvalidURI and ValueError are left to propagate: a settings problem that retrying cannot fix.
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                await self._sleep(self._connect_failure_delay(exc, None))
                continue

            started = self._clock()
            try:
                self._begin_session(ws)
                cause = await self._read(ws)
            except ConnectionClosed:
                cause = self._end or _closed_cause(ws)
            except asyncio.CancelledError:
                log.info("ws_stopping", uptime_s=round(self._clock() - started, 3))
                raise
            finally:
                # Idempotent; on cancellation this is the clean 1000 close, then CancelledError propagates.
                await ws.close()
                self._ws = None
                self.connected_since = None
                self.sid = None

            uptime_s = self._clock() - started
            delay_s = self._end_of_session(ws, cause, uptime_s)
            if self._on_disconnect is not None:
                self._on_disconnect()
            await self._sleep(delay_s)

    async def _connect(self) -> ObservedConnection:
        if self._signer is not None:
            headers = self._signer.headers("GET", self._path)  # fresh timestamp on every attempt
        else:
            headers = {}
            if not self._warned_unsigned:
                self._warned_unsigned = True
                log.warning("ws_unsigned", url=self._public_url, hint=_UNSIGNED_HINT)
        ws = await connect(
            self.url,
            additional_headers=headers,
            create_connection=ObservedConnection,
            open_timeout=self._open_timeout_s,
            ping_interval=self._ping_interval_s,
            ping_timeout=self._ping_timeout_s,
            close_timeout=self._close_timeout_s,
            max_queue=_RECV_QUEUE_FRAMES,
        )
        assert isinstance(ws, ObservedConnection)  # create_connection above
        return ws

    def _begin_session(self, ws: ObservedConnection) -> None:
        self._ws = ws
        self._end = None
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self.connected_since = datetime.now(UTC)
        self.connected_at_monotonic = self._clock()
        self.sid = None
        self.last_seq = {}
        self._seq_missing_noted = set()
        self._next_id = 1
        self._pending_subscribes = set()
        self._acks = 0
        self._ack_watch = None
        self._closing = None
        self._deliver = self._first_trade
        log.info("ws_connected", url=self._public_url, attempt=self.attempts, signed=self._signer is not None)

    async def _read(self, ws: ObservedConnection) -> Cause:
        """Subscribe, then read until the connection ends or asks to be replaced; returns why it ended."""
        loop = asyncio.get_running_loop()
        opened = loop.time()
        # Text frames are handled as they arrive, a read's worth at a time (the recv loop below then sees only
        # what websockets keeps: binary or fragmented frames). Before subscribing, so no trade comes in between.
        ws.take_text_frames(self._take_read)
        try:
            await self._subscribe(ws)
            return await self._read_frames(ws, loop, opened)
        finally:
            self._flush()  # what was read before the end is delivered before `on_disconnect`
            watch = self._ack_watch
            if watch is not None and not watch.done():
                watch.cancel()

    async def _read_frames(self, ws: ObservedConnection, loop: asyncio.AbstractEventLoop, opened: float) -> Cause:
        handle, flush, recv, ready = self._handle, self._flush, ws.recv, ws.frames_ready
        while True:
            deadline = max(ws.last_heard, opened) + self.idle_timeout_s
            if loop.time() >= deadline:
                self.idle_timeouts += 1
                log.warning(
                    "ws_idle_timeout",
                    idle_timeout_s=self.idle_timeout_s,
                    silent_s=round(loop.time() - max(ws.last_heard, opened), 3),
                    pings_received=ws.pings_received,
                )
                return "idle_timeout"
            # One timer per quiet spell rather than per frame: when it fires, the loop re-checks last_heard.
            try:
                async with asyncio.timeout_at(deadline):
                    while True:
                        handle(await recv())
                        if not ready() or len(self._batch) >= MAX_BATCH_FRAMES:
                            flush()  # all the socket had ready: one batch
                        end = self._end
                        if end is not None:
                            return end
            except TimeoutError:
                continue

    async def _subscribe(self, ws: ObservedConnection) -> None:
        """Send `subscribe`, and watch that it is acknowledged (unless a watch of this connection still runs)."""
        watch = self._ack_watch
        if watch is None or watch.done():
            self._ack_watch = asyncio.get_running_loop().create_task(self._watch_subscribe(ws, self._acks))
        await self._send_subscribe(ws)

    async def _send_subscribe(self, ws: ObservedConnection) -> None:
        command_id = self._command_id()
        self._pending_subscribes.add(command_id)
        command = {"id": command_id, "cmd": "subscribe", "params": {"channels": ["trade"]}}
        await ws.send(msgspec.json.encode(command).decode())

    async def _watch_subscribe(self, ws: ObservedConnection, acks_before: int) -> None:
        """No `subscribed` within `subscribe_timeout_s`: subscribe once more; still none after as long: reconnect.

        Server pings keep the connection alive, so without this an unanswered subscribe would sit quiet until the
        daemon's stall watch (minutes). A trade before the ack does not count as one: only `subscribed` tells
        which sid is ours.
        """
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        for action in ("resubscribe", "reconnect"):
            await self._ack_sleep(self.subscribe_timeout_s)
            if self._acks != acks_before or self._ws is not ws or self._end is not None:
                return
            self.subscribes_unacknowledged += 1
            log.warning(
                "subscribe_unacknowledged",
                action=action,
                timeout_s=self.subscribe_timeout_s,
                waited_s=round(loop.time() - sent_at, 3),
                pings_received=ws.pings_received,
            )
            if action == "resubscribe":
                try:
                    await self._send_subscribe(ws)
                except ConnectionClosed:
                    return  # the connection is going anyway
            else:
                # The read loop waits in `recv()`: closing ends it (ConnectionClosed; `run` reads `_end`).
                self._end = "subscribe_timeout"
                self._closing = loop.create_task(ws.close(1000, "subscribe unacknowledged"))

    def _command_id(self) -> int:
        command_id = self._next_id
        self._next_id += 1
        return command_id

    # ------------------------------------------------------------------ frames

    def _handle(self, raw: str | bytes) -> None:
        """One received frame: record it, decode it once, batch a trade, act on the rest. Never blocks or awaits."""
        self.frames += 1
        if isinstance(raw, bytes):
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                self._on_bad_frame(raw, MalformedTrade("not_utf8"))
                return
        else:
            text = raw
        if self._record is not None:
            self._record(text)
        typed = fast_trade_frame(text)
        if typed is None:
            self._handle_careful(raw, text)
            return
        sid, seq = typed.sid, typed.seq
        if sid is not None:
            last_seq = self.last_seq
            if seq is not None and last_seq.get(sid) == seq - 1:
                last_seq[sid] = seq  # the common case, inline
            else:
                self._track_seq(sid, seq)
        self._batch.append(typed)

    def _handle_careful(self, raw: str | bytes, text: str) -> None:
        """Any frame the typed decode refused: decoded as a dict, dispatched on its type, malformed ones named."""
        self.last_frame_monotonic = self._clock()
        try:
            frame = parse_frame(text)
        except MalformedTrade as exc:
            self._on_bad_frame(raw, exc)
            return
        kind = frame.get("type")
        if kind == "trade":
            self._track_frame_seq(frame)  # a malformed trade still uses up its seq
            try:
                typed = careful_trade_frame(frame)
            except MalformedTrade as exc:
                self._on_bad_frame(raw, exc)
                return
            self._batch.append(typed)
            return
        self._flush()  # what came before a control frame is delivered before its callbacks run
        if kind == "subscribed":
            self._handle_subscribed(frame)
        elif kind == "error":
            self._handle_error(frame, text)
        elif kind in ("ok", "unsubscribed"):
            if "seq" in frame:
                self._track_frame_seq(frame)
            sid = frame.get("sid")
            if kind == "unsubscribed" and type(sid) is int:
                self.last_seq.pop(sid, None)  # that subscription is over: a sid used again starts afresh
            log.debug("ws_control_frame", type=kind, id=frame.get("id"), sid=sid)
        else:
            name = kind if isinstance(kind, str) else repr(kind)[:40]
            if name not in self._unknown_types and len(self._unknown_types) < _MAX_LOGGED_TYPES:
                self._unknown_types.add(name)
                log.warning("ws_unknown_frame_type", type=name)

    def _take_read(self, payloads: list[bytes | str]) -> None:
        """The text frames of one read from the socket, in order: decoded, seq-checked and delivered in batches of
        at most MAX_BATCH_FRAMES; then the session ends if one of them asked it to.

        `_handle` does the same for one frame; this is its loop for the frames a busy socket has ready, with the
        common case inline: today's trade frame, next in its subscription's seq. That seq is kept in a local
        (`want`) and written back to `last_seq` before anything else can read it (the careful path, `_track_seq`).
        """
        self.frames += len(payloads)
        if self._batch:
            self._flush()
        record, fast, last_seq = self._record, fast_trade_frame, self.last_seq
        chunks = [payloads]
        if len(payloads) > MAX_BATCH_FRAMES:
            chunks = [payloads[i : i + MAX_BATCH_FRAMES] for i in range(0, len(payloads), MAX_BATCH_FRAMES)]
        for chunk in chunks:
            take = self._batch.append
            sid_now: int | None = None  # the sid whose next seq is `want` (None: none tracked here)
            want = 0
            for raw in chunk:
                if record is not None:
                    record(raw if isinstance(raw, str) else raw.decode())  # ASCII: cannot fail
                typed = fast(raw)
                if typed is not None:
                    sid = typed.sid
                    if sid is not None and sid == sid_now and typed.seq == want:
                        want += 1  # the common case
                        take(typed)
                        continue
                if sid_now is not None:
                    last_seq[sid_now] = want - 1
                    sid_now = None
                if typed is None:
                    text = raw if isinstance(raw, str) else raw.decode()
                    self._handle_careful(text, text)  # may deliver the batch so far, and move any seq
                    take = self._batch.append
                    continue
                seq = typed.seq
                if sid is not None:
                    self._track_seq(sid, seq)  # a gap delivers the batch before this frame
                    take = self._batch.append
                    last = last_seq.get(sid)
                    if last is not None:
                        sid_now, want = sid, last + 1
                take(typed)
            if sid_now is not None:
                last_seq[sid_now] = want - 1
            self._flush()
        ws = self._ws
        if self._end is not None and ws is not None and self._closing is None:
            # The read loop waits in `recv()`: closing ends it (ConnectionClosed; `run` reads `_end`).
            self._closing = asyncio.get_running_loop().create_task(ws.close())

    def _flush(self) -> None:
        """Hand the batch read so far to `deliver` (the clock is read once per batch)."""
        batch = self._batch
        if batch:
            self._batch = []
            self.last_frame_monotonic = self._clock()
            self._deliver(batch)

    def _handle_subscribed(self, frame: dict[str, Any]) -> None:
        msg = frame.get("msg")
        sid = msg.get("sid") if isinstance(msg, dict) else None
        if sid is None:
            sid = frame.get("sid")
        channel = msg.get("channel") if isinstance(msg, dict) else None
        command_id = frame.get("id")
        if isinstance(command_id, int):
            self._pending_subscribes.discard(command_id)
        if not isinstance(sid, int) or isinstance(sid, bool):
            if self._warnings.allow("ws_subscribed_without_sid"):
                log.warning("ws_subscribed_without_sid", id=frame.get("id"), channel=channel)
            return
        self._acks += 1
        if sid == self.sid:
            log.debug("ws_subscribed_again", sid=sid, channel=channel)  # already ours: nothing starts over
            return
        self.sid = sid
        # Kalshi numbers a new subscription's frames from 1; trades that came before the ack were tracked already.
        self.last_seq.setdefault(sid, 0)
        log.info("ws_subscribed", sid=sid, channel=channel)
        if self._on_subscribed is not None:
            self._on_subscribed(sid)

    def _handle_error(self, frame: dict[str, Any], text: str) -> None:
        """An error frame, classified by the value of its code (`error_code`); only a known code acts as one."""
        self.error_frames += 1
        if "seq" in frame:
            self._track_frame_seq(frame)  # error frames on a sid use up sequence numbers too
        msg = frame.get("msg")
        raw_code = msg.get("code") if isinstance(msg, dict) else None
        if type(raw_code) is float:  # a fraction or exponent part: read the number again, exactly
            exact = _EXACT_JSON.decode(text)  # the same text decoded once already: it cannot fail now
            raw_code = exact["msg"]["code"]
        code = error_code(raw_code)
        command_id = frame.get("id")
        command_is_int = type(command_id) is int  # a peer's id may be a list, a bool, anything
        fields: dict[str, Any] = {
            "code": code,
            "msg": _error_text(msg.get("msg") if isinstance(msg, dict) else None),
            "id": command_id if command_is_int or command_id is None else _json_excerpt(command_id),
        }
        if code is None:
            fields["code_raw"] = _json_excerpt(raw_code)
        if code == ERR_ALREADY_SUBSCRIBED:
            log.debug("ws_error_frame", **fields)
        elif code == ERR_AUTH_REQUIRED:
            signed = self._signer is not None
            hint = _SIGNED_AUTH_HINT if signed else _UNSIGNED_HINT
            log.error("ws_error_frame", **fields, signed=signed, hint=hint)
            self._end = "auth_required"
        elif code == ERR_BUFFER_OVERFLOW:
            log.warning(
                "ws_error_frame",
                **fields,
                hint="Kalshi dropped frames because this client read too slowly; reconnecting",
            )
            self._end = "buffer_overflow"
        elif command_is_int and command_id in self._pending_subscribes:
            log.warning("ws_error_frame", **fields, hint="subscribe refused; reconnecting")
            self._end = "subscribe_failed"
        elif self._warnings.allow("ws_error_frame"):
            if code is None:
                fields["hint"] = "unknown error code: not taken for any known error"
            log.warning("ws_error_frame", **fields)

    def _track_frame_seq(self, frame: dict[str, Any]) -> None:
        sid = frame.get("sid")
        if type(sid) is int:
            self._track_seq(sid, frame.get("seq"))

    def _track_seq(self, sid: int, seq: object) -> None:
        if type(seq) is not int or seq < 1:
            # Not a seq: this frame cannot be placed, the next ones can (the doc: "cannot detect gaps" for it).
            self.seq_unreadable += 1
            if sid not in self._seq_missing_noted:  # once per sid and connection: it may be every frame
                self._seq_missing_noted.add(sid)
                log.warning("ws_seq_missing", sid=sid, seq=repr(seq)[:40], hint="this frame is not checked for gaps")
            return
        last = self.last_seq.get(sid)
        if last is None or seq == last + 1:
            self.last_seq[sid] = seq  # a sid seen first here (before its ack) is tracked from this frame on
            return
        if seq <= last:
            # A repeat (a duplicate delivery) or a late frame: nothing is missing that was not counted already,
            # and the last seq stays where it was, so the next frame is judged against the highest one seen.
            self.seq_repeated += 1
            if self._warnings.allow("ws_seq_repeated"):
                log.warning("ws_seq_repeated", sid=sid, seq=seq, last_seq=last)
            return
        self.last_seq[sid] = seq
        expected = last + 1
        gap = SeqGap(sid=sid, expected=expected, got=seq)
        self.gaps += 1
        self.frames_missing += gap.missing
        if self._warnings.allow("ws_seq_gap"):
            log.warning("ws_seq_gap", sid=sid, expected=expected, got=seq, missing=gap.missing)
        if self._on_gap is not None:
            # The frames before the gap are delivered first, so the frame after it starts the next batch.
            self._flush()
            self._on_gap(gap)

    # ------------------------------------------------------------------ control for the daemon / watchdog

    def stats_fields(self) -> dict[str, int]:
        """This stream's counters for the periodic stats line (beside `reconnects`, `gaps`, `frames_missing`)."""
        return {"seq_repeated": self.seq_repeated, "subscribes_unacknowledged": self.subscribes_unacknowledged}

    @property
    def last_heard_monotonic(self) -> float | None:
        """When (event-loop time) the server last sent a frame or a ping on the current connection; None if none."""
        ws = self._ws
        if ws is None or not ws.last_heard:
            return None
        return ws.last_heard

    async def resubscribe(self) -> bool:
        """Unsubscribe the current sid (if any) and subscribe again on the open connection; False if none."""
        ws = self._ws
        if ws is None:
            return False
        try:
            if self.sid is not None:
                command = {"id": self._command_id(), "cmd": "unsubscribe", "params": {"sids": [self.sid]}}
                await ws.send(msgspec.json.encode(command).decode())
            log.info("ws_resubscribe", sid=self.sid)
            await self._subscribe(ws)
        except ConnectionClosed:
            return False  # the connection is going anyway; `run()` reconnects and subscribes afresh
        return True

    async def reconnect(self, reason: str) -> None:
        """Close the current connection (if any); `run()` then reconnects after the usual short delay."""
        ws = self._ws
        if ws is None:
            return
        log.info("ws_reconnect_requested", reason=reason)
        self._end = "requested"
        await ws.close(1000, reason[:100])

    # ------------------------------------------------------------------ classification and delays

    def _connect_failure_delay(self, exc: Exception, status: int | None) -> float:
        if status in (401, 403):
            self.handshake_rejections += 1
            delay_s = self._slow_backoff.next_delay()
            log.error(
                "ws_handshake_rejected",
                status=status,
                url=self._public_url,
                signed=self._signer is not None,
                retry_in_s=round(delay_s, 3),
                hint=_REJECTED_HINT if self._signer is not None else _UNSIGNED_HINT,
            )
            return delay_s
        delay_s = self._backoff.next_delay()
        log.warning(
            "ws_connect_failed",
            url=self._public_url,
            attempt=self.attempts,
            status=status,
            error=type(exc).__name__,
            reason=str(exc)[:200],
            retry_in_s=round(delay_s, 3),
        )
        return delay_s

    def _end_of_session(self, ws: ObservedConnection, cause: Cause, uptime_s: float) -> float:
        # Only an unsigned client is refused for want of credentials; a signed one tries again with a fresh signature.
        slow = cause == "auth_required" and self._signer is None
        delay_s = (self._slow_backoff if slow else self._backoff).next_delay()
        fields: dict[str, Any] = {
            "cause": cause,
            "code": ws.close_code,
            "reason": ws.close_reason or None,
            "uptime_s": round(uptime_s, 3),
            "retry_in_s": round(delay_s, 3),
        }
        fields.update(_parser_failure(ws))  # a refused frame: its `reason` in place of the (absent) peer's one
        log_method = log.info if cause == "requested" else log.warning
        log_method("ws_disconnected", **fields)
        return delay_s

    def _first_trade(self, batch: list[TradeFrame]) -> None:
        """Deliver the connection's first trades; once subscribed, that proves it works: the backoffs start over.

        Not uptime: a connection that stays open but never delivers (accepted, then dropped or refused) must
        keep backing off. Later trades go to `deliver` directly, with no check per frame.
        """
        if self.sid is not None:
            self._backoff.reset()
            self._slow_backoff.reset()
            self._deliver = self._deliver_trade
        self._deliver_trade(batch)
