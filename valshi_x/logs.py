"""Logging set-up: structlog events as journald lines, JSON lines or console lines, with secrets redacted.

Configured once by `__main__`; everything else just calls `structlog.get_logger(__name__)`. The stdlib loggers
(websockets, aiohttp) go through the same handler, so every line has one format and one redactor.

Formats:
- `journal`: for systemd (default when stdout *is* the journal stream): `<6>ws_connected url=wss://... attempt=1`.
  The `<N>` prefix is the syslog priority, which journald strips and stores, so `journalctl -p warning` shows
  exactly the warnings and errors. No timestamp: journald records one.
- `json`: one JSON object per line (default when stdout is neither a terminal nor the journal).
- `console`: aligned, coloured lines for a terminal (default on a TTY).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
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
        # plain_traceback: a rich traceback would print locals, past the redactor.
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        stamp = [structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")]

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
