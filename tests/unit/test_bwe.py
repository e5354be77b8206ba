"""Receive-side bandwidth estimation for REMB, with synthetic arrival streams."""

from __future__ import annotations

import random
from collections import deque

import pytest

from relay.rtc import rtcp
from relay.rtc.bwe import RembEstimator, abs_send_time

SIZE = 1200


def ast(t: float) -> int:
    """abs-send-time (6.18 fixed point seconds, 24 bits) of a send time."""
    return int(t * 262144) & 0xFFFFFF


def feed_steady(
    est: RembEstimator,
    rate: float,
    start: float,
    end: float,
    *,
    send_times: bool = False,
    jitter: float = 0.0,
    rng: random.Random | None = None,
    sender_offset: float = 0.0,
) -> float:
    """Packets of SIZE bytes at ``rate`` bits/s over an uncongested path; returns the end."""
    interval = SIZE * 8 / rate
    t = start
    while t < end:
        arrival = t + (rng.uniform(0, jitter) if rng and jitter else 0.0)
        est.on_packet(SIZE, arrival, ast(t + sender_offset) if send_times else None)
        t += interval
    return t


def run_steady(
    est: RembEstimator, rate: float, start: float, end: float, values: list[int] | None = None
) -> float:
    """Feed ``rate`` in 100 ms steps, updating the estimate after each (collected in
    ``values``); returns the end."""
    t = following = start
    while t < end - 1e-9:
        t += 0.1
        following = feed_steady(est, rate, following, t)  # the packet phase carries over
        value = est.estimate(t)
        if values is not None and value is not None:
            values.append(value)
    return t


def test_not_ready_without_enough_data() -> None:
    est = RembEstimator()
    assert est.estimate(0.0) is None and not est.should_send(0.0)
    est.on_packet(SIZE, 1.0)
    assert est.estimate(1.1) is None  # warm-up: 0.3 s of arrivals
    assert est.incoming_rate(1.1) is not None
    feed_steady(est, 500_000, 1.0, 1.5)
    assert est.estimate(1.5) == 1_000_000  # the start bitrate, above the measured rate


def test_steady_rate_rises_above_incoming_towards_max() -> None:
    est = RembEstimator(min_bitrate=100_000, max_bitrate=5_000_000, start_bitrate=300_000)
    values: list[int] = []
    t = run_steady(est, 500_000, 0.0, 20.0, values)
    assert values == sorted(values)  # never decreases without loss or delay
    assert est.incoming_rate(t) == pytest.approx(500_000, rel=0.05)
    # probe headroom: well above what arrives, up to 1.5 x measured + 150 kbit/s
    assert values[-1] >= 1.3 * 500_000
    assert values[-1] <= 1.5 * 1.05 * 500_000 + 150_000  # (measured +-5 %)
    assert est.decreases == 0 and est.state in ("increase", "hold")


def test_steady_rate_reaches_a_low_max() -> None:
    est = RembEstimator(min_bitrate=50_000, max_bitrate=600_000, start_bitrate=300_000)
    t = run_steady(est, 500_000, 0.0, 10.0)
    assert est.estimate(t) == 600_000


def test_heavy_loss_falls_then_recovers() -> None:
    est = RembEstimator(min_bitrate=100_000, max_bitrate=5_000_000)
    t = run_steady(est, 1_000_000, 0.0, 5.0)
    before = est.estimate(t)
    assert before is not None and before > 1_000_000
    est.on_loss(0.3)
    t += 0.01
    after = est.estimate(t)
    measured = est.incoming_rate(t)
    assert measured is not None and measured == pytest.approx(1_000_000, rel=0.05)
    assert after == pytest.approx(0.85 * measured, rel=0.01)
    assert est.state == "decrease" and est.decreases == 1
    # the same report does not decrease again, and the loss holds the estimate
    t = run_steady(est, 1_000_000, t, 6.0)
    assert est.estimate(t) == after and est.state == "hold"
    est.on_loss(0.0)
    t = run_steady(est, 1_000_000, t, 9.0)
    assert est.estimate(t) > after  # increasing again


