"""Attacks on a real `relay serve` from loopback sockets the test owns (DESIGN principle 7).

- Media hijack by replay: a copy of a victim's real Binding request, sent from another
  address, followed by junk and forged SRTP/SRTCP/DTLS from there, must not bring a single
  media packet to that address, nor interrupt the victim's stream.
- NACK storm: a real subscriber asking again and again for its last 256 packets gets no more
  repair traffic than its retransmission budget, and another room's call keeps its rate.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct

import pytest

from relay.client.peer import TrackSpec, UdpClientPeer
from relay.rtc import rtcp
from relay.rtc.nack import RetransmissionBudget
from tests.integration.conftest import (
    RtpSender,
    RunningRelay,
    add_room,
    api_client,
    peer_publisher,
    peer_subscriber,
    room_name,
    wait_until,
)

pytestmark = pytest.mark.integration

TRACKS = [TrackSpec("audio", 0x0A0A0A0A), TrackSpec("video", 0x0B0B0B0B)]
_SEQ_SSRC = struct.Struct("!2xH4xI")


def _subscribed_ssrcs(remote, publisher_id: str) -> dict[str, int]:
    return {
        m.kind: m.ssrc
        for m in remote.media
        if m.ssrc is not None and m.msid is not None and m.msid[0] == publisher_id
    }


class Arrivals:
    """Arrival times of the RTP a subscriber decrypts, for its packet rate and largest gap."""

    def __init__(self, udp: UdpClientPeer, ssrcs: set[int]) -> None:
        self.times: list[float] = []
        self.loop = asyncio.get_running_loop()
        ssrcs = set(ssrcs)

        def on_rtp(plain: bytes, _now: float) -> None:
            if len(plain) >= 12 and _SEQ_SSRC.unpack_from(plain)[1] in ssrcs:
                self.times.append(self.loop.time())

        udp.peer.on_rtp = on_rtp

    def rate(self, start: float, end: float) -> float:
        return sum(1 for t in self.times if start <= t < end) / (end - start)

    def largest_gap(self, start: float, end: float) -> float:
        inside = [start] + [t for t in self.times if start <= t < end] + [end]
        return max(b - a for a, b in itertools.pairwise(inside))


def _capture_checks(udp: UdpClientPeer) -> list[bytes]:
    """Every Binding request the client sends from now on (its consent checks)."""
    captured: list[bytes] = []
    send_all = udp._send_all

    def wrapped(datagrams: list[bytes]) -> None:
        captured.extend(d for d in datagrams if d and d[0] < 4)
        send_all(datagrams)

    udp._send_all = wrapped  # type: ignore[method-assign]
    return captured


class Attacker(asyncio.DatagramProtocol):
    """A socket on 127.0.0.1 that counts what the relay sends it, by RFC 7983 first byte."""

    def __init__(self) -> None:
        self.stun = 0
        self.media = 0  # SRTP/SRTCP (128-191) and DTLS (20-63): anything but a STUN answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data and data[0] < 4:
            self.stun += 1
        else:
            self.media += 1


def _forgeries(ssrc: int, seq: int) -> list[bytes]:
    """Datagrams that look like SRTP, SRTCP and DTLS of the victim's connection."""
    tag = os.urandom(10)
    header = struct.pack("!BBHII", 0x80, 96, seq & 0xFFFF, seq * 3000, ssrc)
    return [
        header + os.urandom(100) + tag,  # forged SRTP with the relay's SSRC towards the victim
        struct.pack("!BBHI", 0x81, 201, 7, 0x1234) + os.urandom(24) + b"\x80\x00\x00\x01" + tag,
        b"\x80" + os.urandom(60),  # RTP-looking junk
        b"\x17\xfe\xfd\x00\x01" + os.urandom(6) + b"\x00\x30" + os.urandom(48),  # DTLS app data
        b"\x16\xfe\xfd\x00\x00" + os.urandom(6) + b"\x00\x30" + os.urandom(48),  # DTLS handshake
    ]


async def test_replayed_binding_request_does_not_hijack_media(relay: RunningRelay) -> None:
    room = room_name("attack")
    loop = asyncio.get_running_loop()
    async with api_client(relay) as http:
        await add_room(http, room)
        async with (
            peer_publisher(http, room, "camera", TRACKS) as pub,
            peer_subscriber(http, room, "victim") as (victim, offer),
        ):
            ssrcs = _subscribed_ssrcs(offer, "camera")
            arrivals = Arrivals(victim, set(ssrcs.values()))
            victim_checks = _capture_checks(victim)
            publisher_checks = _capture_checks(pub)
            target = ("127.0.0.1", relay.media_port)
            attacker_transport, attacker = await loop.create_datagram_endpoint(
                Attacker, local_addr=("127.0.0.1", 0)
            )
            try:
                async with RtpSender(pub, TRACKS):
                    # the victim's consent checks (every 2 s) are copied off the wire
                    assert await wait_until(
                        lambda: victim_checks and publisher_checks and len(arrivals.times) > 100,
                        10,
                    ), (len(victim_checks), len(publisher_checks), len(arrivals.times))
                    before_start = loop.time() - 1.5
                    attack_start = loop.time()
                    seq = 1
                    while loop.time() - attack_start < 3.0:
                        # the latest copies, replayed from the attacker's address ...
                        attacker_transport.sendto(victim_checks[-1], target)
                        attacker_transport.sendto(publisher_checks[-1], target)
                        # ... then junk and forgeries from there, for whichever got latched
                        for _ in range(5):
                            for forged in _forgeries(ssrcs["video"], seq):
                                attacker_transport.sendto(forged, target)
                            seq += 1
                            await asyncio.sleep(0.01)
                    attack_end = loop.time()
                    await asyncio.sleep(1.0)
                    after_end = loop.time()
            finally:
                attacker_transport.close()
            before = arrivals.rate(before_start, attack_start)
            during = arrivals.rate(attack_start, attack_end)
            after = arrivals.rate(attack_end, after_end)
            gap = arrivals.largest_gap(attack_start, after_end)
            print(
                f"\nreplay attack: {attacker.media} media/DTLS datagrams reached the attacker, "
                f"{attacker.stun} STUN answers; victim {before:.0f} packets/s before, "
                f"{during:.0f} during, {after:.0f} after; largest gap {gap * 1000:.0f} ms"
            )
            assert attacker.stun > 0  # the copies were answered, as a retransmission is
            assert attacker.media == 0, f"{attacker.media} datagrams reached the attacker"
            assert gap < 0.5, f"the victim's media stopped for {gap:.2f} s"
            assert during >= 0.8 * before and after >= 0.8 * before, (before, during, after)
            assert victim.peer.connected and pub.peer.connected
            metrics = await http.get("/metrics")
            assert 'relay_packets_dropped_total{reason="stun_replayed"}' in metrics.text


