"""ICE-TCP with real browsers: a relay that announces TCP candidates only (``[media]
transports = "tcp"``), Chromium and Firefox in one call over TCP, and a subscriber whose TCP
reader stalls for 5 s while they talk.

The call setup time over TCP is measured next to the same call through a relay that announces
UDP only, in a second namespace of the same run: page load to the first decoded frame of the
other browser, as each page reports it."""

from __future__ import annotations

import re
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from relay.client.peer import ClientPeer, negotiate_subscriber
from tests.browser import harness
from tests.browser.conftest import Call, World, make_world
from tests.browser.harness import MEDIA_PORT, wait_until
from tests.browser.test_browsers import first_remote_frame, note, wait_for_media
from tests.integration.ice_tcp_client import TcpClientPeer, tcp_candidates

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

#: small enough that a stalled reader backs up into the relay's own buffer within the stall
WRITE_BUFFER = 65536
PAIR = {"chromium": {"firefox"}, "firefox": {"chromium"}}
#: seconds the subscriber's reader stalls, and each frame-rate window
STALL = 5.0


def world_with(folder: Path, media: str, extra: str = "") -> Generator[World, None, None]:
    """A namespace whose relay has ``media`` lines added to its ``[media]`` section."""
    original = harness.relay_config
    anchor = f"port = {MEDIA_PORT}\n"

    def config(token_secret: str, extra: str = "") -> str:
        return original(token_secret, extra).replace(anchor, anchor + media, 1)

    harness.relay_config = config  # read by start_relay while the relay starts
    # timing is what these tests measure: no load shedding on a machine busy with other tests
    extra = "\n[overload]\nenabled = false\n" + extra
    worlds = cast(Generator[World, None, None], make_world(folder, extra))
    try:
        world = next(worlds)
    finally:
        harness.relay_config = original
    try:
        yield world
    finally:
        worlds.close()  # the relay, the loop and the namespace go


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    media = f'transports = "tcp"\ntcp_write_buffer_bytes = {WRITE_BUFFER}\n'
    yield from world_with(tmp_path_factory.mktemp("icetcp"), media)


@pytest.fixture(scope="module")
def udp_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from world_with(tmp_path_factory.mktemp("iceudp"), 'transports = "udp"\n')


