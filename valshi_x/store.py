"""Durable state in SQLite: the outbox of alerts, the trade ids each alert covers, the ledger of requests to X,
the latest rate-limit headers X sent, and named checkpoints.

The outbox is what makes posting exactly-once: an alert is written here before any attempt to post it, marked
`posting` before the request and `posted` after the answer. A row still `posting` when the store opens was cut
off by a crash mid-request; it goes back to `pending` flagged `in_doubt`, and the poster treats a duplicate-content
403 on its retry as proof that the first request got through.

Every sqlite call runs on one dedicated worker thread that owns the connection; the async methods only hand work
to it, so the event loop never blocks on the disk. Writes are shielded from cancellation: once asked for, a
transaction runs to its end even if the caller is cancelled, and `close` waits for it.

Outbox states::

    pending --mark_posting--> posting --mark_posted--> posted
       ^                         |  \\--mark_failed--> failed
       +-------release-----------+
    pending --mark_skipped--> skipped     (too old when its turn came)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import msgspec
import structlog

from valshi_x.errors import ConfigError, StateError, StateUnavailable, ValshiError
from valshi_x.trades import Side
from valshi_x.whales import Alert

log = structlog.get_logger(__name__)

DB_FILENAME = "valshi-x.sqlite3"
# Held (flock) by the one process that owns the state directory, with its pid inside; never deleted, since
# removing a lock file lets a third process lock a fresh one while the second still holds the old.
LOCK_FILENAME = "valshi-x.lock"
SCHEMA_VERSION = 1
MODE_CHECKPOINT = "outbox_mode"  # "dry_run" or "posting", set by the daemon on first start: the two never mix
Status = Literal["pending", "posting", "posted", "failed", "skipped"]
STATUSES: tuple[Status, ...] = ("pending", "posting", "posted", "failed", "skipped")
# Ledger outcomes that may have created a post on X; the own rate budget counts these. A duplicate-content 403
# stands for an earlier attempt that posted but was cut off (a crash, a stop) before its answer was written.
COUNTED_OUTCOMES = ("posted", "transient", "already_posted")
_LEDGER_KEEP_MS = 48 * 3600 * 1000  # the longest budget window is 24 h; keep twice that for `status`

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE outbox (
    alert_id        TEXT PRIMARY KEY,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'posting', 'posted', 'failed', 'skipped')),
    attempts        INTEGER NOT NULL DEFAULT 0,  -- requests sent to X for this alert
    failures        INTEGER NOT NULL DEFAULT 0,  -- transient failures and crashes mid-request
    in_doubt        INTEGER NOT NULL DEFAULT 0,  -- a request may have reached X before a crash
    last_error      TEXT,
    tweet_id        TEXT,
    value_usd       TEXT NOT NULL,               -- exact decimal, as text
    ticker          TEXT NOT NULL,
    side            TEXT NOT NULL,
    first_ts_ms     INTEGER NOT NULL,            -- time of the alert's first fill
    alert           TEXT NOT NULL,               -- the whole Alert as JSON, decimals as strings
    text            TEXT,                        -- the post's text, fixed at the first attempt
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL
) STRICT;
CREATE INDEX outbox_due ON outbox (status, next_attempt_ms);
CREATE INDEX outbox_updated ON outbox (updated_ms);

-- The primary key is the rule: no trade id belongs to two alerts.
CREATE TABLE alert_trades (
    trade_id TEXT PRIMARY KEY,
    alert_id TEXT NOT NULL REFERENCES outbox (alert_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE post_ledger (
    id          INTEGER PRIMARY KEY,
    sent_ms     INTEGER NOT NULL,
    alert_id    TEXT NOT NULL,
    status      TEXT NOT NULL,  -- outcome class: posted, already_posted, rate_limited, paused, rejected, transient
    http_status INTEGER,
    tweet_id    TEXT
) STRICT;
CREATE INDEX post_ledger_sent ON post_ledger (sent_ms);

CREATE TABLE rate_limits (
    family      TEXT PRIMARY KEY,  -- 15min (x-rate-limit-*), user_24h, app_24h
    lim         INTEGER,
    remaining   INTEGER,
    reset_s     INTEGER,           -- Unix seconds, as X sends it
    observed_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE checkpoints (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
) STRICT;
"""


