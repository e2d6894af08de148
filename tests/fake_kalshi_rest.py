"""A loopback server that answers like Kalshi's public REST API, for tests.

Routes (under /trade-api/v2): GET /markets/{ticker}, GET /events/{event_ticker}, GET /markets/trades with
min_ts / max_ts (Unix seconds, both ends inclusive to the whole second), limit (1 to 1000, default 100), cursor
and ticker; trades come newest first, and the cursor is a position in the tape, so trades added between pages
(a live tape) neither shift nor repeat the pages still to come.

Scripting: `script(route, *faults)` queues what the next requests of a route get instead of the normal answer
(an HTTP status, a delay, a dropped connection); `delay_s[route]` slows every answer of a route. `counts`
and `requests` tell what was asked. Routes are named "market", "event" and "trades".

    async with FakeKalshiRest() as fake:
        fake.add_event("KXE-1", "Who wins?", series_ticker="KXE")
        fake.add_market("KXE-1-A", "KXE-1", yes_sub_title="Alice")
        fake.script("market", 429, Fault(delay_s=0.5))
        rest = KalshiRest(session, fake.base_url)
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestServer

Route = Literal["market", "event", "trades"]
API_PREFIX = "/trade-api/v2"


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted answer: wait `delay_s`, then drop the connection, or answer `body` (raw bytes, status 200), or
    answer `status`, or answer normally."""

    status: int | None = None
    delay_s: float = 0.0
    drop: bool = False
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    route: Route
    path: str
    query: dict[str, str]
    at_s: float  # time.monotonic() on arrival


@dataclass
class _Tape:
    """Trades sorted by (ts_ms, trade_id); re-sorted lazily after out-of-order additions."""

    keys: list[tuple[int, str]] = field(default_factory=list)
    trades: dict[str, dict[str, Any]] = field(default_factory=dict)
    sorted: bool = True

    def add(self, ts_ms: int, trade: dict[str, Any]) -> None:
        trade_id = trade["trade_id"]
        if trade_id in self.trades:
            raise ValueError(f"trade {trade_id} is already on the tape")
        key = (ts_ms, trade_id)
        if self.keys and key < self.keys[-1]:
            self.sorted = False
        self.keys.append(key)
        self.trades[trade_id] = trade

    def ordered(self) -> list[tuple[int, str]]:
        if not self.sorted:
            self.keys.sort()
            self.sorted = True
        return self.keys


