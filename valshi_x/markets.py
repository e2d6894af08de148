"""What the daemon knows about a market besides its trades: the label a post shows, links, readable fallbacks.

Pure: no asyncio, no I/O, and no imports from the X or Kalshi client modules, so both can use it (the REST
client builds `MarketLabel`s, the post text reads them) without one depending on the other.

- `MarketLabel`: the market's readable title and the context the same REST lookup brings along (series,
  category, close time, 24 h volume); every field but the title may be unknown.
- `market_link` / `series_of`: the kalshi.com page of a series, and the series part of a ticker.
- `fallback_title`: a readable headline from the ticker alone, for when no title is known in time (a ticker
  is never a post's headline): the series' name from `SERIES_NAMES`, the event's date and the outcome code.
- `category_of` / `category_emoji`: the category of a market (from its label, else from `SERIES_NAMES`) and
  the marker a post puts in front of the title.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Final

COMBO_PREFIX: Final = "KXMVE"


@dataclass(frozen=True, slots=True)
class MarketLabel:
    """What a post says about its market: a readable title and, when the lookup said, its context.

    `series_ticker` makes the link; `category` is Kalshi's (e.g. "Sports"), for the marker and the filters;
    `close_time` is when trading closes (UTC), `expected_expiration_time` when Kalshi expects the outcome to be
    known; `volume_24h` is contracts traded in the last 24 hours as of the lookup (cached with the title).
    """

    title: str
    series_ticker: str | None = None
    category: str | None = None
    close_time: datetime | None = None
    expected_expiration_time: datetime | None = None
    volume_24h: Decimal | None = None


def market_link(series_ticker: str) -> str | None:
    """The market's page on kalshi.com (by series: the form that keeps working as markets come and go).

    None for a series ticker that cannot make a safe link (odd characters, too long): the whale is then posted
    without a link, never failed for want of one.
    """
    slug = series_ticker.strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", slug):
        return None
    return f"https://kalshi.com/markets/{slug}"


def series_of(ticker: str) -> str:
    """The series part of a market ticker (before the first '-'); a fallback when the lookup found no series."""
    return ticker.split("-", 1)[0]


def is_combo(ticker: str) -> bool:
    """A combo (parlay) market: Kalshi's multi-leg markets all have tickers starting KXMVE."""
    return ticker.upper().startswith(COMBO_PREFIX)


# Common series: a readable name and Kalshi's category, for the fallback headline, the marker and the filters
# when no lookup answered. Prefixes, longest match wins (KXHIGHNY before KXHIGH). Not exhaustive on purpose:
# an unknown series falls back to its code.
SERIES_NAMES: Final[dict[str, tuple[str, str]]] = {
    "KXNFLGAME": ("NFL game", "Sports"),
    "KXNFLTOTAL": ("NFL total points", "Sports"),
    "KXNFLSPREAD": ("NFL spread", "Sports"),
    "KXNFL": ("NFL", "Sports"),
    "KXNCAAFGAME": ("College football game", "Sports"),
    "KXNCAAF": ("College football", "Sports"),
    "KXNBAGAME": ("NBA game", "Sports"),
    "KXNBA": ("NBA", "Sports"),
    "KXWNBAGAME": ("WNBA game", "Sports"),
    "KXNCAAMBGAME": ("College basketball game", "Sports"),
    "KXMLBGAME": ("MLB game", "Sports"),
    "KXMLB": ("MLB", "Sports"),
    "KXNHLGAME": ("NHL game", "Sports"),
    "KXNHL": ("NHL", "Sports"),
    "KXEPLGAME": ("Premier League match", "Sports"),
    "KXUCLGAME": ("Champions League match", "Sports"),
    "KXMLSGAME": ("MLS match", "Sports"),
    "KXATPMATCH": ("ATP tennis match", "Sports"),
    "KXWTAMATCH": ("WTA tennis match", "Sports"),
    "KXPGATOUR": ("PGA Tour", "Sports"),
    "KXUFCFIGHT": ("UFC fight", "Sports"),
    "KXF1RACE": ("Formula 1 race", "Sports"),
    "KXHIGHNY": ("NYC high temperature", "Climate and Weather"),
    "KXHIGHCHI": ("Chicago high temperature", "Climate and Weather"),
    "KXHIGHLAX": ("Los Angeles high temperature", "Climate and Weather"),
    "KXHIGHMIA": ("Miami high temperature", "Climate and Weather"),
    "KXHIGHAUS": ("Austin high temperature", "Climate and Weather"),
    "KXHIGHHOU": ("Houston high temperature", "Climate and Weather"),
    "KXHIGHDEN": ("Denver high temperature", "Climate and Weather"),
    "KXHIGHPHIL": ("Philadelphia high temperature", "Climate and Weather"),
    "KXHIGH": ("High temperature", "Climate and Weather"),
    "KXRAINNYC": ("NYC rain", "Climate and Weather"),
    "KXHURCAT": ("Hurricane", "Climate and Weather"),
    "KXFEDDECISION": ("Fed rate decision", "Economics"),
    "KXFED": ("Fed funds rate", "Economics"),
    "KXCPI": ("CPI inflation", "Economics"),
    "KXCPIYOY": ("CPI inflation, year on year", "Economics"),
    "KXGDP": ("GDP growth", "Economics"),
    "KXPAYROLLS": ("Jobs report", "Economics"),
    "KXU3": ("Unemployment rate", "Economics"),
    "KXRECSSNBER": ("US recession", "Economics"),
    "KXBTCD": ("Bitcoin price", "Crypto"),
    "KXBTC": ("Bitcoin price range", "Crypto"),
    "KXETHD": ("Ethereum price", "Crypto"),
    "KXETH": ("Ethereum price range", "Crypto"),
    "KXSOLD": ("Solana price", "Crypto"),
    "KXXRPD": ("XRP price", "Crypto"),
    "KXINXU": ("S&P 500 close", "Financials"),
    "KXINX": ("S&P 500 range", "Financials"),
    "KXNASDAQ100U": ("Nasdaq-100 close", "Financials"),
    "KXNASDAQ100": ("Nasdaq-100 range", "Financials"),
    "KXWTI": ("Oil price", "Financials"),
    "KXGOLD": ("Gold price", "Financials"),
    "KXPRES": ("Presidential election", "Elections"),
    "KXSENATE": ("Senate race", "Elections"),
    "KXHOUSE": ("House race", "Elections"),
    "KXMAYOR": ("Mayoral race", "Elections"),
    "KXSHUT": ("Government shutdown", "Politics"),
    "KXTRUMP": ("Trump", "Politics"),
    "KXOSCAR": ("Oscars", "Entertainment"),
    "KXGRAMMY": ("Grammys", "Entertainment"),
    "KXTOPSONG": ("Top song", "Entertainment"),
    "KXRT": ("Rotten Tomatoes score", "Entertainment"),
}
_PREFIXES_LONGEST_FIRST: Final = sorted(SERIES_NAMES, key=len, reverse=True)

