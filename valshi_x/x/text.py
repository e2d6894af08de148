"""The text of a post: X's weighted length, the template, and the rules a post must keep.

Pure: no asyncio, no I/O. `render_post` turns an `Alert` (plus the market's title, when the REST lookup found
one) into the text sent to X; the poster and the dry-run call it alike.

Template
--------
`POST_TEMPLATE` is plain text with `{placeholders}`; empty means `DEFAULT_TEMPLATE`. A literal brace is written
twice (`{{`, `}}`); the two characters backslash-n start a new line (an environment value cannot easily hold a
real newline). Each line is trimmed; a line that holds only placeholders which all came out empty (e.g.
`{link}` with links off, `{nth_note}` for a market's first whale) is dropped. The placeholders
(`TEMPLATE_FIELDS`, each with an example in docs/posting-notes-text.md):

    {emoji}        the category's marker: 🏈 🏀 ⚾ 🏒 ⚽ for known leagues, 🌡️ weather, 🏦 economics, 🪙 crypto ...;
                   nothing when the category is unknown
    {category}     Kalshi's category of the market: Sports, Climate and Weather, ...; nothing when unknown
    {title}        the market's title from Kalshi; when none came in time, a readable stand-in from the ticker
                   ("NFL game, Sep 13 2026: CHIJAC, outcome CHI"); shortened with "…" if the post would be too long
    {value}        what the taker paid, in whole dollars: $1,234,567
    {value_exact}  the same to the cent: $1,234,567.89 (what keeps two similar whales' texts apart)
    {side}         the side bought: YES or NO
    {price_cents}  the average price paid per contract (value ÷ contracts), in cents: 62¢, 60.8¢, 0.35¢
    {price_range}  lowest and highest fill price, joined by an en dash: 58¢ and 62¢ (62¢ alone when all fills had
                   one price)
    {move}         the side's price at the market's last trade before the sweep and at its last fill: "NO 45¢ →
                   47¢"; on a NO buy followed by the market's YES chance after it ("· now 53% YES"); for a block
                   trade, the book's last price before it ("NO last traded at 9¢ before the block"); without a
                   trade before the sweep, the fills' range ("NO 45¢ to 47¢ in 7 fills", with an en dash), or
                   nothing for one fill
    {odds_pct}     the chance the price gives the side bought (NO's chance on a NO buy), which is the average
                   price: 62%
    {yes_pct}      the market's YES probability at this trade: the average price on a YES buy, 100 minus it on
                   a NO buy (NO at 8¢ → 92%)
    {contracts}    contracts bought, whole: 1,991,237
    {payout}       what the contracts pay if the side bought wins ($1 each), whole dollars: $1,991,237
    {fills}        how many fills (trades) the order was made of: 3
    {fills_note}   " · block trade", " · 3 fills", or nothing for a single fill
    {volume_note}  the size against the market's 24 h volume (contracts, as of the title lookup):
                   " · 38% of 24h volume", " · 2.4x its 24h volume", or nothing when unknown
    {nth}          how many whales this market had in the 24 h up to this one, this one included: 3
    {nth_note}     "3rd whale on this market in 24h", or nothing for the first
    {closes}       when the market closes, or when Kalshi expects the outcome if that is earlier:
                   "Closes Sep 13, 20:00 UTC" / "Outcome expected Sep 13, 23:00 UTC"; nothing when unknown
    {time}         time of the (first) trade: 14:03:27 UTC
    {date}         date of the trade, UTC: 2026-09-01
    {ticker}       the market ticker: KXNFLGAME-26NOV01KCBUF-KC
    {ref}          a short reference of the whale (its first trade id, 8 characters): 7e91a7fe
    {link}         the market's kalshi.com page, only when links are on (POST_LINKS); otherwise nothing

A template must contain one of `{value_exact}`, `{time}` or `{ref}`: X rejects a text identical to an earlier
post, and these are what keep two similar whales apart. When links are on and the template has no `{link}`,
the link goes on a last line of its own.

Rules every post keeps
----------------------
- Weighted length at most 280 by X's counting (`weighted_length`). When a post is too long the title is cut
  (ending in "…"); numbers are never cut. A template too long even with a one-character title is refused.
- No @mentions: in titles an "@" before a name is dropped ("@elonmusk" → "elonmusk") and any other "@" becomes
  "at"; a template may not contain "@" at all.
- At most one cashtag: a "$" followed by a letter in a title or ticker loses the "$" (a dollar amount such as
  $125,000 is not a cashtag); a template may hold at most one.
- No accidental links: titles and tickers go through `valshi_x.sanitize.clean_post_text` (invisible, bidi and
  line-breaking characters dropped; a dot before two letters becomes U+2024 ONE DOT LEADER, which looks the same,
  so "Kalshi.com", "https://♥.com/x" or "kalshi\u200d.com" neither link nor bill the post as one with a URL).
  A last check refuses a post holding any link but the market's own, which is added only when POST_LINKS is on.
"""

