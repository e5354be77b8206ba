"""Load shedding on a real relay: a stalled event loop, and a join storm during a call.

The join storm runs the call in progress (one publisher sending video to one subscriber) in
a separate process, so that its send pace and its per-second receive counts do not depend on
how busy this process is with the 200 joining clients. Run as a module, this file is that
process: ``python -m tests.integration.test_overload call API KEY ROOM``.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from relay.client.peer import ClientPeer, RemoteDescription, TrackSpec, UdpClientPeer
from relay.config import (
    ApiSettings,
    DemoSettings,
    MediaSettings,
    OverloadSettings,
    Settings,
    WorkerSettings,
)
from relay.rtc.rtp import parse_rtp
from relay.server import Relay
from tests.integration.conftest import (
    api_client,
    auth_headers,
    parse_metrics,
    peer_publisher,
    peer_subscriber,
    start_relay,
    stop_relay,
    wait_until,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# -- a stalled event loop ------------------------------------------------------------------------


async def test_stalled_loop_sheds_new_sessions_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A relay whose event loop keeps stalling refuses new participants with 503 overloaded
    and Retry-After, says so on /readyz and /metrics, and accepts them again by itself."""
    settings = Settings(
        api=ApiSettings(host="127.0.0.1", port=0, keys=("testkey",)),
        media=MediaSettings(host="127.0.0.1", port=0),
        overload=OverloadSettings(smoothing=0.5, recover_after=0.5, retry_after=3),
        demo=DemoSettings(enabled=False),
        workers=WorkerSettings(count=1),  # the test stalls this process's own event loop
    )
    caplog.set_level(logging.INFO, logger="relay.server")
    relay = Relay(settings)
    await relay.start()
    try:
        base = f"http://127.0.0.1:{relay.api_port}"
        async with httpx.AsyncClient(
            base_url=base, headers=auth_headers("testkey"), timeout=10
        ) as http:
            assert (await http.get("/readyz")).status_code == 200
            assert (await http.post("/v1/rooms", json={"room_id": "r"})).status_code == 201
            r = await http.post("/v1/rooms/r/participants", json={"participant_id": "a"})
            assert r.status_code == 201
            # the relay's loop stalls 600 ms at a time, longer than the lag sampling period,
            # for about two seconds
            for _ in range(4):
                time.sleep(0.6)
                await asyncio.sleep(0.01)
            ready = await http.get("/readyz")
            join = await http.post("/v1/rooms/r/participants", json={"participant_id": "b"})
            metrics = parse_metrics((await http.get("/metrics")).text)
            assert ready.status_code == 503, ready.text
            assert ready.json() == {"status": "overloaded"}
            assert ready.headers["retry-after"] == "3"
            assert join.status_code == 503, join.text
            assert join.headers["retry-after"] == "3"
            assert join.json()["error"]["code"] == "overloaded"
            assert metrics["relay_overload_shedding"] == 1
            assert metrics["relay_overload_episodes_total"] == 1
            assert metrics["relay_overload_refused_sessions_total"] == 1
            assert metrics["relay_event_loop_lag_smoothed_seconds"] > 0.01  # decaying already
            assert metrics["relay_event_loop_lag_max_seconds"] >= 0.2
            # the first offer of a participant already in the room opens a new connection:
            # refused alike
            sub = await http.post("/v1/rooms/r/participants/a/subscriber")
            assert sub.status_code == 503 and sub.headers["retry-after"] == "3"

            async def ready_again() -> bool:
                return (await http.get("/readyz")).status_code == 200

            assert await wait_until(ready_again, timeout=10, interval=0.1)
            r = await http.post("/v1/rooms/r/participants", json={"participant_id": "b"})
            assert r.status_code == 201, r.text
            metrics = parse_metrics((await http.get("/metrics")).text)
            assert metrics["relay_overload_shedding"] == 0
            assert metrics["relay_overload_refused_sessions_total"] == 2
            assert "overloaded (loop_lag)" in caplog.text
            assert "load back to normal" in caplog.text
    finally:
        await relay.stop()


