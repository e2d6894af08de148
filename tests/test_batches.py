"""The queue between the socket reader and the pipeline carries batches, bounded in frames.

What fits is queued, the rest of the batch is dropped and counted frame by frame, and the recovery planner hears
of the drop as it did when frames were queued one at a time: an overflow from the newest trade queued, ended by
the first trade queued after it. The pipeline takes a batch with one read of each clock.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from valshi_x.intake import MAX_FRAMES_PER_TURN, Intake
from valshi_x.pipeline import Pipeline
from valshi_x.recovery.gapwatch import GapWatch
from valshi_x.trades import FUTURE_TOLERANCE_MS, TradeFrame, trade_from_fields
from valshi_x.whales import WhaleDetector

T = 1_796_126_073_000
NOW_MS = T + 10_000


def frame(ts_ms: int, seq: int, *, count: str = "10.00", ticker: str = "KXTEST-1") -> TradeFrame:
    fields = {
        "trade_id": f"id-{seq}",
        "market_ticker": ticker,
        "yes_price_dollars": "0.5000",
        "no_price_dollars": "0.5000",
        "count_fp": count,
        "taker_outcome_side": "yes",
        "is_block_trade": False,
        "ts_ms": ts_ms,
    }
    return TradeFrame("trade", trade_from_fields(fields), 1, seq)


class SpyPlanner:
    """The planner calls the gap watch makes, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.wants_first_trade = False

    def on_gap(self, before_ms: int, after_ms: int, now_ms: int, reason: str = "seq_gap") -> None:
        self.calls.append(("gap", (before_ms - T, after_ms - T)))

    def on_overflow(self, last_queued_ts_ms: int, now_ms: int) -> None:
        self.calls.append(("overflow", last_queued_ts_ms - T))
        self.wants_first_trade = True

    def on_first_trade(self, ts_ms: int, now_ms: int) -> None:
        self.calls.append(("first_trade", ts_ms - T))
        self.wants_first_trade = False


class NoAlerts:
    """The sink of these tests: the small trades make no alert."""

    async def submit(self, alerts: list[Any]) -> None:
        raise AssertionError(f"no alert expected: {alerts}")


def live_intake(queue_frames: int) -> tuple[Intake, GapWatch, SpyPlanner]:
    """The live queue, its gap watch telling a spy planner, and a live pipeline (as the daemon wires them)."""
    spy = SpyPlanner()
    watch = GapWatch(spy, now_ms=lambda: NOW_MS, started_ms=T, wake=lambda: None)  # type: ignore[arg-type]
    detector = WhaleDetector(Decimal(100_000), 1_000, dedup_horizon_ms=60_000)
    intake = Intake(Pipeline(detector, now_ms=lambda: NOW_MS), max_frames=queue_frames, watch=watch)
    return intake, watch, spy


async def test_a_batch_that_does_not_fit_is_cut_and_the_planner_hears_one_overflow() -> None:
    intake, _, spy = live_intake(queue_frames=5)
    intake.enqueue([frame(T + 1_000 + i, seq=1 + i) for i in range(3)])
    intake.enqueue([frame(T + 1_010 + i, seq=4 + i) for i in range(4)])  # two fit, two are dropped
    assert (intake.frames_queued, intake.frames_dropped) == (5, 2)
    assert [[f.seq for f in intake.queue.get_nowait()] for _ in range(2)] == [[1, 2, 3], [4, 5]]
    intake.frames_queued = 0  # (the pipeline's share of the work, done by hand here)
    intake.enqueue([frame(T + 1_020, seq=8)])  # room again: queued, and its time ends the overflow
    assert spy.calls == [("overflow", 1_011), ("first_trade", 1_020)]  # as when frames were queued one by one


async def test_a_batch_with_no_room_at_all_is_dropped_whole() -> None:
    intake, _, spy = live_intake(queue_frames=2)
    intake.enqueue([frame(T + 1_000, seq=1), frame(T + 1_001, seq=2)])
    intake.enqueue([frame(T + 1_002, seq=3)])
    intake.enqueue([frame(T + 1_003, seq=4)])
    assert (intake.frames_queued, intake.frames_dropped, intake.queue.qsize()) == (2, 2, 1)
    assert spy.calls == [("overflow", 1_001), ("overflow", 1_001)]  # the planner keeps one window open


async def test_after_a_seq_gap_the_next_batch_bounds_the_gap() -> None:
    intake, gap_watch, spy = live_intake(queue_frames=100)
    intake.enqueue([frame(T + 1_000, seq=1), frame(T + 1_005, seq=2)])
    assert gap_watch is not None
    gap_watch.on_gap()  # the stream cuts its batch at the gap and calls this before the next one
    intake.enqueue([frame(T + 1_500, seq=9), frame(T + 1_600, seq=10)])
    assert spy.calls == [("gap", (1_005, 1_500))]


async def test_a_backlog_is_worked_off_in_turns_with_the_event_loop_running_between() -> None:
    """The pipeline takes what waits in the queue in one go, but never much more than MAX_FRAMES_PER_TURN: a
    backlog of seconds must not keep the socket unread and Kalshi's pings unanswered until it is all done."""
    intake, _, _ = live_intake(queue_frames=100_000)
    per_batch, batches = 1_000, 5
    for b in range(batches):
        seqs = range(1 + b * per_batch, 1 + (b + 1) * per_batch)
        intake.enqueue([frame(T + 1_000 + seq, seq=seq) for seq in seqs])
    events: list[int | str] = []  # frames per pipeline call, "loop" whenever another task got to run
    on_trades = intake.pipeline.on_trades

    def counted(batch: list[TradeFrame]) -> list[Any]:
        events.append(len(batch))
        return on_trades(batch)

    intake.pipeline.on_trades = counted  # type: ignore[method-assign]

    async def other_task() -> None:
        while True:
            events.append("loop")
            await asyncio.sleep(0)

    other = asyncio.get_running_loop().create_task(other_task())
    await intake.queue.put(None)
    await intake.run(NoAlerts())
    other.cancel()
    assert intake.pipeline.counts.frames == per_batch * batches
    most = run = 0
    for event in events:
        run = 0 if event == "loop" else run + int(event)
        most = max(most, run)
    assert most < MAX_FRAMES_PER_TURN + per_batch  # all 5,000 in one go before the bound