from __future__ import annotations

import re
import string
import unicodedata
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from valshi_x.markets import MarketLabel, category_emoji, category_of, fallback_title
from valshi_x.sanitize import clean_post_text, find_link
from valshi_x.whales import Alert

MAX_WEIGHTED_LENGTH = 280
URL_WEIGHT = 23  # X counts every link as 23, whatever its length (t.co wrapping)

# Read as a follower would (docs/posting-notes-text.md has twenty examples): what the market is first, then the
# money, side and price once, how the price moved, what it pays and how big that is for this market, whether
# the market has seen whales lately, and when it ends. The exact dollar value keeps texts unique; X stamps the
# time itself.
DEFAULT_TEMPLATE = (
    "{emoji} {title}\n"
    "🐋 {value_exact} on {side} at {price_cents}{fills_note}\n"
    "{move}\n"
    "Pays {payout} if {side} wins{volume_note}\n"
    "{nth_note}\n"
    "{closes}"
)

TEMPLATE_FIELDS: tuple[str, ...] = (
    "value",
    "title",
    "side",
    "price_cents",
    "price_range",
    "odds_pct",
    "contracts",
    "payout",
    "fills",
    "fills_note",
    "time",
    "date",
    "ticker",
    "link",
    "yes_pct",
    "emoji",
    "category",
    "value_exact",
    "move",
    "volume_note",
    "nth",
    "nth_note",
    "closes",
    "ref",
)
# One of these makes two posts' texts differ (see the module docstring).
UNIQUE_FIELDS: tuple[str, ...] = ("value_exact", "time", "ref")

ELLIPSIS = "…"
_EN_DASH = "\u2013"
_WHOLE = Decimal(1)
_HUNDRED = Decimal(100)
_ONE_DECIMAL = Decimal("0.1")
_TWO_DECIMALS = Decimal("0.01")


# ---------------------------------------------------------------------------------------------------------------
# Weighted length


def _weight_of(cp: int) -> int:
    """X's weight of one code point outside links and emoji sequences."""
    if cp <= 0x10FF:
        # © and ® are emoji to X even on their own.
        return 2 if cp in (0xA9, 0xAE) else 1
    if 0x2000 <= cp <= 0x200D or 0x2010 <= cp <= 0x201F or 0x2032 <= cp <= 0x2037:
        return 1
    return 2


_EMOJI_START_RANGES: tuple[tuple[int, int], ...] = (
    (0x00A9, 0x00A9),
    (0x00AE, 0x00AE),
    (0x203C, 0x203C),
    (0x2049, 0x2049),
    (0x2122, 0x2122),
    (0x2139, 0x2139),
    (0x2190, 0x21FF),
    (0x2300, 0x23FF),
    (0x2460, 0x24FF),
    (0x25A0, 0x27BF),
    (0x2900, 0x297F),
    (0x2B00, 0x2BFF),
    (0x3030, 0x3030),
    (0x303D, 0x303D),
    (0x3297, 0x3297),
    (0x3299, 0x3299),
    (0x1F000, 0x1FAFF),
)
_KEYCAP_BASES = frozenset("0123456789#*")
_ZWJ = 0x200D
_KEYCAP = 0x20E3


def _is_emoji_start(cp: int) -> bool:
    return any(low <= cp <= high for low, high in _EMOJI_START_RANGES)


def _is_emoji_modifier(cp: int) -> bool:
    # Variation selectors, skin tones, the keycap mark and tag characters extend the emoji before them.
    return cp in (0xFE0E, 0xFE0F, _KEYCAP) or 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F


def _is_regional_indicator(cp: int) -> bool:
    return 0x1F1E6 <= cp <= 0x1F1FF


