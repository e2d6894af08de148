"""A stand-in for X's `POST /2/tweets` on 127.0.0.1, scripted one answer per request, and the aiohttp client
middleware that sends tweepy's requests to it. `GET /2/users/me` answers as `check` expects (or `me_status`).

Like X, it keeps the posts it created and answers a second post of the same text with the duplicate-content 403,
whatever the script says next. A scripted answer can also create the post without saying so (a slow answer, a
dropped connection, a held request), which is how a post whose answer was lost looks from our side.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.client_middlewares import ClientHandlerType, ClientMiddlewareType
from aiohttp.test_utils import TestServer
from yarl import URL

X_HOSTS = frozenset({"api.twitter.com", "api.x.com"})

DUPLICATE_BODY = {
    "detail": "You are not allowed to create a Tweet with duplicate content.",
    "status": 403,
    "title": "Forbidden",
    "type": "about:blank",
}


@dataclass
class Reply:
    """One scripted answer. `headers_at(now_s)` adds headers computed from the test's clock (resets)."""

    status: int = 201
    json: Any = None  # the body; None: X's usual body for the status
    html: str | None = None  # an HTML body instead (as proxies in front of X send with a 503)
    headers: dict[str, str] = field(default_factory=dict)
    headers_at: Callable[[int], dict[str, str]] | None = None
    delay_s: float = 0.0  # wait this long before answering
    hold: asyncio.Event | None = None  # wait for this event before answering
    drop: bool = False  # close the connection instead of answering
    creates: bool | None = None  # whether X creates the post; None: when the answer is a 201


@dataclass(frozen=True)
class Received:
    """One request as the server saw it."""

    at_ms: int  # on the test's clock
    text: str
    authorization: str
    answered: int | None  # the status answered (or about to be, when held); None when the connection was dropped
    answer_headers: dict[str, str] = field(default_factory=dict)


def created(**headers: str) -> Reply:
    return Reply(201, headers=dict(headers))


def duplicate() -> Reply:
    return Reply(403, json=DUPLICATE_BODY)


def _limit_headers(prefix: str, *, limit: int, remaining: int, reset_in_s: int) -> Callable[[int], dict[str, str]]:
    def at(now_s: int) -> dict[str, str]:
        return {
            f"{prefix}-limit": str(limit),
            f"{prefix}-remaining": str(remaining),
            f"{prefix}-reset": str(now_s + reset_in_s),
        }

    return at


def rate_limited(
    *,
    reset_in_s: int | None = None,
    remaining: int = 0,
    user_24h_reset_in_s: int | None = None,
    user_24h_remaining: int = 0,
    app_24h_reset_in_s: int | None = None,
) -> Reply:
    """A 429 "Too Many Requests", with the reset headers asked for (none at all when nothing is asked)."""
    parts: list[Callable[[int], dict[str, str]]] = []
    if reset_in_s is not None:
        parts.append(_limit_headers("x-rate-limit", limit=100, remaining=remaining, reset_in_s=reset_in_s))
    if user_24h_reset_in_s is not None:
        parts.append(
            _limit_headers(
                "x-user-limit-24hour", limit=17, remaining=user_24h_remaining, reset_in_s=user_24h_reset_in_s
            )
        )
    if app_24h_reset_in_s is not None:
        parts.append(_limit_headers("x-app-limit-24hour", limit=1667, remaining=0, reset_in_s=app_24h_reset_in_s))

    def headers_at(now_s: int) -> dict[str, str]:
        merged: dict[str, str] = {}
        for part in parts:
            merged.update(part(now_s))
        return merged

    body = {"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank", "status": 429}
    return Reply(429, json=body, headers_at=headers_at)


def created_with_limits(*, user_24h_remaining: int, user_24h_reset_in_s: int) -> Reply:
    """A 201 whose headers say how many posts the 24-hour user limit has left."""
    at = _limit_headers("x-user-limit-24hour", limit=17, remaining=user_24h_remaining, reset_in_s=user_24h_reset_in_s)
    return Reply(201, headers_at=at)


def usage_capped() -> Reply:
    body = {
        "title": "UsageCapExceeded",
        "detail": "Usage cap exceeded: Monthly product cap",
        "type": "https://api.twitter.com/2/problems/usage-capped",
        "period": "Monthly",
        "scope": "Product",
        "status": 429,
    }
    return Reply(429, json=body)


def payment_required() -> Reply:
    body = {
        "title": "Payment Required",
        "detail": "Your enrolled account does not have any credits to fulfill this request.",
        "type": "about:blank",
        "status": 402,
    }
    return Reply(402, json=body)


def unauthorized() -> Reply:
    return Reply(401, json={"title": "Unauthorized", "type": "about:blank", "status": 401, "detail": "Unauthorized"})


