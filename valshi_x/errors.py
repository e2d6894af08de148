"""The project's own exceptions. Library code raises these; only `__main__` turns them into exit codes.

ValshiError
+-- ConfigError        bad settings or key material: exit 78 before anything connects
|   +-- KeyLoadError   the Kalshi private key is missing, unreadable, encrypted, or not RSA/Ed25519
"""

from __future__ import annotations


class ValshiError(Exception):
    """Base of every exception this package raises on purpose."""


class ConfigError(ValshiError):
    """One or more settings are wrong; `problems` holds one line per bad key, each starting with the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class KeyLoadError(ConfigError):
    """The Kalshi private key cannot be used."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__([f"{key}: {problem}"])
