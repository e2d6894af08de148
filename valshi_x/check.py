"""The `check` and `status` commands: what an operator runs before `systemctl start` and while it runs.

`check` proves each thing the daemon needs, one line each, without posting: the settings and the key, a signed
Kalshi handshake plus a subscription, Kalshi REST, and the X credentials (a read of the account, not a post).
Each probe is one attempt with one deadline, so no retry log line can interleave with the verdicts, and a failure
names its cause: DNS, connection refused, timeout, TLS, or the HTTP status.
`status` reads the state directory without disturbing a running daemon.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import msgspec
from aiohttp.client_middlewares import ClientMiddlewareType
from tweepy.asynchronous import AsyncClient
from tweepy.errors import HTTPException as TweepyHTTPException
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from valshi_x.config import Settings, env_file_differences, readable_by_others
from valshi_x.errors import ConfigError, StateUnavailable
from valshi_x.kalshi.auth import KalshiSigner
from valshi_x.kalshi.stream import public_url
from valshi_x.store import read_status

TIMEOUT_S = 10.0
_AUTH_HINT = {401: " (check KALSHI_API_KEY_ID and the key)", 403: " (check KALSHI_API_KEY_ID and the key)"}


class CheckReport:
    """Collects PASS / FAIL / WARN lines and prints each as it is decided."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = 0

    def line(self, verdict: str, item: str, detail: str) -> None:
        if verdict == "FAIL":
            self.failed += 1
        print(f"{verdict:4}  {item}: {detail}", file=self.out, flush=True)


def describe_failure(exc: BaseException, url: str, timeout_s: float) -> str:
    """What went wrong reaching `url`, as an operator can act on it: DNS, refused, timeout, TLS, HTTP status."""
    host = urlsplit(url).hostname or url
    cause = _root_cause(exc)
    if isinstance(cause, InvalidStatus):
        status = cause.response.status_code
        return f"HTTP {status}{_AUTH_HINT.get(status, '')}"
    if isinstance(cause, TimeoutError):
        return f"timeout: no answer within {timeout_s:g} s"
    if isinstance(cause, socket.gaierror):
        return f"DNS: cannot resolve {host} ({cause.strerror or cause})"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS: certificate of {host} not accepted ({cause.verify_message or cause.reason})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: handshake with {host} failed ({cause.reason or cause})"
    if isinstance(cause, ConnectionRefusedError) or (
        isinstance(cause, OSError) and (cause.errno == errno.ECONNREFUSED or "[Errno 111]" in str(cause))
    ):
        # "[Errno 111]": asyncio folds one failure per address of a name into one OSError without an errno.
        return f"connection refused by {urlsplit(url).netloc} (nothing listening there?)"
    return f"{type(cause).__name__}: {cause}"


