"""Soak: every whale once, and on time, through lost frames, a REST outage, a socket outage and a kill -9.

Runs the fake exchange of the tests (tests/fake_exchange.py: a WebSocket and a REST API on 127.0.0.1 sharing one
tape of trades) and the real daemon as a subprocess, `python -m valshi_x --dry-run --state-dir DIR --log-format
json`, pointed at it with KALSHI_WS_URL / KALSHI_API_URL (no key: an unsigned connection). It trades at `--rate`
trades per second (trade times from the wall clock), loses `--loss` of the frames (seq gaps) throughout, plants
about `--whales-per-s` whales a second (single fills and sweeps of 2-5 fills spread over up to ~0.8 s, none a
whale alone) plus near misses, every fourth with one fill (or its only fill) lost on purpose, so that only REST
has it, and goes through four phases, one after another:

- `steady`: only the lost frames;
- `rest_outage`: Kalshi REST answers 503 to everything for `--rest-outage-s` while the socket goes on delivering;
- `socket_outage`: the connection is cut and every handshake refused (503) for `--socket-outage-s`;
- `restart`: the daemon is killed (SIGKILL) and, `--down-s` later, started again on the same state directory.

The whales on the tape are computed by a fresh detector over every trade in time order; the daemons' `would_post`
lines are compared with them: alerted (same fills, same value to the cent), alerted short (closed when its hold
ran out while REST was down, with only the fills the socket brought: a part of a whale of the tape, logged
`alert_unconfirmed`), missed, duplicated (a trade id in two alerts, or one whale reported twice) and wrong (an
alert that is neither a whale of the tape nor a part of one). Each whale belongs to the
phase its last fill was made in, and its delay runs from that fill's trade time to the `would_post` line's
timestamp (one host, one clock). Also reported: trades the daemons processed (their `trades` count, the killed
one's from its last stats line) per trade on the tape. Bounded: every wait has a timeout, the whole run stops
after `--max-seconds`, and the daemon is stopped with SIGTERM at the end.

    .venv/bin/python bench/soak.py                  # ~3 minutes on 2 cores

Writes bench/out/soak/{daemon-1,daemon-2}.jsonl (the daemons' logs) and summary.json. Exit code 0 only when
missed, duplicated and wrong are all 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out" / "soak"
sys.path[:0] = [str(REPO)]

# Imported after the path is set: the fakes live with the tests.
from tests.fake_exchange import FakeExchange, alert_key, expected_alerts  # noqa: E402
from tests.fake_kalshi import trade_msg  # noqa: E402

THRESHOLD = Decimal(100_000)
SWEEP_WINDOW_MS = 1000  # the default setting
HOLD_MAX_S = 5.0  # the default setting
PHASES = ("steady", "rest_outage", "socket_outage", "restart")
Key = tuple[tuple[str, ...], str]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------------------------------- the tape


class Trader:
    """Makes the trades: noise, and whales (or near misses) planted at random, their fills spread out."""

    def __init__(self, rate: float, whales_per_s: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tickers = [f"KXNOISE-{n:03d}" for n in range(400)]
        self.plant_chance = whales_per_s / rate * 1.25  # a fifth of the plants are near misses
        self.pending: list[tuple[int, dict[str, Any], bool]] = []  # (trade number due, fill, lost) under way
        self.made = 0
        self.planted = 0
        self.whales = 0

    def next(self) -> tuple[dict[str, Any], bool]:
        """The next trade, and whether its frame is to be lost on purpose (a planted REST-only fill)."""
        rng = self.rng
        self.made += 1
        n = self.made
        if self.pending and self.pending[0][0] <= n:
            _, fill, lost = self.pending.pop(0)
            return trade_msg(**fill, ts_ms=wall_ms()), lost
        if rng.random() < self.plant_chance:
            self._plant(n)
            return self.next()
        price = Decimal(rng.randint(2, 98)) / 100
        return trade_msg(
            ticker=rng.choice(self.tickers),
            side=rng.choice(["yes", "no"]),
            count=f"{Decimal(rng.randint(100, 50_000)) / 100:.2f}",
            yes_price=f"{price:.4f}",
            trade_id=f"{n:08d}-n",
            ts_ms=wall_ms(),
        ), False

    def _plant(self, n: int) -> None:
        rng = self.rng
        self.planted += 1
        ticker = f"KXWHALE-{self.planted:04d}"
        side = rng.choice(["yes", "no"])
        price = Decimal(rng.randint(20, 80)) / 100
        side_price = price if side == "yes" else 1 - price
        is_whale = self.planted % 5 != 0
        self.whales += is_whale
        target = Decimal(rng.randint(101_000, 400_000)) if is_whale else Decimal(rng.randint(80_000, 99_000))
        fills = 1 if is_whale and self.planted % 3 == 0 else rng.randint(2, 5)
        if fills > 1 and target / fills >= THRESHOLD:
            fills = int(target // THRESHOLD) + 1  # no single fill of a sweep is a whale alone
        per_fill = (target / fills / side_price).quantize(Decimal("0.01"))
        # Every fourth plant has one fill that only REST will have (a whole single-fill whale, or part of a sweep).
        lost_fill = rng.randrange(fills) if self.planted % 4 == 1 else -1
        due = n
        for k in range(fills):
            fill = {
                "ticker": ticker,
                "side": side,
                "count": f"{per_fill:.2f}",
                "yes_price": f"{price:.4f}",
                "trade_id": f"{n:08d}-{ticker}-f{k}",
            }
            self.pending.append((due, fill, k == lost_fill))
            due += rng.randint(30, 250)  # the next fill 20-170 ms later at 1,500 trades/s: all within the window
        self.pending.sort(key=lambda item: item[0])


# ---------------------------------------------------------------------------------------------- the daemon


@dataclass
class DaemonRun:
    process: asyncio.subprocess.Process
    stdout_path: Path


def daemon_env(workdir: Path, exchange: FakeExchange) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO),
        "KALSHI_WS_URL": exchange.ws_url,
        "KALSHI_API_URL": exchange.rest_url,
        "STATS_INTERVAL_S": "2",
        "SWEEP_WINDOW_MS": str(SWEEP_WINDOW_MS),
        "HOLD_MAX_S": str(HOLD_MAX_S),
    }


async def start_daemon(workdir: Path, exchange: FakeExchange, n: int) -> DaemonRun:
    stdout_path = OUT / f"daemon-{n}.jsonl"
    with stdout_path.open("wb") as stdout, (OUT / f"daemon-{n}.stderr.txt").open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "valshi_x",
            "--dry-run",
            "--state-dir",
            str(workdir / "state"),
            "--log-format",
            "json",
            cwd=workdir,
            env=daemon_env(workdir, exchange),
            stdout=stdout,
            stderr=stderr,
        )
    return DaemonRun(process, stdout_path)


def read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    with path.open("rb") as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
    return events


def reported(paths: list[Path]) -> list[dict[str, Any]]:
    return [e for path in paths if path.exists() for e in read_events(path) if e.get("event") == "would_post"]


def stamp_ms(event: dict[str, Any]) -> int:
    return int(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp() * 1000)


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Timeline:
    """What was done when (wall ms), for the summary and for sorting whales into phases."""

    phase_starts_ms: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:7.1f} s  {text}"
        self.lines.append(line)
        print(line, flush=True)

    def phase_of(self, ts_ms: int) -> str:
        current = PHASES[0]
        for phase in PHASES:
            start = self.phase_starts_ms.get(phase)
            if start is not None and ts_ms >= start:
                current = phase
        return current


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("daemon-*"):
        old.unlink()
    rng = random.Random(args.seed + 1)
    trader = Trader(args.rate, args.whales_per_s, args.seed)
    timeline = Timeline()
    deadline = time.monotonic() + args.max_seconds
    durations = {
        "steady": args.steady_s,
        "rest_outage": args.rest_outage_s + 10.0,  # the outage, then 10 s for REST's backlog
        "socket_outage": args.socket_outage_s + 14.0,
        "restart": args.down_s + 17.0,
    }
    with tempfile.TemporaryDirectory(prefix="valshi-soak-") as tmp:
        workdir = Path(tmp)
        async with FakeExchange(ping_interval_s=10.0) as exchange:
            runs = [await start_daemon(workdir, exchange, 1)]
            await exchange.wait_subscribed(timeout_s=30.0)
            timeline.note("daemon 1 subscribed")
            await asyncio.sleep(3.0)  # its first-start checkpoint is written; trading starts now

            # Scheduled actions: (seconds into the phase, what), run once each.
            async def rest_down() -> None:
                exchange.rest.down_status = 503
                timeline.note(f"REST answers 503 to everything for {args.rest_outage_s:.0f} s")

            async def rest_up() -> None:
                exchange.rest.down_status = None
                timeline.note("REST is back")

            async def socket_down() -> None:
                exchange.refuse(503)
                await exchange.cut()
                timeline.note(f"connection cut, handshakes refused (503) for {args.socket_outage_s:.0f} s")

            async def socket_up() -> None:
                exchange.accept()
                timeline.note("handshakes accepted again")

            async def kill() -> None:
                runs[-1].process.kill()
                await runs[-1].process.wait()
                timeline.note(f"daemon {len(runs)} killed (SIGKILL); down {args.down_s:.0f} s")

            async def restart() -> None:
                runs.append(await start_daemon(workdir, exchange, len(runs) + 1))
                timeline.note(f"daemon {len(runs)} started on the same state directory")

            actions = {
                "steady": [],
                "rest_outage": [(2.0, rest_down), (2.0 + args.rest_outage_s, rest_up)],
                "socket_outage": [(4.0, socket_down), (4.0 + args.socket_outage_s, socket_up)],
                "restart": [(4.0, kill), (4.0 + args.down_s, restart)],
            }
            for phase in PHASES:
                timeline.phase_starts_ms[phase] = wall_ms()
                timeline.note(f"phase {phase} ({durations[phase]:.0f} s)")
                todo = sorted(actions[phase], key=lambda a: a[0])
                start = time.monotonic()
                made_at_start = trader.made
                while (elapsed := time.monotonic() - start) < durations[phase]:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the soak ran out of time while trading")
                    while todo and elapsed >= todo[0][0]:
                        await todo.pop(0)[1]()
                    due = made_at_start + int(elapsed * args.rate) + 1
                    while trader.made < due:
                        msg, lost = trader.next()
                        await exchange.publish(msg, lost=lost or rng.random() < args.loss)
                    await asyncio.sleep(0.005)
                for _, action in todo:
                    await action()
            timeline.phase_starts_ms["end"] = wall_ms()
            while trader.pending:  # the sweeps under way are finished
                msg, lost = trader.next()
                await exchange.publish(msg, lost=lost)
            timeline.note(f"all {trader.made} trades made")

            # Let the daemon catch up: a slow trickle of small trades keeps its stream clock moving meanwhile.
            expected = expected_alerts(exchange.tape, THRESHOLD, SWEEP_WINDOW_MS)
            wanted = {alert_key(a.trade_ids, a.value_usd) for a in expected}
            paths = [r.stdout_path for r in runs]
            trickle = 0
            settle_deadline = min(deadline, time.monotonic() + args.settle_s)
            last_count, last_change = -1, time.monotonic()
            while time.monotonic() < settle_deadline:
                posts = reported(paths)
                if wanted <= {alert_key(e["trade_ids"], e["value_usd"]) for e in posts}:
                    break
                if len(posts) != last_count:
                    last_count, last_change = len(posts), time.monotonic()
                elif time.monotonic() - last_change > args.idle_s:
                    break  # nothing new for a while (a whale alerted short is never reported whole)
                for _ in range(20):
                    trickle += 1
                    await exchange.publish(
                        trade_msg(ticker="KXTAIL", count="1.00", trade_id=f"tail-{trickle:06d}", ts_ms=wall_ms())
                    )
                await asyncio.sleep(1.0)
            timeline.note("every whale reported" if time.monotonic() < settle_deadline else "settle time over")
            await asyncio.sleep(args.quiet_s)  # a duplicate would come now, if at all
            expected = expected_alerts(exchange.tape, THRESHOLD, SWEEP_WINDOW_MS)
            last = runs[-1].process
            if last.returncode is None:
                last.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(last.wait(), 30.0)
                except TimeoutError:
                    last.kill()
                    await last.wait()
            timeline.note(f"daemon {len(runs)} stopped, exit code {last.returncode}")
            exchange_counts = {
                "trades_on_tape": len(exchange.tape),
                "frames_sent": len(exchange.sent_ids),
                "frames_lost_seq_gaps": exchange.lost,
                "trades_undelivered_while_disconnected": exchange.undelivered,
                "rest_trades_requests": exchange.rest.counts["trades"],
                "handshakes_refused": sum(h.status == 503 for h in exchange.ws.handshakes),
            }
    return summarize(args, expected, [r.stdout_path for r in runs], timeline, exchange_counts)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(
    args: argparse.Namespace, expected: list[Any], paths: list[Path], timeline: Timeline, exchange: dict[str, Any]
) -> dict[str, Any]:
    posts = reported(paths)
    expected_by_key = {alert_key(a.trade_ids, a.value_usd): a for a in expected}
    reported_keys = Counter(alert_key(e["trade_ids"], e["value_usd"]) for e in posts)
    first_post_ms: dict[Key, int] = {}
    for e in posts:
        key = alert_key(e["trade_ids"], e["value_usd"])
        first_post_ms[key] = min(first_post_ms.get(key, 2**62), stamp_ms(e))
    trade_owners = Counter(t for e in posts for t in e["trade_ids"])
    shared = {t for t, n in trade_owners.items() if n > 1}
    # An alert made when its hold ran out (REST down) with only the fills the socket brought: a part of a whale of
    # the tape, logged `alert_unconfirmed`, its missing fills logged `sweep_grew_after_alert` when REST brought them.
    # Counted apart ("short"): on time, but not the whole value; it is the price of never waiting on REST for long.
    short_of: dict[Key, Key] = {}
    for key in reported_keys:
        if key not in expected_by_key:
            for whole in expected_by_key:
                if set(key[0]) < set(whole[0]) and whole not in reported_keys:
                    short_of[whole] = key
    for whole, part in short_of.items():
        first_post_ms.setdefault(whole, first_post_ms[part])
    wrong = sorted(k for k in reported_keys if k not in expected_by_key and k not in short_of.values())

    phases: dict[str, dict[str, Any]] = {}
    for phase in PHASES:
        keys = [k for k, a in expected_by_key.items() if timeline.phase_of(a.last_ts_ms) == phase]
        delays_s = [(first_post_ms[k] - expected_by_key[k].last_ts_ms) / 1000 for k in keys if k in first_post_ms]
        duplicated = sum(1 for k in keys if reported_keys[k] > 1 or set(k[0]) & shared)
        phases[phase] = {
            "whales_on_tape": len(keys),
            "alerted": len(delays_s),
            "alerted_short": sum(1 for k in keys if k in short_of),
            "missed": len(keys) - len(delays_s),
            "duplicated": duplicated,
            "delay_p50_s": round(statistics.median(delays_s), 2) if delays_s else None,
            "delay_p99_s": round(percentile(delays_s, 0.99), 2) if delays_s else None,
            "delay_max_s": round(max(delays_s), 2) if delays_s else None,
        }

    all_events = [e for p in paths if p.exists() for e in read_events(p)]
    counts = Counter(e.get("event") for e in all_events)
    processed = 0
    for path in paths:
        stats = [e for e in read_events(path) if e.get("event") in {"stats", "daemon_stopped"}] if path.exists() else []
        processed += int(stats[-1]["trades"]) if stats else 0
    stops = [e for e in all_events if e.get("event") == "daemon_stopped"]
    summary = {
        "command": " ".join([".venv/bin/python bench/soak.py", *sys.argv[1:]]),
        "seconds": round(time.monotonic() - timeline.t0, 1),
        "rate_per_s": args.rate,
        "loss": args.loss,
        **exchange,
        "whales_on_tape": len(expected_by_key),
        "alerted": sum(1 for k in expected_by_key if k in reported_keys or k in short_of),
        "alerted_short": len(short_of),
        "missed": sum(p["missed"] for p in phases.values()),
        "duplicated": sum(p["duplicated"] for p in phases.values()),
        "wrong": len(wrong),
        "phases": phases,
        "trades_processed": processed,
        "processed_per_tape_trade": round(processed / max(exchange["trades_on_tape"], 1), 3),
        "seq_gaps_seen": counts.get("ws_seq_gap", 0),
        "backfill_done": counts.get("backfill_done", 0),
        "backfill_retry": counts.get("backfill_retry", 0),
        "backfill_incomplete": counts.get("backfill_incomplete", 0),
        "alert_unconfirmed": counts.get("alert_unconfirmed", 0),
        "sweep_grew_after_alert": counts.get("sweep_grew_after_alert", 0),
        "alerts_refused_by_outbox": counts.get("alert_overlaps_existing", 0),
        "stale_alert_skipped": counts.get("stale_alert_skipped", 0),
        "missed_whales": [[*k[0], k[1]] for k in expected_by_key if k not in first_post_ms][:20],
        "short_alerts": [{"whale": [*w[0], w[1]], "alerted": [*p[0], p[1]]} for w, p in short_of.items()][:20],
        "wrong_alerts": [[*k[0], k[1]] for k in wrong][:20],
        "timeline": timeline.lines,
        "daemon_final_stats": stops[-1] if stops else None,
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1500.0, help="trades per second")
    parser.add_argument("--loss", type=float, default=0.002, help="share of frames lost (seq gaps)")
    parser.add_argument("--whales-per-s", type=float, default=1.0)
    parser.add_argument("--steady-s", type=float, default=40.0)
    parser.add_argument("--rest-outage-s", type=float, default=30.0)
    parser.add_argument("--socket-outage-s", type=float, default=6.0)
    parser.add_argument("--down-s", type=float, default=3.0, help="how long the killed daemon stays down")
    parser.add_argument("--settle-s", type=float, default=60.0, help="at most this long for the daemon to catch up")
    parser.add_argument("--idle-s", type=float, default=15.0, help="or until no alert came for this long")
    parser.add_argument("--quiet-s", type=float, default=5.0, help="then wait this long for late duplicates")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="hard bound on the whole run")
    args = parser.parse_args()
    summary = asyncio.run(soak(args))
    print(
        f"trades on tape {summary['trades_on_tape']} at {args.rate:.0f}/s, lost in seq gaps "
        f"{summary['frames_lost_seq_gaps']}, made while disconnected {summary['trades_undelivered_while_disconnected']}"
        f", REST trades requests {summary['rest_trades_requests']}; processed per tape trade "
        f"{summary['processed_per_tape_trade']}x"
    )
    print(
        f"{'phase':<14} {'whales':>6} {'alerted':>7} {'short':>5} {'missed':>6} {'dup':>4} "
        f"{'p50 s':>6} {'p99 s':>6} {'max s':>6}"
    )
    for phase, p in summary["phases"].items():
        print(
            f"{phase:<14} {p['whales_on_tape']:>6} {p['alerted']:>7} {p['alerted_short']:>5} {p['missed']:>6} "
            f"{p['duplicated']:>4} "
            f"{p['delay_p50_s']!s:>6} {p['delay_p99_s']!s:>6} {p['delay_max_s']!s:>6}"
        )
    print(
        f"whales on tape {summary['whales_on_tape']}, alerted {summary['alerted']} ({summary['alerted_short']} short), "
        f"missed {summary['missed']}, "
        f"duplicated {summary['duplicated']}, wrong {summary['wrong']}  [{summary['seconds']} s; backfills "
        f"{summary['backfill_done']}, retries {summary['backfill_retry']}, incomplete {summary['backfill_incomplete']}"
        f", unconfirmed {summary['alert_unconfirmed']}, grew after alert {summary['sweep_grew_after_alert']}]"
    )
    ok = summary["missed"] == 0 and summary["duplicated"] == 0 and summary["wrong"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