def db_path(state_dir: Path) -> Path:
    """Where the database of a state directory lives."""
    return state_dir / DB_FILENAME


def wall_ms() -> int:
    """Wall-clock time now, Unix milliseconds (UTC)."""
    return time.time_ns() // 1_000_000


def utc_iso(ms: int) -> str:
    """Unix ms as an ISO UTC time; a value no calendar holds (a bad header kept by an old version) as itself."""
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return f"{ms} ms (out of range)"


def alert_to_json(alert: Alert) -> str:
    """The alert as JSON with every field needed to rebuild it; decimals as strings so nothing is rounded."""
    return msgspec.json.encode(
        {
            "trade_ids": list(alert.trade_ids),
            "ticker": alert.ticker,
            "side": alert.side,
            "contracts": str(alert.contracts),
            "value_usd": str(alert.value_usd),
            "fills": alert.fills,
            "price_low": str(alert.price_low),
            "price_high": str(alert.price_high),
            "is_block_trade": alert.is_block_trade,
            "first_ts_ms": alert.first_ts_ms,
            "last_ts_ms": alert.last_ts_ms,
            "yes_before": None if alert.yes_before is None else str(alert.yes_before),
            "yes_after": None if alert.yes_after is None else str(alert.yes_after),
        }
    ).decode()


def alert_from_json(raw: str) -> Alert:
    """Rebuild an alert stored by `alert_to_json`."""
    data = msgspec.json.decode(raw)
    return Alert(
        trade_ids=tuple(data["trade_ids"]),
        ticker=data["ticker"],
        side=cast(Side, data["side"]),
        contracts=Decimal(data["contracts"]),
        value_usd=Decimal(data["value_usd"]),
        fills=int(data["fills"]),
        price_low=Decimal(data["price_low"]),
        price_high=Decimal(data["price_high"]),
        is_block_trade=bool(data["is_block_trade"]),
        first_ts_ms=int(data["first_ts_ms"]),
        last_ts_ms=int(data["last_ts_ms"]),
        # Absent in rows written before the price move was kept.
        yes_before=_optional_decimal(data.get("yes_before")),
        yes_after=_optional_decimal(data.get("yes_after")),
    )


def _optional_decimal(raw: object) -> Decimal | None:
    return Decimal(raw) if isinstance(raw, str) else None


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One outbox row, with its alert rebuilt."""

    alert: Alert
    status: Status
    attempts: int
    failures: int
    in_doubt: bool
    last_error: str | None
    tweet_id: str | None
    text: str | None
    next_attempt_ms: int
    created_ms: int
    updated_ms: int

    @property
    def alert_id(self) -> str:
        return self.alert.alert_id


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request sent to X, as written to the post ledger."""

    sent_ms: int
    outcome: str  # the outcome class, see `post_ledger.status`
    http_status: int | None = None
    tweet_id: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimitWindow:
    """X's latest word on one limit: `family` is 15min, user_24h or app_24h."""

    family: str
    limit: int | None
    remaining: int | None
    reset_s: int | None
    observed_ms: int