def test_moderate_loss_holds() -> None:
    est = RembEstimator()
    t = run_steady(est, 800_000, 0.0, 1.0)
    est.on_loss(0.05)
    held = est.estimate(t)
    t = run_steady(est, 800_000, t, 3.0)
    assert est.estimate(t) == held and est.state == "hold"


def test_delay_overuse_decreases_below_capacity() -> None:
    est = RembEstimator(min_bitrate=100_000, max_bitrate=5_000_000)
    capacity = 1_000_000
    interval = SIZE * 8 / 1_500_000  # sending 1.5 Mbit/s into a 1 Mbit/s bottleneck
    link_free = 0.0
    t = 0.0
    lowest = None
    while t < 4.0:
        link_free = max(t, link_free) + SIZE * 8 / capacity
        est.on_packet(SIZE, link_free + 0.02, ast(t))
        t += interval
        if int(t * 100) % 10 == 0:
            value = est.estimate(t)
            if value is not None and est.state == "decrease":
                lowest = value if lowest is None else min(lowest, value)
    assert est.decreases >= 1
    assert lowest is not None and lowest < capacity
    assert est.bitrate is not None and est.bitrate < capacity
    queue, growth = est.delay_signal(t)[1], est.delay_signal(t)[0]  # type: ignore[index]
    assert queue > 0.1 and growth > 0.2


def test_jitter_without_congestion_is_not_overuse() -> None:
    rng = random.Random(11)
    est = RembEstimator(max_bitrate=5_000_000)
    t = 0.0
    while t < 15.0:
        feed_steady(est, 1_000_000, t, t + 0.1, send_times=True, jitter=0.008, rng=rng)
        t += 0.1
        est.estimate(t)
    assert est.decreases == 0
    assert est.bitrate is not None and est.bitrate > 1_300_000


def test_abs_send_time_wrap_is_not_a_delay_jump() -> None:
    est = RembEstimator(max_bitrate=5_000_000)
    t = 0.0
    while t < 6.0:  # the sender's clock crosses the 64 s abs-send-time wrap at t = 3
        feed_steady(est, 1_000_000, t, t + 0.1, send_times=True, sender_offset=61.0)
        t += 0.1
        est.estimate(t)
    assert est.decreases == 0
    signal = est.delay_signal(t)
    assert signal is not None and abs(signal[0]) < 0.01 and abs(signal[1]) < 0.005


def test_should_send_cadence_and_drops() -> None:
    est = RembEstimator(max_bitrate=5_000_000)
    t = run_steady(est, 1_000_000, 0.0, 0.5)
    assert est.should_send(t)  # the first estimate
    t = run_steady(est, 1_000_000, t, 0.7)
    assert not est.should_send(t)
    t = run_steady(est, 1_000_000, t, 1.4)
    assert not est.should_send(t)
    t = run_steady(est, 1_000_000, t, 1.5)
    assert est.should_send(t)  # a second later
    est.on_loss(0.5)
    t += 0.05
    assert est.should_send(t)  # a drop of more than 3 %: at once
    value = est.estimate(t)
    assert value is not None
    remb = rtcp.remb(1, value, [0x1234])
    (packet,) = rtcp.parse_rtcp(remb)
    assert isinstance(packet, rtcp.Remb) and packet.bitrate <= value
    assert packet.bitrate > value * 0.999


def test_estimate_is_idempotent_at_the_same_time() -> None:
    est = RembEstimator()
    t = run_steady(est, 700_000, 0.0, 2.0)
    first = est.estimate(t)
    assert est.estimate(t) == first


def test_bounded_under_random_input() -> None:
    rng = random.Random(99)
    est = RembEstimator(min_bitrate=80_000, max_bitrate=2_000_000)
    t = 0.0
    for _ in range(20000):
        t += rng.expovariate(1 / 0.003)
        est.on_packet(
            rng.randrange(50, 1300), t, rng.getrandbits(24) if rng.random() < 0.3 else None
        )
        if rng.random() < 0.01:
            est.on_loss(rng.random())
        if rng.random() < 0.05:
            value = est.estimate(t)
            assert value is None or 80_000 <= value <= 2_000_000


