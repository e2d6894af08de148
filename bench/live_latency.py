"""Live path over loopback: alert latency at a fixed rate, then the highest rate the daemon sustains.

Starts a minimal Kalshi look-alike on 127.0.0.1 (a WebSocket server that acks `subscribe` and streams generated
trade frames, and a REST stub so nothing can reach the internet), runs `python -m valshi_x --dry-run` against it
as a subprocess (unsigned: no key in its environment), and reads the daemon's JSON log lines from its stdout.
Titles are on, as in any live run: the stub answers the daemon's market and event look-ups the way `--titles`
says (default "realistic": 30-120 ms each, 5 % answered 503; "harsh" adds 5 % answered only after 2 s).

1. Latency: frames at `--rate` (default 2,000/s, steady) for `--seconds`, with whales planted (single fills and
   sweeps). For each whale: the time its last fill was handed to the socket -> the time its `would_post` line
   was read. Reports p50/p99/max; target p99 <= sweep window + 250 ms.
2. Ramp: `--ramp` rates for `--step-seconds` each. A rate is sustained when the daemon drops nothing, its queue
   stays short, it has processed everything within a second of the last frame, every whale's alert is within
   the latency target, and the sender kept its schedule. The ramp stops at the first rate that fails. CPU
   shares of the daemon and of the bench's sender show which side was the limit.

    .venv/bin/python bench/live_latency.py
    .venv/bin/python bench/live_latency.py --ramp 2000,10000,20000,40000 --no-compression

Needs from the daemon: `STATS_INTERVAL_S` accepting fractions (the bench sets 0.5), a `stats` line with
`frames`, `queue_depth` and `frames_dropped`, and `would_post` lines carrying `alert_id` and `trade_ids`.
Bounded: every wait has a timeout, the whole run has `--max-seconds`, the daemon is stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
sys.path[:0] = [str(BENCH)]

# Imported after the path is set: a sibling script.
import gen_capture  # noqa: E402
from websockets.asyncio.server import ServerConnection, serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.protocol import State  # noqa: E402

WS_PATH = "/trade-api/ws/v2"
LATENCY_SLACK_MS = 250
# "Keeps up": the queue never holds more than this many seconds of frames, and the daemon has counted every
# frame within this long after the last one was sent.
MAX_QUEUE_SECONDS = 0.25
MAX_CATCH_UP_S = 1.0
MAX_SENDER_LAG_S = 0.1


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None where that is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def typed_decode_floor_us(lines: list[str], repo: Path, rounds: int = 3) -> float:
    """CPU µs per frame to decode these frames into the daemon's typed frame with msgspec, nothing else: the
    floor the daemon's cost per frame is measured against (best of `rounds`, in this process, under today's load)."""
    sys.path.insert(0, str(repo))
    try:
        import msgspec  # noqa: PLC0415

        from valshi_x.trades import TradeFrame  # noqa: PLC0415
    finally:
        sys.path.remove(str(repo))
    decode = msgspec.json.Decoder(TradeFrame).decode
    encoded = [line.encode() for line in lines]
    best = math.inf
    for _ in range(rounds):
        started = time.process_time()
        for line in encoded:
            try:  # noqa: SIM105  (a context manager per frame would be part of the measured floor)
                decode(line)
            except msgspec.DecodeError:
                pass
        best = min(best, time.process_time() - started)
    return best / max(1, len(encoded)) * 1e6


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with few samples p99 is the worst one, never an interpolated guess."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -------------------------------------------------------------------------------------------- fake Kalshi


class FakeKalshi:
    """One subscriber at a time: acks its `subscribe` with sid 1, then the bench pushes frames to it."""

    def __init__(self, ping_interval_s: float, compression: str | None) -> None:
        self.ping_interval_s = ping_interval_s
        self.compression = compression
        self.connection: ServerConnection | None = None
        self.subscribed = asyncio.Event()
        self.connections = 0
        self.port = 0
        self._server: Any = None

    async def __aenter__(self) -> FakeKalshi:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            ping_interval=self.ping_interval_s,
            compression=self.compression,
            max_size=2**20,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{WS_PATH}"

    async def _handler(self, ws: ServerConnection) -> None:
        if ws.request is None or ws.request.path.split("?")[0] != WS_PATH:
            await ws.close(1008, "unknown path")
            return
        self.connections += 1
        try:
            async for message in ws:
                command = json.loads(message)
                if command.get("cmd") == "subscribe":
                    ack = {"id": command.get("id"), "type": "subscribed", "msg": {"channel": "trade", "sid": 1}}
                    await ws.send(json.dumps(ack))
                    self.connection = ws
                    self.subscribed.set()
        except ConnectionClosed:
            pass
        finally:
            if self.connection is ws:
                self.connection = None
                self.subscribed.clear()


@dataclass(frozen=True)
class TitleFaults:
    """How the REST stub answers title look-ups (market and event requests): latency, 503s and stalls."""

    delay_s: tuple[float, float] = (0.0, 0.0)  # each answer waits a random time in this range
    error_share: float = 0.0  # this share of answers is a 503, at once
    stall_share: float = 0.0  # this share of answers comes only after `stall_s` (past the title budget)
    stall_s: float = 2.0


# "realistic": Kalshi seen from a VM, a round trip of 30-120 ms, and a 503 now and then (5 %) for the breaker
# and the ticker fallback to show up. "harsh" adds answers 2 s late (5 %): past the 0.5 s title budget, so an
# alert whose look-up stalls waits the whole budget unless the look-up started before the alert (prefetch).
TITLE_PROFILES = {
    "instant": TitleFaults(),
    "realistic": TitleFaults(delay_s=(0.03, 0.12), error_share=0.05),
    "harsh": TitleFaults(delay_s=(0.03, 0.12), error_share=0.05, stall_share=0.05),
}
TITLE_PREFIX = "Title of "


class _RestHandler(BaseHTTPRequestHandler):
    """Kalshi REST, as far as a daemon in dry-run asks: no missed trades, a market, its event (with `faults`)."""

    faults: ClassVar[TitleFaults] = TitleFaults()
    rand: ClassVar[random.Random] = random.Random(1)
    markets_of: ClassVar[dict[str, list[str]]] = {}  # event ticker -> its markets' tickers (the generator's)

    def do_GET(self) -> None:
        path = self.path.split("?")[0].removeprefix("/trade-api/v2")
        body: dict[str, Any]
        if path in ("/markets/trades", "/historical/trades"):
            body = {"trades": [], "cursor": ""}
        elif path.startswith(("/markets/", "/events/")):
            faults, roll = self.faults, self.rand.random()
            low_s, high_s = faults.delay_s
            time.sleep(low_s + (high_s - low_s) * self.rand.random())
            if roll < faults.error_share:
                self.send_error(503)
                return
            if roll > 1 - faults.stall_share:
                time.sleep(faults.stall_s)
            if path.startswith("/markets/"):
                body = {"market": _market(path.removeprefix("/markets/"))}
            else:
                name = path.removeprefix("/events/")
                event = {"event_ticker": name, "title": TITLE_PREFIX + name, "series_ticker": name.split("-")[0]}
                # Like Kalshi, the event comes with its markets.
                body = {"event": event, "markets": [_market(t) for t in self.markets_of.get(name, [])]}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: the bench's terminal is for results."""


