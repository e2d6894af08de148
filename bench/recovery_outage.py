"""What the recovery planner costs a trade during a long REST outage, with many backfill windows pending.

During an outage every seq gap leaves a window that cannot be fetched, so they pile up (1,000 by default) while
trades keep flowing. The detector asks the planner on its per-trade path (`low_water_ms` when it would forget
kept sweeps, `may_close` for every sweep that closes, `version` for held ones), so each of those answers must not
grow with the number of windows. This prints the cost of each call and of a whole `WhaleDetector.add` with the
planner as its gate, in this process: pure code, no I/O, no daemon.

    .venv/bin/python bench/recovery_outage.py                        # this tree, a few seconds
    .venv/bin/python bench/recovery_outage.py --compare /tmp/base    # + another tree's valshi_x, interleaved

`--compare TREE` runs this script again with `TREE`'s `valshi_x` first on the import path (e.g. `git archive
05da02b valshi_x | tar -x -C /tmp/base`), alternating with this tree, `--runs` times each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

T0_MS = 1_800_000_000_000  # trade time origin
GAP_EVERY_MS = 3_000  # one seq gap every 3 s of the outage


def per_call_ns(call: Callable[[], object], calls: int, repeats: int = 7) -> float:
    """Median over `repeats` of the mean time per call, in ns."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter_ns() - started) / calls)
    return statistics.median(samples)


def measure(windows: int, trades: int) -> dict[str, float]:
    # Imported here: `--tree` chooses which valshi_x.
    from valshi_x.recovery.planner import RecoveryPlanner  # noqa: PLC0415
    from valshi_x.trades import Trade  # noqa: PLC0415
    from valshi_x.whales import WhaleDetector  # noqa: PLC0415

    planner = RecoveryPlanner(hold_max_ms=5_000, settle_ms=500, merge_max_ms=1_000)
    now_ms = T0_MS
    for i in range(windows):  # REST is down: every window is handed out and never comes back
        now_ms = T0_MS + i * GAP_EVERY_MS
        planner.on_gap(now_ms - 40, now_ms, now_ms)
        planner.due(now_ms + 500)
    planner.tick(now_ms + 1_000)  # the newest gap's hold still runs, the older ones' are over
    assert planner.pending == windows

    start_ms = now_ms + 1_000
    lo_ms, hi_ms = start_ms + 10_000, start_ms + 12_000  # a sweep after every window: the common answer
    result = {
        "low_water_ms": per_call_ns(planner.low_water_ms, 2_000),
        "may_close": per_call_ns(lambda: planner.may_close(lo_ms, hi_ms), 2_000),
        "version": per_call_ns(lambda: planner.version, 2_000),
    }

    # The detector at 2,000 trades/s of trade time, one fill per sweep, 300 markets: every trade closes a sweep
    # (a `may_close`), and the pinned low-water mark keeps it asking `low_water_ms` on every new trade time.
    detector = WhaleDetector(Decimal(100000), 1000, late_fill_horizon_ms=2_000, gate=planner)
    batch = [
        Trade(f"t{i}", f"KXM-{i % 300}", "0.5000", "0.5000", "10.00", "yes", False, start_ms + i // 2)
        for i in range(2 * trades)
    ]
    for trade in batch[:trades]:  # warm up: kept sweeps pile up behind the low-water mark
        detector.add(trade)
    started = time.perf_counter_ns()
    for trade in batch[trades:]:
        detector.add(trade)
    result["detector_add"] = (time.perf_counter_ns() - started) / trades
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=1_000, help="backfill windows pending")
    parser.add_argument("--trades", type=int, default=10_000, help="trades timed through the detector")
    parser.add_argument("--tree", type=Path, help="import valshi_x from this tree (used by --compare)")
    parser.add_argument("--compare", type=Path, metavar="TREE", help="also measure another tree, interleaved")
    parser.add_argument("--runs", type=int, default=3, help="runs per tree with --compare")
    parser.add_argument("--json", action="store_true", help="print one JSON object (used by --compare)")
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str((args.tree or here).resolve()))

    if args.compare is None:
        result = measure(args.windows, args.trades)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{args.windows} windows pending, ns per call (median of 7):")
            for name, ns in result.items():
                print(f"  {name:<14} {ns:>10,.0f} ns")
        return 0

    trees = {"compare": args.compare.resolve(), "this tree": here}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            command = [sys.executable, __file__, "--json", "--tree", str(tree), "--windows", str(args.windows)]
            out = subprocess.run([*command, "--trades", str(args.trades)], check=True, capture_output=True)
            runs[name].append(json.loads(out.stdout))
    print(f"{args.windows} windows pending, ns per call, {args.runs} interleaved runs per tree (min / median / max):")
    for key in runs["this tree"][0]:
        for name in trees:
            values = sorted(r[key] for r in runs[name])
            low, mid, high = values[0], statistics.median(values), values[-1]
            print(f"  {key:<14} {name:<10} {low:>10,.0f} {mid:>10,.0f} {high:>10,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
