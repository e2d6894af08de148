"""Logging set-up: structlog events as journald lines, JSON lines or console lines, with secrets redacted.

Configured once by `__main__`; everything else just calls `structlog.get_logger(__name__)`. The stdlib loggers
(websockets, aiohttp) go through the same handler, so every line has one format and one redactor.

Formats:
- `journal`: for systemd (default when stdout *is* the journal stream): `<6>ws_connected url=wss://... attempt=1`.
  The `<N>` prefix is the syslog priority, which journald strips and stores, so `journalctl -p warning` shows
  exactly the warnings and errors. No timestamp: journald records one.
- `json`: one JSON object per line (default when stdout is neither a terminal nor the journal).
- `console`: short lines for a person at a terminal (default on a TTY); a whale shows as its post text.

`WarningBudget` keeps per-frame warnings to a few lines a minute; it lives here, beside the set-up, so the stream
and the pipeline can both use it without knowing each other.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TextIO

import structlog

from valshi_x.sanitize import clean_log_event

LogFormat = Literal["journal", "json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("journal", "json", "console")

_REDACTED = "[redacted]"
# Shorter values would redact ordinary words; real keys, tokens and PEM lines are long.
_MIN_SECRET_LEN = 6
# A PEM body line (64 base64 characters) is itself secret: a traceback or repr may show one line alone.
_MIN_SECRET_LINE_LEN = 16

# Lines about one kind of per-frame condition a minute at most (`WarningBudget`), the rest counted.
WARNINGS_PER_MIN = 20


class WarningBudget:
    """Rate limit for warnings about per-frame conditions: `per_min` lines per key per minute, the rest counted.

    One line per frame would let a misbehaving peer drown the journal; one line per minute per kind says the
    same. `suppressed` counts what was held back (the stats line shows the totals it belongs to).
    """

    def __init__(self, per_min: int = WARNINGS_PER_MIN, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.per_min = per_min
        self.suppressed = 0
        self._monotonic = monotonic
        self._windows: dict[str, tuple[float, int]] = {}

    def allow(self, key: str) -> bool:
        """True when a line about `key` may be logged now."""
        now = self._monotonic()
        started, logged = self._windows.get(key, (now, 0))
        if now - started >= 60.0:
            started, logged = now, 0
        allowed = logged < self.per_min
        if allowed:
            logged += 1
        else:
            self.suppressed += 1
        if allowed or key in self._windows:
            self._windows[key] = (started, logged)
        return allowed


# syslog priorities as journald reads them from a `<N>` line prefix (sd-daemon.h: SD_ERR, SD_WARNING, ...).
_PRIORITY = {
    "critical": 3,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}
_DEFAULT_PRIORITY = 6

# Keys the journal renderer places itself or leaves out.
_JOURNAL_SKIP = frozenset({"event", "level", "timestamp", "logger", "exception", "stack"})
_BARE_VALUE = re.compile(r'[^\s"=\\]+')


class SecretRedactor:
    """A structlog processor that replaces every configured secret wherever it appears in an event.

    Runs after exceptions are rendered to text, so tracebacks are redacted too. Values that are not plain
    JSON scalars are turned into their `str` first: an exception object or a URL may carry a token.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        needles: set[str] = set()
        for secret in secrets:
            if len(secret) >= _MIN_SECRET_LEN:
                needles.add(secret)
            # A multi-line secret (a PEM) is also hidden line by line; its BEGIN/END markers are not secret.
            for raw_line in secret.splitlines():
                line = raw_line.strip()
                if len(line) >= _MIN_SECRET_LINE_LEN and not line.startswith("-----"):
                    needles.add(line)
        # Longest first, so a secret containing another is replaced whole.
        self._secrets = sorted(needles, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, bool | int | float | type(None)):
            return value
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        return self.redact(str(value))

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event
        for key, value in event.items():
            event[key] = self._clean(value)
        return event


def _journal_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        text = str(value).lower() if value is not None else "null"
    elif isinstance(value, dict | list | tuple):
        text = json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    if _BARE_VALUE.fullmatch(text):
        return text
    # Quoted like a JSON string: spaces stay readable, newlines and quotes are escaped onto one line.
    return json.dumps(text, ensure_ascii=False)


class JournalRenderer:
    """Render an event as `<priority>event key=value ...` for journald's stdout stream.

    A traceback follows on its own lines, each with the same priority prefix and indented: journald stores
    every line as a separate entry, and without the prefix the traceback lines would land at priority info,
    so `journalctl -p err` would show the headline of a crash but not its stack.
    """

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
        priority = _PRIORITY.get(str(event.get("level", "")).lower(), _DEFAULT_PRIORITY)
        prefix = f"<{priority}>"
        head = [str(event.get("event", ""))]
        logger_name = str(event.get("logger", ""))
        # Our own events have unique names; the library's lines need to say where they come from.
        if logger_name and not logger_name.startswith("valshi_x") and logger_name != "__main__":
            head.append(f"logger={_journal_value(logger_name)}")
        head.extend(f"{key}={_journal_value(value)}" for key, value in event.items() if key not in _JOURNAL_SKIP)
        lines = " ".join(head).splitlines() or [""]
        for key in ("stack", "exception"):
            extra = event.get(key)
            if extra:
                lines.extend("  " + line for line in str(extra).splitlines())
        return "\n".join(prefix + line for line in lines)