def _market(ticker: str) -> dict[str, Any]:
    return {"ticker": ticker, "event_ticker": ticker.rsplit("-", 1)[0], "status": "active"}


def _serve_rest(ports: Connection, faults: TitleFaults, tickers: list[str]) -> None:
    _RestHandler.faults = faults
    for ticker in tickers:
        _RestHandler.markets_of.setdefault(ticker.rsplit("-", 1)[0], []).append(ticker)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RestHandler)
    ports.send(server.server_address[1])
    server.serve_forever()


def start_rest_stub(faults: TitleFaults, seeds: range) -> tuple[multiprocessing.Process, int]:
    """The REST stub in its own process, so a busy sender here cannot slow the daemon's title lookups."""
    # Every market the generator can use with these seeds, so that each event lists its markets.
    tickers = sorted({m.ticker for seed in seeds for m in gen_capture.build_markets(random.Random(f"markets-{seed}"))})
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=_serve_rest, args=(send, faults, tickers), daemon=True)
    process.start()
    if not receive.poll(10):
        process.kill()
        raise SystemExit("the REST stub did not start")
    port: int = receive.recv()
    return process, port


# -------------------------------------------------------------------------------------------- the daemon


@dataclass
class DaemonLog:
    """What the daemon printed, stamped with when the bench read it."""

    alerts: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)  # alert_id -> (read at, event)
    by_trade: dict[str, str] = field(default_factory=dict)  # trade id -> alert_id of the alert that holds it
    stats: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    notable: list[dict[str, Any]] = field(default_factory=list)  # warnings, errors, connection events
    summary: dict[str, Any] | None = None
    unparsed: int = 0

    def last_stats(self) -> dict[str, Any]:
        return self.stats[-1][1] if self.stats else {}


