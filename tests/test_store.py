"""The SQLite state: schema, the outbox's life cycle, the one-alert-per-trade rule across restarts, recovery of
rows cut off mid-post, the ledger, checkpoints, and the read-only status report."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from decimal import Decimal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from valshi_x.errors import ConfigError
from valshi_x.store import (
    MODE_CHECKPOINT,
    SCHEMA_VERSION,
    Attempt,
    RateLimitWindow,
    Store,
    alert_from_json,
    alert_to_json,
    db_path,
    read_status,
)
from valshi_x.whales import Alert

T0_MS = 1_793_000_000_000


class Clock:
    def __init__(self) -> None:
        self.ms = T0_MS

    def __call__(self) -> int:
        return self.ms


def whale(first_id: str, *more_ids: str, value: str = "150000", at_ms: int = T0_MS) -> Alert:
    ids = (first_id, *more_ids)
    return Alert(
        trade_ids=ids,
        ticker="KXBTC-26DEC31-T100000",
        side="yes",
        contracts=Decimal("241935.48"),
        value_usd=Decimal(value),
        fills=len(ids),
        price_low=Decimal("0.6100"),
        price_high=Decimal("0.6300"),
        is_block_trade=False,
        first_ts_ms=at_ms,
        last_ts_ms=at_ms + 40,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


async def test_first_open_creates_the_schema_in_wal_mode_with_full_sync(state_dir: Path, clock: Clock) -> None:
    store = await Store.open(db_path(state_dir), clock_ms=clock)
    await store.close()
    conn = sqlite3.connect(db_path(state_dir))
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"outbox", "alert_trades", "post_ledger", "rate_limits", "checkpoints"}
    finally:
        conn.close()


async def test_sqlite_runs_on_the_stores_own_thread_never_the_loops(clock: Clock) -> None:
    store = await Store.open(None, clock_ms=clock)
    seen: set[str] = set()

    def trace(_statement: str) -> None:
        seen.add(threading.current_thread().name)

    await store._call(lambda: store._db.set_trace_callback(trace))
    await store.enqueue(whale("t1"))
    await store.claim_next(T0_MS)
    await store.close()
    assert seen
    assert all(name.startswith("valshi-store") for name in seen)
    assert threading.current_thread().name not in seen


def _database_with_version(state_dir: Path, version: int) -> None:
    state_dir.mkdir()
    conn = sqlite3.connect(db_path(state_dir))
    conn.execute(f"PRAGMA user_version={version}")
    conn.close()


async def test_a_newer_schema_is_refused_with_the_key_to_blame(state_dir: Path, clock: Clock) -> None:
    _database_with_version(state_dir, 99)
    with pytest.raises(ConfigError) as caught:
        await Store.open(db_path(state_dir), clock_ms=clock)
    assert caught.value.problems[0].startswith("STATE_DIR:")
    assert "99" in caught.value.problems[0]


async def test_alert_round_trips_exactly_through_json() -> None:
    alert = whale("t1", "t2", value="123456.789012")
    assert alert_from_json(alert_to_json(alert)) == alert
    assert '"value_usd":"123456.789012"' in alert_to_json(alert)


async def test_enqueue_then_life_cycle_to_posted(clock: Clock) -> None:
    store = await Store.open(None, clock_ms=clock)
    alert = whale("t1", "t2")
    assert await store.enqueue(alert)
    item = await store.claim_next(T0_MS)
    assert item is not None
    assert (item.alert, item.status, item.attempts, item.text) == (alert, "pending", 0, None)

    await store.mark_posting("t1", "the text")
    assert await store.claim_next(T0_MS) is None  # in flight: not claimable
    clock.ms += 5
    await store.mark_posted("t1", "1234", attempt=Attempt(T0_MS, "posted", 201, "1234"))
    done = await store.get("t1")
    assert done is not None
    assert (done.status, done.tweet_id, done.attempts, done.text, done.updated_ms) == (
        "posted",
        "1234",
        1,
        "the text",
        T0_MS + 5,
    )
    assert await store.counts() == {"pending": 0, "posting": 0, "posted": 1, "failed": 0, "skipped": 0}
    assert await store.posts_since(T0_MS) == [T0_MS]
    await store.close()


async def test_mark_posting_needs_a_pending_row(clock: Clock) -> None:
    store = await Store.open(None, clock_ms=clock)
    await store.enqueue(whale("t1"))
    await store.mark_posting("t1", "x")
    with pytest.raises(LookupError):
        await store.mark_posting("t1", "x")
    with pytest.raises(LookupError):
        await store.mark_posting("nope", "x")
    await store.close()


async def test_release_keeps_the_first_text_and_delays_the_row(clock: Clock) -> None:
    store = await Store.open(None, clock_ms=clock)
    await store.enqueue(whale("t1"))
    await store.mark_posting("t1", "first text")
    failures = await store.release("t1", T0_MS + 60_000, error="transient: 503", count_failure=True, in_doubt=True)
    assert failures == 1
    assert await store.claim_next(T0_MS + 59_999) is None
    assert await store.next_due_ms() == T0_MS + 60_000
    item = await store.claim_next(T0_MS + 60_000)
    assert item is not None
    assert (item.failures, item.in_doubt, item.last_error) == (1, True, "transient: 503")
    await store.mark_posting("t1", "another text")
    again = await store.get("t1")
    assert again is not None
    assert again.text == "first text"  # a retry sends the very same text
    assert again.attempts == 2
    await store.close()


async def test_claim_next_takes_the_biggest_due_value_first(clock: Clock) -> None:
    store = await Store.open(None, clock_ms=clock)
    for trade_id, value in (("a", "100000"), ("b", "2500000.5"), ("c", "999999.99"), ("d", "2500000.49")):
        await store.enqueue(whale(trade_id, value=value))
    await store.mark_posting("b", "x")
    await store.release("b", T0_MS + 1000, error="rate limited")
    order = []
    while (item := await store.claim_next(T0_MS)) is not None:
        order.append(item.alert_id)
        await store.mark_skipped(item.alert_id, "test")
    assert order == ["d", "c", "a"]  # b is the biggest but not due yet
    item = await store.claim_next(T0_MS + 1000)
    assert item is not None
    assert item.alert_id == "b"
    await store.close()


async def test_a_trade_never_belongs_to_two_alerts_even_across_a_restart(state_dir: Path, clock: Clock) -> None:
    path = db_path(state_dir)
    store = await Store.open(path, clock_ms=clock)
    assert await store.enqueue(whale("t1", "t2", "t3"))
    await store.close()

    store = await Store.open(path, clock_ms=clock)
    with capture_logs() as logs:
        # A regrouping after the restart: a new alert with a new first id that takes in t3.
        assert not await store.enqueue(whale("t0", "t3", "t4"))
        # The same alert again (a replayed feed).
        assert not await store.enqueue(whale("t1", "t2", "t3"))
    overlaps = [e for e in logs if e["event"] == "alert_overlaps_existing"]
    assert overlaps[0]["overlapping_trade_ids"] == ["t3"]
    assert overlaps[0]["existing_alert_ids"] == ["t1"]
    assert overlaps[0]["same_alert"] is False
    assert overlaps[1]["same_alert"] is True
    # Nothing of the refused alert was written, not even its fresh trade ids.
    assert await store.get("t0") is None
    assert await store.trade_owner("t4") is None
    assert await store.trade_owner("t0") is None
    assert await store.trade_owner("t3") == "t1"
    assert await store.counts() == {"pending": 1, "posting": 0, "posted": 0, "failed": 0, "skipped": 0}
    await store.close()


async def test_an_alert_with_hundreds_of_fills_is_stored_whole(clock: Clock) -> None:
    store = await Store.open(None, clock_ms=clock)
    ids = [f"f{i}" for i in range(1234)]
    assert await store.enqueue(whale(*ids))
    assert not await store.enqueue(whale("new", "f1200"))
    assert await store.trade_owner("f1233") == "f0"
    await store.close()


@pytest.mark.parametrize(("stored_mode", "run_dry"), [("dry_run", False), ("posting", True)])
async def test_state_opened_counts_posts_by_the_outboxs_mode_not_the_runs(
    state_dir: Path, clock: Clock, stored_mode: str, run_dry: bool
) -> None:
    # The line is logged before the daemon refuses a state directory of the other mode: a live run on a dry run's
    # directory must not claim real posts, a dry run on production's must not call real posts would-posts.
    path = db_path(state_dir)
    store = await Store.open(path, clock_ms=clock, dry_run=not run_dry)
    await store.set_checkpoint(MODE_CHECKPOINT, stored_mode)
    await store.enqueue(whale("t1"))
    await store.mark_posting("t1", "the text")
    await store.mark_posted("t1", "1234", attempt=Attempt(T0_MS, "posted", 201, "1234"))
    await store.close()

    with capture_logs() as logs:
        store = await Store.open(path, clock_ms=clock, dry_run=run_dry)
    await store.close()
    (opened,) = [e for e in logs if e["event"] == "state_opened"]
    label, wrong = ("would_have_posted", "posted") if stored_mode == "dry_run" else ("posted", "would_have_posted")
    assert opened[label] == 1 and wrong not in opened


async def test_a_fresh_outbox_is_labelled_by_the_runs_mode(clock: Clock) -> None:
    with capture_logs() as logs:
        store = await Store.open(None, clock_ms=clock, dry_run=True)
    await store.close()
    (opened,) = [e for e in logs if e["event"] == "state_opened"]
    assert opened["would_have_posted"] == 0 and "posted" not in opened


async def test_a_row_cut_off_mid_post_is_resumed_in_doubt(state_dir: Path, clock: Clock) -> None:
    path = db_path(state_dir)
    store = await Store.open(path, clock_ms=clock)
    await store.enqueue(whale("t1"))
    await store.enqueue(whale("t9", value="200000"))
    await store.mark_posting("t1", "the text")
    await store.close()  # as if the process died here: the row stays `posting`

    with capture_logs() as logs:
        store = await Store.open(path, clock_ms=clock)
    recovered = [e for e in logs if e["event"] == "outbox_recovered"]
    assert recovered == [{"event": "outbox_recovered", "log_level": "warning", "alert_ids": ["t1"], "count": 1}]
    (opened,) = [e for e in logs if e["event"] == "state_opened"]  # counted after the recovery: none `posting`
    assert {k: v for k, v in opened.items() if k not in {"event", "log_level", "path"}} == {
        "pending": 2,
        "posted": 0,
        "failed": 0,
        "skipped": 0,
    }
    item = await store.get("t1")
    assert item is not None
    assert (item.status, item.in_doubt, item.failures, item.text) == ("pending", True, 1, "the text")
    assert (await store.get("t9")) is not None
    assert await store.counts() == {"pending": 2, "posting": 0, "posted": 0, "failed": 0, "skipped": 0}
    await store.close()


async def test_a_cancelled_caller_does_not_cancel_the_write(clock: Clock) -> None:
    store = await Store.open(None, clock_ms=clock)
    task = asyncio.create_task(store.enqueue(whale("t1")))
    await asyncio.sleep(0)  # the transaction is handed to the store's thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.trade_owner("t1") == "t1"
    await store.close()
    await store.close()  # twice is fine


async def test_ledger_counts_only_requests_that_may_have_posted(clock: Clock) -> None:
    store = await Store.open(None, clock_ms=clock)
    for i, outcome in enumerate(("posted", "rate_limited", "transient", "already_posted", "rejected", "paused")):
        trade_id = f"t{i}"
        await store.enqueue(whale(trade_id))
        await store.mark_posting(trade_id, trade_id)
        await store.release(trade_id, 0, error=outcome, attempt=Attempt(T0_MS + i, outcome, 200))
    assert await store.posts_since(T0_MS) == [T0_MS, T0_MS + 2, T0_MS + 3]
    assert await store.posts_since(T0_MS + 1) == [T0_MS + 2, T0_MS + 3]
    await store.close()


async def test_rate_limits_and_checkpoints_survive_a_restart(state_dir: Path, clock: Clock) -> None:
    path = db_path(state_dir)
    store = await Store.open(path, clock_ms=clock)
    windows = [
        RateLimitWindow("15min", 100, 0, T0_MS // 1000 + 900, T0_MS),
        RateLimitWindow("user_24h", 17, 3, T0_MS // 1000 + 86400, T0_MS),
    ]
    await store.save_rate_limits(windows)
    await store.save_rate_limits([RateLimitWindow("15min", 100, 99, T0_MS // 1000 + 901, T0_MS + 1)])
    assert await store.get_checkpoint("stream") is None
    await store.set_checkpoint("stream", "1793000000000")
    await store.set_checkpoint("stream", "1793000000500")
    await store.close()

    store = await Store.open(path, clock_ms=clock)
    assert sorted(await store.load_rate_limits(), key=lambda w: w.family) == [
        RateLimitWindow("15min", 100, 99, T0_MS // 1000 + 901, T0_MS + 1),
        windows[1],
    ]
    assert await store.get_checkpoint("stream") == "1793000000500"
    await store.close()


async def test_in_memory_stores_are_separate(clock: Clock) -> None:
    one = await Store.open(None, clock_ms=clock)
    two = await Store.open(None, clock_ms=clock)
    await one.enqueue(whale("t1"))
    assert await two.enqueue(whale("t1"))
    assert (await one.counts())["pending"] == (await two.counts())["pending"] == 1
    await one.close()
    await two.close()


async def test_status_reads_a_live_store_without_changing_it(state_dir: Path, clock: Clock) -> None:
    assert not read_status(state_dir).exists
    assert read_status(state_dir).lines() == [f"no state yet at {db_path(state_dir)}"]

    store = await Store.open(db_path(state_dir), clock_ms=clock)
    await store.enqueue(whale("t1", value="150000.5"))
    await store.enqueue(whale("t2"))
    await store.enqueue(whale("t3"))
    await store.mark_posting("t1", "a")
    await store.mark_posted("t1", "1900", attempt=Attempt(T0_MS, "posted", 201, "1900"))
    await store.mark_posting("t2", "b")
    await store.mark_failed("t2", "rejected: 400 Tweet text is too long", attempt=Attempt(T0_MS, "rejected", 400))
    await store.mark_posting("t3", "c")  # in flight while `status` looks
    await store.set_checkpoint("stream", "1793000000000")
    await store.save_rate_limits([RateLimitWindow("user_24h", 17, 16, T0_MS // 1000 + 3600, T0_MS)])

    report = await asyncio.to_thread(read_status, state_dir, now_ms=T0_MS + 1000)
    assert report.counts == {"pending": 0, "posting": 1, "posted": 1, "failed": 1, "skipped": 0}
    assert report.requests_last_15min == report.requests_last_24h == 1
    assert [r["alert_id"] for r in report.last_posts] == ["t1"]
    assert report.last_posts[0]["tweet_id"] == "1900"
    assert report.last_posts[0]["value_usd"] == "150000.5"
    assert [(r["alert_id"], r["last_error"]) for r in report.last_errors] == [
        ("t2", "rejected: 400 Tweet text is too long")
    ]
    assert report.checkpoints == {"stream": "1793000000000"}
    assert report.rate_limits[0]["remaining"] == 16
    text = "\n".join(report.lines())
    assert "posting=1" in text
    assert "tweet=1900" in text
    assert "Tweet text is too long" in text
    # Reading did not recover the in-flight row: that is the daemon's business at its next start.
    item = await store.get("t3")
    assert item is not None
    assert item.status == "posting"
    assert (await store.status()).counts == report.counts
    await store.close()
