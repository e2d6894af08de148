"""Faults of the state and of the files around it, each tried as an attacker or a careless operator would (issue 9):
two daemons on one state directory, a full disk at start, a corrupt database, `status` on state it cannot read, a
capture file that stops taking frames, and key or env files that others can read.

Disk full is real, not mocked: `ulimit -f` makes the OS refuse the write (sqlite reports an I/O error), and
/dev/full refuses every write with ENOSPC.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import sqlite3
import tempfile
from decimal import Decimal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.fake_kalshi import (  # noqa: F401  (fixtures)
    FakeSession,
    KeyPair,
    kalshi_keys,
    rsa_private_key,
)
from tests.fake_kalshi_rest import FakeKalshiRest
from tests.service_helpers import (
    FAST_STREAM,
    UNIT_S,
    Child,
    DownableKalshi,
    child_env,
    service_env,
    unique_ticker,
    whale_sweep,
)
from valshi_x.capture import Recorder
from valshi_x.check import show_status
from valshi_x.config import load_settings
from valshi_x.daemon import Daemon, RunOptions
from valshi_x.errors import StateError, StateUnavailable
from valshi_x.kalshi.auth import KalshiSigner, load_private_key
from valshi_x.store import LOCK_FILENAME, Store, alert_to_json, db_path
from valshi_x.whales import Alert

T0_MS = 1_800_000_000_000


def whale(n: int) -> Alert:
    return Alert(
        trade_ids=(f"fault-{n}-a", f"fault-{n}-b"),
        ticker="KXFAULT-26DEC31",
        side="yes",
        contracts=Decimal(300_000),
        value_usd=Decimal(150_000),
        fills=2,
        price_low=Decimal("0.5000"),
        price_high=Decimal("0.5000"),
        is_block_trade=False,
        first_ts_ms=T0_MS,
        last_ts_ms=T0_MS + 20,
    )


async def state_with_whales(state_dir: Path, count: int) -> Path:
    """A state directory whose outbox holds `count` pending whales; returns the database path."""
    path = db_path(state_dir)
    store = await Store.open(path)
    for n in range(count):
        assert await store.enqueue(whale(n))
    await store.close()  # the last connection closes: the write-ahead log is folded into the file
    return path


def damage_table(path: Path, table: str) -> None:
    """Overwrite the root page of `table` with garbage, as a bad sector or a torn write would."""
    with sqlite3.connect(path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    db.close()
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


def open_directory() -> Path:
    """A fresh directory other users may enter (pytest's tmp_path is closed to them)."""
    base = Path(tempfile.mkdtemp(prefix="valshi-x-status-"))
    base.chmod(0o755)
    return base


def stderr_lines(child: Child) -> list[str]:
    return child.stderr.splitlines()


# ---------------------------------------------------------------------------------------------- #5 two daemons


async def test_a_second_daemon_on_the_same_state_exits_78_naming_the_pid_and_leaves_the_first_ones_posts_alone(
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    async with (
        DownableKalshi(public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id) as kalshi,
        FakeKalshiRest() as rest,
    ):
        env = child_env(tmp_path, service_env(kalshi, rest, kalshi_keys))
        args = ("--dry-run", "--state-dir", str(state_dir), "--log-format", "json")
        first = await Child.start(*args, env=env, cwd=tmp_path)
        second: Child | None = None
        status: Child | None = None
        try:
            await first.wait_for_event("state_opened")
            # The first daemon is in the middle of a post (as far as its outbox says).
            with sqlite3.connect(db_path(state_dir), timeout=10) as db:
                db.execute(
                    "INSERT INTO outbox (alert_id, status, value_usd, ticker, side, first_ts_ms, alert, created_ms, "
                    "updated_ms) VALUES (?, 'posting', '150000', 'KXFAULT-26DEC31', 'yes', ?, ?, ?, ?)",
                    (whale(1).alert_id, T0_MS, alert_to_json(whale(1)), T0_MS, T0_MS),
                )
            db.close()
            second = await Child.start(*args, env=env, cwd=tmp_path)
            second_code = await second.wait()
            # `status` reads beside the running daemon, without its lock.
            status = await Child.start("status", "--state-dir", str(state_dir), env=child_env(tmp_path), cwd=tmp_path)
            status_code = await status.wait()
            status_lines = [e["raw"].rstrip("\n") for e in status.events]
            assert first.proc.returncode is None  # the first one never noticed
            first.proc.send_signal(signal.SIGTERM)
            first_code = await first.wait()
        finally:
            for child in (first, second, status):
                if child is not None:
                    await child.kill()

    assert second_code == 78, (second.stderr, second.events[-3:])
    [line] = stderr_lines(second)
    assert line.startswith("valshi-x: state error: STATE_DIR: ")
    assert f"pid {first.pid}" in line and "in use" in line
    assert not second.named("state_opened") and not second.named("outbox_recovered")
    assert not second.named("daemon_crashed")
    assert (state_dir / LOCK_FILENAME).read_text().strip() == str(first.pid)
    assert status_code == 0 and status.stderr == ""
    assert "outbox: pending=0, posting=1, would_post=0, failed=0, skipped=0" in status_lines  # a dry run's state
    assert first_code == 0, first.stderr
    with sqlite3.connect(db_path(state_dir)) as db:
        # Still `posting`: the newcomer did not take it for a crash and reset it to pending.
        assert db.execute("SELECT status, in_doubt FROM outbox").fetchall() == [("posting", 0)]
    db.close()


async def test_the_lock_goes_with_the_store_and_a_memory_store_needs_none(tmp_path: Path) -> None:
    path = db_path(tmp_path / "state")
    store = await Store.open(path)
    with pytest.raises(StateError, match=f"pid {os.getpid()}"):
        await Store.open(path)
    in_memory = await Store.open(None)  # a dry run's own outbox: nothing to share, nothing locked
    await in_memory.close()
    await store.close()
    again = await Store.open(path)  # released with the store
    await again.close()


# ---------------------------------------------------------------------------------------------- #6 state faults at open


async def test_a_full_disk_at_start_exits_1_so_systemd_restarts_it(
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    # 1 KiB file-size limit: the directory and the lock file are made, the database's first page is refused.
    full_disk = ("bash", "-c", 'ulimit -f 1 && exec "$@"', "valshi-x")
    async with (
        DownableKalshi(public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id) as kalshi,
        FakeKalshiRest() as rest,
    ):
        env = child_env(tmp_path, service_env(kalshi, rest, kalshi_keys))
        args = ("--dry-run", "--state-dir", str(tmp_path / "state"), "--log-format", "json")
        child = await Child.start(*args, env=env, cwd=tmp_path, wrap=full_disk)
        try:
            code = await child.wait()
        finally:
            await child.kill()

    assert code == 1, (child.stderr, child.events[-3:])  # not 78: systemd's RestartPreventExitStatus would stop
    [unavailable] = child.named("state_unavailable")
    assert unavailable["level"] == "error" and "disk I/O error" in unavailable["error"]
    assert str(db_path(tmp_path / "state")) in unavailable["error"]
    assert "Traceback" not in child.stderr and not child.named("daemon_crashed")
    assert kalshi.handshakes == []


async def test_a_database_locked_by_another_program_is_a_passing_trouble(tmp_path: Path) -> None:
    # Not another valshi-x (the lock file stops those): say, `sqlite3` left open in a write transaction.
    path = await state_with_whales(tmp_path / "state", 1)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StateUnavailable, match="database is locked"):
            await Store.open(path)  # after sqlite's own 5 s of patience
    finally:
        other.close()
    store = await Store.open(path)  # and it passes
    await store.close()


@pytest.mark.parametrize("damage", ["not_a_database", "damaged_alert_trades_page", "damaged_outbox_page"])
async def test_corrupt_state_exits_78_with_one_line_naming_the_file(
    damage: str,
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    if damage == "not_a_database":
        state_dir.mkdir()
        path = db_path(state_dir)
        path.write_bytes(b"\x00garbage" * 1024)
    else:
        path = await state_with_whales(state_dir, 40)
        damage_table(path, damage.removeprefix("damaged_").removesuffix("_page"))
    async with (
        DownableKalshi(public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id) as kalshi,
        FakeKalshiRest() as rest,
    ):
        env = child_env(tmp_path, service_env(kalshi, rest, kalshi_keys))
        args = ("--dry-run", "--state-dir", str(state_dir), "--log-format", "json")
        child = await Child.start(*args, env=env, cwd=tmp_path)
        try:
            code = await child.wait(timeout_s=100 * UNIT_S)
        finally:
            await child.kill()

    assert code == 78, (child.stderr, child.events[-3:])
    [line] = stderr_lines(child)
    assert line.startswith(f"valshi-x: state error: STATE_DIR: {path} is corrupt (")
    assert "Traceback" not in child.stderr and not child.named("daemon_crashed")
    assert kalshi.handshakes == []


# ---------------------------------------------------------------------------------------------- #14 status


@pytest.mark.parametrize(
    "damage", ["not_a_database", "damaged_alert_trades_page", "damaged_outbox_page", "database_is_a_directory"]
)
async def test_status_on_state_it_cannot_read_says_so_in_one_line(damage: str, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    if damage == "not_a_database":
        state_dir.mkdir()
        db_path(state_dir).write_bytes(b"\x00garbage" * 1024)
    elif damage == "database_is_a_directory":
        db_path(state_dir).mkdir(parents=True)
    else:
        path = await state_with_whales(state_dir, 40)
        damage_table(path, damage.removeprefix("damaged_").removesuffix("_page"))
    out, err = io.StringIO(), io.StringIO()
    code = show_status(state_dir, out=out, err=err)
    assert code == 78
    assert out.getvalue() == ""
    [line] = err.getvalue().splitlines()
    assert line.startswith("valshi-x: status: STATE_DIR: ") and str(db_path(state_dir)) in line
    expected = "cannot open" if damage == "database_is_a_directory" else "is corrupt"
    assert expected in line


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("db_mode", [0o644, 0o600])
async def test_status_as_another_user_reads_what_it_may_and_says_what_it_may_not(db_mode: int) -> None:
    # The operator's own account beside the daemon's: it may read the database (or not) but never write next to it.
    base = open_directory()
    try:
        state_dir = base / "state"
        path = await state_with_whales(state_dir, 2)
        path.chmod(db_mode)
        nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        child = await Child.start("status", "--state-dir", str(state_dir), env=child_env(base), cwd=base, wrap=nobody)
        try:
            code = await child.wait()
        finally:
            await child.kill()
    finally:
        shutil.rmtree(base)
    if db_mode == 0o644:
        assert code == 0, child.stderr
        assert any("pending=2" in str(e.get("raw")) for e in child.events)
    else:
        assert code == 78
        [line] = child.stderr.splitlines()
        assert line == f"valshi-x: status: STATE_DIR: cannot open {path}: unable to open database file"


# ---------------------------------------------------------------------------------------------- #10 recording


async def test_a_recording_that_fails_at_run_time_stops_recording_and_the_daemon_keeps_posting(
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    recording_stopped = asyncio.Event()

    async def two_whales(session: FakeSession) -> None:
        await session.wait_subscribed()
        await session.send_trades(whale_sweep(unique_ticker()))
        await recording_stopped.wait()
        await session.send_trades(whale_sweep(unique_ticker()))

    async with (
        DownableKalshi(
            public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id, require_auth=True, attempts=[two_whales]
        ) as kalshi,
        FakeKalshiRest() as rest,
    ):
        settings = load_settings(service_env(kalshi, rest, kalshi_keys), need_x=False)
        key = load_private_key(settings.kalshi_private_key_path, settings.kalshi_private_key)
        daemon = Daemon(
            settings,
            # /dev/full opens for appending like a file and refuses every write with ENOSPC: a full disk.
            RunOptions(dry_run=True, record_path=Path("/dev/full")),
            signer=KalshiSigner(settings.kalshi_api_key_id, key),
            tuning=FAST_STREAM,
        )
        with capture_logs() as logs:
            run = asyncio.create_task(daemon.run())
            async with asyncio.timeout(200 * UNIT_S):
                while not any(e["event"] == "recording_stopped" for e in logs):  # noqa: ASYNC110
                    await asyncio.sleep(UNIT_S / 5)
                recording_stopped.set()
                while sum(e["event"] == "would_post" for e in logs) < 2:  # noqa: ASYNC110
                    await asyncio.sleep(UNIT_S / 5)
            daemon.stop.set()
            await run

    stopped = [e for e in logs if e["event"] == "recording_stopped"]
    assert len(stopped) == 1 and stopped[0]["log_level"] == "error"
    assert "No space left on device" in stopped[0]["reason"]
    assert len([e for e in logs if e["event"] == "would_post"]) == 2
    assert daemon.recorder is not None and daemon.recorder._pending == []  # frames no longer pile up


async def test_a_capture_file_removed_while_recording_stops_recording_with_one_error(tmp_path: Path) -> None:
    path = tmp_path / "capture.jsonl"
    recorder = Recorder(path, flush_every_s=UNIT_S / 5)
    with capture_logs() as logs:
        task = asyncio.create_task(recorder.run())
        recorder.record('{"type":"trade"}')
        async with asyncio.timeout(100 * UNIT_S):
            while recorder.frames_written < 1:  # noqa: ASYNC110
                await asyncio.sleep(UNIT_S / 5)
        path.unlink()  # appending would go on "succeeding" into a file nobody can read
        for _ in range(3):
            recorder.record('{"type":"trade"}')
        async with asyncio.timeout(100 * UNIT_S):
            while recorder.stopped_reason is None:  # noqa: ASYNC110
                await asyncio.sleep(UNIT_S / 5)
        recorder.record('{"type":"trade"}')
        await asyncio.sleep(UNIT_S)
        assert not task.done()  # the task idles on: the daemon sees nothing end early
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [e["event"] for e in logs] == ["recording_stopped"]
    assert logs[0]["frames_written"] == 1 and logs[0]["frames_lost"] == 3
    assert "removed or replaced" in logs[0]["reason"]


# ---------------------------------------------------------------------------------------------- #16 file modes


async def test_key_and_env_files_readable_by_others_get_one_warning_at_start_and_a_warn_in_check(
    kalshi_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    env_file = tmp_path / "valshi-x.env"
    env_file.write_text(f"KALSHI_PRIVATE_KEY_PATH={kalshi_keys.pkcs8_path}\nKALSHI_API_KEY_ID={kalshi_keys.key_id}\n")
    env_file.chmod(0o644)
    kalshi_keys.pkcs8_path.chmod(0o640)
    capture = tmp_path / "empty.jsonl"
    capture.write_text("")

    async def run(*args: str) -> Child:
        child = await Child.start(*args, env=child_env(tmp_path), cwd=tmp_path)
        try:
            await child.wait()
        finally:
            await child.kill()
        return child

    replay = await run("--replay", str(capture), "--env-file", str(env_file), "--log-format", "json")
    warned = replay.named("secret_file_readable")
    assert {(e["path"], e["mode"]) for e in warned} == {(str(env_file), "0644"), (str(kalshi_keys.pkcs8_path), "0640")}
    assert len(warned) == 2 and all(e["level"] == "warning" for e in warned)
    assert warned[0]["hint"] == f"chmod 600 {warned[0]['path']}"

    async with (
        DownableKalshi(public_key=kalshi_keys.public_key, key_id=kalshi_keys.key_id) as kalshi,
        FakeKalshiRest() as rest,
    ):
        env_file.write_text(f"KALSHI_WS_URL={kalshi.url}\nKALSHI_API_URL={rest.base_url}\n" + env_file.read_text())
        check = await run("check", "--env-file", str(env_file))
    lines = [str(e.get("raw", "")).rstrip("\n") for e in check.events]
    assert f"WARN  file permissions: {env_file} is mode 0644, readable by others: chmod 600 {env_file}" in lines
    assert any(line.startswith(f"WARN  file permissions: {kalshi_keys.pkcs8_path} is mode 0640") for line in lines)

    env_file.chmod(0o600)
    kalshi_keys.pkcs8_path.chmod(0o600)
    quiet = await run("--replay", str(capture), "--env-file", str(env_file), "--log-format", "json")
    assert not quiet.named("secret_file_readable")