# -- a join storm during a call ------------------------------------------------------------------

JOINERS = 200
STORM_SECONDS = 5.0
JOIN_TIMEOUT = 25.0  # seconds for one join, HTTP and connection, before it counts as a hang
CALL_PPS = 100  # the call's video: 100 packets of 1000 bytes per second (0.8 Mbit/s)
#: A packet of the call counts as delivered when it reaches the subscriber's socket this many
#: seconds after the publisher's sendto (what a receiver's jitter buffer absorbs).
ON_TIME = 0.2
#: Forwarded packets per second at which the relay sheds in this test: with every joiner
#: subscribed to the call's video (100 packets/s each), about 20 joiners connect before the
#: relay refuses the others. It stands for the capacity an operator measures with the bench
#: (``python -m bench load``), scaled down so that a storm on this machine crosses it.
STORM_CONFIG = """
[limits]
max_participants_per_room = 300
[overload]
packet_rate_high = 2000
packet_rate_low = 1500
smoothing = 0.5
recover_after = 1.0
retry_after = 2
"""


@dataclass
class StormResult:
    """What happened to each join."""

    completed: list[float] = field(default_factory=list)  # seconds from start to connected
    refused: dict[str, int] = field(default_factory=dict)  # "<status> <stage>" -> count
    missing_retry_after: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # any other outcome
    peers: list[UdpClientPeer] = field(default_factory=list)

    def refuse(self, response: httpx.Response, stage: str, who: str) -> None:
        key = f"{response.status_code} {stage}"
        self.refused[key] = self.refused.get(key, 0) + 1
        if not response.headers.get("retry-after", "").isdigit():
            self.missing_retry_after.append(f"{who}: {key}")


async def _join(http: httpx.AsyncClient, room: str, who: str, result: StormResult) -> None:
    """One viewer: join, fetch the subscriber offer, answer, connect (or be refused)."""
    started = time.monotonic()
    r = await http.post(
        f"/v1/rooms/{room}/participants",
        json={"participant_id": who, "can_publish": False},
    )
    if r.status_code in (429, 503):
        result.refuse(r, "join", who)
        return
    if r.status_code != 201:
        result.failures.append(f"{who}: join HTTP {r.status_code} {r.text[:200]}")
        return
    base = f"/v1/rooms/{room}/participants/{who}/subscriber"
    peer = ClientPeer()
    for _ in range(5):
        r = await http.post(base)
        if r.status_code in (429, 503):
            result.refuse(r, "subscriber offer", who)
            # a client told to come back later leaves the room meanwhile
            await http.delete(f"/v1/rooms/{room}/participants/{who}")
            return
        if r.status_code != 200:
            result.failures.append(f"{who}: offer HTTP {r.status_code} {r.text[:200]}")
            return
        body = r.json()
        remote = RemoteDescription.parse(body["sdp"], revision=body["revision"])
        answer = peer.create_answer(remote, setup="active")
        r = await http.put(
            base, json={"type": "answer", "sdp": answer, "revision": remote.revision}
        )
        if r.status_code != 409:  # a newer revision came meanwhile: fetch it
            break
    if r.status_code != 204:
        result.failures.append(f"{who}: answer HTTP {r.status_code} {r.text[:200]}")
        return
    peer.set_remote_description(remote)
    udp = UdpClientPeer(peer, remote.address)
    result.peers.append(udp)
    await udp.start()
    await udp.connected(timeout=JOIN_TIMEOUT)
    result.completed.append(time.monotonic() - started)


async def _storm(http: httpx.AsyncClient, room: str, result: StormResult) -> list[int]:
    """JOINERS joins spread evenly over STORM_SECONDS; /readyz statuses seen meanwhile."""
    ready: list[int] = []

    async def watch() -> None:
        while True:
            ready.append((await http.get("/readyz")).status_code)
            await asyncio.sleep(0.2)

    async def bounded(i: int) -> None:
        await asyncio.sleep(i * STORM_SECONDS / JOINERS)
        who = f"viewer{i}"
        try:
            await asyncio.wait_for(_join(http, room, who, result), JOIN_TIMEOUT + 10)
        except TimeoutError:
            result.failures.append(f"{who}: no outcome within {JOIN_TIMEOUT + 10:g} s")
        except Exception as exc:  # noqa: BLE001 - every other outcome is a failure to report
            result.failures.append(f"{who}: {type(exc).__name__}: {exc}")

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(bounded(i) for i in range(JOINERS)))
    finally:
        watcher.cancel()
    return ready