def oauth1_permissions() -> Reply:
    body = {
        "title": "Forbidden",
        "detail": "Your client app is not configured with the appropriate oauth1 app permissions for this endpoint.",
        "type": "https://api.twitter.com/2/problems/oauth1-permissions",
        "status": 403,
    }
    return Reply(403, json=body)


def bad_request() -> Reply:
    body = {
        "errors": [{"parameters": {"text": ["x" * 20]}, "message": "Tweet text is too long"}],
        "title": "Invalid Request",
        "detail": "One or more parameters to your request was invalid.",
        "type": "https://api.twitter.com/2/problems/invalid-request",
    }
    return Reply(400, json=body)


def forbidden_text() -> Reply:
    """A 403 about the text itself, not about the account."""
    body = {
        "title": "Forbidden",
        "detail": "You are not allowed to create a Tweet with this content.",
        "type": "about:blank",
        "status": 403,
    }
    return Reply(403, json=body)


def unavailable_html() -> Reply:
    return Reply(503, html="<html><body><h1>Over capacity</h1><p>Please try again later.</p></body></html>")


def slow(delay_s: float, *, creates: bool = True) -> Reply:
    """An answer later than the client's timeout; by default X created the post meanwhile."""
    return Reply(201, delay_s=delay_s, creates=creates)


def dropped(*, creates: bool = False) -> Reply:
    return Reply(201, drop=True, creates=creates)


def held(event: asyncio.Event, *, creates: bool = True) -> Reply:
    """Keep the request open until `event` is set (the test kills the poster meanwhile)."""
    return Reply(201, hold=event, creates=creates)


class FakeX:
    """The fake X. Use as `async with FakeX(clock_ms) as x:`; `x.middleware` goes into the client session."""

    def __init__(self, clock_ms: Callable[[], int]) -> None:
        self._clock_ms = clock_ms
        self.script: deque[Reply] = deque()
        self.requests: list[Received] = []
        self.created_texts: list[str] = []  # every post created, in order: a text twice here is a double post
        self._ids = itertools.count(1_900_000_000_000_000_001)
        self._server: TestServer | None = None
        self.received = asyncio.Event()  # set at every request; tests clear it to wait for the next one
        # GET /2/users/me (what `check` asks): the account's username, or this status's problem answer instead.
        self.username = "valshi_whales"
        self.me_status = 200
        self.me_authorizations: list[str] = []  # the Authorization header of each users/me request

    def queue(self, *replies: Reply) -> None:
        self.script.extend(replies)

    async def __aenter__(self) -> FakeX:
        app = web.Application()
        app.router.add_post("/2/tweets", self._tweets)
        app.router.add_get("/2/users/me", self._me)
        self._server = TestServer(app, host="127.0.0.1", port=0)
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        await self._server.close()

    @property
    def base_url(self) -> URL:
        assert self._server is not None
        return self._server.make_url("/")

    @property
    def middleware(self) -> ClientMiddlewareType:
        base = self.base_url

        async def to_fake_x(request: aiohttp.ClientRequest, handler: ClientHandlerType) -> aiohttp.ClientResponse:
            if request.url.host in X_HOSTS:
                # Signing has already happened, so the Authorization header the server sees is the real one.
                request.url = base.with_path(request.url.path).with_query(request.url.query)
            return await handler(request)

        return to_fake_x

    async def _me(self, request: web.Request) -> web.StreamResponse:
        self.me_authorizations.append(request.headers.get("Authorization", ""))
        if self.me_status != 200:
            body = {"title": "Unauthorized" if self.me_status == 401 else "Error", "status": self.me_status}
            return web.json_response(body, status=self.me_status, content_type="application/problem+json")
        user = {"id": "1790000000000000001", "name": "Kalshi Whales", "username": self.username}
        return web.json_response({"data": user})

    def answered(self) -> list[int | None]:
        return [r.answered for r in self.requests]

    async def _tweets(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        text = payload["text"]
        reply = self.script.popleft() if self.script else Reply()
        is_duplicate = text in self.created_texts
        if reply.creates if reply.creates is not None else reply.status == 201:
            if is_duplicate:
                reply = duplicate()
            else:
                self.created_texts.append(text)
        answered = None if reply.drop else reply.status
        headers = dict(reply.headers)
        if reply.headers_at is not None:
            headers.update(reply.headers_at(self._clock_ms() // 1000))
        authorization = request.headers.get("Authorization", "")
        self.requests.append(Received(self._clock_ms(), text, authorization, answered, headers))
        self.received.set()
        if reply.hold is not None:
            await reply.hold.wait()
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        if reply.html is not None:
            return web.Response(status=reply.status, text=reply.html, content_type="text/html", headers=headers)
        body = reply.json
        if body is None and reply.status == 201:
            body = {"data": {"id": str(next(self._ids)), "text": text, "edit_history_tweet_ids": []}}
        # X sends its errors as application/problem+json.
        content_type = "application/json" if reply.status < 300 else "application/problem+json"
        return web.json_response(body, status=reply.status, headers=headers, content_type=content_type)
