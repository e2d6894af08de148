"""deploy/valshi-x.service: consistent with the program, clean under `systemd-analyze`, and a sandbox Python runs in.

`systemd-analyze verify` insists that ExecStart exists and is executable, so the unit is copied to a temporary
directory with ExecStart pointed at a stub script; nothing else changes. Both systemd-analyze checks are skipped
only when the tool is missing (the CI script installs Debian's `systemd` package so they always run there).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from valshi_x.config import SETTINGS, load_settings
from valshi_x.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
UNIT_PATH = ROOT / "deploy" / "valshi-x.service"
MAX_EXPOSURE = 1.5
EX_CONFIG = 78  # sysexits.h; __main__ exits with it on a configuration error

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd); CI installs it"
)


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of the unit, values in file order (keys are unique across its sections)."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def one(settings: dict[str, list[str]], key: str) -> str:
    (value,) = settings[key]
    return value


def environment(settings: dict[str, list[str]]) -> dict[str, str]:
    return dict(value.split("=", 1) for value in settings["Environment"])


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return unit_settings(UNIT_PATH.read_text())


def _default(key: str) -> float:
    (spec,) = [spec for spec in SETTINGS if spec.key == key]
    return float(spec.default)


# --- the unit agrees with the program ------------------------------------------------------------------------


def test_start_restart_and_exit_code_policy(unit: dict[str, list[str]]) -> None:
    assert one(unit, "Type") == "notify"
    assert one(unit, "Restart") == "on-failure"
    assert str(EX_CONFIG) in one(unit, "RestartPreventExitStatus").split()
    assert int(one(unit, "RestartSec")) >= 5
    # A crash loop (a start every RestartSec) reaches the burst inside the interval and stops ...
    burst, interval_s = int(one(unit, "StartLimitBurst")), int(one(unit, "StartLimitIntervalSec"))
    assert burst * int(one(unit, "RestartSec")) < interval_s
    # ... while a watchdog kill, which takes a whole WatchdogSec per round, never does.
    assert burst * int(one(unit, "WatchdogSec")) > interval_s


def test_watchdog_and_stop_timeouts_fit_the_daemons_own_budgets(unit: dict[str, list[str]]) -> None:
    watchdog_s = int(one(unit, "WatchdogSec"))
    # A silent socket is noticed and reconnected by the daemon itself before systemd steps in.
    assert watchdog_s > _default("WS_IDLE_TIMEOUT_S")
    # The drain (in-flight post) plus closing sockets fits well inside the stop timeout.
    assert int(one(unit, "TimeoutStopSec")) >= 2 * _default("SHUTDOWN_DRAIN_S") + 5
    assert one(unit, "KillSignal") == "SIGTERM"


def test_program_settings_and_key_paths(unit: dict[str, list[str]]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    exec_start = one(unit, "ExecStart")
    assert exec_start == "/opt/valshi-x/venv/bin/valshi-x"
    assert Path(exec_start).name in scripts

    assert one(unit, "EnvironmentFile") == "/etc/valshi-x/valshi-x.env"
    env = environment(unit)
    # The key file reaches the service as a credential; the setting points into the credentials directory.
    credential_name, _, source = one(unit, "LoadCredential").partition(":")
    assert source == "/etc/valshi-x/kalshi.pem"
    assert env["KALSHI_PRIVATE_KEY_PATH"] == f"%d/{credential_name}"
    # State lives in the directory systemd creates for the dynamic user.
    assert one(unit, "DynamicUser") == "yes"
    assert env["STATE_DIR"] == f"%S/{one(unit, 'StateDirectory')}"
    assert env["PYTHONUNBUFFERED"] == "1"
    known = {spec.key for spec in SETTINGS}
    assert {key for key in env if not key.startswith("PYTHON")} <= known


def test_hardening_settings_present(unit: dict[str, list[str]]) -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "PrivateUsers": "yes",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallArchitectures": "native",
        "LockPersonality": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "UMask": "0077",
        "LimitCORE": "0",
    }
    assert {key: one(unit, key) for key in expected} == expected
    assert unit["SystemCallFilter"][0] == "@system-service"


# --- the env file the README has the operator copy from .env.example ----------------------------------------

# What systemd puts in for the specifiers the unit's Environment= lines use (system manager, unit valshi-x.service).
SPECIFIERS = {"%S": "/var/lib", "%d": "/run/credentials/valshi-x.service"}
_ENV_LINE = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^\s'\"\\#]*)")


def env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads it, for the plain shape .env.example keeps (no quotes, escapes,
    `export` or trailing comments, where systemd and python-dotenv could read a line differently)."""
    found = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        match = _ENV_LINE.fullmatch(line)
        assert match is not None, f"{path.name}: a line systemd and dotenv may read differently: {line!r}"
        found[match["key"]] = match["value"]
    return found


def test_env_example_copied_as_is_keeps_the_units_key_path_and_state_dir(unit: dict[str, list[str]]) -> None:
    unit_env = {key: value.replace("%S", SPECIFIERS["%S"]) for key, value in environment(unit).items()}
    unit_env = {key: value.replace("%d", SPECIFIERS["%d"]) for key, value in unit_env.items()}
    copied = env_file(ROOT / ".env.example")
    # systemd.exec: variables read from EnvironmentFile= override those set with Environment=.
    service_env = {**unit_env, **copied}
    # The operator fills in the Kalshi key id and the four X keys, nothing else.
    filled = {**service_env, "KALSHI_API_KEY_ID": "a952bcbe", **{key: "x" for key in _X_KEYS}}
    settings = load_settings(filled, need_x=True)
    assert settings.kalshi_private_key_path == Path("/run/credentials/valshi-x.service/kalshi.pem")
    assert settings.kalshi_private_key == ""
    assert settings.state_dir == Path("/var/lib/valshi-x")
    # Copied and not filled in yet, the one complaint is the key id the operator still has to write.
    with pytest.raises(ConfigError) as unfilled:
        load_settings(service_env, need_x=False)
    assert unfilled.value.problems == ["KALSHI_API_KEY_ID: required when a Kalshi private key is set"]


