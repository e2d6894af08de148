"""Settings: read once from the environment (and an optional .env) at the edge, validated all at once.

Every setting is declared in `SETTINGS` with its default and a one-line description; `.env.example` and the
README's table are written from the same facts. A bad value never raises half-way: `load_settings` collects
one line per bad key and raises `ConfigError` with all of them.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from valshi_x.errors import ConfigError
from valshi_x.x.text import validate_template

KALSHI_WS_URL = "wss://external-api-ws.kalshi.com/trade-api/ws/v2"
KALSHI_API_URL = "https://external-api.kalshi.com/trade-api/v2"


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One environment key: its default (as written in .env.example), what it means, how to parse it."""

    key: str  # the environment name; the Settings field is the same name in lower case
    default: str
    doc: str
    parse: Callable[[str], Any]
    secret: bool = False


def _text(raw: str) -> str:
    return raw


def _optional_path(raw: str) -> Path | None:
    return Path(raw).expanduser() if raw else None


def _path(raw: str) -> Path:
    if not raw:
        raise ValueError("must not be empty")
    return Path(raw).expanduser()


def _positive_decimal(raw: str) -> Decimal:
    try:
        value = Decimal(raw.replace("_", "").replace(",", ""))
    except InvalidOperation:
        raise ValueError(f"must be a number of dollars, got {raw!r}") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"must be a positive number of dollars, got {raw!r}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if value < low:
            raise ValueError(f"must be {low} or more, got {value}")
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {raw!r}")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _template(raw: str) -> str:
    if raw:
        validate_template(raw)  # raises ValueError saying what is wrong
    return raw


_MAX_LIST_ITEMS = 100


