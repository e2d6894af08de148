"""The recovery planner's table: each row is a story of stream events and what the planner must answer after it.

Pure code, no loop: trade times are `T + offset` ms, the host's wall clock is `N + offset` ms.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from valshi_x.recovery.gapwatch import GapWatch
from valshi_x.recovery.planner import CLOCK_SLACK_MS, RecoveryPlanner

T = 1_800_000_000_000  # trade time origin
N = T + 50  # the host's clock, a little behind Kalshi's

Event = tuple[str, tuple[Any, ...]]


def gap(before: int, after: int, now: int) -> Event:
    return ("on_gap", (T + before, T + after, N + now))


def disconnect(last: int, now: int) -> Event:
    return ("on_disconnect", (T + last, N + now))


def subscribed(now: int) -> Event:
    return ("on_subscribed", (N + now,))


def first_trade(ts: int, now: int) -> Event:
    return ("on_first_trade", (T + ts, N + now))


def overflow(last_queued: int, now: int) -> Event:
    return ("on_overflow", (T + last_queued, N + now))


def startup(checkpoint: int, now: int) -> Event:
    return ("on_startup", (T + checkpoint, N + now))


def tick(now: int) -> Event:
    return ("tick", (N + now,))


@dataclass
class Row:
    name: str
    events: list[Event]
    due_at: int  # ask for due windows at N + this
    windows: list[tuple[int, int]]  # (from, to) relative to T, oldest first
    not_due_before: int | None = None  # and none of them is due at N + this
    reasons: list[tuple[str, ...]] = field(default_factory=list)


ROWS = [
    Row(
        "a gap between two frames: one second either side, fetched once REST lists the lost trades",
        [gap(1_000, 1_040, now=1_040)],
        due_at=1_540,
        not_due_before=1_539,
        windows=[(0, 2_040)],
        reasons=[("seq_gap",)],
    ),
    Row(
        "overlapping gaps merge into one window, fetched at most merge_max after the first",
        [gap(1_000, 1_040, now=1_040), gap(1_300, 1_310, now=1_310), gap(1_900, 1_950, now=1_950)],
        due_at=2_040,
        not_due_before=2_039,
        windows=[(0, 2_950)],
    ),
    Row(
        "a gap after the first window stopped merging is a window of its own",
        [gap(1_000, 1_040, now=1_040), gap(1_900, 1_950, now=2_100)],
        due_at=2_600,
        windows=[(0, 2_040), (900, 2_950)],
    ),
    Row(
        "gaps far apart are separate windows",
        [gap(1_000, 1_040, now=1_040), gap(9_000, 9_001, now=9_001)],
        due_at=9_600,
        windows=[(0, 2_040), (8_000, 10_001)],
    ),
    Row(
        "a reconnect: from the last trade seen to the first trade after subscribing",
        [disconnect(5_000, now=5_010), subscribed(now=8_000), first_trade(8_100, now=8_100)],
        due_at=8_600,
        not_due_before=8_599,
        windows=[(4_000, 9_100)],
        reasons=[("reconnect",)],
    ),
    Row(
        "a gap on the first frame after resubscribing: a window of its own beside the reconnect's",
        [
            disconnect(5_000, now=5_010),
            subscribed(now=8_000),
            gap(7_990, 8_100, now=8_100),  # the stream reports the gap before the frame is queued
            first_trade(8_100, now=8_100),
        ],
        due_at=8_600,
        windows=[(4_000, 9_100), (6_990, 9_100)],
        reasons=[("reconnect",), ("seq_gap",)],
    ),
    Row(
        "a gap soon after a reconnect merges into its window, not yet fetched",
        [
            disconnect(5_000, now=5_010),
            subscribed(now=8_000),
            first_trade(8_100, now=8_100),
            gap(8_100, 8_300, now=8_300),
        ],
        due_at=8_800,
        windows=[(4_000, 9_300)],
        reasons=[("reconnect", "seq_gap")],
    ),
    Row(
        "a quiet market after subscribing: the window ends at now plus the clock slack",
        [disconnect(5_000, now=5_010), subscribed(now=8_000), tick(now=10_000)],
        due_at=10_500,
        windows=[(4_000, 10_050 + CLOCK_SLACK_MS)],
    ),
    Row(
        "a restart: from the checkpoint to the first trade after subscribing",
        [startup(-60_000, now=0), subscribed(now=1_000), first_trade(1_100, now=1_100)],
        due_at=1_600,
        windows=[(-61_000, 2_100)],
        reasons=[("startup",)],
    ),
    Row(
        "a full queue: from the newest trade queued to the first one queued after the drops",
        [overflow(3_000, now=3_000), overflow(3_000, now=3_100), first_trade(3_400, now=3_400)],
        due_at=3_900,
        windows=[(2_000, 4_400)],
        reasons=[("overflow",)],
    ),
    Row(
        "a full queue and nothing queued after it: the window ends at now plus the clock slack",
        [subscribed(now=0), overflow(3_000, now=3_000), tick(now=5_000)],
        due_at=5_500,
        windows=[(2_000, 5_050 + CLOCK_SLACK_MS)],
    ),
    Row(
        "nothing is due while disconnected",
        [disconnect(5_000, now=5_010), tick(now=60_000)],
        due_at=60_000,
        windows=[],
    ),
]


def play(events: list[Event], planner: RecoveryPlanner | None = None) -> RecoveryPlanner:
    planner = planner or RecoveryPlanner(hold_max_ms=5_000, settle_ms=500, merge_max_ms=1_000)
    for method, args in events:
        getattr(planner, method)(*args)
    return planner


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_windows(row: Row) -> None:
    planner = play(row.events)
    if row.not_due_before is not None:
        assert play(row.events).due(N + row.not_due_before) == []
    due = planner.due(N + row.due_at)
    assert [(w.from_ms - T, w.to_ms - T) for w in due] == row.windows
    if row.reasons:
        assert [w.reasons for w in due] == row.reasons
    assert planner.due(N + row.due_at + 60_000) == []  # each window is handed out once


def test_holds_touching_sweeps_until_the_window_is_fetched() -> None:
    planner = play([gap(1_000, 1_040, now=1_040)])  # window [0, 2040]
    assert not planner.may_close(T - 500, T + 1_500)  # a sweep a lost fill could join
    assert planner.may_close(T + 2_041, T + 4_041)  # a sweep after the window
    assert planner.may_close(T - 3_000, T - 1)  # and one before it
    # Fetched 1 s either side for REST's whole seconds, but held only 250 ms either side of the frames' times.
    assert planner.may_close(T - 1_000, T + 749) and not planner.may_close(T - 1_000, T + 750)
    assert planner.may_close(T + 1_291, T + 3_000) and not planner.may_close(T + 1_290, T + 3_000)
    assert planner.low_water_ms() == T
    (window,) = planner.due(N + 1_540)
    assert not planner.may_close(T - 500, T + 1_500)  # still being fetched
    version = planner.version
    planner.on_done(window.window_id, N + 1_800)
    assert planner.version != version  # the detector asks its held sweeps again
    assert planner.may_close(T - 500, T + 1_500) and planner.low_water_ms() is None and planner.pending == 0


def test_a_hold_expires_at_its_deadline_but_the_window_stays_to_be_fetched() -> None:
    planner = play([gap(1_000, 1_040, now=1_040)])
    assert len(planner.due(N + 1_540)) == 1  # REST is down: the fetch goes on and on
    planner.tick(N + 6_039)
    assert not planner.may_close(T + 900, T + 1_100)
    planner.tick(N + 6_040)  # HOLD_MAX_S after the gap
    assert planner.may_close(T + 900, T + 1_100)
    assert planner.uncovered(T + 900, T + 1_100) == [(T, T + 2_040)]  # what an alert closed now was closed without
    assert planner.low_water_ms() == T  # a restart would still fetch it
    assert planner.counts.expired == 1


def test_a_window_given_up_ends_its_holds_and_no_longer_holds_the_checkpoint() -> None:
    planner = play([gap(1_000, 1_040, now=1_040), gap(3_500, 3_510, now=1_100)])
    first, second = planner.due(N + 1_600)
    planner.on_given_up(first.window_id, N + 1_700)
    assert planner.may_close(T + 900, T + 1_100) and not planner.may_close(T + 3_400, T + 3_600)
    assert planner.low_water_ms() == second.from_ms and planner.counts.given_up == 1


def test_a_reconnect_holds_for_hold_max_only_even_while_disconnected() -> None:
    # A whale seen just before a long outage must not wait for Kalshi to come back (it would go stale).
    planner = play([disconnect(5_000, now=5_010), tick(now=5_010 + 4_999)])
    assert not planner.may_close(T + 4_500, T + 6_500)  # the outage may hold the rest of this sweep a while
    assert planner.may_close(T + 1_000, T + 3_000)
    planner.tick(N + 5_010 + 5_000)  # HOLD_MAX_S after the drop, still disconnected
    assert planner.may_close(T + 4_500, T + 6_500)
    assert planner.uncovered(T + 4_500, T + 6_500) == [(T + 4_000, None)]  # an alert closed now says so
    planner.on_subscribed(N + 61_000)  # trades resume: a sweep in progress may take fills from the window's end
    assert not planner.may_close(T + 60_500, T + 61_500)
    planner.tick(N + 61_000 + 2_000 + 5_000)  # quiet: bounded after 2 s, then HOLD_MAX_S
    assert planner.may_close(T + 60_500, T + 61_500)


def test_the_low_water_mark_follows_windows_as_they_come_grow_and_go() -> None:
    """The planner keeps its low-water mark as it goes (the detector asks per trade); it must always be the start
    of the oldest window pending, whatever the story."""
    everything = (0, 2**62)
    for seed in range(200):
        rng = random.Random(seed)
        planner = RecoveryPlanner(hold_max_ms=5_000, settle_ms=500, merge_max_ms=1_000)
        now, handed_out = 0, []
        for _ in range(40):
            now += rng.randint(0, 2_000)
            ts = now + rng.randint(-8_000, 2_000)
            roll = rng.random()
            if roll < 0.3:
                play([gap(ts, ts + rng.randint(-50, 3_000), now)], planner)  # may merge into a waiting window
            elif roll < 0.4:
                play([disconnect(ts, now), subscribed(now + 100)], planner)
            elif roll < 0.5:
                play([overflow(ts, now)], planner)
            elif roll < 0.6 and planner.wants_first_trade:
                play([first_trade(ts - 2_000, now)], planner)  # an end before the start moves the start back
            elif roll < 0.8:
                handed_out += [w.window_id for w in planner.due(N + now)]
            elif handed_out:
                window_id = handed_out.pop(rng.randrange(len(handed_out)))
                done = planner.on_done if rng.random() < 0.5 else planner.on_given_up
                done(window_id, N + now)
            starts = [from_ms for from_ms, _ in planner.uncovered(*everything)]
            assert planner.low_water_ms() == min(starts, default=None), seed


def test_a_checkpoint_ahead_of_the_clock_moves_the_low_water_mark_back_with_its_window() -> None:
    # The checkpoint was saved before the host's clock stepped back an hour: the startup window opens an hour
    # ahead, and its end (the first trade, now) pulls its start back. The low-water mark, which a restart fetches
    # from, must follow; left an hour ahead, a restart during the fetch would skip the whole window.
    planner = play([startup(3_600_000, now=0), subscribed(now=100), first_trade(50, now=100)])
    (window,) = planner.due(N + 100 + planner.settle_ms)
    assert window.from_ms == window.to_ms == N + 100 + CLOCK_SLACK_MS  # the host's clock says when trades resumed
    assert planner.low_water_ms() == window.from_ms


def test_gap_watch_reads_the_trade_times_around_gaps_and_drops() -> None:
    """The stream's callbacks become planner events with the times of the frames (batches) around them."""
    planner = RecoveryPlanner(hold_max_ms=5_000, settle_ms=500, merge_max_ms=1_000)
    clock = {"ms": N}
    wakes: list[int] = []
    watch = GapWatch(planner, now_ms=lambda: clock["ms"], started_ms=T - 60_000, wake=lambda: wakes.append(1))
    watch.before_queue(T + 1_000)  # a batch of two
    watch.queued(T + 1_000, T + 1_010)
    watch.on_gap()  # the stream saw seq jump on the frame about to come: it starts the next batch
    watch.before_queue(T + 1_500)
    watch.queued(T + 1_500, T + 1_500)
    watch.dropped()  # a full queue: from the newest trade queued...
    watch.before_queue(T + 1_600)  # (a batch dropped too)
    watch.before_queue(T + 1_700)
    watch.queued(T + 1_700, T + 1_800)  # ...to the first one queued after
    clock["ms"] = N + 1_000
    assert [(w.from_ms - T, w.to_ms - T, w.reasons) for w in planner.due(N + 1_000)] == [
        (10, 2_500, ("seq_gap",)),  # between the frames around the gap, 1 s either side
        (500, 2_700, ("overflow",)),  # from the newest trade queued to the first queued after the drops
    ]
    assert wakes == [1, 1]