@dataclass(frozen=True, slots=True)
class StatusReport:
    """What `python -m valshi_x status` shows: the outbox at a glance."""

    path: str
    exists: bool
    schema_version: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    requests_last_15min: int = 0
    requests_last_24h: int = 0
    last_posts: list[dict[str, Any]] = field(default_factory=list)
    last_errors: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[str, str] = field(default_factory=dict)
    rate_limits: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False  # the state of a dry run: its `posted` rows are whales logged as `would_post`

    def lines(self) -> list[str]:
        """Plain text for a terminal, one fact per line."""
        if not self.exists:
            return [f"no state yet at {self.path}"]
        out = [f"state: {self.path} (schema {self.schema_version})"]
        # A dry run marks its whales `posted` in its own outbox; said as such here, it would read as real posts.
        shown = "would_post" if self.dry_run else "posted"
        if self.dry_run:
            out.append("dry run: nothing here was sent to X; 'would post' marks what a real run would have sent")
        out.append("outbox: " + ", ".join(f"{shown if k == 'posted' else k}={v}" for k, v in self.counts.items()))
        if self.dry_run:
            out.append("requests to X: none (dry run)")
        else:
            out.append(
                f"requests to X that may have posted: {self.requests_last_15min} in 15 min, "
                f"{self.requests_last_24h} in 24 h"
            )
        for window in self.rate_limits:
            out.append(
                f"x limit {window['family']}: remaining {window['remaining']} of {window['limit']}, "
                f"resets {window['reset']} (seen {window['observed']})"
            )
        for name, value in self.checkpoints.items():
            out.append(f"checkpoint {name} = {_readable_checkpoint(name, value)}")
        heading = "last would-post alerts (dry run)" if self.dry_run else "last posts"
        out.append(f"{heading}:" if self.last_posts else f"{heading}: none")
        for row in self.last_posts:
            status, tweet = ("would post", "") if self.dry_run else (row["status"], f" tweet={row['tweet_id']}")
            out.append(
                f"  {row['updated']} {status} ${Decimal(row['value_usd']):,.2f} {row['ticker']} {row['side']} "
                f"alert={row['alert_id']}{tweet}"
            )
        out.append("last errors:" if self.last_errors else "last errors: none")
        for row in self.last_errors:
            out.append(
                f"  {row['updated']} {row['status']} alert={row['alert_id']} attempts={row['attempts']}: "
                f"{row['last_error']}"
            )
        return out


_ITEM_COLUMNS = (
    "alert, status, attempts, failures, in_doubt, last_error, tweet_id, text, next_attempt_ms, created_ms, updated_ms"
)


def _readable_checkpoint(name: str, value: str) -> str:
    """Times kept as Unix ms (names ending in `_ms`) are shown as UTC too."""
    if name.endswith("_ms") and value.isascii() and value.isdigit() and len(value) <= 18:
        return f"{value} ({utc_iso(int(value))})"
    return value


def _item(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(
        alert=alert_from_json(row[0]),
        status=cast(Status, row[1]),
        attempts=row[2],
        failures=row[3],
        in_doubt=bool(row[4]),
        last_error=row[5],
        tweet_id=row[6],
        text=row[7],
        next_attempt_ms=row[8],
        created_ms=row[9],
        updated_ms=row[10],
    )


def _status_report(conn: sqlite3.Connection, path: str, now_ms: int, last: int) -> StatusReport:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
    counts.update(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
    marks = ",".join("?" * len(COUNTED_OUTCOMES))

    def requests_since(since_ms: int) -> int:
        sql = f"SELECT count(*) FROM post_ledger WHERE sent_ms >= ? AND status IN ({marks})"
        return int(conn.execute(sql, (since_ms, *COUNTED_OUTCOMES)).fetchone()[0])

    def rows(where: str) -> list[dict[str, Any]]:
        sql = (
            "SELECT alert_id, status, value_usd, ticker, side, tweet_id, attempts, last_error, updated_ms "
            f"FROM outbox WHERE {where} ORDER BY updated_ms DESC, rowid DESC LIMIT ?"
        )
        keys = ("alert_id", "status", "value_usd", "ticker", "side", "tweet_id", "attempts", "last_error")
        return [
            {**dict(zip(keys, r[:-1], strict=True)), "updated": utc_iso(r[-1])}
            for r in conn.execute(sql, (last,)).fetchall()
        ]

    checkpoints = dict(conn.execute("SELECT name, value FROM checkpoints ORDER BY name").fetchall())
    return StatusReport(
        path=path,
        exists=True,
        dry_run=checkpoints.get(MODE_CHECKPOINT) == "dry_run",
        schema_version=version,
        counts=counts,
        requests_last_15min=requests_since(now_ms - 15 * 60 * 1000),
        requests_last_24h=requests_since(now_ms - 24 * 3600 * 1000),
        last_posts=rows("status = 'posted'"),
        last_errors=rows("last_error IS NOT NULL AND status != 'posted'"),
        checkpoints=checkpoints,
        rate_limits=[
            {
                "family": r[0],
                "limit": r[1],
                "remaining": r[2],
                "reset": utc_iso(r[3] * 1000) if r[3] is not None else None,
                "observed": utc_iso(r[4]),
            }
            for r in conn.execute(
                "SELECT family, lim, remaining, reset_s, observed_ms FROM rate_limits ORDER BY family"
            )
        ],
    )


def read_status(state_dir: Path, *, last: int = 10, now_ms: int | None = None) -> StatusReport:
    """The status of a state directory, read-only and without touching a running daemon's rows.

    Blocking; meant for the `status` command, which runs outside any event loop. A database that cannot be read
    raises what opening it would (StateError when corrupt, ConfigError or StateUnavailable otherwise).
    """
    path = db_path(state_dir)
    if not path.exists():
        return StatusReport(path=str(path), exists=False)
    try:
        conn = _connect_read_only(path)
        try:
            check_integrity(conn, path)
            return _status_report(conn, str(path), wall_ms() if now_ms is None else now_ms, last)
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as exc:
        raise open_error(path, exc) from None


def _connect_read_only(path: Path) -> sqlite3.Connection:
    uri = path.resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error:
            conn.close()
            raise
    except sqlite3.OperationalError as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        wal = path.with_name(path.name + "-wal")
        if code not in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY) or (wal.exists() and wal.stat().st_size):
            raise
        # A WAL reader must create the shared-memory file, which a read-only directory (or a user without write
        # access) refuses. With no write-ahead log pending the file is the whole state: read it as it lies.
        return sqlite3.connect(f"{uri}?immutable=1", uri=True)
    return conn


# sqlite's primary result codes (the low byte of an extended code) for troubles that pass on their own, and for
# a file that is damaged; anything else at open (cannot open, read-only, no permission) is a setting to fix.
_PASSING_SQLITE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_INTERRUPT,
    }
)
_CORRUPT_SQLITE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_PASSING_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
)