def test_the_pipeline_takes_a_batch_refusing_only_trades_from_the_future() -> None:
    clock_reads: list[int] = []

    def now_ms() -> int:
        clock_reads.append(1)
        return NOW_MS

    detector = WhaleDetector(Decimal(100_000), 1_000, dedup_horizon_ms=60_000, late_fill_horizon_ms=0)
    pipeline = Pipeline(detector, now_ms=now_ms)
    batch = [
        frame(NOW_MS - 500, seq=1, count="120000.00", ticker="KXWHALE-1"),  # $60,000
        frame(NOW_MS + FUTURE_TOLERANCE_MS + 1, seq=2, count="1.00"),  # more than the tolerance ahead
        frame(NOW_MS - 400, seq=3, count="100000.00", ticker="KXWHALE-1"),  # + $50,000: a whale
    ]
    assert pipeline.on_trades(batch) == []
    assert len(clock_reads) == 1  # once per batch
    assert (pipeline.counts.frames, pipeline.counts.trades, pipeline.counts.malformed) == (3, 2, 1)
    (alert,) = pipeline.flush()
    assert alert.value_usd == Decimal("110000.0000")


def _live_pipeline(wall: list[int], mono: list[float]) -> Pipeline:
    detector = WhaleDetector(Decimal(100_000), 1_000, dedup_horizon_ms=60_000)
    return Pipeline(detector, monotonic=lambda: mono[0], now_ms=lambda: wall[0])


def test_a_trade_a_little_ahead_of_the_wall_clock_does_not_close_a_running_sweep_on_arrival() -> None:
    # A whale's fills at T..T+900 ms ($60,000 each: the first two already make a whale), the wall clock at about
    # T+1 s, and between them a trade of another market stamped 2.9 s ahead of it (clock skew: taken).
    wall, mono = [T + 1_000], [0.0]
    pipeline = _live_pipeline(wall, mono)
    whale = [frame(T + i * 300, seq=i + 1, count="120000.00", ticker="KXWHALE-1") for i in range(4)]
    ahead = frame(T + 1_000 + FUTURE_TOLERANCE_MS - 100, seq=9)
    assert pipeline.on_trades([*whale[:2], ahead, *whale[2:]]) == []  # the sweep is still running
    assert pipeline.counts.trades == 5 and pipeline.counts.malformed == 0  # the skewed trade is taken
    wall[0], mono[0] = T + 2_500, 1.5
    (alert,) = pipeline.close_due(100)
    assert (alert.value_usd, alert.fills) == (Decimal("240000.0000"), 4)  # the whole sweep, not its first half
    assert pipeline.detector.late_fills_after_alert == 0


def test_a_host_clock_stepped_back_delays_closing_by_the_tolerance_at_most() -> None:
    # A whale taken live, then the host clock steps back ten minutes (an NTP step, a restored VM): the sweep still
    # closes on the stream clock, held back by FUTURE_TOLERANCE_MS at most, not when the wall clock catches up.
    wall, mono = [T + 300], [0.0]
    pipeline = _live_pipeline(wall, mono)
    assert pipeline.on_trades([frame(T, seq=1, count="300000.00", ticker="KXWHALE-1")]) == []
    wall[0] = T - 600_000
    mono[0] = 1.0
    assert pipeline.stream_now_ms() == T + 1_000 - FUTURE_TOLERANCE_MS
    assert pipeline.close_due(100) == []
    mono[0] = (1_000 + 100 + FUTURE_TOLERANCE_MS + 1) / 1000  # window + grace + the tolerance, and a millisecond
    (alert,) = pipeline.close_due(100)
    assert alert.value_usd == Decimal("150000.0000")
    assert pipeline.detector.processed_through_ms() == T


def test_the_stream_clock_of_close_due_never_passes_the_wall_clock() -> None:
    wall, mono = [T + 1_000], [0.0]
    pipeline = _live_pipeline(wall, mono)
    whale = [frame(T + i * 300, seq=i + 1, count="120000.00", ticker="KXWHALE-1") for i in range(4)]
    assert pipeline.on_trades([frame(T + 1_000 + FUTURE_TOLERANCE_MS - 100, seq=9)]) == []  # the newest trade time
    assert pipeline.on_trades(whale[:2]) == []
    assert pipeline.stream_now_ms() == T + 1_000  # the wall clock, not the skewed trade's time
    assert pipeline.close_due(100) == []
    assert pipeline.on_trades(whale[2:]) == []
    # On time: the skewed trade's group, opened first, does not hold the whale's up until the wall clock passes it.
    wall[0], mono[0] = T + 2_500, 1.5
    (alert,) = pipeline.close_due(100)
    assert (alert.value_usd, alert.fills) == (Decimal("240000.0000"), 4)
    assert pipeline.detector.open_groups == 1  # the skewed trade's, closed once the wall clock has passed it
    wall[0], mono[0] = T + 1_000 + FUTURE_TOLERANCE_MS - 100 + 1_101, 4.0
    assert pipeline.close_due(100) == [] and pipeline.detector.open_groups == 0
