"""Settings: defaults, one line per bad key, exit code 78 before anything connects, .env.example in sync."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from dotenv import dotenv_values

from tests.test_text import SWEEP
from valshi_x.config import (
    AFTER_CONTINUED_COMMENT,
    EXPORT,
    INTERPOLATION,
    KALSHI_WS_URL,
    SETTINGS,
    UNQUOTED_BACKSLASH,
    Settings,
    env_file_differences,
    load_settings,
    readable_by_others,
    secret_files,
)
from valshi_x.errors import ConfigError
from valshi_x.x.text import render_post

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


# ---------------------------------------------------------------------------------------------- the env file
# systemd reads /etc/valshi-x/valshi-x.env (EnvironmentFile=), python-dotenv reads the same file by hand and in
# `check --env-file`. Each case: lines of an env file, and the value systemd 252 (Debian 12) handed a service for
# its key; recorded by booting systemd in a container (see the README's walk), since CI has no booted systemd.
# None: systemd dropped the line.
SYSTEMD_252_READS: tuple[tuple[str, str, str | None], ...] = (
    ("UNQ=a\\nb", "UNQ", "anb"),
    ('DQ="a\\nb"', "DQ", "a\\nb"),
    ("SQ='a\\nb'", "SQ", "a\\nb"),
    ("UNQ_BS=a\\\\nb", "UNQ_BS", "a\\nb"),
    ('DQ_BS="a\\\\nb"', "DQ_BS", "a\\nb"),
    ('DQ_TAB="a\\tb"', "DQ_TAB", "a\\tb"),
    ('DQ_DOLLAR="x ${HOME} \\$y"', "DQ_DOLLAR", "x ${HOME} $y"),
    ("UNQ_DOLLAR=x ${HOME} $y", "UNQ_DOLLAR", "x ${HOME} $y"),
    ("SQ_DOLLAR='x ${HOME}'", "SQ_DOLLAR", "x ${HOME}"),
    ('DQ_APOS="it\'s \\"q\\""', "DQ_APOS", 'it\'s "q"'),
    ("UNQ_HASH=a #b", "UNQ_HASH", "a #b"),
    ("UNQ_ONLY_HASH=  # note", "UNQ_ONLY_HASH", "# note"),
    ('DQ_REALNL="a\nb"', "DQ_REALNL", "a\nb"),
    ("UNQ_SP=  a b  ", "UNQ_SP", "a b"),
    ("TPL={value} on {side}\\n{title} · {time}", "TPL", "{value} on {side}n{title} · {time}"),
    ('TPLDQ="{value} on {side}\\n{title} · {time}"', "TPLDQ", "{value} on {side}\\n{title} · {time}"),
    ("TPLSQ='{value} on {side}\\n{title} · {time}'", "TPLSQ", "{value} on {side}\\n{title} · {time}"),
    ("export UNQ_EXP=1", "UNQ_EXP", None),
    ("UNQ_SPEQ = 2", "UNQ_SPEQ", "2"),
    ("SQ_BS='a\\\\b'", "SQ_BS", "a\\\\b"),
    ('DQ_SQESC="a\\\'b"', "DQ_SQESC", "a\\'b"),
    ('DQ_BSDOLLAR="a\\$b \\`c"', "DQ_BSDOLLAR", "a$b `c"),
    ('DQ_AFTER="abc" # note', "DQ_AFTER", "abc# note"),
    ("UNQ_TRAIL=abc   ", "UNQ_TRAIL", "abc"),
    ("UNQ_PLAIN=100000", "UNQ_PLAIN", "100000"),
    (f"UNQ_URL={KALSHI_WS_URL}", "UNQ_URL", KALSHI_WS_URL),
    ("UNQ_EMPTY=", "UNQ_EMPTY", ""),
    (
        'DQ_PEM="-----BEGIN PRIVATE KEY-----\\nMC4C\\n-----END PRIVATE KEY-----"',
        "DQ_PEM",
        "-----BEGIN PRIVATE KEY-----\\nMC4C\\n-----END PRIVATE KEY-----",
    ),
    ("UNQ_CASHTAG=$KX {value} {time}", "UNQ_CASHTAG", "$KX {value} {time}"),
    ('DQ_CASHTAG="{value} $ {time}"', "DQ_CASHTAG", "{value} $ {time}"),
    ("UNQ_CONT=a\\\nb", "UNQ_CONT", "ab"),
    # Not booted: read from env-file.c of v252, whose comment state lets a backslash escape the line break (v254
    # ends the comment there). python-dotenv reads the line after it.
    ("# a note \\\nAFTER_CONT_COMMENT=1", "AFTER_CONT_COMMENT", None),
    ("# two pairs \\\\\nAFTER_EVEN_COMMENT=1", "AFTER_EVEN_COMMENT", "1"),
)


def as_read(value: str | None) -> str | None:
    """A value as the settings that may hold a line break use it: a literal \\n is one (see x/text.py, auth.py)."""
    return None if value is None else value.replace("\\n", "\n")


def test_the_env_file_forms_systemd_and_dotenv_read_differently_are_exactly_those_named(tmp_path: Path) -> None:
    env_file = tmp_path / "valshi-x.env"
    env_file.write_text("".join(lines + "\n" for lines, _, _ in SYSTEMD_252_READS))
    dotenv = dotenv_values(env_file)  # the real parser, as `python -m valshi_x` and `check` use it
    named: dict[str, list[str]] = {}
    lines = env_file.read_text().splitlines()
    for line_no, key, why in env_file_differences(env_file.read_text()):
        assert key in lines[line_no - 1]
        named.setdefault(key, []).append(why)
    differ = {key for _, key, systemd in SYSTEMD_252_READS if as_read(systemd) != as_read(dotenv.get(key))}
    assert set(named) == differ
    assert named["TPL"] == [UNQUOTED_BACKSLASH]  # the README's old advice: \n in an unquoted POST_TEMPLATE
    assert named["UNQ_EXP"] == [EXPORT]


def test_a_comment_ending_in_a_backslash_hides_the_next_line_from_systemd_before_254() -> None:
    # Under v252 a lost line that itself ends in an odd run of backslashes hides the one after it too; a pair of
    # backslashes ends the comment at its line break, and an empty line ends it as well.
    text = "# a\\\nLOST=1\\\nALSO_LOST=2\nREAD=3\n# two\\\\\nREAD_TOO=4\n;three \\\n\nREAD_AS_WELL=5\n"
    hidden = [(line_no, key) for line_no, key, why in env_file_differences(text) if why == AFTER_CONTINUED_COMMENT]
    assert hidden == [(2, "LOST"), (3, "ALSO_LOST")]


def test_unclosed_interpolations_are_read_in_linear_time() -> None:
    # 50,000 "${" without a "}" took the old pattern 11.8 s (quadratic); a generous bound, not a benchmark.
    started = time.perf_counter()
    assert env_file_differences("A=" + "${" * 50_000 + "\n") == []
    assert time.perf_counter() - started < 2.0
    assert [why for _, _, why in env_file_differences("A=${${x}\n")] == [INTERPOLATION]


def test_a_post_template_in_double_quotes_posts_the_same_under_systemd_and_by_hand(tmp_path: Path) -> None:
    cases = {key: systemd for _, key, systemd in SYSTEMD_252_READS if key.startswith("TPL")}
    env_file = tmp_path / "valshi-x.env"
    env_file.write_text("".join(lines + "\n" for lines, key, _ in SYSTEMD_252_READS if key in cases))
    dotenv = dotenv_values(env_file)

    def post(template: str | None) -> str:
        assert template is not None
        settings = load_settings({"POST_TEMPLATE": template}, need_x=False)
        return render_post(SWEEP, title="T", template=settings.post_template)

    for key in ("TPLDQ", "TPLSQ"):
        assert post(cases[key]) == post(dotenv[key])
        assert post(cases[key]).splitlines()[1] == "T · 14:03:27 UTC"
    assert post(cases["TPL"]) != post(dotenv["TPL"])  # unquoted: systemd ate the backslash, one line "…YESnT…"


def test_the_documented_env_files_read_the_same_under_systemd_and_dotenv() -> None:
    assert env_file_differences((ROOT / ".env.example").read_text()) == []
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"^POST_TEMPLATE=.*$", readme, flags=re.MULTILINE)
    assert examples and any("\\n" in line for line in examples)
    assert env_file_differences("\n".join(examples)) == []


# ---------------------------------------------------------------------------------------------- file modes


def test_a_key_in_the_credentials_directory_is_systemds_copy_and_not_judged_by_its_mode(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials" / "valshi-x.service"
    credentials.mkdir(parents=True)
    handed_over = credentials / "kalshi.pem"
    own = tmp_path / "kalshi.pem"
    env_file = tmp_path / ".env"
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert secret_files(handed_over, env_file, env) == (env_file,)
    assert secret_files(own, env_file, env) == (own, env_file)
    assert secret_files(handed_over, env_file, {}) == (handed_over, env_file)
    assert secret_files(None, env_file, env) == (env_file,)
    # Only a file directly in the directory is systemd's: not one reached through `..`, nor one below it.
    outside = credentials / ".." / ".." / "kalshi.pem"
    assert secret_files(outside, env_file, env) == (outside, env_file)
    below = credentials / "sub" / "kalshi.pem"
    assert secret_files(below, env_file, env) == (below, env_file)
    # A CREDENTIALS_DIRECTORY that cannot be systemd's (the root, a relative path) excuses nothing.
    assert secret_files(own, env_file, {"CREDENTIALS_DIRECTORY": "/"}) == (own, env_file)
    relative_key = Path("credentials/valshi-x.service/kalshi.pem")
    relative = {"CREDENTIALS_DIRECTORY": "credentials/valshi-x.service"}
    assert secret_files(relative_key, env_file, relative) == (relative_key, env_file)
    # The same directory named through a symlink is still systemd's.
    link = tmp_path / "link"
    link.symlink_to(credentials)
    assert secret_files(link / "kalshi.pem", env_file, env) == (env_file,)


def test_no_warning_at_start_for_the_key_systemd_hands_over(tmp_path: Path) -> None:
    # systemd 257 (Debian 13) hands the key over as root:root 0440, the group bits being the mask of an ACL that
    # grants only the service's user (booted and seen; 252 makes it 0400): no warning on every start for that.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    key = credentials / "kalshi.pem"
    key.write_text("not read by a replay\n")
    key.chmod(0o440)
    capture = tmp_path / "empty.jsonl"
    capture.write_text("")
    base = clean_env(KALSHI_API_KEY_ID="id", KALSHI_PRIVATE_KEY_PATH=str(key), PYTHONPATH=str(ROOT))
    args = ("--replay", str(capture), "--log-format", "json")

    under_systemd = run_cli(*args, env=base | {"CREDENTIALS_DIRECTORY": str(credentials)}, cwd=tmp_path)
    by_hand = run_cli(*args, env=base, cwd=tmp_path)
    assert (under_systemd.returncode, by_hand.returncode) == (0, 0)
    assert "secret_file_readable" not in under_systemd.stdout + under_systemd.stderr
    assert "secret_file_readable" in by_hand.stdout + by_hand.stderr  # the same file as an operator's own key


def test_only_a_regular_files_permission_bits_are_judged(tmp_path: Path) -> None:
    # /dev/zero is 0666: a hint to `chmod 600 /dev/zero` would be wrong advice (and a default ./.env that is a
    # device is refused outright now, see test_cli).
    shared = tmp_path / "valshi-x.env"
    shared.write_text("A=1\n")
    shared.chmod(0o644)
    link = tmp_path / "zero.env"
    link.symlink_to("/dev/zero")
    assert readable_by_others([shared, link, Path("/dev/zero"), tmp_path]) == [(shared, 0o644)]
