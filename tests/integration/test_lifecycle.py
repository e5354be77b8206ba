"""Lifecycle of sessions and of the process, against a real `relay serve`: consent timeout,
NAT rebinding, the relay as DTLS client, SIGTERM during a call, and `relay serve` with the
embedded defaults."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from relay.client.peer import TrackSpec, UdpClientPeer
from tests.integration.conftest import (
    EventListener,
    RtpSender,
    RunningRelay,
    SpawnedRelay,
    add_room,
    api_client,
    auth_headers,
    peer_publisher,
    peer_subscriber,
    read_drops,
    read_metrics,
    room_name,
    spawn_relay,
    start_relay,
    stop_relay,
    wait_healthy,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

TRACKS = [TrackSpec("audio", 0x0A0A0A0A), TrackSpec("video", 0x0B0B0B0B)]
CONSENT_TIMEOUT = 2.0


def _subscribed_ssrcs(remote, publisher_id: str) -> dict[str, int]:
    """kind -> SSRC the relay uses towards this subscriber for ``publisher_id``'s tracks."""
    return {
        m.kind: m.ssrc
        for m in remote.media
        if m.ssrc is not None and m.msid is not None and m.msid[0] == publisher_id
    }


def _received(sub: UdpClientPeer, ssrcs: dict[str, int]) -> dict[str, int]:
    return {kind: sub.peer.rtp_received.get(ssrc, 0) for kind, ssrc in ssrcs.items()}


async def test_consent_timeout_removes_a_silent_participant(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, f"[session]\nconsent_timeout = {CONSENT_TIMEOUT}")
    try:
        room = room_name("life")
        async with api_client(relay) as http:
            await add_room(http, room)
            async with (
                EventListener(relay, room) as events,
                peer_publisher(http, room, "quiet", TRACKS) as pub,
            ):
                start = (await read_metrics(http))["relay_packets_in_total"]
                async with RtpSender(pub, TRACKS) as sender:

                    async def media_arrived() -> bool:
                        metrics = await read_metrics(http)
                        return metrics["relay_packets_in_total"] >= start + 20

                    assert await wait_until(media_arrived, 10)
                assert not sender.errors
                assert await events.wait_for("participant.connected", 5, participant_id="quiet")
                pub.abort()  # silence: no more checks or media, and no close_notify
                silent_at = time.monotonic()
                left = await events.wait_for(
                    "participant.left", CONSENT_TIMEOUT + 6, participant_id="quiet"
                )
                elapsed = time.monotonic() - silent_at
                assert left is not None, (events.events, relay.log()[-2000:])
                assert left["reason"] == "timeout", left
                print(f"participant.left (timeout) {elapsed:.2f} s after going silent")
                # Consent is sampled by the relay's 1 s housekeeping tick (relay/server.py TICK):
                # the last packet is stamped up to one tick late and the expiry is seen up to
                # one tick late, so the bound is consent_timeout + 2 ticks (+ slack for load).
                assert elapsed <= CONSENT_TIMEOUT + 2 * 1.0 + 1.0, elapsed
            r = await http.get(f"/v1/rooms/{room}")
            assert r.status_code == 200
            assert r.json()["participants"] == []
            r = await http.get(f"/v1/rooms/{room}/participants/quiet")
            assert r.status_code == 404
    finally:
        assert stop_relay(relay) == 0


async def test_nat_rebinding_keeps_media_flowing(relay: RunningRelay) -> None:
    room = room_name("life")
    async with api_client(relay) as http:
        await add_room(http, room)
        async with (
            EventListener(relay, room) as events,
            peer_publisher(http, room, "mover", TRACKS) as pub,
            peer_subscriber(http, room, "watcher") as (sub, offer),
        ):
            ssrcs = _subscribed_ssrcs(offer, "mover")
            assert set(ssrcs) == {"audio", "video"}, offer.sdp
            async with RtpSender(pub, TRACKS) as sender:
                assert await wait_until(lambda: min(_received(sub, ssrcs).values()) >= 20, 10), (
                    _received(sub, ssrcs),
                    sub.peer.stats(),
                )
                drops_before = await read_drops(http)
                rtcp_before = pub.peer.rtcp_received
                sent_before = sender.sent
                old = pub.local_address
                new = await pub.rebind()
                assert new != old
                received = _received(sub, ssrcs)
                # media from the new port reaches the subscriber ...
                assert await wait_until(
                    lambda: all(
                        n >= received[kind] + 50 for kind, n in _received(sub, ssrcs).items()
                    ),
                    10,
                ), (received, _received(sub, ssrcs))
                # ... and the relay's RTCP (receiver reports) comes to the new port
                assert await wait_until(lambda: pub.peer.rtcp_received > rtcp_before, 5)
                assert sender.sent > sent_before and not sender.errors
            drops_after = await read_drops(http)
            assert drops_after["unknown_address"] == drops_before["unknown_address"]
            assert drops_after["srtp_unprotect"] == drops_before["srtp_unprotect"]
            assert pub.peer.connected and pub.peer.mapped_address == new
            assert events.find("participant.left") is None
            # the subscriber missed nothing: every packet sent was forwarded
            total = sender.sent // len(TRACKS)
            assert await wait_until(lambda: min(_received(sub, ssrcs).values()) >= total - 2, 5), (
                total,
                _received(sub, ssrcs),
            )


