"""Detector memory at the live profile: do the count caps hold RSS flat at 2,000 trades/s? (issue 11, item 5)

Feeds a `WhaleDetector` built like a live run's (closed sweeps kept 120 s, ids kept 35 minutes, the default count
caps) with generated trades at 2,000 trades/s for 10 minutes of trade time, in this process, and prints peak RSS
(ru_maxrss), held ids and kept fills as it goes. No I/O, no daemon: this is the detector's share of the live
budget (150 MB); `bench/live_latency.py` measures the whole daemon.

    .venv/bin/python bench/detector_memory.py                 # about a minute on 2 cores
    .venv/bin/python bench/detector_memory.py --rate 2000 --seconds 600
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import uuid
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from valshi_x.trades import Trade
from valshi_x.whales import WhaleDetector

T0_MS = 1_793_000_000_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=2000, help="trades per second of trade time")
    parser.add_argument("--seconds", type=int, default=600, help="seconds of trade time")
    parser.add_argument("--markets", type=int, default=3000)
    args = parser.parse_args(argv)

    detector = WhaleDetector(Decimal(100000), 1000, dedup_horizon_ms=2_100_000, late_fill_horizon_ms=120_000)
    rng = random.Random(1)
    tickers = [f"KXMARKET-26DEC{i:04d}-T{i}" for i in range(args.markets)]
    total = args.rate * args.seconds
    report_every = max(total // 6, 1)
    print(f"before: peak RSS {peak_rss_mb():.1f} MB")
    for i in range(total):
        detector.add(
            Trade(
                str(uuid.UUID(int=rng.getrandbits(128))),
                rng.choice(tickers),
                f"0.{rng.randint(1, 9999):04d}",
                "0.5000",
                f"{rng.randint(1, 500)}.00",
                "yes" if rng.random() < 0.5 else "no",
                False,
                T0_MS + i * 1000 // args.rate,
            )
        )
        if (i + 1) % report_every == 0:
            print(
                f"{i + 1:>10,} trades ({(i + 1) // args.rate:>4} s): peak RSS {peak_rss_mb():.1f} MB, "
                f"ids {len(detector.seen):,}, kept fills {detector.kept_trades:,}, "
                f"kept sweeps forgotten early {detector.kept_forgotten_early:,}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
