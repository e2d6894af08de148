"""The edge: command line, .env, logging, signals, asyncio.run and exit codes. The only place that exits.

Exit codes: 0 clean stop, 78 configuration error (EX_CONFIG, one line per bad key; also a state directory held by
another daemon, or corrupt), 1 unexpected crash or a state that cannot be opened right now (disk full, I/O error).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import io
import os
import signal
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from dotenv import dotenv_values

from valshi_x.capture import capture_problem
from valshi_x.config import (
    Settings,
    load_settings,
    read_env_file,
    readable_by_others,
    secret_files,
    unknown_settings,
)
from valshi_x.daemon import Daemon, RunOptions
from valshi_x.errors import ConfigError, StateUnavailable
from valshi_x.logs import configure_logging, default_format

if TYPE_CHECKING:  # the signer (cryptography) and the checker (aiohttp, tweepy, websockets) load where they are
    from valshi_x.kalshi.auth import KalshiSigner  # used, so a replay starts without them (issue 11)

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 78

log = structlog.get_logger("valshi_x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="valshi-x",
        description="Watch every Kalshi trade and post the whales ($100k or more) to X.",
        epilog="Settings come from the environment and an optional .env file; see .env.example.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("run", "status", "check"),
        default="run",
        help="run the daemon (default); status: show the outbox; check: test settings, key, Kalshi and X",
    )
    parser.add_argument("--dry-run", action="store_true", help="log each whale as `would_post` instead of posting")
    parser.add_argument(
        "--replay", type=Path, metavar="PATH", help="read frames from a capture instead of Kalshi (implies --dry-run)"
    )
    parser.add_argument("--record", type=Path, metavar="PATH", help="append every frame received to a capture")
    parser.add_argument(
        "--state-dir", type=Path, metavar="PATH", help="state directory (default: STATE_DIR; a dry run keeps none)"
    )
    parser.add_argument(
        "--lookup-titles", action="store_true", help="with --replay: look market titles up on Kalshi REST"
    )
    parser.add_argument("--env-file", type=Path, metavar="PATH", help="read settings from this file (default: ./.env)")
    parser.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        help="the Kalshi private key PEM (instead of KALSHI_PRIVATE_KEY_PATH / KALSHI_PRIVATE_KEY)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--log-format",
        choices=("json", "console", "journal"),
        help="log line format (default: journal under systemd, console on a terminal, JSON lines otherwise)",
    )
    return parser


def _version() -> str:
    """The installed distribution's version (pyproject's), or "unknown" when run from an uninstalled tree."""
    try:
        return importlib.metadata.version("valshi-x")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_environment(env_file: Path | None) -> tuple[dict[str, str], Path | None, str]:
    """The process environment over the env file (a value set in the environment wins), the file read (None when
    the default ./.env is not there) and its text, read once: `check` judges that text and never reopens the file.
    """
    path = env_file if env_file is not None else Path(".env")
    text = read_env_file(path, missing_ok=env_file is None)
    if text is None:
        return dict(os.environ), None, ""
    from_file = {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}
    return {**from_file, **os.environ}, path, text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replay is not None:
        args.dry_run = True  # a capture's whales are history: never post them
    configure_logging(args.log_format, env=os.environ)
    env: dict[str, str] = {}
    try:
        env, env_file, env_text = read_environment(args.env_file)
        if args.key_file is not None:
            # The service gets its key at a path only it can see; by hand, name the file itself.
            env = {**env, "KALSHI_PRIVATE_KEY_PATH": str(args.key_file), "KALSHI_PRIVATE_KEY": ""}
        settings = load_settings(env, need_x=args.command == "run" and not args.dry_run)
        _check_capture_options(args.replay, args.record)
        signer = None
        key_text: tuple[str, ...] = ()
        if args.replay is None and args.command != "status" and settings.has_kalshi_key:
            from valshi_x.kalshi.auth import KalshiSigner, load_private_key  # noqa: PLC0415  (lazy: see the imports)

            key = load_private_key(settings.kalshi_private_key_path, settings.kalshi_private_key)
            signer = KalshiSigner(settings.kalshi_api_key_id, key)
            key_text = _key_file_text(settings)
    except ConfigError as exc:
        # A misspelled key is often why a required one is "missing": name the likely culprit beside the error.
        hints = [f"{key}: not a setting, ignored (did you mean {closest}?)" for key, closest in unknown_settings(env)]
        return _config_error(ConfigError(exc.problems + hints) if hints and type(exc) is ConfigError else exc)

    configure_logging(args.log_format, secrets=(*settings.secrets, *key_text), env=os.environ)
    unknown_keys = unknown_settings(env)
    if args.command == "run":  # status prints a plain report and check a WARN line; a log line would break in
        for unknown, closest in unknown_keys:
            log.warning("unknown_setting", key=unknown, did_you_mean=closest, note="not a setting; ignored")
    if args.command == "status":
        from valshi_x.check import show_status  # noqa: PLC0415  (lazy: see the imports)

        return show_status(args.state_dir or settings.state_dir)
    files = secret_files(settings.kalshi_private_key_path, env_file, os.environ)
    if args.command == "check":
        from valshi_x.check import run_checks  # noqa: PLC0415

        return asyncio.run(
            run_checks(
                settings,
                signer,
                secret_files=files,
                unknown_keys=unknown_keys,
                env_file=env_file,
                env_text=env_text,
            )
        )
    for path, mode in readable_by_others(files):
        log.warning("secret_file_readable", path=str(path), mode=f"{mode:04o}", hint=f"chmod 600 {path}")
    options = RunOptions(
        dry_run=args.dry_run,
        replay_path=args.replay,
        record_path=args.record,
        state_dir=args.state_dir,
        lookup_titles=True if args.lookup_titles else None,
    )
    try:
        asyncio.run(_run(settings, options, signer, env))
    except asyncio.CancelledError:
        # A second signal while draining: what was not posted is still in the outbox.
        return EXIT_CRASH
    except ConfigError as exc:
        # Found only once running (an unusable STATE_DIR): still a setting to fix, and 78 stops systemd's restarts.
        return _config_error(exc)
    except StateUnavailable as exc:
        # Disk full, locked, an I/O error: nothing to fix in the settings, so exit 1 and let systemd try again.
        log.error("state_unavailable", error=str(exc))
        return EXIT_CRASH
    except Exception:
        log.exception("daemon_crashed")
        return EXIT_CRASH
    return EXIT_OK


def _check_capture_options(replay: Path | None, record: Path | None) -> None:
    """Refuse capture options that cannot work, before anything starts (exit 78, one line naming the file)."""
    if replay is not None and record is not None:
        # A replay receives no frames: recording it would only leave an empty file behind.
        raise ConfigError(["--record: cannot be combined with --replay (a replay receives no frames to record)"])
    if replay is not None:
        try:
            # A stat, not Path.is_file(), which raised on some errors (EACCES, ENAMETOOLONG) and hid others.
            if not stat.S_ISREG(replay.stat().st_mode):
                raise ConfigError([f"--replay: {replay} is not a regular file"])
            problem = capture_problem(replay)
        except OSError as exc:
            raise ConfigError([f"--replay: cannot read {replay}: {exc.strerror or exc}"]) from None
        if problem:
            raise ConfigError([f"--replay: {replay} {problem}"])
    if record is not None:
        try:
            # Append mode, as the recorder opens it: creates the file, never truncates an earlier capture.
            with record.open("a", encoding="utf-8"):
                pass
        except OSError as exc:
            where = "" if record.parent.is_dir() else f" (the folder {record.parent} does not exist)"
            raise ConfigError([f"--record: cannot write {record}: {exc.strerror or exc}{where}"]) from None


def _config_error(exc: ConfigError) -> int:
    # Plain lines on stderr, readable before any logging is trusted; under journald the <3> prefix files
    # them as errors, so `journalctl -p err` shows why the service stopped.
    prefix = "<3>" if default_format(os.environ, sys.stdout) == "journal" else ""
    for problem in exc.problems:
        print(f"{prefix}valshi-x: {exc.label}: {problem}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


def _key_file_text(settings: Settings) -> tuple[str, ...]:
    """The key file's text, so the redactor knows it too (it was just read successfully)."""
    if settings.kalshi_private_key_path is None:
        return ()
    try:
        return (settings.kalshi_private_key_path.read_text(),)
    except (OSError, UnicodeDecodeError):
        return ()


async def _run(settings: Settings, options: RunOptions, signer: KalshiSigner | None, env: dict[str, str]) -> None:
    daemon = Daemon(settings, options, signer=signer, env=env)
    _install_signal_handlers(daemon.stop)
    await daemon.run()


def _install_signal_handlers(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT asks for a graceful stop; a second one cancels the run outright."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def handle(signum: int) -> None:
        name = signal.Signals(signum).name
        if not stop.is_set():
            log.info("stop_requested", signal=name)
            stop.set()
        else:
            log.warning("forced_stop", signal=name)
            if main_task is not None:
                main_task.cancel("forced stop")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)


if __name__ == "__main__":
    sys.exit(main())
