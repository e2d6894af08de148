"""The one sanitizer for outside text (tickers, titles, error texts, frame excerpts) on its way to a log line or a
post.

Pure: no asyncio, no I/O. Text from Kalshi or any peer may hold characters that are invisible or that change
how a line reads: controls (a terminal escape, a carriage return), line and paragraph separators (U+2028 made
the journal renderer start a new `<6>posted ...` line of the attacker's choosing), bidi controls (U+202E turns
the rest of a line around), zero-width characters (`kalshi\u200d.com` hides a link from a plain dot rule), and
lone surrogates (which cannot even be written as UTF-8). Two uses, two treatments:

- Log lines (`clean_log_text`, and the structlog processor `clean_log_event` that applies it to every field of
  every event, in every format): each such character is shown as an escape (`\\u2028`), so the line stays one
  line and still says what came in; values are capped in length.
- Posts (`clean_post_text`): such characters are dropped (separators become spaces), and every URL-like run is
  neutralized: a dot (or an ideographic / full-width dot) between a non-space and two letters becomes U+2024 ONE
  DOT LEADER, which looks the same but links nothing, and `://` loses its slashes to U+2044. That covers
  `kalshi.com`, `https://♥.com/x` (IDN), `kalshi\u200d.com` and bare domains alike. `find_link` is the
  final check the post path runs on the finished text: whatever it finds there, the post is refused.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import MutableMapping
from decimal import Decimal
from typing import Any, Final

# Longest text value a log line carries; a traceback may be longer.
MAX_LOG_TEXT: Final = 2_000
MAX_LOG_TRACEBACK: Final = 50_000
# Longest outside text a post starts from (a title is cut to fit 280 anyway; this bounds the work of cutting).
MAX_POST_TEXT: Final = 1_000

# Fields whose value is several lines by design: a traceback, or a post's text (made of cleaned parts).
_MULTILINE_KEYS: Final = frozenset({"exception", "stack", "text"})
_KEEP_IN_MULTILINE: Final = frozenset("\n")
_KEEP_NOTHING: Final = frozenset[str]()

# Emoji sequences join their parts with U+200D; elsewhere a zero-width joiner only hides things.
_EMOJI_PART = "\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff"
_LONE_ZWJ = re.compile(f"(?<![{_EMOJI_PART}\ufe0f\U0001f3fb-\U0001f3ff])\u200d|\u200d(?![{_EMOJI_PART}])")
_DOTS = ".\u3002\uff0e\uff61"  # full stop, ideographic, full-width and half-width ideographic full stops
# Two letters: no top-level domain has one, so "U.S" or "e.g" stays as it is.
_LINKING_DOT = re.compile(f"(?<=\\S)[{_DOTS}](?=[^\\W\\d_]{{2}})")
_SCHEME_SLASHES = re.compile(r":[/\\]{2}")
_ONE_DOT_LEADER = "\u2024"
_FRACTION_SLASHES = ":\u2044\u2044"
_SPACES = re.compile(r"\s+")
# What the final check calls a link: a scheme, or a dot between a non-space and two letters (any script).
_LINK = re.compile(f"[A-Za-z][A-Za-z0-9+.-]*:[/\\\\]{{2}}|\\S[{_DOTS}][^\\W\\d_]{{2}}")


def _escape(ch: str) -> str:
    cp = ord(ch)
    return f"\\x{cp:02x}" if cp <= 0xFF else f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def clean_log_text(text: str, *, keep: frozenset[str] = _KEEP_NOTHING, max_len: int = MAX_LOG_TEXT) -> str:
    """`text` on one line (unless `keep` allows newlines): every invisible or line-changing character escaped."""
    if len(text) > max_len:
        text = f"{text[:max_len]}…[+{len(text) - max_len} chars]"
    if text.isprintable():  # the common case: nothing to do
        return text
    return "".join(
        ch if ch.isprintable() or ch in keep else " " if unicodedata.category(ch) == "Zs" else _escape(ch)
        for ch in text
    )


def _clean_log_value(value: Any, keep: frozenset[str], max_len: int) -> Any:
    if isinstance(value, str):
        return clean_log_text(value, keep=keep, max_len=max_len)
    if value is None or isinstance(value, bool | int | float | Decimal):
        return value
    if isinstance(value, dict):
        return {
            _clean_log_value(key, keep, max_len): _clean_log_value(item, keep, max_len) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_clean_log_value(item, keep, max_len) for item in value)
    # An exception, a path, a datetime: its text is what the renderers would show.
    return clean_log_text(str(value), keep=keep, max_len=max_len)


def clean_log_event(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: every value of the event made safe for one log line (see the module docstring)."""
    for key, value in event.items():
        if key in _MULTILINE_KEYS:
            max_len = MAX_LOG_TRACEBACK if key != "text" else MAX_LOG_TEXT
            event[key] = _clean_log_value(value, _KEEP_IN_MULTILINE, max_len)
        else:
            event[key] = _clean_log_value(value, _KEEP_NOTHING, MAX_LOG_TEXT)
    return event


def _post_char(ch: str) -> str:
    if ch.isprintable() or ch == "\u200d":  # joiners are judged by their neighbours below
        return ch
    category = unicodedata.category(ch)
    if category in ("Cc", "Zs", "Zl", "Zp"):
        return " "  # controls (tabs, newlines, NEL) and separators: a word break
    return ""  # format characters (bidi, zero-width, soft hyphen, tags), surrogates, private use, unassigned


def clean_post_text(raw: str, *, max_len: int = MAX_POST_TEXT) -> str:
    """Outside text made fit for a post: one line, visible characters only, no link (see the module docstring)."""
    text = unicodedata.normalize("NFC", raw[:max_len])
    if not text.isprintable():
        text = "".join(_post_char(ch) for ch in text)
        text = _LONE_ZWJ.sub("", text)
    text = _SCHEME_SLASHES.sub(_FRACTION_SLASHES, text)
    text = _LINKING_DOT.sub(_ONE_DOT_LEADER, text)
    return _SPACES.sub(" ", text).strip()


def find_link(text: str) -> str | None:
    """The first URL-like run in `text` (a scheme, or a dot between a non-space and two letters), or None."""
    found = _LINK.search(text)
    return found.group() if found else None
