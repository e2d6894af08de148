"""End to end: the whole daemon (dry run, durable state) against a fake exchange whose WebSocket loses trades that
its REST API still has. In every scenario each whale on the tape is reported exactly once, with the value it would
have had if nothing had gone wrong (computed from the tape by a fresh detector over every trade in time order).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog

from tests.fake_exchange import FakeExchange, alert_key, expected_alerts
from tests.fake_kalshi import trade_msg
from valshi_x.config import Settings, load_settings
from valshi_x.daemon import CHECKPOINT_NAME, Daemon, RunOptions
from valshi_x.kalshi.stream import Backoff
from valshi_x.runmode import Tuning
from valshi_x.store import Store, wall_ms
from valshi_x.whales import Alert

UNIT_S = 0.05  # every timing in these tests is a multiple of this
SWEEP_WINDOW_MS = 200
THRESHOLD = Decimal(100_000)
FAST = Tuning(
    reconnect_backoff=Backoff(initial_s=UNIT_S, factor=2.0, cap_s=4 * UNIT_S),
    rejected_backoff=Backoff(initial_s=4 * UNIT_S, factor=2.0, cap_s=8 * UNIT_S),
    ws_ping_interval_s=None,
    rest_pause_initial_s=UNIT_S,
    rest_pause_max_s=4 * UNIT_S,
    backfill_retry_initial_s=UNIT_S,
    backfill_retry_max_s=2 * UNIT_S,
)

Key = tuple[tuple[str, ...], str]


class Tape:
    """Trades to publish, timed by the wall clock (the backfill asks REST up to "now")."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._last_ms = 0
        self.offset_ms = 0  # trades made this long before (negative) the wall clock

    def ts(self) -> int:
        # Never ahead of the wall clock (REST is asked up to "now"); many trades may share a millisecond.
        self._last_ms = max(self._last_ms, wall_ms() + self.offset_ms)
        return self._last_ms

    def back_to(self, ms_ago: int) -> None:
        self.offset_ms = -ms_ago
        self._last_ms = 0

    def small(self, n: int = 1) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            i = next(self._ids)
            out.append(trade_msg(ticker=f"KXSMALL-{i % 11}", count="10.00", ts_ms=self.ts(), trade_id=f"small-{i}"))
        return out

    def sweep(
        self, ticker: str, fills: int = 4, contracts: str = "70000.00", price: str = "0.4000"
    ) -> list[dict[str, Any]]:
        """`fills` fills of one order 20 ms apart; 4 x 70,000 x $0.40 = $112,000, none a whale alone."""
        base = self.ts()
        self._last_ms = base + 20 * (fills - 1)
        return [
            trade_msg(ticker=ticker, count=contracts, yes_price=price, ts_ms=base + 20 * k, trade_id=f"{ticker}-f{k}")
            for k in range(fills)
        ]

    def single(self, ticker: str, contracts: str = "250000.00", price: str = "0.6000") -> dict[str, Any]:
        return trade_msg(ticker=ticker, count=contracts, yes_price=price, ts_ms=self.ts(), trade_id=f"{ticker}-1")


def settings_for(exchange: FakeExchange, **extra: str) -> Settings:
    env = {
        "KALSHI_WS_URL": exchange.ws_url,
        "KALSHI_API_URL": exchange.rest_url,
        "STATS_INTERVAL_S": "3600",
        "SWEEP_WINDOW_MS": str(SWEEP_WINDOW_MS),
        **extra,
    }
    return load_settings(env, need_x=False)


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - captured log lines and daemon counters have no event to wait on
            await asyncio.sleep(UNIT_S / 5)


