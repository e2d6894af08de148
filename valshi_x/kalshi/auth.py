"""Kalshi request signing: load the private key once, then sign each handshake or request with the key's scheme.

Kalshi checks three headers: the key id, a Unix-millisecond timestamp, and a base64 signature of
`timestamp + METHOD + path`. The path carries no host and no query string. The scheme follows the key:
an RSA key (PKCS#1 or PKCS#8 PEM) signs with RSA-PSS (SHA-256, MGF1-SHA-256, 32-byte salt); PSS is randomized,
so two signatures of the same text differ and only a verify can compare them. An Ed25519 key (PKCS#8 PEM,
accepted by Kalshi since 2026-09-24) signs the same text directly: Ed25519 takes no hash or padding parameters,
and its signature is deterministic (64 bytes).

Nothing here ever puts key material in a message, a log line or a repr.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from valshi_x.errors import KeyLoadError

PATH_KEY: Final = "KALSHI_PRIVATE_KEY_PATH"
INLINE_KEY: Final = "KALSHI_PRIVATE_KEY"

_PEM_BEGIN = b"-----BEGIN "
_PRIVATE_LABELS = (b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN RSA PRIVATE KEY-----")
_DECRYPT_HINT = "export it without a passphrase first (openssl pkey -in KEY.pem -out KEY-plain.pem)"
_PEM_HINT = "expected a PEM block starting with -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----"
_OPENSSH_HINT = "this is an OpenSSH key; Kalshi keys are PEM (-----BEGIN PRIVATE KEY-----), as downloaded from Kalshi"
_KINDS = "Kalshi API keys are RSA or Ed25519"
_PSS: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)

SigningKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def key_type(key: SigningKey) -> str:
    """The key's kind as an operator reads it: "RSA-2048", "Ed25519"."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    return "Ed25519"


def load_private_key(path: Path | None, pem: str) -> SigningKey:
    """Load the Kalshi private key (RSA or Ed25519) from `path` or, without a path, from the inline PEM text.

    Raises `KeyLoadError` naming the setting and the problem (missing, unreadable, not PEM, encrypted,
    another key type); the message never contains key material.
    """
    if path is not None:
        name = PATH_KEY
        data = _read_key_file(path)
        where = f"{path}: "
    else:
        name = INLINE_KEY
        if not pem.strip():
            raise KeyLoadError(PATH_KEY, "no Kalshi private key configured (set a PEM file path)")
        # A PEM pasted into an environment file often arrives with literal "\n" instead of line breaks.
        if "\\n" in pem and "\n" not in pem.strip():
            pem = pem.replace("\\n", "\n")
        data = pem.encode("utf-8", errors="replace")
        where = ""

    if not data.strip():
        raise KeyLoadError(name, f"{where}the key is empty")
    if _PEM_BEGIN not in data:
        raise KeyLoadError(name, f"{where}not a PEM key; {_PEM_HINT}")
    is_public = b"-----BEGIN PUBLIC KEY-----" in data or b"-----BEGIN RSA PUBLIC KEY-----" in data
    if is_public and not any(label in data for label in _PRIVATE_LABELS):
        raise KeyLoadError(name, f"{where}this is a public key; Kalshi signing needs the private key")
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        raise KeyLoadError(name, f"{where}{_OPENSSH_HINT}")
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        # PKCS#8 and legacy OpenSSL PKCS#1 encryption: say so before the parser gives a vaguer error.
        raise KeyLoadError(name, f"{where}the key is encrypted with a passphrase; {_DECRYPT_HINT}")

    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password is needed but none was given.
        raise KeyLoadError(name, f"{where}the key is encrypted with a passphrase; {_DECRYPT_HINT}") from None
    except UnsupportedAlgorithm:
        raise KeyLoadError(name, f"{where}the key uses an unsupported algorithm; {_KINDS}") from None
    except ValueError:
        # The library's own message may quote parts of the input: never pass it on.
        raise KeyLoadError(name, f"{where}the PEM could not be parsed as a private key; {_PEM_HINT}") from None

    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "") or "unknown"
        raise KeyLoadError(name, f"{where}not an RSA or Ed25519 key (got {kind}); {_KINDS}")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyLoadError(PATH_KEY, f"{path}: no such file") from None
    except PermissionError:
        raise KeyLoadError(PATH_KEY, f"{path}: permission denied (the daemon's user cannot read it)") from None
    except IsADirectoryError:
        raise KeyLoadError(PATH_KEY, f"{path}: is a directory, not a key file") from None
    except OSError as exc:
        raise KeyLoadError(PATH_KEY, f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None


class KalshiSigner:
    """Builds Kalshi's three authentication headers for one request or WebSocket handshake."""

    __slots__ = ("_private_key", "key_id")

    def __init__(self, key_id: str, private_key: SigningKey) -> None:
        self.key_id = key_id
        self._private_key = private_key

    def __repr__(self) -> str:
        return f"KalshiSigner(key_id={self.key_id!r})"

    @property
    def key_type(self) -> str:
        """ "RSA-2048", "Ed25519": what `check` reports."""
        return key_type(self._private_key)

    def headers(self, method: str, path: str, now_ms: int | None = None) -> dict[str, str]:
        """Headers for `method path` signed at `now_ms` (default: now); any query string is left out."""
        timestamp_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        bare_path = path.split("?", 1)[0] or "/"
        text = f"{timestamp_ms}{method.upper()}{bare_path}".encode()
        key = self._private_key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            signature = key.sign(text)  # Ed25519 signs the message itself: no hash, no padding
        else:
            signature = key.sign(text, _PSS, hashes.SHA256())
        return {
            "KALSHI-ACCESS-KEY": self.key_id,
            "KALSHI-ACCESS-TIMESTAMP": str(timestamp_ms),
            "KALSHI-ACCESS-SIGNATURE": base64.b64encode(signature).decode("ascii"),
        }