async def test_nat_rebinding_without_renomination(relay: RunningRelay) -> None:
    """A client that only keeps up consent checks (no USE-CANDIDATE) after its NAT rebinds."""
    room = room_name("life")
    async with api_client(relay) as http:
        await add_room(http, room)
        async with (
            peer_publisher(http, room, "roamer", TRACKS) as pub,
            peer_subscriber(http, room, "audience") as (sub, offer),
        ):
            ssrcs = _subscribed_ssrcs(offer, "roamer")
            pub.peer.use_candidate = False  # nominated once; consent checks from now on
            async with RtpSender(pub, TRACKS) as sender:
                assert await wait_until(lambda: min(_received(sub, ssrcs).values()) >= 20, 10)
                drops_before = await read_drops(http)
                successes = pub.peer.check_successes
                await pub.rebind(nominate=False)
                received = _received(sub, ssrcs)
                resumed = await wait_until(
                    lambda: all(
                        n >= received[kind] + 50 for kind, n in _received(sub, ssrcs).items()
                    ),
                    5,
                )
                assert not sender.errors
            drops_after = await read_drops(http)
            lost = drops_after["unknown_address"] - drops_before["unknown_address"]
            # the relay did answer the checks from the new port: it knows the client is there
            assert pub.peer.check_successes > successes
            assert resumed, (
                f"media stopped after the rebinding: {lost:.0f} packets dropped as "
                f"unknown_address, subscriber got {received} -> {_received(sub, ssrcs)}"
            )


async def test_relay_as_dtls_client(relay: RunningRelay) -> None:
    room = room_name("life")
    async with api_client(relay) as http:
        await add_room(http, room)
        async with (
            EventListener(relay, room) as events,
            peer_publisher(http, room, "server", TRACKS, setup="passive") as pub,
            peer_subscriber(http, room, "viewer", setup="passive") as (sub, offer),
        ):
            assert pub.peer.remote is not None and pub.peer.remote.setup == "active"
            assert pub.peer.dtls_client is False and sub.peer.dtls_client is False
            ssrcs = _subscribed_ssrcs(offer, "server")
            async with RtpSender(pub, TRACKS):
                assert await wait_until(lambda: min(_received(sub, ssrcs).values()) >= 30, 10), (
                    _received(sub, ssrcs),
                    sub.peer.stats(),
                )
            r = await http.get(f"/v1/rooms/{room}/participants/server")
            assert r.json()["state"] == "connected"
            # leaving with a DTLS close_notify (sent by the DTLS server here) is a clean leave
            pub.close()
            left = await events.wait_for("participant.left", 5, participant_id="server")
            assert left is not None and left["reason"] == "left", events.events


async def test_sigterm_during_a_call(tmp_path: Path) -> None:
    config, api_port, media_port = write_config(tmp_path)
    spawned = spawn_relay(tmp_path, ["serve", "--config", str(config)])
    try:
        api = f"http://127.0.0.1:{api_port}"
        assert wait_healthy(spawned, api), spawned.stderr()
        relay = RunningRelay(api, media_port, "testkey", spawned.process, spawned.stderr_path)
        room = room_name("life")
        async with api_client(relay) as http:
            await add_room(http, room)
            async with (
                EventListener(relay, room) as events,
                peer_publisher(http, room, "talker", TRACKS) as pub,
                peer_subscriber(http, room, "listener") as (sub, offer),
                RtpSender(pub, TRACKS),
            ):
                ssrcs = _subscribed_ssrcs(offer, "talker")
                assert await wait_until(lambda: min(_received(sub, ssrcs).values()) >= 20, 10)
                sent_at = time.monotonic()
                spawned.process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(spawned.process.wait, 5)
                elapsed = time.monotonic() - sent_at
                assert code == 0, spawned.stderr()[-3000:]
                assert elapsed < 5
                print(f"exit 0 {elapsed:.2f} s after SIGTERM")
                assert await events.wait_ended(5), events.events
                for pid in ("talker", "listener"):
                    left = events.find("participant.left", participant_id=pid)
                    assert left is not None and left["reason"] == "room_closed", events.events
                assert events.find("room.closed") is not None, events.events
                # both clients were told with a DTLS close_notify
                assert await wait_until(lambda: pub.peer.closed and sub.peer.closed, 2)
        stderr = spawned.stderr()
        assert f"http://127.0.0.1:{api_port}/v1" in stderr, stderr
        assert f"http://127.0.0.1:{api_port}/docs" in stderr, stderr
        assert f"http://127.0.0.1:{api_port}/metrics" in stderr, stderr
        assert "Traceback" not in stderr, stderr
    finally:
        spawned.stop()


def _port_free(kind: int, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_serve_with_embedded_defaults(tmp_path: Path) -> None:
    if not _port_free(socket.SOCK_STREAM, 8080) or not _port_free(socket.SOCK_DGRAM, 40000):
        pytest.skip("127.0.0.1:8080/tcp or 127.0.0.1:40000/udp is in use")
    spawned: SpawnedRelay | None = None
    try:
        spawned = spawn_relay(tmp_path, ["serve"])
        api = "http://127.0.0.1:8080"
        if not wait_healthy(spawned, api):
            stderr = spawned.stderr()
            if "cannot bind" in stderr or "cannot serve" in stderr:
                pytest.skip(f"a default port was taken meanwhile: {stderr[-300:]}")
            raise AssertionError(stderr)
        assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{api}/v1/rooms").status_code == 401
        assert httpx.get(f"{api}/v1/rooms", headers=auth_headers("testkey")).status_code == 401
        r = httpx.get(f"{api}/v1/rooms", headers=auth_headers("devkey"))
        assert r.status_code == 200 and "rooms" in r.json()
        stderr = spawned.stderr()
        assert "embedded defaults" in stderr and "127.0.0.1:40000" in stderr, stderr
        code = spawned.stop(signal.SIGINT, timeout=10)
        assert code == 0, spawned.stderr()[-3000:]
    finally:
        if spawned is not None:
            try:
                spawned.stop(signal.SIGKILL, timeout=5)
            except subprocess.SubprocessError:
                pass
