"""The post text: X's weighted length (cross-checked with twitter-text when installed), every number, the rules."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valshi_x.markets import MarketLabel, market_link, series_of
from valshi_x.trades import Side, Trade
from valshi_x.whales import Alert, WhaleDetector
from valshi_x.x.text import (
    DEFAULT_TEMPLATE,
    MAX_WEIGHTED_LENGTH,
    MENTION_RE,
    TEMPLATE_FIELDS,
    render_post,
    validate_template,
    weighted_length,
)


def _load_oracle() -> tuple[Callable[[str], Any], Callable[[str], list[str]]] | None:
    try:
        with warnings.catch_warnings():
            # twitter-text imports pkg_resources, which newer setuptools warn about.
            warnings.simplefilter("ignore")
            from twitter_text import extract_urls, parse_tweet
    except ImportError:
        return None
    return parse_tweet, extract_urls


ORACLE = _load_oracle()
needs_oracle = pytest.mark.skipif(ORACLE is None, reason="twitter-text-parser is not installed")


def x_length(text: str) -> int:
    assert ORACLE is not None
    return int(ORACLE[0](text).weightedLength)


def x_urls(text: str) -> list[str]:
    assert ORACLE is not None
    return ORACLE[1](text)


# ---------------------------------------------------------------------------------------------------------------
# Weighted length

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man, woman, girl joined by ZWJ
LENGTHS = [
    ("", 0),
    ("hello world", 11),
    ("a" * 280, 280),
    ("é", 1),
    ("e\u0301", 1),  # NFC folds it into é
    ("漢字", 4),
    ("한국어", 6),
    ("€", 2),
    ("…", 2),
    ("•", 2),
    ("→", 2),
    ("™", 2),
    ("—", 1),
    ("·", 1),
    ("¢", 1),
    ("©", 2),
    ("🐋", 2),
    ("❤\ufe0f", 2),
    ("👍🏽", 2),
    (FAMILY, 2),
    ("👩🏽\u200d💻", 2),
    ("🇺🇸", 2),
    ("🇺🇸🇬", 4),
    ("1\ufe0f\u20e3", 2),
    ("🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", 2),
    ("a\u200db", 3),
    ("line\r\nbreak", 10),
    ("kalshi.com", 23),
    ("example.io", 23),
    ("(kalshi.com)", 25),
    ("kalshi.com.", 24),
    ("see example.io/path?x=1 now", 4 + 23 + 4),
    ("https://kalshi.com/markets/kxbtc", 23),
    ("https://kalshi.com/markets/" + "x" * 60, 23),
    ("http://localhost/x", 18),
    ("a@kalshi.com", 12),
    ("$kalshi.com", 11),
    ("St.Louis and Mr.Beast", 21),
    ("e.g. v1.2", 9),
    ("Kalshi\u2024com", 11),
    ("$125,000 on YES", 15),
    ("🐋 $1,234,567 · 漢字 https://kalshi.com/markets/kxa", 2 + 1 + 10 + 3 + 4 + 1 + 23),
]


@pytest.mark.parametrize(("text", "expected"), LENGTHS)
def test_weighted_length_table(text: str, expected: int) -> None:
    assert weighted_length(text) == expected


@needs_oracle
@pytest.mark.parametrize(("text", "expected"), LENGTHS)
def test_weighted_length_table_matches_twitter_text(text: str, expected: int) -> None:
    assert x_length(text) == expected


_ALPHABET = list("abcXYZ019 ,;!?-'()\n\r\t") + list("漢字한€…•→™—·¢é©\u0301\u2032") + ["🐋", "😀", "❤", "🫠"]


@needs_oracle
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_ALPHABET), max_size=120).map("".join))
def test_weighted_length_agrees_with_twitter_text(text: str) -> None:
    assert weighted_length(text) == x_length(text)


# ---------------------------------------------------------------------------------------------------------------
# Alerts built the way the daemon builds them

T0_MS = int(datetime(2026, 9, 1, 14, 3, 27, 250000, tzinfo=UTC).timestamp() * 1000)


def trade(n: int, ticker: str, yes_price: str, count: str, side: Side = "yes", *, block: bool = False) -> Trade:
    yes = Decimal(yes_price)
    return Trade(f"t{n}", ticker, str(yes), str(Decimal(1) - yes), count, side, block, T0_MS + n)


def alert_of(*trades: Trade) -> Alert:
    detector = WhaleDetector(Decimal(100000), 1000)
    alerts = detector.add_many(trades) + detector.flush()
    assert len(alerts) == 1
    return alerts[0]


NFL = "KXNFLGAME-26NOV01KCBUF-KC"
SWEEP = alert_of(
    trade(0, NFL, "0.58", "100000.00"),
    trade(1, NFL, "0.60", "60000.00"),
    trade(2, NFL, "0.62", "40000.00"),
)
BLOCK_NO = alert_of(trade(0, "KXFED-26DEC-T4.00", "0.5500", "250000.00", "no", block=True))
FRACTIONAL = alert_of(trade(0, "KXBTCD-26SEP0117-T110000", "0.7100", "147000.53"))
LONG_SHOT = alert_of(trade(0, "KXPRES-28-JDOE", "0.0025", "48000000.00"))


def test_sweep_post_exactly() -> None:
    # Title first (with the league's marker), the money, side and price once, the fills' range (no trade before
    # the sweep was seen), what it pays; no trade time (X stamps the post) and whole contracts.
    text = render_post(SWEEP, title="Kansas City at Buffalo Winner? — Kansas City")
    assert text == (
        "🏈 Kansas City at Buffalo Winner? — Kansas City\n"
        "🐋 $118,800.00 on YES at 59.4¢ · 3 fills\n"
        "YES 58¢\u201362¢ in 3 fills\n"
        "Pays $200,000 if YES wins"
    )


def test_no_post_names_nos_price_and_the_yes_chance() -> None:
    # The misreading of issue 10: "at 8¢ (8% implied)" under a title reads as the event's chance. A NO post names
    # the side beside its price and gives the market's chance of YES, labelled, which is 100 minus NO's price.
    long_no = alert_of(
        trade(0, "KXFEDDECISION-26DEC-H0", "0.9200", "1000000.00", "no"),
        trade(1, "KXFEDDECISION-26DEC-H0", "0.9300", "500000.00", "no"),
    )
    text = render_post(long_no, title="Fed decision in Dec 2026? — Hike 0bps")
    assert text == (
        "🏦 Fed decision in Dec 2026? — Hike 0bps\n"
        "🐋 $115,000.00 on NO at 7.7¢ · 2 fills\n"
        "NO 7¢\u20138¢ in 2 fills · now 93% YES\n"
        "Pays $1,500,000 if NO wins"
    )
    assert "implied" not in text


@pytest.mark.parametrize(
    ("no_price", "price_cents", "yes_pct"),
    [
        ("0.0845", "8.5¢", "91.5%"),  # rounded half up once, on the side bought; the two still add to 100
        ("0.0035", "0.35¢", "99.65%"),
        ("0.9996", "99.96¢", "0.04%"),
        ("0.5000", "50¢", "50%"),
    ],
)
def test_no_price_and_yes_chance_add_to_100(no_price: str, price_cents: str, yes_pct: str) -> None:
    count = (Decimal(100000) / Decimal(no_price)).quantize(Decimal("0.01")) + 1
    alert = alert_of(trade(0, "KXA-1", str(1 - Decimal(no_price)), str(count), "no"))
    assert render_post(alert, title=None, template="{price_cents} {yes_pct} {time}") == (
        f"{price_cents} {yes_pct} 14:03:27 UTC"
    )


LINK = "https://kalshi.com/markets/kxa"


def fields_of(alert: Alert) -> list[str]:
    template = "|".join("{" + name + "}" for name in TEMPLATE_FIELDS)
    return render_post(alert, title="T", template=template, link=LINK).split("|")


_COMMON = ["14:03:27 UTC", "2026-09-01"]


@pytest.mark.parametrize(
    ("alert", "expected"),
    [
        (
            SWEEP,
            [
                "$118,800",
                "T",
                "YES",
                "59.4¢",
                "58¢\u201362¢",
                "59.4%",
                "200,000",
                "$200,000",
                "3",
                " · 3 fills",
                *_COMMON,
                NFL,
                LINK,
                "59.4%",
                "🏈",
                "Sports",
                "$118,800.00",
                "YES 58¢\u201362¢ in 3 fills",
                "",
                "",
                "",
                "",
                "t0",
            ],
        ),
        (
            BLOCK_NO,
            [
                "$112,500",
                "T",
                "NO",
                "45¢",
                "45¢",
                "45%",
                "250,000",
                "$250,000",
                "1",
                " · block trade",
                *_COMMON,
                "KXFED-26DEC-T4.00",
                LINK,
                "55%",
                "🏦",
                "Economics",
                "$112,500.00",
                "",
                "",
                "",
                "",
                "",
                "t0",
            ],
        ),
        (
            FRACTIONAL,
            [
                "$104,370",
                "T",
                "YES",
                "71¢",
                "71¢",
                "71%",
                "147,001",
                "$147,001",
                "1",
                "",
                *_COMMON,
                "KXBTCD-26SEP0117-T110000",
                LINK,
                "71%",
                "🪙",
                "Crypto",
                "$104,370.38",
                "",
                "",
                "",
                "",
                "",
                "t0",
            ],
        ),
        (
            LONG_SHOT,
            [
                "$120,000",
                "T",
                "YES",
                "0.25¢",
                "0.25¢",
                "0.25%",
                "48,000,000",
                "$48,000,000",
                "1",
                "",
                *_COMMON,
                "KXPRES-28-JDOE",
                LINK,
                "0.25%",
                "🗳️",
                "Elections",
                "$120,000.00",
                "",
                "",
                "",
                "",
                "",
                "t0",
            ],
        ),
    ],
    ids=["sweep", "block_no", "fractional", "long_shot"],
)
def test_every_field(alert: Alert, expected: list[str]) -> None:
    assert dict(zip(TEMPLATE_FIELDS, fields_of(alert), strict=True)) == dict(
        zip(TEMPLATE_FIELDS, expected, strict=True)
    )


def test_alert_values_behind_the_fields() -> None:
    # The figures above are the alert's own, not re-derived by the text module.
    assert (SWEEP.value_usd, SWEEP.contracts, SWEEP.fills) == (Decimal("118800.0000"), Decimal(200000), 3)
    assert (BLOCK_NO.side, BLOCK_NO.value_usd, BLOCK_NO.is_block_trade) == ("no", Decimal("112500.0000"), True)
    assert FRACTIONAL.value_usd == Decimal("104370.376300")
    assert LONG_SHOT.value_usd == Decimal("120000.0000")


def test_sub_penny_and_rounding() -> None:
    alert = alert_of(trade(0, "KXA-1", "0.6250", "160001.00"))  # $100,000.625 → rounds half up
    fields = render_post(alert, title=None, template="{value} {price_cents} {odds_pct} {time}")
    assert fields == "$100,001 62.5¢ 62.5% 14:03:27 UTC"
    lock = alert_of(trade(0, "KXA-1", "0.9996", "100100.00"))
    assert render_post(lock, title=None, template="{price_cents} {time}") == "99.96¢ 14:03:27 UTC"


def test_no_title_falls_back_to_a_readable_name() -> None:
    # A ticker is never the headline: the series' name, the event's date and the outcome code stand in.
    text = render_post(BLOCK_NO, title=None)
    assert text.splitlines()[0] == "🏦 Fed funds rate, Dec 2026: outcome T4.00"
    assert render_post(BLOCK_NO, title="   ") == text
    nfl = render_post(SWEEP, title=None).splitlines()[0]
    assert nfl == "🏈 NFL game, Nov 1 2026: KCBUF, outcome KC"
    unknown = render_post(alert_of(trade(0, "KXODDTHING-26SEP13-A", "0.5", "300000.00")), title=None)
    assert unknown.splitlines()[0] == "Kalshi market KXODDTHING, Sep 13 2026: outcome A"


def test_default_posts_fit_and_agree_with_x() -> None:
    for alert in (SWEEP, BLOCK_NO, FRACTIONAL, LONG_SHOT):
        text = render_post(alert, title="Who will win the 2028 presidential election? — Jane Doe")
        assert weighted_length(text) <= MAX_WEIGHTED_LENGTH
        if ORACLE is not None:
            assert x_length(text) == weighted_length(text)
            assert x_urls(text) == []


# ---------------------------------------------------------------------------------------------------------------
# Length: the title gives way, numbers never do

NUMBER_LINES = render_post(SWEEP, title="x").splitlines()[1:]


@pytest.mark.parametrize(
    ("title", "at_least"),
    [
        ("Will the " + "very " * 80 + "long title resolve?", 276),
        ("Lorem ipsum dolor sit amet, " * 12, 270),
        ("２０２８年アメリカ合衆国大統領選挙で勝利するのは誰ですか" * 8, 276),
        # Emoji sequences are fitted by their code points (X's emoji list is not ours), so they may fall short.
        ("🏈" * 30 + FAMILY * 40 + "👍🏽" * 30, 150),
    ],
    ids=["ascii", "commas", "cjk", "emoji"],
)
def test_long_titles_are_cut_to_fit(title: str, at_least: int) -> None:
    text = render_post(SWEEP, title=title)
    lines = text.splitlines()
    assert at_least <= weighted_length(text) <= MAX_WEIGHTED_LENGTH
    if ORACLE is not None:
        assert x_length(text) <= MAX_WEIGHTED_LENGTH
    assert lines[1:] == NUMBER_LINES
    assert lines[0].startswith("🏈 ")
    assert lines[0].endswith("…")
    assert title.startswith(lines[0].removeprefix("🏈 ").removesuffix("…"))
    assert "\u200d…" not in text  # an emoji sequence is never cut in half


def test_template_that_cannot_fit_is_refused() -> None:
    template = "x" * 270 + " {value} {time}"
    with pytest.raises(ValueError, match="no title to cut"):
        render_post(SWEEP, title="t", template=template)
    with pytest.raises(ValueError, match="no room for a title"):
        render_post(SWEEP, title="t", template="y" * 260 + " {title} {value} {time}")


# ---------------------------------------------------------------------------------------------------------------
# Mentions, cashtags, links


@pytest.mark.parametrize(
    ("title", "shown"),
    [
        ("Will @elonmusk post 100 times?", "Will elonmusk post 100 times?"),
        ("Will \uff20nasa launch?", "Will nasa launch?"),
        ("Rain @ 5pm in NYC?", "Rain at 5pm in NYC?"),
        ("mail a@b.io or @@x", "mail a at b\u2024io or at x"),
    ],
)
def test_no_mention_survives(title: str, shown: str) -> None:
    text = render_post(SWEEP, title=title)
    assert text.splitlines()[0] == "🏈 " + shown
    assert "@" not in text
    assert "\uff20" not in text
    assert MENTION_RE.search(text) is None


def test_cashtags_in_titles_are_neutralised() -> None:
    text = render_post(SWEEP, title="Will $BTC beat $ETH and $SOL above $125,000?")
    assert text.splitlines()[0] == "🏈 Will BTC beat ETH and SOL above $125,000?"
    assert re.search(r"\$[A-Za-z]", text) is None
    assert "$118,800.00" in text  # dollar amounts stay


def test_template_may_hold_one_cashtag_but_not_two() -> None:
    validate_template("$BTC whale {value} {time}")
    text = render_post(SWEEP, title="$ETH", template="$BTC whale {value} {title} {time}")
    assert text == "$BTC whale $118,800 ETH 14:03:27 UTC"
    with pytest.raises(ValueError, match="cashtag"):
        validate_template("$BTC and $ETH {time}")


def test_ticker_glued_to_a_dollar_sign_counts_as_cashtag() -> None:
    alert = alert_of(trade(0, "KXBTC-26", "0.5", "300000.00"))
    with pytest.raises(ValueError, match="cashtag"):
        render_post(alert, title=None, template="$ETH ${ticker} {time}")


def test_domains_in_titles_are_not_links() -> None:
    text = render_post(SWEEP, title="Will Kalshi.com, x.com or U.S.Sa go down?")
    assert text.splitlines()[0] == "🏈 Will Kalshi\u2024com, x\u2024com or U.S\u2024Sa go down?"
    if ORACLE is not None:
        assert x_urls(text) == []
        assert x_length(text) == weighted_length(text)


def test_link_only_when_given() -> None:
    link = market_link("KXNFLGAME")
    assert link == "https://kalshi.com/markets/kxnflgame"
    with_link = render_post(SWEEP, title="t", link=link)
    without = render_post(SWEEP, title="t")
    assert with_link == without + "\n" + link
    assert "http" not in without
    assert weighted_length(with_link) == weighted_length(without) + 1 + 23
    if ORACLE is not None:
        assert x_urls(with_link) == [link]
        assert x_length(with_link) == weighted_length(with_link)


def test_link_placeholder_line_disappears_without_link() -> None:
    template = "{value} {time}\\n{link}\\nend"
    assert render_post(SWEEP, title=None, template=template) == "$118,800 14:03:27 UTC\nend"
    assert render_post(SWEEP, title=None, template=template, link="https://kalshi.com/markets/kxa") == (
        "$118,800 14:03:27 UTC\nhttps://kalshi.com/markets/kxa\nend"
    )


def test_market_link_and_series() -> None:
    assert series_of(NFL) == "KXNFLGAME"
    assert MarketLabel("t").series_ticker is None
    assert market_link("../etc") is None  # no safe link: the post goes without one (issue 9 item 11)


# ---------------------------------------------------------------------------------------------------------------
# Uniqueness and templates


def test_exact_value_keeps_texts_unique_and_time_is_not_shown() -> None:
    # Two whales a cent apart read differently; the trade time (which read as a settlement time) is gone.
    cent_more = dataclasses.replace(SWEEP, value_usd=SWEEP.value_usd + Decimal("0.01"))
    assert render_post(cent_more, title="t") != render_post(SWEEP, title="t")
    assert "$118,800.01" in render_post(cent_more, title="t")
    assert "UTC" not in render_post(SWEEP, title="t")


def test_default_template_is_valid_and_used_for_empty() -> None:
    validate_template("")
    validate_template(DEFAULT_TEMPLATE)
    assert render_post(SWEEP, title="t", template="") == render_post(SWEEP, title="t", template=DEFAULT_TEMPLATE)


def test_custom_template_with_escaped_newlines_and_braces() -> None:
    template = "{{whale}} {value} {side} at {time}\\n{title} ({ticker})"
    validate_template(template)
    assert render_post(SWEEP, title="Chiefs", template=template) == (
        f"{{whale}} $118,800 YES at 14:03:27 UTC\nChiefs ({NFL})"
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{value} {tim}", r"unknown placeholder \{tim\}"),
        ("{value {time}", "braces do not match"),
        ("value} {time}", "braces do not match"),
        ("{} {time}", "empty placeholder"),
        ("{value:>12} {time}", "takes no format"),
        ("{value!r} {time}", "takes no format"),
        ("{value.real} {time}", "unknown placeholder"),
        ("{value} on {side}", r"must contain \{value_exact\}, \{time\} or \{ref\}"),
        ("hey @kalshi {value} {time}", "must not contain '@'"),
        ("x" * 300 + "{time}", "too long"),
    ],
)
def test_bad_templates_are_explained(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_template(template)


def test_titles_become_one_line() -> None:
    text = render_post(SWEEP, title="Line one\nLine two\t\r end  ")
    assert text.splitlines()[0] == "🏈 Line one Line two end"


_TITLE_ALPHABET = [*"aZ09 .,:/@$#-_?", "\uff20", "\uff04", "com", "io", "https://", "漢", "🐋", FAMILY, "é", "BTC"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TITLE_ALPHABET), max_size=200).map("".join))
def test_any_title_gives_a_post_within_the_rules(title: str) -> None:
    text = render_post(SWEEP, title=title)
    assert weighted_length(text) <= MAX_WEIGHTED_LENGTH
    assert MENTION_RE.search(text) is None
    assert "@" not in text
    assert re.search(r"\$[A-Za-z]", text) is None
    assert text.splitlines()[1:] == NUMBER_LINES
    if ORACLE is not None:
        assert x_length(text) <= MAX_WEIGHTED_LENGTH
        assert x_urls(text) == []