def _names(pattern: str, what: str) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list of names (categories, series prefixes); empty means none."""
    item = re.compile(pattern)

    def parse(raw: str) -> tuple[str, ...]:
        items = tuple(part.strip() for part in raw.split(",") if part.strip())
        if len(items) > _MAX_LIST_ITEMS:
            raise ValueError(f"at most {_MAX_LIST_ITEMS} {what}s, got {len(items)}")
        for name in items:
            if not item.fullmatch(name):
                raise ValueError(f"{name[:40]!r} is not a {what} (comma-separated list)")
        return items

    return parse


_categories = _names(r"[A-Za-z][A-Za-z &/-]{0,39}", "category")
_series_prefixes = _names(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "series prefix")


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.netloc:
            raise ValueError(f"must be a {' or '.join(schemes)} URL, got {raw!r}")
        return raw.rstrip("/")

    return parse


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("KALSHI_API_KEY_ID", "", "Kalshi API key id; signs the WebSocket handshake.", _text),
    SettingSpec(
        "KALSHI_PRIVATE_KEY_PATH",
        "",
        "Path to the Kalshi private key: RSA (PEM, PKCS#1 or PKCS#8) or Ed25519 (PEM, PKCS#8).",
        _optional_path,
    ),
    SettingSpec(
        "KALSHI_PRIVATE_KEY", "", "The PEM itself, inline, instead of KALSHI_PRIVATE_KEY_PATH.", _text, secret=True
    ),
    SettingSpec("X_API_KEY", "", "X app consumer key (OAuth 1.0a). Not needed with --dry-run.", _text, secret=True),
    SettingSpec("X_API_SECRET", "", "X app consumer secret.", _text, secret=True),
    SettingSpec("X_ACCESS_TOKEN", "", "X access token of the posting account (Read and write).", _text, secret=True),
    SettingSpec("X_ACCESS_TOKEN_SECRET", "", "X access token secret.", _text, secret=True),
    SettingSpec(
        "WHALE_THRESHOLD_DOLLARS",
        "100000",
        "A sweep worth this much or more (inclusive) is a whale.",
        _positive_decimal,
    ),
    SettingSpec(
        "SWEEP_WINDOW_MS",
        "1000",
        "Fills of one ticker and side within this many ms of the first are one order; 0 turns grouping off.",
        _int_at_least(0),
    ),
    SettingSpec("KALSHI_WS_URL", KALSHI_WS_URL, "Kalshi WebSocket URL.", _url("wss", "ws")),
    SettingSpec("KALSHI_API_URL", KALSHI_API_URL, "Kalshi REST base URL.", _url("https", "http")),
    SettingSpec(
        "WS_IDLE_TIMEOUT_S", "30", "Reconnect when nothing (no frame, no ping) arrives for this long.", _seconds
    ),
    SettingSpec("STATS_INTERVAL_S", "60", "How often the stats line is logged.", _seconds),
    SettingSpec(
        "FRAME_QUEUE_SIZE", "20000", "Frames buffered between the socket reader and the pipeline.", _int_at_least(1)
    ),
    SettingSpec("STATE_DIR", "./state", "Where the SQLite state (outbox, ledger, checkpoint) lives.", _path),
    SettingSpec(
        "X_POSTS_PER_15MIN", "100", "Own cap on posts per 15 minutes (X allows 100 per user).", _int_at_least(1)
    ),
    SettingSpec(
        "X_POSTS_PER_24H", "17", "Own cap on posts per 24 hours (17 is the smallest X plan's).", _int_at_least(1)
    ),
    SettingSpec(
        "MAX_ALERT_AGE_S",
        "900",
        "A whale older than this when its turn to post comes is skipped, not posted.",
        _seconds,
    ),
    SettingSpec(
        "POST_LINKS", "false", "Add a kalshi.com link to each post (X charges 13x for posts with links).", _bool
    ),
    SettingSpec(
        "POST_TEMPLATE",
        "",
        "The post's text template, in double quotes (see README); empty means the built-in one.",
        _template,
    ),
    SettingSpec(
        "POST_CATEGORIES",
        "",
        "Post only whales of these Kalshi categories (comma-separated, e.g. Sports,Crypto); empty means all.",
        _categories,
    ),
    SettingSpec("SKIP_CATEGORIES", "", "Never post whales of these categories (comma-separated).", _categories),
    SettingSpec(
        "POST_SERIES",
        "",
        "Post only whales whose ticker starts with one of these series prefixes (e.g. KXNFL,KXHIGH); empty: all.",
        _series_prefixes,
    ),
    SettingSpec(
        "SKIP_SERIES", "", "Never post whales whose ticker starts with one of these prefixes.", _series_prefixes
    ),
    SettingSpec("POST_COMBOS", "true", "Post whales on combo (KXMVE...) markets too.", _bool),
    SettingSpec("X_TIMEOUT_S", "20", "Timeout of one request to X.", _seconds),
    SettingSpec(
        "BACKFILL_MAX_S", "1800", "At start-up, fetch missed trades from REST back at most this far.", _seconds
    ),
    SettingSpec(
        "HOLD_MAX_S",
        "5",
        "A sweep a pending backfill could still complete waits at most this long, then closes with what is known.",
        _seconds,
    ),
    SettingSpec(
        "STALL_RESUBSCRIBE_S", "300", "Resubscribe (then reconnect) when no trade arrives for this long.", _seconds
    ),
    SettingSpec("SHUTDOWN_DRAIN_S", "10", "On stop, how long an in-flight post may take to finish.", _seconds),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon needs, parsed and checked; passed down as explicit arguments."""

    kalshi_api_key_id: str = ""
    kalshi_private_key_path: Path | None = None
    kalshi_private_key: str = field(default="", repr=False)
    x_api_key: str = field(default="", repr=False)
    x_api_secret: str = field(default="", repr=False)
    x_access_token: str = field(default="", repr=False)
    x_access_token_secret: str = field(default="", repr=False)
    whale_threshold_dollars: Decimal = Decimal(100000)
    sweep_window_ms: int = 1000
    kalshi_ws_url: str = KALSHI_WS_URL
    kalshi_api_url: str = KALSHI_API_URL
    ws_idle_timeout_s: float = 30.0
    stats_interval_s: float = 60.0
    frame_queue_size: int = 20000
    state_dir: Path = Path("./state")
    x_posts_per_15min: int = 100
    x_posts_per_24h: int = 17
    max_alert_age_s: float = 900.0
    post_links: bool = False
    post_template: str = ""
    post_categories: tuple[str, ...] = ()
    skip_categories: tuple[str, ...] = ()
    post_series: tuple[str, ...] = ()
    skip_series: tuple[str, ...] = ()
    post_combos: bool = True
    x_timeout_s: float = 20.0
    backfill_max_s: float = 1800.0
    hold_max_s: float = 5.0
    stall_resubscribe_s: float = 300.0
    shutdown_drain_s: float = 10.0

    @property
    def has_kalshi_key(self) -> bool:
        return bool(self.kalshi_api_key_id)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value set, for the log redactor."""
        values = (
            self.kalshi_private_key,
            self.x_api_key,
            self.x_api_secret,
            self.x_access_token,
            self.x_access_token_secret,
        )
        return tuple(v for v in values if v)


_X_KEYS = ("X_API_KEY", "X_API_SECRET", "X_ACCESS_TOKEN", "X_ACCESS_TOKEN_SECRET")

# The first word of every setting (KALSHI_, X_, WHALE_, SWEEP_, POST_, BACKFILL_, ...): an unknown key that
# starts with one is most likely a misspelled setting, which would otherwise be ignored without a word.
SETTING_PREFIXES = tuple(sorted({spec.key.split("_", 1)[0] + "_" for spec in SETTINGS}))
# Set by others in the service's environment: systemd's StateDirectory= exports STATE_DIRECTORY.
_FOREIGN_KEYS = frozenset({"STATE_DIRECTORY"})


def unknown_settings(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(unknown key, closest known key) for each key in `env` that looks like a setting but is none; key names only.

    Values are never looked at: a misspelled secret (`X_API_SECRETT`) must not reach a log line.
    """
    known = [spec.key for spec in SETTINGS]
    found: list[tuple[str, str]] = []
    for key in sorted(env):
        if key in _FOREIGN_KEYS or key in known or not key.startswith(SETTING_PREFIXES):
            continue
        # cutoff 0: always name the nearest key; a far one still tells the reader which family the key is in.
        closest = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
        found.append((key, closest[0] if closest else ""))
    return found