def rest_trade(
    trade_id: str,
    ticker: str,
    *,
    ts_ms: int,
    yes_price: str = "0.5000",
    count: str = "10.00",
    side: Literal["yes", "no"] = "yes",
    block: bool = False,
) -> dict[str, Any]:
    """A trade object shaped like Kalshi's REST answer (fixed-point strings, `created_time`)."""
    created = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    no_price = Decimal(1) - Decimal(yes_price)
    return {
        "trade_id": trade_id,
        "ticker": ticker,
        "yes_price_dollars": yes_price,
        "no_price_dollars": f"{no_price:.4f}",
        "count_fp": count,
        "taker_outcome_side": side,
        "taker_book_side": "bid" if side == "yes" else "ask",
        "is_block_trade": block,
        "created_time": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


def _encode_cursor(key: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(list(key))).decode()


def _decode_cursor(cursor: str) -> tuple[int, str]:
    ts_ms, trade_id = msgspec.json.decode(base64.urlsafe_b64decode(cursor.encode()))
    if not isinstance(ts_ms, int) or not isinstance(trade_id, str):
        raise ValueError("bad cursor")
    return ts_ms, trade_id


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


class FakeKalshiRest:
    """The fake server; use as `async with FakeKalshiRest() as fake:` and point clients at `fake.base_url`."""

    def __init__(self) -> None:
        self.markets: dict[str, dict[str, Any]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        self.tape = _Tape()
        self.counts: Counter[str] = Counter()
        self.requests: list[RecordedRequest] = []
        self.delay_s: dict[str, float] = {}
        self.down_status: int | None = None  # while set, every request is answered with this status (an outage)
        self._faults: dict[str, deque[Fault]] = {}
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_get(API_PREFIX + "/markets/trades", self._trades)
        app.router.add_get(API_PREFIX + "/markets/{ticker}", self._market)
        app.router.add_get(API_PREFIX + "/events/{event_ticker}", self._event)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    # -- set-up ---------------------------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeKalshiRest:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing.set()  # ends scripted delays at once so shutdown never waits on them
        await self.server.close()

    @property
    def base_url(self) -> str:
        return str(self.server.make_url(API_PREFIX))

    def add_event(
        self, event_ticker: str, title: str, *, series_ticker: str, sub_title: str = "", **extra: Any
    ) -> None:
        self.events[event_ticker] = {
            "event_ticker": event_ticker,
            "series_ticker": series_ticker,
            "title": title,
            "sub_title": sub_title,
            **extra,
        }

    def add_market(
        self, ticker: str, event_ticker: str, *, yes_sub_title: str = "", title: str = "", **extra: Any
    ) -> None:
        self.markets[ticker] = {
            "ticker": ticker,
            "event_ticker": event_ticker,
            "title": title,
            "yes_sub_title": yes_sub_title,
            "no_sub_title": yes_sub_title,
            "status": "active",
            "market_type": "binary",
            **extra,
        }

    def add_trades(self, trades: Iterable[dict[str, Any]]) -> None:
        """Put REST-shaped trades (see `rest_trade`) on the tape; any order."""
        for trade in trades:
            created = datetime.fromisoformat(trade["created_time"])
            ts_ms = int(created.timestamp() * 1000 + 0.5)
            self.tape.add(ts_ms, trade)

    def script(self, route: Route, *faults: int | Fault) -> None:
        """The next requests of `route` get these answers, in order, before normal answers resume."""
        queue = self._faults.setdefault(route, deque())
        queue.extend(Fault(status=f) if isinstance(f, int) else f for f in faults)

    # -- handlers ---------------------------------------------------------------------------------------------

    async def _sleep(self, delay_s: float) -> None:
        if delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay_s)

    async def _intercept(self, route: Route, request: web.Request) -> web.Response | None:
        """Record the request and play the route's next fault; a response to send instead, or None."""
        self.counts[route] += 1
        self.requests.append(RecordedRequest(route, request.path, dict(request.query), time.monotonic()))
        queue = self._faults.get(route)
        fault = queue.popleft() if queue else Fault()
        if self.down_status is not None:
            fault = Fault(status=self.down_status)
        await self._sleep(fault.delay_s + self.delay_s.get(route, 0.0))
        if fault.drop:
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPServiceUnavailable  # never reaches the client: the connection is gone
        if fault.body is not None:
            return web.Response(body=fault.body, status=200, content_type="application/json")
        if fault.status is None or fault.status == 200:
            return None
        if fault.status == 429:
            return _json({"error": "too many requests"}, status=429)
        if fault.status >= 500:
            html = f"<html><body><h1>{fault.status}</h1></body></html>"
            return web.Response(text=html, status=fault.status, content_type="text/html")
        return _json({"error": {"code": "scripted", "message": "scripted"}}, status=fault.status)

    async def _market(self, request: web.Request) -> web.Response:
        if (answer := await self._intercept("market", request)) is not None:
            return answer
        market = self.markets.get(request.match_info["ticker"])
        if market is None:
            return _json({"error": {"code": "not_found", "message": "market not found"}}, status=404)
        return _json({"market": market})

    async def _event(self, request: web.Request) -> web.Response:
        if (answer := await self._intercept("event", request)) is not None:
            return answer
        event_ticker = request.match_info["event_ticker"]
        event = self.events.get(event_ticker)
        if event is None:
            return _json({"error": {"code": "not_found", "message": "event not found"}}, status=404)
        markets = [m for m in self.markets.values() if m["event_ticker"] == event_ticker]
        return _json({"event": event, "markets": markets})

    async def _trades(self, request: web.Request) -> web.Response:
        if (answer := await self._intercept("trades", request)) is not None:
            return answer
        query = request.query
        try:
            limit = int(query.get("limit", "100"))
            min_ms = int(query["min_ts"]) * 1000 if "min_ts" in query else 0
            max_ms = int(query["max_ts"]) * 1000 + 999 if "max_ts" in query else 2**62
            after = _decode_cursor(query["cursor"]) if query.get("cursor") else None
        except (ValueError, TypeError):
            return _json({"error": {"code": "invalid_parameters", "message": "bad query"}}, status=400)
        if not 1 <= limit <= 1000:
            return _json({"error": {"code": "invalid_parameters", "message": "limit"}}, status=400)
        ticker = query.get("ticker")

        keys = self.tape.ordered()
        # Walk newest first from the end of the window (or from just below the cursor's trade).
        end = (
            bisect.bisect_left(keys, after) if after is not None else bisect.bisect_right(keys, (max_ms, "\U0010ffff"))
        )
        page: list[dict[str, Any]] = []
        index = end - 1
        while index >= 0 and len(page) < limit:
            ts_ms, trade_id = keys[index]
            if ts_ms < min_ms:
                break
            trade = self.tape.trades[trade_id]
            if ts_ms <= max_ms and (ticker is None or trade["ticker"] == ticker):
                page.append(trade)
            index -= 1
        more = index >= 0 and keys[index][0] >= min_ms and len(page) == limit
        cursor = _encode_cursor(keys[index + 1]) if more else ""
        return _json({"trades": page, "cursor": cursor})