def metrics(call: Call) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in call.api("GET", "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def relay_rss_kib(call: Call) -> int:
    status = Path(f"/proc/{call.relay.process.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
    assert match is not None
    return int(match.group(1))


def browser_call(call: Call) -> dict[str, Any]:
    call.open_page("chromium", "chromium")
    call.open_page("firefox", "firefox")
    for label in PAIR:
        call.wait_joined(label)
    window = wait_for_media(call, PAIR)
    for label in PAIR:
        report = call.report(label)
        assert report["states"]["publisher"] == report["states"]["subscriber"] == "connected"
    return window


def first_frames(call: Call) -> dict[str, dict[str, float]]:
    """Per page, in ms: ``publish`` from the camera to the publisher connection's ICE and
    DTLS done (offer, answer, ICE, DTLS), ``subscribe`` the same for its subscriber connection
    from the event stream's opening, ``join_to_first_frame`` from the token (the page starts
    joining) to its first decoded frame of the other browser, and ``load_to_first_frame``."""
    result = {}
    for label, (peer,) in _pairs():
        marks = call.report(label)["marks"]
        result[label] = {
            "publish": marks["publisherConnected"] - marks["camera"],
            "subscribe": marks["subscriberConnected"] - marks["events"],
            "join_to_first_frame": marks["firstFrame"] - marks["token"],
            "load_to_first_frame": round(first_remote_frame(call, label)[peer] * 1000),
        }
    return result


def _pairs() -> list[tuple[str, tuple[str, ...]]]:
    return [(label, tuple(peers)) for label, peers in PAIR.items()]


def candidate_transports(call: Call) -> set[str]:
    """The transports of the relay's candidates in a fresh answer-like offer (a subscriber
    offer of a participant made for the purpose)."""
    call.participant("probe")
    body = call.api("POST", f"/v1/rooms/{call.room}/participants/probe/subscriber").json()
    call.api("DELETE", f"/v1/rooms/{call.room}/participants/probe")
    return {
        line.split()[2].lower()
        for line in body["sdp"].splitlines()
        if line.startswith("a=candidate:")
    }


def test_chromium_and_firefox_over_tcp_and_setup_time_vs_udp(
    call: Call, udp_world: World, request: pytest.FixtureRequest
) -> None:
    """The same two-browser call through a UDP-only relay, then through the TCP-only one:
    both decode each other over TCP; the setup times are noted side by side."""
    setup: dict[str, dict[str, dict[str, float]]] = {}
    udp_call = Call(udp_world, f"{request.node.name}-udp")
    try:
        assert candidate_transports(udp_call) == {"udp"}
        browser_call(udp_call)
        setup["udp"] = first_frames(udp_call)
    finally:
        udp_call.close()

    assert candidate_transports(call) == {"tcp"}
    before = metrics(call)
    window = browser_call(call)
    after = metrics(call)
    setup["tcp"] = first_frames(call)
    # four TCP connections (each browser's publisher and subscriber), all authenticated
    assert after["relay_tcp_accepted_total"] - before["relay_tcp_accepted_total"] >= 4
    assert after["relay_tcp_connections"] >= 4
    assert after["relay_tcp_closed_bad_frame_total"] == 0
    note(request, "tcp media window", window)
    note(request, "call setup (ms) by transport", setup)
    for label in PAIR:
        note(request, f"{label} over tcp: page load to each step (ms)", call.report(label)["marks"])


Snapshot = dict[str, tuple[float, int]]


def frames_now(call: Call) -> Snapshot:
    """Per browser: when its latest report arrived, and its frames decoded of the other's
    video by then (the pages report once a second)."""
    result = {}
    for label, (peer,) in _pairs():
        latest = call.collector.latest_at(f"{call.room}.{label}")
        assert latest is not None
        at, report = latest
        video = ((report.get("stats") or {}).get("inbound") or {}).get(peer) or {}
        result[label] = (at, int((video.get("video") or {}).get("framesDecoded") or 0))
    return result


def framerates(start: Snapshot, end: Snapshot) -> dict[str, float]:
    return {
        label: round((end[label][1] - start[label][1]) / (end[label][0] - start[label][0]), 1)
        for label in start
        if end[label][0] > start[label][0]
    }


def framerates_over(call: Call, seconds: float) -> dict[str, float]:
    start = frames_now(call)
    time.sleep(seconds)
    return framerates(start, frames_now(call))


def test_a_stalled_tcp_subscriber_costs_nothing_to_the_others(
    call: Call, request: pytest.FixtureRequest
) -> None:
    """Chromium and Firefox talk over TCP; a third participant subscribes to both over TCP
    with the project's client cores and stops reading for 5 s. The relay's buffer for it stays
    within its bound (what does not fit is dropped and counted), its memory does not grow, and
    both browsers keep their frame rate; the stalled subscriber reads on afterwards."""
    browser_call(call)
    token_holder = "stalled"
    call.participant(token_holder)
    headers = {"Authorization": f"Bearer {call.relay.api_key}"}

    async def subscribe() -> TcpClientPeer:
        peer = ClientPeer()
        async with httpx.AsyncClient(base_url=call.relay.api, headers=headers, timeout=10) as h:
            remote = await negotiate_subscriber(h, call.room, token_holder, peer)
        client = TcpClientPeer(peer, receive_buffer=4096)
        await client.connect(tcp_candidates(remote.sdp)[0])
        await client.connected()
        return client

    client = call.loop.run(subscribe())

    def received() -> int:
        return sum(client.peer.rtp_received.values())

    try:
        wait_until(lambda: received() > 200, 20, what="media to the TCP subscriber")
        fps_before = framerates_over(call, STALL)
        before = metrics(call)
        rss_before = relay_rss_kib(call)
        call.loop.loop.call_soon_threadsafe(client.stall)
        stalled_at = time.monotonic()
        start = frames_now(call)
        buffered: list[float] = []
        while time.monotonic() - stalled_at < STALL:
            time.sleep(0.5)
            buffered.append(metrics(call)["relay_tcp_write_buffer_bytes"])
        fps_during = framerates(start, frames_now(call))
        during = metrics(call)
        rss_after = relay_rss_kib(call)
        call.loop.loop.call_soon_threadsafe(client.resume)
        resumed_from = received()
        wait_until(lambda: received() > resumed_from + 100, 20, what="the subscriber to resume")
        fps_after = framerates_over(call, STALL)
    finally:
        call.loop.loop.call_soon_threadsafe(client.close)
    dropped = during["relay_tcp_dropped_total"] - before["relay_tcp_dropped_total"]
    result = {
        "fps_before": fps_before,
        "fps_during_stall": fps_during,
        "fps_after": fps_after,
        "tcp_dropped": dropped,
        "write_buffer_max_bytes": max(buffered),
        "relay_rss_kib": [rss_before, rss_after],
    }
    note(request, "stalled subscriber", result)
    assert dropped > 0, result  # the stalled connection's buffer did fill up
    assert max(buffered) <= 4 * WRITE_BUFFER + 8192, buffered  # four connections at most full
    assert rss_after - rss_before < 10 * 1024, result
    assert client.peer.srtp_errors == 0
    for label in PAIR:
        assert fps_during[label] >= 0.7 * fps_before[label], result
        assert fps_during[label] >= 5, result


def test_with_both_transports_the_browsers_take_udp(tmp_path: Path) -> None:
    """The default, "udp+tcp": both kinds of candidates are announced, and both browsers'
    media goes over UDP (TCP candidates rank lower); TCP carries at most a few checks."""
    worlds = world_with(tmp_path, "")
    world = next(worlds)
    try:
        call = Call(world, "both")
        try:
            assert candidate_transports(call) == {"udp", "tcp"}
            browser_call(call)
            values = metrics(call)
            out = values["relay_packets_out_total"]
            tcp = values["relay_tcp_packets_sent_total"]
            print(f"udp+tcp: {out:.0f} RTP packets forwarded, {tcp:.0f} packets written on TCP")
            assert out > 500
            assert tcp < 0.02 * out, (tcp, out)
        finally:
            call.close()
    finally:
        worlds.close()


def test_tcp_candidates_of_two_workers(tmp_path: Path) -> None:
    """Each media worker listens on TCP on its own port number, as for UDP."""
    media = 'transports = "tcp"\n'
    worlds = world_with(tmp_path, media, '\n[workers]\ncount = 2\nplacement = "spread"\n')
    world = next(worlds)
    try:
        call = Call(world, "workers")
        try:

            def ready() -> list[dict] | None:
                workers = call.api("GET", "/v1/workers").json()["workers"]
                ok = len(workers) == 2 and all(w["state"] == "ready" for w in workers)
                return workers if ok else None

            wait_until(ready, 30, what="two ready workers")
            call.open_page("chromium", "chromium")
            call.open_page("firefox", "firefox")
            for label in PAIR:
                call.wait_joined(label)
            wait_for_media(call, PAIR)
            text = call.api("GET", "/metrics").text
            accepted = re.findall(r'^relay_tcp_accepted_total\{worker="(\d)"\} (\S+)$', text, re.M)
            assert sorted(w for w, v in accepted if float(v) >= 2) == ["0", "1"], accepted
        finally:
            call.close()
    finally:
        worlds.close()
