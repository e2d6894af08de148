"""The whole daemon in-process against loopback fakes of Kalshi (WebSocket and REST) in dry-run mode."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.fake_kalshi import (  # noqa: F401  (fixtures)
    FakeKalshi,
    FakeSession,
    KeyPair,
    kalshi_keys,
    rsa_private_key,
    trade_msg,
)
from tests.fake_kalshi_rest import FakeKalshiRest
from valshi_x.config import Settings, load_settings
from valshi_x.daemon import Daemon, RunOptions
from valshi_x.errors import ConfigError
from valshi_x.kalshi.auth import KalshiSigner, load_private_key
from valshi_x.kalshi.stream import Backoff
from valshi_x.runmode import Tuning
from valshi_x.store import Store, db_path, wall_ms

UNIT_S = 0.05  # every timing in these tests is a multiple of this
FAST_STREAM = Tuning(
    reconnect_backoff=Backoff(initial_s=UNIT_S, factor=2.0, cap_s=4 * UNIT_S),
    rejected_backoff=Backoff(initial_s=4 * UNIT_S, factor=2.0, cap_s=8 * UNIT_S),
    ws_ping_interval_s=None,
)


def settings_for(kalshi: FakeKalshi, rest: FakeKalshiRest, keys: KeyPair, **extra: str) -> Settings:
    env = {
        "KALSHI_WS_URL": kalshi.url,
        "KALSHI_API_URL": rest.base_url,
        "KALSHI_API_KEY_ID": keys.key_id,
        "KALSHI_PRIVATE_KEY_PATH": str(keys.pkcs8_path),
        "STATS_INTERVAL_S": "3600",
        **extra,
    }
    return load_settings(env, need_x=False)


def signer_for(settings: Settings) -> KalshiSigner:
    key = load_private_key(settings.kalshi_private_key_path, settings.kalshi_private_key)
    return KalshiSigner(settings.kalshi_api_key_id, key)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - captured log lines have no event to wait on
            await asyncio.sleep(UNIT_S / 5)


def whale_sweep(ts_ms: int, ticker: str) -> list[dict[str, Any]]:
    """Three fills of one order: $40k + $41k + $42k = $123k, none a whale alone."""
    return [
        trade_msg(ticker=ticker, count="100000.00", yes_price=price, ts_ms=ts_ms + i * 20)
        for i, price in enumerate(["0.4000", "0.4100", "0.4200"])
    ]


async def test_every_whale_sent_while_connected_is_reported_once_across_drops(
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Trade times in the recent past: a live daemon refuses trades dated ahead of its clock (future_time).
    clock_ms = itertools.count(wall_ms() - 30_000, 7)
    sessions_script: list[list[dict[str, Any]]] = []
    whales: list[tuple[str, ...]] = []
    for attempt in range(5):
        frames: list[dict[str, Any]] = []
        for i in range(300):
            ts = next(clock_ms)
            frames.append(trade_msg(ticker=f"KXSMALL-{i % 13}", count="50.00", ts_ms=ts))
            if i in (100, 250):
                sweep = whale_sweep(next(clock_ms), f"KXBIG-{attempt}-{i}")
                whales.append(tuple(m["trade_id"] for m in sweep))
                frames.extend(sweep)
        sessions_script.append(frames)

    def send_then_drop(frames: list[dict[str, Any]]) -> Callable[[FakeSession], Any]:
        async def script(session: FakeSession) -> None:
            await session.wait_subscribed()
            await session.send_trades(frames)
            await asyncio.sleep(2 * UNIT_S)  # the sweep's window closes on stream time or the clock
            await session.drop()

        return script

    async with (
        FakeKalshi(
            public_key=kalshi_keys.public_key,
            key_id=kalshi_keys.key_id,
            require_auth=True,
            attempts=[send_then_drop(f) for f in sessions_script],
        ) as kalshi,
        FakeKalshiRest() as rest,
    ):
        settings = settings_for(kalshi, rest, kalshi_keys, SWEEP_WINDOW_MS="200")
        daemon = Daemon(settings, RunOptions(dry_run=True), signer=signer_for(settings), tuning=FAST_STREAM)
        with structlog.testing.capture_logs() as logs:
            run = asyncio.create_task(daemon.run())
            await wait_until(lambda: len(kalshi.sessions) >= 6 and sum(e["event"] == "would_post" for e in logs) >= 10)
            daemon.stop.set()
            await run

    posted = [e for e in logs if e["event"] == "would_post"]
    assert sorted(tuple(e["trade_ids"]) for e in posted) == sorted(whales)
    assert {e["value_usd"] for e in posted} == {"123000.00"}
    assert all(h.signature_ok for h in kalshi.handshakes)
    stopped = next(e for e in logs if e["event"] == "daemon_stopped")
    # Five drops: the sixth connection may still be in its handshake when the stop comes.
    assert stopped["reconnects"] >= 4 and stopped["malformed"] == 0 and stopped["alerts"] == 10
    assert Decimal(posted[0]["contracts"]) == Decimal(300000)


async def test_a_dry_run_refuses_a_state_directory_that_posts(tmp_path: Path) -> None:
    """A dry run would mark whales posted and claim their trades in the real outbox: refused, exit 78 at the edge."""
    capture = tmp_path / "capture.jsonl"
    capture.write_text('{"type":"subscribed","id":1,"msg":{"channel":"trade","sid":1}}\n')
    settings = load_settings({"STATE_DIR": str(tmp_path / "state")}, need_x=False)
    # The directory of a real poster (a replay is always a dry run, so mark it by hand as a poster would).
    store = await Store.open(db_path(tmp_path / "state"))
    await store.set_checkpoint("outbox_mode", "posting")
    await store.close()
    daemon = Daemon(settings, RunOptions(dry_run=True, replay_path=capture, state_dir=tmp_path / "state"))
    with pytest.raises(ConfigError, match=r"--state-dir: .* holds a posting outbox"):
        await daemon.run()
    # Its own directory is fine, and remembered as a dry run's.
    other = Daemon(settings, RunOptions(dry_run=True, replay_path=capture, state_dir=tmp_path / "dry"))
    await other.run()
    store = await Store.open(db_path(tmp_path / "dry"))
    assert await store.get_checkpoint("outbox_mode") == "dry_run"
    await store.close()


async def test_title_counters_reach_the_stop_line_and_a_pause_is_logged_once(
    kalshi_keys: KeyPair,  # noqa: F811
) -> None:
    """Kalshi REST failing: the stop line counts the failed lookups, the breaker's opening and the posts that went
    out untitled while it was open; of those posts only the first has a line of its own."""
    second_batch = asyncio.Event()
    ts_ms = wall_ms() - 30_000

    async def script(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades([m for k in range(3) for m in whale_sweep(ts_ms + k * 1000, f"KXBAD-{k}")])
        await second_batch.wait()
        await session.send_trades([m for k in range(3) for m in whale_sweep(ts_ms + 5000 + k * 1000, f"KXLATE-{k}")])
        await session.wait_closed()

    async with (
        FakeKalshi(public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id, attempts=[script]) as kalshi,
        FakeKalshiRest() as rest,
    ):
        rest.script("event", 503, 503, 503)  # the first three look-ups fail: the breaker opens
        settings = settings_for(kalshi, rest, kalshi_keys, SWEEP_WINDOW_MS="200")
        daemon = Daemon(settings, RunOptions(dry_run=True), signer=signer_for(settings), tuning=FAST_STREAM)
        with structlog.testing.capture_logs() as logs:
            run = asyncio.create_task(daemon.run())
            await wait_until(lambda: sum(e["event"] == "would_post" for e in logs) >= 3)
            second_batch.set()
            await wait_until(lambda: sum(e["event"] == "would_post" for e in logs) >= 6)
            daemon.stop.set()
            await run

    assert rest.counts["event"] == 3  # nothing asked while the breaker is open
    stopped = next(e for e in logs if e["event"] == "daemon_stopped")
    titles = {k: v for k, v in stopped.items() if "title" in k}
    # An alert whose prefetched lookup was still failing waited for it rather than skipping: 0 to 3 of those.
    assert titles.pop("titles_skipped_recent_failure") in range(4)
    assert titles == {"title_lookups_failed": 3, "titles_skipped_breaker": 3, "title_breaker_opened": 1}
    (paused,) = [e for e in logs if e["event"] == "title_skipped_paused"]
    assert paused["ticker"].startswith("KXLATE-")
