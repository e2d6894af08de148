"""The poster: takes alerts from the outbox one at a time and posts them to X, exactly once, within X's limits.

It runs as its own task, woken by `nudge()` after the daemon enqueues an alert, so a slow or rate-limited X never
slows the reader. Each step picks the biggest due alert; skips it if it has grown too old; waits while the own
budget (`X_POSTS_PER_15MIN`, `X_POSTS_PER_24H`, counted in the store's ledger) or a limit X reported is used up;
fixes the text; marks it `posting`; sends; and settles the row from the answer.

Every answer, or the lack of one, goes through `classify`, the one place that maps X's replies to what happens:

    posted          201                                   -> posted, tweet id kept
    already_posted  403 "duplicate content"               -> posted (an earlier attempt got through); no retry
    rate_limited    429 not usage-capped                  -> wait for the latest relevant reset + jitter,
                                                             or 60 s .. 15 min backoff without a reset header
    paused          402, 429 UsageCapExceeded, 401,       -> stop posting, keep the queue, one `x_paused` line,
                    403 permissions, other odd 4xx           probe again every 30 min
    rejected        400, other 403, 413, 422              -> failed with the reason; the same text is never resent
    transient       5xx (HTML too), 408, timeouts,        -> backoff with jitter; failed after 8 tries
                    dropped connections

The transport is tweepy's `AsyncClient`, used only to sign and send. X has no idempotency key: a retry sends the
very same text, so a duplicate-content 403 proves that an attempt cut off by a timeout or a crash was posted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
import structlog

from valshi_x.backoff import capped_step_s
from valshi_x.decode import MAX_REST_BODY_BYTES, DecodeRefused, decode_json
from valshi_x.markets import MarketLabel, category_of, market_link, series_of
from valshi_x.store import Attempt, OutboxItem, RateLimitWindow, Store, utc_iso, wall_ms
from valshi_x.whales import Alert, alert_log_fields
from valshi_x.x.filters import PostFilter, judge
from valshi_x.x.text import render_post

if TYPE_CHECKING:  # aiohttp and tweepy are imported when X is really used: a dry run never loads them (issue 11)
    import aiohttp
    from aiohttp.client_middlewares import ClientHandlerType, ClientMiddlewareType

log = structlog.get_logger(__name__)

Render = Callable[[Alert, MarketLabel | None], str]
LookupLabel = Callable[[str], Awaitable[MarketLabel | None]]
PeekLabel = Callable[[str], MarketLabel | None]
Sleep = Callable[[float], Awaitable[None]]

# What a post waits for its market's title at most, whatever the lookup does; then it goes out with the ticker.
# This wait is the only one (the title lookup has no timer of its own); a lookup cut off goes on in the
# background, so the next alert of that market has the title.
TITLE_BUDGET_S: Final = 0.5
_MINUTE_MS = 60 * 1000
_WINDOW_15MIN_MS = 15 * _MINUTE_MS
_WINDOW_24H_MS = 24 * 60 * _MINUTE_MS
MARKET_WHALES_WINDOW_MS = _WINDOW_24H_MS  # "the Nth whale on this market in 24 h"
# Header name prefixes of the limits X reports, by the family name kept in the store.
RATE_LIMIT_HEADERS = {
    "15min": "x-rate-limit",
    "user_24h": "x-user-limit-24hour",
    "app_24h": "x-app-limit-24hour",
}
# No answer from X may hold the poster longer than this: its longest limit window is 24 hours. A reset further
# away (milliseconds instead of seconds, a broken clock, an absurd number) is capped here and logged.
MAX_RESET_AHEAD_MS = 24 * 60 * _MINUTE_MS
# A header number: ASCII digits only (int() would take "٣", "1_0" and 4,000-digit strings), small enough for SQLite.
_HEADER_INT = re.compile(r"[0-9]{1,18}")
# 403 texts that say the account or app may not post at all (as opposed to "not this text").
_PERMISSION_MARKERS = (
    "oauth1-permissions",
    "client-forbidden",
    "client-not-enrolled",
    "unsupported-authentication",
    "not permitted",
    "suspended",
    "locked",
)


class OutcomeKind(enum.StrEnum):
    """The classes of answer the poster acts on; the values are written to the post ledger."""

    POSTED = "posted"
    ALREADY_POSTED = "already_posted"
    RATE_LIMITED = "rate_limited"
    PAUSED = "paused"
    REJECTED = "rejected"
    TRANSIENT = "transient"


@dataclass(frozen=True, slots=True)
class SendResult:
    """What came back from one request: X's answer, or (status None) the error that stood in for one."""

    status: int | None
    headers: Mapping[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A classified answer. `reset_ms`: for rate_limited, when X says the relevant limit lifts (no jitter)."""

    kind: OutcomeKind
    reason: str
    http_status: int | None = None
    tweet_id: str | None = None
    reset_ms: int | None = None


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    text = raw.strip()
    return int(text) if _HEADER_INT.fullmatch(text) else None


def cap_reset_s(reset_s: int | None, now_ms: int) -> int | None:
    """`reset_s`, but never more than `MAX_RESET_AHEAD_MS` after `now_ms`.

    A reset that is a time in milliseconds (it lands within the next 24 h once divided by 1000) is read as one:
    capping it to a whole day would stop posting for a day over a 15-minute limit. Any other far reset is capped.
    """
    if reset_s is None:
        return None
    latest_s = (now_ms + MAX_RESET_AHEAD_MS) // 1000
    if reset_s > latest_s and now_ms - MAX_RESET_AHEAD_MS <= reset_s <= now_ms + MAX_RESET_AHEAD_MS:
        return reset_s // 1000
    return min(reset_s, latest_s)


def parse_rate_limits(headers: Mapping[str, str], now_ms: int) -> list[RateLimitWindow]:
    """The limits an answer reports: 15-minute, and the 24-hour ones when sent (headers in lower case).

    A value that is not a plain non-negative number counts as absent; a reset more than 24 h after `now_ms` is
    capped at 24 h (`unusable_resets` names them, for the log).
    """
    windows = []
    for family, prefix in RATE_LIMIT_HEADERS.items():
        limit = _header_int(headers, f"{prefix}-limit")
        remaining = _header_int(headers, f"{prefix}-remaining")
        reset_s = cap_reset_s(_header_int(headers, f"{prefix}-reset"), now_ms)
        if limit is not None or remaining is not None or reset_s is not None:
            windows.append(RateLimitWindow(family, limit, remaining, reset_s, now_ms))
    return windows


def unusable_resets(headers: Mapping[str, str], now_ms: int) -> dict[str, str]:
    """The reset headers of an answer that `parse_rate_limits` ignored or capped: name -> the value (shortened)."""
    found = {}
    for prefix in RATE_LIMIT_HEADERS.values():
        name = f"{prefix}-reset"
        raw = headers.get(name)
        if raw is None:
            continue
        reset_s = _header_int(headers, name)
        if reset_s is None or cap_reset_s(reset_s, now_ms) != reset_s:
            found[name] = ascii(raw[:40])
    return found


def limit_lifts_at_ms(windows: Sequence[RateLimitWindow]) -> int | None:
    """When a 429 ends: the latest reset among the limits at 0, else the 15-minute reset; None if unknown."""
    exhausted = [w.reset_s for w in windows if w.remaining == 0 and w.reset_s is not None]
    if exhausted:
        return max(exhausted) * 1000
    for window in windows:
        if window.family == "15min" and window.reset_s is not None:
            return window.reset_s * 1000
    return None


def _problem(body: bytes) -> tuple[dict[str, Any] | None, str]:
    """The JSON object of a body (if it is one) and a short human summary of what X said."""
    try:
        data = decode_json(body, max_bytes=MAX_REST_BODY_BYTES) if body.strip() else None
    except DecodeRefused:  # not JSON, or nested to crash a decoder: the text snippet below says enough
        data = None
    if not isinstance(data, dict):
        snippet = " ".join(body.decode("utf-8", "replace").split())
        return None, snippet[:120]
    parts: list[str] = []
    for key in ("title", "detail", "type", "reason"):
        value = data.get(key)
        if isinstance(value, str) and value not in parts:
            parts.append(value)
    errors = data.get("errors")
    if isinstance(errors, list):
        for error in errors:
            if isinstance(error, dict):
                parts.extend(str(error[k]) for k in ("title", "message", "detail") if isinstance(error.get(k), str))
    return data, "; ".join(parts)[:300]


def classify(result: SendResult, *, now_ms: int | None = None) -> Outcome:
    """Map one answer from X (or its absence) to what the poster does; see the table in the module docstring.

    `now_ms` (default: the wall clock) is when the answer came: a rate-limit reset is capped 24 h after it.
    """
    status = result.status
    if status is None:
        return Outcome(OutcomeKind.TRANSIENT, result.error or "no answer")
    data, said = _problem(result.body)
    reason = f"{status} {said}".strip()
    text = said.lower()
    if status in (200, 201):
        inner = data.get("data") if data else None
        tweet_id = inner.get("id") if isinstance(inner, dict) else None
        # A 2xx without an id still means X took the post: resending would only earn a duplicate.
        return Outcome(OutcomeKind.POSTED, "created", status, str(tweet_id) if tweet_id is not None else None)
    if status == 403 and "duplicate content" in text:
        return Outcome(OutcomeKind.ALREADY_POSTED, reason, status)
    if status == 429:
        if "usagecap" in text.replace(" ", ""):
            return Outcome(OutcomeKind.PAUSED, reason, status)
        windows = parse_rate_limits(result.headers, wall_ms() if now_ms is None else now_ms)
        reset_ms = limit_lifts_at_ms(windows)
        return Outcome(OutcomeKind.RATE_LIMITED, reason, status, reset_ms=reset_ms)
    if status in (401, 402):
        return Outcome(OutcomeKind.PAUSED, reason, status)
    if status == 403:
        paused = any(marker in text for marker in _PERMISSION_MARKERS)
        return Outcome(OutcomeKind.PAUSED if paused else OutcomeKind.REJECTED, reason, status)
    if status in (400, 413, 422):
        return Outcome(OutcomeKind.REJECTED, reason, status)
    if status == 408 or status >= 500:
        return Outcome(OutcomeKind.TRANSIENT, reason, status)
    if 400 <= status < 500:
        # An unknown refusal would refuse every post alike: keep the queue and let a human look.
        return Outcome(OutcomeKind.PAUSED, reason, status)
    return Outcome(OutcomeKind.TRANSIENT, reason, status)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Geometric backoff with jitter on top: the n-th wait in a row is `initial_s * factor**(n-1)`, capped, plus up
    to `jitter` of itself."""

    initial_s: float
    max_s: float
    factor: float = 2.0
    jitter: float = 0.2

    def delay_s(self, n: int, rand: float) -> float:
        step_s = capped_step_s(n, initial_s=self.initial_s, cap_s=self.max_s, factor=self.factor)
        return step_s * (1 + self.jitter * rand)


RATE_LIMIT_BACKOFF = Backoff(60.0, 900.0)  # a 429 without a usable reset header
TRANSIENT_BACKOFF = Backoff(5.0, 300.0)  # 8 tries span 10-12 minutes, inside the default MAX_ALERT_AGE_S
RESET_JITTER_S = (1.0, 5.0)  # after a reset X named: at least a second late, spread so restarts do not align
PAUSE_PROBE_S = 1800.0
MAX_FAILURES = 8
# Checkpoint holding the end of a rate-limit or backoff wait, so a restart does not send early. A pause is not
# kept: after a restart (new keys, new credits) one probe at once is what the user wants.
GATE_CHECKPOINT = "x_not_before_ms"


class Transport(Protocol):
    """Sends one post. Never raises for what X or the network does (that is a `SendResult`), only on cancel."""

    dry_run: bool

    async def send(self, alert: Alert, text: str) -> SendResult: ...

    async def close(self) -> None: ...


_TAPPED: ContextVar[list[tuple[aiohttp.ClientResponse, bytes]] | None] = ContextVar("valshi_x_tapped", default=None)


async def _tap(request: aiohttp.ClientRequest, handler: ClientHandlerType) -> aiohttp.ClientResponse:
    """Keep the raw answer for the poster: tweepy raises before handing back an error's headers, and trips over
    bodies that are HTML or empty."""
    response = await handler(request)
    box = _TAPPED.get()
    if box is not None:
        # Read now: once tweepy's `async with` releases the response, its body can no longer be read. A body cut
        # off mid-way raises here, and counts as no answer.
        body = await response.read()
        box.append((response, body))
    return response


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


class XTransport:
    """tweepy's `AsyncClient` as signer and transport, on one long-lived aiohttp session with timeouts."""

    dry_run = False

    def __init__(self, client: Any, session: aiohttp.ClientSession) -> None:
        self._client = client
        self._session = session

    @classmethod
    async def open(
        cls,
        *,
        consumer_key: str,
        consumer_secret: str,
        access_token: str,
        access_token_secret: str,
        timeout_s: float,
        middlewares: Sequence[ClientMiddlewareType] = (),
    ) -> XTransport:
        """`middlewares` run after the signing, inside the tap (tests use one to reach a local server)."""
        import aiohttp  # noqa: PLC0415  (lazy: see the imports)
        from tweepy.asynchronous import AsyncClient  # noqa: PLC0415

        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 10.0)),
            middlewares=(_tap, *middlewares),
        )
        client = AsyncClient(
            consumer_key=consumer_key,
            consumer_secret=consumer_secret,
            access_token=access_token,
            access_token_secret=access_token_secret,
            return_type=aiohttp.ClientResponse,  # the raw answer: headers of successful posts too
            wait_on_rate_limit=False,  # tweepy's waiting ignores daily caps and spins without a header
        )
        client.session = session
        return cls(client, session)

    async def send(self, alert: Alert, text: str) -> SendResult:
        import aiohttp  # noqa: PLC0415  (lazy: see the imports; loaded already by `open`)

        box: list[tuple[aiohttp.ClientResponse, bytes]] = []
        token = _TAPPED.set(box)
        try:
            await self._client.create_tweet(text=text, user_auth=True)
        except Exception as exc:
            # tweepy's own reading of an error body fails in several ways (HTML, empty or non-object JSON); when an
            # answer arrived, the raw answer decides. Without one, only network failures are expected here.
            if not box:
                if isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
                    return SendResult(status=None, error=_describe(exc))
                raise
        finally:
            _TAPPED.reset(token)
        response, body = box[-1]
        headers = {name.lower(): value for name, value in response.headers.items()}
        return SendResult(status=response.status, headers=headers, body=body)

    async def close(self) -> None:
        await self._session.close()


