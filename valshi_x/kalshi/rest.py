"""Kalshi REST, public endpoints only: market titles for posts and the trades pager for backfill.

One `KalshiRest` per daemon, on the daemon's `aiohttp.ClientSession`. Every request waits for a token of a
shared bucket (Kalshi's public budget, with a small burst), has a timeout, and is tried ONCE: a failure is
classified in `KalshiRestError.reason` (rate_limited, server_error, timeout, connection_error, bad_response,
not_found, http_error) and the caller decides whether and when to try again (the backfill does, with
valshi_x/backoff.py's arithmetic; one retry layer, not two nested ones). A 429 also pauses the shared bucket
(Kalshi sends no Retry-After: a jittered, doubling pause), so no other request goes out meanwhile.

`TitleLookup` wraps the title lookup for the poster, which waits half a second at most (`TITLE_BUDGET_S`) and
then posts with the ticker, so a slow or failing Kalshi never holds a post back. Titles are never retried:
lookups make one attempt per request (usually one request: the market's event, which lists its markets), and a
circuit breaker pauses them while Kalshi keeps failing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar

import structlog

from valshi_x.backoff import capped_step_s, equal_jitter
from valshi_x.decode import MAX_REST_BODY_BYTES, DecodeRefused, decode_json
from valshi_x.errors import ValshiError
from valshi_x.markets import MarketLabel, is_combo
from valshi_x.sanitize import MAX_POST_TEXT

if TYPE_CHECKING:  # aiohttp is imported where a request is made: a replay never loads it (issue 11)
    import aiohttp

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Tickers are upper-case letters, digits, '-' and '.'; anything else must not reach a URL path.
_TICKER_RE = re.compile(r"[A-Za-z0-9._-]+")
# Failures that say Kalshi is struggling rather than that the request was wrong: retryable, and what opens
# the title breaker. The others (404, malformed answers, other 4xx) are answers.
TRANSIENT_REASONS: Final = frozenset({"timeout", "connection_error", "server_error", "rate_limited"})
# Labels cached from one event answer at most: a big event must not push every other label out of the cache.
_SIBLINGS_CACHED: Final = 50
_K = TypeVar("_K")
_V = TypeVar("_V")


class KalshiRestError(ValshiError):
    """A REST request that failed for good; `reason` is a short snake_case tag, `status` the last HTTP status."""

    def __init__(self, reason: str, path: str, *, status: int | None = None, detail: str = "") -> None:
        text = f"{reason} on GET {path}" + (f" (HTTP {status})" if status is not None else "")
        super().__init__(f"{text}: {detail}" if detail else text)
        self.reason = reason
        self.path = path
        self.status = status
        self.detail = detail


async def _read_capped(content: aiohttp.StreamReader, max_bytes: int) -> bytes:
    """A response body, read no further than one chunk past `max_bytes`; DecodeRefused beyond it."""
    body = bytearray()
    while chunk := await content.read(64 * 1024):
        body += chunk
        if len(body) > max_bytes:
            raise DecodeRefused("too_large", f"body over {max_bytes} bytes")
    return bytes(body)


class RateLimiter:
    """A token bucket: `per_s` requests a second on average, up to `burst` at once; `hold` pauses every request
    (after a 429). Waiters reserve their token before sleeping, so concurrent callers queue fairly without a lock."""

    def __init__(self, per_s: float, *, burst: int = 1, clock: Clock, sleep: Sleep) -> None:
        if per_s <= 0 or burst < 1:
            raise ValueError("per_s must be positive and burst at least 1")
        self._interval_s = 1.0 / per_s
        self._burst_s = burst * self._interval_s
        self._clock = clock
        self._sleep = sleep
        # The time at which the bucket is empty again ("theoretical arrival time"): a request may go at once while
        # it lies less than `burst` intervals ahead of now.
        self._next_s = float("-inf")
        self._paused_until_s = float("-inf")

    async def wait(self) -> None:
        now = self._clock()
        # After a pause the bucket starts empty: requests resume at the plain rate, not in a burst.
        arrival_s = max(self._next_s, now, self._paused_until_s + self._burst_s - self._interval_s)
        self._next_s = arrival_s + self._interval_s
        go_at = arrival_s - self._burst_s + self._interval_s
        if go_at > now:
            await self._sleep(go_at - now)

    def hold(self, delay_s: float) -> None:
        self._paused_until_s = max(self._paused_until_s, self._clock() + delay_s)


class TTLCache(Generic[_K, _V]):
    """A bounded mapping whose entries expire; least recently used entries leave first when full."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[_K, tuple[float, _V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: _K) -> _V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires_s, value = entry
        if self._clock() >= expires_s:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: _K, value: _V, ttl_s: float) -> None:
        self._data[key] = (self._clock() + ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max_entries:
            self._data.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failed lookup remembered for a short while, so a broken ticker is not asked about on every alert."""

    reason: str
    path: str
    status: int | None


@dataclass(frozen=True, slots=True)
class _Event:
    title: str
    sub_title: str
    series_ticker: str | None
    markets: int | None  # markets in the event, when the answer said
    category: str | None = None


def _text_field(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    # Cut: a label is cached for hours, and a post uses no more of it than this anyway.
    return value[:MAX_POST_TEXT].strip() if isinstance(value, str) else ""


# A category is a short name ("Climate and Weather"); anything else is not used (it reaches posts and filters).
_CATEGORY_RE = re.compile(r"[A-Za-z][A-Za-z &,/-]{0,39}")
# An RFC 3339 UTC time as Kalshi writes them (2026-09-13T20:00:00Z, fractions allowed); nothing longer is read.
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]00:00)")
# A contract count: plain digits, at most two decimals (Kalshi's fixed-point), below 10^15.
_VOLUME_RE = re.compile(r"\d{1,15}(?:\.\d{1,6})?")


def _category(raw: object) -> str | None:
    if isinstance(raw, str) and _CATEGORY_RE.fullmatch(raw.strip()):
        return raw.strip()
    return None


def _utc_time(raw: object) -> datetime | None:
    """An RFC 3339 UTC time from a REST answer, tz-aware; None for anything else (absent, odd, out of range)."""
    if not isinstance(raw, str) or not _TIME_RE.fullmatch(raw):
        return None
    text = raw[:19]  # whole seconds are all a post shows
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _volume(market: dict[str, Any]) -> Decimal | None:
    """Contracts traded in 24 h: `volume_24h_fp` (fixed-point text) or, older, `volume_24h` (an integer)."""
    for key in ("volume_24h_fp", "volume_24h"):
        raw = market.get(key)
        if isinstance(raw, bool):
            continue
        if isinstance(raw, int) and 0 <= raw < 10**15:
            return Decimal(raw)
        if isinstance(raw, str) and _VOLUME_RE.fullmatch(raw):
            try:
                return Decimal(raw)
            except InvalidOperation:  # cannot happen after the pattern; kept so odd input never raises
                continue
    return None


def _with_context(label: MarketLabel, market: dict[str, Any], event: _Event | None) -> MarketLabel:
    """The label with what the same answers say about the market: category, close times, 24 h volume."""
    return dataclasses.replace(
        label,
        category=event.category if event is not None else _category(market.get("category")),
        close_time=_utc_time(market.get("close_time")),
        expected_expiration_time=_utc_time(market.get("expected_expiration_time")),
        volume_24h=_volume(market),
    )


def _is_combo(ticker: str, event: _Event | None) -> bool:
    return is_combo(ticker) or (event is not None and event.sub_title == "MVE")


def label_from(ticker: str, market: dict[str, Any], event: _Event | None) -> MarketLabel:
    """A readable label (`_title_label`), with the market's context from the same answers (`_with_context`)."""
    return _with_context(_title_label(ticker, market, event), market, event)


def _title_label(ticker: str, market: dict[str, Any], event: _Event | None) -> MarketLabel:
    """A readable label: the event's title plus the market's yes_sub_title when that says more.

    In an event of several markets the sub-title is what tells them apart, even when its words are already in
    the title ("Kansas City at Buffalo Winner?" + "Kansas City"), so it is always added there; for a lone
    market it is added only when the title does not already say it. Combos (KXMVE…) have no useful event
    title: their legs ("yes Atlas,yes Cruz Azul") are the label.
    """
    if _is_combo(ticker, event):
        candidates = [_text_field(market, "yes_sub_title"), _text_field(market, "title")]
        legs_text = max(candidates, key=lambda s: (s.count(","), len(s)))
        legs = [leg.strip() for leg in legs_text.split(",") if leg.strip()]
        if legs:
            return MarketLabel("Combo: " + ", ".join(legs), None)
        return MarketLabel((event.title if event else "") or "Combo", None)

    title = (event.title if event else "") or _text_field(market, "title") or ticker
    sub = _text_field(market, "yes_sub_title")
    series = event.series_ticker if event else None
    folded = sub.casefold()
    if not sub or folded in {"yes", "no", title.casefold()}:
        return MarketLabel(title, series)
    # A lone market's sub-title often repeats the question or the market's own (deprecated) title.
    lone = event is not None and event.markets == 1
    if lone and (folded in title.casefold() or folded == _text_field(market, "title").casefold()):
        return MarketLabel(title, series)
    return MarketLabel(f"{title} — {sub}", series)


class KalshiRest:
    """Client of Kalshi's public REST endpoints, with rate limiting, retries and a title cache."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        max_requests_per_s: float = 20.0,
        burst: int = 5,
        timeout_s: float = 5.0,
        pause_initial_s: float = 1.0,
        pause_max_s: float = 30.0,
        label_ttl_s: float = 6 * 3600.0,
        failure_ttl_s: float = 60.0,
        cache_entries: int = 2000,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        import aiohttp  # noqa: PLC0415  (lazy: see the imports)

        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._pause_initial_s = pause_initial_s
        self._pause_max_s = pause_max_s
        self._label_ttl_s = label_ttl_s
        self._failure_ttl_s = failure_ttl_s
        self._sleep = sleep
        self._jitter = jitter
        self.limiter = RateLimiter(max_requests_per_s, burst=burst, clock=clock, sleep=sleep)
        self._labels: TTLCache[str, MarketLabel | _Failure] = TTLCache(cache_entries, clock)
        self._events: TTLCache[str, _Event] = TTLCache(cache_entries, clock)
        self.requests = 0  # HTTP requests sent
        self.rate_limited = 0  # 429s in a row, for the pause
        self.failures = 0

    def pause_s(self, in_a_row: int) -> float:
        """How long every request waits after the `in_a_row`-th 429 in a row: doubling up to the cap, jittered."""
        step_s = capped_step_s(in_a_row, initial_s=self._pause_initial_s, cap_s=self._pause_max_s)
        return equal_jitter(step_s, self._jitter())

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET `path` (below the base URL) once and return its JSON object; raise a classified KalshiRestError."""
        await self.limiter.wait()
        self.requests += 1
        try:
            data = await self._get_once(path, params)
        except KalshiRestError as exc:
            self.failures += 1
            if exc.reason == "rate_limited":
                # The limit is per client: every request waits, not only this one.
                self.rate_limited += 1
                self.limiter.hold(self.pause_s(self.rate_limited))
            raise
        self.rate_limited = 0
        return data

    async def _get_once(self, path: str, params: dict[str, str] | None) -> dict[str, Any]:
        import aiohttp  # noqa: PLC0415  (lazy: see the imports; loaded already by then)

        url = self._base_url + path
        try:
            async with self._session.get(url, params=params, timeout=self._timeout, allow_redirects=False) as response:
                status = response.status
                body = await _read_capped(response.content, MAX_REST_BODY_BYTES)
        except TimeoutError:
            raise KalshiRestError("timeout", path) from None
        except aiohttp.ClientError as exc:
            raise KalshiRestError("connection_error", path, detail=type(exc).__name__) from None
        except DecodeRefused as exc:  # the body passed MAX_REST_BODY_BYTES
            raise KalshiRestError("bad_response", path, detail=exc.detail) from None
        if status == 200:
            try:
                data = decode_json(body, max_bytes=MAX_REST_BODY_BYTES)
            except DecodeRefused as exc:
                raise KalshiRestError("bad_response", path, status=status, detail=exc.reason) from None
            if not isinstance(data, dict):
                raise KalshiRestError("bad_response", path, status=status, detail="not a JSON object")
            return data
        if status == 429:
            raise KalshiRestError("rate_limited", path, status=status)
        if status >= 500:
            raise KalshiRestError("server_error", path, status=status)
        if status == 404:
            raise KalshiRestError("not_found", path, status=status)
        raise KalshiRestError("http_error", path, status=status, detail=body[:120].decode(errors="replace"))

    # -- titles -------------------------------------------------------------------------------------------------

    def has_label(self, ticker: str) -> bool:
        """Whether the cache answers for this market now (its label, or a failure that is not asked again yet)."""
        return self._labels.get(ticker) is not None

    def peek_label(self, ticker: str) -> MarketLabel | None:
        """The cached label of a market, if any, without asking Kalshi."""
        cached = self._labels.get(ticker)
        return cached if isinstance(cached, MarketLabel) else None

    async def market_label(self, ticker: str) -> MarketLabel:
        """The label of a market (cached); raises KalshiRestError, also for a market that failed for good lately.

        One attempt per request, never retried here: a title is a nicety, and `TitleLookup`'s breaker decides
        when a struggling Kalshi is worth asking again. Only answers that will not change soon (404, a
        malformed answer) are cached as failures; a timeout or a 5xx is not held against the market.
        """
        cached = self._labels.get(ticker)
        if isinstance(cached, _Failure):
            raise KalshiRestError(cached.reason, cached.path, status=cached.status, detail="cached failure")
        if cached is not None:
            return cached
        try:
            label = await self._fetch_label(ticker)
        except KalshiRestError as exc:
            if exc.reason not in TRANSIENT_REASONS:
                self._labels.put(ticker, _Failure(exc.reason, exc.path, exc.status), self._failure_ttl_s)
            raise
        self._labels.put(ticker, label, self._label_ttl_s)
        return label

    async def _fetch_label(self, ticker: str) -> MarketLabel:
        """The label from as few requests as possible: usually one, for the market's event.

        Kalshi does not document how an event ticker relates to its markets' tickers, but in practice it is the
        market ticker without its last `-` part (KXNFLGAME-26NOV01KCBUF-KC -> KXNFLGAME-26NOV01KCBUF), and an
        event comes with its markets. So the guessed event is asked for first: one request gives the label of
        this market and of its siblings (cached). Only when the guess is wrong or the event does not list the
        market is the market asked for, and then the event its `event_ticker` names (events are cached). A
        combo (KXMVE…) is labelled by its legs: its market alone, never its event (thousands of combos).
        """
        path = f"/markets/{ticker}"
        if not _TICKER_RE.fullmatch(ticker):
            raise KalshiRestError("bad_ticker", path)
        guess, _, _ = ticker.rpartition("-")
        combo = _is_combo(ticker, None)
        if guess and not combo:
            try:
                await self._event(guess)
            except KalshiRestError as exc:
                if exc.reason in TRANSIENT_REASONS:
                    raise  # Kalshi is struggling: one failed request is enough for this lookup
                # Otherwise (a 404, an odd answer) the guess was wrong: the market will name its event.
            found = self._labels.get(ticker)
            if isinstance(found, MarketLabel):
                return found
        market = (await self.get_json(path)).get("market")
        if not isinstance(market, dict):
            raise KalshiRestError("bad_response", path, status=200, detail="no market object")
        event_ticker = _text_field(market, "event_ticker")
        event = await self._event(event_ticker) if not combo and _TICKER_RE.fullmatch(event_ticker) else None
        return label_from(ticker, market, event)

    async def _event(self, event_ticker: str) -> _Event:
        """The event (cached); fetching it also caches the labels of the markets it lists."""
        cached = self._events.get(event_ticker)
        if cached is not None:
            return cached
        path = f"/events/{event_ticker}"
        data = await self.get_json(path)
        raw = data.get("event")
        if not isinstance(raw, dict):
            raise KalshiRestError("bad_response", path, status=200, detail="no event object")
        # Markets come beside the event by default, inside it with with_nested_markets.
        markets = data.get("markets", raw.get("markets"))
        series = _text_field(raw, "series_ticker")
        event = _Event(
            title=_text_field(raw, "title"),
            sub_title=_text_field(raw, "sub_title"),
            series_ticker=series or None,
            markets=len(markets) if isinstance(markets, list) else None,
            category=_category(raw.get("category")),
        )
        self._events.put(event_ticker, event, self._label_ttl_s)
        if isinstance(markets, list):
            for market in markets[:_SIBLINGS_CACHED]:
                ticker = market.get("ticker") if isinstance(market, dict) else None
                if isinstance(ticker, str) and _TICKER_RE.fullmatch(ticker):
                    self._labels.put(ticker, label_from(ticker, market, event), self._label_ttl_s)
        return event

    # -- trades -------------------------------------------------------------------------------------------------

    async def iter_trades(
        self, min_ts_s: int, max_ts_s: int, *, limit: int = 1000, ticker: str | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every trade between the two times (Unix seconds, as Kalshi filters them), one page at a time.

        Yields each non-empty page's raw trade objects (newest first, as Kalshi sends them); follows `cursor`
        until it comes back empty. Raises KalshiRestError for the first page that fails (one try each: the
        caller retries, from the page's slice).
        """
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be between 1 and 1000")
        if min_ts_s > max_ts_s:
            raise ValueError("min_ts_s must not be after max_ts_s")
        path = "/markets/trades"
        params = {"min_ts": str(min_ts_s), "max_ts": str(max_ts_s), "limit": str(limit)}
        if ticker:
            params["ticker"] = ticker
        seen_cursors: set[str] = set()
        while True:
            data = await self.get_json(path, params)
            trades = data.get("trades") or []
            if not isinstance(trades, list) or not all(isinstance(t, dict) for t in trades):
                raise KalshiRestError("bad_response", path, status=200, detail="trades is not a list of objects")
            if trades:
                yield trades
            cursor = data.get("cursor") or ""
            if not isinstance(cursor, str):
                raise KalshiRestError("bad_response", path, status=200, detail="cursor is not a string")
            if not cursor:
                return
            if cursor in seen_cursors:
                raise KalshiRestError("cursor_loop", path, status=200, detail="the same cursor came back")
            seen_cursors.add(cursor)
            params["cursor"] = cursor


class TitleBreaker:
    """Stops title lookups for a while after several failed in a row, so a Kalshi that is down costs one log line.

    Closed: every lookup may go. After `failures_to_open` lookups in a row failed for a reason that says
    Kalshi is struggling (timeouts, dropped connections, 5xx, 429) it opens for `open_s`: no lookups, posts
    use the ticker. Then one lookup goes as a probe; its success closes the breaker, its failure opens it
    again. Opening and closing are logged once each. Time comes from `clock` (monotonic seconds).
    """

    def __init__(self, *, failures_to_open: int = 3, open_s: float = 30.0, clock: Clock = time.monotonic) -> None:
        if failures_to_open < 1 or open_s <= 0:
            raise ValueError("the breaker needs failures_to_open >= 1 and open_s > 0")
        self.failures_to_open = failures_to_open
        self.open_s = open_s
        self._clock = clock
        self.failures_in_row = 0
        self.state: Literal["closed", "open", "probing"] = "closed"
        self._retry_at_s = 0.0
        self._opened_at_s = 0.0
        self.opened = 0  # times it opened from closed (stats)

    def allow(self) -> bool:
        """Whether a lookup may start now; once the pause is over, True exactly once (the probe)."""
        if self.state == "closed":
            return True
        if self.state == "open" and self._clock() >= self._retry_at_s:
            self.state = "probing"
            return True
        return False

    def record(self, *, ok: bool, reason: str | None = None) -> None:
        """A lookup's outcome: `ok` when Kalshi answered (a 404 too), not ok when it was unreachable."""
        if ok:
            self.failures_in_row = 0
            if self.state != "closed":
                log.info("title_lookups_resumed", paused_s=round(self._clock() - self._opened_at_s, 3))
                self.state = "closed"
            return
        self.failures_in_row += 1
        if self.state == "probing" or (self.state == "closed" and self.failures_in_row >= self.failures_to_open):
            if self.state == "closed":
                self.opened += 1
                self._opened_at_s = self._clock()
                log.warning(
                    "title_lookups_paused",
                    failures_in_row=self.failures_in_row,
                    reason=reason,
                    retry_in_s=self.open_s,
                    hint="Kalshi REST is failing: posts use the market ticker until a probe lookup succeeds",
                )
            self.state = "open"
            self._retry_at_s = self._clock() + self.open_s


class TitleLookup:
    """Market labels for the poster: an answer within a short budget, or None and the post uses the ticker.

    Lookups run as background tasks, at most `max_running` started by `prefetch` at a time (an alert's own
    lookup always starts). The caller bounds its wait (the poster: `TITLE_BUDGET_S`); a lookup it stops waiting
    for goes on, so its answer is cached for the next alert of that market; `prefetch` starts one early (when
    a sweep nears the threshold) so the alert finds the title at once. Nothing is retried: a market whose
    lookup just failed is not asked about again for `retry_after_s` (its alert goes out with the ticker at
    once), and a `TitleBreaker` stops all lookups while Kalshi keeps failing; the first alert posted without
    a title during a pause is logged (`title_skipped_paused`), the others only counted. `aclose` cancels what
    is still running. Built with `rest=None` it never looks anything up (replays without network).
    """

    def __init__(
        self,
        rest: KalshiRest | None,
        *,
        max_running: int = 8,
        retry_after_s: float = 10.0,
        breaker: TitleBreaker | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._rest = rest
        self.max_running = max_running
        self.retry_after_s = retry_after_s
        self.breaker = breaker or TitleBreaker(clock=clock)
        self._running: dict[str, asyncio.Task[MarketLabel | None]] = {}
        self._failed_lately: TTLCache[str, str] = TTLCache(1000, clock)  # ticker -> reason
        self.failures = 0  # lookups that failed
        # Alerts that got no lookup at all, so went out with the ticker: the breaker was open, or the market's
        # lookup failed a moment ago.
        self.skipped_breaker = 0
        self.skipped_recent_failure = 0
        self._skip_logged_opening = 0  # the breaker opening whose first skipped alert was logged

    def stats_fields(self) -> dict[str, int]:
        """The counters for the stats and stop lines; none when titles are not looked up at all."""
        if self._rest is None:
            return {}
        return {
            "title_lookups_failed": self.failures,
            "titles_skipped_breaker": self.skipped_breaker,
            "titles_skipped_recent_failure": self.skipped_recent_failure,
            "title_breaker_opened": self.breaker.opened,
        }

    def prefetch(self, ticker: str) -> None:
        """Start looking `ticker` up in the background unless it is cached, running, paused or too many run."""
        if self._rest is None or ticker in self._running or self._rest.has_label(ticker):
            return
        if self._failed_lately.get(ticker) is not None:
            return
        if len(self._running) >= self.max_running or not self.breaker.allow():
            return
        self._start(self._rest, ticker)

    def cached_label(self, ticker: str) -> MarketLabel | None:
        """The label if the cache holds it now (a prefetch finished): no request, no wait. For the filters."""
        if self._rest is None:
            return None
        return self._rest.peek_label(ticker)

    async def label_for(self, ticker: str) -> MarketLabel | None:
        """The label, or None when there is none to be had; the caller bounds the wait (the poster's budget).

        The lookup is shielded: a caller that stops waiting (a timeout) leaves it running, and its answer cached.
        """
        rest = self._rest
        if rest is None:
            return None
        task = self._running.get(ticker)
        if task is None:
            if rest.has_label(ticker):
                try:
                    return await rest.market_label(ticker)  # from the cache: no request, no wait
                except KalshiRestError:
                    return None  # a market that failed for good lately: already logged
            if self._failed_lately.get(ticker) is not None:
                self.skipped_recent_failure += 1
                return None
            if not self.breaker.allow():
                self._skipped_by_breaker(ticker)
                return None
            task = self._start(rest, ticker)
        return await asyncio.shield(task)

    def _skipped_by_breaker(self, ticker: str) -> None:
        """Count an alert that goes out untitled while lookups are paused; log only the first of each pause."""
        self.skipped_breaker += 1
        if self._skip_logged_opening != self.breaker.opened:
            self._skip_logged_opening = self.breaker.opened
            log.info(
                "title_skipped_paused",
                ticker=ticker,
                hint="posts use the ticker until lookups resume",
            )

    def _start(self, rest: KalshiRest, ticker: str) -> asyncio.Task[MarketLabel | None]:
        task = asyncio.create_task(self._lookup(rest, ticker), name=f"title_lookup:{ticker}")
        self._running[ticker] = task
        task.add_done_callback(self._forget)
        return task

    async def _lookup(self, rest: KalshiRest, ticker: str) -> MarketLabel | None:
        """One lookup, however many wait for it: its outcome is told to the breaker and logged once."""
        try:
            label = await rest.market_label(ticker)
        except KalshiRestError as exc:
            self.failures += 1
            log.warning("title_lookup_failed", ticker=ticker, reason=exc.reason, status=exc.status)
            transient = exc.reason in TRANSIENT_REASONS
            if transient:
                # Asking again at once would be a retry: a lookup started ahead (prefetch) that failed must not
                # cost its alert a second round trip. (Lasting failures are cached by KalshiRest itself.)
                self._failed_lately.put(ticker, exc.reason, self.retry_after_s)
            self.breaker.record(ok=not transient, reason=exc.reason)
            return None
        except Exception as exc:
            # Whatever else a hostile answer sets off (a bug in reading it included), the breaker must hear of it:
            # a probe that ends without a verdict would leave it half-open, and titles off, for the rest of the run.
            self.failures += 1
            log.warning("title_lookup_failed", ticker=ticker, reason="unexpected", error=type(exc).__name__)
            self.breaker.record(ok=False, reason=type(exc).__name__)
            return None
        self.breaker.record(ok=True)
        return label

    def _forget(self, task: asyncio.Task[MarketLabel | None]) -> None:
        ticker = task.get_name().removeprefix("title_lookup:")
        if self._running.get(ticker) is task:
            del self._running[ticker]
        _retrieve(task)

    async def aclose(self) -> None:
        """Cancel lookups still running in the background."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a task's outcome as seen: a failure nobody waits for any more must not be reported as unhandled."""
    if not task.cancelled():
        task.exception()
