"""Capture files: one raw WebSocket text frame per line, exactly as received.

`read_chunks` streams a capture for `--replay` in constant memory; `Recorder` appends live frames for
`--record`. File I/O runs in a worker thread so the event loop keeps answering Kalshi's pings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_CHUNK_BYTES = 1 << 20


async def read_chunks(path: Path) -> AsyncIterator[list[bytes]]:
    """Yield the capture's non-empty lines, about a megabyte at a time, read off the event loop.

    The next chunk is read while the caller works on the current one.
    """
    handle = await asyncio.to_thread(path.open, "rb")
    pending = asyncio.ensure_future(asyncio.to_thread(handle.readlines, _CHUNK_BYTES))
    try:
        while True:
            lines = await pending
            if not lines:
                return
            pending = asyncio.ensure_future(asyncio.to_thread(handle.readlines, _CHUNK_BYTES))
            yield [line for line in lines if line.strip()]
    finally:
        # A read still running in its thread cannot be cancelled: let it finish before the file closes.
        with contextlib.suppress(Exception):
            await pending
        await asyncio.to_thread(handle.close)


class Recorder:
    """Buffers frames as they arrive and appends them to a capture file from a worker thread."""

    def __init__(self, path: Path, *, flush_every_s: float = 0.5) -> None:
        self.path = path
        self.frames_written = 0
        self._pending: list[str] = []
        self._flush_every_s = flush_every_s
        self._handle = path.open("a", encoding="utf-8")  # opened at start-up, before the loop is busy

    def record(self, raw: str) -> None:
        """Called for every frame received; never blocks."""
        self._pending.append(raw if raw.endswith("\n") else raw + "\n")

    async def run(self) -> None:
        """Write what has accumulated, every `flush_every_s`, until cancelled; then write the rest."""
        try:
            while True:
                await asyncio.sleep(self._flush_every_s)
                await self._write()
        finally:
            await asyncio.shield(self._write())
            await asyncio.to_thread(self._handle.close)

    async def _write(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        await asyncio.to_thread(self._write_sync, batch)
        self.frames_written += len(batch)

    def _write_sync(self, batch: list[str]) -> None:
        self._handle.writelines(batch)
        self._handle.flush()
