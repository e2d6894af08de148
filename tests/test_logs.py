"""Log output as users read it: journald lines with priorities, JSON lines, console lines, and no secret anywhere."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from valshi_x.config import SETTINGS, load_settings
from valshi_x.logs import LOG_FORMATS, LogFormat, configure_logging, default_format, journal_stream_matches


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test configures logging for itself; leave the process as it was for the other test files."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_libs = {name: logging.getLogger(name).level for name in ("websockets", "aiohttp")}
    saved_structlog = structlog.get_config()
    yield
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_libs.items():
        logging.getLogger(name).setLevel(level)
    structlog.configure(**saved_structlog)


def configured(fmt: LogFormat, secrets: tuple[str, ...] = (), level: int = logging.INFO) -> io.StringIO:
    out = io.StringIO()
    configure_logging(fmt, secrets, level, stream=out)
    return out


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


# --- journal format -----------------------------------------------------------------------------------------


def test_journal_lines_carry_the_syslog_priority_then_the_event_then_fields() -> None:
    out = configured("journal", level=logging.DEBUG)
    log = structlog.get_logger("valshi_x.kalshi.stream")
    log.debug("frame_batch", frames=3)
    log.info("ws_connected", url="wss://example.test/ws", attempt=1)
    log.warning("post_retry", error="429 Too Many Requests", retry_in_s=60.0)
    log.error("post_failed", alert_id="a1")
    log.critical("outbox_unwritable", path="/var/lib/valshi-x/state.db")
    assert lines(out) == [
        "<7>frame_batch frames=3",
        "<6>ws_connected url=wss://example.test/ws attempt=1",
        '<4>post_retry error="429 Too Many Requests" retry_in_s=60.0',
        "<3>post_failed alert_id=a1",
        "<3>outbox_unwritable path=/var/lib/valshi-x/state.db",
    ]


def test_journal_values_are_quoted_only_when_needed_and_stay_on_one_line() -> None:
    out = configured("journal")
    structlog.get_logger("valshi_x.x.poster").info(
        "posted",
        ticker="KXNFLGAME-26NOV01KCBUF-KC",
        value_usd=Decimal("150000.50"),
        text='Whale: $150,000 on "KC"\nsecond line',
        empty="",
        dry_run=False,
        tweet_id=None,
        trade_ids=["t1", "t2"],
    )
    (line,) = lines(out)
    assert line == (
        "<6>posted ticker=KXNFLGAME-26NOV01KCBUF-KC value_usd=150000.50"
        ' text="Whale: $150,000 on \\"KC\\"\\nsecond line" empty="" dry_run=false tweet_id=null'
        ' trade_ids="[\\"t1\\",\\"t2\\"]"'
    )


def test_journal_lines_have_no_timestamp_and_no_level_field() -> None:
    out = configured("journal")
    structlog.get_logger("valshi_x").info("stats", trades=10)
    (line,) = lines(out)
    assert line == "<6>stats trades=10"


def test_journal_traceback_follows_on_lines_with_the_same_priority() -> None:
    out = configured("journal")
    log = structlog.get_logger("valshi_x.daemon")
    try:
        raise RuntimeError("socket closed twice")
    except RuntimeError:
        log.exception("daemon_crashed", stage="reader")
    got = lines(out)
    assert got[0] == "<3>daemon_crashed stage=reader"
    assert got[1] == "<3>  Traceback (most recent call last):"
    assert got[-1] == "<3>  RuntimeError: socket closed twice"
    # Every line keeps the priority, so `journalctl -p err` shows the whole traceback.
    assert all(line.startswith("<3>  ") for line in got[1:])


def test_stdlib_loggers_share_the_journal_format_and_say_where_they_come_from() -> None:
    out = configured("journal")
    logging.getLogger("websockets.client").warning("connection closed: %s", "1006 (abnormal closure)")
    logging.getLogger("aiohttp.client").error("unclosed session")
    # The libraries' info and debug lines would be per frame: they are held back.
    logging.getLogger("websockets.client").info('< TEXT \'{"type":"trade"}\'')
    logging.getLogger("aiohttp.access").info("GET /")
    assert lines(out) == [
        "<4>connection closed: 1006 (abnormal closure) logger=websockets.client",
        "<3>unclosed session logger=aiohttp.client",
    ]


def test_stdlib_exception_in_journal_format() -> None:
    out = configured("journal")
    try:
        {}["missing"]
    except KeyError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    got = lines(out)
    assert got[0] == "<3>Task exception was never retrieved logger=asyncio"
    assert got[-1] == "<3>  KeyError: 'missing'"


# --- json and console -----------------------------------------------------------------------------------------


def test_json_lines_are_valid_json_with_fixed_keys_first() -> None:
    out = configured("json")
    structlog.get_logger("valshi_x.whales").info("whale_detected", value_usd=Decimal("250000.00"), fills=3)
    logging.getLogger("websockets.client").warning("keepalive ping timeout")
    try:
        raise ValueError("bad frame")
    except ValueError:
        structlog.get_logger("valshi_x.daemon").exception("daemon_crashed")
    records = [json.loads(line) for line in lines(out)]
    assert [list(r)[:4] for r in records] == [["timestamp", "level", "event", "logger"]] * 3
    assert records[0]["value_usd"] == "250000.00"
    assert records[0]["fills"] == 3
    assert records[0]["timestamp"].endswith("Z")
    assert (records[1]["level"], records[1]["logger"]) == ("warning", "websockets.client")
    assert records[2]["level"] == "error"
    assert records[2]["exception"].splitlines()[-1] == "ValueError: bad frame"


def test_console_lines_hold_event_level_and_fields() -> None:
    out = configured("console")
    structlog.get_logger("valshi_x").warning("ws_reconnecting", delay_s=2.5)
    (line,) = lines(out)
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARN  ws_reconnecting delay_s=2\.5", line)


_WHALE_TEXT = (
    "🐋 $196,601 on NO\n"
    "Chicago at Jacksonville Winner? — Chicago\n"
    "Bought NO at 46.4¢ · market says 53.6% YES\n"
    "423,926.72 contracts · 7 fills\n"
    "Pays $423,927 if NO wins · 17:05:01 UTC"
)
_WHALE_FIELDS: dict[str, object] = {
    "alert_id": "7e91a7fe-d327-4829-a921-52705ca15b7e",
    "trade_ids": [f"7e91a7fe-0000-4000-8000-00000000000{n}" for n in range(7)],
    "ticker": "KXNFLGAME-26SEP13CHIJAC-CHI",
    "side": "no",
    "contracts": "423926.72",
    "value_usd": "196600.62",
    "fills": 7,
    "price_low": "0.4500",
    "price_high": "0.4900",
    "is_block_trade": False,
    "created_time": "2026-09-13T17:05:01.606000Z",
}


def test_console_shows_a_whale_as_its_post_under_a_header_with_value_and_ticker() -> None:
    out = configured("console")
    structlog.get_logger("valshi_x.x.poster").info("would_post", **_WHALE_FIELDS, text=_WHALE_TEXT)
    header, *body = lines(out)
    assert header[8:] == " info  would_post      $196,600.62 NO KXNFLGAME-26SEP13CHIJAC-CHI · 7 fills"
    assert body == ["    " + line for line in _WHALE_TEXT.splitlines()]


def test_console_posted_whale_keeps_the_tweet_id_and_a_block_trade_says_so() -> None:
    out = configured("console")
    fields = {**_WHALE_FIELDS, "fills": 1, "is_block_trade": True, "side": "yes"}
    structlog.get_logger("valshi_x.x.poster").info("posted", **fields, text="🐋 post", tweet_id="1234", attempts=1)
    header, body = lines(out)
    assert header.endswith(
        " posted          $196,600.62 YES KXNFLGAME-26SEP13CHIJAC-CHI · block trade tweet_id=1234 attempts=1"
    )
    assert body == "    🐋 post"


def test_console_malformed_frame_is_one_short_line_with_the_reason_and_the_bad_part() -> None:
    out = configured("console")
    frame = (
        '{"type":"trade","sid":1,"seq":533,"msg":{"trade_id":"e189eedc-55f7-4f2b-9780-134688e56019",'
        '"market_ticker":"KXBTCD-26SEP1315-T118249.99","yes_price_dollars":"abc","no_price_dollars":"0.5000",'
        '"count_fp":"300000.00","taker_side":"yes","ts":1789319104,"ts_ms":1789319104123}'
    )
    log = structlog.get_logger("valshi_x.pipeline")
    log.warning("malformed_frame", reason="bad_number", detail="yes_price_dollars='abc'", frame=frame)
    log.warning("malformed_frame", reason="not_json", detail="", frame="trade\x1b[2J KX\u202e yes\n")
    first, second = lines(out)
    head, _, excerpt = first.partition(" │ ")
    assert head[8:] == " WARN  malformed_frame bad_number yes_price_dollars='abc'"
    # At most 80 characters of the frame, around the field the detail names, never a 300-character dump.
    assert len(excerpt) <= 80
    assert '"yes_price_dollars":"abc"' in excerpt
    assert excerpt.startswith("…") and excerpt.endswith("…")
    # A control character or a bidi override in a frame is shown escaped: it cannot act on the operator's screen.
    assert second.endswith("malformed_frame not_json │ trade\\x1b[2J KX\\u202e yes")
    assert "\x1b" not in out.getvalue() and "\u202e" not in out.getvalue()


def test_console_malformed_frame_given_as_fields_or_already_escaped() -> None:
    out = configured("console")
    log = structlog.get_logger("valshi_x.pipeline")
    # A trade refused after decoding is logged with a few of its fields, not the raw frame.
    log.warning("malformed_frame", reason="future_time", detail="", frame={"trade_id": "t1", "ts_ms": 1})
    # A sanitizing processor before the renderer may already have escaped the capture line's newline.
    log.warning("malformed_frame", reason="not_json", detail="", frame="trade KX yes\\x0a")
    first, second = lines(out)
    assert first.endswith('malformed_frame future_time │ {"trade_id":"t1","ts_ms":1}')
    assert second.endswith("malformed_frame not_json │ trade KX yes")


def test_console_keeps_other_lines_short() -> None:
    out = configured("console")
    log = structlog.get_logger("valshi_x")
    log.info("backfill_done", trade_ids=[str(n) for n in range(40)], note="x" * 300, missing=None)
    log.info("daemon_stopped", frames=4000, trades=3980, malformed=19, gaps=0, frames_dropped=0, would_have_posted=10)
    first, second = lines(out)
    assert first[8:] == " info  backfill_done   trade_ids=[40 items] note=" + "x" * 59 + "…"
    assert second[8:] == " info  daemon_stopped  frames=4000 trades=3980 malformed=19 would_have_posted=10"


def test_machine_formats_keep_every_field_of_a_whale() -> None:
    out = configured("json")
    structlog.get_logger("valshi_x.x.poster").info("would_post", **_WHALE_FIELDS, text=_WHALE_TEXT)
    record = json.loads(out.getvalue())
    assert {key: record[key] for key in _WHALE_FIELDS} == _WHALE_FIELDS
    assert record["text"] == _WHALE_TEXT


def test_reconfiguring_changes_loggers_already_in_use() -> None:
    log = structlog.get_logger("valshi_x.reused")
    first = configured("json")
    log.info("one")
    second = configured("journal")
    log.info("two")
    assert json.loads(first.getvalue())["event"] == "one"
    assert lines(second) == ["<6>two"]


# --- choosing the format --------------------------------------------------------------------------------------


def test_journal_is_the_default_only_when_stdout_is_the_announced_journal_stream(tmp_path: Path) -> None:
    with (tmp_path / "stdout").open("w") as stream, (tmp_path / "other").open("w") as other:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_stream_matches(env, stream)
        assert default_format(env, stream) == "journal"
        # Inherited variable but stdout redirected elsewhere: not the journal.
        assert not journal_stream_matches(env, other)
        assert default_format(env, other) == "json"
        assert default_format({}, stream) == "json"
        for bad in ("", "12", "a:b", f"{st.st_dev}:", f":{st.st_ino}"):
            assert default_format({"JOURNAL_STREAM": bad}, stream) == "json"
    assert not journal_stream_matches(env, io.StringIO())


def test_configure_without_a_format_picks_journal_under_systemd_and_flushes_each_line(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    # A buffered text file like systemd's stdout socket: each line must be written out at once.
    with path.open("w", buffering=64 * 1024) as stream:
        st = os.fstat(stream.fileno())
        configure_logging(None, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream=stream)
        structlog.get_logger("valshi_x").info("started", version="0.1.0")
        assert path.read_text() == "<6>started version=0.1.0\n"
        print("check: ok", file=stream)
        assert path.read_text().endswith("check: ok\n")


# --- secrets --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def all_secrets(pem: str) -> tuple[str, ...]:
    """Every secret setting set (the inline PEM among them) plus a PEM read from a key file."""
    secret_keys = [spec.key for spec in SETTINGS if spec.secret]
    env = {key: f"{key.lower()}-Zq81xVb7mK2pWn4s" for key in secret_keys}
    env["KALSHI_API_KEY_ID"] = "11111111-2222-3333-4444-555555555555"
    env["KALSHI_PRIVATE_KEY"] = pem
    settings = load_settings(env, need_x=True)
    assert len(settings.secrets) == len(secret_keys)
    file_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return (*settings.secrets, file_pem.decode())


def _secret_fragments(secrets: tuple[str, ...]) -> list[str]:
    """What must never be seen: each secret whole and, for a PEM, each body line alone."""
    fragments = list(secrets)
    for secret in secrets:
        fragments.extend(line for line in secret.splitlines() if line and not line.startswith("-----"))
    return fragments


class Leaky:
    """An object whose str() shows a secret, like an exception or a request object might."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __str__(self) -> str:
        return f"Leaky(token={self.secret})"


