"""The one bounded JSON decoder for everything a peer sends us: WebSocket frames, capture lines, REST bodies.

Pure: no asyncio, no I/O. A peer must not be able to make a decode crash the daemon (`[` x 1000 raises
RecursionError in any recursive decoder), eat memory (a 1 GB frame) or stall the event loop, so every input is
checked against a size and a nesting limit before it is decoded, and every way decoding can fail comes out as
one exception type, `DecodeRefused`, with a short snake_case `reason`:

    too_large   more bytes (or characters) than the caller's limit
    too_deep    arrays/objects nested deeper than `max_depth`
    not_json    anything the JSON decoder itself refuses (syntax, numbers beyond 64-bit/double range, ...)

Callers translate it: the normalizer into `MalformedTrade` (a `malformed_frame` line), the REST client into
`KalshiRestError`. Limits on the values inside (digits, decimals, lengths) belong to whoever reads them
(`valshi_x.trades` for trades).
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

# A trade frame is about 400 bytes; nothing Kalshi sends on the trade channel comes near this.
MAX_FRAME_BYTES: Final = 64 * 1024
# A trades page of 1,000 trades is about 500 KB; an event with all its markets, well under a megabyte.
MAX_REST_BODY_BYTES: Final = 8 * 1024 * 1024
# Kalshi's answers nest three or four levels; this leaves room and stays far below Python's recursion limit.
MAX_DEPTH: Final = 32

# A JSON string (skipped whole, so brackets inside it do not count) or one bracket.
_TOKENS_TEXT = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_TOKENS_BYTES = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


class DecodeRefused(ValueError):
    """Input that was not decoded; `reason` is too_large, too_deep or not_json, `detail` a short excerpt."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def nesting_depth_exceeds(raw: str | bytes, max_depth: int) -> bool:
    """True when arrays/objects in `raw` nest deeper than `max_depth` (brackets inside strings do not count).

    Cheap for ordinary input: with no more openers than `max_depth` in all, the nesting cannot exceed it, and
    only input with more (a REST page, an attack) is scanned.
    """
    if isinstance(raw, str):
        if raw.count("[") + raw.count("{") <= max_depth:
            return False
        tokens = (m.group()[:1] for m in _TOKENS_TEXT.finditer(raw))
        opens, closes = "[{", "]}"
    else:
        if raw.count(b"[") + raw.count(b"{") <= max_depth:
            return False
        tokens = (chr(m.group()[0]) for m in _TOKENS_BYTES.finditer(raw))
        opens, closes = "[{", "]}"
    depth = 0
    for token in tokens:
        if token in opens:
            depth += 1
            if depth > max_depth:
                return True
        elif token in closes:
            depth -= 1
    return False


def decode_json(raw: str | bytes | bytearray, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Decode `raw` as JSON within the limits; raises `DecodeRefused`, never anything else."""
    if isinstance(raw, bytearray):
        raw = bytes(raw)
    if len(raw) > max_bytes:
        raise DecodeRefused("too_large", f"{len(raw)} > {max_bytes}")
    if nesting_depth_exceeds(raw, max_depth):
        raise DecodeRefused("too_deep", f"nesting over {max_depth}")
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError (numbers out of range) included
        raise DecodeRefused("not_json", str(exc)[:80]) from None
    except RecursionError:  # unreachable after the depth check; kept so no input can ever crash a caller
        raise DecodeRefused("too_deep", "recursion limit") from None
