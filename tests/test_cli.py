"""The command line as an operator meets it: wrong capture options, a misspelled setting, a dry run's status.

Each case runs the real CLI in a child process and checks its exit code and the one line it prints.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.test_config import ROOT, clean_env
from valshi_x.config import ENV_FILE_MAX_BYTES, SETTING_PREFIXES, unknown_settings
from valshi_x.x.poster import PosterStats

SAMPLE = ROOT / "examples" / "sample.jsonl"
CONFIG_ERROR = "valshi-x: configuration error: "


def run_cli(*args: str, cwd: Path, prefix: Sequence[str] = (), **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m valshi_x ARGS` in `cwd`; `prefix`: a command to run it under (setpriv). Never waits forever."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "valshi_x", *args],
        env=clean_env(PYTHONPATH=str(ROOT), **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def config_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single configuration-error line of a run that must have stopped before starting anything."""
    assert done.returncode == 78, done.stderr
    assert done.stdout == ""  # nothing started: no log line, no connection
    (line,) = done.stderr.splitlines()
    assert line.startswith(CONFIG_ERROR)
    return line.removeprefix(CONFIG_ERROR)


def json_events(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


# --- --record and --replay ------------------------------------------------------------------------------------


def test_record_into_a_missing_folder_exits_78_before_connecting(tmp_path: Path) -> None:
    target = tmp_path / "no-such-folder" / "capture.jsonl"
    # Nothing listens here: a run that got as far as connecting would log ws_connect_failed on stdout.
    line = config_error(run_cli("--dry-run", "--record", str(target), cwd=tmp_path, KALSHI_WS_URL="ws://127.0.0.1:9"))
    assert line == (
        f"--record: cannot write {target}: No such file or directory (the folder {target.parent} does not exist)"
    )


def test_record_onto_a_folder_or_under_a_file_exits_78(tmp_path: Path) -> None:
    assert config_error(run_cli("--dry-run", "--record", str(tmp_path), cwd=tmp_path)) == (
        f"--record: cannot write {tmp_path}: Is a directory"
    )
    a_file = tmp_path / "plain"
    a_file.write_text("x")
    line = config_error(run_cli("--dry-run", "--record", str(a_file / "capture.jsonl"), cwd=tmp_path))
    assert line.startswith(f"--record: cannot write {a_file / 'capture.jsonl'}: Not a directory")


def test_replay_with_record_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "copy.jsonl"
    line = config_error(run_cli("--replay", str(SAMPLE), "--record", str(target), cwd=tmp_path))
    assert line == "--record: cannot be combined with --replay (a replay receives no frames to record)"
    assert not target.exists()


def test_gzipped_capture_exits_78_naming_the_file(tmp_path: Path) -> None:
    packed = tmp_path / "sample.jsonl.gz"
    packed.write_bytes(gzip.compress(SAMPLE.read_bytes()))
    line = config_error(run_cli("--replay", str(packed), cwd=tmp_path))
    assert line.startswith(f"--replay: {packed} is gzip-compressed (unpack it first: gzip -dc {packed} > ")


def test_binary_capture_exits_78_naming_the_file(tmp_path: Path) -> None:
    blob = tmp_path / "capture.jsonl"
    blob.write_bytes(random.Random(7).randbytes(100_000))
    line = config_error(run_cli("--replay", str(blob), cwd=tmp_path))
    assert (
        line
        == f"--replay: {blob} is not text (binary data); a capture is text, one frame per line, as --record writes it"
    )


def test_a_capture_with_a_few_binary_lines_still_replays(tmp_path: Path) -> None:
    # Bad bytes in a frame or two are bad frames, skipped and counted like on the socket, not a bad file.
    lines = SAMPLE.read_bytes().splitlines(keepends=True)
    capture = tmp_path / "capture.jsonl"
    capture.write_bytes(b"".join([lines[0], b"\x00\xff\xfe garbage \x1f\x8b\n", *lines[1:]]))
    done = run_cli("--replay", str(capture), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = json_events(done)
    assert sum(e["event"] == "would_post" for e in events) == 10
    assert events[-1]["malformed"] == 20


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank_lines"])
def test_empty_capture_warns_no_frames(tmp_path: Path, content: bytes) -> None:
    capture = tmp_path / "empty.jsonl"
    capture.write_bytes(content)
    done = run_cli("--replay", str(capture), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (warning,) = [e for e in json_events(done) if e["level"] == "warning"]
    assert warning["event"] == "replay_no_frames"
    assert warning["path"] == str(capture)
    assert "no frames" in warning["reason"]


# --- settings that are not settings ---------------------------------------------------------------------------


def test_misspelled_setting_gets_one_warning_naming_the_closest_key(tmp_path: Path) -> None:
    done = run_cli(
        "--replay",
        str(SAMPLE),
        cwd=tmp_path,
        WHALE_TRESHOLD_DOLLARS="5000",
        STATE_DIRECTORY="/var/lib/valshi-x",  # systemd's StateDirectory= sets it: not ours, not a typo
    )
    assert done.returncode == 0, done.stderr
    warnings = [e for e in json_events(done) if e["event"] == "unknown_setting"]
    assert [(w["key"], w["did_you_mean"], w["level"]) for w in warnings] == [
        ("WHALE_TRESHOLD_DOLLARS", "WHALE_THRESHOLD_DOLLARS", "warning")
    ]
    assert "5000" not in json.dumps(warnings)  # the key's name only: a misspelled secret stays out of the log


def test_a_misspelled_required_key_is_named_beside_the_missing_one(tmp_path: Path) -> None:
    # Without it the operator reads "X_ACCESS_TOKEN_SECRET: required" while staring at a line that sets it.
    keys = {"X_API_KEY": "a", "X_API_SECRET": "b", "X_ACCESS_TOKEN": "c", "X_ACCES_TOKEN_SECRET": "d-secret"}
    done = run_cli(cwd=tmp_path, STATE_DIR=str(tmp_path / "state"), **keys)
    assert done.returncode == 78, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0].startswith(CONFIG_ERROR + "X_ACCESS_TOKEN_SECRET: ")
    assert lines[1:] == [
        CONFIG_ERROR + "X_ACCES_TOKEN_SECRET: not a setting, ignored (did you mean X_ACCESS_TOKEN_SECRET?)"
    ]
    assert "d-secret" not in done.stderr


def test_unknown_settings_use_the_prefixes_of_the_table() -> None:
    assert {"KALSHI_", "X_", "WHALE_", "SWEEP_", "POST_", "BACKFILL_"} <= set(SETTING_PREFIXES)
    env = {
        "X_API_SECRETT": "s3cr3t",
        "POST_TEMPLATES": "",
        "KALSHI_API_KEY": "abc",
        "WHALE_THRESHOLD_DOLLARS": "100000",  # known
        "HOME": "/root",  # no project prefix
        "STATE_DIRECTORY": "/var/lib/valshi-x",
    }
    assert unknown_settings(env) == [
        ("KALSHI_API_KEY", "KALSHI_API_KEY_ID"),
        ("POST_TEMPLATES", "POST_TEMPLATE"),
        ("X_API_SECRETT", "X_API_SECRET"),
    ]


# --- an env file that is not one -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "status", "run"])
def test_an_env_file_python_dotenv_would_stall_on_is_one_config_error(tmp_path: Path, command: str) -> None:
    # python-dotenv took 2.6 s on 64 KiB of lines and 11 s on 10,000 unclosed "${": refused before it reads them.
    big = tmp_path / "big.env"
    big.write_text("A=1\n" * (ENV_FILE_MAX_BYTES // 4 + 1))
    line = config_error(run_cli(command, "--env-file", str(big), cwd=tmp_path))
    assert line == f"{big}: larger than 64 KiB; an env file holds KEY=value lines"
    (tmp_path / ".env").write_text("A=" + "${" * 20_000 + "\n")  # 40 KB
    assert (
        config_error(run_cli(command, cwd=tmp_path))
        == ".env: too many '${' without a closing '}' for python-dotenv to read it"
    )


@pytest.mark.parametrize("command", ["check", "status", "run"])
def test_an_env_file_that_is_not_utf8_is_one_config_error(tmp_path: Path, command: str) -> None:
    (tmp_path / ".env").write_bytes(b"# Latin-1, not UTF-8\nPOST_TEMPLATE=\xa3{value}\n")  # was a traceback, exit 1
    assert config_error(run_cli(command, cwd=tmp_path)) == ".env: not UTF-8 text (line 2); save it as UTF-8"


ALL_COMMANDS = [("check",), ("status",), ("run",), ("--dry-run",)]
LONG_NAME = "a" * 300  # ENAMETOOLONG, for root too


@pytest.mark.parametrize("command", ALL_COMMANDS)
@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero", "/dev/urandom"])
def test_a_default_env_file_that_is_not_a_regular_file_is_one_config_error(
    tmp_path: Path, command: tuple[str, ...], kind: str
) -> None:
    # Was ignored by run and status, and made `check` hang (a FIFO) or run out of memory (/dev/zero): it read the
    # file a second time, unbounded. Opened without blocking now, judged by fstat, read once.
    env = tmp_path / ".env"
    if kind == "fifo":
        os.mkfifo(env)
    elif kind == "directory":
        env.mkdir()
    else:
        env.symlink_to(kind)
    assert config_error(run_cli(*command, cwd=tmp_path)) == ".env: not a regular file"


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_an_env_file_that_cannot_be_opened_is_one_config_error(tmp_path: Path, command: tuple[str, ...]) -> None:
    # Path.is_file() raised on ENAMETOOLONG (a traceback, exit 1) and said only "not a readable file" on the rest.
    line = config_error(run_cli(*command, "--env-file", LONG_NAME, cwd=tmp_path))
    assert line == f"{LONG_NAME}: cannot be read (File name too long)"
    fifo = tmp_path / "named.env"
    os.mkfifo(fifo)
    assert config_error(run_cli(*command, "--env-file", str(fifo), cwd=tmp_path)) == f"{fifo}: not a regular file"
    missing = tmp_path / "missing.env"  # named on the command line: missing is an error, unlike the default
    line = config_error(run_cli(*command, "--env-file", str(missing), cwd=tmp_path))
    assert line == f"{missing}: cannot be read (No such file or directory)"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_a_default_env_file_in_a_folder_the_user_cannot_read_is_one_config_error(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    # Any command run from such a folder (root's home, as another user) was a PermissionError traceback, exit 1.
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if run_cli("--version", cwd=tmp_path, prefix=nobody).returncode != 0:
        pytest.skip("the user nobody cannot run this checkout's Python")
    line = config_error(run_cli(*command, cwd=folder, prefix=nobody))
    assert line == ".env: cannot be read (Permission denied)"
    (folder / "valshi-x.env").write_text("A=1\n")
    line = config_error(run_cli(*command, "--env-file", str(folder / "valshi-x.env"), cwd=tmp_path, prefix=nobody))
    assert line == f"{folder / 'valshi-x.env'}: cannot be read (Permission denied)"


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_an_env_file_with_a_nul_byte_or_a_byte_order_mark_is_one_config_error(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    env = tmp_path / ".env"
    # systemd refuses a file with a NUL byte; python-dotenv kept it in the value. The line, never the byte's value.
    env.write_bytes(b"A=1\r\nX_API_SECRET=sec\0ret\r\n")
    done = run_cli(*command, cwd=tmp_path)
    assert config_error(done) == ".env: a NUL byte on line 2; an env file holds text"
    assert "sec" not in done.stderr
    # python-dotenv skips a byte-order mark; systemd keeps it in the first key, which the service would lose.
    env.write_bytes("\ufeffWHALE_THRESHOLD_DOLLARS=5000\n".encode())
    assert config_error(run_cli(*command, cwd=tmp_path)) == (
        ".env: a byte-order mark on line 1, read by systemd as part of the key; save without it"
    )


@pytest.mark.parametrize("replay", [LONG_NAME, "fifo", "directory"])
def test_a_replay_path_that_is_not_a_regular_file_is_one_config_error(tmp_path: Path, replay: str) -> None:
    if replay == "fifo":
        os.mkfifo(tmp_path / replay)
    elif replay == "directory":
        (tmp_path / replay).mkdir()
    line = config_error(run_cli("--replay", replay, cwd=tmp_path))
    if replay == LONG_NAME:  # was a traceback, exit 1
        assert line == f"--replay: cannot read {LONG_NAME}: File name too long"
    else:
        assert line == f"--replay: {replay} is not a regular file"


# --- a dry run says "would post" ------------------------------------------------------------------------------


def test_status_of_a_dry_run_lists_would_post_never_posted(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    replay = run_cli("--replay", str(SAMPLE), "--state-dir", str(state_dir), cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    stopped = json_events(replay)[-1]
    assert (stopped["event"], stopped["would_have_posted"]) == ("daemon_stopped", 10)
    assert "posted" not in stopped

    status = run_cli("status", "--state-dir", str(state_dir), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[1].startswith("dry run: nothing here was sent to X")
    assert lines[2] == "outbox: pending=0, posting=0, would_post=10, failed=0, skipped=0"
    assert lines[3] == "requests to X: none (dry run)"
    rows = lines[lines.index("last would-post alerts (dry run):") + 1 : lines.index("last errors: none")]
    assert len(rows) == 10
    assert all(row.split()[1:3] == ["would", "post"] and "tweet=" not in row for row in rows)
    assert " posted" not in status.stdout

    again = run_cli("--replay", str(SAMPLE), "--state-dir", str(state_dir), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    opened = next(e for e in json_events(again) if e["event"] == "state_opened")  # the dry run's outbox, reopened
    assert opened["would_have_posted"] == 10 and "posted" not in opened


def test_the_stats_key_follows_the_posters_mode() -> None:
    assert PosterStats(posted=3).posted_field() == {"posted": 3}
    assert PosterStats(posted=3, dry_run=True).posted_field() == {"would_have_posted": 3}