async def read_daemon(stream: asyncio.StreamReader, log: DaemonLog, raw_log: Path) -> None:
    with raw_log.open("wb") as copy:
        while line := await stream.readline():
            read_at = time.time()  # wall clock, comparable with the daemon's own `timestamp`
            copy.write(line)
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.unparsed += 1
                continue
            name = event.get("event")
            if name == "would_post":
                log.alerts.setdefault(event["alert_id"], (read_at, event))
                for trade_id in event.get("trade_ids", []):
                    log.by_trade.setdefault(trade_id, event["alert_id"])
            elif name == "stats":
                log.stats.append((read_at, event))
            elif name == "daemon_stopped":
                log.summary = event
            elif event.get("level") in {"warning", "error", "critical"} or str(name).startswith("ws_"):
                log.notable.append(event)


def daemon_env(
    workdir: Path, ws_url: str, rest_port: int, window_ms: int, stats_s: float, *, repo: Path = REPO
) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(repo),
        "KALSHI_WS_URL": ws_url,
        "KALSHI_API_URL": f"http://127.0.0.1:{rest_port}/trade-api/v2",
        "STATS_INTERVAL_S": str(stats_s),
        "SWEEP_WINDOW_MS": str(window_ms),
        "STATE_DIR": str(workdir / "state"),
    }


# -------------------------------------------------------------------------------------------- sending


@dataclass
class Part:
    """Frames of one phase, generated ahead, and the whales planted in them."""

    rate: int
    lines: list[str]
    offsets_s: list[float]  # when to send each line, from the start of the phase
    trade_ids: list[str | None]
    alerts: list[dict[str, Any]]
    last_ms: int  # trade time of the part's last frame
    start_ms: int  # trade time of its start (frames are sent from then on, by the wall clock)


def make_part(
    rate: int,
    *,
    seconds: float,
    whales_per_s: float,
    seed: int,
    first_seq: int,
    window_ms: int,
    after: Part | None = None,
) -> Part:
    """A phase's frames. Its trade time starts well clear of the previous part's (`after`): each part keeps
    background trades away from its own whales, but a trade at the end of one part could otherwise join a whale
    at the start of the next."""
    start_ms = int(time.time() * 1000)
    if after is not None:
        start_ms = max(start_ms, after.last_ms + 2 * window_ms + 2000)
    frames = max(200, int(rate * seconds))
    spec = gen_capture.CaptureSpec(
        frames=frames,
        seed=seed,
        whales=max(1, int(whales_per_s * seconds)),
        malformed_sets=0,
        rate_per_s=rate,
        bursts=False,
        start_ms=start_ms,
        sweep_window_ms=window_ms,
        edge_cases=False,
    )
    generator = gen_capture.CaptureGenerator(spec)
    lines, offsets, ids = [], [], []
    for arrival_ms, line, trade_id in generator.frames(first_seq=first_seq):
        if trade_id is None:
            continue  # the capture's own `subscribed` ack: the server sends the real one
        lines.append(line)
        offsets.append((arrival_ms - spec.start_ms) / 1000)
        ids.append(trade_id)
    last_ms = spec.start_ms + int(offsets[-1] * 1000) if offsets else spec.start_ms
    return Part(rate, lines, offsets, ids, generator.expected_alerts, last_ms, spec.start_ms)


@dataclass
class Sent:
    seconds: float
    frames: int
    max_lag_s: float
    sent_at: dict[str, float]  # trade id -> when (wall clock) its frame was handed to the socket
    lost_connection: bool = False