@dataclass
class Run:
    """The daemons of one scenario (one after another on the same state dir) and what they logged."""

    exchange: FakeExchange
    state_dir: Path
    logs: list[dict[str, Any]]
    env: dict[str, str] = field(default_factory=dict)
    daemon: Daemon | None = None
    task: asyncio.Task[None] | None = None

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e["event"] == name]

    def posted(self) -> list[Key]:
        return [alert_key(e["trade_ids"], e["value_usd"]) for e in self.events("would_post")]

    async def start(self) -> Daemon:
        settings = settings_for(self.exchange, **self.env)
        options = RunOptions(dry_run=True, state_dir=self.state_dir, lookup_titles=False)
        self.daemon = Daemon(settings, options, tuning=FAST)
        self.task = asyncio.create_task(self.daemon.run())
        await self.exchange.wait_subscribed()
        return self.daemon

    async def stop(self) -> None:
        assert self.daemon is not None and self.task is not None
        self.daemon.stop.set()
        async with asyncio.timeout(40 * UNIT_S):
            await self.task
        self.daemon = self.task = None

    async def kill(self) -> None:
        """Stop without the staged shutdown: nothing flushed, no checkpoint saved (the kill -9 of a test)."""
        assert self.daemon is not None and self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.daemon = self.task = None

    async def settle(self, expected: list[Key], timeout_s: float = 20.0) -> None:
        """Wait until every expected whale was posted and no backfill is pending."""

        def done() -> bool:
            pending = self.daemon.recovery.pending if self.daemon is not None else 0
            return set(expected) <= set(self.posted()) and pending == 0

        try:
            await wait_until(done, timeout_s)
        except TimeoutError:
            missing = sorted(set(expected) - set(self.posted()))
            seen = [e for e in self.logs if e["event"].startswith(("backfill", "ws_", "would_post", "alert_", "stale"))]
            raise AssertionError(f"not posted: {missing}; events: {seen}") from None
        await asyncio.sleep(4 * UNIT_S)  # anything extra (a partial sweep posted twice) would show up by now


@asynccontextmanager
async def scenario(tmp_path: Path, **env: str) -> AsyncIterator[Run]:
    with structlog.testing.capture_logs() as logs:
        async with FakeExchange(ping_interval_s=4 * UNIT_S) as exchange:
            run = Run(exchange, tmp_path / "state", logs, env)
            try:
                yield run
            finally:
                if run.task is not None:
                    run.task.cancel()
                    await asyncio.gather(run.task, return_exceptions=True)


def expected_keys(exchange: FakeExchange) -> list[Key]:
    return sorted(keys_of(expected_alerts(exchange.tape, THRESHOLD, SWEEP_WINDOW_MS)))


def keys_of(alerts: list[Alert]) -> list[Key]:
    return [alert_key(a.trade_ids, a.value_usd) for a in alerts]


async def assert_exactly_once(run: Run, expected: list[Key], *, whales_on_tape: int) -> None:
    """Each expected whale posted once, nothing else posted, and the outbox holds exactly those alerts."""
    assert len(expected) == whales_on_tape, "the scenario's tape does not hold the whales it planted"
    posted = run.posted()
    assert sorted(posted) == expected
    trade_owners = Counter(t for ids, _ in posted for t in ids)
    assert all(n == 1 for n in trade_owners.values())
    store = await Store.open(run.state_dir / "valshi-x.sqlite3")
    try:
        items = await store.recent(10_000)
    finally:
        await store.close()
    assert sorted(alert_key(i.alert.trade_ids, i.alert.value_usd) for i in items) == expected
    assert {i.status for i in items} <= {"posted"}


async def publish(
    exchange: FakeExchange, msgs: list[dict[str, Any]], *, lost: Callable[[str], bool] | None = None
) -> None:
    for msg in msgs:
        await exchange.publish(msg, lost=lost(msg["trade_id"]) if lost is not None else False)
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------------- scenarios


async def test_frames_lost_in_seq_gaps_are_recovered(tmp_path: Path) -> None:
    tape = Tape()
    async with scenario(tmp_path) as run:
        await run.start()
        sweep_a, sweep_b = tape.sweep("KXWHALE-A"), tape.sweep("KXWHALE-B", fills=3, contracts="90000.00")
        lone = tape.single("KXWHALE-C")
        trades = tape.small(150) + sweep_a + tape.small(100) + [lone] + tape.small(100) + sweep_b + tape.small(50)
        # About 1 frame in 40 lost, and with them a fill of each sweep and the whole lone whale.
        lost_ids = {t["trade_id"] for t in trades[::40]} | {"KXWHALE-A-f1", "KXWHALE-B-f2", "KXWHALE-C-1"}
        await publish(run.exchange, trades, lost=lambda trade_id: trade_id in lost_ids)
        expected = expected_keys(run.exchange)
        await run.settle(expected)
        stream = run.daemon.stream if run.daemon else None
        assert stream is not None and stream.gaps >= 10 and stream.frames_missing == len(lost_ids)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=3)
        assert run.exchange.lost == len(lost_ids)
        assert run.events("backfill_done") and not run.events("backfill_incomplete")