def _per_second(call: dict, start: float, end: float) -> tuple[list[int], list[int]]:
    """For each whole second of wall-clock time inside [start, end]: packets of the call sent
    in it, and how many of those reached the subscriber's socket within ON_TIME seconds."""
    sent: list[float] = call["sent"]
    received = {int(k): v for k, v in call["received"].items()}
    counts: list[int] = []
    on_time: list[int] = []
    for second in range(math.ceil(start), math.floor(end)):
        indices = [i for i, t in enumerate(sent) if second <= t < second + 1]
        counts.append(len(indices))
        on_time.append(sum(1 for i in indices if received.get(i, math.inf) - sent[i] <= ON_TIME))
    return counts, on_time


@pytest.mark.timeout(120)
async def test_join_storm_during_a_call(tmp_path: Path) -> None:
    """200 viewers join within 5 s while a call runs: each join connects or is refused with
    429/503 and Retry-After; in every second of the storm at least 90% of the packets the
    call's publisher sent reach its subscriber within ON_TIME; and the relay accepts sessions
    again once the viewers leave."""
    relay = start_relay(tmp_path, extra=STORM_CONFIG)
    probe: subprocess.Popen[str] | None = None
    result = StormResult()
    try:
        async with api_client(relay, timeout=JOIN_TIMEOUT) as http:
            r = await http.post("/v1/rooms", json={"room_id": "live", "max_participants": 250})
            assert r.status_code == 201, r.text
            probe = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.test_overload", "call"]
                + [relay.api, relay.key, "live"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            line = await asyncio.wait_for(asyncio.to_thread(probe.stdout.readline), 30)
            assert line.strip() == "media", line + probe.stderr.read()
            media_from = time.time()
            await asyncio.sleep(4.0)
            storm_from = time.time()
            ready = await _storm(http, "live", result)
            storm_to = time.time()
            metrics = parse_metrics((await http.get("/metrics")).text)
            await asyncio.sleep(1.0)
            out, err = await asyncio.wait_for(asyncio.to_thread(probe.communicate, ""), 20)
            call = json.loads(out.strip().splitlines()[-1])
            for udp in result.peers:
                udp.close()

            # the viewers left: back to normal by itself
            async def ready_again() -> bool:
                return (await http.get("/readyz")).status_code == 200

            assert await wait_until(ready_again, timeout=15, interval=0.2)
            r = await http.post("/v1/rooms/live/participants", json={"participant_id": "late"})
            assert r.status_code == 201, r.text
    finally:
        for udp in result.peers:
            udp.close()
        if probe is not None and probe.poll() is None:
            probe.kill()
        stop_relay(relay)

    refused = sum(result.refused.values())
    sent_before, before = _per_second(call, media_from + 1, storm_from)
    sent_during, during = _per_second(call, storm_from, storm_to + 1)
    baseline = statistics.median(before)
    delays = sorted(
        call["received"][str(i)] - t
        for i, t in enumerate(call["sent"])
        if storm_from <= t <= storm_to and str(i) in call["received"]
    )
    report = (
        f"completed {len(result.completed)}, refused {refused} {result.refused}, "
        f"failures {len(result.failures)}; call packets/s delivered within {ON_TIME:g} s "
        f"before {before} (sent {sent_before}), during {during} (sent {sent_during}); "
        f"delay during storm p50 {delays[len(delays) // 2] * 1e3:.1f} ms, "
        f"p99 {delays[int(len(delays) * 0.99)] * 1e3:.1f} ms, max {delays[-1] * 1e3:.1f} ms; "
        f"storm {storm_to - storm_from:.1f} s; readyz {ready.count(503)}/{len(ready)} x 503; "
        f"shedding episodes {metrics['relay_overload_episodes_total']:g}; relay loop lag max "
        f"{metrics['relay_event_loop_lag_max_seconds'] * 1e3:.0f} ms"
    )
    print(report)
    assert not result.failures, f"{report}\n" + "\n".join(result.failures[:10])
    assert not result.missing_retry_after, result.missing_retry_after[:10]
    assert len(result.completed) + refused == JOINERS, report
    # the storm really met the ceiling, and some viewers got in before it did
    assert refused > 0 and len(result.completed) > 0, report
    assert 503 in ready, report
    assert metrics["relay_overload_refused_sessions_total"] >= 1
    # the viewers' copies of each packet left several per sendmmsg call, and the socket kept up
    batched, calls = metrics["relay_udp_sent_batched_total"], metrics["relay_sendmmsg_calls_total"]
    assert calls > 0 and batched >= 3 * calls, (batched, calls)
    assert metrics["relay_udp_sent_fallback_total"] < 0.01 * batched, report
    assert baseline >= 0.9 * CALL_PPS, report
    # every second of the storm: at least 90% of what the publisher sent arrived in time (the
    # publisher's own pace, set by its process's scheduling, is not the relay's doing)
    assert during, report
    for sent, delivered in zip(sent_during, during, strict=True):
        assert delivered >= 0.9 * sent, report


# -- the call in progress, in its own process ----------------------------------------------------

SIOCGSTAMP = 0x8906  # Linux: kernel receive time of the last datagram read from a socket
_TIMEVAL = struct.Struct("@qq")
_INDEX = struct.Struct("!I")
#: Payload of the call's video: the start of a VP8 keyframe (so forwarding starts at once),
#: then the packet's index.
_KEYFRAME = b"\x10\x00\x9d\x01\x2a"


async def _call(api: str, key: str, room: str) -> None:
    """Publisher and subscriber of one video call, until stdin closes; then prints as JSON
    the wall-clock time of each packet's ``sendto`` and the kernel's receive timestamp on
    the subscriber's socket (by packet index), so that delays are the relay's and the
    network's alone, whatever this process's own scheduling."""
    sent: list[float] = []
    received: dict[int, float] = {}
    video = TrackSpec("video", 0x5EED, "0")
    async with httpx.AsyncClient(base_url=api, headers=auth_headers(key), timeout=10) as http:
        async with peer_publisher(http, room, "caller", [video]) as pub:
            async with peer_subscriber(http, room, "callee") as (sub, _remote):
                sock = sub._transport.get_extra_info("socket")  # type: ignore[union-attr]
                stamp = bytearray(_TIMEVAL.size)

                def on_rtp(plain: bytes, now: float) -> None:
                    fcntl.ioctl(sock.fileno(), SIOCGSTAMP, stamp)
                    seconds, micros = _TIMEVAL.unpack(stamp)
                    offset = parse_rtp(plain)[5] + len(_KEYFRAME)
                    index = _INDEX.unpack_from(plain, offset)[0]
                    received.setdefault(index, seconds + micros / 1e6)

                sub.peer.on_rtp = on_rtp
                padding = bytes(1000 - len(_KEYFRAME) - _INDEX.size)

                async def send() -> None:
                    loop = asyncio.get_running_loop()
                    start = loop.time()
                    while True:
                        index = len(sent)
                        payload = _KEYFRAME + _INDEX.pack(index) + padding
                        sent.append(time.time())
                        pub.send_rtp(video.ssrc, video.payload_type, index, index * 900, payload)
                        delay = start + (index + 1) / CALL_PPS - loop.time()
                        await asyncio.sleep(max(0.0, delay))

                sender = asyncio.create_task(send())
                await wait_until(lambda: bool(received), timeout=10)
                print("media", flush=True)
                await asyncio.to_thread(sys.stdin.read)
                sender.cancel()
    print(json.dumps({"sent": sent, "received": received}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "call":
        asyncio.run(_call(*sys.argv[2:]))
    else:
        sys.exit("usage: python -m tests.integration.test_overload call API KEY ROOM")