def _cluster_end(text: str, start: int) -> tuple[int, bool]:
    """End of the user-perceived character starting at `start`, and whether it is an emoji (sequence)."""
    n = len(text)
    cp = ord(text[start])
    end = start + 1
    if _is_regional_indicator(cp):
        if end < n and _is_regional_indicator(ord(text[end])):
            end += 1  # a flag is a pair of regional indicators
        return end, True
    keycap = text[start] in _KEYCAP_BASES and end < n and ord(text[end]) in (0xFE0F, _KEYCAP)
    if keycap or _is_emoji_start(cp):
        while end < n:
            nxt = ord(text[end])
            if _is_emoji_modifier(nxt):
                end += 1
            elif nxt == _ZWJ and end + 1 < n and _is_emoji_start(ord(text[end + 1])):
                end += 2
            else:
                break
        return end, True
    while end < n and unicodedata.combining(text[end]):
        end += 1  # a combining mark NFC could not fold stays with its base
    return end, False


def _clusters(text: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(text):
        end, _ = _cluster_end(text, i)
        out.append(text[i:end])
        i = end
    return out


def _plain_length(text: str, *, emoji_sequences: bool) -> int:
    total = 0
    i = 0
    while i < len(text):
        end, emoji = _cluster_end(text, i)
        if emoji and emoji_sequences:
            total += 2
        else:
            total += sum(_weight_of(ord(ch)) for ch in text[i:end])
        i = end
    return total


# Common generic top-level domains; any two-letter label counts as a country code. X's own list is longer:
# a bare domain under a rarer gTLD counts here as text. Titles never reach X with anything domain-like
# (see `_clean`), so for posts this only matters in a template's own text.
_GTLDS = (
    "academy|agency|app|art|bet|bike|biz|blog|bot|buzz|cam|capital|casino|cash|chat|click|cloud|club|codes|com|"
    "company|crypto|dev|digital|email|exchange|finance|fit|fun|fund|game|games|gg|global|gov|group|guru|inc|info|"
    "ink|int|io|land|life|link|live|ltd|market|markets|me|media|mil|mobi|money|name|net|network|news|ninja|one|"
    "online|org|page|plus|poker|pro|run|shop|site|social|solutions|space|store|stream|studio|systems|team|tech|"
    "today|tools|top|trade|trading|tv|vip|wiki|win|works|world|wtf|xyz|zone"
)
_URL_PATH = r"(?:/(?:[^\s]*[^\s.,;:!?'\"()\[\]<>])?)?(?:\?(?:[^\s]*[^\s.,;:!?'\"()\[\]<>])?)?"
_URL_RE = re.compile(
    # with a scheme: any dotted host whose last label is letters
    r"(?<![A-Za-z0-9@\uff20$#\uff03])https?://(?:[^\s/?#:.]+\.)+[^\W\d_]{2,}(?::\d{1,5})?"
    + _URL_PATH
    # without: an ASCII host under a known TLD, not glued to a word, @, $, # or another dot
    + r"|(?<![A-Za-z0-9_@\uff20$#\uff03./-])(?:[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?\.)+(?:"
    + _GTLDS
    + r"|[a-z]{2})"
    r"(?![a-z0-9@_-])(?::\d{1,5})?" + _URL_PATH,
    re.IGNORECASE,
)
_LINE_ENDINGS = re.compile(r"\r\n|\r")


def _length(text: str, *, emoji_sequences: bool) -> int:
    text = _LINE_ENDINGS.sub("\n", unicodedata.normalize("NFC", text))
    total = 0
    pos = 0
    for match in _URL_RE.finditer(text):
        total += _plain_length(text[pos : match.start()], emoji_sequences=emoji_sequences) + URL_WEIGHT
        pos = match.end()
    return total + _plain_length(text[pos:], emoji_sequences=emoji_sequences)


def weighted_length(text: str) -> int:
    """Length of `text` as X counts it (NFC first; links 23; CJK, emoji and most symbols 2; Latin 1)."""
    return _length(text, emoji_sequences=True)


def _safe_length(text: str) -> int:
    # Counting every code point of an emoji sequence on its own never undercounts, whatever X's emoji list is;
    # it is what the 280 check uses, so an emoji X does not know cannot push a post over the limit.
    return _length(text, emoji_sequences=False)


# ---------------------------------------------------------------------------------------------------------------
# Cleaning what comes from outside (titles, tickers)

_HANDLE = re.compile(r"(?<![A-Za-z0-9_])[@\uff20](?=[A-Za-z0-9_])")
_AT = re.compile(r"\s*[@\uff20]\s*")
_CASHTAG = re.compile(r"[$\uff04]+(?=[^\W\d_])")
# What X reads as a mention or a cashtag; used to check templates and in tests.
MENTION_RE = re.compile(r"(?<![A-Za-z0-9_!#$%&*@\uff20])[@\uff20][A-Za-z0-9_]")
CASHTAG_RE = re.compile(r"(?<![\w$])\$[A-Za-z]{1,6}(?:[._][A-Za-z]{1,2})?(?![\w$])")


def _clean(raw: str) -> str:
    """Make outside text safe to post: one line, visible characters, no links (the sanitizer), no mentions, no
    cashtags (X's rules)."""
    text = clean_post_text(raw)
    text = _HANDLE.sub("", text)
    text = _AT.sub(" at ", text)
    text = _CASHTAG.sub("", text)
    # Once more: dropping an "@" or "$" can join a dot to letters ("a.\uff20aa" -> "a.aa"); the sanitizer adds neither.
    return clean_post_text(text)


# ---------------------------------------------------------------------------------------------------------------
# Numbers


def _strip_zeros(number: Decimal) -> str:
    text = f"{number:,f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _usd(amount: Decimal) -> str:
    return f"${amount.quantize(_WHOLE, rounding=ROUND_HALF_UP):,}"


def _usd_exact(amount: Decimal) -> str:
    return f"${amount.quantize(_TWO_DECIMALS, rounding=ROUND_HALF_UP):,}"


def _contracts(count: Decimal) -> str:
    """Whole contracts: a fraction of a contract says nothing next to a whale's hundreds of thousands."""
    return f"{count.quantize(_WHOLE, rounding=ROUND_HALF_UP):,}"


def _cents(price_dollars: Decimal) -> str:
    """A price as cents: one decimal between 1¢ and 99¢, two outside (a long shot at 0.35¢, a lock at 99.96¢)."""
    cents = price_dollars * _HUNDRED
    step = _ONE_DECIMAL if 1 <= cents <= 99 else _TWO_DECIMALS
    return _strip_zeros(cents.quantize(step, rounding=ROUND_HALF_UP))


def _complement_cents(shown: str) -> str:
    """100 minus a price as shown: the YES side of a NO price, with the same decimals, so the two add to 100."""
    return _strip_zeros(_HUNDRED - Decimal(shown.replace(",", "")))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _side_price(yes_price: Decimal, side: str) -> Decimal:
    return yes_price if side == "yes" else 1 - yes_price


def _move(alert: Alert) -> str:
    """How the side's price moved: from the market's last trade before the sweep to the sweep's last fill."""
    side = alert.side.upper()
    if alert.is_block_trade:
        # Negotiated off the book: its price moved nothing, so the book's last price is what compares.
        if alert.yes_before is None:
            return ""
        return f"{side} last traded at {_cents(_side_price(alert.yes_before, alert.side))}¢ before the block"
    if alert.yes_after is not None and alert.yes_before is not None:
        before = _cents(_side_price(alert.yes_before, alert.side))
        after = _cents(_side_price(alert.yes_after, alert.side))
        moved = f"{side} steady at {after}¢" if before == after else f"{side} {before}¢ → {after}¢"
    else:
        low, high = _cents(alert.price_low), _cents(alert.price_high)
        if low == high:
            return "" if alert.side == "yes" else f"Market now {_complement_cents(low)}% YES"
        moved = f"{side} {low}¢{_EN_DASH}{high}¢ in {alert.fills} fills"
        after = _cents(_side_price(alert.yes_after, alert.side)) if alert.yes_after is not None else high
    if alert.side == "no":
        # A NO price leaves the reader to work out what the market now says about YES: say it.
        moved += f" · now {_complement_cents(after)}% YES"
    return moved


def _volume_note(contracts: Decimal, volume_24h: Decimal | None) -> str:
    if volume_24h is None or volume_24h <= 0:
        return ""
    share = contracts / volume_24h
    if share >= 1:
        return f" · {share.quantize(_ONE_DECIMAL, rounding=ROUND_HALF_UP)}x its 24h volume"
    pct = (share * _HUNDRED).quantize(_WHOLE, rounding=ROUND_HALF_UP)
    return f" · {pct}% of 24h volume" if pct >= 1 else " · <1% of 24h volume"


def _when(moment: datetime, trade_year: int) -> str:
    text = f"{moment:%b} {moment.day}"
    if moment.year != trade_year:
        text += f" {moment.year}"
    return f"{text}, {moment:%H:%M} UTC"


def _closes(label: MarketLabel | None, traded: datetime) -> str:
    """When the market ends, as far as Kalshi said: the expected outcome when earlier than the close."""
    if label is None:
        return ""
    close, expected = label.close_time, label.expected_expiration_time
    if expected is not None and expected > traded and (close is None or expected < close):
        return f"Outcome expected {_when(expected, traded.year)}"
    if close is not None and close > traded:
        return f"Closes {_when(close, traded.year)}"
    return ""


_REF_CHARS = re.compile(r"[^A-Za-z0-9]")


def _fields(alert: Alert, title: str, link: str, label: MarketLabel | None) -> dict[str, str]:
    avg_price = alert.value_usd / alert.contracts
    avg_cents = _cents(avg_price)
    # From the shown price, not recomputed from 1 - price: rounding both could make them add to 100.1.
    yes_cents = avg_cents if alert.side == "yes" else _complement_cents(avg_cents)
    low, high = _cents(alert.price_low), _cents(alert.price_high)
    if alert.is_block_trade:
        fills_note = " · block trade"
    elif alert.fills > 1:
        fills_note = f" · {alert.fills} fills"
    else:
        fills_note = ""
    when = alert.created_time
    category = category_of(alert.ticker, label)
    nth = alert.market_whales_24h
    return {
        "value": _usd(alert.value_usd),
        "title": title,
        "side": alert.side.upper(),
        "price_cents": f"{avg_cents}¢",
        "price_range": f"{low}¢" if low == high else f"{low}¢{_EN_DASH}{high}¢",
        "odds_pct": f"{avg_cents}%",
        "contracts": _contracts(alert.contracts),
        "payout": _usd(alert.payout_usd),
        "fills": str(alert.fills),
        "fills_note": fills_note,
        "time": when.strftime("%H:%M:%S UTC"),
        "date": when.strftime("%Y-%m-%d"),
        "ticker": _clean(alert.ticker),
        "link": link,
        "yes_pct": f"{yes_cents}%",
        "emoji": category_emoji(alert.ticker, category),
        "category": _clean(category or ""),
        "value_exact": _usd_exact(alert.value_usd),
        "move": _move(alert),
        "volume_note": _volume_note(alert.contracts, label.volume_24h if label is not None else None),
        "nth": "" if nth is None else str(nth),
        "nth_note": f"{_ordinal(nth)} whale on this market in 24h" if nth is not None and nth >= 2 else "",
        "closes": _closes(label, when),
        "ref": _REF_CHARS.sub("", alert.alert_id)[:8],
    }


# ---------------------------------------------------------------------------------------------------------------
# Templates


def _lines(template: str) -> list[list[tuple[str, str | None]]]:
    """Parse a template into lines of (literal, field name or None); ValueError with a readable reason."""
    text = (template or DEFAULT_TEMPLATE).replace("\\n", "\n")
    lines: list[list[tuple[str, str | None]]] = []
    for line in text.split("\n"):
        parts: list[tuple[str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(line))
        except ValueError as exc:
            raise ValueError(f"braces do not match ({exc}); write {{{{ and }}}} for a literal brace") from None
        for literal, name, spec, conversion in parsed:
            if name is None:
                parts.append((literal, None))
                continue
            if name == "":
                raise ValueError("empty placeholder {}; name one of: " + ", ".join(TEMPLATE_FIELDS))
            if name not in TEMPLATE_FIELDS:
                raise ValueError(f"unknown placeholder {{{name}}}; known: " + ", ".join(TEMPLATE_FIELDS))
            if spec or conversion:
                raise ValueError(f"placeholder {{{name}}} takes no format or conversion; write it as {{{name}}}")
            parts.append((literal, name))
        lines.append(parts)
    return lines


def _fill(lines: list[list[tuple[str, str | None]]], fields: dict[str, str]) -> str:
    out: list[str] = []
    for parts in lines:
        rendered = "".join(literal + (fields[name] if name else "") for literal, name in parts)
        has_fields = any(name for _, name in parts)
        only_fields = has_fields and not "".join(literal for literal, _ in parts).strip()
        if only_fields and not rendered.strip():
            continue
        out.append(rendered.strip())
    return unicodedata.normalize("NFC", "\n".join(out).strip())


def validate_template(template: str) -> None:
    """Check a POST_TEMPLATE; raise ValueError saying what is wrong (config turns it into exit 78)."""
    lines = _lines(template)
    names = {name for parts in lines for _, name in parts if name}
    literal = "\n".join(lit for parts in lines for lit, _ in parts)
    if not names.intersection(UNIQUE_FIELDS):
        raise ValueError(
            "must contain {value_exact}, {time} or {ref}: X rejects a post whose text repeats an earlier one"
        )
    if "@" in literal or "\uff20" in literal:
        raise ValueError("must not contain '@': X treats @name as a mention, and automated mentions are banned")
    if len(CASHTAG_RE.findall(literal)) > 1:
        raise ValueError("holds more than one cashtag ($ followed by letters); X allows one per post")
    if _safe_length(_fill(lines, _SAMPLE_FIELDS)) > MAX_WEIGHTED_LENGTH:
        raise ValueError(f"too long: the text around the numbers leaves no room in {MAX_WEIGHTED_LENGTH} characters")


# Widest plausible values, to check a template's fixed part fits with room for a title.
_SAMPLE_FIELDS: dict[str, str] = {
    "value": "$999,999,999",
    "title": ELLIPSIS,
    "side": "YES",
    "price_cents": "99.96¢",
    "price_range": f"99.94¢{_EN_DASH}99.99¢",
    "odds_pct": "99.96%",
    "contracts": "999,999,999",
    "payout": "$999,999,999",
    "fills": "999",
    "fills_note": " · 999 fills",
    "time": "23:59:59 UTC",
    "date": "2026-12-31",
    "ticker": "KXMVESPORTSMULTIGAMEEXTENDED-S2026ABCDEF12345-ABCDEF12345",
    "link": "",
    "yes_pct": "99.96%",
    "emoji": "🌡️",
    "category": "Science and Technology",
    "value_exact": "$999,999,999.99",
    "move": "NO 99.94¢ → 99.96¢ · now 0.04% YES",
    "volume_note": " · 999.9x its 24h volume",
    "nth": "999",
    "nth_note": "999th whale on this market in 24h",
    "closes": "Outcome expected Sep 30 2027, 23:59 UTC",
    "ref": "abcdef12",
}


def render_post(
    alert: Alert,
    *,
    title: str | None = None,
    template: str = "",
    link: str | None = None,
    label: MarketLabel | None = None,
) -> str:
    """The post for `alert`: `template` (empty → DEFAULT_TEMPLATE) filled in, within X's rules.

    `label` is what the lookup found about the market (None: nothing in time); `title` overrides its title.
    Without either, the title is `fallback_title(ticker)`: a ticker is never the headline. `link` is added
    only when given. Raises ValueError for a template that is invalid or cannot fit in 280 even with the
    title cut to "…".
    """
    if title is None and label is not None:
        title = label.title
    lines = _lines(template)
    names = {name for parts in lines for _, name in parts if name}
    if link and "link" not in names:
        lines.append([("", "link")])
    full_title = _clean(title or "") or _clean(fallback_title(alert.ticker)) or "Kalshi market"
    fields = _fields(alert, full_title, link or "", label)

    text = _fill(lines, fields)
    if _safe_length(text) <= MAX_WEIGHTED_LENGTH:
        _check_entities(text, link)
        return text
    if "title" not in names:
        raise ValueError(f"post is {_safe_length(text)} long, over {MAX_WEIGHTED_LENGTH}, and has no title to cut")

    # Longest prefix of the title (whole characters, emoji sequences kept whole) that fits.
    clusters = _clusters(full_title)

    def with_prefix(keep: int) -> str:
        fields["title"] = "".join(clusters[:keep]).rstrip(" ,;:·—-") + ELLIPSIS
        return _fill(lines, fields)

    low, high = 0, len(clusters) - 1
    if _safe_length(with_prefix(0)) > MAX_WEIGHTED_LENGTH:
        raise ValueError(f"template leaves no room for a title within {MAX_WEIGHTED_LENGTH} characters")
    while low < high:
        mid = (low + high + 1) // 2
        if _safe_length(with_prefix(mid)) <= MAX_WEIGHTED_LENGTH:
            low = mid
        else:
            high = mid - 1
    text = with_prefix(low)
    _check_entities(text, link)
    return text


def _check_entities(text: str, link: str | None) -> None:
    # Titles and tickers are cleaned and templates checked, so this only fires on a combination the other
    # rules missed (e.g. "${ticker}" next to a "$" in the template): refuse rather than post it.
    if MENTION_RE.search(text):
        raise ValueError("post would contain an @mention")
    if len(CASHTAG_RE.findall(text)) > 1:
        raise ValueError("post would contain more than one cashtag")
    # The final link check: only the market's own link, and only when it was asked for (POST_LINKS).
    stray = find_link(text.replace(link, "") if link else text)
    if stray is not None:
        raise ValueError(f"post would contain a link ({stray!r}); only the market's link, with POST_LINKS on")