async def test_a_gap_noticed_only_after_the_sweep_closed_still_completes_it(tmp_path: Path) -> None:
    """A quiet market: the last fill of a sweep is lost and the next frame comes after the window has closed."""
    tape = Tape()
    async with scenario(tmp_path) as run:
        await run.start()
        sweep = tape.sweep("KXWHALE-QUIET")  # 4 x $28k
        await publish(run.exchange, tape.small(20) + sweep, lost=lambda trade_id: trade_id == "KXWHALE-QUIET-f3")
        # Nothing for a while: the $84k part closes on the clock, short of the threshold, before the gap shows.
        await asyncio.sleep((SWEEP_WINDOW_MS / 1000) + 6 * UNIT_S)
        await publish(run.exchange, tape.small(20))
        expected = expected_keys(run.exchange)
        assert expected == [(tuple(f"KXWHALE-QUIET-f{k}" for k in range(4)), "112000.00")]
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=1)
        assert run.daemon is None and run.events("backfill_done")


async def test_server_closes_mid_sweep(tmp_path: Path) -> None:
    tape = Tape()
    async with scenario(tmp_path) as run:
        await run.start()
        sweep = tape.sweep("KXWHALE-A", fills=3, contracts="95000.00")  # 3 x $38k = $114k
        await publish(run.exchange, tape.small(50) + sweep[:1])
        run.exchange.refuse()
        await run.exchange.close(1011, "internal error")
        await publish(run.exchange, sweep[1:] + tape.small(20))  # the rest of the sweep, while nobody listens
        await asyncio.sleep(2 * UNIT_S)
        run.exchange.accept()
        await run.exchange.wait_subscribed()
        await publish(run.exchange, tape.small(50))
        expected = expected_keys(run.exchange)
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=1)
        assert run.exchange.cuts == 1


async def test_a_sweep_split_by_a_disconnect_is_one_alert_with_the_full_value(tmp_path: Path) -> None:
    tape = Tape()
    async with scenario(tmp_path) as run:
        await run.start()
        sweep = tape.sweep("KXWHALE-SPLIT")  # 4 x $28k
        await publish(run.exchange, tape.small(30) + sweep[:2])
        run.exchange.refuse()
        await run.exchange.cut()
        await publish(run.exchange, sweep[2:])
        await asyncio.sleep(6 * UNIT_S)  # well past the sweep window and the close grace
        run.exchange.accept()
        await run.exchange.wait_subscribed()
        await publish(run.exchange, tape.small(30))
        expected = expected_keys(run.exchange)
        assert expected == [(tuple(f"KXWHALE-SPLIT-f{k}" for k in range(4)), "112000.00")]
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=1)
        sent = run.exchange.sent_ids
        assert {"KXWHALE-SPLIT-f0", "KXWHALE-SPLIT-f1"} <= sent and not {"KXWHALE-SPLIT-f2", "KXWHALE-SPLIT-f3"} & sent


async def test_connections_refused_for_a_while_as_trading_goes_on(tmp_path: Path) -> None:
    """The 40 s outage of the issue, scaled down: 30 units of refused handshakes, whales made meanwhile."""
    tape = Tape()
    async with scenario(tmp_path) as run:
        await run.start()
        await publish(run.exchange, tape.small(40))
        run.exchange.refuse(503)
        await run.exchange.cut()
        for k in range(6):
            await publish(run.exchange, tape.small(30))
            if k in (1, 4):
                await publish(run.exchange, tape.sweep(f"KXWHALE-OUT{k}"))
            await asyncio.sleep(5 * UNIT_S)
        refused = [h for h in run.exchange.ws.handshakes if h.status == 503]
        assert len(refused) >= 3
        run.exchange.accept()
        await run.exchange.wait_subscribed()
        await publish(run.exchange, [*tape.small(40), tape.single("KXWHALE-AFTER"), *tape.small(10)])
        expected = expected_keys(run.exchange)
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=3)
        assert run.exchange.undelivered == 6 * 30 + 2 * 4  # every trade of the outage came by REST


