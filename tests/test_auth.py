"""The Kalshi signer and key loader: RSA and Ed25519 signatures verify with the public key (also in a real
handshake with the loopback fake); each bad key names its problem."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.fake_kalshi import (
    FakeKalshi,
    KeyPair,
    any_keys,  # noqa: F401  # fixture
    ed25519_keys,  # noqa: F401  # fixture
    kalshi_keys,  # noqa: F401  # fixture
    other_key_like,
    rsa_private_key,  # noqa: F401  # fixture
    verify_kalshi_signature,
)
from valshi_x.errors import ConfigError, KeyLoadError
from valshi_x.kalshi.auth import KalshiSigner, load_private_key

WS_PATH = "/trade-api/ws/v2"


def _problem(exc: pytest.ExceptionInfo[KeyLoadError]) -> str:
    assert isinstance(exc.value, ConfigError)
    (line,) = exc.value.problems
    return line


@pytest.mark.parametrize("fmt", ["pkcs8", "pkcs1"])
def test_both_pem_formats_load_from_a_file_and_sign_verifiably(kalshi_keys: KeyPair, fmt: str) -> None:  # noqa: F811
    path = kalshi_keys.pkcs8_path if fmt == "pkcs8" else kalshi_keys.pkcs1_path
    key = load_private_key(path, "")
    signer = KalshiSigner(kalshi_keys.key_id, key)

    headers = signer.headers("GET", WS_PATH, now_ms=1_793_000_000_123)

    assert headers["KALSHI-ACCESS-KEY"] == kalshi_keys.key_id
    assert headers["KALSHI-ACCESS-TIMESTAMP"] == "1793000000123"
    assert verify_kalshi_signature(
        kalshi_keys.public_key, "1793000000123", "GET", WS_PATH, headers["KALSHI-ACCESS-SIGNATURE"]
    )
    # The signature covers the timestamp: it must not verify for another one.
    assert not verify_kalshi_signature(
        kalshi_keys.public_key, "1793000000124", "GET", WS_PATH, headers["KALSHI-ACCESS-SIGNATURE"]
    )


@pytest.mark.parametrize("fmt", ["pkcs8", "pkcs1"])
def test_inline_pem_loads_including_escaped_newlines(kalshi_keys: KeyPair, fmt: str) -> None:  # noqa: F811
    pem = kalshi_keys.pkcs8_pem if fmt == "pkcs8" else kalshi_keys.pkcs1_pem
    for text in (pem, pem.strip().replace("\n", "\\n")):
        key = load_private_key(None, text)
        assert key.public_key().public_numbers() == kalshi_keys.public_key.public_numbers()


def test_signature_is_pss_over_the_path_without_query_and_method_upper_cased(kalshi_keys: KeyPair) -> None:  # noqa: F811
    signer = KalshiSigner(kalshi_keys.key_id, kalshi_keys.private_key)
    headers = signer.headers("get", "/trade-api/v2/markets/trades?limit=1000&cursor=abc", now_ms=1000)
    signature = headers["KALSHI-ACCESS-SIGNATURE"]
    assert verify_kalshi_signature(kalshi_keys.public_key, "1000", "GET", "/trade-api/v2/markets/trades", signature)
    assert len(base64.b64decode(signature)) == 256  # a 2048-bit RSA signature
    # PSS is randomized: the same text signed twice differs, and both verify.
    again = signer.headers("GET", "/trade-api/v2/markets/trades", now_ms=1000)["KALSHI-ACCESS-SIGNATURE"]
    assert again != signature
    assert verify_kalshi_signature(kalshi_keys.public_key, "1000", "GET", "/trade-api/v2/markets/trades", again)


def test_default_timestamp_is_now_in_milliseconds(kalshi_keys: KeyPair) -> None:  # noqa: F811
    import time

    signer = KalshiSigner(kalshi_keys.key_id, kalshi_keys.private_key)
    before_ms = time.time_ns() // 1_000_000
    first = int(signer.headers("GET", WS_PATH)["KALSHI-ACCESS-TIMESTAMP"])
    time.sleep(0.002)
    second = int(signer.headers("GET", WS_PATH)["KALSHI-ACCESS-TIMESTAMP"])
    after_ms = time.time_ns() // 1_000_000
    assert before_ms <= first < second <= after_ms


def test_repr_shows_no_key_material(kalshi_keys: KeyPair) -> None:  # noqa: F811
    signer = KalshiSigner(kalshi_keys.key_id, kalshi_keys.private_key)
    text = repr(signer) + str(signer)
    assert kalshi_keys.key_id in text
    assert "PRIVATE" not in text
    assert str(kalshi_keys.private_key.private_numbers().d)[:12] not in text
    assert not hasattr(signer, "__dict__")  # slots: nothing else can be dumped by accident


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(tmp_path / "nope.pem", "")
    assert _problem(exc) == f"KALSHI_PRIVATE_KEY_PATH: {tmp_path / 'nope.pem'}: no such file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(kalshi_keys: KeyPair) -> None:  # noqa: F811
    kalshi_keys.pkcs8_path.chmod(0)
    try:
        with pytest.raises(KeyLoadError) as exc:
            load_private_key(kalshi_keys.pkcs8_path, "")
    finally:
        kalshi_keys.pkcs8_path.chmod(0o600)
    assert _problem(exc).startswith("KALSHI_PRIVATE_KEY_PATH: ")
    assert "permission denied" in _problem(exc)


def test_permission_error_is_reported_even_when_running_as_root(
    kalshi_keys: KeyPair,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Root reads any file, so the real chmod test above skips there; this one fails the read at the edge instead.
    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(kalshi_keys.pkcs8_path, "")
    assert _problem(exc) == (
        f"KALSHI_PRIVATE_KEY_PATH: {kalshi_keys.pkcs8_path}: permission denied (the daemon's user cannot read it)"
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(tmp_path, "")
    assert "is a directory" in _problem(exc)


def test_nothing_configured() -> None:
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(None, "  ")
    assert _problem(exc).startswith("KALSHI_PRIVATE_KEY_PATH: no Kalshi private key configured")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the key is empty"),
        (b"hello, this is not a key\n", "not a PEM key"),
        (b"\x30\x82\x04\xa4\x02\x01\x00", "not a PEM key"),  # DER bytes
        (
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n",
            "could not be parsed",
        ),
    ],
)
def test_garbage_is_named_without_echoing_it(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(path, "")
    assert expected in _problem(exc)
    assert "bm90IGEga2V5" not in _problem(exc)


@pytest.mark.parametrize("fmt", ["pkcs8", "pkcs1"])
def test_encrypted_key(tmp_path: Path, kalshi_keys: KeyPair, fmt: str) -> None:  # noqa: F811
    private_format = (
        serialization.PrivateFormat.PKCS8 if fmt == "pkcs8" else serialization.PrivateFormat.TraditionalOpenSSL
    )
    pem = kalshi_keys.private_key.private_bytes(
        serialization.Encoding.PEM, private_format, serialization.BestAvailableEncryption(b"hunter22")
    )
    path = tmp_path / "encrypted.pem"
    path.write_bytes(pem)
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(path, "")
    assert "encrypted with a passphrase" in _problem(exc)
    # Inline, the same problem is reported under the inline setting's name.
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(None, pem.decode())
    assert _problem(exc).startswith("KALSHI_PRIVATE_KEY: the key is encrypted")


def test_ed25519_pkcs8_loads_from_a_file_and_inline_and_signs_verifiably(ed25519_keys: KeyPair) -> None:  # noqa: F811
    for key in (load_private_key(ed25519_keys.pkcs8_path, ""), load_private_key(None, ed25519_keys.pkcs8_pem)):
        signer = KalshiSigner(ed25519_keys.key_id, key)
        assert signer.key_type == "Ed25519"
        headers = signer.headers("get", WS_PATH + "?x=1", now_ms=1_793_000_000_123)
        signature = headers["KALSHI-ACCESS-SIGNATURE"]
        assert verify_kalshi_signature(ed25519_keys.public_key, "1793000000123", "GET", WS_PATH, signature)
        assert not verify_kalshi_signature(ed25519_keys.public_key, "1793000000124", "GET", WS_PATH, signature)
        # Ed25519 over the raw text: 64 bytes, deterministic, and exactly what the library gives for that text.
        raw = base64.b64decode(signature)
        assert len(raw) == 64
        assert raw == ed25519_keys.private_key.sign(b"1793000000123GET" + WS_PATH.encode())


def test_the_rsa_key_type_names_its_size(kalshi_keys: KeyPair) -> None:  # noqa: F811
    assert KalshiSigner(kalshi_keys.key_id, load_private_key(kalshi_keys.pkcs1_path, "")).key_type == "RSA-2048"


@pytest.mark.parametrize("verdict", ["right key", "wrong key"])
async def test_a_real_handshake_with_each_key_type(any_keys: KeyPair, verdict: str) -> None:  # noqa: F811
    # The fake checks the signature with the public key, the way Kalshi does, and answers 401 when it fails.
    private_key = load_private_key(any_keys.pkcs8_path, "") if verdict == "right key" else other_key_like(any_keys)
    signer = KalshiSigner(any_keys.key_id, private_key)
    async with FakeKalshi(public_key=any_keys.public_key, key_id=any_keys.key_id, require_auth=True) as kalshi:
        if verdict == "right key":
            async with connect(kalshi.url, additional_headers=signer.headers("GET", WS_PATH)) as ws:
                await ws.send('{"id": 1, "cmd": "subscribe", "params": {"channels": ["trade"]}}')
                assert '"subscribed"' in str(await ws.recv())
        else:
            with pytest.raises(InvalidStatus) as rejected:
                async with connect(kalshi.url, additional_headers=signer.headers("GET", WS_PATH)):
                    pass
            assert rejected.value.response.status_code == 401
    (handshake,) = kalshi.handshakes
    assert handshake.signed
    assert handshake.signature_ok is (verdict == "right key")


def test_other_key_types_are_refused_by_name(tmp_path: Path) -> None:
    for name, key in (
        ("EC", ec.generate_private_key(ec.SECP256R1())),
        ("Ed448", ed448.Ed448PrivateKey.generate()),
    ):
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with pytest.raises(KeyLoadError) as exc:
            load_private_key(None, pem.decode())
        assert _problem(exc).startswith("KALSHI_PRIVATE_KEY: not an RSA or Ed25519 key")
        assert name in _problem(exc)
        assert _problem(exc).endswith("Kalshi API keys are RSA or Ed25519")


def test_an_openssh_key_is_named_as_such(tmp_path: Path) -> None:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    path = tmp_path / "id_ed25519"
    path.write_bytes(pem)
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(path, "")
    assert "this is an OpenSSH key" in _problem(exc)


def test_public_key_instead_of_private(kalshi_keys: KeyPair, tmp_path: Path) -> None:  # noqa: F811
    pem = kalshi_keys.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "public.pem"
    path.write_bytes(pem)
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(path, "")
    assert "this is a public key" in _problem(exc)


def test_no_problem_message_contains_key_material(kalshi_keys: KeyPair, tmp_path: Path) -> None:  # noqa: F811
    # A truncated real key: the parser fails, and the message must not quote any of it.
    body_lines = kalshi_keys.pkcs1_pem.splitlines()
    truncated = "\n".join(body_lines[:5] + body_lines[-1:]) + "\n"
    with pytest.raises(KeyLoadError) as exc:
        load_private_key(None, truncated)
    message = _problem(exc)
    for line in body_lines[1:5]:
        assert line[:16] not in message