def _root_cause(exc: BaseException) -> BaseException:
    """The OS or TLS error under a client library's wrapper (aiohttp keeps it in os_error / certificate_error)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return exc.certificate_error
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return TimeoutError()
    return exc


async def run_checks(
    settings: Settings,
    signer: KalshiSigner | None,
    *,
    x_middlewares: Sequence[ClientMiddlewareType] = (),
    out: TextIO = sys.stdout,
    secret_files: Sequence[Path | None] = (),
    unknown_keys: Sequence[tuple[str, str]] = (),
    env_file: Path | None = None,
    env_text: str = "",
    timeout_s: float = TIMEOUT_S,
) -> int:
    """Run every check; 0 when none failed, 1 otherwise.

    `secret_files`: the key and env files, for their modes; `unknown_keys`: (key, closest setting) pairs from
    `config.unknown_settings`, each a WARN, since a misspelled setting silently keeps its default; `env_file` and
    `env_text`: the file read for the settings and its text as read then (never reopened: it may have become a FIFO),
    whose lines systemd would read otherwise than python-dotenv are each a WARN.
    """
    report = CheckReport(out)
    for key, closest in unknown_keys:
        report.line("WARN", "unknown setting", f"{key} is not a setting and is ignored (did you mean {closest}?)")
    for line_no, key, why in env_file_differences(env_text) if env_file is not None else ():
        report.line("WARN", "env file", f"{env_file} line {line_no}, {key}: {why}")
    for path, mode in readable_by_others(secret_files):
        report.line("WARN", "file permissions", f"{path} is mode {mode:04o}, readable by others: chmod 600 {path}")
    report.line(
        "PASS", "settings", f"threshold ${settings.whale_threshold_dollars}, window {settings.sweep_window_ms} ms"
    )
    if signer is None:
        report.line("WARN", "kalshi key", "KALSHI_API_KEY_ID not set: the connection will be unsigned (best effort)")
    else:
        report.line("PASS", "kalshi key", f"{signer.key_type} key loaded for key id {signer.key_id}")
    await _check_kalshi_ws(settings, signer, report, timeout_s)
    await _check_kalshi_rest(settings, report, timeout_s)
    await _check_x(settings, report, x_middlewares, timeout_s)
    print(f"{'all checks passed' if not report.failed else f'{report.failed} check(s) failed'}", file=out, flush=True)
    return 0 if not report.failed else 1


async def _check_kalshi_ws(
    settings: Settings, signer: KalshiSigner | None, report: CheckReport, timeout_s: float
) -> None:
    url = settings.kalshi_ws_url
    path = url.split("://", 1)[-1].partition("/")[2]
    headers = signer.headers("GET", "/" + path) if signer is not None else {}
    item = f"kalshi websocket {public_url(url)}"
    try:
        async with asyncio.timeout(timeout_s), connect(url, additional_headers=headers) as ws:
            await ws.send(
                msgspec.json.encode({"id": 1, "cmd": "subscribe", "params": {"channels": ["trade"]}}).decode()
            )
            while True:
                frame = msgspec.json.decode(await ws.recv())
                if frame.get("type") == "subscribed":
                    sid = (frame.get("msg") or {}).get("sid")
                    report.line("PASS", item, f"handshake {'signed' if signer else 'unsigned'}, subscribed (sid {sid})")
                    return
                if frame.get("type") == "error":
                    msg = frame.get("msg") or {}
                    report.line("FAIL", item, f"subscription refused: error {msg.get('code')}: {msg.get('msg')}")
                    return
    except InvalidStatus as exc:
        report.line("FAIL", item, "handshake rejected with " + describe_failure(exc, url, timeout_s))
    except (TimeoutError, OSError, WebSocketException, msgspec.DecodeError) as exc:
        report.line("FAIL", item, describe_failure(exc, url, timeout_s))


async def _check_kalshi_rest(settings: Settings, report: CheckReport, timeout_s: float) -> None:
    # One plain GET, not KalshiRest: its retries would log warnings between the verdicts and hide the cause.
    url = f"{settings.kalshi_api_url}/markets/trades"
    item = f"kalshi rest {settings.kalshi_api_url}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
            http.get(url, params={"limit": "1"}, allow_redirects=False) as response,
        ):
            status = response.status
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.line("FAIL", item, describe_failure(exc, url, timeout_s))
        return
    if status != 200:
        report.line("FAIL", item, f"HTTP {status} from {urlsplit(url).path}")
        return
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        report.line("FAIL", item, "HTTP 200 but the body is not JSON (is KALSHI_API_URL right?)")
        return
    trades = data.get("trades") if isinstance(data, dict) else None
    if not isinstance(trades, list):
        report.line("FAIL", item, "HTTP 200 but no trades list in the answer (is KALSHI_API_URL right?)")
        return
    report.line("PASS", item, f"trades endpoint answered ({len(trades)} trade{'' if len(trades) == 1 else 's'})")


async def _check_x(
    settings: Settings, report: CheckReport, middlewares: Sequence[ClientMiddlewareType], timeout_s: float
) -> None:
    keys = (settings.x_api_key, settings.x_api_secret, settings.x_access_token, settings.x_access_token_secret)
    if not all(keys):
        report.line("WARN", "x credentials", "the four X keys are not all set: fine for --dry-run only")
        return
    timeout = aiohttp.ClientTimeout(total=min(settings.x_timeout_s, timeout_s))
    async with aiohttp.ClientSession(timeout=timeout, middlewares=tuple(middlewares)) as http:
        # By name: AsyncClient's first positional parameter is the bearer token, not the consumer key.
        client = AsyncClient(
            consumer_key=settings.x_api_key,
            consumer_secret=settings.x_api_secret,
            access_token=settings.x_access_token,
            access_token_secret=settings.x_access_token_secret,
            # A dict: tweepy parses the body it read itself. A ClientResponse it returns is already released,
            # and aiohttp refuses to read a released response again ("Connection closed").
            return_type=dict,
            wait_on_rate_limit=False,
        )
        client.session = http
        try:
            body: Any = await client.get_me(user_auth=True)
        except (aiohttp.ClientError, TimeoutError) as exc:
            report.line("FAIL", "x credentials", describe_failure(exc, "https://api.twitter.com/2/users/me", timeout_s))
            return
        except ValueError as exc:  # a body that is not JSON
            report.line("FAIL", "x credentials", f"{type(exc).__name__}: {exc}")
            return
        except TweepyHTTPException as exc:
            status = getattr(exc.response, "status", None)
            hint = {401: " (keys or tokens wrong)", 403: " (app lacks Read and write, or tokens predate it)"}
            report.line("FAIL", "x credentials", f"HTTP {status}{hint.get(status or 0, '')}: {exc}")
            return
    data = body.get("data") if isinstance(body, dict) else None
    username = data.get("username", "?") if isinstance(data, dict) else "?"
    report.line("PASS", "x credentials", f"signed in as @{username} (nothing posted)")


def show_status(state_dir: Path, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print the outbox counts, last posts, last errors and checkpoints of `state_dir`.

    A database that cannot be read gets one line on `err` instead: exit 78 when it is corrupt or a setting is
    wrong, 1 when the trouble may pass (locked, I/O error).
    """
    try:
        report = read_status(state_dir)
    except ConfigError as exc:
        print(f"valshi-x: status: {exc}", file=err, flush=True)
        return 78
    except StateUnavailable as exc:
        print(f"valshi-x: status: cannot read the state now: {exc}", file=err, flush=True)
        return 1
    for line in report.lines():
        print(line, file=out)
    return 0