async def test_restart_between_two_whales_posts_each_once(tmp_path: Path) -> None:
    tape = Tape()
    async with scenario(tmp_path) as run:
        await run.start()
        await publish(run.exchange, tape.small(40) + tape.sweep("KXWHALE-1") + tape.small(40))
        first = expected_keys(run.exchange)
        await run.settle(first)
        await run.stop()
        checkpoints = [e for e in run.logs if e["event"] == "daemon_stopped"]
        assert checkpoints  # the first daemon stopped cleanly (and saved where to resume)
        # Down: trading goes on, with a whale nobody's socket sees.
        await publish(run.exchange, tape.small(40) + tape.sweep("KXWHALE-2") + tape.small(40))
        await run.start()
        await publish(run.exchange, tape.small(40))
        expected = expected_keys(run.exchange)
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=2)
        # The start-up backfill reached back over the first whale too: regrouped, and refused by the outbox.
        assert any(e["event"] == "backfill_done" and "startup" in e["reasons"] for e in run.logs)
        assert run.events("alert_overlaps_existing")


async def test_killed_before_the_first_periodic_checkpoint_still_resumes(tmp_path: Path) -> None:
    """A first start writes a checkpoint at once: a crash in the first seconds must not lose its downtime."""
    tape = Tape()
    async with scenario(tmp_path) as run:
        await run.start()
        await publish(run.exchange, tape.small(20))
        await run.kill()  # long before the 10 s checkpoint tick
        await publish(run.exchange, tape.small(20) + tape.sweep("KXWHALE-WHILE-DOWN") + tape.small(20))
        await run.start()
        await publish(run.exchange, tape.small(20))
        expected = expected_keys(run.exchange)
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=1)
        stopped = run.events("daemon_stopped")[-1]
        assert stopped["whales_from_backfill"] == 1  # the stream never saw it
        assert run.events("whale_recovered_by_backfill")


async def test_rest_pages_over_several_cursors(tmp_path: Path) -> None:
    tape = Tape()
    async with scenario(tmp_path) as run:
        await run.start()
        await publish(run.exchange, tape.small(20))
        run.exchange.refuse()
        await run.exchange.cut()
        missed = tape.small(1200) + tape.sweep("KXWHALE-P1") + tape.small(1200) + [tape.single("KXWHALE-P2")]
        await publish(run.exchange, [*missed, *tape.small(300)])
        await run.exchange.ws.wait_for(lambda: any(h.status == 503 for h in run.exchange.ws.handshakes))
        run.exchange.accept()
        await run.exchange.wait_subscribed()
        await publish(run.exchange, tape.small(20))
        expected = expected_keys(run.exchange)
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=2)
        with_cursor = [r for r in run.exchange.rest.requests if r.route == "trades" and r.query.get("cursor")]
        assert len(with_cursor) >= 2
        stopped = run.events("daemon_stopped")[-1]
        assert stopped["backfill_pages"] >= len(with_cursor) + 1  # every page counted, the first ones too
        assert (stopped["backfill_uncovered_s"], stopped["sweeps_forgotten_early"]) == (0, 0)


async def test_rest_answers_429_and_503_before_succeeding(tmp_path: Path) -> None:
    tape = Tape()
    async with scenario(tmp_path) as run:
        await run.start()
        run.exchange.rest.script("trades", 429, 503)
        sweep = tape.sweep("KXWHALE-R")
        trades = tape.small(60) + sweep + tape.small(60)
        await publish(run.exchange, trades, lost=lambda trade_id: trade_id in {"KXWHALE-R-f0", "KXWHALE-R-f3"})
        expected = expected_keys(run.exchange)
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=1)
        # One retry layer: the client tried once, the backfill tried the failed slice again.
        retries = [e for e in run.logs if e["event"] == "backfill_retry"]
        assert sorted(r["status"] for r in retries) == [429, 503]


async def test_whales_found_too_late_are_logged_as_stale_not_posted(tmp_path: Path) -> None:
    tape = Tape()
    async with scenario(tmp_path, MAX_ALERT_AGE_S="20") as run:
        now_ms = wall_ms()
        store = await Store.open(run.state_dir / "valshi-x.sqlite3")
        await store.set_checkpoint(CHECKPOINT_NAME, str(now_ms - 120_000))  # down for two minutes
        await store.close()
        tape.back_to(90_000)
        old = [*tape.small(10), tape.single("KXWHALE-OLD"), *tape.small(10)]  # 90 s ago: too old to post
        tape.back_to(5_000)
        fresh = [*tape.small(10), *tape.sweep("KXWHALE-FRESH"), *tape.small(10)]  # 5 s ago: still fresh
        await publish(run.exchange, old + fresh)
        tape.back_to(0)
        await run.start()
        await publish(run.exchange, tape.small(20))
        expected = expected_keys(run.exchange)
        stale_key = alert_key(["KXWHALE-OLD-1"], "150000.00")
        assert stale_key in expected and len(expected) == 2
        await run.settle([k for k in expected if k != stale_key])
        try:
            await wait_until(lambda: bool(run.events("stale_alert_skipped")), 10 * UNIT_S)
        except TimeoutError:
            raise AssertionError(str([e for e in run.logs if e["log_level"] != "debug"])) from None
        await run.stop()
        assert run.posted() == [k for k in expected if k != stale_key]
        skipped = run.events("stale_alert_skipped")
        assert [alert_key(e["trade_ids"], e["value_usd"]) for e in skipped] == [stale_key]
        assert skipped[0]["age_s"] >= 80
        stopped = run.events("daemon_stopped")[-1]
        assert (stopped["alerts_stale"], stopped["alerts_failed"]) == (1, 0)  # the stop line counts it too


