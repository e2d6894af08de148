"""Sweep grouping and the threshold: boundaries, sweeps, sides, block trades, duplicates, closing rules."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from valshi_x.recovery.planner import RecoveryPlanner
from valshi_x.store import Store
from valshi_x.trades import Side, Trade
from valshi_x.whales import SeenTradeIds, WhaleDetector, alert_log_fields

T0 = 1_793_000_000_000
_ids = itertools.count(1)


def fill(
    count: str,
    price: str,
    *,
    at: int = 0,
    ticker: str = "KXBTC-26DEC31-T100000",
    side: Side = "yes",
    block: bool = False,
    trade_id: str | None = None,
) -> Trade:
    yes = Decimal(price) if side == "yes" else 1 - Decimal(price)
    return Trade(
        trade_id=trade_id or f"t{next(_ids)}",
        ticker=ticker,
        yes_price_text=str(yes),
        no_price_text=str(1 - yes),
        count_text=count,
        taker_side=side,
        is_block_trade=block,
        ts_ms=T0 + at,
    )


def detector(window_ms: int = 1000) -> WhaleDetector:
    return WhaleDetector(Decimal(100000), window_ms)


@pytest.mark.parametrize(
    ("count", "price", "whale"),
    [
        ("200000.00", "0.5000", True),  # exactly $100,000.00 is a whale
        ("199999.98", "0.5000", False),  # $99,999.99
        ("100000.00", "1.0000", True),
        ("1000000", "0.0999", False),  # $99,900
        ("147.53", "0.6200", False),
    ],
)
def test_threshold_is_inclusive_and_exact(count: str, price: str, whale: bool) -> None:
    d = detector()
    alerts = d.add(fill(count, price)) + d.flush()
    assert bool(alerts) is whale


def test_value_uses_the_taker_sides_price() -> None:
    d = detector()
    (alert,) = d.add(fill("250000", "0.40", side="no")) + d.flush()
    assert alert.side == "no"
    assert alert.value_usd == Decimal("100000.00")  # 250k contracts x $0.40 for NO
    assert alert.price_low == alert.price_high == Decimal("0.40")


def test_sweep_of_small_fills_is_one_whale_with_the_full_value() -> None:
    d = detector()
    fills = [fill("80000", p, at=i * 100) for i, p in enumerate(["0.40", "0.41", "0.42", "0.43"])]
    alerts = [a for f in fills for a in d.add(f)] + d.flush()
    (alert,) = alerts
    assert alert.fills == 4
    assert alert.value_usd == Decimal("132800.00")
    assert alert.contracts == Decimal("320000")
    assert (alert.price_low, alert.price_high) == (Decimal("0.40"), Decimal("0.43"))
    assert alert.trade_ids == tuple(f.trade_id for f in fills)
    assert alert.first_ts_ms == T0 and alert.last_ts_ms == T0 + 300


def test_fill_exactly_at_the_window_edge_joins_and_one_past_it_does_not() -> None:
    d = detector(window_ms=1000)
    assert d.add(fill("120000", "0.50")) == []
    assert d.add(fill("80000", "0.50", at=1000)) == []  # joins: within 1000 ms of the first fill
    (alert,) = d.add(fill("10", "0.50", at=1001))  # starts a new group and closes the first
    assert alert.fills == 2 and alert.value_usd == Decimal("100000.00")


def test_later_trade_in_another_market_closes_the_group_on_stream_time() -> None:
    d = detector()
    d.add(fill("250000", "0.50"))
    (alert,) = d.add(fill("1", "0.5", at=1001, ticker="OTHER"))
    assert alert.value_usd == Decimal(125000)
    assert d.open_groups == 1


def test_opposite_sides_are_never_grouped() -> None:
    d = detector()
    d.add(fill("150000", "0.40", side="yes"))
    d.add(fill("150000", "0.40", side="no", at=10))
    assert d.flush() == []  # $60k each


def test_other_tickers_are_never_grouped() -> None:
    d = detector()
    d.add(fill("150000", "0.40"))
    d.add(fill("150000", "0.40", ticker="KXETH-26DEC31-T5000", at=10))
    assert d.flush() == []


def test_block_trade_is_not_merged_with_fills_around_it() -> None:
    d = detector()
    d.add(fill("150000", "0.40"))  # $60k
    assert d.add(fill("100000", "0.50", at=5, block=True)) == []  # $50k block, alone
    d.add(fill("10000", "0.40", at=10))  # $4k joins the open $60k group, not the block
    assert d.flush() == []
    (alert,) = d.add(fill("300000", "0.50", at=20, block=True))  # $150k block: alerts immediately
    assert alert.is_block_trade and alert.fills == 1


def test_duplicate_trade_id_counts_once() -> None:
    d = detector()
    first = fill("150000", "0.40", trade_id="dup")
    d.add(first)
    d.add(fill("150000", "0.40", at=5, trade_id="dup"))  # re-delivered: would make $120k
    assert d.flush() == []
    assert d.duplicates == 1


def test_window_zero_turns_grouping_off() -> None:
    d = detector(window_ms=0)
    assert d.add(fill("150000", "0.40")) == []
    assert d.add(fill("150000", "0.40")) == []
    (alert,) = d.add(fill("250000", "0.40"))
    assert alert.fills == 1


def test_close_due_uses_the_callers_clock() -> None:
    d = detector()
    d.add(fill("250000", "0.50", at=0))
    assert d.close_due(T0 + 1000) == []
    (alert,) = d.close_due(T0 + 1001)
    assert alert.value_usd == Decimal(125000)
    assert d.open_groups == 0


def test_out_of_order_fill_within_the_window_still_joins() -> None:
    d = detector()
    d.add(fill("100000", "0.50", at=500))
    d.add(fill("100000", "0.50", at=400))
    (alert,) = d.flush()
    assert alert.fills == 2 and alert.first_ts_ms == T0 + 400  # reported in trade-time order


def test_straggler_from_before_the_window_stands_alone() -> None:
    d = detector()
    d.add(fill("250000", "0.50", at=5000))
    assert d.add(fill("150000", "0.50", at=1000)) == []  # $75k alone: it neither joins nor splits the sweep
    (alert,) = d.flush()
    assert alert.fills == 1


def test_alert_log_fields_are_plain_and_exact() -> None:
    d = detector()
    (alert,) = d.add(fill("200000.00", "0.5000", trade_id="abc")) + d.flush()
    fields = alert_log_fields(alert)
    assert fields["value_usd"] == "100000.00"
    assert fields["trade_ids"] == ["abc"]
    assert fields["created_time"] == "2026-10-26T07:33:20Z"
    assert fields["side"] == "yes" and fields["contracts"] == "200000.00"


def test_seen_ids_forget_by_horizon_and_by_size() -> None:
    seen = SeenTradeIds(horizon_ms=1000, max_ids=3)
    assert seen.add("a", T0)
    assert not seen.add("a", T0)
    assert seen.add("b", T0 + 500)
    assert not seen.add("b", T0 + 900)
    assert seen.add("c", T0 + 2500)  # the second of "a" and "b" is now beyond the horizon
    assert seen.add("a", T0 + 2500)
    assert not seen.add("c", T0 + 100)  # an older, re-delivered trade is still known
    seen.add("d", T0 + 3000)
    assert len(seen) == 3
    seen.add("e", T0 + 3000)  # over the cap: the oldest second goes
    assert len(seen) == 2
    assert seen.add("c", T0 + 3000)


NOW_MS = T0 + 10_000  # the host's wall clock in these tests (holds run on it)


def gated(window_ms: int = 1000, **kwargs: object) -> tuple[WhaleDetector, RecoveryPlanner]:
    planner = RecoveryPlanner(hold_max_ms=5_000)
    return WhaleDetector(Decimal(100000), window_ms, gate=planner, **kwargs), planner  # type: ignore[arg-type]


def test_held_sweep_gets_its_late_fills_and_alerts_once_with_the_full_value() -> None:
    d, planner = gated()
    d.add(fill("60000", "0.50", at=0))  # two fills before the drop: $60k
    d.add(fill("60000", "0.50", at=100))
    planner.on_disconnect(T0 + 100, NOW_MS)  # the socket dropped; everything after this trade may be missed
    planner.on_subscribed(NOW_MS + 1000)
    planner.on_first_trade(T0 + 5000, NOW_MS + 1000)
    assert d.add(fill("1", "0.50", at=5000, ticker="LIVE")) == []  # live again: would close the sweep, but held
    assert d.close_due(T0 + 60_000) == [] and d.held_groups == 2  # the sweep, and LIVE (its reach touches too)
    (window,) = planner.due(NOW_MS + 2000)
    assert (window.from_ms, window.to_ms) == (T0 - 900, T0 + 6000)  # last trade seen - 1 s .. first after + 1 s
    d.add(fill("60000", "0.50", at=200))  # the backfill brings the fills of the outage
    d.add(fill("60000", "0.50", at=300))
    planner.on_done(window.window_id, NOW_MS + 2100)
    (alert,) = d.close_due(T0 + 60_000)
    assert alert.fills == 4 and alert.value_usd == Decimal(120000)


def test_only_sweeps_that_touch_a_pending_window_are_held() -> None:
    d, planner = gated()
    planner.on_gap(T0 + 3000, T0 + 3010, NOW_MS)  # [2 s, 4.01 s] may hold lost trades
    alerts = d.add(fill("250000", "0.50", at=0, ticker="FAR"))  # $125k, 3 s before the gap: no lost fill joins it
    alerts += d.add(fill("250000", "0.50", at=2500, ticker="NEAR"))  # $125k, a lost fill may belong to it
    alerts += d.add(fill("1", "0.50", at=9000, ticker="LIVE"))
    assert [a.ticker for a in alerts] == ["FAR"] and d.held_groups == 1


def test_a_hold_ends_at_its_deadline_and_a_late_fill_of_the_alert_is_only_reported() -> None:
    grew: list[tuple[str, str, Decimal, str]] = []
    d, planner = gated(on_grew_after_alert=lambda *args: grew.append(args))
    d.add(fill("250000", "0.50", at=0, trade_id="w0"))  # $125k
    planner.on_gap(T0, T0 + 20, NOW_MS)  # REST is down: the window will not come soon
    assert d.close_due(T0 + 60_000) == []
    planner.tick(NOW_MS + 4_999)
    assert d.close_due(T0 + 60_000) == []
    planner.tick(NOW_MS + 5_000)  # HOLD_MAX_S is up: close with what is known
    (alert,) = d.close_due(T0 + 60_000)
    assert alert.value_usd == Decimal(125000) and planner.uncovered(T0 - 1000, T0 + 1000) == [(T0 - 1000, T0 + 1020)]
    d.add(fill("1", "0.50", at=5000, ticker="LIVE"))
    assert d.add(fill("20000", "0.50", at=10, trade_id="w1")) == []  # REST is back: the lost fill, $10k
    assert grew == [("w0", "KXBTC-26DEC31-T100000", Decimal(10000), "w1")]
    assert d.flush() == []  # never a second alert


def test_near_whale_hook_fires_once_per_sweep_at_half_the_threshold() -> None:
    near: list[str] = []
    d = WhaleDetector(Decimal(100000), 1000, on_near_whale=near.append)
    d.add(fill("60000", "0.50", at=0, ticker="A"))  # $30k
    assert near == []
    d.add(fill("50000", "0.50", at=10, ticker="A"))  # $55k: past half
    d.add(fill("50000", "0.50", at=20, ticker="A"))
    d.add(fill("400000", "0.50", at=30, ticker="B"))  # a whale in one fill
    assert near == ["A", "B"]


def test_near_whale_hook_set_after_construction_fires_too() -> None:
    # The daemon builds the detector before the title lookup exists, and sets the hook once it does.
    near: list[str] = []
    d = WhaleDetector(Decimal(100000), 1000)
    d.on_near_whale = near.append
    d.add(fill("120000", "0.50", at=0, ticker="A"))  # $60k: past half
    assert near == ["A"]


def test_late_fill_finds_its_own_sweep_among_several_of_the_same_key() -> None:
    d, planner = gated()
    planner.on_disconnect(T0 + 1000, NOW_MS)  # a window from T0 on stays open (disconnected)
    d.add(fill("150000", "0.50", at=0))  # $75k
    d.add(fill("150000", "0.50", at=5000))  # a later sweep of the same market and side: $75k
    d.add(fill("60000", "0.50", at=4900))  # late: belongs to the second (within its window), not the first
    (alert,) = d.flush()
    assert alert.first_ts_ms == T0 + 4900 and alert.value_usd == Decimal(105000)


def test_processed_through_stops_at_open_and_held_groups() -> None:
    d, planner = gated()
    assert d.processed_through_ms() == 0
    d.add(fill("10", "0.5", at=0))
    assert d.processed_through_ms() == T0 - 1  # its group is still open
    d.add(fill("10", "0.5", at=2000, ticker="B"))
    assert d.processed_through_ms() == T0 + 1999
    planner.on_gap(T0 + 2000, T0 + 2100, NOW_MS)
    d.add(fill("10", "0.5", at=4000, ticker="C"))  # B is due, but held: a lost fill may still join it
    assert d.held_groups == 1 and d.processed_through_ms() == T0 + 1999
    (window,) = planner.due(NOW_MS + 1000)
    planner.on_done(window.window_id, NOW_MS + 1000)
    d.close_due(T0 + 4000)
    assert d.processed_through_ms() == T0 + 3999


def test_a_late_fill_reopens_a_sweep_that_closed_short_of_the_threshold() -> None:
    """A gap noticed only after the window ended: the backfilled fill still completes the sweep."""
    d = detector()
    d.add(fill("120000", "0.50", at=0))  # $60k
    assert d.close_due(T0 + 1200) == []  # the quiet market closes it on the clock, short
    d.add(fill("10", "0.50", at=3000, ticker="OTHER"))  # the stream moves on; the gap shows
    assert d.add(fill("100000", "0.50", at=400)) == []  # the backfill brings the lost fill: $50k
    assert d.late_fills_rejoined == 1
    (alert,) = d.add(fill("10", "0.50", at=5000, ticker="OTHER"))  # closes again, now a whale
    assert alert.fills == 2 and alert.value_usd == Decimal(110000) and alert.first_ts_ms == T0
    assert d.groups_closed == 2  # the sweep (counted once, though it closed twice) and the first OTHER fill


def test_a_whale_already_alerted_is_never_reopened() -> None:
    d = detector()
    (first,) = d.add(fill("300000", "0.50", at=0)) + d.close_due(T0 + 1200)
    d.add(fill("10", "0.50", at=3000, ticker="OTHER"))
    assert d.add(fill("100000", "0.50", at=400)) == []  # late fill of an alerted sweep: a group of its own
    assert d.flush() == []  # $50k alone: no second alert
    assert d.late_fills_rejoined == 0 and d.late_fills_after_alert == 1 and first.fills == 1


def test_short_sweeps_are_forgotten_after_the_late_fill_horizon() -> None:
    d = WhaleDetector(Decimal(100000), 1000, late_fill_horizon_ms=10_000)
    d.add(fill("120000", "0.50", at=0))
    d.add(fill("10", "0.50", at=20_000, ticker="OTHER"))  # 20 s later in stream time
    d.add(fill("100000", "0.50", at=400))
    assert d.late_fills_rejoined == 0
    assert d.flush() == []


def test_a_pending_backfill_keeps_closed_sweeps_past_the_horizon() -> None:
    d, planner = gated(late_fill_horizon_ms=10_000)
    d.add(fill("120000", "0.50", at=0))  # $60k, closes short below
    d.close_due(T0 + 1200)
    planner.on_startup(T0, NOW_MS)  # a window reaching back before the sweep, not fetched yet
    d.add(fill("10", "0.50", at=60_000, ticker="OTHER"))  # a minute of live trading after the reconnect
    d.add(fill("100000", "0.50", at=400))  # the backfill's fill of the old sweep
    planner.on_subscribed(NOW_MS)
    planner.on_first_trade(T0 + 60_000, NOW_MS)
    (window,) = planner.due(NOW_MS + 1000)
    planner.on_done(window.window_id, NOW_MS + 1000)
    (alert,) = d.close_due(T0 + 120_000)
    assert alert.value_usd == Decimal(110000) and alert.fills == 2


# The float screen (whales.py docstring): floats may only prove "clearly below"; Decimal decides the rest


@pytest.mark.parametrize(
    ("fills", "value"),
    [
        ([("200000.00", "0.5000")], "100000.000000"),  # exactly $100,000.00: a whale
        ([("199999.98", "0.5000")], None),  # $99,999.99
        ([("199999.999998", "0.500000"), ("0.001000", "0.000999")], None),  # $99,999.999999999: 1e-9 below
        ([("199999.999998", "0.500000"), ("0.001000", "0.001000")], "100000.000000000000"),  # exactly, in two
        ([("1000.00", "0.1")] * 1000, "100000.000"),  # 1,000 fills whose floats are all inexact
        ([("999.9999", "0.1")] * 1000, None),  # $99,999.99 in 1,000 inexact floats
    ],
)
def test_the_float_screen_never_decides_a_whale_near_the_threshold(
    fills: list[tuple[str, str]], value: str | None
) -> None:
    d = detector()
    alerts = []
    for i, (count, price) in enumerate(fills):
        alerts += d.add(fill(count, price, at=i % 1000 // 2))
    alerts += d.flush()
    assert [str(a.value_usd) for a in alerts] == ([value] if value else [])
    assert d.exact_sums == 1  # every one of these lies within the screen's margin of the threshold


def test_groups_clearly_below_the_threshold_are_never_summed_exactly() -> None:
    d = detector()
    for i in range(100):
        d.add(fill("1999.99", "0.5000", at=i * 2000, ticker=f"T{i}"))  # $999.995 each, all apart
    d.add(fill("199999.60", "0.5000", at=300_000))  # $99,999.80: below by more than the margin ($0.10)
    d.add(fill("199999.98", "0.5000", at=302_000))  # $99,999.99: within the margin, so summed exactly
    assert d.flush() == [] and d.groups_closed == 102
    assert d.exact_sums == 1


def test_many_cheap_contracts_pass_the_count_screen_and_are_judged_on_their_value() -> None:
    # A count screen alone would take these for whales: 3,000,000 contracts, but at $0.03 only $90,000.
    near: list[str] = []
    d = WhaleDetector(Decimal(100000), 1000, on_near_whale=near.append)
    alerts = []
    for i in range(300):
        alerts += d.add(fill("10000.00", "0.0300", at=i, ticker="PENNY"))  # $300 each
    alerts += d.add(fill("200000.00", "0.0300", at=400, ticker="PENNY"))  # + $6,000: $96,000
    alerts += d.add(fill("150000.00", "0.0300", at=500, ticker="PENNY"))  # + $4,500: $100,500, a whale
    assert near == ["PENNY"] and alerts == []
    (alert,) = d.flush()
    assert (alert.value_usd, alert.fills, d.exact_sums) == (Decimal("100500.000000"), 302, 1)


def test_near_whale_hook_is_exact_at_half_the_threshold() -> None:
    near: list[str] = []
    d = WhaleDetector(Decimal(100000), 1000, on_near_whale=near.append)
    d.add(fill("99999.999998", "0.500000", ticker="A"))  # $49,999.999999
    d.add(fill("0.001000", "0.000999", at=1, ticker="A"))  # + $0.000000999: 1e-9 short of half
    d.add(fill("99999.999998", "0.500000", ticker="B"))
    d.add(fill("0.001000", "0.001000", at=1, ticker="B"))  # exactly half
    assert near == ["B"]


# Bounded memory by count (issue 11, item 5)


def test_kept_closed_sweeps_are_capped_by_count_and_the_newest_still_take_late_fills() -> None:
    d = WhaleDetector(Decimal(100000), 1000, late_fill_horizon_ms=10**9, max_kept_trades=5)
    for i in range(20):
        d.add(fill("1000", "0.50", at=i * 3000, ticker=f"T{i}"))
        d.add(fill("1000", "0.50", at=i * 3000 + 10, ticker=f"T{i}"))
        assert d.kept_trades <= 5
    assert d.kept_forgotten_early >= 15
    # A late fill of the newest closed sweep still reopens it; one of a forgotten sweep stands alone.
    d.add(fill("199000", "0.50", at=18 * 3000 + 500, ticker="T18"))
    d.add(fill("1000", "0.50", at=1 * 3000 + 500, ticker="T1"))
    assert d.late_fills_rejoined == 1
    (alert,) = d.flush()
    assert alert.ticker == "T18" and alert.value_usd == Decimal("100500.00")
    assert d.kept_trades <= 5


def test_seen_ids_stay_under_their_count_cap() -> None:
    d = WhaleDetector(Decimal(100000), 1000, dedup_horizon_ms=10**9, dedup_max_ids=100)
    for i in range(2000):
        d.add(fill("1", "0.50", at=i * 7, ticker=f"T{i % 50}"))
        assert len(d.seen) <= 100
    d.flush()


async def test_a_dedup_miss_when_the_cap_bites_is_caught_by_the_durable_outbox() -> None:
    d = WhaleDetector(Decimal(100000), 1000, dedup_horizon_ms=10**9, dedup_max_ids=3, late_fill_horizon_ms=0)
    whale_fill = fill("250000", "0.50", at=0, trade_id="w")
    alerts = d.add(whale_fill)
    for i in range(1, 6):  # later seconds: "w" leaves the capped id set
        alerts += d.add(fill("1", "0.50", at=i * 2000, ticker=f"T{i}"))
    assert "w" not in d.seen
    alerts += d.add(whale_fill)  # re-delivered (a backfill overlap): no longer known, so alerted again
    alerts += d.flush()
    assert [a.alert_id for a in alerts] == ["w", "w"]
    store = await Store.open(None)
    try:
        assert await store.enqueue(alerts[0])
        assert not await store.enqueue(alerts[1])  # never posted twice
    finally:
        await store.close()


def test_the_price_before_a_sweep_comes_from_the_tape() -> None:
    # The market's last trade before the sweep (any side; a block trade does not count: it says nothing of the
    # book), and the sweep's last fill after it: the move a post shows (issue 18).
    d = detector()
    ticker = "KXNFLGAME-26SEP13CHIJAC-CHI"
    d.add_many(
        [
            fill("10.00", "0.4400", at=0, ticker=ticker, side="no"),  # YES 0.56
            fill("10.00", "0.5500", at=1000, ticker=ticker),  # YES 0.55: the last price before the sweep
            fill("10.00", "0.2000", at=2000, ticker=ticker, block=True),  # off the book
        ]
    )
    alerts = (
        d.add_many(
            [
                fill("150000.00", "0.4500", at=5000, ticker=ticker, side="no"),
                fill("150000.00", "0.4700", at=5100, ticker=ticker, side="no"),
            ]
        )
        + d.flush()
    )
    assert len(alerts) == 1
    assert (alerts[0].yes_before, alerts[0].yes_after) == (Decimal("0.5500"), Decimal("0.53"))
    first = detector()
    alone = first.add_many([fill("300000.00", "0.5000", ticker="KXNEW-1")]) + first.flush()
    assert alone[0].yes_before is None  # nothing seen before it since start


def test_the_last_price_map_is_bounded() -> None:
    d = WhaleDetector(Decimal(100000), 1000, max_priced_markets=10)
    for n in range(200):
        d.add(fill("1.00", "0.5000", at=n * 1000, ticker=f"KXM-{n}"))  # a new market every second
        assert len(d.last_yes) <= 11  # the cap is checked once per trade second, before the second's trades
    assert "KXM-199" in d.last_yes  # the newest stay
