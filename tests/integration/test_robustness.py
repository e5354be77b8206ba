"""Bad input harms nobody: a real `relay serve` under a barrage of malformed datagrams and
API requests, while two aiortc clients are in a call through it.

Every datagram must be counted under the drop reason its path in the media port and legs (relay/sfu/port.py, publisher_leg.py) counts,
the process must stay up, and the call must keep decoding during and after the barrage.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import struct
from collections.abc import Callable

import httpx
import pytest
from aioice import stun

from relay.client.peer import AUDIO_PT, ClientPeer, RemoteDescription, TrackSpec, build_rtp
from relay.rtc import rtcp
from relay.rtc.ice import StunError, parse_binding_request
from tests.integration.clients import CallClient, wait_for
from tests.integration.conftest import (
    RunningRelay,
    add_participant,
    add_room,
    api_client,
    peer_publisher,
    peer_subscriber,
    read_drops,
    wait_until,
)

pytestmark = pytest.mark.integration

_rooms = itertools.count()
OPUS_SILENCE = b"\xf8\xff\xfe"
ATTACKER_TRACKS = [TrackSpec("audio", 0xA1A1A1), TrackSpec("video", 0xB1B1B1)]


def _frames(client: CallClient) -> int:
    return sum(client.received.frames.values())


def _decodes(client: CallClient, name: str, frames: int = 20, tones: int = 2) -> bool:
    got = client.received
    return got.frames.get(name, 0) >= frames and got.tones.get(name, 0) >= tones


class Barrage:
    """Sends datagrams to the relay's media port from fresh sockets and checks drop counters."""

    def __init__(self, relay: RunningRelay, http: httpx.AsyncClient) -> None:
        self.target = ("127.0.0.1", relay.media_port)
        self.http = http
        self.sent = 0
        self.log: list[str] = []

    def socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        return sock

    def fire(self, datagrams: list[bytes], sock: socket.socket | None = None) -> None:
        own = sock is None
        s = self.socket() if sock is None else sock
        try:
            for d in datagrams:
                s.sendto(d, self.target)
                self.sent += 1
        finally:
            if own:
                s.close()

    async def expect(self, what: str, expected: dict[str, int], send: Callable[[], object]) -> None:
        """Run ``send``; the drop counters must grow by exactly ``expected`` (and nothing else)."""
        before = await read_drops(self.http)
        send()

        async def reached() -> bool:
            now = await read_drops(self.http)
            return all(now[r] - before[r] >= n for r, n in expected.items())

        await wait_until(reached, 10, interval=0.05)
        await asyncio.sleep(0.2)  # anything miscounted would show up by now
        after = await read_drops(self.http)
        delta = {r: int(after[r] - before[r]) for r in after if after[r] != before[r]}
        self.log.append(f"{what}: {delta}")
        assert delta == expected, f"{what}: expected {expected}, counted {delta}"


def _binding(username: str, pwd: str | None, **attributes: object) -> stun.Message:
    message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    message.attributes["USERNAME"] = username
    message.attributes["PRIORITY"] = 1
    message.attributes["ICE-CONTROLLING"] = 1
    message.attributes.update(attributes)
    if pwd is not None:
        message.add_message_integrity(pwd.encode())
    else:
        message.add_fingerprint()
    return message


def _random_datagrams(rng: random.Random) -> tuple[list[bytes], dict[str, int]]:
    """One datagram per first-byte value (plus an empty one) and the drops they must cause."""
    datagrams = [b""]
    expected = {"unknown_first_byte": 1, "stun_malformed": 0, "unknown_address": 0}
    for first in range(256):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        d = bytes([first]) + body
        datagrams.append(d)
        if first < 4:
            with pytest.raises(StunError):
                parse_binding_request(d)
            expected["stun_malformed"] += 1
        elif 19 < first < 64 or 127 < first < 192:
            expected["unknown_address"] += 1
        else:
            expected["unknown_first_byte"] += 1
    return datagrams, expected


async def _call(relay: RunningRelay, room: str) -> list[CallClient]:
    clients = [CallClient(relay.api, relay.key, room, name) for name in ("red", "green")]
    for c in clients:
        await c.join()
    for c in clients:
        await c.subscribe()
        await c.publish()
    return clients


