"""The daemon as a systemd service, end to end against the loopback fakes of Kalshi and X.

sd_notify (READY, health-gated WATCHDOG, STATUS, STOPPING), a stop while a post is in flight and the restart
after it, the exit codes of the real process, and the `check` and `status` commands.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from tests.fake_kalshi import (  # noqa: F401  (fixtures)
    FakeSession,
    KeyPair,
    kalshi_keys,
    rsa_private_key,
    write_pem,
)
from tests.fake_kalshi_rest import FakeKalshiRest
from tests.fake_x import FakeX, bad_request, created, held
from tests.service_helpers import (
    FAST_STREAM,
    UNIT_S,
    X_KEYS,
    Child,
    DownableKalshi,
    NotifySocket,
    child_env,
    on_rest_tape,
    service_env,
    unique_ticker,
    whale_sweep,
)
from valshi_x.check import run_checks
from valshi_x.config import Settings, load_settings
from valshi_x.daemon import Daemon, RunOptions
from valshi_x.kalshi.auth import KalshiSigner, load_private_key
from valshi_x.store import OutboxItem, Store, db_path, wall_ms


def signer_for(settings: Settings) -> KalshiSigner:
    key = load_private_key(settings.kalshi_private_key_path, settings.kalshi_private_key)
    return KalshiSigner(settings.kalshi_api_key_id, key)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 100 * UNIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - captured log lines have no event to wait on
            await asyncio.sleep(UNIT_S / 5)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


STATUS_SUMMARY = re.compile(
    r"connected since \d\d:\d\d:\d\dZ, (?P<rate>\d+) trades/min, whales today (?P<whales>\d+), "
    # A dry run (these tests' daemons) counts `would_post` lines, and says so: it posts nothing.
    r"would-posts today (?P<posts>\d+), queue (?P<queue>\d+), (last would-post \d\d:\d\d:\d\dZ|no would-post yet)"
)


# ---------------------------------------------------------------------------------------------- sd_notify


async def test_sd_notify_ready_after_subscribe_pings_while_fed_none_once_stalled_then_stopping(
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    idle_s = 4 * UNIT_S
    # The daemon's rule: Kalshi silent for longer than two idle timeouts plus the longest ordinary reconnect
    # delay means wedged (FAST_STREAM's backoff tops out at 4 units).
    health_limit_s = 2 * idle_s + 4 * UNIT_S
    go_quiet = asyncio.Event()
    sweep = whale_sweep(unique_ticker())

    async def whale_then_silence(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(sweep)
        await go_quiet.wait()
        await session.stall()  # no frame and no heartbeat from now on

    async with (
        NotifySocket.bind(tmp_path) as systemd,
        DownableKalshi(
            public_key=kalshi_keys.public_key,
            key_id=kalshi_keys.key_id,
            require_auth=True,
            ping_interval_s=UNIT_S,  # heartbeats only: after the sweep no trade comes, yet the feed is alive
            attempts=[whale_then_silence],
        ) as kalshi,
        FakeKalshiRest() as rest,
    ):
        settings = load_settings(service_env(kalshi, rest, kalshi_keys, WS_IDLE_TIMEOUT_S=str(idle_s)), need_x=False)
        env = {**systemd.env, "WATCHDOG_USEC": str(round(2 * UNIT_S * 1e6)), "WATCHDOG_PID": str(os.getpid())}
        daemon = Daemon(settings, RunOptions(dry_run=True), signer=signer_for(settings), env=env, tuning=FAST_STREAM)
        with capture_logs() as logs:
            run = asyncio.create_task(daemon.run())

            ready = await systemd.wait_for(lambda m: "READY" in m.fields)
            assert kalshi.sessions[0].subscribed.is_set()
            assert ready.fields == {"READY": "1", "STATUS": "subscribed to trades (sid 1)"}
            before_ready = systemd.messages[: systemd.messages.index(ready)]
            assert not any(m.pings for m in before_ready)  # an early ping would arm the watchdog during start-up

            await wait_until(lambda: bool(events(logs, "would_post")))
            # Fed by heartbeats alone for longer than the health limit: the pings go on, each with the summary.
            fed_from = len(systemd.messages)
            await asyncio.sleep(health_limit_s + 4 * UNIT_S)
            fed = systemd.messages[fed_from:]
            assert len(fed) >= 6 and all(m.pings for m in fed), [m.fields for m in fed]
            summary = STATUS_SUMMARY.fullmatch(fed[-1].fields["STATUS"])
            assert summary is not None, fed[-1].fields
            assert summary.group("whales", "posts", "queue") == ("1", "1", "0")
            assert int(summary.group("rate")) >= 3  # three trades within the first minute

            # Kalshi goes silent (no frames, no heartbeats) and refuses the reconnects: the pings must stop.
            kalshi.down = True
            stalled_at = time.monotonic()
            go_quiet.set()
            withheld = await systemd.wait_for(lambda m: not m.pings, timeout_s=health_limit_s + 20 * UNIT_S)
            # Not before the limit: an ordinary reconnect must not get the service restarted.
            assert withheld.at_s - stalled_at >= health_limit_s - 2 * UNIT_S
            assert withheld.fields["STATUS"].startswith("connecting")
            at = systemd.messages.index(withheld)
            await asyncio.sleep(6 * UNIT_S)
            silent = systemd.messages[at:]
            assert len(silent) >= 4 and not any(m.pings for m in silent)
            assert len(events(logs, "watchdog_withheld")) == 1

            # Kalshi is back: subscribed again, pinging again.
            kalshi.down = False
            resumed = await systemd.wait_for(lambda m: m.pings, timeout_s=40 * UNIT_S)
            assert resumed.at_s > withheld.at_s
            assert events(logs, "watchdog_resumed")

            stop_from = len(systemd.messages)
            daemon.stop.set()
            await run

        after = systemd.messages[stop_from:]
        stopping = next(m for m in after if "STOPPING" in m.fields)
        assert stopping.fields == {"STOPPING": "1", "STATUS": "draining"}
        assert not any(m.pings for m in after[after.index(stopping) :])
        assert events(logs, "daemon_stopped")[0]["alerts"] == 1


# ---------------------------------------------------------------------------------------------- stop mid-post


async def run_as_main(daemon: Daemon) -> None:
    """What `__main__` does around a run: the real SIGTERM/SIGINT handlers, then the run."""
    from valshi_x.__main__ import _install_signal_handlers

    _install_signal_handlers(daemon.stop)
    await daemon.run()


@pytest.mark.parametrize(
    ("answer", "signals"),
    [
        pytest.param("in_budget", 1, id="answer-within-drain-budget"),
        pytest.param("late_created", 1, id="no-answer-in-budget-but-posted"),
        pytest.param("late_lost", 1, id="no-answer-in-budget-not-posted"),
        pytest.param("late_created", 2, id="second-signal-forces"),
    ],
)
async def test_sigterm_during_a_post_then_restart_posts_it_exactly_once(
    answer: str,
    signals: int,
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    drain_s = 8 * UNIT_S
    state_dir = tmp_path / "state"
    ticker = unique_ticker()
    sweep = whale_sweep(ticker)
    answer_now = asyncio.Event()

    async def one_whale(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(sweep)

    async with (
        DownableKalshi(
            public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id, require_auth=True, attempts=[one_whale]
        ) as kalshi,
        FakeKalshiRest() as rest,
        FakeX(wall_ms) as x,
        NotifySocket.bind(tmp_path) as systemd,
    ):
        on_rest_tape(rest, sweep)
        event_ticker = ticker.rsplit("-", 1)[0]
        rest.add_event(event_ticker, "Who wins the whale cup?", series_ticker="KXWHALE")
        rest.add_market(ticker, event_ticker, yes_sub_title=ticker.rsplit("-", 1)[1])
        x.queue(held(answer_now, creates=answer != "late_lost"))
        env = service_env(kalshi, rest, kalshi_keys, **X_KEYS, STATE_DIR=str(state_dir), SHUTDOWN_DRAIN_S=str(drain_s))
        settings = load_settings(env, need_x=True)

        def new_daemon(env: dict[str, str] | None = None) -> Daemon:
            return Daemon(
                settings,
                RunOptions(),
                signer=signer_for(settings),
                env=env,
                x_middlewares=[x.middleware],
                tuning=FAST_STREAM,
            )

        # The first run is watched by systemd, pinging every unit, so the drain is seen from its side too.
        systemd_env = {**systemd.env, "WATCHDOG_USEC": str(round(2 * UNIT_S * 1e6))}
        with capture_logs() as first_logs:
            first = asyncio.create_task(run_as_main(new_daemon(systemd_env)))
            async with asyncio.timeout(100 * UNIT_S):
                await x.received.wait()  # the post is on its way to X, its answer held back
            os.kill(os.getpid(), signal.SIGTERM)
            signalled_at = time.monotonic()
            if answer == "in_budget":
                await asyncio.sleep(2 * UNIT_S)
                answer_now.set()
            if signals == 2:
                await asyncio.sleep(UNIT_S)
                os.kill(os.getpid(), signal.SIGTERM)
                with pytest.raises(asyncio.CancelledError):
                    await first
            else:
                await first
            stopped_after_s = time.monotonic() - signalled_at
        answer_now.set()  # let the held request end on the server too

        assert [e["signal"] for e in events(first_logs, "stop_requested")] == ["SIGTERM"]
        # systemd hears STOPPING at once, and until the end "draining" with no more pings (however long the drain).
        stopping = next(m for m in systemd.messages if "STOPPING" in m.fields)
        assert stopping.at_s - signalled_at < 2 * UNIT_S
        during_drain = systemd.messages[systemd.messages.index(stopping) :]
        assert {m.fields["STATUS"] for m in during_drain} == {"draining"}
        assert not any(m.pings for m in during_drain)
        assert len(x.requests) == 1
        first_item = await outbox_item(state_dir)
        if answer == "in_budget":
            assert stopped_after_s < drain_s
            assert first_item.status == "posted" and first_item.tweet_id is not None
            assert not events(first_logs, "post_in_flight_at_stop")
        else:
            # Cut off without an answer: back to pending, flagged in doubt, the text kept for an identical retry.
            assert first_item.status == "pending" and first_item.in_doubt
            assert first_item.text == x.requests[0].text
            if signals == 1:
                assert drain_s <= stopped_after_s < drain_s + 10 * UNIT_S
                assert events(first_logs, "post_in_flight_at_stop")[0]["budget_s"] == drain_s
                assert events(first_logs, "daemon_stopped")
            else:
                assert stopped_after_s < drain_s
                assert events(first_logs, "forced_stop")

        # The restart: same state directory, Kalshi's REST tape still holds the sweep.
        with capture_logs() as second_logs:
            second = new_daemon()
            run = asyncio.create_task(run_as_main(second))
            # The restart refetches from the checkpoint (the sweep included): a graceful stop saved one, and even a
            # forced stop this early finds the one the first start wrote.
            await wait_until(lambda: bool(events(second_logs, "backfill_done")))
            if answer != "in_budget":
                await wait_until(lambda: bool(events(second_logs, "posted") or events(second_logs, "already_posted")))
            second.stop.set()
            await run

    # Exactly one post on X whatever happened; the retry of a post X had made is answered by its duplicate 403.
    assert x.created_texts == [x.requests[0].text]
    assert "Who wins the whale cup?" in x.created_texts[0]  # the title from Kalshi REST
    expected_requests = {"in_budget": 1, "late_created": 2, "late_lost": 2}[answer]
    assert len(x.requests) == expected_requests
    if answer == "late_created":
        assert x.answered()[1] == 403 and len(events(second_logs, "already_posted")) == 1
    if answer == "late_lost":
        assert x.answered()[1] == 201 and len(events(second_logs, "posted")) == 1
    if signals == 1:
        # The restart regrouped the sweep from REST; the outbox refused it, as its trades already have an alert.
        assert events(second_logs, "daemon_stopped")[0]["alerts_refused"] == 1
    final = await outbox_item(state_dir)
    assert final.status == "posted" and final.alert_id == first_item.alert_id
    counts = await outbox_counts(state_dir)
    assert counts["posted"] == 1 and sum(counts.values()) == 1


async def outbox_item(state_dir: Path) -> OutboxItem:
    """The one row of the outbox (the tests post one whale)."""
    store = await Store.open(db_path(state_dir))
    try:
        items = await store.recent(10)
    finally:
        await store.close()
    assert len(items) == 1, items
    return items[0]


async def outbox_counts(state_dir: Path) -> dict[str, int]:
    store = await Store.open(db_path(state_dir))
    try:
        return await store.counts()
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------- the real process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_a_stop_signal_ends_the_real_process_cleanly_with_exit_0(
    signum: signal.Signals,
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    sweep = whale_sweep(unique_ticker())

    async def one_whale(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(sweep)

    async with (
        NotifySocket.bind(tmp_path) as systemd,
        DownableKalshi(
            public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id, require_auth=True, attempts=[one_whale]
        ) as kalshi,
        FakeKalshiRest() as rest,
    ):
        env = child_env(tmp_path, service_env(kalshi, rest, kalshi_keys), **systemd.env)
        child = await Child.start("--dry-run", "--log-format", "json", env=env, cwd=tmp_path)
        try:
            await systemd.wait_for(lambda m: "READY" in m.fields, timeout_s=200 * UNIT_S)
            would_post = await child.wait_for_event("would_post")
            child.proc.send_signal(signum)
            code = await child.wait()
        finally:
            await child.kill()
        async with asyncio.timeout(20 * UNIT_S):
            await kalshi.sessions[0].wait_closed()

    assert code == 0, child.stderr
    assert child.stderr == ""
    assert would_post["value_usd"] == "123000.00"
    assert [e["signal"] for e in child.named("stop_requested")] == [signum.name]
    assert child.events[-1]["event"] == "daemon_stopped" and child.events[-1]["alerts"] == 1
    assert kalshi.sessions[0].ws.close_code == 1000  # a clean close, not a dropped connection
    assert any(m.fields.get("STOPPING") == "1" for m in systemd.messages)


@pytest.mark.parametrize("problem", ["bad_settings", "state_dir_is_a_file", "state_from_a_newer_version"])
async def test_a_configuration_error_exits_78_with_one_line_per_problem(
    problem: str,
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    args = ["--dry-run"]
    async with (
        DownableKalshi(public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id) as kalshi,
        FakeKalshiRest() as rest,
    ):
        settings = service_env(kalshi, rest, kalshi_keys, STATE_DIR=str(state_dir))
        if problem == "bad_settings":
            # Not a dry run, so the four missing X keys are problems too.
            settings |= {
                "WHALE_THRESHOLD_DOLLARS": "lots",
                "KALSHI_WS_URL": "http://127.0.0.1/",
                "WS_IDLE_TIMEOUT_S": "0",
            }
            args = []
            expected = [
                "WHALE_THRESHOLD_DOLLARS",
                "KALSHI_WS_URL",
                "WS_IDLE_TIMEOUT_S",
                "X_API_KEY",
                "X_API_SECRET",
                "X_ACCESS_TOKEN",
                "X_ACCESS_TOKEN_SECRET",
            ]
        elif problem == "state_dir_is_a_file":
            state_dir.write_text("not a directory\n")
            args += ["--state-dir", str(state_dir)]
            expected = ["STATE_DIR"]
        else:
            # The state of a later version (after a rollback): refuse it rather than guess at its tables.
            state_dir.mkdir()
            with sqlite3.connect(db_path(state_dir)) as db:
                db.execute("PRAGMA user_version = 99")
            args += ["--state-dir", str(state_dir)]
            expected = ["STATE_DIR"]
        child = await Child.start(*args, "--log-format", "json", env=child_env(tmp_path, settings), cwd=tmp_path)
        try:
            code = await child.wait()
        finally:
            await child.kill()

    assert code == 78, (child.stderr, child.events[-3:])
    lines = child.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == expected
    assert all(line.startswith("valshi-x: configuration error: ") for line in lines)
    assert "Traceback" not in child.stderr and not child.named("daemon_crashed")
    assert kalshi.handshakes == []  # nothing connected: systemd's RestartPreventExitStatus=78 stops here


async def test_an_unexpected_failure_exits_1_with_the_traceback_in_the_log(
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The disk fills up under the running daemon: a 60 KiB file-size limit lets the state be created (~50 KiB of
    # write-ahead log) but not the outbox row of the first whale. No test hook: the OS refuses the write.
    full_disk = ("bash", "-c", 'ulimit -f 60 && exec "$@"', "valshi-x")
    sweep = whale_sweep(unique_ticker())

    async def one_whale(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(sweep)

    async with (
        DownableKalshi(
            public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id, require_auth=True, attempts=[one_whale]
        ) as kalshi,
        FakeKalshiRest() as rest,
    ):
        env = child_env(tmp_path, service_env(kalshi, rest, kalshi_keys))
        args = ("--dry-run", "--state-dir", str(tmp_path / "state"), "--log-format", "json")
        child = await Child.start(*args, env=env, cwd=tmp_path, wrap=full_disk)
        try:
            code = await child.wait()
        finally:
            await child.kill()

    assert code == 1, (child.stderr, child.events[-3:])
    assert child.named("state_created")  # it did start: the failure came later, while running
    crashed = child.events[-1]
    assert crashed["event"] == "daemon_crashed" and crashed["level"] == "error"
    assert "Traceback (most recent call last):" in crashed["exception"]  # the task group's, around the store's
    assert "sqlite3.OperationalError" in crashed["exception"]
    assert not child.named("would_post")  # the whale was never shown as handled


# ---------------------------------------------------------------------------------------------- check and status


def check_verdicts(lines: list[str]) -> dict[str, tuple[str, str]]:
    """`check` output as {item: (verdict, detail)}; items named by their first two words (URLs left out)."""
    verdicts = {}
    for line in lines:
        if line[:4] in ("PASS", "FAIL", "WARN"):
            item, _, detail = line[6:].partition(": ")
            verdicts[" ".join(item.split()[:2])] = (line[:4], detail)
    return verdicts


@pytest.mark.parametrize("key", ["right", "wrong"])
async def test_check_command_against_the_fakes(
    key: str,
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with (
        DownableKalshi(public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id, require_auth=True) as kalshi,
        FakeKalshiRest() as rest,
    ):
        settings = service_env(kalshi, rest, kalshi_keys)
        if key == "wrong":
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            other_path = write_pem(tmp_path / "other.pem", other, serialization.PrivateFormat.PKCS8)
            settings["KALSHI_PRIVATE_KEY_PATH"] = str(other_path)
        child = await Child.start("check", env=child_env(tmp_path, settings), cwd=tmp_path)
        try:
            code = await child.wait()
        finally:
            await child.kill()

    lines = [e["raw"].rstrip("\n") for e in child.events if "raw" in e]
    assert len(lines) == len(child.events), child.events  # plain lines, no log noise
    verdicts = check_verdicts(lines)
    assert verdicts["settings"] == ("PASS", "threshold $100000, window 100 ms")
    assert verdicts["kalshi key"] == ("PASS", f"RSA-2048 key loaded for key id {kalshi_keys.key_id}")
    assert verdicts["kalshi rest"][0] == "PASS"
    assert verdicts["x credentials"][0] == "WARN"  # no X keys: fine for --dry-run only
    assert len(kalshi.handshakes) == 1 and kalshi.handshakes[0].signed
    if key == "right":
        assert verdicts["kalshi websocket"] == ("PASS", "handshake signed, subscribed (sid 1)")
        assert kalshi.sessions[0].commands[0]["cmd"] == "subscribe"
        assert (code, lines[-1]) == (0, "all checks passed")
    else:
        assert not kalshi.handshakes[0].signature_ok
        verdict, detail = verdicts["kalshi websocket"]
        assert verdict == "FAIL" and detail.startswith("handshake rejected with HTTP 401")
        assert (code, lines[-1]) == (1, "1 check(s) failed")
    assert child.stderr == ""


@pytest.mark.parametrize("me_status", [200, 401])
async def test_check_reads_the_x_account_and_posts_nothing(
    me_status: int,
    kalshi_keys: KeyPair,  # noqa: F811
) -> None:
    # In-process: only here can tweepy's requests be sent to the fake X (by the client middleware).
    async with (
        DownableKalshi(public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id, require_auth=True) as kalshi,
        FakeKalshiRest() as rest,
        FakeX(wall_ms) as x,
    ):
        x.me_status = me_status
        settings = load_settings(service_env(kalshi, rest, kalshi_keys, **X_KEYS), need_x=True)
        out = io.StringIO()
        code = await run_checks(settings, signer_for(settings), x_middlewares=[x.middleware], out=out)

    verdicts = check_verdicts(out.getvalue().splitlines())
    assert [v for v, _ in verdicts.values()] == ["PASS"] * 4 + (["PASS"] if me_status == 200 else ["FAIL"])
    assert x.requests == []  # nothing posted
    # Signed as the user, with each key in its place (consumer key and access token are sent in the clear).
    assert len(x.me_authorizations) == 1 and x.me_authorizations[0].startswith("OAuth ")
    assert f'oauth_consumer_key="{X_KEYS["X_API_KEY"]}"' in x.me_authorizations[0]
    assert f'oauth_token="{X_KEYS["X_ACCESS_TOKEN"]}"' in x.me_authorizations[0]
    if me_status == 200:
        assert verdicts["x credentials"][1] == "signed in as @valshi_whales (nothing posted)"
        assert code == 0
    else:
        assert verdicts["x credentials"][1].startswith("HTTP 401 (keys or tokens wrong)")
        assert code == 1


async def test_status_command_shows_the_outbox_of_a_run(
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    posted_sweep, rejected_sweep = whale_sweep(unique_ticker()), whale_sweep(unique_ticker())
    first_posted = asyncio.Event()

    async def two_whales(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(posted_sweep)
        await first_posted.wait()  # one at a time, so which answer each gets is known
        await session.send_trades(rejected_sweep)

    async with (
        DownableKalshi(
            public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id, require_auth=True, attempts=[two_whales]
        ) as kalshi,
        FakeKalshiRest() as rest,
        FakeX(wall_ms) as x,
    ):
        x.queue(created(), bad_request())
        env = service_env(kalshi, rest, kalshi_keys, **X_KEYS, STATE_DIR=str(state_dir))
        settings = load_settings(env, need_x=True)
        daemon = Daemon(
            settings,
            RunOptions(),
            signer=signer_for(settings),
            x_middlewares=[x.middleware],
            tuning=FAST_STREAM,
        )
        with capture_logs() as logs:
            run = asyncio.create_task(daemon.run())
            await wait_until(lambda: bool(events(logs, "posted")))
            first_posted.set()
            await wait_until(lambda: bool(events(logs, "post_rejected")))
            daemon.stop.set()
            await run

        # While the fakes are still up, so it is plain that `status` needs none of them.
        child = await Child.start("status", "--state-dir", str(state_dir), env=child_env(tmp_path), cwd=tmp_path)
        try:
            code = await child.wait()
        finally:
            await child.kill()

    assert code == 0 and child.stderr == ""
    lines = [e["raw"].rstrip("\n") for e in child.events]
    posted, rejected = events(logs, "posted")[0], events(logs, "post_rejected")[0]
    assert lines[0] == f"state: {db_path(state_dir)} (schema 1)"
    assert lines[1] == "outbox: pending=0, posting=0, posted=1, failed=1, skipped=0"
    assert lines[2] == "requests to X that may have posted: 1 in 15 min, 1 in 24 h"  # a 400 created nothing
    checkpoint = next(line for line in lines if line.startswith("checkpoint processed_through_ms = "))
    assert int(checkpoint.split(" = ", 1)[1].split(" ")[0]) >= rejected_sweep[-1]["ts_ms"]
    assert checkpoint.endswith("Z)")  # also shown as a UTC time
    last_posts = lines[lines.index("last posts:") + 1 : lines.index("last errors:")]
    assert len(last_posts) == 1
    when, status, value, ticker, side, alert, tweet = last_posts[0].split()
    assert datetime.fromisoformat(when).tzinfo is not None and status == "posted"
    assert value == "$123,000.00"
    assert (ticker, side) == (posted_sweep[0]["market_ticker"], "yes")
    assert (alert, tweet) == (f"alert={posted['alert_id']}", f"tweet={posted['tweet_id']}")
    last_errors = lines[lines.index("last errors:") + 1 :]
    assert len(last_errors) == 1
    assert f"failed alert={rejected['alert_id']} attempts=1: rejected: " in last_errors[0]
    assert rejected["alert_id"] == rejected_sweep[0]["trade_id"]
