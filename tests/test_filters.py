"""The operator's filters (valshi_x/x/filters.py) and where the poster applies them: when a whale enters the
outbox, before it can spend any budget; a whale left out is marked skipped and logged with the reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.fake_x import FakeX
from tests.test_poster import FakeTime, drive, open_rig, path, time, whale, x  # noqa: F401  (fixtures)
from valshi_x.config import Settings
from valshi_x.markets import MarketLabel
from valshi_x.store import Store
from valshi_x.wiring import poster_from_settings
from valshi_x.x.filters import PostFilter, judge
from valshi_x.x.poster import DryRunTransport, post_renderer

COMBO = "KXMVENFLMULTIGAMEEXTENDED-S202603C650D9E7-A8A6A218E79"
RULES = [
    # (filter, ticker, category, category_final) -> action, reason contains
    (PostFilter.of(), COMBO, None, True, "post", ""),
    (PostFilter.of(post_combos=False), COMBO, None, True, "skip", "POST_COMBOS=false"),
    (PostFilter.of(post_combos=False), "KXNFLGAME-26SEP13CHIJAC-CHI", "Sports", True, "post", ""),
    (PostFilter.of(skip_series=["kxhigh"]), "KXHIGHNY-26SEP13-B84.5", None, True, "skip", "KXHIGH is in SKIP_SERIES"),
    (PostFilter.of(post_series=["KXNFL", "KXFED"]), "KXHIGHNY-26SEP13-B84.5", None, True, "skip", "POST_SERIES"),
    (PostFilter.of(post_series=["KXNFL", "KXFED"]), "KXFEDDECISION-26SEP-C25", None, True, "post", ""),
    (
        PostFilter.of(skip_categories=["sports"]),
        "KXNFLGAME-26SEP13CHIJAC-CHI",
        "Sports",
        True,
        "skip",
        "SKIP_CATEGORIES",
    ),
    (PostFilter.of(skip_categories=["Sports"]), "KXFED-26DEC-T4.00", "Economics", True, "post", ""),
    (
        PostFilter.of(post_categories=["Crypto"]),
        "KXFED-26DEC-T4.00",
        "Economics",
        True,
        "skip",
        "not in POST_CATEGORIES",
    ),
    (PostFilter.of(post_categories=["Crypto"]), "KXBTCD-26SEP1317-T1", "crypto", True, "post", ""),
    # A category rule and no category yet: asked again after the lookup; still none then: an include list skips,
    # an exclude list posts.
    (PostFilter.of(post_categories=["Crypto"]), "KXODD-1", None, False, "ask_again", ""),
    (PostFilter.of(post_categories=["Crypto"]), "KXODD-1", None, True, "skip", "category unknown"),
    (PostFilter.of(skip_categories=["Sports"]), "KXODD-1", None, True, "post", ""),
    (PostFilter.of(), "KXODD-1", None, False, "post", ""),  # no category rule: never waits for one
]


@pytest.mark.parametrize("case", RULES)
def test_judge(case: tuple[PostFilter, str, str | None, bool, str, str]) -> None:
    rules, ticker, category, final, action, reason = case
    verdict = judge(rules, ticker, category, category_final=final)
    assert verdict.action == action
    assert reason in verdict.reason


def test_the_filter_comes_from_the_settings() -> None:
    settings = Settings(post_categories=("Sports",), skip_series=("KXNFLTOTAL",), post_combos=False)
    poster = poster_from_settings(settings, store=None, transport=DryRunTransport())  # type: ignore[arg-type]
    assert poster._filter == PostFilter.of(post_categories=["Sports"], skip_series=["KXNFLTOTAL"], post_combos=False)


async def test_filtered_whales_are_skipped_with_the_reason_before_any_budget(time: FakeTime, x: FakeX) -> None:  # noqa: F811
    # Live: a filtered whale never reaches X and never uses a post of the budget (one post allowed, one posted).
    rules = PostFilter.of(post_combos=False, skip_series=["KXHIGH"])
    rig = await open_rig(None, time, x, post_filter=rules, posts_per_24h=1)
    combo, weather, kept = (
        whale(1, value=500_000, ticker=COMBO),
        whale(2, value=400_000, ticker="KXHIGHNY-26-B1"),
        whale(3),
    )
    with capture_logs() as logs:
        for alert in (combo, weather, kept):
            assert await rig.poster.submit(alert)
        await drive(rig, time)
    skipped = [(e["event"], e["alert_id"], e["reason"]) for e in logs if e["event"] in ("skipped", "would_skip")]
    assert skipped == [
        ("skipped", combo.alert_id, "combo market (POST_COMBOS=false)"),
        ("skipped", weather.alert_id, "series KXHIGH is in SKIP_SERIES"),
    ]
    assert len(x.requests) == 1 and kept.alert_id in x.requests[0].text
    for alert, reason in ((combo, "filtered: combo market"), (weather, "filtered: series KXHIGH")):
        item = await rig.store.get(alert.alert_id)
        assert item is not None and item.status == "skipped" and (item.last_error or "").startswith(reason)
    assert rig.poster.stats.filtered == 2
    assert not [e for e in logs if e["event"] == "post_budget_wait"]
    await rig.close()


async def test_a_category_rule_waits_for_the_lookup_then_decides(time: FakeTime) -> None:  # noqa: F811
    labels = {
        "KXNEWSPORT-26-A": MarketLabel("A new sport?", "KXNEWSPORT", "Sports"),
        "KXNEWCOIN-26-A": MarketLabel("A new coin?", "KXNEWCOIN", "Crypto"),
        "KXNOCAT-26-A": MarketLabel("No category?", "KXNOCAT"),
    }

    async def lookup(ticker: str) -> MarketLabel | None:
        return labels[ticker]

    rules = PostFilter.of(post_categories=["Crypto"])
    rig = await open_rig(None, time, None, post_filter=rules, lookup_label=lookup, peek_label=lambda ticker: None)
    with capture_logs() as logs:
        for n, ticker in enumerate(labels):
            await rig.poster.submit(whale(n, value=300_000 - n, ticker=ticker))
        assert not [e for e in logs if e["event"] == "would_skip"]  # unknown at the door: asked again later
        await drive(rig, time)
    reasons = {e["ticker"]: e["reason"] for e in logs if e["event"] == "would_skip"}
    assert reasons == {
        "KXNEWSPORT-26-A": "category Sports not in POST_CATEGORIES",
        "KXNOCAT-26-A": "category unknown (POST_CATEGORIES is set)",
    }
    assert [e["ticker"] for e in logs if e["event"] == "would_post"] == ["KXNEWCOIN-26-A"]
    await rig.close()


async def test_a_cached_label_decides_at_the_door(time: FakeTime) -> None:  # noqa: F811
    async def lookup(ticker: str) -> MarketLabel | None:
        raise AssertionError("a whale filtered at the door is never looked up")

    cached = MarketLabel("A new sport?", "KXNEWSPORT", "Sports")
    rules = PostFilter.of(skip_categories=["sports"])
    rig = await open_rig(None, time, None, post_filter=rules, lookup_label=lookup, peek_label=lambda t: cached)
    with capture_logs() as logs:
        await rig.poster.submit(whale(1, ticker="KXNEWSPORT-26-A"))
    assert [(e["event"], e["reason"]) for e in logs] == [("would_skip", "category Sports is in SKIP_CATEGORIES")]
    assert await rig.poster.step() is None  # nothing left to post
    await rig.close()


async def test_untitled_posts_get_a_readable_headline_and_the_nth_whale(path: Path, time: FakeTime) -> None:  # noqa: F811
    async def lookup(ticker: str) -> MarketLabel | None:
        raise TimeoutError  # Kalshi unreachable: every post goes without a title

    render = post_renderer("", post_links=False)
    rig = await open_rig(path, time, None, render=render, lookup_label=lookup, title_budget_s=0.01)
    ticker = "KXNFLGAME-26SEP13CHIJAC-CHI"
    first = dataclasses.replace(whale(1, ticker=ticker), side="no")
    second = dataclasses.replace(whale(2, ticker=ticker, at_ms=first.first_ts_ms + 60_000), side="no")
    elsewhere = whale(3, ticker="KXHIGHNY-26SEP13-B84.5", at_ms=first.first_ts_ms + 30_000)
    with capture_logs() as logs:
        for alert in (first, elsewhere, second):
            await rig.poster.submit(alert)
            await drive(rig, time)
    texts = [e["text"] for e in logs if e["event"] == "would_post"]
    assert [t.splitlines()[0] for t in texts] == [
        "🏈 NFL game, Sep 13 2026: CHIJAC, outcome CHI",
        "🌡️ NYC high temperature, Sep 13 2026: outcome B84.5",
        "🏈 NFL game, Sep 13 2026: CHIJAC, outcome CHI",
    ]
    assert "whale on this market" not in texts[0] + texts[1]
    assert "2nd whale on this market in 24h" in texts[2]
    assert all(ticker not in t for t in texts)
    await rig.close()


async def test_whales_on_market_counts_24_hours_and_ranks_ties(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    day_ms = 24 * 3600 * 1000
    base = whale(1).first_ts_ms
    alerts = [
        whale(1),
        whale(2, at_ms=base),  # the same millisecond: ranked by alert id
        whale(3, at_ms=base + day_ms),  # exactly 24 h after the first two: they have left its window
        whale(4, at_ms=base + 1000, ticker="KXOTHER-1"),
    ]
    for alert in alerts:
        assert await store.enqueue(alert)
    counts = [await store.whales_on_market(alert, day_ms) for alert in alerts]
    assert counts == [1, 2, 1, 1]
    await store.close()
