"""`valshi-x check`: only its verdict lines, and each failure names its real cause (DNS, refused, timeout, TLS,
HTTP status), found against loopback endpoints that fail in exactly that way."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from tests.fake_kalshi import (
    Attempt,
    FakeKalshi,
    KeyPair,
    any_keys,  # noqa: F401  # fixture
    ed25519_keys,  # noqa: F401  # fixture
    kalshi_keys,  # noqa: F401  # fixture
    rsa_private_key,  # noqa: F401  # fixture
)
from tests.fake_kalshi_rest import FakeKalshiRest
from tests.service_helpers import REPO, child_env
from valshi_x.check import run_checks
from valshi_x.config import UNQUOTED_BACKSLASH, load_settings
from valshi_x.kalshi.auth import KalshiSigner, load_private_key

UNIT_S = 0.05
WS_PATH = "/trade-api/ws/v2"
REST_PATH = "/trade-api/v2"
VERDICTS = ("PASS", "FAIL", "WARN")


def verdicts(text: str) -> dict[str, tuple[str, str]]:
    """{"kalshi websocket": ("FAIL", detail), ...}; asserts that every line but the summary is a verdict."""
    lines = text.splitlines()
    assert lines[-1] in ("all checks passed", "1 check(s) failed", "2 check(s) failed"), lines
    found = {}
    for line in lines[:-1]:
        assert line[:4] in VERDICTS and line[4:6] == "  ", f"not a verdict line: {line!r}"
        item, _, detail = line[6:].partition(": ")
        found[" ".join(item.split()[:2])] = (line[:4], detail)
    return found


async def check(
    ws_url: str, rest_url: str, *, timeout_s: float = 40 * UNIT_S
) -> tuple[int, dict[str, tuple[str, str]]]:
    """Run the checks in-process against these URLs; no log event may be emitted on the way."""
    settings = load_settings({"KALSHI_WS_URL": ws_url, "KALSHI_API_URL": rest_url}, need_x=False)
    out = io.StringIO()
    with capture_logs() as logged:
        code = await run_checks(settings, None, out=out, timeout_s=timeout_s)
    assert logged == []  # retries and their warnings would interleave with the verdicts
    return code, verdicts(out.getvalue())


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def self_signed_tls(directory: Path) -> ssl.SSLContext:
    """A server TLS context whose certificate (for 127.0.0.1) no client trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