def ws_text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (RFC 6455 5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 1 << 16:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


async def send_part(kalshi: FakeKalshi, part: Part, watch: set[str]) -> Sent:
    """Send each frame at its time (all that are due go back to back), noting when watched fills left."""
    ws = kalshi.connection
    assert ws is not None
    if kalshi.compression is None:
        return await send_part_raw(ws, part, watch)
    sent_at: dict[str, float] = {}
    max_lag = 0.0
    started = time.monotonic()
    index, total = 0, len(part.lines)
    lines, offsets, ids = part.lines, part.offsets_s, part.trade_ids
    try:
        while index < total:
            now = time.monotonic() - started
            due = offsets[index]
            if due > now + 0.0005:
                await asyncio.sleep(due - now)
                continue
            max_lag = max(max_lag, now - due)
            while index < total and offsets[index] <= now:
                await ws.send(lines[index])
                trade_id = ids[index]
                if trade_id in watch:
                    sent_at[trade_id] = time.time()
                index += 1
    except ConnectionClosed:
        return Sent(time.monotonic() - started, index, max_lag, sent_at, lost_connection=True)
    return Sent(time.monotonic() - started, index, max_lag, sent_at)


# Bytes the sender lets wait in its socket buffer before it waits for the daemon to read (back-pressure).
_WRITE_BUFFER_HIGH = 1 << 20


async def send_part_raw(ws: ServerConnection, part: Part, watch: set[str]) -> Sent:
    """The same schedule without compression, but the frames are encoded ahead and all that are due go to the
    socket in one write: the sender costs a fraction of what the daemon does, so the ramp finds the daemon's
    limit rather than the sender's. (websockets' `send` costs several µs a frame, near the daemon's own cost.)"""
    transport = ws.transport
    encoded = [ws_text_frame(line.encode()) for line in part.lines]
    watched = [(i, t) for i, t in enumerate(part.trade_ids) if t in watch]
    sent_at: dict[str, float] = {}
    max_lag = 0.0
    offsets = part.offsets_s
    total = len(encoded)
    started = time.monotonic()
    index = 0
    next_watch = 0
    while index < total:
        if ws.state is not State.OPEN or transport.is_closing():
            return Sent(time.monotonic() - started, index, max_lag, sent_at, lost_connection=True)
        now = time.monotonic() - started
        due = offsets[index]
        if due > now + 0.0005:
            await asyncio.sleep(due - now)
            continue
        if transport.get_write_buffer_size() > _WRITE_BUFFER_HIGH:
            await asyncio.sleep(0.0005)  # the daemon is not reading: this shows as lag
            continue
        max_lag = max(max_lag, now - due)
        end = bisect.bisect_right(offsets, now, index)
        transport.write(b"".join(encoded[index:end]))
        wrote_at = time.time()
        while next_watch < len(watched) and watched[next_watch][0] < end:
            sent_at[watched[next_watch][1]] = wrote_at
            next_watch += 1
        index = end
        await asyncio.sleep(0)
    return Sent(time.monotonic() - started, index, max_lag, sent_at)


def latencies(part: Part, sent: Sent, log: DaemonLog) -> tuple[list[float], list[str], list[str], list[float]]:
    """Milliseconds from each whale's last fill sent to its `would_post` read; missing and wrong alerts; and
    the same latencies by the daemon's own log timestamp (the difference is time the line spent reaching us)."""
    found, missing, wrong, logged = [], [], [], []
    for alert in part.alerts:
        got = log.alerts.get(alert["alert_id"])
        if got is None:
            # Posted under another id (grouped with other fills) or not at all.
            other = log.by_trade.get(alert["trade_ids"][-1])
            if other is not None:
                event = log.alerts[other][1]
                wrong.append(f"{alert['ticker']}: posted as {event.get('trade_ids')} worth {event.get('value_usd')}")
            else:
                missing.append(f"{alert['ticker']} {alert['value_usd']}")
            continue
        read_at, event = got
        if not all(t in sent.sent_at for t in alert["trade_ids"]):
            missing.append(f"{alert['ticker']} (not all fills were sent)")
            continue
        if event.get("trade_ids") != alert["trade_ids"] or event.get("value_usd") != alert["value_usd"]:
            wrong.append(f"{alert['ticker']}: {event.get('value_usd')} != {alert['value_usd']}")
        last_sent = max(sent.sent_at[t] for t in alert["trade_ids"])
        found.append((read_at - last_sent) * 1000)
        stamped = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        logged.append((stamped - last_sent) * 1000)
    return found, missing, wrong, logged


def titled(part: Part, log: DaemonLog) -> int:
    """How many of the part's whales were posted with a label from REST (a title, or a combo's "Combo") rather
    than the ticker that stands in when the look-up failed or was late."""
    return sum(
        alert["ticker"] not in log.alerts[alert["alert_id"]][1].get("text", "")
        for alert in part.alerts
        if alert["alert_id"] in log.alerts
    )


def counted(log: DaemonLog, frames: int) -> Callable[[], bool]:
    return lambda: log.last_stats().get("frames", 0) >= frames


def all_alerted(log: DaemonLog, part: Part) -> Callable[[], bool]:
    return lambda: all(alert["alert_id"] in log.alerts for alert in part.alerts)


async def wait_for(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step_s)
    return predicate()


# -------------------------------------------------------------------------------------------- phases


async def run(args: argparse.Namespace) -> dict[str, Any]:
    OUT.mkdir(exist_ok=True)
    report: dict[str, Any] = {
        "window_ms": args.window_ms,
        "compression": not args.no_compression,
        "titles": args.titles,
        "load_average_at_start": os.getloadavg(),
        "daemon_repo": str(args.daemon_repo),
    }
    rest, rest_port = start_rest_stub(TITLE_PROFILES[args.titles], range(args.seed, args.seed + len(args.ramp) + 1))
    compression = None if args.no_compression else "deflate"
    with (
        tempfile.TemporaryDirectory(prefix="valshi-live-") as tmp,
        (OUT / "live-daemon-stderr.txt").open("wb") as stderr,
    ):
        workdir = Path(tmp)
        async with FakeKalshi(ping_interval_s=10.0, compression=compression) as kalshi:
            env = daemon_env(workdir, kalshi.url, rest_port, args.window_ms, args.stats_interval, repo=args.daemon_repo)
            daemon = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "valshi_x",
                "--dry-run",
                "--log-format",
                "json",
                cwd=workdir,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                limit=1 << 20,
            )
            assert daemon.stdout is not None
            log = DaemonLog()
            reader = asyncio.create_task(read_daemon(daemon.stdout, log, OUT / "live-daemon-stdout.jsonl"))
            try:
                report.update(await phases(args, kalshi, log, daemon))
            finally:
                if daemon.returncode is None:
                    daemon.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(daemon.wait(), 15)
                except TimeoutError:
                    daemon.kill()
                    await daemon.wait()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader, 5)
            report["daemon_exit_code"] = daemon.returncode
            report["daemon_summary"] = log.summary
            report["daemon_notable_events"] = log.notable[-20:]
    rest.kill()
    rest.join(5)
    return report


