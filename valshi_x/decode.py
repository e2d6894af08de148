"""The one bounded JSON decoder for everything a peer sends us: WebSocket frames, capture lines, REST bodies.

Pure: no asyncio, no I/O. A peer must not be able to make a decode crash the daemon (`[` x 1000 raises
RecursionError in any recursive decoder), eat memory (a 1 GB frame) or stall the event loop, so every input is
checked against a size limit before it is decoded and a nesting limit after, and every way decoding can fail
comes out as one exception type, `DecodeRefused`, with a short snake_case `reason`:

    too_large   more bytes (or characters) than the caller's limit, or more than MAX_CONTAINERS arrays/objects
    too_deep    arrays/objects nested deeper than `max_depth`
    not_json    anything the JSON decoder itself refuses (syntax, numbers beyond 64-bit/double range, ...)

Callers translate it: the normalizer into `MalformedTrade` (a `malformed_frame` line), the REST client into
`KalshiRestError`. Limits on the values inside (digits, decimals, lengths) belong to whoever reads them
(`valshi_x.trades` for trades).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

# A trade frame is about 400 bytes; nothing Kalshi sends on the trade channel comes near this.
MAX_FRAME_BYTES: Final = 64 * 1024
# A trades page of 1,000 trades is about 500 KB; an event with all its markets, well under a megabyte.
MAX_REST_BODY_BYTES: Final = 8 * 1024 * 1024
# Kalshi's answers nest three or four levels; this leaves room and stays far below Python's recursion limit.
MAX_DEPTH: Final = 32
# A trades page of 1,000 trades holds about 1,000 objects; an event with its markets a few hundred.
MAX_CONTAINERS: Final = 20_000


class DecodeRefused(ValueError):
    """Input that was not decoded; `reason` is too_large, too_deep or not_json, `detail` a short excerpt."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _openers(raw: str | bytes) -> int:
    """How many `[` and `{` `raw` holds (inside strings too): an upper bound on its arrays and objects, counted at C
    speed before anything is decoded."""
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{")
    return raw.count(b"[") + raw.count(b"{")


def shape_problem(value: Any, max_depth: int, max_containers: int = MAX_CONTAINERS) -> str | None:
    """ "too_deep" or "too_large" when the decoded arrays/objects of `value` nest deeper than `max_depth` or number
    more than `max_containers`; None when the shape is fine.

    A walk over the decoded containers, not a scan of the text, and one that stops at the first problem: its work
    is bounded by `max_containers` whatever the input, so no body can hold the event loop (a character scan in
    Python took seconds on an 8 MB body of brackets). Nesting past the decoder's own recursion limit never gets
    here: the decoder raises RecursionError.
    """
    if not isinstance(value, list | dict):
        return None
    stack: list[tuple[Any, int]] = [(value, 1)]
    containers = 1
    while stack:
        container, depth = stack.pop()
        for item in container.values() if isinstance(container, dict) else container:
            if isinstance(item, list | dict):
                containers += 1
                if depth >= max_depth:
                    return "too_deep"
                if containers > max_containers:
                    return "too_large"
                if item:  # an empty one holds nothing to look at
                    stack.append((item, depth + 1))
    return None


def decode_json(raw: str | bytes | bytearray, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Decode `raw` as JSON within the limits; raises `DecodeRefused`, never anything else."""
    if isinstance(raw, bytearray):
        raw = bytes(raw)
    if len(raw) > max_bytes:
        raise DecodeRefused("too_large", f"{len(raw)} > {max_bytes}")
    openers = _openers(raw)
    if openers > MAX_CONTAINERS:
        # Decoding millions of tiny containers alone takes seconds (8 MB of `[[1]],`): refused unread.
        raise DecodeRefused("too_large", f"over {MAX_CONTAINERS} arrays/objects")
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError (numbers out of range) included
        raise DecodeRefused("not_json", str(exc)[:80]) from None
    except RecursionError:  # the decoder's own guard, for nesting in the thousands
        raise DecodeRefused("too_deep", "recursion limit") from None
    # With no more openers than `max_depth` in all (a trade frame has two) the nesting cannot exceed it: no walk.
    if openers > max_depth and (problem := shape_problem(value, max_depth)) is not None:
        limit = f"nesting over {max_depth}" if problem == "too_deep" else f"over {MAX_CONTAINERS} arrays/objects"
        raise DecodeRefused(problem, limit)
    return value