@contextlib.asynccontextmanager
async def tcp_server(answer: bytes | None, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A loopback TCP server that reads and never answers (`None`) or writes `answer`; yields its port."""
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        if answer is not None:
            with contextlib.suppress(OSError):
                await reader.read(1)
                writer.write(answer)
                await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_connection_refused_is_named_with_the_address() -> None:
    port = closed_port()
    code, found = await check(f"ws://127.0.0.1:{port}{WS_PATH}", f"http://127.0.0.1:{port}{REST_PATH}")
    assert code == 1
    assert found["kalshi websocket"] == ("FAIL", f"connection refused by 127.0.0.1:{port} (nothing listening there?)")
    assert found["kalshi rest"] == ("FAIL", f"connection refused by 127.0.0.1:{port} (nothing listening there?)")
    assert found["kalshi key"][0] == "WARN"
    assert found["x credentials"][0] == "WARN"


async def test_a_name_that_does_not_resolve_is_a_dns_failure_not_a_timeout() -> None:
    code, found = await check(f"wss://kalshi.invalid{WS_PATH}", f"https://kalshi.invalid{REST_PATH}")
    assert code == 1
    for item in ("kalshi websocket", "kalshi rest"):
        verdict, detail = found[item]
        assert (verdict, detail.startswith("DNS: cannot resolve kalshi.invalid (")) == ("FAIL", True), detail


async def test_a_server_that_never_answers_is_a_timeout() -> None:
    async with tcp_server(answer=None) as port:
        code, found = await check(
            f"ws://127.0.0.1:{port}{WS_PATH}", f"http://127.0.0.1:{port}{REST_PATH}", timeout_s=4 * UNIT_S
        )
    assert code == 1
    assert found["kalshi websocket"] == ("FAIL", "timeout: no answer within 0.2 s")
    assert found["kalshi rest"] == ("FAIL", "timeout: no answer within 0.2 s")


async def test_tls_to_a_server_that_does_not_speak_it_is_a_tls_error() -> None:
    async with tcp_server(answer=b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n") as port:
        code, found = await check(f"wss://127.0.0.1:{port}{WS_PATH}", f"https://127.0.0.1:{port}{REST_PATH}")
    assert code == 1
    for item in ("kalshi websocket", "kalshi rest"):
        verdict, detail = found[item]
        assert (verdict, detail.startswith("TLS: handshake with 127.0.0.1 failed (")) == ("FAIL", True), detail


async def test_a_certificate_the_client_does_not_trust_is_a_tls_error(tmp_path: Path) -> None:
    async with tcp_server(answer=None, tls=self_signed_tls(tmp_path)) as port:
        code, found = await check(f"wss://127.0.0.1:{port}{WS_PATH}", f"https://127.0.0.1:{port}{REST_PATH}")
    assert code == 1
    for item in ("kalshi websocket", "kalshi rest"):
        verdict, detail = found[item]
        assert (verdict, detail) == ("FAIL", "TLS: certificate of 127.0.0.1 not accepted (self-signed certificate)")


@pytest.mark.parametrize("status", [401, 503])
async def test_an_http_status_is_reported_as_such(status: int) -> None:
    async with FakeKalshi(default=Attempt(reject_status=status)) as kalshi, FakeKalshiRest() as rest:
        rest.script("trades", status)
        code, found = await check(kalshi.url, rest.base_url)
    assert code == 1
    hint = " (check KALSHI_API_KEY_ID and the key)" if status == 401 else ""
    assert found["kalshi websocket"] == ("FAIL", f"handshake rejected with HTTP {status}{hint}")
    assert found["kalshi rest"] == ("FAIL", f"HTTP {status} from {REST_PATH}/markets/trades")
    assert rest.counts["trades"] == 1  # one attempt: a retry would log a warning among the verdicts


async def test_each_key_type_passes_and_is_named(any_keys: KeyPair) -> None:  # noqa: F811
    async with (
        FakeKalshi(public_key=any_keys.public_key, key_id=any_keys.key_id, require_auth=True) as kalshi,
        FakeKalshiRest() as rest,
    ):
        settings = load_settings({"KALSHI_WS_URL": kalshi.url, "KALSHI_API_URL": rest.base_url}, need_x=False)
        signer = KalshiSigner(any_keys.key_id, load_private_key(any_keys.pkcs8_path, ""))
        out = io.StringIO()
        code = await run_checks(settings, signer, out=out)
    found = verdicts(out.getvalue())
    kind = "Ed25519" if signer.key_type == "Ed25519" else "RSA-2048"
    assert found["kalshi key"] == ("PASS", f"{kind} key loaded for key id {any_keys.key_id}")
    assert found["kalshi websocket"] == ("PASS", "handshake signed, subscribed (sid 1)")
    assert code == 0


def test_the_cli_prints_only_verdicts_and_reads_the_key_file_named_on_the_command_line(
    ed25519_keys: KeyPair,  # noqa: F811
    tmp_path: Path,
) -> None:
    # As the README prints it: an env file with the key path left to the unit, and --key-file on the command line.
    env_file = tmp_path / "valshi-x.env"
    port = closed_port()
    env_file.write_text(
        f"KALSHI_API_KEY_ID={ed25519_keys.key_id}\n"
        f"KALSHI_WS_URL=ws://127.0.0.1:{port}{WS_PATH}\nKALSHI_API_URL=http://kalshi.invalid{REST_PATH}\n"
        "WHALE_TRESHOLD_DOLLARS=5000\n"  # misspelled: check says so instead of letting the default stand silently
        "POST_TEMPLATE={value}\\n{time}\n"  # systemd would read "{value}n{time}": check says so
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "valshi_x",
            "check",
            "--env-file",
            str(env_file),
            "--key-file",
            str(ed25519_keys.pkcs8_path),
        ],
        env=child_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (1, "")
    found = verdicts(done.stdout)
    assert found["kalshi key"] == ("PASS", f"Ed25519 key loaded for key id {ed25519_keys.key_id}")
    assert found["kalshi websocket"][1].startswith("connection refused")
    assert found["kalshi rest"][1].startswith("DNS: cannot resolve kalshi.invalid")
    assert found["env file"] == ("WARN", f"{env_file} line 5, POST_TEMPLATE: {UNQUOTED_BACKSLASH}")
    assert found["unknown setting"] == (
        "WARN",
        "WHALE_TRESHOLD_DOLLARS is not a setting and is ignored (did you mean WHALE_THRESHOLD_DOLLARS?)",
    )


def test_version_comes_from_the_package_metadata() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "valshi_x", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    from importlib.metadata import version

    assert (done.returncode, done.stdout.strip()) == (0, f"valshi-x {version('valshi-x')}")


def test_check_judges_the_env_file_with_its_line_endings_as_written(tmp_path: Path) -> None:
    # check re-read the file with read_text(), whose newline translation turned `# note \` + CRLF into a comment
    # ending in a backslash: a false "systemd before v254 reads it as part of the comment" warning. systemd's
    # comment state lets that backslash escape the \r, and the \n still ends the comment, so both parsers read
    # WHALE_THRESHOLD_DOLLARS. check now judges the very text the settings came from, read once.
    env_file = tmp_path / ".env"
    port = closed_port()
    env_file.write_bytes(
        b"# note \\\r\nWHALE_THRESHOLD_DOLLARS=5000\r\n"
        b"POST_TEMPLATE={value}\\n{time}\r\n"  # a real difference on line 3, still found
        + f"KALSHI_WS_URL=ws://127.0.0.1:{port}{WS_PATH}\r\nKALSHI_API_URL=http://127.0.0.1:{port}{REST_PATH}\r\n".encode()
    )
    done = subprocess.run(
        [sys.executable, "-m", "valshi_x", "check"],
        env=child_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (1, "")
    warned = [line for line in done.stdout.splitlines() if line.startswith("WARN  env file")]
    assert warned == [f"WARN  env file: .env line 3, POST_TEMPLATE: {UNQUOTED_BACKSLASH}"]
    assert verdicts(done.stdout)["settings"][1].startswith("threshold $5000,")  # the key after the comment counts
