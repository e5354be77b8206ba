"""Answering NACKs within a budget, with bytes: the token bucket's refill, the per-packet repeat
rule (once per RTT, 10 ms at least, a few times in all), and the counters that show them."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ConfigError, load_settings
from relay.rtc import rtcp
from relay.rtc.nack import (
    MAX_RESENDS,
    MIN_RESEND_INTERVAL,
    RESEND_OVERHEAD,
    PacketHistory,
    RetransmissionBudget,
)
from relay.rtc.rtp import parse_rtp
from tests.unit.test_sfu import AIORTC_VIDEO_SSRC, VP8_KEYFRAME, Harness, rtp
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


def test_a_packet_is_resent_once_per_interval_with_a_floor_and_a_few_times_in_all() -> None:
    history = PacketHistory(64)
    history.store(7, b"seven", 10.0)
    # an unknown RTT (0): the 10 ms floor still spaces the resends
    assert history.resend(7, 10.0, 0.0) == b"seven"
    assert history.resend(7, 10.0 + MIN_RESEND_INTERVAL / 2, 0.0) is None
    assert history.resend(7, 10.0 + MIN_RESEND_INTERVAL * 1.1, 0.0) == b"seven"
    # a longer RTT spaces them more
    assert history.resend(7, 10.02 + 0.05, 0.1) is None
    assert history.resend(7, 10.02 + 0.1, 0.1) == b"seven"
    assert history.retransmissions == MAX_RESENDS == 3
    # the cap: never a fourth time, however long after
    assert history.resend(7, 11.0, 0.0) is None
    assert history.repeats_suppressed == 3
    # a new packet in the slot starts its own count
    history.store(7 + 64, b"new", 11.0)
    assert history.resend(7 + 64, 11.0, 0.0) == b"new"


def test_budget_refusal_does_not_count_as_a_resend() -> None:
    history = PacketHistory(64)
    history.store(1, b"x" * 100, 1.0)
    budget = RetransmissionBudget(0.5, floor=0.0, burst=100.0)
    assert history.resend(1, 1.0, budget=budget) is None
    assert history.budget_suppressed == 1 and history.retransmissions == 0
    budget.tokens = 100.0 + RESEND_OVERHEAD
    # refused by the budget, so not held back by the repeat rule now that it can pay
    assert history.resend(1, 1.0, budget=budget) == b"x" * 100
    assert budget.tokens == 0.0


def _forward(h: Harness, first: int, count: int, size: int = 1000) -> None:
    for seq in range(first, first + count):
        payload = VP8_KEYFRAME if seq == first else b"\x90\x10" + bytes(size)
        h.sfu.router.handle_datagram(rtp(AIORTC_VIDEO_SSRC, 97, seq, 9000, [], payload), h.alice)


def test_nack_storm_is_held_to_the_budget_and_counted() -> None:
    h = Harness()
    alice, _bob, video = video_call(h)
    h.alice = alice.publisher.addr
    _forward(h, 100, 200)
    out = [parse_rtp(d)[1] for d, a in h.sent if a == BOB and parse_rtp(d)[3] == video.ssrc]
    forwarded = video.bytes_sent
    h.sent.clear()
    nack = rtcp.nack(1234, video.ssrc, out[-200:])
    # a storm: the same 200 sequence numbers, 100 times a second for 2 s
    for _ in range(200):
        h.now += 0.01
        h.sfu.router.handle_datagram(nack, BOB)
    resent = [d for d, a in h.sent if a == BOB]
    resent_bytes = sum(len(d) for d in resent)
    share = h.sfu.settings.rtp.retransmission_budget
    grown = share * (video.bytes_sent - forwarded)  # nothing was forwarded during the storm
    allowed = RetransmissionBudget.BURST + RetransmissionBudget.FLOOR * 2.0 + grown
    assert resent_bytes <= allowed + 1100, (resent_bytes, allowed, forwarded)
    # no packet more than MAX_RESENDS times
    offsets = [parse_rtp(d)[5] for d in resent]
    osns = [int.from_bytes(d[o : o + 2], "big") for d, o in zip(resent, offsets, strict=True)]
    assert max(osns.count(seq) for seq in set(osns)) <= MAX_RESENDS
    metrics = h.sfu.metrics
    assert metrics.nacks_received == 200 * 200
    assert metrics.retransmissions == len(resent)
    assert metrics.retransmission_bytes == resent_bytes == video.retransmission_bytes
    suppressed = metrics.retransmissions_suppressed
    assert suppressed["budget"] > 0 and suppressed["repeat"] > 0
    answered = metrics.retransmissions + suppressed["budget"] + suppressed["repeat"]
    assert answered + video.history.misses == 200 * 200, video.history.misses
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
    h.alice = alice.publisher.addr
    _forward(h, 100, 100)
    h.sfu.router.handle_datagram(rtcp.nack(1234, video.ssrc, [1]), BOB)  # starts the budget
    budget = video.retransmission_budget
    assert budget is not None
    budget.tokens = 0.0
    before = video.bytes_sent
    _forward(h, 200, 50)
    h.sfu.router.handle_datagram(rtcp.nack(1234, video.ssrc, [1]), BOB)
    share = h.sfu.settings.rtp.retransmission_budget
    assert budget.tokens == pytest.approx(share * (video.bytes_sent - before))


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