_X_KEYS = ("X_API_KEY", "X_API_SECRET", "X_ACCESS_TOKEN", "X_ACCESS_TOKEN_SECRET")


# --- systemd-analyze ------------------------------------------------------------------------------------------


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, env=env, check=False)


def _unit_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart on a stub executable (verify checks that the program exists)."""
    stub = tmp_path / "valshi-x"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    original = UNIT_PATH.read_text() if text is None else text
    copied, count = re.subn(r"(?m)^ExecStart=.*$", f"ExecStart={stub}", original)
    assert count == 1
    path = tmp_path / "valshi-x.service"
    path.write_text(copied)
    return path


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = _analyze("verify", str(_unit_copy(tmp_path)))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "valshi-x" in line]
    assert (result.returncode, complaints) == (0, [])


@needs_analyze
def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT_PATH.read_text().replace("Type=notify", "Type=notfy\nRestartPreventExitStatuz=78")
    result = _analyze("verify", str(_unit_copy(tmp_path, broken)))
    output = result.stdout + result.stderr
    assert "notfy" in output
    assert "RestartPreventExitStatuz" in output


@needs_analyze
def test_systemd_analyze_security_exposure_is_at_most_1_5(tmp_path: Path) -> None:
    result = _analyze("security", "--offline=yes", "--no-pager", str(_unit_copy(tmp_path)))
    match = re.search(r"Overall exposure level for valshi-x\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


# --- MemoryDenyWriteExecute ---------------------------------------------------------------------------------

# Installs, in a child, the seccomp filter systemd uses for MemoryDenyWriteExecute= (mmap with PROT_WRITE and
# PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC all fail with EPERM), then execs the
# workload with it. Newer systemd also sets PR_SET_MDWE, which refuses less than this filter does.
_SANDBOX = r"""
import ctypes, os, platform, struct, sys
arch, nr_mmap, nr_mprotect, nr_pkey_mprotect, nr_shmat = {
    "x86_64": (0xC000003E, 9, 10, 329, 30),
    "aarch64": (0xC00000B7, 222, 226, 288, 196),
}[platform.machine()]
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
ARG2 = 32  # offsetof(struct seccomp_data, args[2]), low 32 bits on a little-endian machine
def stmt(code, k): return (code, 0, 0, k)
def jeq(k, jt, jf): return (JEQ, jt, jf, k)
def refuse_if(mask): return [stmt(LD, ARG2), stmt(AND, mask), jeq(mask, 0, 1), stmt(RET, EPERM), stmt(RET, ALLOW)]
prog = [stmt(LD, 4), jeq(arch, 1, 0), stmt(RET, ALLOW), stmt(LD, 0),
        jeq(nr_mmap, 4, 0), jeq(nr_mprotect, 8, 0), jeq(nr_pkey_mprotect, 7, 0), jeq(nr_shmat, 10, 0),
        stmt(RET, ALLOW)] + refuse_if(0x2 | 0x4) + refuse_if(0x4) + refuse_if(0o100000)
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in prog))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Prog(len(prog), ctypes.addressof(code))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
    print("seccomp unavailable: errno", ctypes.get_errno())
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""

# What the daemon does that could need writable+executable memory: load every module, sign with RSA-PSS and Ed25519,
# parse JSON with msgspec, set up TLS, use SQLite from a thread, talk HTTP and WebSocket over loopback.
_WORKLOAD = r"""
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    raise SystemExit("the sandbox is not active: a writable+executable mapping was allowed")

import asyncio, importlib, pkgutil, sqlite3, ssl
import msgspec
import valshi_x
for module in pkgutil.walk_packages(valshi_x.__path__, "valshi_x."):
    importlib.import_module(module.name)
import aiohttp, tweepy.asynchronous
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
key.public_key().verify(key.sign(b"GET/trade-api/ws/v2", pss, hashes.SHA256()), b"GET/trade-api/ws/v2", pss,
                        hashes.SHA256())
ed_key = ed25519.Ed25519PrivateKey.generate()
ed_key.public_key().verify(ed_key.sign(b"GET/trade-api/ws/v2"), b"GET/trade-api/ws/v2")
assert msgspec.json.decode(msgspec.json.encode({"yes_price_dollars": "0.62"})) == {"yes_price_dollars": "0.62"}
ssl.create_default_context()

async def main():
    assert await asyncio.to_thread(lambda: sqlite3.connect(":memory:").execute("select 1").fetchone()) == (1,)
    async def hello(request):
        return web.json_response({"ok": True})
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as response:
        assert await response.json() == {"ok": True}
    await runner.cleanup()
    async def echo(ws):
        async for message in ws:
            await ws.send(message)
    async with serve(echo, "127.0.0.1", 0) as server:
        ws_port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{ws_port}") as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"

asyncio.run(main())
print("workload ok")
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in {"x86_64", "aarch64"},
    reason="the seccomp filter is written for Linux on x86_64 and aarch64",
)
def test_the_daemons_code_runs_under_memory_deny_write_execute() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SANDBOX, _WORKLOAD],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    if result.returncode == 77:
        pytest.skip(f"this kernel or container refuses seccomp filters: {result.stdout.strip()}")
    assert (result.returncode, result.stdout.strip()) == (0, "workload ok"), result.stderr
