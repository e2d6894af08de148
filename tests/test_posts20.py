"""Twenty real-looking whales and their posts (tests/fixtures/posts20.json), read as a follower would.

Each case is built the way the daemon builds it: a trade before the sweep (when the case has a price before),
then the sweep's fills through the real `WhaleDetector`, the lookup's label as `KalshiRest` would give it, and
the outbox's count of whales on the market. The expected texts are the layout chosen by reading these twenty
(docs/posting-notes-text.md shows five); every one is checked against X's rules with the project's counter and
with twitter-text as the oracle.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from valshi_x.markets import MarketLabel, market_link, series_of
from valshi_x.trades import Trade
from valshi_x.whales import Alert, WhaleDetector
from valshi_x.x.text import CASHTAG_RE, MAX_WEIGHTED_LENGTH, MENTION_RE, render_post, weighted_length

FIXTURE = Path(__file__).parent / "fixtures" / "posts20.json"
CASES: list[dict[str, Any]] = json.loads(FIXTURE.read_text(encoding="utf-8"))
T0_MS = int(datetime(2026, 9, 13, 17, 5, 1, tzinfo=UTC).timestamp() * 1000)

try:
    from twitter_text import extract_urls, parse_tweet
except ImportError:  # pragma: no cover - the test extra installs it
    parse_tweet = None


def _trade(n: int, ticker: str, yes_price: str, count: str, side: str, *, block: bool, ts_ms: int) -> Trade:
    yes = Decimal(yes_price)
    return Trade(f"{ticker[:6]}-{n:04d}", ticker, str(yes), str(1 - yes), count, side, block, ts_ms)  # type: ignore[arg-type]


def build_alert(case: dict[str, Any]) -> Alert:
    detector = WhaleDetector(Decimal(100000), 1000)
    ticker, side = case["ticker"], case["side"]
    trades = []
    if case.get("before_yes"):
        # A small trade on the other side, five seconds before: the market's price when the sweep began.
        other = "no" if side == "yes" else "yes"
        trades.append(_trade(0, ticker, case["before_yes"], "10.00", other, block=False, ts_ms=T0_MS - 5000))
    for i, (yes_price, count) in enumerate(case["fills"], start=1):
        trades.append(_trade(i, ticker, yes_price, count, side, block=case.get("block", False), ts_ms=T0_MS + 10 * i))
    alerts = detector.add_many(trades) + detector.flush()
    assert len(alerts) == 1, case["name"]
    alert = alerts[0]
    return Alert(**{**{f: getattr(alert, f) for f in alert.__dataclass_fields__}, "market_whales_24h": case["nth"]})


def _time(raw: str | None) -> datetime | None:
    return None if raw is None else datetime.fromisoformat(raw.replace("Z", "+00:00"))


def label_of(case: dict[str, Any]) -> MarketLabel | None:
    raw = case.get("label")
    if raw is None:
        return None
    return MarketLabel(
        raw["title"],
        raw.get("series_ticker"),
        raw.get("category"),
        _time(raw.get("close_time")),
        _time(raw.get("expected_expiration_time")),
        Decimal(raw["volume_24h"]) if raw.get("volume_24h") is not None else None,
    )


def render_case(case: dict[str, Any], *, links: bool = False) -> str:
    label = label_of(case)
    link = None
    if links:
        link = market_link(label.series_ticker if label and label.series_ticker else series_of(case["ticker"]))
    return render_post(build_alert(case), label=label, link=link)


def test_twenty_cases_cover_what_the_issue_names() -> None:
    names = {case["name"] for case in CASES}
    assert len(CASES) == 20 == len(names)
    for needed in ("nfl", "weather", "fed", "crypto", "combo", "block", "no_long_shot", "yes_favourite", "no_title"):
        assert any(needed in name for name in names), needed


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_post_is_the_chosen_layout(case: dict[str, Any]) -> None:
    assert render_case(case) == case["text"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("links", [False, True], ids=["no_links", "POST_LINKS"])
def test_post_keeps_xs_rules(case: dict[str, Any], links: bool) -> None:
    text = render_case(case, links=links)
    assert weighted_length(text) <= MAX_WEIGHTED_LENGTH
    assert MENTION_RE.search(text) is None and "@" not in text
    assert len(CASHTAG_RE.findall(text)) <= 1
    assert case["ticker"] not in text.splitlines()[0]  # a ticker is never the headline
    if parse_tweet is not None:
        assert parse_tweet(text).weightedLength == weighted_length(text)
        urls = extract_urls(text)
        if links:
            assert len(urls) == 1 and text.endswith(urls[0]) and urls[0].startswith("https://kalshi.com/markets/")
        else:
            assert urls == []


_MOVE = re.compile(r"^(YES|NO) (\d+(?:\.\d+)?)¢ → (\d+(?:\.\d+)?)¢")
_NOW_YES = re.compile(r"now (\d+(?:\.\d+)?)% YES")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_move_direction_and_yes_complement(case: dict[str, Any]) -> None:
    alert = build_alert(case)
    lines = case["text"].splitlines()
    assert f"on {alert.side.upper()} at " in lines[1]  # the side and its price, once
    move = next((line for line in lines if _MOVE.match(line)), None)
    if case.get("before_yes") is None:
        assert move is None  # no trade seen before the sweep: no move claimed
        return
    if alert.is_block_trade:
        # Off the book, a block moves no price: the book's last price is shown beside it, no arrow.
        assert move is None
        before_side = Decimal(case["before_yes"]) if alert.side == "yes" else 1 - Decimal(case["before_yes"])
        assert f"last traded at {before_side * 100:f}".rstrip("0").rstrip(".") + "¢ before the block" in case["text"]
        return
    yes_before, yes_after = Decimal(case["before_yes"]), Decimal(case["fills"][-1][0])
    side_before = yes_before if alert.side == "yes" else 1 - yes_before
    side_after = yes_after if alert.side == "yes" else 1 - yes_after
    if move is None:
        assert side_before == side_after
        assert f"{alert.side.upper()} steady at {side_after * 100:f}".rstrip("0").rstrip(".") in case["text"]
        return
    side, before, after = _MOVE.match(move).groups()  # type: ignore[union-attr]
    assert side == alert.side.upper()
    assert (Decimal(after) > Decimal(before)) == (side_after > side_before)
    assert (Decimal(after) < Decimal(before)) == (side_after < side_before)
    if side == "NO":
        now_yes = _NOW_YES.search(move)
        assert now_yes is not None
        assert Decimal(now_yes.group(1)) + Decimal(after) == 100
