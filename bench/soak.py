"""Soak: never miss a whale, never report one twice, through drops, lost frames, an outage and a kill -9.

Runs the fake exchange of the tests (tests/fake_exchange.py: a WebSocket and a REST API on 127.0.0.1 sharing one
tape of trades) and the real daemon as a subprocess, `python -m valshi_x --dry-run --state-dir DIR --log-format
json`, pointed at it with KALSHI_WS_URL / KALSHI_API_URL (no key: an unsigned connection). Then it trades:

- a tape of `--trades` trades (default 200,000) at `--rate` per second, trade times taken from the wall clock, with
  `--whales` whales planted (single fills and sweeps of 2-5 fills none of which is a whale alone) and near misses;
- the connection cut (TCP abort, 1006) every `--drop-every` frames sent (default 20,000);
- `--loss` of the frames lost (default 1%): their seq numbers are skipped, so the daemon sees gaps;
- one outage of `--outage-s` seconds (default 40) during which every handshake is answered 503;
- one kill -9 of the daemon, `--down-s` seconds down while trading goes on, then a new daemon on the same state.

The whales on the tape are computed by a fresh detector over every trade in time order; the daemons' `would_post`
lines (both runs) are compared with them: alerted (same fills, same value to the cent), missed, duplicated (a
trade id in two alerts, or one whale reported twice) and wrong (an alert that is no whale of the tape). Trade times
are "now", so the default MAX_ALERT_AGE_S (900 s) never skips one. Bounded: every wait has a timeout and the
whole run stops after `--max-seconds`; the daemon is stopped with SIGTERM at the end.

    .venv/bin/python bench/soak.py                    # ~3 minutes on 2 cores
    .venv/bin/python bench/soak.py --trades 40000 --rate 1000 --outage-s 5 --drop-every 8000 --kill-at 0.8  # ~1 min

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
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
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
Key = tuple[tuple[str, ...], str]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------------------------------- the tape


@dataclass
class Plan:
    """What to trade, in order, without times: trade times are stamped when each trade is made."""

    items: list[dict[str, Any]]  # trade_msg keyword arguments, trade_id included
    whales: int
    near_misses: int


def make_plan(trades: int, whales: int, seed: int) -> Plan:
    rng = random.Random(seed)
    tickers = [f"KXNOISE-{n:03d}" for n in range(400)]
    # Whales (and near misses) spread evenly over the tape, so some fall in every kind of trouble.
    specials: dict[int, list[dict[str, Any]]] = {}
    near_misses = whales // 5
    slots = rng.sample(range(500, trades - 500), whales + near_misses)
    for n, slot in enumerate(slots):
        ticker = f"KXWHALE-{n:03d}"
        side = rng.choice(["yes", "no"])
        price = Decimal(rng.randint(20, 80)) / 100
        side_price = price if side == "yes" else 1 - price
        is_whale = n < whales
        target = Decimal(rng.randint(101_000, 400_000)) if is_whale else Decimal(rng.randint(80_000, 99_000))
        fills = 1 if is_whale and n % 3 == 0 else rng.randint(2, 5)
        if fills > 1 and target / fills >= THRESHOLD:
            fills = int(target // THRESHOLD) + 1  # no single fill of a sweep is a whale alone
        per_fill = (target / fills / side_price).quantize(Decimal("0.01"))
        yes_price = f"{price:.4f}"
        specials[slot] = [
            {"ticker": ticker, "side": side, "count": f"{per_fill:.2f}", "yes_price": yes_price, "fill": k}
            for k in range(fills)
        ]
    items: list[dict[str, Any]] = []
    i = 0
    while len(items) < trades:
        for planned in specials.get(i, ()):
            fill = dict(planned)
            k = fill.pop("fill")
            items.append({**fill, "trade_id": f"{len(items):08d}-{fill['ticker']}-f{k}"})
        price = Decimal(rng.randint(2, 98)) / 100
        items.append(
            {
                "ticker": rng.choice(tickers),
                "side": rng.choice(["yes", "no"]),
                "count": f"{Decimal(rng.randint(100, 50_000)) / 100:.2f}",
                "yes_price": f"{price:.4f}",
                "trade_id": f"{len(items):08d}-n",
            }
        )
        i += 1
    return Plan(items[:trades], whales, near_misses)


# ---------------------------------------------------------------------------------------------- the daemon


@dataclass
class DaemonRun:
    process: asyncio.subprocess.Process
    stdout_path: Path
    started_at: float


def daemon_env(workdir: Path, exchange: FakeExchange) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO),
        "KALSHI_WS_URL": exchange.ws_url,
        "KALSHI_API_URL": exchange.rest_url,
        "STATS_INTERVAL_S": "10",
        "SWEEP_WINDOW_MS": str(SWEEP_WINDOW_MS),
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
    return DaemonRun(process, stdout_path, time.monotonic())


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


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Trouble:
    """What was done to the daemon, for the summary."""

    cuts: int = 0
    outage_s: float = 0.0
    outage_refused: int = 0
    kills: int = 0
    down_s: float = 0.0
    timeline: list[str] = field(default_factory=list)
    # What the exchange saw, filled in at the end.
    trades_on_tape: int = 0
    frames_sent: int = 0
    lost: int = 0
    undelivered: int = 0
    rest_requests: int = 0
    seconds: float = 0.0


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("daemon-*"):
        old.unlink()
    plan = make_plan(args.trades, args.whales, args.seed)
    rng = random.Random(args.seed + 1)
    trouble = Trouble()
    t0 = time.monotonic()

    def note(text: str) -> None:
        line = f"{time.monotonic() - t0:7.1f} s  {text}"
        trouble.timeline.append(line)
        print(line, flush=True)

    deadline = t0 + args.max_seconds
    outage_at = int(args.trades * args.outage_at)
    kill_at = int(args.trades * args.kill_at)
    with tempfile.TemporaryDirectory(prefix="valshi-soak-") as tmp:
        workdir = Path(tmp)
        async with FakeExchange(ping_interval_s=10.0) as exchange:
            runs = [await start_daemon(workdir, exchange, 1)]
            await exchange.wait_subscribed(timeout_s=30.0)
            note("daemon 1 subscribed")
            outage_until: float | None = None
            restart_at: float | None = None
            sent_at_last_cut = 0
            i = 0
            start = time.monotonic()
            while i < len(plan.items):
                if time.monotonic() > deadline:
                    raise TimeoutError("the soak ran out of time while trading")
                now = time.monotonic()
                due = min(len(plan.items), int((now - start) * args.rate) + 1)
                while i < due:
                    spec = dict(plan.items[i])
                    msg = trade_msg(
                        ticker=spec["ticker"],
                        side=spec["side"],
                        count=spec["count"],
                        yes_price=spec["yes_price"],
                        trade_id=spec["trade_id"],
                        ts_ms=wall_ms(),
                    )
                    await exchange.publish(msg, lost=rng.random() < args.loss)
                    i += 1
                    if i == outage_at:
                        exchange.refuse(503)
                        await exchange.cut()
                        outage_until = time.monotonic() + args.outage_s
                        note(f"outage starts at trade {i}: handshakes answered 503 for {args.outage_s:.0f} s")
                    if i == kill_at:
                        runs[-1].process.kill()
                        await runs[-1].process.wait()
                        restart_at = time.monotonic() + args.down_s
                        trouble.kills += 1
                        note(f"daemon {len(runs)} killed (SIGKILL) at trade {i}; down {args.down_s:.0f} s")
                    sent = len(exchange.sent_ids)
                    if exchange.connected and sent - sent_at_last_cut >= args.drop_every:
                        sent_at_last_cut = sent
                        trouble.cuts += 1
                        await exchange.cut()
                        note(f"connection cut (1006) after {sent} frames sent, trade {i}")
                if outage_until is not None and time.monotonic() >= outage_until:
                    exchange.accept()
                    trouble.outage_s = args.outage_s
                    outage_until = None
                    note("outage ends")
                if restart_at is not None and time.monotonic() >= restart_at:
                    restart_at = None
                    trouble.down_s = args.down_s
                    runs.append(await start_daemon(workdir, exchange, len(runs) + 1))
                    note(f"daemon {len(runs)} started on the same state dir")
                await asyncio.sleep(0.005)
            note(f"all {len(plan.items)} trades made")
            if outage_until is not None:
                await asyncio.sleep(max(0.0, outage_until - time.monotonic()))
                exchange.accept()
            if restart_at is not None:
                await asyncio.sleep(max(0.0, restart_at - time.monotonic()))
                trouble.down_s = args.down_s
                runs.append(await start_daemon(workdir, exchange, len(runs) + 1))
                note(f"daemon {len(runs)} started on the same state dir")
            trouble.outage_refused = sum(h.status == 503 for h in exchange.ws.handshakes)

            # Let the daemon catch up: a slow trickle of small trades keeps its stream clock moving meanwhile.
            expected = expected_alerts(exchange.tape, THRESHOLD, SWEEP_WINDOW_MS)
            wanted = {alert_key(a.trade_ids, a.value_usd) for a in expected}
            paths = [r.stdout_path for r in runs]
            trickle = 0
            settle_deadline = min(deadline, time.monotonic() + args.settle_s)
            while time.monotonic() < settle_deadline:
                if wanted <= {alert_key(e["trade_ids"], e["value_usd"]) for e in reported(paths)}:
                    break
                for _ in range(20):
                    trickle += 1
                    await exchange.publish(
                        trade_msg(ticker="KXTAIL", count="1.00", trade_id=f"tail-{trickle:06d}", ts_ms=wall_ms())
                    )
                await asyncio.sleep(1.0)
            note("every whale reported" if time.monotonic() < settle_deadline else "settle time over")
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
            note(f"daemon {len(runs)} stopped, exit code {last.returncode}")
            trouble.trades_on_tape, trouble.lost = len(exchange.tape), exchange.lost
            trouble.undelivered, trouble.frames_sent = exchange.undelivered, len(exchange.sent_ids)
            trouble.rest_requests = exchange.rest.counts["trades"]
    trouble.seconds = time.monotonic() - t0
    return summarize(args, plan, expected, [r.stdout_path for r in runs], trouble)


def summarize(
    args: argparse.Namespace, plan: Plan, expected: list[Any], paths: list[Path], trouble: Trouble
) -> dict[str, Any]:
    posts = reported(paths)
    expected_keys = Counter(alert_key(a.trade_ids, a.value_usd) for a in expected)
    reported_keys = Counter(alert_key(e["trade_ids"], e["value_usd"]) for e in posts)
    trade_owners = Counter(t for e in posts for t in e["trade_ids"])
    alerted = sum(1 for k in expected_keys if k in reported_keys)
    missed = sorted(k for k in expected_keys if k not in reported_keys)
    twice = sorted(k for k, n in reported_keys.items() if n > 1)
    shared = sorted(t for t, n in trade_owners.items() if n > 1)
    wrong = sorted(k for k in reported_keys if k not in expected_keys)
    duplicated = len(twice) + len({e["alert_id"] for e in posts if set(e["trade_ids"]) & set(shared)} - set(twice))
    all_events = [e for p in paths if p.exists() for e in read_events(p)]
    counts = Counter(e.get("event") for e in all_events)
    stops = [e for e in all_events if e.get("event") == "daemon_stopped"]
    summary = {
        "command": " ".join([".venv/bin/python bench/soak.py", *sys.argv[1:]]),
        "seconds": round(trouble.seconds, 1),
        "trades_on_tape": trouble.trades_on_tape,
        "frames_sent": trouble.frames_sent,
        "frames_lost_seq_gaps": trouble.lost,
        "trades_undelivered_while_disconnected": trouble.undelivered,
        "connection_cuts": trouble.cuts,
        "outage_s": trouble.outage_s,
        "handshakes_refused": trouble.outage_refused,
        "kills": trouble.kills,
        "down_s": trouble.down_s,
        "rest_trades_requests": trouble.rest_requests,
        "whales_on_tape": len(expected_keys),
        "whales_planted": plan.whales,
        "sweeps_on_tape": sum(1 for k in expected_keys if len(k[0]) > 1),
        "alerted": alerted,
        "missed": len(missed),
        "duplicated": duplicated,
        "wrong": len(wrong),
        "would_post_lines": len(posts),
        "seq_gaps_seen": counts.get("ws_seq_gap", 0),
        "frames_missing_seen": sum(int(e.get("missing", 0)) for e in all_events if e.get("event") == "ws_seq_gap"),
        "ws_disconnects": counts.get("ws_disconnected", 0),
        "ws_connects_refused": counts.get("ws_connect_failed", 0),
        "backfill_done": counts.get("backfill_done", 0),
        "backfill_incomplete": counts.get("backfill_incomplete", 0),
        "alerts_refused_by_outbox": counts.get("alert_overlaps_existing", 0),
        "stale_alert_skipped": counts.get("stale_alert_skipped", 0),
        "missed_whales": [[*k[0], k[1]] for k in missed][:20],
        "wrong_alerts": [[*k[0], k[1]] for k in wrong][:20],
        "timeline": trouble.timeline,
        "daemon_final_stats": stops[-1] if stops else None,
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trades", type=int, default=200_000)
    parser.add_argument("--whales", type=int, default=60)
    parser.add_argument("--rate", type=float, default=2000.0, help="trades per second")
    parser.add_argument("--drop-every", type=int, default=20_000, help="cut the connection after this many frames")
    parser.add_argument("--loss", type=float, default=0.01, help="share of frames lost (seq gaps)")
    parser.add_argument("--outage-s", type=float, default=40.0)
    parser.add_argument("--outage-at", type=float, default=0.15, help="where on the tape the outage starts (0-1)")
    parser.add_argument("--kill-at", type=float, default=0.9, help="where on the tape the daemon is killed (0-1)")
    parser.add_argument("--down-s", type=float, default=5.0, help="how long the killed daemon stays down")
    parser.add_argument("--settle-s", type=float, default=180.0, help="at most this long for the daemon to catch up")
    parser.add_argument("--quiet-s", type=float, default=5.0, help="then wait this long for late duplicates")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard bound on the whole run")
    args = parser.parse_args()
    summary = asyncio.run(soak(args))
    print(
        f"trades on tape {summary['trades_on_tape']}, frames sent {summary['frames_sent']}, "
        f"lost in seq gaps {summary['frames_lost_seq_gaps']} (daemon saw {summary['seq_gaps_seen']} gaps, "
        f"{summary['frames_missing_seen']} frames missing), made while disconnected "
        f"{summary['trades_undelivered_while_disconnected']}, connection cuts {summary['connection_cuts']}, "
        f"outage {summary['outage_s']:.0f} s ({summary['handshakes_refused']} handshakes refused), "
        f"kill -9 {summary['kills']} (down {summary['down_s']:.0f} s)"
    )
    print(
        f"whales on tape {summary['whales_on_tape']} ({summary['sweeps_on_tape']} sweeps), "
        f"alerted {summary['alerted']}, missed {summary['missed']}, duplicated {summary['duplicated']}, "
        f"wrong {summary['wrong']}  [{summary['seconds']} s; backfills {summary['backfill_done']}, "
        f"incomplete {summary['backfill_incomplete']}, refused by outbox {summary['alerts_refused_by_outbox']}]"
    )
    ok = summary["missed"] == 0 and summary["duplicated"] == 0 and summary["wrong"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
