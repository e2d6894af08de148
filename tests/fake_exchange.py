"""A fake Kalshi exchange on loopback: the WebSocket and the REST API sharing ONE tape of trades.

Every trade the exchange makes (`publish`) goes on the tape and on the REST trades endpoint, whatever happens to
the socket; it is sent over the WebSocket only to a subscribed client, and not at all when it is `lost` (the
frame's seq number is used up, so the client sees a gap). In between, the exchange can cut the connection
(`cut`), refuse handshakes for a while (`refuse` / `accept`), and so on; the tape stays the ground truth from
which `expected_alerts` computes the whales a perfect client would report.

    async with FakeExchange() as exchange:
        ... Daemon(settings with KALSHI_WS_URL=exchange.ws_url, KALSHI_API_URL=exchange.rest_url) ...
        session = await exchange.wait_subscribed()
        await exchange.publish(trade_msg(...))
        await exchange.publish(trade_msg(...), lost=True)
        await exchange.cut()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

from websockets.exceptions import ConnectionClosed

from tests.fake_kalshi import Attempt, FakeKalshi, FakeSession
from tests.fake_kalshi_rest import FakeKalshiRest, rest_trade
from valshi_x.trades import trade_from_fields
from valshi_x.whales import Alert, WhaleDetector


def rest_shape(msg: dict[str, Any]) -> dict[str, Any]:
    """The REST trade object of a WebSocket trade `msg`: `ticker` and `created_time` instead of the ws fields."""
    shaped = rest_trade(
        msg["trade_id"],
        msg["market_ticker"],
        ts_ms=msg["ts_ms"],
        yes_price=msg["yes_price_dollars"],
        count=msg["count_fp"],
        side=msg["taker_outcome_side"],
        block=msg.get("is_block_trade", False),
    )
    shaped["no_price_dollars"] = msg["no_price_dollars"]
    return shaped


class _Ws(FakeKalshi):
    """The WebSocket side: every attempt serves the exchange's feed, unless the exchange is refusing."""

    def __init__(self, exchange: FakeExchange, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exchange = exchange

    def behaviour_for(self, attempt: int) -> Attempt:
        if self.exchange.refuse_status is not None:
            return Attempt(reject_status=self.exchange.refuse_status)
        return Attempt(script=self.exchange._serve)


class FakeExchange:
    """WebSocket + REST on 127.0.0.1 with one tape; `async with` starts and stops both."""

    def __init__(self, *, ping_interval_s: float | None = 1.0, **ws_options: Any) -> None:
        self.ws = _Ws(self, ping_interval_s=ping_interval_s, **ws_options)
        self.rest = FakeKalshiRest()
        self.tape: list[dict[str, Any]] = []  # every trade `msg` the exchange made, in publishing order
        self.sent_ids: set[str] = set()  # trades a client was sent over the socket
        self.lost = 0  # frames lost on purpose (seq skipped)
        self.undelivered = 0  # trades made while no client was subscribed
        self.cuts = 0
        self.refuse_status: int | None = None
        self.session: FakeSession | None = None  # the subscribed client, if any
        self._changed = asyncio.Event()

    async def __aenter__(self) -> FakeExchange:
        await self.rest.__aenter__()
        await self.ws.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            await self.ws.__aexit__(exc_type, *exc_info)
        finally:
            await self.rest.close()

    @property
    def ws_url(self) -> str:
        return self.ws.url

    @property
    def rest_url(self) -> str:
        return self.rest.base_url

    # -- the feed --------------------------------------------------------------------------------------------

    async def _serve(self, session: FakeSession) -> None:
        await session.wait_subscribed(timeout_s=30.0)
        self.session = session
        self._notify()
        try:
            await session.wait_closed()
        finally:
            if self.session is session:
                self.session = None
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await self._changed.wait()

    async def wait_subscribed(self, timeout_s: float = 10.0) -> FakeSession:
        """The subscribed session, once there is one."""
        await self.wait_for(lambda: self.session is not None, timeout_s)
        assert self.session is not None
        return self.session

    @property
    def connected(self) -> bool:
        return self.session is not None

    async def publish(self, msg: dict[str, Any], *, lost: bool = False) -> bool:
        """Make one trade: on the tape and on REST always; over the socket unless `lost` or nobody is subscribed.

        Returns True when the frame was sent.
        """
        self.tape.append(msg)
        self.rest.tape.add(msg["ts_ms"], rest_shape(msg))
        session = self.session
        if session is None:
            self.undelivered += 1
            return False
        if lost:
            session.skip_seq(1)
            self.lost += 1
            return False
        try:
            await session.send_trade(msg)
        except ConnectionClosed:
            self.undelivered += 1
            if self.session is session:
                self.session = None
            return False
        self.sent_ids.add(msg["trade_id"])
        return True

    async def publish_many(self, msgs: Iterable[dict[str, Any]], *, lost: Callable[[int], bool] | None = None) -> None:
        for i, msg in enumerate(msgs):
            await self.publish(msg, lost=lost(i) if lost is not None else False)

    async def cut(self) -> None:
        """Cut the client's connection without a close frame (1006 at the client)."""
        session = self.session
        if session is not None:
            self.session = None
            self.cuts += 1
            await session.drop()

    async def close(self, code: int = 1011, reason: str = "internal error") -> None:
        """Close the client's connection with a close frame."""
        session = self.session
        if session is not None:
            self.session = None
            self.cuts += 1
            await session.close(code, reason)

    def refuse(self, status: int = 503) -> None:
        """Answer every handshake from now on with `status` (an outage) until `accept`."""
        self.refuse_status = status

    def accept(self) -> None:
        self.refuse_status = None


def expected_alerts(tape: Iterable[dict[str, Any]], threshold_usd: Decimal, sweep_window_ms: int) -> list[Alert]:
    """The whales of a tape as a client that missed nothing would see them: every trade, in trade-time order."""
    trades = sorted((trade_from_fields(m) for m in tape), key=lambda t: (t.ts_ms, t.trade_id))
    detector = WhaleDetector(threshold_usd, sweep_window_ms)
    alerts = detector.add_many(trades)
    alerts += detector.flush()
    return alerts


def alert_key(trade_ids: Iterable[str], value_usd: str | Decimal) -> tuple[tuple[str, ...], str]:
    """What must match between an expected alert and a reported one: the fills and the value to the cent."""
    value = Decimal(value_usd).quantize(Decimal("0.01"))
    return tuple(trade_ids), str(value)
