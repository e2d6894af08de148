"""The task supervisor: every stage of a run in one TaskGroup, and the staged stop.

A failing stage stops the rest (the TaskGroup). Stopping is staged, whether the source ended (a replay) or `stop`
was set: intake first (the source is cancelled: the socket closes with 1000), then what was received is worked off
and flushed, then an in-flight post gets its budget, the resume point is saved under `asyncio.shield`, and only
then is everything else cancelled. The daemon says what each stage does; this module only says in what order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

Job = Coroutine[Any, Any, None]


@dataclass
class Stages:
    """The jobs of a run and the steps of its stop, in the order they happen."""

    source: Job  # the stream or the replay: cancelled first
    processor: Job | None  # works the queue off; ends after `end_intake`
    poster: Job | None  # posts from the outbox; drained by `drain_posts`, then cancelled
    background: dict[str, Job] = field(default_factory=dict)  # cancelled last
    end_intake: Callable[[], Awaitable[None]] | None = None  # tells the processor nothing more comes
    flush: Callable[[], Awaitable[int]] | None = None  # closes every open group; returns where to resume (ms)
    drain_posts: Callable[[], Awaitable[None]] | None = None
    save: Callable[[int], Awaitable[None]] | None = None  # saves the resume point


class Supervisor:
    """Runs `Stages` until the source ends or `stop` is set, then stops them in order."""

    def __init__(self, stop: asyncio.Event, *, on_stopping: Callable[[], object]) -> None:
        self.stop = stop
        self._on_stopping = on_stopping
        self.tasks: list[asyncio.Task[None]] = []

    def all_alive(self) -> bool:
        return not any(task.done() for task in self.tasks)

    async def run(self, stages: Stages) -> None:
        async with asyncio.TaskGroup() as group:
            start = group.create_task
            background = [start(job, name=name) for name, job in stages.background.items()]
            poster = start(stages.poster, name="poster") if stages.poster is not None else None
            source = start(stages.source, name="source")
            processor = start(stages.processor, name="pipeline") if stages.processor is not None else None
            self.tasks = [source, *background] + [t for t in (poster, processor) if t is not None]
            stop_requested = start(self._wait_stop(), name="stop-wait")

            await asyncio.wait({source, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
            self._on_stopping()
            # Stage 1: stop intake (closes the socket with 1000).
            source.cancel()
            stop_requested.cancel()
            await asyncio.wait({source, stop_requested})
            # Stage 2: work off what was received, close every open group, and keep the outbox complete.
            if processor is not None:
                if stages.end_intake is not None:
                    await stages.end_intake()
                await processor
            resume_from_ms = await stages.flush() if stages.flush is not None else 0
            # Stage 3: an in-flight post gets its budget to finish; what is still pending stays in the outbox.
            if poster is not None:
                if stages.drain_posts is not None:
                    await stages.drain_posts()
                poster.cancel()
            if stages.save is not None:
                await asyncio.shield(stages.save(resume_from_ms))
            for task in background:
                task.cancel()

    async def _wait_stop(self) -> None:
        await self.stop.wait()
