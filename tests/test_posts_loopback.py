"""The demo replayed with `--lookup-titles` against the loopback Kalshi REST (tests/fake_kalshi_rest.py).

The title, the category (its marker), the close time and the 24 h volume all come from the event/market
answers the title lookup fetches anyway: the run makes exactly the requests it made before these fields were
read (one per event, one market request for a combo), and no more.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.fake_kalshi_rest import FakeKalshiRest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "sample.jsonl"
EXPECTED = REPO / "examples" / "sample.expected.json"
REPLAY_TIMEOUT_S = 120.0

# Events of the sample's whales: (event ticker, title, series, category, the market's yes_sub_title).
EVENTS = {
    "KXNFLGAME-26SEP13CHIJAC": ("Chicago at Jacksonville Winner?", "KXNFLGAME", "Sports"),
    "KXNFLTOTAL-26SEP13MIAATL": ("Miami at Atlanta: Total Points", "KXNFLTOTAL", "Sports"),
    "KXNFLSPREAD-26SEP13LVNYJ": ("Las Vegas at New York J: Spread", "KXNFLSPREAD", "Sports"),
    "KXNFLTOTAL-26SEP13CARARI": ("Carolina at Arizona: Total Points", "KXNFLTOTAL", "Sports"),
    "KXHIGHNY-26SEP13": ("Highest temperature in NYC on Sep 13, 2026?", "KXHIGHNY", "Climate and Weather"),
    "KXHIGHHOU-26SEP13": ("Highest temperature in Houston on Sep 13, 2026?", "KXHIGHHOU", "Climate and Weather"),
    "KXNFLGAME-26SEP13MIAATL": ("Miami at Atlanta Winner?", "KXNFLGAME", "Sports"),
    "KXHIGHDEN-26SEP13": ("Highest temperature in Denver on Sep 13, 2026?", "KXHIGHDEN", "Climate and Weather"),
    "KXFEDDECISION-26SEP": ("Fed decision in Sep 2026?", "KXFEDDECISION", "Economics"),
}
COMBO = "KXMVENFLMULTIGAMEEXTENDED-S202603C650D9E7-A8A6A218E79"


def _env(home: Path, api_url: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO),
        "KALSHI_API_URL": api_url,
    }


def _populate(fake: FakeKalshiRest) -> list[str]:
    manifest: dict[str, Any] = json.loads(EXPECTED.read_text(encoding="utf-8"))
    tickers = sorted({alert["ticker"] for alert in manifest["alerts"]})
    for event, (title, series, category) in EVENTS.items():
        fake.add_event(event, title, series_ticker=series, category=category)
    for ticker in tickers:
        if ticker == COMBO:
            fake.add_market(
                ticker,
                "KXMVENFLMULTIGAMEEXTENDED-S202603C650D9E7",
                yes_sub_title="yes Chicago,yes Miami,yes Kansas City",
                close_time="2026-09-28T04:00:00Z",
                volume_24h_fp="500000.00",
            )
            continue
        event = ticker.rpartition("-")[0]
        assert event in EVENTS, ticker
        fake.add_market(
            ticker,
            event,
            yes_sub_title=ticker.rpartition("-")[2],
            close_time="2026-09-27T17:00:00Z",
            expected_expiration_time="2026-09-13T20:30:00Z",
            volume_24h_fp="1000000.00",
            volume_24h=999,  # the deprecated integer: the fixed-point field wins
        )
    return tickers


async def _replay(tmp_path: Path, api_url: str) -> list[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "valshi_x",
        "--dry-run",
        "--replay",
        str(SAMPLE),
        "--lookup-titles",
        "--log-format",
        "json",
        cwd=tmp_path,
        env=_env(tmp_path, api_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(REPLAY_TIMEOUT_S):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()[-2000:]
    return [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]


async def test_replay_with_titles_shows_the_new_layout_from_the_loopback_rest(tmp_path: Path) -> None:
    async with FakeKalshiRest() as fake:
        tickers = _populate(fake)
        events = await _replay(tmp_path, fake.base_url)
    posts = {e["ticker"]: e["text"] for e in events if e["event"] == "would_post"}
    assert sorted(posts) == tickers
    assert posts["KXNFLGAME-26SEP13CHIJAC-CHI"] == (
        "🏈 Chicago at Jacksonville Winner?\n"
        "🐋 $196,600.62 on NO at 46.4¢ · 7 fills\n"
        # The sweep is the first trade of this market in the demo: the fills' range, not a move.
        "NO 45¢\u201349¢ in 7 fills · now 51% YES\n"
        "Pays $423,927 if NO wins · 42% of 24h volume\n"
        "Outcome expected Sep 13, 20:30 UTC"
    )
    for ticker, text in posts.items():
        assert ticker not in text  # a ticker is never the headline, nor anywhere else by default
        if ticker != COMBO:
            assert "24h volume" in text and "Outcome expected Sep 13, 20:30 UTC" in text, text
    assert posts[COMBO].startswith("Combo: yes Chicago, yes Miami, yes Kansas City\n")
    assert posts[COMBO].endswith("Closes Sep 28, 04:00 UTC")
    assert posts["KXHIGHNY-26SEP13-B84.5"].startswith("🌡️ Highest temperature in NYC")
    assert posts["KXFEDDECISION-26SEP-C25"].startswith("🏦 Fed decision in Sep 2026?")
    # The same requests as before the context was read from them (docs/posting-notes-text.md compares the two
    # trees): no path asked twice; for the whales, one event each, a combo's market alone. The others are the
    # prefetches of sweeps that reached half the threshold, as before; how many of those run depends on timing.
    paths = [r.path.removeprefix("/trade-api/v2") for r in fake.requests]
    assert len(paths) == len(set(paths)), paths
    for_whales = {f"/events/{event}" for event in EVENTS} | {f"/markets/{COMBO}"}
    assert for_whales <= set(paths)
    # A market whose event answered is never asked about on its own (the event lists it).
    alone = [p for p in paths if p.startswith("/markets/") and p.removeprefix("/markets/").rpartition("-")[0] in EVENTS]
    assert alone == [], paths