# Kalshi's categories (as its events name them) -> the marker in front of a post's title. Sports get a marker
# per league where the series says which.
CATEGORY_EMOJI: Final[dict[str, str]] = {
    "sports": "🏟️",
    "climate and weather": "🌡️",
    "economics": "🏦",
    "financials": "📈",
    "crypto": "🪙",
    "politics": "🏛️",
    "elections": "🗳️",
    "entertainment": "🎬",
    "science and technology": "🔬",
    "companies": "🏢",
    "world": "🌍",
    "health": "🩺",
    "transportation": "✈️",
    "mentions": "💬",
    "social": "💬",
}
_SPORT_EMOJI: Final[tuple[tuple[str, str], ...]] = (
    ("KXNFL", "🏈"),
    ("KXNCAAF", "🏈"),
    ("KXNBA", "🏀"),
    ("KXWNBA", "🏀"),
    ("KXNCAAMB", "🏀"),
    ("KXMLB", "⚾"),
    ("KXNHL", "🏒"),
    ("KXEPL", "⚽"),
    ("KXUCL", "⚽"),
    ("KXMLS", "⚽"),
    ("KXATP", "🎾"),
    ("KXWTA", "🎾"),
    ("KXPGA", "⛳"),
    ("KXUFC", "🥊"),
    ("KXF1", "🏎️"),
)
_MAX_CATEGORY_LEN: Final = 40


def known_series(ticker: str) -> tuple[str, str] | None:
    """(readable name, category) of the longest `SERIES_NAMES` prefix of the ticker's series, if any."""
    series = series_of(ticker).upper()
    for prefix in _PREFIXES_LONGEST_FIRST:
        if series.startswith(prefix):
            return SERIES_NAMES[prefix]
    return None


def category_of(ticker: str, label: MarketLabel | None) -> str | None:
    """The market's category: Kalshi's when the lookup brought one, else the series table's, else None."""
    if label is not None and label.category:
        return label.category[:_MAX_CATEGORY_LEN]
    known = known_series(ticker)
    return known[1] if known is not None else None


def category_emoji(ticker: str, category: str | None) -> str:
    """The marker for a post: a league's ball for known sports series, the category's sign, or nothing."""
    if category is None:
        return ""
    folded = category.casefold()
    if folded == "sports":
        series = series_of(ticker).upper()
        for prefix, emoji in _SPORT_EMOJI:
            if series.startswith(prefix):
                return emoji
    return CATEGORY_EMOJI.get(folded, "")


_MONTHS: Final = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
# The date Kalshi puts at the front of an event code: 26SEP13 (year, month, day) or 26SEP (a monthly event).
_EVENT_DATE = re.compile(r"(\d{2})(" + "|".join(_MONTHS) + r")(\d{2})?")
_OUTCOME_CODE = re.compile(r"[A-Z0-9.]{1,16}")


def fallback_title(ticker: str) -> str:
    """A readable headline from the ticker alone: "NFL game, Sep 13 2026: CHIJAC, outcome CHI".

    Used when no title came within the budget. The series' name from `SERIES_NAMES` (or its code), the event
    date the ticker carries (when it has one), what is left of the event code, and the outcome code.
    """
    parts = ticker.upper().split("-")
    series = parts[0]
    if is_combo(ticker):
        return "Combo market (legs not known yet)"
    known = known_series(ticker)
    name = known[0] if known is not None else f"Kalshi market {series}"
    event_code = parts[1] if len(parts) > 1 else ""
    outcome = parts[2] if len(parts) > 2 else ""
    when = ""
    rest = event_code
    match = _EVENT_DATE.match(event_code)
    if match is not None:
        year, month, day = match.groups()
        month_name = month.capitalize()
        when = f"{month_name} {int(day)} 20{year}" if day else f"{month_name} 20{year}"
        rest = event_code[match.end() :]
    pieces = [name]
    if when:
        pieces.append(when)
    head = ", ".join(pieces)
    tail = []
    if rest and _OUTCOME_CODE.fullmatch(rest):
        tail.append(rest)
    if outcome and _OUTCOME_CODE.fullmatch(outcome):
        tail.append(f"outcome {outcome}")
    return f"{head}: {', '.join(tail)}" if tail else head