def test_no_stamp_aims_a_window_past_what_kalshi_can_have() -> None:
    # A frame after a gap stamped an hour ahead: the window ends at the newest trade the pipeline accepts, plus
    # REST's one-second edge (it once ran to the year 2100 and blocked the loop building its slices).
    planner = play([gap(1_000, 3_601_000, now=1_040)])
    assert [(w.from_ms - T, w.to_ms - T) for w in planner.due(N + 1_540)] == [(0, 50 + 1_040 + 3_000 + 1_000)]
    # The first trade after a reconnect stamped an hour in the past cannot end the window before it starts: the
    # host's clock says when trades resumed.
    planner = play([disconnect(5_000, now=5_010), subscribed(now=8_000), first_trade(-3_600_000, now=8_100)])
    assert [(w.from_ms - T, w.to_ms - T) for w in planner.due(N + 8_600)] == [(4_000, 50 + 8_100 + 2_000)]


def test_gap_watch_keeps_to_the_trade_time_rule() -> None:
    # A stamp the pipeline refuses as future_time must not aim a window either (an hour ahead as the last frame
    # before a drop once sent the reconnect backfill an hour into the future, and lost a whale silently).
    planner = RecoveryPlanner(hold_max_ms=5_000, settle_ms=500, merge_max_ms=1_000)
    clock = {"ms": N + 1_000}
    watch = GapWatch(planner, now_ms=lambda: clock["ms"], started_ms=T - 60_000, wake=lambda: None)
    watch.before_queue(T + 1_000)
    watch.queued(T + 1_000, T + 3_601_000)  # the batch's last trade is dated an hour ahead: not believed
    watch.on_gap()
    watch.before_queue(T + 3_700_000)  # the frame after the gap, an hour ahead too: the gap waits
    watch.before_queue(T + 1_200)  # the first believable time after the gap
    watch.queued(T + 1_200, T + 1_300)
    (gap_window,) = planner.due(N + 1_600)
    assert (gap_window.from_ms - T, gap_window.to_ms - T) == (0, 2_200)  # around 1,000 and 1,200, not an hour on
    planner.on_done(gap_window.window_id, N + 1_700)
    watch.on_disconnect()
    assert planner.low_water_ms() == T + 300  # the reconnect window starts at the last believable trade - 1 s