async def phases(
    args: argparse.Namespace, kalshi: FakeKalshi, log: DaemonLog, daemon: asyncio.subprocess.Process
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    await wait_for(lambda: kalshi.subscribed.is_set() or daemon.returncode is not None, 20)
    if not kalshi.subscribed.is_set():
        raise SystemExit(
            f"the daemon did not subscribe within 20 s (exit code {daemon.returncode}); "
            "see bench/out/live-daemon-stderr.txt and live-daemon-stdout.jsonl"
        )
    deadline = time.monotonic() + args.max_seconds
    seq = 1
    frames_sent = 0
    settle_s = args.window_ms / 1000 + 1.5

    # 1. latency at a fixed rate
    part = make_part(
        args.rate,
        seconds=args.seconds,
        whales_per_s=args.whales_per_s,
        seed=args.seed,
        first_seq=seq,
        window_ms=args.window_ms,
    )
    watch = {t for alert in part.alerts for t in alert["trade_ids"]}
    print(f"latency phase: {len(part.lines):,} frames at {args.rate:,}/s, {len(part.alerts)} whales ...")
    sent = await send_part(kalshi, part, watch)
    seq += sent.frames
    frames_sent += sent.frames
    await wait_for(all_alerted(log, part), settle_s)
    found, missing, wrong, logged = latencies(part, sent, log)
    target = args.window_ms + LATENCY_SLACK_MS
    latency = {
        "rate": args.rate,
        "frames": sent.frames,
        "whales": len(part.alerts),
        "samples": len(found),
        "p50_ms": round(statistics.median(found), 1) if found else None,
        "p99_ms": round(percentile(found, 99), 1) if found else None,
        "max_ms": round(max(found), 1) if found else None,
        "p99_ms_by_daemon_timestamp": round(percentile(logged, 99), 1) if logged else None,
        "target_p99_ms": target,
        "missing": missing,
        "wrong": wrong,
        "sender_max_lag_ms": round(sent.max_lag_s * 1000, 1),
        "lost_connection": sent.lost_connection,
        "posted_with_title": titled(part, log),
        "latencies_ms_in_send_order": [round(ms) for ms in found],  # an outlier's place: start-up, or a stall
    }
    latency["met"] = bool(found) and not missing and not wrong and latency["p99_ms"] <= target
    result["latency"] = latency
    print(
        f"  alert latency p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms, max {latency['max_ms']} ms over "
        f"{len(found)} whales (target p99 <= {target} ms: {'met' if latency['met'] else 'NOT met'}); "
        f"p99 by the daemon's own timestamps {latency['p99_ms_by_daemon_timestamp']} ms; "
        f"missing {len(missing)}, wrong {len(wrong)}; {latency['posted_with_title']} of {len(part.alerts)} with "
        f"their title ({args.titles} title look-ups)"
    )

    if args.rss_seconds > 0:
        result["rss"] = await rss_phase(args, kalshi, log, daemon, first_seq=seq)
        seq += result["rss"]["frames"]
        frames_sent += result["rss"]["frames"]

    # 2. ramp
    steps: list[dict[str, Any]] = []
    if args.ramp:
        floor_part = make_part(50_000, seconds=2, whales_per_s=1.0, seed=args.seed, first_seq=1, window_ms=1000)
        result["typed_decode_floor_us"] = floor_us = round(typed_decode_floor_us(floor_part.lines, REPO), 3)
        print(f"floor (msgspec typed decode of a frame, this process, now): {floor_us} µs/frame")
    sustained = latency_rate = previous_rate = 0
    sustained_cpu_us = None
    for number, rate in enumerate(args.ramp):
        if time.monotonic() > deadline:
            print("  time budget spent; ramp stopped")
            break
        part = make_part(
            rate,
            seconds=args.step_seconds,
            whales_per_s=1.0,
            seed=args.seed + 1 + number,
            first_seq=seq,
            window_ms=args.window_ms,
            after=part,
        )
        watch = {t for alert in part.alerts for t in alert["trade_ids"]}
        before = log.last_stats()
        dropped_before = before.get("frames_dropped", 0)
        stats_from = len(log.stats)
        if kalshi.connection is None and not await wait_for(kalshi.subscribed.is_set, 10):
            steps.append({"rate": rate, "kept_up": False, "why": "daemon not connected"})
            break
        # A part kept clear of the previous one may start ahead of the wall clock; sent before its time, its trades
        # would be more than the daemon's tolerance ahead of it (`future_time`, refused): wait for the time.
        await asyncio.sleep(max(0.0, part.start_ms / 1000 - time.time()))
        daemon_cpu_before, bench_cpu_before = cpu_seconds(daemon.pid), time.process_time()
        profiler = await start_profile(args, daemon.pid, rate) if args.profile else None
        sent = await send_part(kalshi, part, watch)
        if profiler is not None:
            await profiler.wait()
        seq += sent.frames
        frames_sent += sent.frames
        ended = time.time()
        daemon_cpu_after, bench_cpu = cpu_seconds(daemon.pid), time.process_time() - bench_cpu_before
        daemon_cpu = None
        if daemon_cpu_before is not None and daemon_cpu_after is not None:
            daemon_cpu = daemon_cpu_after - daemon_cpu_before
        during = [s for _, s in log.stats[stats_from:]]
        caught_up = await wait_for(counted(log, frames_sent), 5 + args.stats_interval)
        daemon_cpu_caught_up = cpu_seconds(daemon.pid)
        caught_up_s = max(0.0, log.stats[-1][0] - ended) if caught_up and log.stats else None
        await wait_for(all_alerted(log, part), settle_s)
        found, missing, wrong, logged = latencies(part, sent, log)
        after = log.last_stats()
        max_queue = max((s.get("queue_depth", 0) for s in during), default=0)
        dropped = after.get("frames_dropped", 0) - dropped_before
        step = {
            "rate": rate,
            "frames": sent.frames,
            "send_seconds": round(sent.seconds, 2),
            "sender_max_lag_ms": round(sent.max_lag_s * 1000, 1),
            "max_queue_depth": max_queue,
            "frames_dropped": dropped,
            "caught_up_s": None if caught_up_s is None else round(caught_up_s, 2),
            "alert_p50_ms": round(statistics.median(found), 1) if found else None,
            "alert_max_ms": round(max(found), 1) if found else None,
            "alert_max_ms_by_daemon_timestamp": round(max(logged), 1) if logged else None,
            "missing_alerts": missing,
            "wrong_alerts": wrong,
            "lost_connection": sent.lost_connection,
            # Share of one core each process used while sending: which side was the bottleneck.
            "daemon_cpu": None if daemon_cpu is None else round(daemon_cpu / sent.seconds, 2),
            # CPU the daemon spent per frame sent: less swayed by the neighbours' load than the rate it kept up.
            # From the step's start until the daemon had counted every frame (or gave up waiting).
            "daemon_cpu_us_per_frame": None
            if daemon_cpu_before is None or daemon_cpu_caught_up is None
            else round((daemon_cpu_caught_up - daemon_cpu_before) / max(1, sent.frames) * 1e6, 2),
            "sender_cpu": round(bench_cpu / sent.seconds, 2),
        }
        reasons = []
        if dropped:
            reasons.append(f"{dropped} frames dropped")
        if max_queue > rate * MAX_QUEUE_SECONDS:
            reasons.append(f"queue reached {max_queue}")
        if caught_up_s is None or caught_up_s > MAX_CATCH_UP_S + args.stats_interval:
            reasons.append("still behind after the last frame")
        if sent.max_lag_s > MAX_SENDER_LAG_S:
            reasons.append(f"sender {sent.max_lag_s * 1000:.0f} ms behind schedule (socket back-pressure or sender)")
        if sent.lost_connection:
            reasons.append("connection lost")
        if missing or wrong:
            reasons.append(f"{len(missing)} whales missing, {len(wrong)} wrong")
        # Frames can also wait unseen in socket buffers; alerts late as a rule (not one outlier) show it.
        target = args.window_ms + LATENCY_SLACK_MS
        if found and statistics.median(found) > target:
            reasons.append(f"alerts late: median {statistics.median(found):.0f} ms")
        step["kept_up"] = not reasons
        step["why"] = "; ".join(reasons)
        step["alerts_within_target"] = bool(found) and max(found) <= target
        steps.append(step)
        late = "" if step["alerts_within_target"] or reasons else f"; an alert {max(found):.0f} ms after its last fill"
        print(
            f"ramp {rate:>7,}/s: {'kept up' + late if not reasons else 'FELL BEHIND: ' + step['why']} "
            f"(queue max {max_queue}, dropped {dropped}, sender lag {step['sender_max_lag_ms']} ms, "
            f"alert p50 {step['alert_p50_ms']} ms, max {step['alert_max_ms']} ms "
            f"(daemon-stamped {step['alert_max_ms_by_daemon_timestamp']} ms), "
            f"cpu daemon {step['daemon_cpu']} / sender {step['sender_cpu']}, "
            f"daemon {step['daemon_cpu_us_per_frame']} µs/frame)"
        )
        if reasons:
            break
        sustained = rate
        sustained_cpu_us = step["daemon_cpu_us_per_frame"]
        if step["alerts_within_target"] and latency_rate == previous_rate:
            latency_rate = rate
        previous_rate = rate
    result["ramp"] = steps
    result["sustained_frames_per_s"] = sustained
    if sustained_cpu_us and "typed_decode_floor_us" in result:
        result["daemon_cpu_us_per_frame_at_sustained"] = sustained_cpu_us
        result["daemon_cpu_per_frame_in_floors"] = round(sustained_cpu_us / result["typed_decode_floor_us"], 1)
    result["alerts_within_target_up_to_frames_per_s"] = latency_rate
    print(
        f"sustained without falling behind: {sustained:,} frames/s; "
        f"every alert within {args.window_ms + LATENCY_SLACK_MS} ms up to {latency_rate:,} frames/s"
    )
    if "daemon_cpu_per_frame_in_floors" in result:
        print(
            f"daemon CPU per frame at {sustained:,}/s: {result['daemon_cpu_us_per_frame_at_sustained']} µs = "
            f"{result['daemon_cpu_per_frame_in_floors']} x the typed-decode floor"
        )
    return result


async def start_profile(args: argparse.Namespace, pid: int, rate: int) -> asyncio.subprocess.Process:
    """py-spy (pip install py-spy) sampling the daemon for the length of a ramp step; collapsed stacks to a file,
    summarised by `profile_summary` below."""
    out = OUT / f"live-profile-{rate}.txt"
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(args.step_seconds) - 1)),
        "--format",
        "raw",
        "--nonblocking",
        "-o",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def profile_summary(path: Path, top: int = 25) -> None:
    """Share of samples per function (lines merged), inclusive and self, from py-spy's collapsed stacks."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1].rsplit(":", 1)[0] + ")" for f in stack.split(";")]
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    print(f"{path.name}: {total} samples")
    for title, table in (("self", own), ("inclusive", inclusive)):
        print(f"  {title}:")
        for name, count in sorted(table.items(), key=lambda item: -item[1])[:top]:
            print(f"    {100 * count / total:5.1f} %  {name}")


def memory_kb(pid: int) -> tuple[int, int]:
    """Resident set size now and its peak so far (VmRSS, VmHWM from Linux /proc), in kB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Vm")
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