async def test_malformed_datagrams_harm_nobody(relay: RunningRelay) -> None:
    room = f"robust{next(_rooms)}"
    rng = random.Random(7983)
    async with api_client(relay) as http:
        await add_room(http, room)
        clients = await _call(relay, room)
        red, green = clients
        barrage = Barrage(relay, http)
        try:
            assert await wait_for(lambda: _decodes(red, "green") and _decodes(green, "red"), 30), (
                red.received,
                green.received,
                relay.log()[-3000:],
            )
            frames_before = (_frames(red), _frames(green))

            # A connected publisher and a connected subscriber-only participant in the same room:
            # the sources of the "after SRTP" garbage.
            async with (
                peer_publisher(http, room, "mallory", ATTACKER_TRACKS) as mallory,
                peer_subscriber(http, room, "eve") as (eve, _),
            ):
                relay_ufrag = mallory.peer.remote.ice_ufrag
                relay_pwd = mallory.peer.remote.ice_pwd
                await _stun_garbage(barrage, relay_ufrag, relay_pwd)
                await _unchecked_garbage(barrage, rng)
                await _after_srtp_garbage(barrage, mallory, eve)
                await _half_connected(barrage, http, room)

                # The barrage disturbed none of the connected parties.
                assert mallory.peer.connected and eve.peer.connected
                successes = mallory.peer.check_successes
                assert await wait_until(lambda: mallory.peer.check_successes > successes, 6)
                r = await http.get(f"/v1/rooms/{room}")
                assert {p["participant_id"] for p in r.json()["participants"]} >= {
                    "red",
                    "green",
                    "mallory",
                    "eve",
                }
            frames_during = (_frames(red), _frames(green))
            assert relay.process.poll() is None, relay.log()[-3000:]
            assert frames_during[0] > frames_before[0] and frames_during[1] > frames_before[1]
            # ... and the call goes on afterwards.
            assert await wait_for(
                lambda: (
                    _frames(red) >= frames_during[0] + 15
                    and _frames(green) >= frames_during[1] + 15
                ),
                20,
            ), (frames_during, red.received, green.received)
            assert relay.process.poll() is None
            r = await http.get("/healthz")
            assert r.status_code == 200
            print(f"{barrage.sent} bad datagrams; " + "; ".join(barrage.log))
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _stun_garbage(barrage: Barrage, relay_ufrag: str, relay_pwd: str) -> None:
    valid = bytes(_binding(f"{relay_ufrag}:someone", relay_pwd))
    # a valid request would be answered: make sure the malformed ones are the only difference
    parse_binding_request(valid)
    fingerprint_flipped = valid[:-1] + bytes([valid[-1] ^ 0x01])
    response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE)
    response.add_fingerprint()
    no_username = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    no_username.add_message_integrity(relay_pwd.encode())
    malformed = [
        valid[:10],  # shorter than a STUN header
        valid[:-8],  # truncated: length field and size disagree
        valid + b"\x00\x00\x00\x00",  # trailing bytes
        fingerprint_flipped,  # bad FINGERPRINT
        bytes(response),  # a response, not a request
        bytes(no_username),
        bytes(_binding(f"{relay_ufrag}:someone", None)),  # no MESSAGE-INTEGRITY
        bytes(_binding("no-colon", relay_pwd)),
        b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"\x00" * 11,  # 19 bytes
    ]
    await barrage.expect(
        "malformed STUN", {"stun_malformed": len(malformed)}, lambda: barrage.fire(malformed)
    )
    wrong_integrity = [bytes(_binding(f"{relay_ufrag}:someone", "wrong-password" * 2))]
    wrong_integrity.append(bytes(_binding(f"{relay_ufrag}:someone", relay_pwd[::-1])))
    await barrage.expect(
        "STUN with a wrong MESSAGE-INTEGRITY",
        {"stun_unauthorized": len(wrong_integrity)},
        lambda: barrage.fire(wrong_integrity),
    )
    unknown = [bytes(_binding(f"nosuchufrag{i}:someone", relay_pwd)) for i in range(3)]
    await barrage.expect(
        "STUN for an unknown ufrag",
        {"stun_unknown_ufrag": len(unknown)},
        lambda: barrage.fire(unknown),
    )


