"""ICE-TCP through a real `relay serve` that announces TCP candidates only: the project's own
client cores connect over TCP (RFC 4571 framing) and publish and receive through the same
demultiplexing as over UDP; a subscriber that stops reading costs the relay a bounded buffer
and the others nothing; malformed, silent and surplus connections are closed and counted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from relay.client.peer import ClientPeer, TrackSpec, negotiate_publisher, negotiate_subscriber
from tests.integration.conftest import (
    RunningRelay,
    add_participant,
    api_client,
    new_room,
    read_metrics,
    spawn_relay,
    start_relay,
    stop_relay,
    wait_healthy,
    wait_until,
    write_config,
)
from tests.integration.ice_tcp_client import TcpClientPeer, tcp_candidates

pytestmark = pytest.mark.timeout(120)

WRITE_BUFFER = 65536
CONSENT_TIMEOUT = 4.0
MAX_CONNECTIONS = 12
TCP_ONLY = f"""transports = "tcp"
tcp_write_buffer_bytes = {WRITE_BUFFER}
tcp_max_connections = {MAX_CONNECTIONS}
tcp_handshake_timeout = 1.0
[session]
consent_timeout = {CONSENT_TIMEOUT}
[overload]
enabled = false
"""
#: VP8 keyframe start (descriptor S=1, payload header P=0): a subscription starts on it
VIDEO_PAYLOAD = b"\x10\x00\x9d\x01\x2a" + bytes(1095)


def _tcp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRelay]:
    """A relay that announces TCP candidates only (its free UDP port number may be taken on
    TCP: then it exits, and another is tried)."""
    error: Exception | None = None
    for attempt in range(5):
        try:
            running = start_relay(tmp_path_factory.mktemp(f"tcp{attempt}"), extra=TCP_ONLY)
        except RuntimeError as exc:
            error = exc
            continue
        yield running
        stop_relay(running)
        return
    raise AssertionError(f"no relay with a free TCP media port: {error}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.asynccontextmanager
async def tcp_publisher(
    http: httpx.AsyncClient, room: str, participant: str, ssrc: int
) -> AsyncIterator[tuple[TcpClientPeer, str]]:
    await add_participant(http, room, participant)
    peer = ClientPeer()
    tracks = [TrackSpec("video", ssrc)]
    remote = await negotiate_publisher(http, room, participant, peer, tracks)
    candidates = tcp_candidates(remote.sdp)
    client = TcpClientPeer(peer)
    await client.connect(candidates[0])
    try:
        await client.connected()
        yield client, remote.sdp
    finally:
        client.close()


@contextlib.asynccontextmanager
async def tcp_subscriber(
    http: httpx.AsyncClient, room: str, participant: str, receive_buffer: int = 0
) -> AsyncIterator[TcpClientPeer]:
    await add_participant(http, room, participant)
    peer = ClientPeer()
    remote = await negotiate_subscriber(http, room, participant, peer)
    client = TcpClientPeer(peer, receive_buffer=receive_buffer)
    await client.connect(tcp_candidates(remote.sdp)[0])
    try:
        await client.connected()
        yield client
    finally:
        client.close()


class Pacer:
    """Sends numbered video packets on a publisher at ``rate`` per second, in the background."""

    def __init__(self, client: TcpClientPeer, ssrc: int, rate: float) -> None:
        self.client, self.ssrc, self.rate = client, ssrc, rate
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            due = int((loop.time() - start) * self.rate) + 1
            while self.sent < due:
                seq = (1000 + self.sent) & 0xFFFF
                self.client.send_rtp(self.ssrc, 96, seq, self.sent * 3000, VIDEO_PAYLOAD)
                self.sent += 1
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Pacer:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def received(client: TcpClientPeer) -> int:
    return sum(client.peer.rtp_received.values())


async def test_tcp_only_relay_announces_passive_tcp_and_forwards(relay: RunningRelay) -> None:
    room = new_room(relay, "tcp")
    async with api_client(relay) as http:
        async with tcp_publisher(http, room, "pub", 0x1111) as (publisher, sdp):
            candidates = [line for line in sdp.splitlines() if line.startswith("a=candidate:")]
            assert candidates, sdp
            assert all(" tcp " in c and c.endswith("typ host tcptype passive") for c in candidates)
            assert tcp_candidates(sdp)[0] == ("127.0.0.1", relay.media_port)
            async with Pacer(publisher, 0x1111, 100), tcp_subscriber(http, room, "sub") as sub:
                assert await wait_until(lambda: received(sub) >= 100, 15), sub.peer.stats()
                assert sub.peer.srtp_errors == 0
            metrics = await read_metrics(http)
            assert metrics["relay_tcp_accepted_total"] >= 2
            assert metrics["relay_tcp_dropped_total"] == 0


async def test_a_closed_connection_ends_like_a_consent_loss(relay: RunningRelay) -> None:
    """The client's TCP connection ends without a DTLS close: the port forgets the address at
    once (nothing more is sent anywhere for it), and the participant is removed when its
    consent runs out, as for a client that went silent on UDP."""
    room = new_room(relay, "gone")
    async with api_client(relay) as http:
        async with tcp_publisher(http, room, "pub", 0x3333) as (publisher, _):
            before = await read_metrics(http)
            publisher.close()
            closed_at = time.monotonic()

            async def gone() -> bool:
                r = await http.get(f"/v1/rooms/{room}/participants/pub")
                return r.status_code == 404

            assert await wait_until(gone, CONSENT_TIMEOUT + 5, interval=0.2)
            elapsed = time.monotonic() - closed_at
            after = await read_metrics(http)
    assert CONSENT_TIMEOUT - 1.5 <= elapsed <= CONSENT_TIMEOUT + 3, elapsed
    assert after["relay_tcp_connections"] == before["relay_tcp_connections"] - 1


async def test_stalled_reader_is_bounded_and_others_keep_their_rate(
    relay: RunningRelay,
) -> None:
    """One of two TCP subscribers stops reading for 5 s while 300 packets/s of 1.1 kB flow:
    the relay drops (and counts) what does not fit in its bounded write buffer, its memory
    stays put, the other subscriber gets every packet, and the stalled one resumes cleanly."""
    room = new_room(relay, "stall")
    rate = 300.0
    async with api_client(relay) as http:
        async with tcp_publisher(http, room, "pub", 0x2222) as (publisher, _):
            async with (
                Pacer(publisher, 0x2222, rate) as pacer,
                tcp_subscriber(http, room, "ok") as ok,
                tcp_subscriber(http, room, "slow", receive_buffer=4096) as slow,
            ):
                assert await wait_until(lambda: received(slow) >= 100 and received(ok) >= 100, 15)
                before = await read_metrics(http)
                rss_before = rss_kib(relay.process.pid)
                slow.stall()
                sent0, ok0 = pacer.sent, received(ok)
                stalled_at = time.monotonic()
                buffered = []
                while time.monotonic() - stalled_at < 5.0:
                    await asyncio.sleep(0.5)
                    m = await read_metrics(http)
                    buffered.append(m["relay_tcp_write_buffer_bytes"])
                sent, got = pacer.sent - sent0, received(ok) - ok0
                during = await read_metrics(http)
                rss_after = rss_kib(relay.process.pid)
                slow.resume()
                resumed_from = received(slow)
                assert await wait_until(lambda: received(slow) >= resumed_from + 100, 15)
        after = await read_metrics(http)
    dropped = during["relay_tcp_dropped_total"] - before["relay_tcp_dropped_total"]
    print(
        f"stall: sent {sent}, healthy subscriber got {got}, dropped for the stalled one "
        f"{dropped:.0f}, write buffers {max(buffered):.0f} B at most, "
        f"relay RSS {rss_before} -> {rss_after} KiB"
    )
    assert dropped > sent / 2, (dropped, sent)
    # one bounded buffer (plus a packet) for the stalled connection, the others near empty
    assert max(buffered) <= WRITE_BUFFER + 4 * 2048, buffered
    assert got >= 0.95 * sent, (got, sent)
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after)
    assert slow.peer.srtp_errors == 0  # frames stayed whole: every packet after is readable
    assert after["relay_tcp_dropped_total"] >= dropped


async def test_bad_frames_silence_and_surplus_connections_are_closed(
    relay: RunningRelay,
) -> None:
    async with api_client(relay) as http:
        before = await read_metrics(http)

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", relay.media_port)

        async def closed_by_relay(reader: asyncio.StreamReader, within: float) -> bool:
            try:
                return await asyncio.wait_for(reader.read(100), within) == b""
            except (TimeoutError, ConnectionError):
                return False

        # a frame length of 0, and one longer than any WebRTC packet
        for data in (b"\x00\x00", b"\xff\xff" + bytes(100)):
            reader, writer = await connect()
            writer.write(data)
            assert await closed_by_relay(reader, 3)
            writer.close()
        # a connection that sends nothing, and one that sends an unauthenticated frame
        silent = await connect()
        junk = await connect()
        junk[1].write(b"\x00\x04abcd")
        started = time.monotonic()
        assert await closed_by_relay(silent[0], 5)
        assert await closed_by_relay(junk[0], 5)
        assert time.monotonic() - started < 4
        for _, writer in (silent, junk):
            writer.close()
        # more than tcp_max_connections at once: the surplus is closed at once
        held = [await connect() for _ in range(MAX_CONNECTIONS)]
        extra = await connect()
        assert await closed_by_relay(extra[0], 3)
        for _, writer in (*held, extra):
            writer.close()
        after = await read_metrics(http)

    def grew(name: str) -> float:
        return after[f"relay_tcp_closed_{name}_total"] - before[f"relay_tcp_closed_{name}_total"]

    assert grew("bad_frame") == 2
    assert grew("unauthenticated") >= 2
    assert grew("refused") >= 1
    assert os.path.exists(f"/proc/{relay.process.pid}")  # the relay took it all in stride


def test_default_announces_udp_then_tcp_and_a_busy_tcp_port_leaves_udp(tmp_path: Path) -> None:
    """By default both: UDP candidates first, TCP after them at lower priorities. When the TCP
    port number is taken, the relay says so and runs on UDP alone; with "tcp" it refuses."""
    config, api_port, media_port = write_config(tmp_path)
    api = f"http://127.0.0.1:{api_port}"
    relay = spawn_relay(tmp_path, ["serve", "--config", str(config)])
    try:
        assert wait_healthy(relay, api), relay.stderr()
        lines = asyncio.run(candidate_lines(api))
        kinds = [line.split()[2] for line in lines]
        assert kinds == ["udp", "tcp"], lines
        priorities = [int(line.split()[3]) for line in lines]
        assert priorities[0] > priorities[1]
        assert lines[1].endswith(f"127.0.0.1 {media_port} typ host tcptype passive")
    finally:
        relay.stop()

    busy = tmp_path / "busy"
    busy.mkdir()
    config, api_port, media_port = write_config(busy)
    api = f"http://127.0.0.1:{api_port}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", media_port))
        holder.listen()
        relay = spawn_relay(busy, ["serve", "--config", str(config)])
        try:
            assert wait_healthy(relay, api), relay.stderr()
            lines = asyncio.run(candidate_lines(api))
            assert [line.split()[2] for line in lines] == ["udp"], lines
            assert "ICE-TCP off: cannot bind TCP port" in relay.stdout() + relay.stderr()
        finally:
            relay.stop()
        tcp_only = busy / "tcp-only"
        tcp_only.mkdir()
        config.write_text(config.read_text().replace("[workers]", 'transports = "tcp"\n[workers]'))
        refused = spawn_relay(tcp_only, ["serve", "--config", str(config)])
        assert refused.process.wait(30) != 0
        assert "cannot bind ICE-TCP port" in refused.stderr()


async def candidate_lines(api: str) -> list[str]:
    async with httpx.AsyncClient(base_url=api, headers={"Authorization": "Bearer testkey"}) as h:
        room = f"default{time.monotonic_ns()}"
        assert (await h.post("/v1/rooms", json={"room_id": room})).status_code == 201
        await add_participant(h, room, "p")
        body = (await h.post(f"/v1/rooms/{room}/participants/p/subscriber")).json()
    return [line for line in body["sdp"].splitlines() if line.startswith("a=candidate:")]
