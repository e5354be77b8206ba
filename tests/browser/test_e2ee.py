"""End-to-end encrypted rooms in Chromium, with the demo page's passphrase.

The relay runs in a process of its own inside the test's network namespace, as everywhere in
the browser tests, but started through a few lines (``CAPTURE``) that wrap
``relay.sfu.track.Track.receive`` before ``relay serve`` starts: every video RTP packet the
relay receives (after SRTP, before forwarding) is appended to a file. The product has no
capture feature; the test reads what the relay saw and forwarded, reassembles the VP8 frames,
and checks that beyond the clear header bytes they are ciphertext under the passphrase's key.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from relay.rtc.vp8 import Vp8Error, parse_vp8
from tests.browser.conftest import Call, World, make_world
from tests.browser.harness import (
    ROOT,
    Namespace,
    NamespaceLoop,
    Process,
    RelayInNamespace,
    relay_config,
    wait_healthy,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

PASSPHRASE = "correct horse battery staple"
#: The demo page's key derivation (relay/static/demo.js, e2eeKey) and frame format
#: (relay/static/demo-e2ee.js).
ITERATIONS = 600_000
SALT_PREFIX = b"relay-demo-e2ee/"
IV_LENGTH = 12
TAG_LENGTH = 16
#: What the page says when it has no passphrase for an end-to-end encrypted room.
E2EE_NEEDED = "this room is end-to-end encrypted: enter its passphrase to join"
#: framesDecoded must grow by this much for each pair of pages.
FRAMES = 45
MEDIA_TIMEOUT = 60.0

#: ``python -c CAPTURE <capture file> <config file>``: ``relay serve`` with every received
#: video packet's payload written to the capture file (one JSON object per line).
CAPTURE = """
import json, sys
from relay.sfu.track import Track
from relay.cli import main

capture = open(sys.argv[1], "a", buffering=1)
receive = Track.receive

def capturing_receive(self, plain, seq, ts, offset, elements, size, now):
    if self.kind == "video":
        end = len(plain) - (plain[-1] if plain[0] & 0x20 else 0)
        record = {
            "room": self.participant.room.room_id,
            "participant": self.participant.participant_id,
            "ssrc": int.from_bytes(plain[8:12], "big"),
            "seq": seq,
            "ts": ts,
            "marker": plain[1] >> 7,
            "payload": bytes(plain[offset:end]).hex(),
        }
        capture.write(json.dumps(record) + "\\n")
    return receive(self, plain, seq, ts, offset, elements, size, now)

Track.receive = capturing_receive
sys.exit(main(["serve", "--config", sys.argv[2]]))
"""


# --------------------------------------------------------------------------------------------
# The relay with its packet capture, and the world the `call` fixture uses


def start_capturing_relay(
    namespace: Namespace, loop: NamespaceLoop, folder: Path
) -> tuple[RelayInNamespace, Path]:
    """``relay serve`` in the namespace (as harness.start_relay), capturing video payloads."""
    secret = secrets.token_urlsafe(32)
    config = folder / "relay.toml"
    # load shedding is not under test here: a busy machine must not turn the pages away
    config.write_text(relay_config(secret, "\n[overload]\nenabled = false\n"))
    capture = folder / "capture.jsonl"
    command = [*namespace.prefix(), sys.executable, "-c", CAPTURE, str(capture), str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    process = Process(command, folder / "relay.log", env=env, cwd=ROOT)
    relay = RelayInNamespace(process, secret)

    wait_healthy(loop, process, relay.api)
    return relay, capture


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Overrides the browser tests' world: the same, with the capturing relay."""
    yield from make_world(
        tmp_path_factory.mktemp("e2ee"),
        start=lambda namespace, loop, folder: start_capturing_relay(namespace, loop, folder)[0],
    )