def _log_every_way(secret: str) -> None:
    log = structlog.get_logger("valshi_x.secrets")
    log.info("field", token=secret)
    log.info("nested", request={"headers": {"Authorization": f"OAuth {secret}"}}, args=[secret, (secret,)])
    log.info("object", thing=Leaky(secret))
    log.info(f"event text {secret}")
    log.info("repr", value=repr(secret))
    log.warning("one_pem_line", line=secret.splitlines()[min(1, len(secret.splitlines()) - 1)])
    log.info("stack", stack_info=True, note=secret)
    try:
        raise PermissionError(f"401 for key {secret}")
    except PermissionError:
        log.exception("structlog_traceback")
        logging.getLogger("aiohttp.client").exception("stdlib traceback %s", secret)
    logging.getLogger("websockets.client").warning("stdlib message %s", secret)
    logging.getLogger("websockets.client").error("stdlib %(k)s", {"k": secret})


@pytest.mark.parametrize("fmt", LOG_FORMATS)
def test_no_secret_appears_in_any_format(fmt: LogFormat, all_secrets: tuple[str, ...]) -> None:
    out = configured(fmt, all_secrets)
    for secret in all_secrets:
        _log_every_way(secret)
    text = out.getvalue()
    assert text.count("[redacted]") >= 10 * len(all_secrets)
    for fragment in _secret_fragments(all_secrets):
        assert fragment not in text
        # JSON escapes newlines and quotes; the fragments (no newline in a PEM line) would still show as-is.
        assert json.dumps(fragment)[1:-1] not in text


def test_without_the_redactor_the_same_lines_would_leak(all_secrets: tuple[str, ...]) -> None:
    """The secrets test is only worth something if the lines really carry the secrets."""
    token = next(secret for secret in all_secrets if "\n" not in secret)
    out = configured("journal", ())
    _log_every_way(token)
    _log_every_way(all_secrets[-1])
    text = out.getvalue()
    assert text.count(token) >= 10
    assert all_secrets[-1].splitlines()[1] in text


def test_short_values_are_not_treated_as_secrets() -> None:
    out = configured("journal", ("abc", ""))
    structlog.get_logger("valshi_x").info("stats", note="abcdef")
    assert lines(out) == ["<6>stats note=abcdef"]