class DryRunTransport:
    """Posts nothing: logs `would_post` with the alert's fields and the text, and answers like a 201."""

    dry_run = True

    async def send(self, alert: Alert, text: str) -> SendResult:
        log.info("would_post", **alert_log_fields(alert), text=text)
        body = msgspec.json.encode({"data": {"id": f"dry-run-{alert.alert_id}", "text": text}})
        return SendResult(status=201, body=body)

    async def close(self) -> None:
        return None


@dataclass(slots=True)
class PosterStats:
    """Counts since start, for the periodic stats line."""

    posted: int = 0
    already_posted: int = 0
    rejected: int = 0
    failed: int = 0
    skipped: int = 0
    filtered: int = 0  # whales the operator's filters left out (issue 18): `would_skip` / `skipped` lines
    rate_limited: int = 0
    transient: int = 0
    paused: bool = False
    last_posted_ms: int | None = None  # wall time of the last post X confirmed
    dry_run: bool = False  # `posted` then counts whales logged as `would_post`: nothing reached X

    def posted_field(self) -> dict[str, int]:
        """`posted` for the stats and stop lines; `would_have_posted` in a dry run, which must not read as posts."""
        return {"would_have_posted" if self.dry_run else "posted": self.posted}

    def lost_fields(self) -> dict[str, int]:
        """Whales that will not go out, for the stats and stop lines: too old when their turn came (`alerts_stale`),
        refused by X or given up after retries (`alerts_failed`), left out by the filters (`alerts_filtered`); each
        also has its own log line with the reason."""
        return {
            "alerts_stale": self.skipped,
            "alerts_failed": self.rejected + self.failed,
            "alerts_filtered": self.filtered,
        }