async def _unchecked_garbage(barrage: Barrage, rng: random.Random) -> None:
    """DTLS, RTP and RTCP look-alikes and random bytes from addresses that never passed a check."""
    dtls = [
        bytes([22, 0xFE, 0xFD]) + b"\x00" * 8 + b"\x00\x10" + bytes(16),  # a "handshake" record
        bytes([23, 0xFE, 0xFD, 0, 1]) + bytes(rng.getrandbits(8) for _ in range(60)),
        bytes([21, 0xFE, 0xFF]) + b"\x00" * 10,  # an alert
        bytes([20]),  # one byte
    ]
    rtp_like = [
        build_rtp(0xA1A1A1, AUDIO_PT, 1, 960, b"\x00" * 40),  # the attacker's own SSRC
        build_rtp(1234, 96, 2, 3000, b"\x00" * 100, marker=True),
        rtcp.pli(1, 0xB1B1B1),
        rtcp.receiver_report(5, []),
        b"\x80",
    ]
    await barrage.expect(
        "DTLS/RTP/RTCP from unchecked addresses",
        {"unknown_address": len(dtls) + len(rtp_like)},
        lambda: barrage.fire(dtls + rtp_like),
    )
    datagrams, expected = _random_datagrams(rng)
    # a few different source sockets
    await barrage.expect(
        "random bytes with every first byte",
        {k: v for k, v in expected.items() if v},
        lambda: [barrage.fire(datagrams[i::4]) for i in range(4)],
    )


async def _after_srtp_garbage(barrage: Barrage, mallory, eve) -> None:
    """Garbage from participants that did connect: counted past the address check."""
    peer: ClientPeer = mallory.peer
    audio, video = ATTACKER_TRACKS
    srtp = peer.srtp
    assert srtp is not None
    seq = itertools.count(100)

    def rtp(ssrc: int, pt: int, **kw) -> bytes:
        # an opus silence frame: whatever gets forwarded decodes fine at the aiortc clients
        return peer.protect_rtp(ssrc, pt, next(seq), 960, OPUS_SILENCE, **kw)

    # the header is validated by libsrtp before the relay's own RTP parser sees it
    truncated = [b"\x80\x6f\x00\x01\x00\x00", struct.pack("!BBHII", 0x8F, 111, 7, 0, audio.ssrc)]
    truncated.append(struct.pack("!BBHII", 0x90, 111, 8, 0, audio.ssrc) + b"\xbe\xde\x00\x09")
    forged = bytearray(rtp(audio.ssrc, AUDIO_PT))
    forged[-3] ^= 0x40
    replayed = rtp(audio.ssrc, AUDIO_PT)
    garbage = struct.pack("!BBHII", 0x80, 111, 50000, 0, audio.ssrc) + bytes(range(120))
    srtcp_garbage = b"\x80\xc8\x00\x06" + struct.pack("!I", audio.ssrc) + bytes(range(40))
    bad_auth = [*truncated, bytes(forged), replayed, garbage, srtcp_garbage]
    await barrage.expect(
        "SRTP/SRTCP failing authentication",
        {"srtp_unprotect": len(bad_auth)},
        lambda: [mallory.send_srtp(d) for d in [replayed, *bad_auth]],  # replayed goes twice
    )
    # a correct first copy of ``replayed`` was forwarded, not dropped

    def element_overrun(profile: bytes, element: bytes) -> bytes:
        block = profile + struct.pack("!H", 1) + element
        body = struct.pack("!BBHII", 0x90, AUDIO_PT, next(seq), 960, audio.ssrc) + block
        return srtp.protect(body + b"\x01" * 20)

    padded_zero = struct.pack("!BBHII", 0xA0, AUDIO_PT, next(seq), 960, audio.ssrc) + b"pay\x00"
    padded_big = struct.pack("!BBHII", 0xA0, AUDIO_PT, next(seq), 960, audio.ssrc) + b"pay\x7f"
    malformed = [
        element_overrun(b"\xbe\xde", b"\x1f\x00\x00\x00"),  # one-byte element: 16 bytes in 3
        element_overrun(b"\x10\x00", b"\x01\x09\x00\x00"),  # two-byte element: 9 bytes in 2
        srtp.protect(padded_zero),
        srtp.protect(padded_big),
    ]
    await barrage.expect(
        "RTP with bad extension or padding",
        {"rtp_malformed": len(malformed)},
        lambda: [mallory.send_srtp(d) for d in malformed],
    )
    unknown_ssrc = [rtp(0xDEAD0000 + i, AUDIO_PT, extensions=[]) for i in range(3)]
    await barrage.expect(
        "RTP with an unknown SSRC",
        {"unknown_ssrc": len(unknown_ssrc)},
        lambda: [mallory.send_srtp(d) for d in unknown_ssrc],
    )
    wrong_pt = [rtp(audio.ssrc, 0), rtp(video.ssrc, AUDIO_PT)]
    await barrage.expect(
        "RTP with a payload type the answer did not accept",
        {"unknown_payload_type": len(wrong_pt)},
        lambda: [mallory.send_srtp(d) for d in wrong_pt],
    )
    bad_rtcp = [
        b"\x80\xc9\x00\x05" + struct.pack("!I", 7),  # length overruns
        b"\xa0\xc9\x00\x01" + struct.pack("!I", 7),  # padding count 0
        b"\x80\xc8\x00\x01" + struct.pack("!I", 7),  # SR without sender info
        rtcp.pli(1, 2) + b"\x80\xcc\x00\x09",  # a truncated second packet in a compound
    ]
    await barrage.expect(
        "malformed RTCP after SRTCP",
        {"rtcp_malformed": len(bad_rtcp)},
        lambda: [mallory.send_rtcp(d) for d in bad_rtcp],
    )
    from_subscriber = [eve.peer.protect_rtp(4242, AUDIO_PT, i, 0, b"x" * 30) for i in range(2)]
    await barrage.expect(
        "RTP on a subscriber-only connection",
        {"not_publishing": len(from_subscriber)},
        lambda: [eve.send_srtp(d) for d in from_subscriber],
    )
    # DTLS garbage from the connected address: DTLS discards it, nothing fails
    dtls_noise = [
        bytes([23, 0xFE, 0xFD, 0, 1]) + bytes(rng_bytes(60)),
        bytes([22, 0xFE, 0xFD, 0, 0]) + b"\x00" * 6 + b"\x00\x05" + b"junk!",
        bytes([20, 0xFE, 0xFD]),
    ]

    def send_noise() -> None:
        for d in dtls_noise:
            mallory.send_srtp(d)
            eve.send_srtp(d)

    await barrage.expect("DTLS noise after the handshake", {}, send_noise)


