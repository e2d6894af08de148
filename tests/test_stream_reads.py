"""A read's worth of text frames at once (`TradeStream._take_read`, the plain socket's path) ends exactly as the
same frames handled one by one (`TradeStream._handle`, the path of frames websockets reads).

The per-read loop keeps the common case inline (today's trade frame, next in its subscription's seq) and leaves
everything else to the per-frame code; whatever the mix of reads, gaps, repeats, frames without a usable seq,
second subscriptions, repeated acks, unsubscriptions, error frames (odd codes too), legacy or malformed frames
and non-ASCII text, both must deliver the same frames, see the same gaps with the same frames delivered before
each, refuse the same frames, record the same text and count the same, and no batch may exceed MAX_BATCH_FRAMES.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_kalshi import dumps, trade_msg
from valshi_x.kalshi import stream as stream_module
from valshi_x.kalshi.stream import SeqGap, TradeStream
from valshi_x.trades import MalformedTrade, TradeFrame

NOW_MS = 1_796_126_073_613
SMALL_BATCH = 5  # MAX_BATCH_FRAMES in these tests, so that reads of a few dozen frames cross it

step = st.sampled_from(["next"] * 8 + ["skip", "repeat", "back", "none", "text", "zero"])


@st.composite
def frame_texts(draw: st.DrawFn) -> list[str]:
    """A subscription's ack, then a mix of frames in the shapes the stream meets (see the module docstring)."""
    last: dict[int, int] = {1: 0}
    texts = [dumps({"id": 1, "type": "subscribed", "msg": {"channel": "trade", "sid": 1}})]
    for index in range(draw(st.integers(min_value=0, max_value=40))):
        kind = draw(
            st.sampled_from(["trade"] * 12 + ["subscribed", "error", "ok", "unsubscribed", "garbage", "malformed"])
        )
        sid = draw(st.sampled_from([1, 1, 1, 2]))
        how = draw(step)
        seq: Any = {
            "next": last.get(sid, 0) + 1,
            "skip": last.get(sid, 0) + draw(st.integers(min_value=2, max_value=5)),
            "repeat": last.get(sid, 0),
            "back": max(1, last.get(sid, 0) - 2),
            "none": None,
            "text": str(last.get(sid, 0) + 1),
            "zero": 0,
        }[how]
        if type(seq) is int and seq >= 1:
            last[sid] = seq
        if kind == "subscribed":
            last[2] = 0
            texts.append(dumps({"id": 2, "type": "subscribed", "msg": {"channel": "trade", "sid": 2}}))
            continue
        if kind == "garbage":
            texts.append("not json {")
            continue
        envelope: dict[str, Any] = {"type": kind, "sid": sid}
        if seq is not None:
            envelope["seq"] = seq
        if kind == "unsubscribed":
            envelope["id"] = 3
            last[sid] = 0  # the sid's tracking ends; the generator may use it again from 1
        elif kind == "error":
            envelope["msg"] = {"code": draw(st.sampled_from([6, 8, 6.0, 8.5, True])), "msg": "no"}
            envelope["id"] = 99
        elif kind in ("trade", "malformed"):
            envelope["type"] = "trade"
            msg = trade_msg(ts_ms=NOW_MS - 1000 + index, trade_id=f"id-{index}")
            if draw(st.booleans()):
                msg["market_ticker"] = "KXÉTÉ-1"  # not ASCII: the cutter hands it over as str
            if draw(st.integers(min_value=0, max_value=5)) == 0:
                del msg["ts_ms"]  # legacy `ts` only: the careful path
            if kind == "malformed":
                msg["count_fp"] = "-3"
            envelope["msg"] = msg
        texts.append(dumps(envelope))
    return texts


class Seen:
    """Everything a stream told its callbacks, with how many frames it had delivered at each gap/subscription."""

    def __init__(self) -> None:
        self.delivered: list[TradeFrame] = []
        self.batch_sizes: list[int] = []
        self.events: list[tuple[Any, ...]] = []
        self.refused: list[str] = []
        self.recorded: list[str] = []

    def stream(self) -> TradeStream:
        return TradeStream(
            url="ws://127.0.0.1/trade-api/ws/v2",
            signer=None,
            deliver=self.deliver,
            on_bad_frame=self.bad,
            record=self.recorded.append,
            on_gap=self.gap,
            on_subscribed=self.subscribed,
        )

    def deliver(self, batch: list[TradeFrame]) -> None:
        self.delivered.extend(batch)
        self.batch_sizes.append(len(batch))

    def bad(self, raw: str | bytes, exc: MalformedTrade) -> None:
        assert isinstance(raw, str)  # as it always was: the frame's text
        self.refused.append(exc.reason)

    def gap(self, gap: SeqGap) -> None:
        self.events.append(("gap", gap, len(self.delivered)))

    def subscribed(self, sid: int) -> None:
        self.events.append(("subscribed", sid, len(self.delivered)))


def counts(stream: TradeStream) -> tuple[Any, ...]:
    return (
        stream.frames,
        stream.gaps,
        stream.frames_missing,
        stream.seq_unreadable,
        stream.seq_repeated,
        stream.error_frames,
        dict(stream.last_seq),
        stream.sid,
        stream._end,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame_texts(), st.lists(st.integers(min_value=1, max_value=12), max_size=8))
def test_a_read_at_once_ends_as_its_frames_one_by_one(texts: list[str], read_sizes: list[int]) -> None:
    one_by_one, per_read = Seen(), Seen()
    reference = one_by_one.stream()
    for text in texts:
        reference._handle(text)
    reference._flush()

    stream = per_read.stream()
    payloads: list[bytes | str] = [t.encode() if t.isascii() else t for t in texts]  # as the cutter hands them
    with mock.patch.object(stream_module, "MAX_BATCH_FRAMES", SMALL_BATCH):
        at = 0
        for size in [*read_sizes, len(payloads)]:
            if at < len(payloads):
                stream._take_read(payloads[at : at + size])
                at += size

    assert per_read.delivered == one_by_one.delivered
    assert per_read.events == one_by_one.events
    assert per_read.refused == one_by_one.refused
    assert per_read.recorded == one_by_one.recorded == texts
    assert counts(stream) == counts(reference)
    assert all(0 < size <= SMALL_BATCH for size in per_read.batch_sizes)


def test_a_long_read_is_delivered_in_bounded_batches_and_a_gap_cuts_one() -> None:
    seen = Seen()
    stream = seen.stream()
    stream.last_seq[1] = 0
    seqs = [*range(1, 1501), *range(1600, 2600)]  # 99 frames missing between 1500 and 1600
    payloads: list[bytes | str] = [
        dumps({"type": "trade", "sid": 1, "seq": seq, "msg": trade_msg(ts_ms=NOW_MS, trade_id=f"id-{seq}")}).encode()
        for seq in seqs
    ]
    stream._take_read(payloads)
    assert [f.seq for f in seen.delivered] == seqs
    assert max(seen.batch_sizes) <= stream_module.MAX_BATCH_FRAMES
    assert seen.batch_sizes[:2] == [1024, 476]  # the gap ends a batch: the frame after it starts the next
    assert seen.events == [("gap", SeqGap(sid=1, expected=1501, got=1600), 1500)]
    assert (stream.frames, stream.gaps, stream.frames_missing, stream.last_seq) == (2500, 1, 99, {1: 2599})
