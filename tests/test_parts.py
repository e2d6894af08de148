"""The run's parts on their own, without a Daemon: recovery's stall watch, feed and checkpoint, the alert sink's
low-water mark, and the stats line's order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import structlog

from tests.fake_kalshi_rest import rest_trade as fake_rest_trade
from valshi_x.config import Settings
from valshi_x.pipeline import Pipeline
from valshi_x.recovery.planner import RecoveryPlanner
from valshi_x.recovery.recovery import NoRecovery, Recovery
from valshi_x.runmode import Tuning
from valshi_x.sink import AlertSink
from valshi_x.telemetry import Telemetry
from valshi_x.whales import Alert, WhaleDetector

UNIT_S = 0.05
T = 1_796_126_073_000
STALL_S = 4 * UNIT_S


def alert(name: str, first_ts_ms: int) -> Alert:
    return Alert(
        trade_ids=(f"{name}-a", f"{name}-b"),
        ticker="KXTEST-1",
        side="yes",
        contracts=Decimal(300_000),
        value_usd=Decimal(150_000),
        fills=2,
        price_low=Decimal("0.5000"),
        price_high=Decimal("0.5000"),
        is_block_trade=False,
        first_ts_ms=first_ts_ms,
        last_ts_ms=first_ts_ms + 20,
    )


def rest_trade(trade_id: str, ts_ms: int, count: str) -> dict[str, Any]:
    return fake_rest_trade(trade_id, "KXTEST-1", ts_ms=ts_ms, count=count)


def recovery_for(now_ms: list[int], clock_s: Callable[[], float] = lambda: 0.0) -> Recovery:
    planner = RecoveryPlanner(hold_max_ms=5_000)
    detector = WhaleDetector(Decimal(100_000), 1_000, dedup_horizon_ms=600_000, gate=planner)
    pipeline = Pipeline(detector, now_ms=lambda: now_ms[0])
    settings = Settings(stall_resubscribe_s=STALL_S)
    return Recovery(
        planner,
        pipeline,
        settings,
        Tuning(),
        dedup_horizon_ms=600_000,
        started_ms=T,
        now_ms=lambda: now_ms[0],
        monotonic=clock_s,
    )


async def wait_for(done: Callable[[], bool], timeout_s: float = 40 * UNIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not done():  # noqa: ASYNC110
            await asyncio.sleep(UNIT_S / 5)


class FakeStream:
    """Connected, but no trade comes: the stall watch's view of a silent subscription."""

    def __init__(self) -> None:
        self.connected_since: datetime | None = datetime.now(UTC)
        self.connected_at_monotonic: float | None = 0.0
        self.calls: list[str] = []

    async def resubscribe(self) -> bool:
        self.calls.append("resubscribe")
        return True

    async def reconnect(self, reason: str) -> None:
        self.calls.append(f"reconnect: {reason}")


async def test_the_stall_watch_resubscribes_then_reconnects_and_a_queued_batch_counts_as_a_trade() -> None:
    clock = [0.0]
    reads = [0]

    def monotonic() -> float:
        reads[0] += 1
        return clock[0]

    def ticks_after(n: int) -> Callable[[], bool]:
        target = reads[0] + n
        return lambda: reads[0] >= target

    recovery = recovery_for([T + 10_000], monotonic)
    stream = FakeStream()
    with structlog.testing.capture_logs() as logs:
        watch = asyncio.create_task(recovery.stall_watch(stream))
        try:
            clock[0] = STALL_S * 0.75
            recovery.queued(T + 9_000, T + 9_000)  # a trade just now: the quiet span starts again
            clock[0] = STALL_S * 1.5
            await wait_for(ticks_after(3))  # a few ticks of the watch have looked
            assert stream.calls == [] and recovery.stall_resubscribes == 0
            clock[0] = STALL_S * 2  # quiet for longer than the limit
            await wait_for(lambda: len(stream.calls) == 1)
            assert stream.calls == ["resubscribe"] and recovery.stall_resubscribes == 1
            assert recovery.pending == 1  # the quiet span is fetched back, in case trades did happen
            clock[0] = STALL_S * 3  # still nothing, a whole limit after the resubscribe
            await wait_for(lambda: len(stream.calls) == 2)
            assert stream.calls[1] == "reconnect: no trades after resubscribing"
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
    stalls = [(e["action"], e["log_level"]) for e in logs if e["event"] == "trade_stall"]
    assert stalls == [("resubscribe", "warning"), ("reconnect", "warning")]