def rng_bytes(n: int) -> bytes:
    return bytes(random.Random(n).getrandbits(8) for _ in range(n))


async def _half_connected(barrage: Barrage, http: httpx.AsyncClient, room: str) -> None:
    """Media before DTLS finished, and DTLS before the role is known, from checked addresses."""
    loop = asyncio.get_running_loop()

    async def checked_socket(peer: ClientPeer) -> socket.socket:
        sock = barrage.socket()
        for _ in range(20):
            for d in peer.check(loop.time()):
                sock.sendto(d, barrage.target)
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 0.5)
            except TimeoutError:
                continue
            peer.receive(data, loop.time())
            if peer.ice_connected:
                return sock
        sock.close()
        raise AssertionError(f"no answer to a valid check: {peer.stats()}")

    # a publisher that passes ICE but never starts DTLS (the relay waits as DTLS server)
    await add_participant(http, room, "halfway")
    half = ClientPeer()
    offer = half.create_offer([TrackSpec("audio", 0xC1C1C1)])
    r = await http.post(
        f"/v1/rooms/{room}/participants/halfway/publisher", json={"type": "offer", "sdp": offer}
    )
    assert r.status_code == 200, r.text
    # our side would start DTLS on the check's answer: its ClientHello is never sent
    half.set_remote_description(RemoteDescription.parse(r.json()["sdp"]))
    sock = await checked_socket(half)
    try:
        early = [
            build_rtp(0xC1C1C1, AUDIO_PT, 1, 960, b"\x00" * 40),
            rtcp.receiver_report(0xC1C1C1, []),
        ]
        await barrage.expect(
            "media before the DTLS handshake",
            {"srtp_not_ready": len(early)},
            lambda: barrage.fire(early, sock),
        )
    finally:
        sock.close()

    # a subscriber connection checked before its answer: no DTLS role yet
    await add_participant(http, room, "early")
    early_peer = ClientPeer()
    r = await http.post(f"/v1/rooms/{room}/participants/early/subscriber")
    assert r.status_code == 200, r.text
    remote = RemoteDescription.parse(r.json()["sdp"], revision=r.json()["revision"])
    early_peer.create_answer(remote)
    early_peer.set_remote_description(remote)
    sock = await checked_socket(early_peer)
    try:
        hello = bytes([22, 0xFE, 0xFF, 0, 0]) + b"\x00" * 6 + b"\x00\x04" + b"\x01\x00\x00\x00"
        await barrage.expect(
            "DTLS before the DTLS role is known",
            {"dtls_failed": 1},
            lambda: barrage.fire([hello], sock),
        )
    finally:
        sock.close()
    for pid in ("halfway", "early"):
        r = await http.delete(f"/v1/rooms/{room}/participants/{pid}")
        assert r.status_code == 204, r.text


