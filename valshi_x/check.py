"""The `check` and `status` commands: what an operator runs before `systemctl start` and while it runs.

`check` proves each thing the daemon needs, one line each, without posting: the settings and the key, a signed
Kalshi handshake plus a subscription, Kalshi REST, and the X credentials (a read of the account, not a post).
`status` reads the state directory without disturbing a running daemon.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import msgspec
from aiohttp.client_middlewares import ClientMiddlewareType
from tweepy.asynchronous import AsyncClient
from tweepy.errors import HTTPException as TweepyHTTPException
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from valshi_x.config import Settings
from valshi_x.kalshi.auth import KalshiSigner
from valshi_x.kalshi.rest import KalshiRest, KalshiRestError
from valshi_x.kalshi.stream import public_url
from valshi_x.store import read_status

_TIMEOUT_S = 10.0


class CheckReport:
    """Collects PASS / FAIL / SKIP lines and prints each as it is decided."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = 0

    def line(self, verdict: str, item: str, detail: str) -> None:
        if verdict == "FAIL":
            self.failed += 1
        print(f"{verdict:4}  {item}: {detail}", file=self.out, flush=True)


async def run_checks(
    settings: Settings,
    signer: KalshiSigner | None,
    *,
    x_middlewares: Sequence[ClientMiddlewareType] = (),
    out: TextIO = sys.stdout,
) -> int:
    """Run every check; 0 when none failed, 1 otherwise."""
    report = CheckReport(out)
    report.line(
        "PASS", "settings", f"threshold ${settings.whale_threshold_dollars}, window {settings.sweep_window_ms} ms"
    )
    if signer is None:
        report.line("SKIP", "kalshi key", "KALSHI_API_KEY_ID not set: the connection will be unsigned (best effort)")
    else:
        report.line("PASS", "kalshi key", f"{signer.key_type} key loaded for key id {signer.key_id}")
    await _check_kalshi_ws(settings, signer, report)
    await _check_kalshi_rest(settings, report)
    await _check_x(settings, report, x_middlewares)
    print(f"{'all checks passed' if not report.failed else f'{report.failed} check(s) failed'}", file=out, flush=True)
    return 0 if not report.failed else 1


async def _check_kalshi_ws(settings: Settings, signer: KalshiSigner | None, report: CheckReport) -> None:
    url = settings.kalshi_ws_url
    path = url.split("://", 1)[-1].partition("/")[2]
    headers = signer.headers("GET", "/" + path) if signer is not None else {}
    item = f"kalshi websocket {public_url(url)}"
    try:
        async with asyncio.timeout(_TIMEOUT_S), connect(url, additional_headers=headers) as ws:
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
                    report.line("FAIL", item, f"error {msg.get('code')}: {msg.get('msg')}")
                    return
    except InvalidStatus as exc:
        status = exc.response.status_code
        hint = " (check KALSHI_API_KEY_ID and the key)" if status in (401, 403) else ""
        report.line("FAIL", item, f"handshake rejected with HTTP {status}{hint}")
    except TimeoutError:
        report.line("FAIL", item, f"no subscription within {_TIMEOUT_S:.0f} s")
    except (OSError, WebSocketException, msgspec.DecodeError) as exc:
        report.line("FAIL", item, f"{type(exc).__name__}: {exc}")


async def _check_kalshi_rest(settings: Settings, report: CheckReport) -> None:
    item = f"kalshi rest {settings.kalshi_api_url}"
    async with aiohttp.ClientSession() as http:
        rest = KalshiRest(http, settings.kalshi_api_url)
        try:
            async with asyncio.timeout(_TIMEOUT_S):
                data = await rest.get_json("/markets/trades", {"limit": "1"})
        except (KalshiRestError, TimeoutError) as exc:
            report.line("FAIL", item, str(exc) or "timed out")
            return
    trades = data.get("trades") or []
    report.line("PASS", item, f"trades endpoint answered ({len(trades)} trade)")


async def _check_x(settings: Settings, report: CheckReport, middlewares: Sequence[ClientMiddlewareType]) -> None:
    keys = (settings.x_api_key, settings.x_api_secret, settings.x_access_token, settings.x_access_token_secret)
    if not all(keys):
        report.line("SKIP", "x credentials", "the four X keys are not all set (fine for --dry-run)")
        return
    timeout = aiohttp.ClientTimeout(total=settings.x_timeout_s)
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
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: a body that is not JSON
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


def show_status(state_dir: Path, out: TextIO = sys.stdout) -> int:
    """Print the outbox counts, last posts, last errors and checkpoints of `state_dir`."""
    for line in read_status(state_dir).lines():
        print(line, file=out)
    return 0
