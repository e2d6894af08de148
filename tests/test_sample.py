"""The bundled sample capture: replayed through the real command line, it yields exactly the alerts it was built with.

`examples/sample.jsonl` and its manifest `examples/sample.expected.json` come from `bench/gen_capture.py` with a
fixed seed. The manifest is computed by the generator from what it planted, not by the code under test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample.jsonl"
EXPECTED = REPO / "examples" / "sample.expected.json"
GENERATOR = REPO / "bench" / "gen_capture.py"
REPLAY_TIMEOUT_S = 40


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_capture", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _clean_env(home: Path) -> dict[str, str]:
    """Only what a Python process needs: no Kalshi or X keys, no settings from the developer's shell."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)}
    return env


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(EXPECTED.read_text(encoding="utf-8"))
    return manifest


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """One dry-run replay of the sample, run from an empty directory (no .env to pick up)."""
    workdir = tmp_path_factory.mktemp("replay")
    result = subprocess.run(
        [sys.executable, "-m", "valshi_x", "--dry-run", "--replay", str(SAMPLE), "--log-format", "json"],
        cwd=workdir,
        env=_clean_env(workdir),
        capture_output=True,
        text=True,
        timeout=REPLAY_TIMEOUT_S,
        check=False,
    )
    events = []
    for line in result.stdout.splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"stdout line is not JSON: {line[:200]!r}")
    return result, events


def _events(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_replay_exits_zero_without_errors(
    replay: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]],
) -> None:
    result, events = replay
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""
    assert events, "the replay logged nothing"
    errors = [e for e in events if e.get("level") in {"error", "critical", "exception"}]
    assert errors == []


def test_would_post_alerts_are_exactly_the_planted_whales(
    replay: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]], expected: dict[str, Any]
) -> None:
    _, events = replay
    posted = _events(events, "would_post")
    by_id = {alert["alert_id"]: alert for alert in posted}
    assert len(by_id) == len(posted), "an alert was logged twice"
    wanted = {alert["alert_id"]: alert for alert in expected["alerts"]}
    missing = [f"{a['case']} {a['ticker']} {a['value_usd']}" for i, a in wanted.items() if i not in by_id]
    extra = [
        f"{a['ticker']} {a['side']} {a['value_usd']} {a['trade_ids']}" for i, a in by_id.items() if i not in wanted
    ]
    assert (missing, extra) == ([], [])

    for alert_id, want in wanted.items():
        got = by_id[alert_id]
        case = want["case"]
        assert got["trade_ids"] == want["trade_ids"], case
        assert (got["ticker"], got["side"], got["fills"]) == (want["ticker"], want["side"], want["fills"]), case
        assert got["value_usd"] == want["value_usd"], case
        assert got["is_block_trade"] is want["is_block_trade"], case
        for key in ("contracts", "price_low", "price_high"):
            assert Decimal(got[key]) == Decimal(want[key]), (case, key)
        assert _when(got["created_time"]) == _when(want["created_time"]), case
        assert isinstance(got["text"], str) and got["text"].strip(), case


def test_near_misses_and_duplicates_stay_silent(
    replay: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]], expected: dict[str, Any]
) -> None:
    _, events = replay
    posted_ids = Counter(trade_id for e in _events(events, "would_post") for trade_id in e["trade_ids"])
    assert [i for i, n in posted_ids.items() if n > 1] == [], "a trade was counted in two alerts"
    for entry in expected["must_not_alert"]:
        assert not posted_ids.keys() & set(entry["trade_ids"]), f"{entry['case']}: {entry['why']}"


def test_each_malformed_frame_gets_one_warning_naming_its_reason(
    replay: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]], expected: dict[str, Any]
) -> None:
    _, events = replay
    warnings = _events(events, "malformed_frame")
    assert all(w.get("level") == "warning" for w in warnings)
    assert Counter(w.get("reason") for w in warnings) == Counter(expected["malformed"]["reasons"])
    assert len(warnings) == expected["malformed"]["count"]


def test_summary_counts_the_whole_sample(
    replay: tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]], expected: dict[str, Any]
) -> None:
    _, events = replay
    summary = _events(events, "daemon_stopped")
    assert len(summary) == 1
    assert events[-1] is summary[0], "the summary is the last line"
    counts = summary[0]
    assert counts["frames"] == expected["frames"]
    assert counts["malformed"] == expected["malformed"]["count"]
    assert counts["duplicates"] == expected["duplicates"]
    assert counts["alerts"] == len(expected["alerts"])
    # A replay is a dry run: its stop line says what it would have posted, never that anything was posted.
    assert counts["would_have_posted"] == len(expected["alerts"])
    assert "posted" not in counts


