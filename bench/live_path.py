"""CPU per frame of the live reader path, in one process and without a socket: repeatable on a busy machine.

The loopback bench (`live_latency.py`) measures what matters, frames per second with the sender in another
process, but on a shared 2-core VM its figures swing with the neighbours' load. This one feeds generated trade
frames, already framed as a server sends them (unmasked text frames), to the daemon's real connection object in
reads of `--read-bytes`, and lets the daemon's real queue consumer (`Intake.run`, the pipeline, the
detector) run between reads, as the event loop does. It reports CPU µs per frame, split into the reader's share
(cutting, decoding, seq checks, queueing) and the consumer's, each against the floor of reading and typing the
same frames with msgspec. `--repo` points it at another checkout, to compare two trees in one session:

    .venv/bin/python bench/live_path.py --repo /tmp/main-copy && .venv/bin/python bench/live_path.py

Ratios between runs are meaningful; absolute µs follow the machine's load (run both trees more than once).
For an instruction count that load cannot move: `valgrind --tool=callgrind .venv/bin/python bench/live_path.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def generate(frames: int, seed: int) -> list[str]:
    """Trade frames in today's format (a few in older shapes, as the generator makes them), trade time ending now."""
    import gen_capture  # noqa: PLC0415  (a sibling script)

    rate = 100_000
    start_ms = int(time.time() * 1000) - frames * 1000 // rate - 1000
    spec = gen_capture.CaptureSpec(
        frames=frames,
        seed=seed,
        whales=max(1, frames // 20_000),
        malformed_sets=0,
        rate_per_s=rate,
        bursts=False,
        start_ms=start_ms,
        sweep_window_ms=1000,
        edge_cases=False,
    )
    return [line for _, line, trade_id in gen_capture.CaptureGenerator(spec).frames(first_seq=1) if trade_id]


async def run(lines: list[str], read_bytes: int, state_dir: Path) -> dict[str, Any]:
    from websockets.client import ClientProtocol  # noqa: PLC0415
    from websockets.protocol import State  # noqa: PLC0415
    from websockets.uri import parse_uri  # noqa: PLC0415

    from valshi_x.config import load_settings  # noqa: PLC0415
    from valshi_x.daemon import Daemon, RunOptions  # noqa: PLC0415
    from valshi_x.kalshi.stream import ObservedConnection, TradeStream  # noqa: PLC0415

    class NullTransport(asyncio.Transport):
        def write(self, data: Any) -> None:
            pass

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

        def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
            pass

    settings = load_settings({"STATE_DIR": str(state_dir), "FRAME_QUEUE_SIZE": "1000000"}, need_x=False)
    daemon = Daemon(settings, RunOptions(dry_run=True))
    pipeline = daemon.pipeline
    consumer_s = 0.0
    on_trades = pipeline.on_trades

    def timed_on_trades(frames: Any) -> Any:
        nonlocal consumer_s
        started = time.process_time()
        try:
            return on_trades(frames)
        finally:
            consumer_s += time.process_time() - started

    pipeline.on_trades = timed_on_trades  # type: ignore[method-assign]
    alerts: list[Any] = []

    class CountingSink:  # no outbox or poster here: the alerts are only counted
        async def submit(self, found: list[Any]) -> None:
            alerts.extend(found)

    intake = getattr(daemon, "intake", None)
    if intake is not None:  # the queue in a module of its own (valshi_x/intake.py)
        deliver, on_bad_frame, on_gap = intake.enqueue, intake.on_bad_frame, daemon.recovery.on_gap
        consume, end = (lambda: intake.run(CountingSink())), intake.end
    else:  # a tree from before (the queue and the sink inside the daemon)
        daemon._submit = CountingSink().submit  # type: ignore[attr-defined]
        deliver, on_bad_frame, on_gap = daemon._enqueue, daemon._on_bad_frame, daemon._on_gap  # type: ignore[attr-defined]
        consume, end = daemon._process_queue, (lambda: daemon.queue.put(None))  # type: ignore[attr-defined]
    stream = TradeStream(
        url="ws://127.0.0.1/trade-api/ws/v2", signer=None, deliver=deliver, on_bad_frame=on_bad_frame, on_gap=on_gap
    )
    protocol = ClientProtocol(parse_uri(stream.url))
    protocol.state = State.OPEN
    connection = ObservedConnection(protocol)
    connection.connection_made(NullTransport())
    stream._begin_session(connection)
    stream.sid = 1
    stream.last_seq[1] = 0
    stream._deliver = stream._deliver_trade
    if hasattr(stream, "_take_read"):
        assert connection.take_text_frames(stream._take_read)
    else:  # a tree from before the per-read path (main up to 05da02b): a sink per frame, a call per read
        assert connection.take_text_frames(stream._handle, stream._read_done)  # type: ignore[call-arg, attr-defined, arg-type]

    from live_latency import ws_text_frame  # noqa: PLC0415  (bench/ is on the path: `main`)

    wire = b"".join(ws_text_frame(line.encode()) for line in lines)
    reads = [wire[at : at + read_bytes] for at in range(0, len(wire), read_bytes)]
    consumer = asyncio.get_running_loop().create_task(consume())
    data_received = connection.data_received
    await asyncio.sleep(0)
    started = time.process_time()
    for chunk in reads:
        data_received(chunk)
        await asyncio.sleep(0)  # the consumer takes what the read queued, as the event loop would
    await asyncio.sleep(0)
    total_s = time.process_time() - started
    await end()
    await consumer
    counts = pipeline.counts
    return {
        "frames": len(lines),
        "frames_seen": counts.frames,
        "trades": counts.trades,
        "malformed": counts.malformed,
        "gaps": stream.gaps,
        "alerts": len(alerts),
        "dropped": (intake or daemon).frames_dropped,
        "reads": len(reads),
        "total_us": total_s / len(lines) * 1e6,
        "reader_us": (total_s - consumer_s) / len(lines) * 1e6,
        "consumer_us": consumer_s / len(lines) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=BENCH.parent, help="the checkout whose valshi_x is measured")
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--read-bytes", type=int, default=65_536, help="bytes per socket read")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(args.repo.resolve()), str(BENCH)]
    import structlog  # noqa: PLC0415

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    lines = generate(args.frames, args.seed)
    from live_latency import typed_decode_floor_us  # noqa: PLC0415

    import valshi_x  # noqa: PLC0415

    print(f"{Path(valshi_x.__file__).parent.parent}: {len(lines):,} frames, reads of {args.read_bytes:,} bytes")
    for _ in range(args.rounds):
        floor = typed_decode_floor_us(lines, args.repo.resolve(), rounds=1)
        with tempfile.TemporaryDirectory(prefix="valshi-path-") as tmp:
            result = asyncio.run(run(lines, args.read_bytes, Path(tmp)))
        print(
            f"  total {result['total_us']:.2f} µs/frame = reader {result['reader_us']:.2f} + consumer "
            f"{result['consumer_us']:.2f}; floor {floor:.2f} (total {result['total_us'] / floor:.1f}x floor, "
            f"reader {result['reader_us'] / floor:.1f}x); trades {result['trades']:,}, malformed "
            f"{result['malformed']}, alerts {result['alerts']}, gaps {result['gaps']}, dropped {result['dropped']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
