"""Settings: defaults, one line per bad key, exit code 78 before anything connects, .env.example in sync."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from valshi_x.config import KALSHI_WS_URL, SETTINGS, Settings, load_settings
from valshi_x.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
X_KEYS = {
    "X_API_KEY": "k" * 25,
    "X_API_SECRET": "s" * 50,
    "X_ACCESS_TOKEN": "t" * 50,
    "X_ACCESS_TOKEN_SECRET": "u" * 45,
}


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment minus every valshi-x key, so a developer's own .env cannot leak in."""
    keys = {spec.key for spec in SETTINGS}
    return {k: v for k, v in os.environ.items() if k not in keys} | extra


def test_defaults() -> None:
    settings = load_settings({}, need_x=False)
    assert settings.whale_threshold_dollars == Decimal(100000)
    assert settings.sweep_window_ms == 1000
    assert settings.kalshi_ws_url == KALSHI_WS_URL
    assert settings == Settings()


def test_every_bad_key_is_reported_at_once() -> None:
    env = {"WHALE_THRESHOLD_DOLLARS": "lots", "SWEEP_WINDOW_MS": "-5", "KALSHI_WS_URL": "http://x", "POST_LINKS": "sí"}
    with pytest.raises(ConfigError) as caught:
        load_settings(env, need_x=True)
    keys = [problem.split(":")[0] for problem in caught.value.problems]
    assert keys == [
        "WHALE_THRESHOLD_DOLLARS",
        "SWEEP_WINDOW_MS",
        "KALSHI_WS_URL",
        "POST_LINKS",
        *X_KEYS,
    ]


def test_x_keys_are_needed_only_to_post() -> None:
    assert load_settings(X_KEYS, need_x=True).x_api_key == X_KEYS["X_API_KEY"]
    assert load_settings({}, need_x=False).x_api_key == ""


def test_key_id_and_key_go_together() -> None:
    with pytest.raises(ConfigError, match="KALSHI_PRIVATE_KEY_PATH: required"):
        load_settings({"KALSHI_API_KEY_ID": "abc"}, need_x=False)
    with pytest.raises(ConfigError, match="KALSHI_API_KEY_ID: required"):
        load_settings({"KALSHI_PRIVATE_KEY_PATH": "/k.pem"}, need_x=False)


def test_secrets_stay_out_of_repr() -> None:
    settings = load_settings(X_KEYS | {"KALSHI_API_KEY_ID": "id", "KALSHI_PRIVATE_KEY": "PEMDATA-xyz"}, need_x=True)
    text = repr(settings)
    assert all(secret not in text for secret in settings.secrets)
    assert len(settings.secrets) == 5


def test_env_example_lists_every_setting_with_its_default() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    assignments = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    # The keys deploy/valshi-x.service sets stay commented out (an env file's value would win over the unit's).
    commented = dict(line[1:].split("=", 1) for line in lines if re.fullmatch(r"#[A-Z][A-Z0-9_]*=.*", line))
    assert set(commented) == {"KALSHI_PRIVATE_KEY_PATH", "KALSHI_PRIVATE_KEY", "STATE_DIR"}
    assert assignments | commented == {spec.key: spec.default for spec in SETTINGS}


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [spec.key for spec in SETTINGS if f"`{spec.key}`" not in readme] == []


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "valshi_x", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_bad_configuration_exits_78_with_one_line_per_key(tmp_path: Path) -> None:
    env = clean_env(WHALE_THRESHOLD_DOLLARS="0", SWEEP_WINDOW_MS="soon", PYTHONPATH=str(ROOT))
    done = run_cli(env=env, cwd=tmp_path)  # not a dry run: the X keys are missing too
    assert done.returncode == 78
    lines = done.stderr.strip().splitlines()
    assert [line.split(": ")[2] for line in lines] == [
        "WHALE_THRESHOLD_DOLLARS",
        "SWEEP_WINDOW_MS",
        *X_KEYS,
    ]
    assert done.stdout == ""  # nothing started, nothing connected


def test_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("SWEEP_WINDOW_MS=oops\nWHALE_THRESHOLD_DOLLARS=-1\n")
    env = clean_env(WHALE_THRESHOLD_DOLLARS="5", PYTHONPATH=str(ROOT))
    done = run_cli("--dry-run", "--env-file", str(env_file), env=env, cwd=tmp_path)
    assert done.returncode == 78
    assert done.stderr.strip().splitlines() == [
        "valshi-x: configuration error: SWEEP_WINDOW_MS: must be a whole number, got 'oops'"
    ]


def test_missing_key_file_exits_78(tmp_path: Path) -> None:
    env = clean_env(KALSHI_API_KEY_ID="abc", KALSHI_PRIVATE_KEY_PATH=str(tmp_path / "nope.pem"), PYTHONPATH=str(ROOT))
    done = run_cli("--dry-run", env=env, cwd=tmp_path)
    assert done.returncode == 78
    assert done.stderr.startswith("valshi-x: configuration error: KALSHI_PRIVATE_KEY_PATH: ")