def test_constructor_validation_and_helpers() -> None:
    with pytest.raises(ValueError):
        RembEstimator(min_bitrate=0)
    with pytest.raises(ValueError):
        RembEstimator(min_bitrate=2_000, max_bitrate=1_000)
    assert RembEstimator(start_bitrate=10**9, max_bitrate=10**6).start_bitrate == 10**6
    assert abs_send_time(b"\x01\x02\x03") == 0x010203
    with pytest.raises(ValueError):
        abs_send_time(b"\x01")


# --- closed loop: a REMB-only libwebrtc-like publisher --------------------------------------


def closed_loop(
    *,
    capacity: float,
    camera_max: float = 1_500_000,
    duration: float = 15.0,
    send_times: bool = True,
) -> list[tuple[float, float]]:
    """A publisher modelled on libwebrtc's SendSideBandwidthEstimation with REMB as the only
    feedback: starts at 300 kbit/s; during its start phase (2 s from the first receiver
    report) it adopts a higher REMB as is; afterwards it grows ~8 %/s from the minimum of its
    last second, and never sends above the REMB. Its encoder follows the target with a 1 s
    time constant up to ``camera_max``. The path is a FIFO bottleneck of ``capacity`` with
    20 ms propagation and a 1 s drop-tail queue; the relay sends receiver reports every
    second and a REMB whenever ``should_send`` says so (polled every 100 ms).
    Returns (time, encoder rate) samples."""
    est = RembEstimator(min_bitrate=50_000, max_bitrate=10_000_000)
    step = 0.005
    current = 300_000.0
    remb: float | None = None
    first_report: float | None = None
    history: deque[tuple[float, float]] = deque()
    encoder = 240_000.0
    credit = 0.0
    link_free = 0.0
    in_flight: deque[tuple[float, int]] = deque()  # REMBs on their way to the publisher
    received = lost = 0
    samples = []
    t = 0.0
    k = 0
    while t < duration:
        while in_flight and in_flight[0][0] <= t:
            remb = in_flight.popleft()[1]
        if (first_report is None or t - first_report < 2.0) and remb is not None:
            current = max(current, remb)
            history.clear()
        elif first_report is not None:
            while history and t - history[0][0] > 1.0:
                history.popleft()
            while history and current <= history[-1][1]:
                history.pop()
            history.append((t, current))
            current = history[0][1] * 1.08 + 1000
        target = current if remb is None else min(current, remb)
        encoder += (min(target, camera_max) - encoder) * step
        credit += encoder * step / 8
        while credit >= SIZE:
            credit -= SIZE
            if max(t, link_free) - t > 1.0:
                lost += 1
                continue
            link_free = max(t, link_free) + SIZE * 8 / capacity
            est.on_packet(SIZE, link_free + 0.02, ast(t) if send_times else None)
            received += 1
        k += 1
        t = k * step
        if k % 200 == 0:  # receiver report every second
            est.on_loss(lost / (lost + received) if lost + received else 0.0)
            received = lost = 0
            if first_report is None:
                first_report = t + 0.02
        if k % 20 == 0 and est.should_send(t):
            value = est.estimate(t)
            assert value is not None
            in_flight.append((t + 0.02, value))
        samples.append((t, encoder))
    return samples


@pytest.mark.parametrize("send_times", [True, False])
def test_remb_only_publisher_reaches_1_2_mbps_within_15_s(send_times: bool) -> None:
    samples = closed_loop(capacity=5_000_000, send_times=send_times)
    reached = next(t for t, rate in samples if rate >= 1_200_000)
    assert reached < 15.0
    assert samples[-1][1] >= 1_400_000  # and keeps the camera's full rate


def test_remb_only_publisher_on_a_narrow_link_stays_near_capacity() -> None:
    samples = closed_loop(capacity=800_000, duration=20.0)
    late = [rate for t, rate in samples if t >= 8.0]
    mean = sum(late) / len(late)
    assert 500_000 < mean < 950_000
