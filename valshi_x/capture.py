"""Capture files: one raw WebSocket text frame per line, exactly as received.

`read_chunks` streams a capture for `--replay` in constant memory; `Recorder` appends live frames for
`--record`. File I/O runs in a worker thread so the event loop keeps answering Kalshi's pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_CHUNK_BYTES = 1 << 20
_SNIFF_BYTES = 64 * 1024
# A capture is text; these are what a file that is not one usually starts with.
_ARCHIVE_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed (unpack it first: gzip -dc {path} > capture.jsonl)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed (unpack it first: zstd -dc {path} > capture.jsonl)"),
    (b"\xfd7zXZ\x00", "xz-compressed (unpack it first: xz -dc {path} > capture.jsonl)"),
    (b"BZh", "bzip2-compressed (unpack it first: bzip2 -dc {path} > capture.jsonl)"),
    (b"PK\x03\x04", "a zip archive (unpack the capture from it first)"),
    (b"SQLite format 3\x00", "an SQLite database (a state file?), not a capture"),
)
# Share of NUL or undecodable bytes above which a file is binary, not a capture with a few bad frames (those are
# skipped one by one as malformed, like on the socket).
_BINARY_SHARE = 0.05


def capture_problem(path: Path) -> str | None:
    """Why `path` cannot be a capture (compressed, binary), or None; reads its first 64 KiB.

    Blocking: for the edge, before anything starts. Without it a gzipped capture replays as thousands of
    malformed lines and no whale, exit 0.
    """
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    for magic, what in _ARCHIVE_MAGIC:
        if head.startswith(magic):
            return f"is {what.format(path=path)}; a capture is text, one frame per line, as --record writes it"
    if not head:
        return None
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + text.count("\x00")
    if bad > _BINARY_SHARE * len(text):
        return "is not text (binary data); a capture is text, one frame per line, as --record writes it"
    return None


async def read_chunks(path: Path) -> AsyncIterator[list[bytes]]:
    """Yield the capture's non-empty lines, about a megabyte at a time, read off the event loop.

    The next chunk is read while the caller works on the current one. A capture without a single frame gets a
    warning (`replay_no_frames`): a replay that silently finds nothing looks like one that found no whale.
    """
    handle = await asyncio.to_thread(path.open, "rb")
    pending = asyncio.ensure_future(asyncio.to_thread(handle.readlines, _CHUNK_BYTES))
    frames = 0
    try:
        while True:
            lines = await pending
            if not lines:
                if frames == 0:
                    log.warning("replay_no_frames", path=str(path), reason="no frames: the capture is empty")
                return
            pending = asyncio.ensure_future(asyncio.to_thread(handle.readlines, _CHUNK_BYTES))
            # Blank lines are skipped; `isspace` tests that without copying each line as `strip` would.
            chunk = [line for line in lines if not line.isspace()]
            frames += len(chunk)
            yield chunk
    finally:
        # A read still running in its thread cannot be cancelled: let it finish before the file closes.
        with contextlib.suppress(Exception):
            await pending
        await asyncio.to_thread(handle.close)


class Recorder:
    """Buffers frames as they arrive and appends them to a capture file from a worker thread.

    Recording is a side line: when the file stops taking frames (disk full, read-only, removed or replaced), one
    `recording_stopped` error is logged and recording ends; the daemon goes on reading and posting.
    """

    def __init__(self, path: Path, *, flush_every_s: float = 0.5) -> None:
        self.path = path
        self.frames_written = 0
        self.stopped_reason: str | None = None
        self._pending: list[str] = []
        self._flush_every_s = flush_every_s
        self._handle = path.open("a", encoding="utf-8")  # opened at start-up, before the loop is busy
        self._identity = _identity(os.fstat(self._handle.fileno()))

    def record(self, raw: str) -> None:
        """Called for every frame received; never blocks."""
        if self.stopped_reason is None:
            self._pending.append(raw if raw.endswith("\n") else raw + "\n")

    async def run(self) -> None:
        """Write what has accumulated, every `flush_every_s`, until cancelled; then write the rest.

        Keeps running (idle) after recording stopped, so the daemon sees no task end early.
        """
        try:
            while True:
                await asyncio.sleep(self._flush_every_s)
                await self._write()
        finally:
            await asyncio.shield(self._write())
            await asyncio.to_thread(self._close_sync)

    async def _write(self) -> None:
        if not self._pending or self.stopped_reason is not None:
            return
        batch, self._pending = self._pending, []
        try:
            await asyncio.to_thread(self._write_sync, batch)
        except OSError as exc:
            self._stop(f"{type(exc).__name__}: {exc}", lost=len(batch))
            return
        self.frames_written += len(batch)

    def _write_sync(self, batch: list[str]) -> None:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        # Appending to a file that was removed or replaced succeeds, into a file nobody can reach.
        if now is None or _identity(now) != self._identity:
            raise FileNotFoundError(errno.ENOENT, "the capture file was removed or replaced", str(self.path))
        self._handle.writelines(batch)
        self._handle.flush()

    def _stop(self, reason: str, *, lost: int) -> None:
        self.stopped_reason = reason
        self._pending = []
        log.error(
            "recording_stopped",
            path=str(self.path),
            reason=reason,
            frames_written=self.frames_written,
            frames_lost=lost,
            hint="the daemon goes on without recording; restart it to record again",
        )

    def _close_sync(self) -> None:
        # A close after a failed write flushes the same buffer again and fails the same way: already reported.
        with contextlib.suppress(OSError):
            self._handle.close()


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return (stat.st_dev, stat.st_ino)