# Events that carry a whale; on the console they show as the post itself.
_WHALE_EVENTS = frozenset({"would_post", "posted", "whale_detected"})
# Count lines: on the console only the counts that are not zero, so the line says what happened.
_COUNT_EVENTS = frozenset({"stats", "daemon_stopped"})
# Fields the whale header already says, or that nobody reads at a glance (they stay in journal/JSON lines).
_WHALE_SKIP = frozenset({"text", "value_usd", "ticker", "side", "fills", "is_block_trade", "alert_id", "trade_ids"})
_WHALE_FIGURES = frozenset({"contracts", "price_low", "price_high", "created_time"})
_CONSOLE_VALUE_CHARS = 60
_CONSOLE_EXCERPT_CHARS = 80
_CONSOLE_EVENT_WIDTH = 15
_CONSOLE_INDENT = "    "
_CONSOLE_LEVELS = {"critical": "ERROR", "exception": "ERROR", "error": "ERROR", "warning": "WARN", "warn": "WARN"}
_ANSI = {"ERROR": "\x1b[31;1m", "WARN": "\x1b[33m", "whale": "\x1b[1m", "dim": "\x1b[2m"}
_ANSI_RESET = "\x1b[0m"
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A captured line's own line ending, raw or already escaped by an earlier processor: not part of the frame.
_LINE_END = re.compile(r"(?:\s|\\x0[ad]|\\[nr])+$")


def _one_line(text: str) -> str:
    """Control characters (a newline, an escape sequence or a bidi override from a hostile frame) shown escaped."""
    return text if text.isprintable() else "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ConsoleRenderer:
    """Render an event for a person at a terminal: short lines, and a whale shown as the post it makes.

    - a whale (`would_post`, `posted`, `whale_detected`): a header with value, side, ticker and fills, then the
      post text indented below it, line by line;
    - `malformed_frame`: one line, the reason and an excerpt of the frame of at most 80 characters, taken
      around the field the reason names;
    - anything else: the event and its fields, each value cut to 60 characters, lists counted, and on the
      `stats` / `daemon_stopped` lines only the counts that are not zero.

    The machine formats (journal, JSON) keep every field; this one is for reading, not for parsing.
    """

    def __init__(self, *, colors: bool = False) -> None:
        self._colors = colors

    def _paint(self, style: str, text: str) -> str:
        return f"{_ANSI[style]}{text}{_ANSI_RESET}" if self._colors and style in _ANSI else text

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
        name = str(event.get("event", ""))
        level = _CONSOLE_LEVELS.get(str(event.get("level", "")).lower(), "")
        head = [self._paint("dim", str(event.get("timestamp", ""))), self._paint(level, f"{level or 'info':5}")]
        fields = {k: v for k, v in event.items() if k not in _JOURNAL_SKIP}
        logger_name = str(event.get("logger", ""))
        if logger_name and not logger_name.startswith("valshi_x") and logger_name != "__main__":
            fields = {"logger": logger_name, **fields}
        body: list[str] = []
        if name in _WHALE_EVENTS:
            head.append(self._paint("whale", f"{name:{_CONSOLE_EVENT_WIDTH}} {_whale_headline(fields)}"))
            text = fields.get("text")
            body = [_CONSOLE_INDENT + _one_line(line) for line in str(text).splitlines()] if text else []
            # With the text shown, the figures behind it would only say the same again.
            skip = _WHALE_SKIP | _WHALE_FIGURES if text else _WHALE_SKIP
            fields = {k: v for k, v in fields.items() if k not in skip}
        elif name == "malformed_frame":
            head.append(f"{name:{_CONSOLE_EVENT_WIDTH}} {_malformed_summary(fields)}")
            fields = {}
        else:
            head.append(f"{name:{_CONSOLE_EVENT_WIDTH}}" if fields else name)
        if name in _COUNT_EVENTS:
            fields = {k: v for k, v in fields.items() if v not in (0, 0.0, None) or isinstance(v, bool)}
        head.extend(f"{key}={_console_value(value)}" for key, value in fields.items() if value is not None)
        lines = [" ".join(part for part in head if part).rstrip(), *body]
        for key in ("stack", "exception"):
            extra = event.get(key)
            if extra:
                lines.extend(_CONSOLE_INDENT + _one_line(line) for line in str(extra).splitlines())
        return "\n".join(lines)


def _console_value(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) > 3:
        return f"[{len(value)} items]"
    return _shorten(_one_line(_journal_value(value)), _CONSOLE_VALUE_CHARS)


