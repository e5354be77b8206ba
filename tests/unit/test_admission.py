"""Load shedding: the overload detector with times and samples, its settings, and the refusals
the SFU core and the control API give while it sheds."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import httpx
import pytest

from relay.api.app import create_app
from relay.api.events import EventBus
from relay.client.peer import ClientPeer, TrackSpec
from relay.config import ConfigError, OverloadSettings, Settings, load_settings
from relay.rtc.dtls import Certificate
from relay.sfu.admission import LOOP_LAG, PACKET_RATE, OverloadDetector
from relay.sfu.errors import Overloaded
from relay.sfu.leg import CallbackSender
from relay.sfu.sfu import Sfu

STEP = 0.25


def feed(
    detector: OverloadDetector,
    start: float,
    seconds: float,
    lag: float = 0.0,
    rate: float = 0.0,
    packets: int = 0,
) -> tuple[float, int, list]:
    """Samples every STEP seconds for ``seconds``: (time, packet total, transitions)."""
    now = start
    changes = []
    for _ in range(round(seconds / STEP)):
        now += STEP
        packets += round(rate * STEP)
        change = detector.sample(now, lag, packets)
        if change is not None:
            changes.append(change)
    return now, packets, changes


def test_idle_never_sheds() -> None:
    detector = OverloadDetector(OverloadSettings())
    detector.sample(0.0, 0.0, 0)
    _, _, changes = feed(detector, 0.0, 600, lag=0.002, rate=50_000)
    assert changes == []
    assert not detector.shedding
    detector.check()  # admits
    assert detector.refused == 0
    assert detector.loop_lag == pytest.approx(0.002, rel=1e-3)
    assert detector.packet_rate == pytest.approx(50_000, rel=1e-3)


def test_one_lag_spike_is_smoothed_away() -> None:
    detector = OverloadDetector(OverloadSettings())
    detector.sample(0.0, 0.0, 0)
    now, _, _ = feed(detector, 0.0, 5, lag=0.001)
    # a single 300 ms stall (a slow request, a GC pass) is not overload
    assert detector.sample(now + 0.55, 0.3, 0) is None
    assert not detector.shedding
    assert 0.05 < detector.loop_lag < 0.1


def test_sustained_lag_sheds_then_recovers_with_hysteresis() -> None:
    settings = OverloadSettings(loop_lag_high=0.1, loop_lag_low=0.04, recover_after=2.0)
    detector = OverloadDetector(settings)
    detector.sample(0.0, 0.0, 0)
    now, _, changes = feed(detector, 0.0, 3, lag=0.2)
    assert [c.shedding for c in changes] == [True]
    assert changes[0].reason == LOOP_LAG and changes[0].loop_lag > 0.1
    assert detector.shedding and detector.episodes == 1
    with pytest.raises(Overloaded) as refused:
        detector.check()
    assert refused.value.status == 503 and refused.value.code == "overloaded"
    assert refused.value.headers == {"Retry-After": "5"}
    assert "event-loop lag" in refused.value.message
    assert detector.refused == 1
    # between the thresholds: still shedding, however long it lasts
    now, _, changes = feed(detector, now, 20, lag=0.07)
    assert changes == [] and detector.shedding
    # under the low threshold: admitted again only after recover_after seconds of calm
    calm_from = None
    for _ in range(40):
        now += STEP
        change = detector.sample(now, 0.0, 0)
        if calm_from is None and detector.loop_lag < 0.04:
            calm_from = now
        if change is not None:
            break
    assert change is not None and not change.shedding and change.reason == LOOP_LAG
    assert calm_from is not None and now - calm_from == pytest.approx(2.0)
    assert not detector.shedding and detector.reason == ""
    detector.check()
    assert detector.refused == 1


def test_calm_interrupted_restarts_the_recovery_clock() -> None:
    detector = OverloadDetector(OverloadSettings(smoothing=0.25, recover_after=2.0))
    detector.sample(0.0, 0.0, 0)
    now, _, _ = feed(detector, 0.0, 2, lag=0.3)
    assert detector.shedding
    now, _, changes = feed(detector, now, 1.5, lag=0.0)
    assert changes == []
    now, _, changes = feed(detector, now, 0.5, lag=0.3)  # overloaded again before recovery
    now, _, changes = feed(detector, now, 1.5, lag=0.0)
    assert changes == [] and detector.shedding
    now, _, changes = feed(detector, now, 3, lag=0.0)
    assert [c.shedding for c in changes] == [False]


def test_packet_rate_ceiling() -> None:
    settings = OverloadSettings(packet_rate_high=10_000, packet_rate_low=8_000)
    detector = OverloadDetector(settings)
    detector.sample(0.0, 0.0, 0)
    now, packets, changes = feed(detector, 0.0, 10, rate=9_000)
    assert changes == []
    now, packets, changes = feed(detector, now, 5, rate=12_000, packets=packets)
    assert [(c.shedding, c.reason) for c in changes] == [(True, PACKET_RATE)]
    with pytest.raises(Overloaded) as refused:
        detector.check()
    assert "packets/s" in refused.value.message
    # 9000/s is under the ceiling but above the low threshold: still shedding
    now, packets, changes = feed(detector, now, 10, rate=9_000, packets=packets)
    assert changes == [] and detector.shedding
    now, packets, changes = feed(detector, now, 10, rate=5_000, packets=packets)
    assert [c.shedding for c in changes] == [False]


def test_irregular_samples_are_weighted_by_time() -> None:
    a = OverloadDetector(OverloadSettings(smoothing=1.0))
    b = OverloadDetector(OverloadSettings(smoothing=1.0))
    a.sample(0.0, 0.0, 0)
    b.sample(0.0, 0.0, 0)
    for i in range(1, 9):
        a.sample(i * 0.25, 0.08, 0)
    b.sample(1.0, 0.08, 0)
    b.sample(2.0, 0.08, 0)
    assert a.loop_lag == pytest.approx(b.loop_lag)
    assert a.sample(2.0, 1.0, 0) is None  # no time passed: ignored
    assert a.loop_lag == pytest.approx(b.loop_lag)


def test_disabled_never_sheds_and_ends_shedding() -> None:
    detector = OverloadDetector(OverloadSettings(enabled=False))
    detector.sample(0.0, 0.0, 0)
    _, _, changes = feed(detector, 0.0, 10, lag=1.0)
    assert changes == [] and not detector.shedding


def test_counter_reset_is_not_a_negative_rate() -> None:
    detector = OverloadDetector(OverloadSettings())
    detector.sample(0.0, 0.0, 1000)
    detector.sample(1.0, 0.0, 10)
    assert detector.packet_rate == 0.0


# -- settings ----------------------------------------------------------------------------------


def error_of(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    return str(info.value)


def test_defaults_and_overrides(tmp_path: Path) -> None:
    defaults = load_settings(None, {}).overload
    assert defaults == OverloadSettings()
    assert defaults.enabled and defaults.packet_rate_high == 0
    path = tmp_path / "relay.toml"
    path.write_text("[overload]\npacket_rate_high = 20000\npacket_rate_low = 15000\n")
    settings = load_settings(path, {"RELAY_OVERLOAD__LOOP_LAG_HIGH": "0.2"}).overload
    assert (settings.packet_rate_high, settings.packet_rate_low) == (20000, 15000)
    assert settings.loop_lag_high == 0.2


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("loop_lag_high = -1", "overload.loop_lag_high"),
        ("loop_lag_low = 0", "overload.loop_lag_low"),
        ("smoothing = 'fast'", "overload.smoothing"),
        ("recover_after = 0", "overload.recover_after"),
        ("retry_after = 0", "overload.retry_after"),
        ("retry_after = 1.5", "overload.retry_after"),
        ("packet_rate_high = -5", "overload.packet_rate_high"),
        ("enabled = 'yes'", "overload.enabled"),
        ("loop_lag_low = 0.2", "overload.loop_lag_low"),  # not under loop_lag_high (0.1)
        ("packet_rate_high = 1000", "overload.packet_rate_low"),  # low missing
        ("packet_rate_high = 1000\npacket_rate_low = 1000", "overload.packet_rate_low"),
        ("packet_rate_low = 1000", "overload.packet_rate_low"),  # without a ceiling
        ("lag_high = 0.1", "overload.lag_high"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    message = error_of(tmp_path, f"[overload]\n{text}\n")
    assert message.startswith(key), message


# -- refusals in the core and the API ------------------------------------------------------------

CERTIFICATE = Certificate.generate()
AUTH = {"Authorization": "Bearer devkey"}


def shedding_sfu(settings: Settings) -> Sfu:
    sfu = Sfu(
        settings,
        certificate=CERTIFICATE,
        candidates=[("127.0.0.1", 40000)],
        sender=CallbackSender(lambda data, addr: None),
        clock=time.monotonic,
    )
    sfu.overload.sample(0.0, 0.0, 0)
    sfu.overload.sample(5.0, 1.0, 0)
    assert sfu.overload.shedding
    return sfu


def test_core_refuses_new_sessions_but_not_live_connections() -> None:
    settings = Settings()
    sfu = Sfu(
        settings,
        certificate=CERTIFICATE,
        candidates=[("127.0.0.1", 40000)],
        sender=CallbackSender(lambda data, addr: None),
    )
    sfu.create_room("r")
    sfu.add_participant("r", "alice")
    sfu.add_participant("r", "bob")
    offer = ClientPeer().create_offer([TrackSpec("audio", 1234, "0")])
    sfu.publisher_offer("r", "alice", offer)
    sfu.subscriber_offer("r", "alice")
    # now overloaded
    sfu.overload.sample(0.0, 0.0, 0)
    sfu.overload.sample(5.0, 1.0, 0)
    for call in (
        lambda: sfu.add_participant("r", "carol"),
        lambda: sfu.publisher_offer("r", "bob", offer),  # bob's first publisher connection
        lambda: sfu.subscriber_offer("r", "bob"),  # and his first subscriber connection
    ):
        with pytest.raises(Overloaded):
            call()
    assert sfu.overload.refused == 3
    # renegotiations of connections that exist are answered
    sfu.publisher_offer("r", "alice", offer)
    sfu.subscriber_offer("r", "alice")
    sfu.create_room("r2")  # a room alone is no session
    text = sfu.metrics.render()
    assert "relay_overload_shedding 1" in text
    assert "relay_overload_refused_sessions_total 3" in text
    assert "# TYPE relay_overload_refused_sessions_total counter" in text
    assert "relay_overload_episodes_total 1" in text
    assert "relay_event_loop_lag_smoothed_seconds" in text
    assert "relay_forwarded_packet_rate 0" in text


async def test_api_answers_503_with_retry_after() -> None:
    settings = dataclasses.replace(Settings(), overload=OverloadSettings(retry_after=7))
    sfu = shedding_sfu(settings)
    sfu.create_room("r")
    app = create_app(sfu, settings, EventBus(settings), sfu.metrics)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"status": "overloaded"}
        assert r.headers["retry-after"] == "7"
        r = await client.post("/v1/rooms/r/participants", json={}, headers=AUTH)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "7"
        error = r.json()["error"]
        assert error["code"] == "overloaded"
        assert "retry in 7 s" in error["message"]
        assert (await client.get("/healthz")).status_code == 200
        r = await client.get("/openapi.json")
        readiness = r.json()["components"]["schemas"]["Readiness"]["properties"]["status"]
        assert "overloaded" in readiness["enum"]
        # recovery
        sfu.overload.sample(6.0, 0.0, 0)
        for i in range(1, 40):
            sfu.overload.sample(6.0 + i * 0.25, 0.0, 0)
        assert not sfu.overload.shedding
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        r = await client.post("/v1/rooms/r/participants", json={}, headers=AUTH)
        assert r.status_code == 201
