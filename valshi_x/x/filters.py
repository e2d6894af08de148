"""Which whales to post: the operator's filters by category, by series prefix, and for combo markets.

Pure: no asyncio, no I/O. `judge` answers for one whale from its ticker and its category (Kalshi's, from the
title lookup, or the series table's in valshi_x/markets.py). The poster asks when an alert enters the outbox,
before it can spend any budget; a whale filtered out is marked `skipped` with the reason and logged
(`would_skip` in a dry run, `skipped` live), never dropped silently. When a category rule is set and the
category is not known yet (no lookup answered so far), the answer is "ask again" and the poster asks once
more after the title lookup, still before the post is sent.

Rules, all of which a whale must pass:
- POST_COMBOS=false skips combo (KXMVE...) markets.
- SKIP_SERIES: tickers starting with one of these prefixes are skipped; POST_SERIES (when set): only tickers
  starting with one of these are posted.
- SKIP_CATEGORIES: these categories are skipped; POST_CATEGORIES (when set): only these are posted, and a
  whale whose category stays unknown after the lookup is skipped. Categories compare without case.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from valshi_x.markets import is_combo


@dataclass(frozen=True, slots=True)
class PostFilter:
    """The filters from the settings; the empty filter posts every whale."""

    post_categories: frozenset[str] = frozenset()  # casefolded
    skip_categories: frozenset[str] = frozenset()
    post_series: tuple[str, ...] = ()  # upper-case ticker prefixes
    skip_series: tuple[str, ...] = ()
    post_combos: bool = True

    @classmethod
    def of(
        cls,
        *,
        post_categories: Iterable[str] = (),
        skip_categories: Iterable[str] = (),
        post_series: Iterable[str] = (),
        skip_series: Iterable[str] = (),
        post_combos: bool = True,
    ) -> PostFilter:
        return cls(
            frozenset(c.strip().casefold() for c in post_categories if c.strip()),
            frozenset(c.strip().casefold() for c in skip_categories if c.strip()),
            tuple(s.strip().upper() for s in post_series if s.strip()),
            tuple(s.strip().upper() for s in skip_series if s.strip()),
            post_combos,
        )

    @property
    def uses_category(self) -> bool:
        return bool(self.post_categories or self.skip_categories)


@dataclass(frozen=True, slots=True)
class Verdict:
    """`post`, `skip` (with the reason, for the log and the outbox) or `ask_again` once the category is known."""

    action: Literal["post", "skip", "ask_again"]
    reason: str = ""


POST = Verdict("post")


def judge(rules: PostFilter, ticker: str, category: str | None, *, category_final: bool) -> Verdict:
    """The verdict for a whale on `ticker`; `category_final`: no better category will come (lookup done)."""
    upper = ticker.upper()
    if not rules.post_combos and is_combo(upper):
        return Verdict("skip", "combo market (POST_COMBOS=false)")
    for prefix in rules.skip_series:
        if upper.startswith(prefix):
            return Verdict("skip", f"series {prefix} is in SKIP_SERIES")
    if rules.post_series and not any(upper.startswith(prefix) for prefix in rules.post_series):
        return Verdict("skip", "series not in POST_SERIES")
    if not rules.uses_category:
        return POST
    if category is None:
        if not category_final:
            return Verdict("ask_again", "category not known yet")
        if rules.post_categories:
            return Verdict("skip", "category unknown (POST_CATEGORIES is set)")
        return POST
    folded = category.casefold()
    if folded in rules.skip_categories:
        return Verdict("skip", f"category {category} is in SKIP_CATEGORIES")
    if rules.post_categories and folded not in rules.post_categories:
        return Verdict("skip", f"category {category} not in POST_CATEGORIES")
    return POST