def e2ee_room(call: Call) -> None:
    """Make the test's room one that requires end-to-end encryption."""
    assert call.api("DELETE", f"/v1/rooms/{call.room}").status_code == 204
    body = {"room_id": call.room, "e2ee_required": True}
    r = call.api("POST", "/v1/rooms", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["e2ee_required"] is True


# --------------------------------------------------------------------------------------------
# The page's numbers


def frames_decoded(call: Call, receiver: str, publisher: str) -> int:
    return int(call.inbound(receiver, publisher, "video").get("framesDecoded") or 0)


def decryption(call: Call, receiver: str, publisher: str, kind: str = "video") -> dict[str, int]:
    """Frames of ``publisher`` the page of ``receiver`` decrypted and dropped."""
    e2ee = call.report(receiver).get("e2ee") or {}
    counts = ((e2ee.get("received") or {}).get(publisher) or {}).get(kind) or {}
    return {"decrypted": counts.get("decrypted", 0), "failed": counts.get("failed", 0)}


def wait_for_video(call: Call, pairs: list[tuple[str, str]]) -> None:
    """Each (receiver, publisher) pair decodes video, and FRAMES more frames after that."""

    def show() -> str:
        return str({f"{r}<-{p}": frames_decoded(call, r, p) for r, p in pairs})

    wait_until(
        lambda: all(frames_decoded(call, r, p) > 0 for r, p in pairs),
        MEDIA_TIMEOUT,
        what=lambda: f"first decoded frames ({show()})",
    )
    start = {pair: frames_decoded(call, *pair) for pair in pairs}
    wait_until(
        lambda: all(frames_decoded(call, *pair) - start[pair] >= FRAMES for pair in pairs),
        MEDIA_TIMEOUT,
        what=lambda: f"{FRAMES} more decoded frames each ({show()})",
    )


#: Script for a page: the mean red, green and blue of a video element drawn on a canvas, and
#: how much the picture varies (the standard deviation of its grey levels).
PICTURE = """(() => {
  const video = document.querySelector(%s);
  if (!video || !video.videoWidth) return null;
  const canvas = document.createElement('canvas');
  canvas.width = 64;
  canvas.height = 48;
  const context = canvas.getContext('2d');
  context.drawImage(video, 0, 0, 64, 48);
  const data = context.getImageData(0, 0, 64, 48).data;
  const sums = [0, 0, 0];
  const greys = [];
  for (let i = 0; i < data.length; i += 4) {
    for (let c = 0; c < 3; c += 1) sums[c] += data[i + c];
    greys.push((data[i] + data[i + 1] + data[i + 2]) / 3);
  }
  const n = greys.length;
  const mean = greys.reduce((a, b) => a + b, 0) / n;
  const deviation = Math.sqrt(greys.reduce((a, b) => a + (b - mean) ** 2, 0) / n);
  return { rgb: sums.map((s) => s / n), deviation, width: video.videoWidth, height: video.videoHeight };
})()"""


def picture(call: Call, label: str, selector: str) -> dict[str, Any] | None:
    page = call.browsers[label].cdp
    assert page is not None
    result: dict[str, Any] | None = page.evaluate(PICTURE % json.dumps(selector))
    return result


# --------------------------------------------------------------------------------------------
# What the relay saw


def passphrase_key(passphrase: str, room: str) -> bytes:
    """The page's AES-GCM key: PBKDF2-HMAC-SHA256, salt "relay-demo-e2ee/" + room id."""
    kdf = PBKDF2HMAC(
        algorithm=SHA256(), length=16, salt=SALT_PREFIX + room.encode(), iterations=ITERATIONS
    )
    return kdf.derive(passphrase.encode())


def captured_frames(capture: Path, room: str, participant: str) -> list[bytes]:
    """The complete VP8 frames of ``participant``'s video that the relay received: payloads
    of one RTP timestamp, consecutive sequence numbers from the packet that starts the frame
    (S=1, partition 0) to the one with the marker bit, with their payload descriptors
    stripped. Retransmissions (the same sequence number again) are counted once."""
    packets: dict[int, dict[int, dict[str, Any]]] = {}  # ssrc -> seq -> record
    for line in capture.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the line being written
        if record["room"] == room and record["participant"] == participant:
            packets.setdefault(record["ssrc"], {})[record["seq"]] = record
    frames = []
    for by_seq in packets.values():
        by_ts: dict[int, list[dict[str, Any]]] = {}
        for record in by_seq.values():
            by_ts.setdefault(record["ts"], []).append(record)
        for group in by_ts.values():
            group.sort(key=lambda r: r["seq"])  # no wrap-around within a short test
            seqs = [r["seq"] for r in group]
            if seqs != list(range(seqs[0], seqs[0] + len(seqs))) or not group[-1]["marker"]:
                continue
            parts = []
            try:
                for i, record in enumerate(group):
                    # behind a 12-byte RTP header without padding, as parse_vp8 expects
                    packet = bytes(12) + bytes.fromhex(record["payload"])
                    desc = parse_vp8(packet, 12)
                    if (i == 0) != desc.frame_start:
                        raise Vp8Error("not the packets of one whole frame")
                    parts.append(packet[12 + desc.size :])
            except Vp8Error:
                continue
            frames.append(b"".join(parts))
    return frames


def clear_length(frame: bytes) -> int:
    """The frame format's clear header: 10 bytes of a VP8 keyframe, 3 of a delta frame."""
    return 10 if frame[0] & 0x01 == 0 else 3


def open_frame(key: bytes, frame: bytes) -> bytes:
    """The plain VP8 frame inside an encrypted one (InvalidTag if it does not decrypt)."""
    assert frame[-1] == IV_LENGTH, f"trailer {frame[-1]}"
    clear = clear_length(frame)
    iv = frame[-1 - IV_LENGTH : -1]
    sealed = frame[clear : -1 - IV_LENGTH]
    return frame[:clear] + AESGCM(key).decrypt(iv, sealed, frame[:clear])


# --------------------------------------------------------------------------------------------


def test_encrypted_call_between_two_chromiums(call: Call, request: pytest.FixtureRequest) -> None:
    """Two Chromium pages with the same passphrase in an end-to-end encrypted room decode each
    other's video; what the relay receives and forwards is ciphertext beyond the clear VP8
    header bytes; a page with another passphrase decodes nothing and counts its failures."""
    e2ee_room(call)
    # one page through RTCRtpScriptTransform, the other through createEncodedStreams()
    call.open_page("chromium", "alice", token=False, devtools=True, passphrase=PASSPHRASE)
    call.open_page(
        "chromium", "bob", token=False, devtools=True, passphrase=PASSPHRASE, transform="streams"
    )
    alice = call.wait_joined("alice")
    bob = call.wait_joined("bob")
    assert alice["e2ee"]["api"] == "script-transform"
    assert bob["e2ee"]["api"] == "insertable-streams"
    wait_for_video(call, [("alice", "bob"), ("bob", "alice")])

    # The relay knows them as end-to-end encrypted participants, publishing VP8.
    room = call.api("GET", f"/v1/rooms/{call.room}").json()
    assert room["e2ee_required"] is True
    for p in room["participants"]:
        assert p["e2ee"] is True, p
        assert [t["codec"] for t in p["tracks"] if t["kind"] == "video"] == ["video/VP8"]
    # Every frame received decrypted: none dropped, video and audio (a second of Opus: 50).
    pairs = [("alice", "bob"), ("bob", "alice")]

    def decrypted() -> bool:
        return all(
            decryption(call, r, p, "video")["decrypted"] >= FRAMES
            and decryption(call, r, p, "audio")["decrypted"] >= 50
            for r, p in pairs
        )

    wait_until(
        decrypted,
        MEDIA_TIMEOUT,
        what=lambda: f"frames decrypted ({[call.report(r).get('e2ee') for r, _ in pairs]})",
    )
    for receiver, publisher in pairs:
        for kind in ("video", "audio"):
            assert decryption(call, receiver, publisher, kind)["failed"] == 0, (
                receiver,
                call.report(receiver).get("e2ee"),
            )

    # The decoded picture is the camera's: the remote tile shows what the sender's own tile
    # shows (the same fake camera pattern, in colour and in detail), not a grey or noisy mess.
    local = picture(call, "alice", ".tile.local video")
    remote = picture(call, "bob", '.tile[data-participant="alice"] video')
    assert local is not None and remote is not None, (local, remote)
    assert (remote["width"], remote["height"]) == (local["width"], local["height"])
    for channel in range(3):
        assert abs(remote["rgb"][channel] - local["rgb"][channel]) < 20, (local, remote)
    assert abs(remote["deviation"] - local["deviation"]) < 15, (local, remote)

    # What the relay saw of alice's video: encrypted frames with clear VP8 headers.
    capture = call.world.folder / "capture.jsonl"
    frames = captured_frames(capture, call.room, "alice")
    keyframes = [f for f in frames if f[0] & 0x01 == 0]
    assert len(frames) >= FRAMES and keyframes, (len(frames), len(keyframes))
    key = passphrase_key(PASSPHRASE, call.room)
    for frame in frames:
        plain = open_frame(key, frame)  # raises InvalidTag unless it is this key's ciphertext
        assert len(plain) == len(frame) - TAG_LENGTH - IV_LENGTH - 1
        # the decrypted frame is VP8: the frame tag's first partition fits in the frame
        tag = plain[0] | plain[1] << 8 | plain[2] << 16
        assert (tag >> 5) <= len(plain) - clear_length(plain), frame[:3].hex()
    for frame in keyframes:
        assert frame[3:6] == b"\x9d\x01\x2a", frame[:10].hex()  # start code, in the clear
        width = (frame[6] | frame[7] << 8) & 0x3FFF
        height = (frame[8] | frame[9] << 8) & 0x3FFF
        assert (width, height) == (local["width"], local["height"])
    # one ciphertext byte changed: the frame no longer decrypts (and a receiver drops it)
    sample = frames[len(frames) // 2]
    middle = clear_length(sample) + (len(sample) - clear_length(sample) - IV_LENGTH - 1) // 2
    flipped = sample[:middle] + bytes([sample[middle] ^ 0x01]) + sample[middle + 1 :]
    with pytest.raises(InvalidTag):
        open_frame(key, flipped)
    # a changed clear header fails too: it is the additional authenticated data
    header = bytes([sample[0] ^ 0x80]) + sample[1:]
    with pytest.raises(InvalidTag):
        open_frame(key, header)
    # and the key of another passphrase does not open it
    with pytest.raises(InvalidTag):
        open_frame(passphrase_key("another passphrase", call.room), sample)

    # A third page with another passphrase: it decodes nothing of the others, and counts.
    call.open_page(
        "chromium", "mallory", token=False, devtools=True, passphrase="another passphrase"
    )
    call.wait_joined("mallory")

    def failing() -> bool:
        return all(
            decryption(call, "mallory", p)["failed"] >= FRAMES
            and decryption(call, "mallory", p)["decrypted"] == 0
            and frames_decoded(call, "mallory", p) == 0
            for p in ("alice", "bob")
        )

    wait_until(
        failing,
        MEDIA_TIMEOUT,
        what=lambda: (
            "mallory's page to fail to decrypt the others "
            f"({call.report('mallory').get('e2ee')}, "
            f"{[frames_decoded(call, 'mallory', p) for p in ('alice', 'bob')]})"
        ),
    )
    # and says so on the tiles instead of showing a picture
    page = call.browsers["mallory"].cdp
    assert page is not None
    for publisher in ("alice", "bob"):
        tile = f'.tile[data-participant="{publisher}"] .placeholder'
        wait_until(
            lambda tile=tile: page.evaluate(
                f"(e => e && !e.hidden && e.textContent)(document.querySelector('{tile}'))"
            ),
            10,
            what=f"mallory's tile of {publisher} to say it cannot decrypt",
        )
        assert "cannot decrypt" in page.evaluate(f"document.querySelector('{tile}').textContent")
    # the others keep decoding each other, and drop mallory's frames
    wait_until(
        lambda: decryption(call, "alice", "mallory")["failed"] >= FRAMES,
        MEDIA_TIMEOUT,
        what=lambda: f"alice to drop mallory's frames ({call.report('alice').get('e2ee')})",
    )
    assert decryption(call, "alice", "mallory")["decrypted"] == 0
    assert frames_decoded(call, "alice", "mallory") == 0
    wait_for_video(call, [("alice", "bob"), ("bob", "alice")])

    # Timing: from the token (the page joins) to the first decoded frame of the other.
    timing = {}
    for receiver, publisher in (("alice", "bob"), ("bob", "alice")):
        report = call.report(receiver)
        first = (report.get("firstFrame") or {}).get(publisher)
        timing[f"{receiver}<-{publisher}"] = {
            "join_to_first_frame_ms": round(first - report["joinedAt"]) if first else None,
            "marks_ms": report.get("marks"),
        }
    checked = {"frames": len(frames), "keyframes": len(keyframes), "local": local, "remote": remote}
    for name, value in (("e2ee timing", timing), ("relay capture and pictures", checked)):
        request.node.user_properties.append((name, value))
        print(f"{name}: {json.dumps(value)}")


def test_page_without_passphrase_is_told_the_room_is_encrypted(call: Call) -> None:
    """A page without a passphrase does not take part in an end-to-end encrypted room: through
    the development token it learns so before it connects; with a token from a signaling
    server, when the relay refuses its media (403 e2ee_required), or, receive-only, from the
    next participant.joined event (it carries the room's e2ee_required). It says so."""
    e2ee_room(call)
    # receive-only, with a token without the e2ee claim: it joins, publishing nothing
    call.open_page("chromium", "listener", camera=False)
    assert call.wait_joined("listener")["mode"] == "recvonly"
    call.open_page("chromium", "plain", token=False)
    call.open_page("chromium", "signalled")  # a token without the e2ee claim, in its URL

    def told(label: str) -> dict[str, Any] | None:
        report = call.report(label)
        return report if report.get("state") == "error" else None

    for label in ("listener", "plain", "signalled"):
        report = wait_until(lambda label=label: told(label), 45, what=f"{label}'s page to stop")
        assert report["error"] == E2EE_NEEDED, report.get("error")
        assert report["e2eeRequired"] is True
        assert any(E2EE_NEEDED in n for n in report["notices"]), report["notices"]
        assert report["tiles"] == []
        # it left: the relay has neither participant anymore
        r = call.api("GET", f"/v1/rooms/{call.room}/participants/{label}")
        assert r.status_code == 404, r.text