def test_sample_through_the_pure_core(expected: dict[str, Any]) -> None:
    """The same expectations hold for the normalizer and detector alone, without the daemon around them."""
    from valshi_x.trades import MalformedTrade, parse_frame, trade_from_frame
    from valshi_x.whales import WhaleDetector, alert_log_fields

    settings = expected["settings"]
    detector = WhaleDetector(Decimal(settings["WHALE_THRESHOLD_DOLLARS"]), int(settings["SWEEP_WINDOW_MS"]))
    alerts, reasons = [], Counter[str]()
    with SAMPLE.open("rb") as capture:
        for line in capture:
            try:
                frame = parse_frame(line)
                if frame.get("type") != "trade":
                    continue
                trade = trade_from_frame(frame)
            except MalformedTrade as exc:
                reasons[exc.reason] += 1
                continue
            alerts.extend(detector.add(trade))
    alerts.extend(detector.flush())

    got = {a.alert_id: alert_log_fields(a) for a in alerts}
    want = {a["alert_id"]: a for a in expected["alerts"]}
    assert got.keys() == want.keys()
    for alert_id, alert in want.items():
        assert got[alert_id]["trade_ids"] == alert["trade_ids"], alert["case"]
        assert got[alert_id]["value_usd"] == alert["value_usd"], alert["case"]
    assert reasons == Counter(expected["malformed"]["reasons"])
    assert detector.duplicates == expected["duplicates"]


def test_the_sample_is_what_the_generator_makes(expected: dict[str, Any]) -> None:
    """The bundled files are reproducible from the generator's recorded spec: nobody edited them by hand."""
    gen = _generator()
    recorded = expected["spec"]
    spec = gen.CaptureSpec(
        frames=recorded["frames"],
        seed=recorded["seed"],
        whales=recorded["whales"],
        malformed_sets=recorded["malformed_sets"],
        rate_per_s=recorded["rate_per_s"],
        bursts=recorded["bursts"],
        start_ms=recorded["start_ms"],
        threshold_usd=Decimal(expected["settings"]["WHALE_THRESHOLD_DOLLARS"]),
        sweep_window_ms=expected["settings"]["SWEEP_WINDOW_MS"],
        edge_cases=recorded["edge_cases"],
    )
    generator = gen.CaptureGenerator(spec)
    lines = [line for _, line, _ in generator.frames()]
    assert "\n".join(lines) + "\n" == SAMPLE.read_text(encoding="utf-8")
    assert generator.manifest(SAMPLE.name) == expected


def test_generator_is_deterministic_for_a_seed() -> None:
    gen = _generator()

    def run(seed: int) -> tuple[list[str], dict[str, Any]]:
        generator = gen.CaptureGenerator(gen.CaptureSpec(frames=3000, seed=seed, whales=2))
        lines = [line for _, line, _ in generator.frames()]
        return lines, generator.manifest("capture.jsonl")

    first, again, other = run(5), run(5), run(6)
    assert first == again
    assert first[0] != other[0] or first[1] != other[1]
    assert len(first[0]) == 3000
    cases = Counter(alert["case"] for alert in first[1]["alerts"])
    assert cases["exact_threshold"] == cases["block_trade"] == cases["legacy_integer_frame"] == 1


def test_background_trades_cannot_add_up_to_a_whale() -> None:
    """Within any span a sweep could cover, one ticker and side never holds more than the background cap."""
    gen = _generator()
    generator = gen.CaptureGenerator(gen.CaptureSpec(frames=30_000, seed=11, whales=0, edge_cases=False))
    assert all(s.malformed for s in generator.scenarios)  # nothing planted but the malformed catalog
    span_ms = 2 * generator.spec.sweep_window_ms + 1000
    windows: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for fill in generator._background():
        assert fill.value_e6 <= gen.BACKGROUND_TRADE_CAP_USD * 10**6
        held = windows.setdefault((fill.ticker, fill.side), [])
        held.append((fill.effective_ts_ms, fill.value_e6))
        recent = [v for t, v in held if t >= fill.effective_ts_ms - span_ms]
        assert sum(recent) <= gen.BACKGROUND_KEY_CAP_USD * 10**6
