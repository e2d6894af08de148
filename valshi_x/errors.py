"""The project's own exceptions. Library code raises these; only `__main__` turns them into exit codes.

ValshiError
+-- ConfigError          bad settings or key material: exit 78 before anything connects
|   +-- KeyLoadError     the Kalshi private key is missing, unreadable, encrypted, or not RSA/Ed25519
|   +-- StateError       the state directory needs a human: in use by another process, or corrupt (exit 78)
+-- StateUnavailable     the state cannot be opened for a passing reason (disk full, locked, I/O error): exit 1,
                         so systemd tries again
"""

from __future__ import annotations


class ValshiError(Exception):
    """Base of every exception this package raises on purpose."""


class ConfigError(ValshiError):
    """One or more settings are wrong; `problems` holds one line per bad key, each starting with the key."""

    label = "configuration error"  # how `__main__` introduces each problem line

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class KeyLoadError(ConfigError):
    """The Kalshi private key cannot be used."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__([f"{key}: {problem}"])


class StateError(ConfigError):
    """The state directory cannot be used until someone acts: another daemon holds it, or the database is corrupt."""

    label = "state error"

    def __init__(self, problem: str) -> None:
        super().__init__([problem])


class StateUnavailable(ValshiError):
    """The state cannot be opened right now (disk full, locked, I/O error); a later start may well succeed."""