def load_settings(env: Mapping[str, str], *, need_x: bool) -> Settings:
    """Parse every known key from `env`; raise `ConfigError` listing each bad key, one line each."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for spec in SETTINGS:
        raw = env.get(spec.key, spec.default).strip()
        try:
            values[spec.key.lower()] = spec.parse(raw)
        except ValueError as exc:
            problems.append(f"{spec.key}: {exc}")

    key_id = values.get("kalshi_api_key_id", "")
    key_path = values.get("kalshi_private_key_path")
    key_pem = values.get("kalshi_private_key", "")
    if key_path is not None and key_pem:
        problems.append("KALSHI_PRIVATE_KEY: set either KALSHI_PRIVATE_KEY or KALSHI_PRIVATE_KEY_PATH, not both")
    if key_id and key_path is None and not key_pem:
        problems.append("KALSHI_PRIVATE_KEY_PATH: required when KALSHI_API_KEY_ID is set")
    if not key_id and (key_path is not None or key_pem):
        problems.append("KALSHI_API_KEY_ID: required when a Kalshi private key is set")
    if need_x:
        problems.extend(f"{key}: required to post to X (or run with --dry-run)" for key in _X_KEYS if not env.get(key))

    if problems:
        raise ConfigError(problems)
    return Settings(**values)


def secret_files(key_path: Path | None, env_file: Path | None, env: Mapping[str, str]) -> tuple[Path, ...]:
    """The key and env files whose permission bits are ours to judge (see `readable_by_others`).

    A key under $CREDENTIALS_DIRECTORY is systemd's private copy (`LoadCredential=`), not the operator's file,
    and systemd alone decides who reads it. Seen under the unit: systemd 252 (Debian 12, ramfs) makes it 0400,
    owned by the service's user; systemd 257 (Debian 13, tmpfs) makes it root:root 0440, where the group bits are
    the mask of an ACL whose only grant is `user:<service uid>:r` (group::---). Judged by its mode, that copy
    drew a warning on every start.
    """
    credentials = _credentials_directory(env.get("CREDENTIALS_DIRECTORY", ""))
    found = []
    for path in (key_path, env_file):
        if path is None:
            continue
        if credentials is not None and _resolved(path).parent == credentials:
            continue
        found.append(path)
    return tuple(found)


def _credentials_directory(value: str) -> Path | None:
    """$CREDENTIALS_DIRECTORY resolved, or None when it cannot be systemd's: unset, relative, or `/` itself.

    systemd sets an absolute path to a flat directory of its own; judged by resolved paths, a `..` in the key's path
    (`$CREDENTIALS_DIRECTORY/../home/key.pem`) cannot pass for one of its files.
    """
    if not value or not Path(value).is_absolute():
        return None
    resolved = _resolved(Path(value))
    return None if resolved == Path(resolved.anchor) else resolved


def _resolved(path: Path) -> Path:
    """`path` with symlinks and `..` resolved; as given (made absolute) when that fails, e.g. on a symlink loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def readable_by_others(paths: Iterable[Path | None]) -> list[tuple[Path, int]]:
    """The regular files among `paths` (a key, an env file) that group or others may read, with their permission bits.

    A file that cannot be looked at is left to whoever reads it next: this only warns.
    """
    found = []
    for path in paths:
        if path is None:
            continue
        try:
            st_mode = path.stat().st_mode
        except OSError:
            continue
        # Only a regular file's bits are the operator's to fix: never "chmod 600 /dev/zero".
        if stat.S_ISREG(st_mode) and stat.S_IMODE(st_mode) & 0o044:
            found.append((path, stat.S_IMODE(st_mode)))
    return found