async def test_bad_api_requests_get_clear_errors(relay: RunningRelay) -> None:
    room = f"robust{next(_rooms)}"
    async with api_client(relay) as http:
        await add_room(http, room)
        await add_participant(http, room, "alice")

        def error(r: httpx.Response, status: int, code: str | None = None) -> None:
            assert r.status_code == status, (r.status_code, r.text)
            body = r.json()["error"]
            assert body["message"]
            if code is not None:
                assert body["code"] == code, body

        headers = {"content-type": "application/json"}
        error(await http.post("/v1/rooms", content=b"{not json", headers=headers), 422)
        error(await http.post("/v1/rooms", content=b"[1, 2", headers=headers), 422)
        error(await http.post("/v1/rooms", json={"room_id": 42}), 422)
        error(await http.post("/v1/rooms", json={"room_id": "bad id!"}), 422)
        error(await http.post("/v1/rooms/nosuchroom/participants", json={}), 404, "room_not_found")
        error(await http.get(f"/v1/rooms/{room}/participants/nobody"), 404, "participant_not_found")
        error(await http.post("/v1/rooms", json={"room_id": room}), 409, "room_exists")
        error(await http.post("/v1/rooms", content=b"x" * 300_000, headers=headers), 413)
        publisher = f"/v1/rooms/{room}/participants/alice/publisher"
        for sdp in ("hello", "v=0\r\nm=audio\r\n", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n"):
            error(await http.post(publisher, json={"type": "offer", "sdp": sdp}), 400, "bad_sdp")
        # an offer without ICE credentials
        peer = ClientPeer()
        offer = peer.create_offer([TrackSpec("audio", 1)])
        stripped = "".join(
            line + "\r\n" for line in offer.splitlines() if not line.startswith("a=ice-")
        )
        error(await http.post(publisher, json={"type": "offer", "sdp": stripped}), 400, "bad_sdp")
        error(await http.post(publisher, json={"type": "offer"}), 422)

        subscriber = f"/v1/rooms/{room}/participants/alice/subscriber"
        r = await http.post(subscriber)
        assert r.status_code == 200, r.text
        offer_body = r.json()
        remote = RemoteDescription.parse(offer_body["sdp"], revision=offer_body["revision"])
        answer = ClientPeer().create_answer(remote)
        revision = offer_body["revision"]
        r = await http.put(
            subscriber, json={"type": "answer", "sdp": answer, "revision": revision + 1}
        )
        error(r, 409, "stale_revision")
        r = await http.put(
            subscriber, json={"type": "answer", "sdp": "v=0\r\n", "revision": revision}
        )
        error(r, 400, "bad_sdp")
        # bob publishes: alice's subscription changes, the offer she holds is stale
        await add_participant(http, room, "bob")
        bob = ClientPeer().create_offer([TrackSpec("audio", 2)])
        r = await http.post(
            f"/v1/rooms/{room}/participants/bob/publisher", json={"type": "offer", "sdp": bob}
        )
        assert r.status_code == 200, r.text
        r = await http.put(subscriber, json={"type": "answer", "sdp": answer, "revision": revision})
        error(r, 409, "stale_revision")
        # a fresh offer and its answer still go through after all that
        r = await http.post(subscriber)
        assert r.status_code == 200 and r.json()["revision"] > revision, r.text
        remote = RemoteDescription.parse(r.json()["sdp"], revision=r.json()["revision"])
        r = await http.put(
            subscriber,
            json={
                "type": "answer",
                "sdp": ClientPeer().create_answer(remote),
                "revision": remote.revision,
            },
        )
        assert r.status_code == 204, r.text
        assert relay.process.poll() is None
        assert (await http.get("/healthz")).status_code == 200
        assert "Traceback" not in relay.log()