async def rss_phase(
    args: argparse.Namespace, kalshi: FakeKalshi, log: DaemonLog, daemon: asyncio.subprocess.Process, first_seq: int
) -> dict[str, Any]:
    """Frames at `--rate` for `--rss-seconds` of wall time (trade time runs with it), in parts of
    `--rss-sample-s`; the daemon's RSS and peak RSS are sampled after each part."""
    samples: list[dict[str, Any]] = []
    seq = first_seq
    frames = 0
    started = time.monotonic()
    print(f"rss phase: {args.rate:,} frames/s for {args.rss_seconds:.0f} s, RSS every {args.rss_sample_s:.0f} s ...")
    number = 0
    while time.monotonic() - started < args.rss_seconds:
        # Trade time starts at the wall clock (no `after`): a live feed's trade time never runs ahead of it.
        part = make_part(
            args.rate,
            seconds=args.rss_sample_s,
            whales_per_s=0.2,
            seed=args.seed + 1000 + number,
            first_seq=seq,
            window_ms=args.window_ms,
        )
        number += 1
        sent = await send_part(kalshi, part, set())
        seq += sent.frames
        frames += sent.frames
        if sent.lost_connection:
            break
        rss_kb, peak_kb = memory_kb(daemon.pid)
        stats = log.last_stats()
        sample = {
            "at_s": round(time.monotonic() - started, 1),
            "rss_mb": round(rss_kb / 1024, 1),
            "peak_rss_mb": round(peak_kb / 1024, 1),
            "frames": stats.get("frames"),
            "open_groups": stats.get("open_groups"),
            "malformed": stats.get("malformed"),
            "frames_dropped": stats.get("frames_dropped"),
        }
        samples.append(sample)
        print(f"  {sample}")
    rss = [s["rss_mb"] for s in samples]
    return {
        "rate": args.rate,
        "seconds": round(time.monotonic() - started, 1),
        "frames": frames,
        "samples": samples,
        "peak_rss_mb": max((s["peak_rss_mb"] for s in samples), default=None),
        "rss_first_last_mb": (rss[0], rss[-1]) if rss else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=2000, help="frames/s of the latency phase")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the latency phase")
    parser.add_argument("--whales-per-s", type=float, default=2.0, help="whales planted per second (latency phase)")
    parser.add_argument(
        "--ramp",
        type=lambda text: [int(r) for r in text.split(",") if r],
        default=[2000, 5000, 10000, 20000, 30000, 40000, 50000, 60000, 80000],
        help="comma-separated rates for the ramp ('' to skip it)",
    )
    parser.add_argument("--step-seconds", type=float, default=6.0, help="length of each ramp step")
    parser.add_argument("--window-ms", type=int, default=gen_capture.DEFAULT_SWEEP_WINDOW_MS, help="SWEEP_WINDOW_MS")
    parser.add_argument("--stats-interval", type=float, default=0.5, help="STATS_INTERVAL_S for the daemon")
    parser.add_argument("--no-compression", action="store_true", help="refuse permessage-deflate on the server")
    parser.add_argument(
        "--titles",
        choices=sorted(TITLE_PROFILES),
        default="realistic",
        help="how the REST stub answers title look-ups (latency, 503s, stalls past the budget)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--daemon-repo",
        type=Path,
        default=REPO,
        help="the checkout whose daemon runs (default this one): compare two trees in one session",
    )
    parser.add_argument(
        "--rss-seconds", type=float, default=0.0, help="after the latency phase: this long at --rate, RSS sampled"
    )
    parser.add_argument(
        "--profile", action="store_true", help="sample the daemon with py-spy during each ramp step (bench/out)"
    )
    parser.add_argument("--summarise", type=Path, help="only print the summary of a py-spy collapsed-stack file")
    parser.add_argument("--rss-sample-s", type=float, default=10.0, help="RSS sample interval of the rss phase")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="time budget for the ramp")
    args = parser.parse_args(argv)
    if args.summarise:
        profile_summary(args.summarise)
        return 0
    report = asyncio.run(run(args))
    (OUT / "live_latency.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    latency_ok = report.get("latency", {}).get("met", False)
    return 0 if latency_ok and report.get("daemon_exit_code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