# A few KEY=value lines (.env.example is 3 KB, an inline RSA-4096 key 3.3 KB). python-dotenv is slow on big files:
# measured on the project's 2-core machine under load, 64 KiB of "A=1" lines took 2.6 s and 160 KB 7 s.
ENV_FILE_MAX_BYTES = 64 * 1024
# python-dotenv's ${...} pattern scans from each "${" up to the next "}", quadratic on "${${${..." (10,000 of them,
# 20 KB, took it 11 s): a file that would make it scan more than this many characters is refused.
_DOTENV_RESCAN_MAX_CHARS = 2_000_000


def read_env_file(path: Path, *, missing_ok: bool = False) -> str | None:
    """The text of the env file at `path`, read once (the caller hands it on: `check` never opens it again).

    `ConfigError`, one line naming the file, when it cannot be read as one: not a regular file (a FIFO would block
    the reader, /dev/zero would never end), unreadable, over the size cap, not UTF-8 (python-dotenv's reading, whose
    UnicodeDecodeError was a traceback), a NUL byte or a byte-order mark (see below), or one python-dotenv would
    stall on. With `missing_ok` (the default ./.env) a file that is not there (ENOENT, ENOTDIR) gives None.
    The text keeps its line endings as written, as both parsers see them.
    """
    try:
        # Judged before opening it: opening some devices acts (a watchdog arms, a tape rewinds).
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as exc:
        if missing_ok and exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise _unreadable(path, exc) from None
    if not regular:
        raise ConfigError([f"{path}: not a regular file"])
    try:
        # O_NONBLOCK: opening a FIFO without a writer would wait forever; O_NOCTTY: a terminal must not become ours.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else since the stat
            raise ConfigError([f"{path}: not a regular file"])
        data = _read_at_most(fd, ENV_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    finally:
        os.close(fd)
    if len(data) > ENV_FILE_MAX_BYTES:
        raise ConfigError([f"{path}: larger than {ENV_FILE_MAX_BYTES // 1024} KiB; an env file holds KEY=value lines"])
    # Each problem names the line, never the byte: it may be part of a secret.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (line {_line_of(data, exc.start)}); save it as UTF-8"]) from None
    if (nul := data.find(b"\0")) >= 0:
        # systemd refuses the whole file (the service does not start); python-dotenv would keep the byte in a value.
        raise ConfigError([f"{path}: a NUL byte on line {_line_of(data, nul)}; an env file holds text"])
    if text.startswith("\ufeff"):
        # python-dotenv skips a UTF-8 byte-order mark, systemd reads it as part of the first key, so the service
        # would silently lose that setting: refused rather than warned, since no editor shows the mark.
        raise ConfigError([f"{path}: a byte-order mark on line 1, read by systemd as part of the key; save without it"])
    if _dotenv_rescan_chars(text) > _DOTENV_RESCAN_MAX_CHARS:
        raise ConfigError([f"{path}: too many '${{' without a closing '}}' for python-dotenv to read it"])
    return text


def _unreadable(path: Path, exc: OSError) -> ConfigError:
    return ConfigError([f"{path}: cannot be read ({exc.strerror or exc})"])


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd`: a regular file's reads stop at its end, so this never waits."""
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _line_of(data: bytes, index: int) -> int:
    return data.count(b"\n", 0, index) + 1


def _dotenv_rescan_chars(text: str) -> int:
    """At most how many characters python-dotenv's ${...} pattern scans in `text`: from each "${" to the next "}"."""
    total = waiting = waiting_sum = 0
    for match in re.finditer(r"\$\{|\}", text):
        if match.group() == "${":
            waiting, waiting_sum = waiting + 1, waiting_sum + match.start()
        else:
            total, waiting, waiting_sum = total + waiting * match.start() - waiting_sum, 0, 0
    return total + waiting * len(text) - waiting_sum


# The env file is read by two parsers: systemd's EnvironmentFile= under the service, python-dotenv when run by hand
# (and by `check --env-file`). Each form below was run through both (systemd 252, python-dotenv 1.2) and gave
# different values; `check` names the key and the line (never the value), since the daemon cannot tell.
_ASSIGNMENT = re.compile(r"[ \t]*(export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=([ \t]*)")
_BACKSLASH_PAIR = re.compile(r"\\(.)", re.DOTALL)
# Inside double quotes both read \" and \\ as the character; \n stays two characters under systemd and becomes a
# line break under python-dotenv, and the two settings that may hold one (POST_TEMPLATE, KALSHI_PRIVATE_KEY) treat
# both alike.
_SAME_IN_DOUBLE_QUOTES = frozenset({"n", '"', "\\"})

EXPORT = "systemd ignores a line that starts with 'export': drop the word"
UNQUOTED_BACKSLASH = (
    "a backslash outside quotes: systemd drops it (\\n arrives as n), python-dotenv keeps it; use double quotes"
)
UNQUOTED_COMMENT = "' #' in a value without quotes: python-dotenv cuts the rest off as a comment, systemd keeps it"
DOUBLE_QUOTED_ESCAPE = 'inside double quotes only \\n, \\" and \\\\ mean the same to systemd and python-dotenv'
SINGLE_QUOTED_BACKSLASH = (
    "inside single quotes python-dotenv reads \\\\ and \\' as escapes, systemd does not; use double quotes"
)
AFTER_QUOTE = "text after the closing quote: systemd adds it to the value, python-dotenv drops it"
UNCLOSED_QUOTE = "no closing quote: systemd reads to the end of the file, python-dotenv skips the line"
INTERPOLATION = "${...}: python-dotenv puts another variable's value there, systemd keeps the text as written"
# systemd's env-file.c before v254 (Debian 12 runs 252) let a backslash in a comment escape the next character, the
# line break included, so the comment went on to the end of the next line; v254 ends a comment at its line break
# (systemd PR 28079, for issue 27975). python-dotenv reads the next line as a setting.
AFTER_CONTINUED_COMMENT = "systemd before v254 reads it as part of the comment above (it ends in a backslash)"


def env_file_differences(text: str) -> list[tuple[int, str, str]]:
    """(line number, key, why) for each assignment in an env file that systemd and python-dotenv read differently."""
    found: list[tuple[int, str, str]] = []
    pos, line_no = 0, 1
    in_comment = False  # this line continues a comment under systemd before v254
    while pos < len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        match = _ASSIGNMENT.match(text, pos, end)
        comment = in_comment or text[pos:end].lstrip(" \t")[:1] in ("#", ";")
        lost, in_comment = in_comment, comment and _escapes_line_break(text, pos, end)
        if match is None or (comment and not lost):
            pos, line_no = end + 1, line_no + 1
            continue
        key, start, reasons = match.group(2), match.end(), []
        if lost:
            reasons.append(AFTER_CONTINUED_COMMENT)
        if match.group(1):
            reasons.append(EXPORT)
        quote = text[start : start + 1]
        if quote in ('"', "'"):
            value, close = _quoted(text, start)
            if close < 0:
                reasons.append(UNCLOSED_QUOTE)
                end = len(text)
            else:
                end = text.find("\n", close)
                end = len(text) if end < 0 else end
                if text[close + 1 : end].strip():
                    reasons.append(AFTER_QUOTE)
            escaped = set(_BACKSLASH_PAIR.findall(value))
            if quote == '"' and escaped - _SAME_IN_DOUBLE_QUOTES:
                reasons.append(DOUBLE_QUOTED_ESCAPE)
            if quote == "'" and ("\\\\" in value or value.endswith("\\")):
                reasons.append(SINGLE_QUOTED_BACKSLASH)
        else:
            value = text[start:end]
            if "\\" in value:
                reasons.append(UNQUOTED_BACKSLASH)
            # From just after '=': in `KEY=  # note` python-dotenv reads the blanks and '#' as a comment's start
            # (an empty value), systemd skips the blanks and keeps '# note'.
            if re.search(r"\s#", text[match.start(3) : end]):
                reasons.append(UNQUOTED_COMMENT)
        if _interpolates(value):
            reasons.append(INTERPOLATION)
        found.extend((line_no, key, reason) for reason in reasons)
        lines = text.count("\n", pos, end) + 1
        in_comment = in_comment and lines == 1  # a value over several lines: beyond this check
        line_no += lines
        pos = end + 1
    return found


def _interpolates(value: str) -> bool:
    """Whether `value` holds a `${...}`: a "${" and a "}" after it (linear; a regex was quadratic on "${${${")."""
    start = value.find("${")
    return start >= 0 and value.find("}", start + 2) >= 0


def _escapes_line_break(text: str, start: int, end: int) -> bool:
    """Whether a comment line text[start:end] ends in an odd run of backslashes, the last one escaping the break.

    In a comment systemd before v254 reads each backslash with the character after it: two at the end are one pair
    and the comment ends there, three escape the break (see AFTER_CONTINUED_COMMENT).
    """
    run = end - start - len(text[start:end].rstrip("\\"))
    return end < len(text) and run % 2 == 1


def _quoted(text: str, start: int) -> tuple[str, int]:
    """The text between the quote at `start` and the one that closes it as systemd reads it, and that one's index.

    A double quote closes at the first one not escaped by a backslash; a single quote at the next single quote.
    -1 when none closes it.
    """
    quote, i = text[start], start + 1
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return text[start + 1 : i], i
        i += 1
    return text[start + 1 :], -1
