"""Answering NACKs within a budget, with bytes: the token bucket's refill, the per-packet repeat
rule (once per RTT, 10 ms at least, a few times in all), and the counters that show them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.config import ConfigError, load_settings
from relay.rtc import rtcp
from relay.rtc.nack import (
    MAX_RESENDS,
    MIN_RESEND_INTERVAL,
    RESEND_OVERHEAD,
    RetransmissionBudget,
)
from relay.rtc.rtp import parse_rtp
from tests.unit.harness import Harness
from tests.unit.test_sfu import AIORTC_VIDEO_SSRC, VP8_KEYFRAME, rtp
from tests.unit.test_sfu import _video_call as video_call

BOB = ("10.0.0.2", 5000)


def test_budget_starts_full_refills_by_share_and_floor_and_caps_at_burst() -> None:
    budget = RetransmissionBudget(0.5, floor=1000.0, burst=5000.0)
    budget.refill(forwarded=100_000, now=10.0)  # the first call only takes the reference
    assert budget.tokens == 5000.0
    assert budget.take(4000) and budget.tokens == 1000.0
    assert not budget.take(1001) and budget.tokens == 1000.0  # refused, nothing spent
    # 2000 bytes forwarded and 0.5 s later: 0.5 * 2000 + 1000 * 0.5 = 1500 more
    budget.refill(forwarded=102_000, now=10.5)
    assert budget.tokens == pytest.approx(2500.0)
    # never above the burst, however long the quiet
    budget.refill(forwarded=1_000_000, now=100.0)
    assert budget.tokens == 5000.0
    # a counter that went back (a new subscription object) and a clock that did never subtract
    budget.take(5000)
    budget.refill(forwarded=10, now=99.0)
    assert budget.tokens == 0.0


def test_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetransmissionBudget(-0.1)
    with pytest.raises(ValueError):
        RetransmissionBudget(0.5, burst=0)


def _call_with_ten_packets() -> tuple[Harness, Any, list[int]]:
    h = Harness()
    alice, _bob, video = video_call(h)
    h.alice = alice.publisher_leg.transport.addr
    h.sent.clear()  # the handshakes
    _forward(h, 100, 10)
    out = [parse_rtp(d)[1] for d, a in h.sent if a == BOB and parse_rtp(d)[3] == video.ssrc]
    return h, video, out


def test_a_packet_is_resent_once_per_rtt_and_a_few_times_in_all() -> None:
    h, video, out = _call_with_ten_packets()
    nack = rtcp.nack(1234, video.ssrc, [out[3]])
    responder = video.stream.nack
    assert responder is not None

    def ask(at: float) -> int:
        h.now = at
        h.sent.clear()
        h.receive(nack, BOB)
        return len([d for d, a in h.sent if a == BOB])

    start = h.now
    assert ask(start) == 1
    assert ask(start + MIN_RESEND_INTERVAL / 2) == 0  # sooner than 10 ms: a repeat
    assert ask(start + MIN_RESEND_INTERVAL * 1.1) == 1
    video.stream.round_trip_time = 0.1
    assert ask(start + 0.05) == 0  # within one RTT of the last resend
    assert ask(start + 0.2) == 1
    assert responder.retransmissions == MAX_RESENDS == 3
    assert ask(start + 1.0) == 0  # resent often enough
    assert responder.repeats_suppressed == 3
    # a packet the history never had is a miss, and asks the publisher for a keyframe
    before = h.sfu.metrics.keyframe_requests
    h.now += 1.0
    h.receive(rtcp.nack(1234, video.ssrc, [(out[-1] + 100) & 0xFFFF]), BOB)
    assert responder.misses == 1 and h.sfu.metrics.retransmission_misses == 1
    assert h.sfu.metrics.keyframe_requests == before + 1


def test_an_empty_budget_suppresses_and_counts() -> None:
    h, video, out = _call_with_ten_packets()
    responder = video.stream.nack
    assert responder is not None
    responder.budget.refill(video.stream.bytes_sent, h.now)
    responder.budget.tokens = 1000 + RESEND_OVERHEAD  # less than one packet and its overhead
    h.sent.clear()
    h.receive(rtcp.nack(1234, video.ssrc, [out[2]]), BOB)
    assert not [d for d, a in h.sent if a == BOB]
    assert responder.budget_suppressed == 1 and responder.retransmissions == 0
    assert h.sfu.metrics.retransmissions_suppressed["budget"] == 1


def test_a_budget_short_of_a_whole_nack_resends_the_oldest_packets_first() -> None:
    # the oldest missing packet holds the subscriber's decoder up the longest; a NACK need
    # not list it first (a client sorting numerically lists 3 before 65530 across a wrap)
    h, video, out = _call_with_ten_packets()
    responder = video.stream.nack
    assert responder is not None
    responder.budget.refill(video.stream.bytes_sent, h.now)
    responder.budget.tokens = 1100 + RESEND_OVERHEAD + 16  # one packet and its overhead
    h.sent.clear()
    h.receive(rtcp.nack(1234, video.ssrc, [out[8], out[2], out[5]]), BOB)
    resent = [d for d, a in h.sent if a == BOB]
    assert len(resent) == 1 and responder.budget_suppressed == 2
    offset = parse_rtp(resent[0])[5]
    assert int.from_bytes(resent[0][offset : offset + 2], "big") == out[2]  # RTX's OSN


def _forward(h: Harness, first: int, count: int, size: int = 1000) -> None:
    for seq in range(first, first + count):
        payload = VP8_KEYFRAME if seq == first else b"\x90\x10" + bytes(size)
        h.receive(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000, [], payload), h.alice)


def test_nack_storm_is_held_to_the_budget_and_counted() -> None:
    h = Harness()
    alice, _bob, video = video_call(h)
    h.alice = alice.publisher_leg.transport.addr
    h.sent.clear()  # the handshakes
    _forward(h, 100, 200)
    out = [parse_rtp(d)[1] for d, a in h.sent if a == BOB and parse_rtp(d)[3] == video.ssrc]
    forwarded = video.stream.bytes_sent
    h.sent.clear()
    h.wire.clear()
    nack = rtcp.nack(1234, video.ssrc, out[-200:])
    # a storm: the same 200 sequence numbers, 100 times a second for 2 s
    for _ in range(200):
        h.now += 0.01
        h.receive(nack, BOB)
    resent = [d for d, a in h.sent if a == BOB]
    assert len(resent) == len(h.wire_to(BOB)) and h.rejected == []
    resent_bytes = sum(len(d) for d in h.wire_to(BOB))  # on the wire, as the budget counts
    share = h.sfu.settings.rtp.retransmission_budget
    grown = share * (video.stream.bytes_sent - forwarded)  # nothing was forwarded during the storm
    allowed = RetransmissionBudget.BURST + RetransmissionBudget.FLOOR * 2.0 + grown
    assert resent_bytes <= allowed + 1100, (resent_bytes, allowed, forwarded)
    # no packet more than MAX_RESENDS times
    offsets = [parse_rtp(d)[5] for d in resent]
    osns = [int.from_bytes(d[o : o + 2], "big") for d, o in zip(resent, offsets, strict=True)]
    assert max(osns.count(seq) for seq in set(osns)) <= MAX_RESENDS
    metrics = h.sfu.metrics
    assert metrics.nacks_received == 200 * 200
    assert metrics.retransmissions == len(resent)
    assert metrics.retransmission_bytes == resent_bytes == video.stream.nack.retransmission_bytes
    suppressed = metrics.retransmissions_suppressed
    assert suppressed["budget"] > 0 and suppressed["repeat"] > 0
    answered = metrics.retransmissions + suppressed["budget"] + suppressed["repeat"]
    assert answered + video.stream.nack.misses == 200 * 200, video.stream.nack.misses
    stats = video.stats_dict()
    assert stats["retransmission_bytes"] == resent_bytes
    assert stats["retransmissions_budget_suppressed"] == suppressed["budget"]
    assert stats["retransmissions_repeat_suppressed"] == suppressed["repeat"]
    text = metrics.render()
    assert f"relay_nacks_received_total {200 * 200}" in text
    assert f"relay_retransmission_bytes_total {resent_bytes}" in text
    assert f'relay_retransmissions_suppressed_total{{reason="budget"}} {suppressed["budget"]}' in (
        text
    )


def test_budget_grows_with_what_the_subscription_is_forwarded() -> None:
    h = Harness()
    alice, _bob, video = video_call(h)
    h.alice = alice.publisher_leg.transport.addr
    _forward(h, 100, 100)
    h.receive(rtcp.nack(1234, video.ssrc, [1]), BOB)  # starts the budget
    budget = video.stream.nack.budget
    budget.tokens = 0.0
    before = video.stream.bytes_sent
    _forward(h, 200, 50)
    h.receive(rtcp.nack(1234, video.ssrc, [1]), BOB)
    share = h.sfu.settings.rtp.retransmission_budget
    assert budget.tokens == pytest.approx(share * (video.stream.bytes_sent - before))


@pytest.mark.parametrize("value", ["0", "-0.5", "2.5", '"half"'])
def test_bad_retransmission_budget_names_the_key(tmp_path: Path, value: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[rtp]\nretransmission_budget = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert str(info.value).startswith("rtp.retransmission_budget: ")
    assert "above 0 and at most 2" in str(info.value)


def test_retransmission_budget_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[rtp]\nretransmission_budget = 0.25\n", encoding="utf-8")
    assert load_settings(path, {}).rtp.retransmission_budget == 0.25
    env = {"RELAY_RTP__RETRANSMISSION_BUDGET": "1"}
    assert load_settings(None, env).rtp.retransmission_budget == 1.0
    assert load_settings(None, {}).rtp.retransmission_budget == 0.5
