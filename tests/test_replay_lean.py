"""A replay is lean: it loads none of the live side's libraries (issue 11, item 4).

Run in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PROBE = """
import sys
from valshi_x.__main__ import main
code = main(["--replay", sys.argv[1], "--log-format", "json"])
heavy = {"aiohttp", "tweepy", "websockets", "cryptography", "requests"}
loaded = sorted(
    name for name in sys.modules
    if name.split(".")[0] in heavy or name in {"valshi_x.check", "valshi_x.kalshi.stream", "valshi_x.kalshi.auth"}
)
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
"""


def test_a_replay_loads_no_network_x_or_crypto_library(tmp_path: Path) -> None:
    capture = tmp_path / "capture.jsonl"
    trade = {
        "trade_id": "t1",
        "market_ticker": "KXBTC-26DEC31-T100000",
        "yes_price_dollars": "0.5000",
        "no_price_dollars": "0.5000",
        "count_fp": "200000.00",
        "taker_outcome_side": "yes",
        "is_block_trade": False,
        "ts_ms": 1_793_000_000_000,
    }
    capture.write_text(json.dumps({"type": "trade", "sid": 1, "seq": 1, "msg": trade}) + "\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + _PROBE, str(capture)],
        cwd=tmp_path,
        env={"PATH": "", "HOME": str(tmp_path), "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": []}
    assert '"event": "would_post"' in done.stdout  # the whale was still found and shown