class Storm:
    """A subscriber that NACKs its last 256 video packets every 10 ms, and counts the bytes
    the relay sends it: first copies of a sequence number (media) and repeats (resends; the
    test client negotiates no RTX, so they come on the media SSRC)."""

    def __init__(self, udp: UdpClientPeer, video_ssrc: int) -> None:
        self.udp = udp
        self.video_ssrc = video_ssrc
        self.seen: set[int] = set()
        self.recent: list[int] = []
        self.media_bytes = 0
        self.resent_bytes = 0
        self.nack_bytes = 0
        self.nacks = 0
        datagram = udp._datagram

        def counting(data: bytes, addr: tuple[str, int]) -> None:
            if len(data) >= 12 and 127 < data[0] < 192 and not 191 < data[1] < 224:
                seq, ssrc = _SEQ_SSRC.unpack_from(data)
                if ssrc == video_ssrc:
                    if seq in self.seen:
                        self.resent_bytes += len(data)
                    else:
                        self.seen.add(seq)
                        self.recent.append(seq)
                        del self.recent[:-256]
                        self.media_bytes += len(data)
            datagram(data, addr)

        udp._datagram = counting  # type: ignore[method-assign]

    async def run(self, seconds: float, interval: float = 0.01) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            if self.recent:
                packet = self.udp.peer.protect_rtcp(
                    rtcp.nack(0x5EED, self.video_ssrc, list(self.recent))
                )
                self.udp.send_srtp(packet)
                self.nack_bytes += len(packet)
                self.nacks += 1
            await asyncio.sleep(interval)


async def test_nack_storm_is_held_to_the_retransmission_budget(relay: RunningRelay) -> None:
    storm_room, quiet_room = room_name("attack"), room_name("attack")
    loop = asyncio.get_running_loop()
    async with api_client(relay) as http:
        await add_room(http, storm_room)
        await add_room(http, quiet_room)
        async with (
            peer_publisher(http, storm_room, "camera", TRACKS) as pub,
            peer_subscriber(http, storm_room, "stormer") as (stormer, offer),
            peer_publisher(http, quiet_room, "other-camera", TRACKS) as other_pub,
            peer_subscriber(http, quiet_room, "other-viewer") as (viewer, other_offer),
        ):
            video_ssrc = _subscribed_ssrcs(offer, "camera")["video"]
            storm = Storm(stormer, video_ssrc)
            quiet = Arrivals(viewer, set(_subscribed_ssrcs(other_offer, "other-camera").values()))
            senders = [RtpSender(pub, TRACKS), RtpSender(other_pub, TRACKS)]
            for sender in senders:
                # about 400 kbit/s of video: 1000-byte packets that start a VP8 keyframe
                sender.video_payload = sender.video_payload[:5] + bytes(995)
            async with senders[0], senders[1]:
                assert await wait_until(
                    lambda: len(storm.recent) >= 100 and len(quiet.times) >= 100, 10
                )
                quiet_before = (loop.time() - 1.5, loop.time())
                media_at_start = storm.media_bytes
                started = loop.time()
                await storm.run(3.0)
                ended = loop.time()
                await asyncio.sleep(0.3)  # the last answers in flight
            seconds = ended - started
            media = storm.media_bytes - media_at_start
            share = 0.5  # [rtp] retransmission_budget, the default
            budget = (
                share * media + RetransmissionBudget.FLOOR * seconds + RetransmissionBudget.BURST
            )
            before = quiet.rate(*quiet_before)
            during = quiet.rate(started, ended)
            print(
                f"\nNACK storm: {storm.nacks} NACKs, {storm.nack_bytes} bytes asked "
                f"{storm.resent_bytes} bytes resent ({storm.resent_bytes / storm.nack_bytes:.2f} "
                f"bytes per NACK byte); media {media} bytes in {seconds:.1f} s, budget "
                f"{budget:.0f} bytes; other room {before:.0f} packets/s before, {during:.0f} during"
            )
            assert storm.nacks >= 200
            assert storm.resent_bytes > 0  # the storm's first requests were answered
            assert storm.resent_bytes <= budget * 1.1, (storm.resent_bytes, budget)
            assert during >= 0.9 * before, (before, during)
            metrics = relay.metrics()
            assert metrics["relay_nacks_received_total"] > 0
            assert metrics['relay_retransmissions_suppressed_total{reason="budget"}'] > 0
