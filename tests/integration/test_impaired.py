"""Calls over an impaired path: 5% loss, 30 ms +- 10 ms delay on one leg, through a seeded
impairing proxy (these kernels have no netem). With retransmission (NACK answered from the
relay's history, NACKs sent upstream) video keeps decoding; with it disabled, it visibly does not.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.integration.clients import CallClient, wait_for
from tests.integration.conftest import start_relay, stop_relay
from tests.integration.netem import ImpairingProxy, Impairment

pytestmark = pytest.mark.integration

WINDOW = 20.0
LOSSY = Impairment(loss=0.05, delay=0.03, jitter=0.01)
DELAY_ONLY = Impairment(delay=0.03, jitter=0.01)


async def run_call(tmp_path, leg: str, nack: bool) -> tuple[float, float]:
    """(decoded/sent frame ratio, longest freeze in seconds) over WINDOW for red -> green."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    relay = start_relay(tmp_path, extra=f"[rtp]\nnack = {str(nack).lower()}\n")
    proxy = None
    clients: list[CallClient] = []
    try:
        to_relay, to_client = (LOSSY, DELAY_ONLY) if leg == "publisher" else (DELAY_ONLY, LOSSY)
        proxy = await ImpairingProxy.start(
            ("127.0.0.1", relay.media_port), to_relay, to_client, seed=42
        )
        headers = {"Authorization": f"Bearer {relay.key}"}
        httpx.post(f"{relay.api}/v1/rooms", json={"room_id": "lossy"}, headers=headers)
        red = CallClient(
            relay.api,
            relay.key,
            "lossy",
            "red",
            proxies={"publisher": proxy.address} if leg == "publisher" else None,
        )
        green = CallClient(
            relay.api,
            relay.key,
            "lossy",
            "green",
            proxies={"subscriber": proxy.address} if leg == "subscriber" else None,
        )
        clients = [red, green]
        for c in clients:
            await c.join()
        await green.subscribe()
        await red.publish(audio=False, moving=True, size=(320, 240))
        assert await wait_for(lambda: green.received.frames.get("red", 0) > 15, 30)
        start, sent_before = time.monotonic(), red.video_track.frame_count
        await asyncio.sleep(WINDOW)
        end, sent = time.monotonic(), red.video_track.frame_count - sent_before
        decoded = green.received.frames_between("red", start, end)
        freeze = green.received.longest_freeze("red", start, end)
        repair = {
            name.removeprefix("relay_"): value
            for name, value in relay.metrics().items()
            if any(k in name for k in ("nacks", "retransmission", "keyframe_requests"))
        }
        stats = httpx.get(
            f"{relay.api}/v1/rooms/lossy/participants/green/stats", headers=headers
        ).json()
        to_green = next((o for o in stats["outbound"] if o["kind"] == "video"), {})
        repair["rtt_to_green"] = to_green.get("round_trip_time")
        print(
            f"leg={leg} nack={nack}: {decoded}/{sent} frames decoded "
            f"({decoded / sent:.1%}), longest freeze {freeze:.2f} s "
            f"{freeze_at(green, start, end)}, proxy dropped "
            f"{proxy.dropped} of {proxy.dropped + proxy.forwarded}; relay's repairs: {repair}"
        )
        return decoded / sent, freeze
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        if proxy is not None:
            proxy.close()
        stop_relay(relay)


def freeze_at(client: CallClient, start: float, end: float) -> str:
    """Where the longest freeze of red's video at ``client`` lies in the window (seconds)."""
    times = [start, *(t for t in client.received.frame_times.get("red", []) if start <= t <= end)]
    times.append(end)
    gap, at = max((b - a, a) for a, b in zip(times, times[1:], strict=False))
    return f"(from {at - start:.2f} s to {at - start + gap:.2f} s)"


@pytest.mark.parametrize("leg", ["publisher", "subscriber"])
async def test_video_survives_loss_with_nack_and_not_without(tmp_path, leg: str) -> None:
    with_ratio, with_freeze = await run_call(tmp_path / "with", leg, nack=True)
    without_ratio, without_freeze = await run_call(tmp_path / "without", leg, nack=False)
    assert with_ratio >= 0.90 and with_freeze <= 1.0, (with_ratio, with_freeze)
    # retransmission is what makes the difference
    assert without_ratio < with_ratio - 0.05 or without_freeze > 1.0, (
        with_ratio,
        with_freeze,
        without_ratio,
        without_freeze,
    )