async def test_steady_lost_frames_at_a_high_rate_every_whale_exactly_once(tmp_path: Path) -> None:
    """0.2% of frames lost at random through a fast tape, plus a fill of each sweep: each whale once, whole."""
    tape = Tape()
    rng = random.Random(8)
    async with scenario(tmp_path) as run:
        await run.start()
        trades: list[dict[str, Any]] = []
        for k in range(6):
            trades += tape.small(500) + tape.sweep(f"KXWHALE-S{k}") + tape.small(30) + [tape.single(f"KXWHALE-L{k}")]
        trades += tape.small(100)
        lost_ids = {t["trade_id"] for t in trades if rng.random() < 0.002} | {f"KXWHALE-S{k}-f2" for k in range(6)}
        await publish(run.exchange, trades, lost=lambda trade_id: trade_id in lost_ids)
        expected = expected_keys(run.exchange)
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=12)
        assert run.exchange.lost == len(lost_ids) >= 6
        stopped = run.events("daemon_stopped")[-1]
        # The windows are the gaps' spans, not "from the gap to now": the tape is processed about once.
        assert stopped["trades"] <= 1.5 * len(trades)
        assert not run.events("backfill_incomplete")
        # Each gap opened a window (fetched, given up or still pending) or merged into one still waiting: the stop
        # line accounts for every one of them.
        windows = stopped["backfill_windows"] + stopped["backfill_failures"] + stopped["backfill_pending"]
        assert windows + stopped["backfill_merged"] >= stopped["gaps"] >= 6


async def test_rest_down_while_the_socket_delivers(tmp_path: Path) -> None:
    """REST answers 503 to everything: a whale the socket brought is alerted when its hold ends, not when REST
    is back; a whale only REST has is alerted once REST is back; nothing twice."""
    tape = Tape()
    async with scenario(tmp_path, HOLD_MAX_S=str(10 * UNIT_S)) as run:
        await run.start()
        run.exchange.rest.down_status = 503
        seen = tape.sweep("KXWHALE-SOCKET")
        only_rest = tape.single("KXWHALE-REST")
        trades = [*tape.small(60), *seen, *tape.small(2), only_rest, *tape.small(60)]
        lost = {only_rest["trade_id"], trades[64]["trade_id"]}  # a gap right after the sweep, and the lone whale
        await publish(run.exchange, trades, lost=lambda trade_id: trade_id in lost)
        seen_key = (tuple(t["trade_id"] for t in seen), "112000.00")
        try:
            await wait_until(lambda: seen_key in run.posted(), 100 * UNIT_S)
        except TimeoutError:
            raise AssertionError(str([e for e in run.logs if e["event"] != "backfill_retry"])) from None
        assert run.exchange.rest.down_status == 503 and run.posted() == [seen_key]  # while REST is still down
        (unconfirmed,) = run.events("alert_unconfirmed")
        assert unconfirmed["alert_id"] == "KXWHALE-SOCKET-f0"
        assert run.events("backfill_retry")  # the backfill keeps trying meanwhile
        run.exchange.rest.down_status = None
        await publish(run.exchange, tape.small(20))
        expected = expected_keys(run.exchange)
        await run.settle(expected)
        await run.stop()
        await assert_exactly_once(run, expected, whales_on_tape=2)
        assert not run.events("backfill_incomplete")
        stopped = run.events("daemon_stopped")[-1]
        # The stop line says the hold ran out before REST came back, and that nothing stayed uncovered.
        assert stopped["holds_expired"] >= 1 and stopped["alerts_unconfirmed"] == 1
        assert stopped["backfill_uncovered_s"] == 0