def lock_state_dir(state_dir: Path) -> int:
    """Take the state directory's exclusive lock and write our pid into it; returns the descriptor that holds it.

    StateError (exit 78) when another process holds it: two daemons on one outbox would post each whale twice
    and reset each other's requests in flight. The lock goes with the process, even on a crash or SIGKILL.
    """
    path = state_dir / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        pid = f"pid {holder}" if holder.isdigit() else "pid unknown"
        raise StateError(
            f"STATE_DIR: {state_dir} is in use by another valshi-x ({pid}, holding {path}); "
            "stop it first, or give this one its own STATE_DIR"
        ) from None
    except OSError:
        os.close(fd)
        raise
    # Only for the message above: a full disk that refuses the pid does not make the lock any less held.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """StateError unless `PRAGMA quick_check` finds the database sound: a damaged outbox is refused at the door,
    rather than failing half-way through a whale."""
    problems = [" ".join(str(r[0]).split()) for r in conn.execute("PRAGMA quick_check(3)").fetchall()]
    if problems != ["ok"]:
        raise _corrupt(path, "; ".join(problems)[:300])


def _corrupt(path: Path, detail: str) -> StateError:
    return StateError(
        f"STATE_DIR: {path} is corrupt ({detail}); move it aside (with its -wal and -shm files) to start with an "
        "empty outbox, or restore a backup"
    )


def open_error(path: Path, exc: OSError | sqlite3.Error) -> ValshiError:
    """What a failure to open the state means: passing (exit 1, systemd retries), corrupt or a setting (exit 78)."""
    if path.exists() and not path.is_file():  # sqlite calls reading a directory an I/O error
        return ConfigError([f"STATE_DIR: cannot open {path}: not a regular file"])
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        if primary in _CORRUPT_SQLITE_CODES:
            return _corrupt(path, str(exc))
        if primary in _PASSING_SQLITE_CODES:
            return StateUnavailable(f"{path}: {exc} ({getattr(exc, 'sqlite_errorname', '?')})")
    elif exc.errno in _PASSING_ERRNOS:
        return StateUnavailable(f"{path}: {exc}")
    return ConfigError([f"STATE_DIR: cannot open {path}: {exc}"])


class Store:
    """The SQLite state, used from asyncio; every call runs on the store's own thread.

    Open with `await Store.open(path)`; `path=None` keeps everything in memory (dry runs), so a dry run can never
    touch the production outbox.
    """

    def __init__(self, path: Path | None, clock_ms: Callable[[], int], *, dry_run: bool = False) -> None:
        self.path = path
        self._clock_ms = clock_ms
        self._dry_run = dry_run  # its `posted` rows are whales a dry run logged as `would_post`
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="valshi-store")
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._lock_fd: int | None = None  # the state directory's lock, held while the store is open
        self._closed = False

    @classmethod
    async def open(cls, path: Path | None, *, clock_ms: Callable[[], int] = wall_ms, dry_run: bool = False) -> Store:
        """Open (creating it and its directory if needed) the database at `path`; recover rows cut off mid-post.

        `dry_run`: the outbox of a dry run, whose log lines must not read as posts.
        """
        store = cls(path, clock_ms, dry_run=dry_run)
        try:
            await store._call(store._open_sync)
        except BaseException:
            await store.close()
            raise
        return store

    # --- plumbing -------------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        # Shielded: a cancelled caller must not cancel a queued transaction half-way through a state change.
        return await asyncio.shield(loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs)))

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "store is not open"
        return self._conn

    def _open_sync(self) -> None:
        if self.path is None:
            self._conn = sqlite3.connect(":memory:", isolation_level=None)
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Before the database is touched: a second daemon must not reset the first one's posts in flight.
                self._lock_fd = lock_state_dir(self.path.parent)
                self._conn = sqlite3.connect(self.path, isolation_level=None)
                # WAL lets `status` read while the daemon writes. synchronous=FULL: a handful of writes per
                # whale cost nothing, and a power cut must not forget an enqueued alert or a `posted` mark.
                self._conn.execute("PRAGMA journal_mode=WAL")
                check_integrity(self._conn, self.path)
            except (OSError, sqlite3.Error) as exc:
                raise open_error(self.path, exc) from None
        conn = self._conn
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            self._migrate()
            self._recover()
        except sqlite3.Error as exc:
            raise open_error(self.path or Path(":memory:"), exc) from None

    def _migrate(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                [f"STATE_DIR: {self.path} has schema version {version}, newer than this program's {SCHEMA_VERSION}"]
            )
        if version == 0:
            # One transaction (executescript would commit on its own): a crash half-way leaves version 0.
            with self._tx():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            log.info("state_created", path=str(self.path or ":memory:"), schema_version=SCHEMA_VERSION)
        # For "the Nth whale on this market in 24 h" (`whales_on_market`); added to older state directories too.
        db.execute("CREATE INDEX IF NOT EXISTS outbox_ticker ON outbox (ticker, first_ts_ms)")

    def _recover(self) -> None:
        now_ms = self._clock_ms()
        with self._tx() as db:
            cut_off = [r[0] for r in db.execute("SELECT alert_id FROM outbox WHERE status = 'posting'")]
            if cut_off:
                db.execute(
                    "UPDATE outbox SET status = 'pending', in_doubt = 1, failures = failures + 1, "
                    "next_attempt_ms = 0, updated_ms = ?, last_error = 'interrupted while posting' "
                    "WHERE status = 'posting'",
                    (now_ms,),
                )
            db.execute("DELETE FROM post_ledger WHERE sent_ms < ?", (now_ms - _LEDGER_KEEP_MS,))
            counts = dict(db.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
            stored_mode = db.execute("SELECT value FROM checkpoints WHERE name = ?", (MODE_CHECKPOINT,)).fetchone()
        if cut_off:
            # Each of these may or may not be on X already; the retry's duplicate-content 403 settles it.
            log.warning("outbox_recovered", alert_ids=cut_off, count=len(cut_off))
        # No `posting` count: the rows cut off mid-post were just put back to pending (outbox_recovered says which).
        # Labelled by the outbox's own mode, as `status` does: this line comes before the daemon refuses a state
        # directory of the other mode, and a dry run's would-posts are not posts (nor the other way round).
        dry_run = stored_mode[0] == "dry_run" if stored_mode is not None else self._dry_run
        posted = "would_have_posted" if dry_run else "posted"
        log.info(
            "state_opened",
            path=str(self.path or ":memory:"),
            pending=counts.get("pending", 0),
            **{posted: counts.get("posted", 0)},
            failed=counts.get("failed", 0),
            skipped=counts.get("skipped", 0),
        )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def close(self) -> None:
        """Finish queued work, close the connection and stop the thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await asyncio.shield(loop.run_in_executor(self._executor, self._close_sync))
        finally:
            self._executor.shutdown(wait=False)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock, last: the database is closed by now
            self._lock_fd = None

    # --- outbox -------------------------------------------------------------------------------------------------

    async def enqueue(self, alert: Alert) -> bool:
        """Write the alert and its trade ids in one transaction.

        False, with nothing written, when any of its trade ids already belongs to an alert (the same one queued
        twice, or a regrouping after a restart): a trade is never part of two posts.
        """
        return await self._call(self._enqueue_sync, alert)

    def _enqueue_sync(self, alert: Alert) -> bool:
        now_ms = self._clock_ms()
        ids = list(dict.fromkeys(alert.trade_ids))
        with self._tx() as db:
            overlap: list[tuple[str, str]] = []
            # Chunks stay under sqlite's limit on bound parameters; sweeps rarely have more than a few hundred fills.
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                overlap += db.execute(
                    f"SELECT trade_id, alert_id FROM alert_trades WHERE trade_id IN ({marks})", chunk
                ).fetchall()
            if not overlap:
                db.execute(
                    "INSERT INTO outbox (alert_id, status, value_usd, ticker, side, first_ts_ms, alert, "
                    "created_ms, updated_ms) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                    (
                        alert.alert_id,
                        str(alert.value_usd),
                        alert.ticker,
                        alert.side,
                        alert.first_ts_ms,
                        alert_to_json(alert),
                        now_ms,
                        now_ms,
                    ),
                )
                db.executemany(
                    "INSERT INTO alert_trades (trade_id, alert_id) VALUES (?, ?)",
                    [(trade_id, alert.alert_id) for trade_id in ids],
                )
        if overlap:
            log.warning(
                "alert_overlaps_existing",
                alert_id=alert.alert_id,
                ticker=alert.ticker,
                value_usd=alert.value_usd_2dp,
                overlapping_trade_ids=sorted(t for t, _ in overlap),
                existing_alert_ids=sorted({a for _, a in overlap}),
                same_alert={a for _, a in overlap} == {alert.alert_id},
            )
            return False
        return True

    async def claim_next(self, now_ms: int) -> OutboxItem | None:
        """The pending alert to post next: among those due at `now_ms`, the biggest value first, then the oldest."""
        return await self._call(self._claim_next_sync, now_ms)

    def _claim_next_sync(self, now_ms: int) -> OutboxItem | None:
        row = self._db.execute(
            f"SELECT {_ITEM_COLUMNS} FROM outbox WHERE status = 'pending' AND next_attempt_ms <= ? "
            "ORDER BY CAST(value_usd AS REAL) DESC, first_ts_ms, alert_id LIMIT 1",
            (now_ms,),
        ).fetchone()
        return _item(row) if row else None

    async def next_due_ms(self) -> int | None:
        """When the earliest pending alert becomes due; None when nothing is pending."""
        return await self._call(self._next_due_ms_sync)

    def _next_due_ms_sync(self) -> int | None:
        row = self._db.execute("SELECT min(next_attempt_ms) FROM outbox WHERE status = 'pending'").fetchone()
        return None if row[0] is None else int(row[0])

    async def get(self, alert_id: str) -> OutboxItem | None:
        return await self._call(self._get_sync, alert_id)

    def _get_sync(self, alert_id: str) -> OutboxItem | None:
        row = self._db.execute(f"SELECT {_ITEM_COLUMNS} FROM outbox WHERE alert_id = ?", (alert_id,)).fetchone()
        return _item(row) if row else None

    async def mark_posting(self, alert_id: str, text: str) -> None:
        """About to send `text`: fix the text (a retry must send the very same text) and count the attempt."""
        await self._call(self._mark_posting_sync, alert_id, text)

    def _mark_posting_sync(self, alert_id: str, text: str) -> None:
        with self._tx() as db:
            self._update(
                db,
                alert_id,
                "status = 'posting', text = coalesce(text, ?), attempts = attempts + 1",
                (text,),
                expect="pending",
            )

    async def mark_posted(
        self, alert_id: str, tweet_id: str | None, *, attempt: Attempt | None = None, note: str | None = None
    ) -> None:
        """Done. `tweet_id` is None when X said the text was already posted (a duplicate-content 403)."""
        await self._call(self._finish_sync, alert_id, "posted", note, tweet_id, attempt)

    async def mark_failed(self, alert_id: str, reason: str, *, attempt: Attempt | None = None) -> None:
        """Given up on, for `reason`; never retried."""
        await self._call(self._finish_sync, alert_id, "failed", reason, None, attempt)

    async def mark_skipped(self, alert_id: str, reason: str) -> None:
        """Not posted on purpose (too old when its turn came)."""
        await self._call(self._finish_sync, alert_id, "skipped", reason, None, None)

    def _finish_sync(
        self, alert_id: str, status: Status, error: str | None, tweet_id: str | None, attempt: Attempt | None
    ) -> None:
        with self._tx() as db:
            self._update(
                db, alert_id, "status = ?, last_error = ?, tweet_id = ?, in_doubt = 0", (status, error, tweet_id)
            )
            self._record(db, alert_id, attempt)

    async def release(
        self,
        alert_id: str,
        retry_at_ms: int,
        *,
        error: str,
        count_failure: bool = False,
        in_doubt: bool = False,
        attempt: Attempt | None = None,
    ) -> int:
        """Back to `pending`, not before `retry_at_ms`; returns the alert's failure count after this one.

        `in_doubt`: the request may have reached X (cut off before the answer).
        """
        return await self._call(
            self._release_sync,
            alert_id,
            retry_at_ms,
            error=error,
            count_failure=count_failure,
            in_doubt=in_doubt,
            attempt=attempt,
        )

    def _release_sync(
        self,
        alert_id: str,
        retry_at_ms: int,
        *,
        error: str,
        count_failure: bool,
        in_doubt: bool,
        attempt: Attempt | None,
    ) -> int:
        with self._tx() as db:
            self._update(
                db,
                alert_id,
                "status = 'pending', next_attempt_ms = ?, last_error = ?, failures = failures + ?, "
                "in_doubt = max(in_doubt, ?)",
                (retry_at_ms, error, int(count_failure), int(in_doubt)),
            )
            self._record(db, alert_id, attempt)
            return int(db.execute("SELECT failures FROM outbox WHERE alert_id = ?", (alert_id,)).fetchone()[0])

    def _update(
        self, db: sqlite3.Connection, alert_id: str, assignments: str, args: tuple[Any, ...], expect: str | None = None
    ) -> None:
        where = "alert_id = ?" if expect is None else "alert_id = ? AND status = ?"
        params = (*args, self._clock_ms(), alert_id, *(() if expect is None else (expect,)))
        cursor = db.execute(f"UPDATE outbox SET {assignments}, updated_ms = ? WHERE {where}", params)
        if cursor.rowcount != 1:
            raise LookupError(f"no outbox row {alert_id!r}" + ("" if expect is None else f" in status {expect}"))

    @staticmethod
    def _record(db: sqlite3.Connection, alert_id: str, attempt: Attempt | None) -> None:
        if attempt is not None:
            db.execute(
                "INSERT INTO post_ledger (sent_ms, alert_id, status, http_status, tweet_id) VALUES (?, ?, ?, ?, ?)",
                (attempt.sent_ms, alert_id, attempt.outcome, attempt.http_status, attempt.tweet_id),
            )

    async def counts(self) -> dict[str, int]:
        """Number of outbox rows per status (every status present, zeros included)."""
        return await self._call(self._counts_sync)

    def _counts_sync(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        counts.update(self._db.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
        return counts

    async def recent(self, n: int) -> list[OutboxItem]:
        """The `n` rows changed last, newest first."""
        return await self._call(self._recent_sync, n)

    def _recent_sync(self, n: int) -> list[OutboxItem]:
        rows = self._db.execute(
            f"SELECT {_ITEM_COLUMNS} FROM outbox ORDER BY updated_ms DESC, rowid DESC LIMIT ?", (n,)
        ).fetchall()
        return [_item(r) for r in rows]

    async def whales_on_market(self, alert: Alert, window_ms: int) -> int:
        """Whales on the alert's market whose first fill lies in the `window_ms` up to its own, itself included.

        Every outbox row counts, whatever became of it (posted, skipped, failed): each was a whale. Ties in time
        go by alert id, so two alerts never get the same rank. Counted to 999 at most (an index range, bounded).
        """
        return await self._call(self._whales_on_market_sync, alert.ticker, alert.first_ts_ms, alert.alert_id, window_ms)

    def _whales_on_market_sync(self, ticker: str, first_ts_ms: int, alert_id: str, window_ms: int) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM (SELECT 1 FROM outbox WHERE ticker = ? AND first_ts_ms > ? AND first_ts_ms <= ? "
            "AND (first_ts_ms < ? OR alert_id <= ?) LIMIT 999)",
            (ticker, first_ts_ms - window_ms, first_ts_ms, first_ts_ms, alert_id),
        ).fetchone()
        return int(row[0])

    async def trade_owner(self, trade_id: str) -> str | None:
        """The alert a trade id belongs to, if any."""
        return await self._call(self._trade_owner_sync, trade_id)

    def _trade_owner_sync(self, trade_id: str) -> str | None:
        row = self._db.execute("SELECT alert_id FROM alert_trades WHERE trade_id = ?", (trade_id,)).fetchone()
        return None if row is None else str(row[0])

    # --- ledger and rate limits ---------------------------------------------------------------------------------

    async def posts_since(self, since_ms: int) -> list[int]:
        """Send times (ms, oldest first) of requests since `since_ms` that may have created a post."""
        return await self._call(self._posts_since_sync, since_ms)

    def _posts_since_sync(self, since_ms: int) -> list[int]:
        marks = ",".join("?" * len(COUNTED_OUTCOMES))
        rows = self._db.execute(
            f"SELECT sent_ms FROM post_ledger WHERE sent_ms >= ? AND status IN ({marks}) ORDER BY sent_ms",
            (since_ms, *COUNTED_OUTCOMES),
        ).fetchall()
        return [int(r[0]) for r in rows]

    async def save_rate_limits(self, windows: Iterable[RateLimitWindow]) -> None:
        """Remember the latest rate-limit headers, so a restart does not run into a limit X already reported."""
        await self._call(self._save_rate_limits_sync, list(windows))

    def _save_rate_limits_sync(self, windows: list[RateLimitWindow]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO rate_limits (family, lim, remaining, reset_s, observed_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                [(w.family, w.limit, w.remaining, w.reset_s, w.observed_ms) for w in windows],
            )

    async def load_rate_limits(self) -> list[RateLimitWindow]:
        return await self._call(self._load_rate_limits_sync)

    def _load_rate_limits_sync(self) -> list[RateLimitWindow]:
        rows = self._db.execute("SELECT family, lim, remaining, reset_s, observed_ms FROM rate_limits").fetchall()
        return [RateLimitWindow(*r) for r in rows]

    # --- checkpoints and status ---------------------------------------------------------------------------------

    async def get_checkpoint(self, name: str) -> str | None:
        return await self._call(self._get_checkpoint_sync, name)

    def _get_checkpoint_sync(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM checkpoints WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    async def set_checkpoint(self, name: str, value: str) -> None:
        await self._call(self._set_checkpoint_sync, name, value)

    def _set_checkpoint_sync(self, name: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (name, value, updated_ms) VALUES (?, ?, ?)",
                (name, value, self._clock_ms()),
            )

    async def status(self, *, last: int = 10) -> StatusReport:
        """The same report as `read_status`, from the open store."""
        return await self._call(self._status_sync, last)

    def _status_sync(self, last: int) -> StatusReport:
        return _status_report(self._db, str(self.path or ":memory:"), self._clock_ms(), last)