async def test_fed_trades_skip_what_the_socket_brought_and_a_whale_only_rest_had_counts_as_recovered() -> None:
    now_ms = [T + 10_000]
    recovery = recovery_for(now_ms)
    sink = Collect()
    # The socket brought t1 ($60,000 of a sweep); REST lists t1 again and t2, the fill the socket lost.
    recovery.pipeline.on_rest_trade(rest_trade("t1", T + 1_000, "120000.00"))
    fed = [rest_trade("t1", T + 1_000, "120000.00"), rest_trade("t2", T + 1_200, "100000.00")]
    assert await recovery.feed(sink, fed) == 0  # the sweep is still open
    assert recovery.trades_already_seen == 1
    (whale,) = recovery.pipeline.flush()
    assert whale.trade_ids == ("t1", "t2")
    with structlog.testing.capture_logs() as logs:
        recovery.entering_outbox(whale)
    assert recovery.whales_from_backfill == 1
    assert [e["event"] for e in logs] == ["whale_recovered_by_backfill"]


async def test_the_resume_point_stays_before_a_window_not_fetched_and_an_alert_on_its_way() -> None:
    now_ms = [T + 10_000]
    recovery = recovery_for(now_ms)
    recovery.pipeline.on_rest_trade(rest_trade("t1", T + 5_000, "10.00"))
    recovery.pipeline.close_due(0)
    through = recovery.resume_point_ms(None)
    assert through >= T + 4_000
    recovery.planner.on_gap(T + 2_000, T + 3_000, now_ms[0])  # a window from T + 1 s (its margin) on
    assert recovery.resume_point_ms(None) == T + 1_000 - 1
    assert recovery.resume_point_ms(T + 500) == T + 500 - 1  # the sink's low-water mark is older still
    assert NoRecovery().resume_point_ms(T) == 0  # a replay keeps no checkpoint


class Collect:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    async def submit(self, alerts: list[Alert]) -> None:
        self.alerts.extend(alerts)


class GatedPoster:
    """Takes alerts into an outbox that answers when told; refuses the ids it is told to."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.taken: list[str] = []

    async def submit(self, alert: Alert) -> bool:
        self.entered.set()
        await self.release.wait()
        self.taken.append(alert.alert_id)
        return alert.alert_id not in self.refuse


async def test_the_sink_holds_the_checkpoint_before_its_oldest_alert_until_the_batch_is_in() -> None:
    poster = GatedPoster(refuse={"b-a"})
    sink = AlertSink(poster, NoRecovery(), drive_poster=False)  # type: ignore[arg-type]
    assert sink.oldest_in_flight_ms() is None
    batch = [alert("a", T + 2_000), alert("b", T + 1_000)]
    submitting = asyncio.create_task(sink.submit(batch))
    await asyncio.wait_for(poster.entered.wait(), 20 * UNIT_S)
    assert sink.oldest_in_flight_ms() == T + 1_000  # the oldest of the batch, not the one going in now
    poster.release.set()
    await asyncio.wait_for(submitting, 20 * UNIT_S)
    assert sink.oldest_in_flight_ms() is None
    assert poster.taken == ["a-a", "b-a"]
    assert sink.stats_fields() == {"alerts_refused": 1}


class Part:
    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def stats_fields(self) -> dict[str, Any]:
        return self.fields


def test_the_stats_line_keeps_its_order_whichever_part_gives_a_field() -> None:
    parts = [
        Part({"queue_depth": 0, "frames_dropped": 0}),
        Part({"title_lookups": 3}),
        Part({"stall_resubscribes": 0, "backfill_windows": 1}),
        Part({"reconnects": 1, "gaps": 2, "frames_missing": 3, "last_frame_age_s": 0.5}),
        Part({"alerts_refused": 0}),
        Part({"frames": 10, "trades": 9, "alerts": 1, "late_fills_rejoined": 0}),
        Part({"posted": 1, "alerts_stale": 0}),
    ]
    telemetry = Telemetry(parts, monotonic=lambda: 12.34, started_at_s=2.0)
    assert list(telemetry.fields()) == [
        *("frames", "trades", "alerts", "alerts_refused", "posted", "alerts_stale", "reconnects", "gaps"),
        *("late_fills_rejoined", "stall_resubscribes", "frames_missing", "queue_depth", "frames_dropped"),
        *("last_frame_age_s", "uptime_s", "backfill_windows", "title_lookups"),
    ]
    assert telemetry.fields()["uptime_s"] == 10.3


async def test_no_recovery_fetches_holds_and_saves_nothing() -> None:
    none = NoRecovery()
    assert none.gate is None and none.pending == 0
    assert await none.start(None, None, None, None) == {}  # type: ignore[arg-type]
    assert none.stats_fields() == {"stall_resubscribes": 0}