def _seconds(ms: int) -> float:
    return max(ms, 0) / 1000


def post_renderer(template: str, *, post_links: bool) -> Render:
    """The `render` of a poster: `render_post` with the configured template, and the market's link if asked for."""

    def render(alert: Alert, label: MarketLabel | None) -> str:
        link = None
        if post_links:
            series = label.series_ticker if label is not None and label.series_ticker else series_of(alert.ticker)
            link = market_link(series)
        return render_post(alert, label=label, template=template, link=link)

    return render


class Poster:
    """Posts the outbox to X, one alert at a time; see the module docstring for the rules.

    `render(alert, label)` makes the text; `lookup_label(ticker)` finds the market's title (None: the text
    uses the ticker) and gets `title_budget_s` at most: this wait is the only one (TitleLookup has no timer of
    its own), so a late title is logged once (`title_lookup_late`). `now_ms`, `sleep` and `rand` are injectable
    so tests can check the waits chosen without waiting.
    """

    def __init__(
        self,
        store: Store,
        transport: Transport,
        *,
        render: Render,
        lookup_label: LookupLabel | None = None,
        peek_label: PeekLabel | None = None,
        post_filter: PostFilter | None = None,
        posts_per_15min: int,
        posts_per_24h: int,
        max_alert_age_s: float | None,
        now_ms: Callable[[], int] = wall_ms,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        max_failures: int = MAX_FAILURES,
        pause_probe_s: float = PAUSE_PROBE_S,
        title_budget_s: float = TITLE_BUDGET_S,
    ) -> None:
        self._store = store
        self._transport = transport
        self._render = render
        self._lookup_label = lookup_label
        self._peek_label = peek_label
        self._filter = post_filter or PostFilter()
        self._per_15min = posts_per_15min
        self._per_24h = posts_per_24h
        self._max_age_ms = None if max_alert_age_s is None else int(max_alert_age_s * 1000)
        self._now_ms = now_ms
        self._sleep = sleep
        self._rand = rand
        self._max_failures = max_failures
        self._pause_probe_ms = int(pause_probe_s * 1000)
        self._title_budget_s = title_budget_s
        self.stats = PosterStats(dry_run=transport.dry_run)
        self._gate_ms = 0  # no request before this: a rate limit, a pause or a backoff
        self._paused_reason: str | None = None
        self._limits: dict[str, RateLimitWindow] = {}
        self._rate_limited_streak = 0
        self._transient_streak = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._loaded = False
        self._reset_capped_logged = False

    # --- the daemon's side --------------------------------------------------------------------------------------

    def nudge(self) -> None:
        """Something was enqueued: look at the outbox again."""
        self._wakeup.set()

    async def submit(self, alert: Alert) -> bool:
        """Enqueue `alert` (False if its trades already belong to an alert) and wake the poster."""
        queued = await self._store.enqueue(alert)
        if queued:
            # The filters decide here, before the whale can spend any budget (issue 18); a category not known
            # yet is asked about again after the title lookup (`_compose`).
            label = self._peek_label(alert.ticker) if self._peek_label is not None else None
            final = label is not None or self._lookup_label is None
            if not await self._filtered(alert, label, category_final=final):
                self.nudge()
        return queued

    async def _filtered(self, alert: Alert, label: MarketLabel | None, *, category_final: bool) -> bool:
        """Apply the filters; a whale they leave out is marked skipped and logged with the reason. True if so."""
        verdict = judge(self._filter, alert.ticker, category_of(alert.ticker, label), category_final=category_final)
        if verdict.action != "skip":
            return False
        await self._store.mark_skipped(alert.alert_id, f"filtered: {verdict.reason}")
        self.stats.filtered += 1
        event = "would_skip" if self._transport.dry_run else "skipped"
        log.info(event, **alert_log_fields(alert), reason=verdict.reason)
        return True

    async def run(self) -> None:
        """Post until cancelled (or until `drain` is called and nothing is in flight)."""
        await self._load()
        while not self._stopping:
            self._wakeup.clear()  # before the step: a nudge during it makes the wait below return at once
            delay_s = await self.step()
            if self._stopping:
                break
            if delay_s is None:
                await self._wakeup.wait()
            elif delay_s > 0:
                await self._sleep(delay_s)

    async def drain(self, budget_s: float) -> bool:
        """Take no new alert; wait up to `budget_s` for a request in flight to be settled. False if it was not."""
        self._stopping = True
        self._wakeup.set()
        try:
            async with asyncio.timeout(budget_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # --- one step -----------------------------------------------------------------------------------------------

    async def _load(self) -> None:
        if not self._loaded:
            # What an older version saved from a bad header is capped like a fresh one: a restart must not wait
            # for a reset in the year 58886, or crash writing it down.
            now_ms = self._now_ms()
            saved = await self._store.load_rate_limits()
            self._limits = {w.family: dataclasses.replace(w, reset_s=cap_reset_s(w.reset_s, now_ms)) for w in saved}
            gate = await self._store.get_checkpoint(GATE_CHECKPOINT) or "0"
            gate_ms = int(gate) if _HEADER_INT.fullmatch(gate) else 0
            capped = {w.family for w in saved if w.reset_s != self._limits[w.family].reset_s}
            if gate_ms > now_ms + MAX_RESET_AHEAD_MS:
                capped.add(GATE_CHECKPOINT)
                gate_ms = now_ms + MAX_RESET_AHEAD_MS
            if capped:
                self._log_reset_capped(sorted(capped), source="saved_state")
            self._gate_ms = gate_ms
            self._loaded = True

    def _log_reset_capped(self, what: Sequence[str], *, source: str) -> None:
        """Once per run: X (or a state saved from it) named a wait longer than 24 h, or no usable number."""
        if not self._reset_capped_logged:
            self._reset_capped_logged = True
            log.warning("x_reset_capped", source=source, values=list(what), max_wait_s=MAX_RESET_AHEAD_MS // 1000)

    async def _set_gate(self, until_ms: int, *, persist: bool) -> None:
        self._gate_ms = until_ms
        if persist:
            await self._store.set_checkpoint(GATE_CHECKPOINT, str(until_ms))

    async def step(self) -> float | None:
        """Do at most one post (or skip); return how long to wait before the next step, None for "until nudged"."""
        await self._load()
        now_ms = self._now_ms()
        if now_ms < self._gate_ms:
            return _seconds(self._gate_ms - now_ms)
        item = await self._store.claim_next(now_ms)
        if item is None:
            due_ms = await self._store.next_due_ms()
            return None if due_ms is None else _seconds(due_ms - now_ms)
        fields = alert_log_fields(item.alert)
        age_ms = now_ms - item.alert.first_ts_ms
        if self._max_age_ms is not None and age_ms > self._max_age_ms:
            await self._store.mark_skipped(item.alert_id, f"stale: {age_ms // 1000} s old when its turn came")
            self.stats.skipped += 1
            log.warning(
                "stale_alert_skipped",
                **fields,
                age_s=age_ms // 1000,
                max_alert_age_s=self._max_age_ms // 1000,
                in_doubt=item.in_doubt,
            )
            return 0.0
        if item.failures >= self._max_failures:
            # Only crashes mid-request get here (transient failures are capped when they happen).
            await self._store.mark_failed(item.alert_id, f"gave up after {item.failures} failures: {item.last_error}")
            self.stats.failed += 1
            log.error("post_failed", **fields, failures=item.failures, reason=item.last_error)
            return 0.0
        wait_ms = await self._budget_wait_ms(now_ms)
        if wait_ms > 0:
            self._gate_ms = now_ms + wait_ms
            return _seconds(wait_ms)
        await self._post(item, fields)
        return 0.0

    async def _budget_wait_ms(self, now_ms: int) -> int:
        """How long until a post fits the own caps and the limits X reported; logs the reason when > 0."""
        until_ms, why = 0, ""
        detail: dict[str, int | None] = {}
        sent_ms = await self._store.posts_since(now_ms - _WINDOW_24H_MS + 1)
        recent_ms = [t for t in sent_ms if t > now_ms - _WINDOW_15MIN_MS]
        for cap, window_ms, times, name in (
            (self._per_15min, _WINDOW_15MIN_MS, recent_ms, "X_POSTS_PER_15MIN"),
            (self._per_24h, _WINDOW_24H_MS, sent_ms, "X_POSTS_PER_24H"),
        ):
            if len(times) >= cap:
                frees_ms = times[len(times) - cap] + window_ms  # when the oldest post that fills the cap ages out
                if frees_ms > until_ms:
                    until_ms, why, detail = frees_ms, name, {"cap": cap, "posts_in_window": len(times)}
        for window in self._limits.values():
            if window.remaining == 0 and window.reset_s is not None and window.reset_s * 1000 > now_ms:
                lifts_ms = window.reset_s * 1000 + self._reset_jitter_ms()
                if lifts_ms > until_ms:
                    until_ms, why, detail = lifts_ms, f"x_{window.family}_remaining_0", {"limit": window.limit}
        if until_ms <= now_ms:
            return 0
        log.info("post_budget_wait", reason=why, wait_s=_seconds(until_ms - now_ms), until=utc_iso(until_ms), **detail)
        return until_ms - now_ms

    def _reset_jitter_ms(self) -> int:
        low_s, high_s = RESET_JITTER_S
        return int((low_s + (high_s - low_s) * self._rand()) * 1000)

    async def _compose(self, alert: Alert) -> str | None:
        """The post's text; None when the filters, asked again with the looked-up category, leave it out."""
        label: MarketLabel | None = None
        if self._lookup_label is not None:
            try:
                async with asyncio.timeout(self._title_budget_s):
                    label = await self._lookup_label(alert.ticker)
            except TimeoutError:
                log.info("title_lookup_late", ticker=alert.ticker, budget_s=self._title_budget_s)
            except Exception as exc:
                # The title is a nicety: whatever goes wrong finding it, the whale is posted with its ticker.
                log.warning("title_lookup_failed", ticker=alert.ticker, error=_describe(exc))
        if self._filter.uses_category and await self._filtered(alert, label, category_final=True):
            return None
        # Context from the outbox: how many whales this market had lately (one indexed count, no request).
        whales = await self._store.whales_on_market(alert, MARKET_WHALES_WINDOW_MS)
        return self._render(dataclasses.replace(alert, market_whales_24h=whales), label)

    async def _post(self, item: OutboxItem, fields: dict[str, object]) -> None:
        # The text is fixed at the first attempt: only the very same text makes X's duplicate-403 a proof.
        if item.text is not None:
            text = item.text
        else:
            try:
                composed = await self._compose(item.alert)
            except ValueError as exc:  # render_post's "cannot make a valid post of this"
                await self._store.mark_failed(item.alert_id, f"no valid text: {exc}")
                self.stats.failed += 1
                log.error("post_failed", **fields, failures=item.failures, reason=f"no valid text: {exc}")
                return
            if composed is None:
                return  # filtered out: marked skipped and logged
            text = composed
        if self._stopping:
            return  # drain began while the text was being made: leave the alert pending for the next start
        self._idle.clear()
        try:
            try:
                await self._store.mark_posting(item.alert_id, text)
                sent_ms = self._now_ms()
                result = await self._transport.send(item.alert, text)
            except asyncio.CancelledError:
                # Cut off mid-request (shutdown): X may or may not have the post; the retry's answer will tell.
                # (Queued after `mark_posting` on the store's one thread, so it lands even if that was in progress.)
                await asyncio.shield(
                    self._store.release(item.alert_id, 0, error="cancelled while posting", in_doubt=True)
                )
                raise
            outcome = classify(result, now_ms=self._now_ms())
            # Bookkeeping finishes even if we are cancelled now: the answer is in and must not be lost.
            await asyncio.shield(
                self._settle(item, text=text, fields=fields, sent_ms=sent_ms, result=result, outcome=outcome)
            )
        finally:
            self._idle.set()

    async def _settle(
        self,
        item: OutboxItem,
        *,
        text: str,
        fields: dict[str, object],
        sent_ms: int,
        result: SendResult,
        outcome: Outcome,
    ) -> None:
        now_ms = self._now_ms()
        attempt = Attempt(sent_ms, outcome.kind.value, outcome.http_status, outcome.tweet_id)
        if unusable := unusable_resets(result.headers, now_ms):
            self._log_reset_capped([f"{name}: {raw}" for name, raw in unusable.items()], source="x_answer")
        await self._observe(parse_rate_limits(result.headers, now_ms), posted=outcome.kind is OutcomeKind.POSTED)
        alert_id = item.alert_id
        kind = outcome.kind
        if kind is OutcomeKind.POSTED:
            await self._store.mark_posted(alert_id, outcome.tweet_id, attempt=attempt)
            self.stats.posted += 1
            self.stats.last_posted_ms = now_ms
            self._answered()
            if not self._transport.dry_run:
                log.info("posted", **fields, tweet_id=outcome.tweet_id, attempts=item.attempts + 1, text=text)
        elif kind is OutcomeKind.ALREADY_POSTED:
            await self._store.mark_posted(alert_id, None, attempt=attempt, note=f"already posted: {outcome.reason}")
            self.stats.already_posted += 1
            self._answered()
            log.warning("already_posted", **fields, in_doubt=item.in_doubt, reason=outcome.reason)
        elif kind is OutcomeKind.REJECTED:
            await self._store.mark_failed(alert_id, f"rejected: {outcome.reason}", attempt=attempt)
            self.stats.rejected += 1
            self._answered()
            log.error("post_rejected", **fields, http_status=outcome.http_status, reason=outcome.reason, text=text)
        elif kind is OutcomeKind.RATE_LIMITED:
            self._rate_limited_streak += 1
            self.stats.rate_limited += 1
            if outcome.reset_ms is not None and outcome.reset_ms > now_ms:
                wait_ms, source = outcome.reset_ms - now_ms + self._reset_jitter_ms(), "reset_header"
            else:
                wait_ms = int(RATE_LIMIT_BACKOFF.delay_s(self._rate_limited_streak, self._rand()) * 1000)
                source = "backoff"
            await self._set_gate(now_ms + wait_ms, persist=True)
            await self._store.release(alert_id, self._gate_ms, error=f"rate limited: {outcome.reason}", attempt=attempt)
            log.warning(
                "x_rate_limited",
                alert_id=alert_id,
                wait_s=_seconds(wait_ms),
                until=utc_iso(self._gate_ms),
                source=source,
                in_a_row=self._rate_limited_streak,
                reason=outcome.reason,
            )
        elif kind is OutcomeKind.PAUSED:
            await self._set_gate(now_ms + self._pause_probe_ms, persist=False)
            await self._store.release(alert_id, 0, error=f"paused: {outcome.reason}", attempt=attempt)
            if self._paused_reason is None:
                counts = await self._store.counts()
                log.error(
                    "x_paused",
                    http_status=outcome.http_status,
                    reason=outcome.reason,
                    pending=counts["pending"],
                    probe_every_s=self._pause_probe_ms // 1000,
                    hint="posting stopped; alerts stay queued. Check the X app's plan, credits, keys and permissions",
                )
            else:
                log.info("x_still_paused", reason=outcome.reason, next_probe=utc_iso(self._gate_ms))
            self._paused_reason = outcome.reason
            self.stats.paused = True
        else:
            self._transient_streak += 1
            self.stats.transient += 1
            wait_ms = int(TRANSIENT_BACKOFF.delay_s(self._transient_streak, self._rand()) * 1000)
            await self._set_gate(now_ms + wait_ms, persist=True)
            failures = await self._store.release(
                alert_id,
                self._gate_ms,
                error=f"transient: {outcome.reason}",
                count_failure=True,
                in_doubt=True,  # a request that timed out or hit a 5xx may still have been posted
                attempt=attempt,
            )
            if failures >= self._max_failures:
                await self._store.mark_failed(alert_id, f"gave up after {failures} failures: {outcome.reason}")
                self.stats.failed += 1
                log.error("post_failed", **fields, failures=failures, reason=outcome.reason)
            else:
                log.warning(
                    "x_transient_error",
                    alert_id=alert_id,
                    reason=outcome.reason,
                    failures=failures,
                    wait_s=_seconds(wait_ms),
                )

    def _answered(self) -> None:
        """X answered a post properly: backoffs start over, a pause is over."""
        self._rate_limited_streak = 0
        self._transient_streak = 0
        if self._paused_reason is not None:
            log.warning("x_resumed", was=self._paused_reason)
            self._paused_reason = None
            self.stats.paused = False

    async def _observe(self, windows: list[RateLimitWindow], *, posted: bool) -> None:
        """Keep X's latest limits; a post whose answer lacks a limit's headers still used one of it."""
        now_ms = self._now_ms()
        changed = {w.family: w for w in windows}
        if posted:
            for family, window in self._limits.items():
                live = window.reset_s is not None and window.reset_s * 1000 > now_ms
                if family not in changed and live and window.remaining:
                    changed[family] = RateLimitWindow(
                        family, window.limit, window.remaining - 1, window.reset_s, window.observed_ms
                    )
        if changed:
            self._limits.update(changed)
            await self._store.save_rate_limits(changed.values())