def _whale_headline(fields: Mapping[str, Any]) -> str:
    """`$196,600.62 NO KXNFLGAME-26SEP13CHIJAC-CHI · 7 fills`: what the whale is, before its post text."""
    raw_value = str(fields.get("value_usd", ""))
    try:
        value = f"${Decimal(raw_value):,.2f}"
    except InvalidOperation:
        value = _one_line(raw_value)
    parts = [value, str(fields.get("side", "")).upper(), _one_line(str(fields.get("ticker", "")))]
    fills = fields.get("fills")
    if fields.get("is_block_trade") is True:
        parts.append("· block trade")
    elif isinstance(fills, int) and fills > 1:
        parts.append(f"· {fills} fills")
    return " ".join(part for part in parts if part)


def _malformed_summary(fields: Mapping[str, Any]) -> str:
    """`bad_number yes_price_dollars='abc' │ …"yes_price_dollars":"abc","no_price_dollars":…`."""
    reason = _one_line(str(fields.get("reason", "")))
    detail = _shorten(_one_line(str(fields.get("detail") or "")), 40)
    raw = fields.get("frame", "")
    # A frame is its raw text; a trade refused after decoding comes as a few fields.
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str, ensure_ascii=False, separators=(",", ":"))
    frame = _LINE_END.sub("", _one_line(text.strip()))
    # Start the excerpt a little before the field the detail names, so the bad part is what shows.
    start = 0
    named = _FIELD_NAME.match(detail)
    if named and f'"{named.group()}"' in frame:
        start = max(0, frame.index(f'"{named.group()}"') - 10)
    excerpt = frame[start : start + _CONSOLE_EXCERPT_CHARS]
    if start > 0:
        excerpt = "…" + excerpt[1:]
    if start + _CONSOLE_EXCERPT_CHARS < len(frame):
        excerpt = excerpt[:-1] + "…"
    return " ".join(part for part in (reason, detail, "│", excerpt) if part)


def _foreign_stack(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A stdlib record's `stack_info` is already text: keep it as `stack` rather than have it re-captured here."""
    stack = event.pop("stack_info", None)
    if isinstance(stack, str):
        event["stack"] = stack
    return event


_JSON_FIRST = ("timestamp", "level", "event", "logger")


def _json_dumps(event: Mapping[str, Any], **_kw: Any) -> str:
    # The fixed keys first so lines read alike; a Decimal or datetime becomes its str().
    ordered = {key: event[key] for key in _JSON_FIRST if key in event}
    ordered.update(event)
    return json.dumps(ordered, default=str, ensure_ascii=False)


def journal_stream_matches(env: Mapping[str, str], stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd announced in JOURNAL_STREAM (`<device>:<inode>`).

    Checking the device and inode, as systemd documents, keeps a redirected stdout (`valshi-x > file` inside a
    unit, or a child that inherited the variable) from getting journal lines.
    """
    raw = env.get("JOURNAL_STREAM", "")
    device, sep, inode = raw.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's StringIO) or a closed one
        return False
    return stat.st_dev == int(device) and stat.st_ino == int(inode)


def default_format(env: Mapping[str, str] | None = None, stream: TextIO | None = None) -> LogFormat:
    """`journal` under systemd, `console` on a terminal, `json` otherwise.

    `env` is the process environment when not given (this module is part of the edge, set up by `__main__`).
    """
    env = os.environ if env is None else env
    stream = sys.stdout if stream is None else stream
    if journal_stream_matches(env, stream):
        return "journal"
    return "console" if stream.isatty() else "json"


def configure_logging(
    log_format: LogFormat | None,
    secrets: Iterable[str] = (),
    level: int = logging.INFO,
    *,
    env: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and the stdlib loggers (websockets, aiohttp) to `stream` (stdout) in one format.

    Safe to call again (the edge calls it once before settings are read and once with the secrets); the last
    call wins for every logger, including ones already used.
    """
    stream = sys.stdout if stream is None else stream
    fmt = log_format or default_format(env, stream)
    if isinstance(stream, io.TextIOWrapper):
        # Under systemd stdout is a socket and would be block-buffered; a log line must reach the journal now.
        stream.reconfigure(line_buffering=True)

    renderer: Any
    stamp: list[Any] = []
    if fmt == "journal":
        renderer = JournalRenderer()  # journald stamps each entry itself
    elif fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
        stamp = [structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")]
    else:
        renderer = ConsoleRenderer(colors=stream.isatty())
        # The time of day is enough on a terminal (UTC, like every time the daemon shows).
        stamp = [structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=True, key="timestamp")]

    # Everything that shapes or cleans a line runs in the handler, for structlog events and stdlib records alike,
    # so reconfiguring also changes loggers that structlog has already cached.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, _foreign_stack],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *stamp,
            structlog.processors.format_exc_info,
            SecretRedactor(secrets),
            clean_log_event,  # outside text on one line: no control, bidi or line-separator character gets through
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The libraries' own debug chatter would be one line per frame.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            # Here, not in the handler: the stack must be the caller's, not the logging machinery's.
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
