"""The relay cannot look at what it forwards: no audio or video decoder is loaded in any relay
process, in one process or with media workers, while it carries real calls.

"A decoder" here is anything that can turn RTP payloads back into sound or pictures:

- Python modules: PyAV (``av``, FFmpeg's codecs), aiortc (its ``codecs`` package decodes VP8,
  H.264, Opus and G.711/G.722 through PyAV and the standard library), OpenCV (``cv2``), Pillow
  (``PIL``: still-image decoders, which is what a keyframe becomes), imageio and its FFmpeg
  plugin, moviepy, ffmpeg-python, decord, torchvision and torchaudio (both read video/audio
  files), soundfile, audioread, pydub, librosa, opuslib, PyOgg, python-vlc, PyGObject (``gi``,
  the GStreamer bindings) and the standard library's ``audioop`` (it decodes G.711 mu-law and
  A-law, the PCMU/PCMA codecs of WebRTC).
- Native libraries in the process's memory map: FFmpeg's ``libavcodec``/``libavformat``/
  ``libswscale``/``libswresample``, ``libvpx``, ``libopus``, ``libx264``, ``libx265``,
  ``libdav1d``, ``libaom``, ``libopenh264``, ``libSvtAv1``, ``libvorbis``, ``libtheora``,
  ``libspeex``, ``libgsm``, ``libwebp``, and the extension modules of PyAV, OpenCV and Pillow.

Allowed, and why: ``aioice`` (the relay parses STUN with its STUN module: connectivity checks,
no media), ``numpy`` (arithmetic on arrays; it has no codec), ``cryptography``/``OpenSSL``/
``pylibsrtp`` (DTLS and SRTP: they remove the transport encryption, which an SFU must do to
route packets, and decode nothing), and the relay's own ``relay.rtc.vp8``/``vp9``/
``dependency_descriptor`` (they read the few payload-descriptor bytes in front of each
frame that say where a frame or layer starts; the coded picture stays opaque).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.clients import CallClient, wait_for
from tests.integration.conftest import (
    auth_headers,
    free_port,
    free_ports,
    spawn_relay,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

#: top-level Python modules that can decode audio or video (see the module's description)
DECODER_MODULES = frozenset(
    {
        "av",
        "aiortc",
        "cv2",
        "PIL",
        "imageio",
        "imageio_ffmpeg",
        "moviepy",
        "ffmpeg",
        "decord",
        "torchvision",
        "torchaudio",
        "soundfile",
        "audioread",
        "pydub",
        "librosa",
        "opuslib",
        "pyogg",
        "vlc",
        "gi",
        "audioop",
    }
)
#: shared objects that decode audio or video, by a part of their file name
DECODER_LIBRARIES = re.compile(
    r"libavcodec|libavformat|libswscale|libswresample|libvpx|libopus|libx264|libx265|libdav1d"
    r"|libaom|libopenh264|libSvtAv1|libvorbis|libtheora|libspeex|libgsm|libwebp"
    r"|/av/[^/]*\.so|/av\.libs/|/cv2/|/PIL/|/aiortc/"
)

#: run in a fresh interpreter: import every relay module, start the server machinery, carry
#: RTP through it, then list what is loaded
PROBE = r"""
import asyncio, importlib, json, pkgutil, socket, sys

import relay

imported = []
for info in pkgutil.walk_packages(relay.__path__, "relay."):
    if info.name != "relay.__main__":
        importlib.import_module(info.name)
        imported.append(info.name)

import httpx
from relay.client.peer import ClientPeer, TrackSpec, UdpClientPeer, negotiate_publisher
from relay.config import load_settings
from relay.server import Relay

API_PORT, MEDIA_PORT = int(sys.argv[1]), int(sys.argv[2])


async def main():
    settings = load_settings(None, {
        "RELAY_API__HOST": "127.0.0.1", "RELAY_API__PORT": str(API_PORT),
        "RELAY_API__KEYS": "probekey",
        "RELAY_WORKERS__COUNT": "1", "RELAY_OVERLOAD__ENABLED": "false",
        "RELAY_MEDIA__HOST": "127.0.0.1", "RELAY_MEDIA__PORT": str(MEDIA_PORT),
    })
    server = Relay(settings)
    await server.start()
    sent = 0
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{API_PORT}",
            headers={"Authorization": "Bearer probekey"}, timeout=10,
        ) as http:
            (await http.post("/v1/rooms", json={"room_id": "probe"})).raise_for_status()
            (await http.post("/v1/rooms/probe/participants",
                             json={"participant_id": "p"})).raise_for_status()
            tracks = [TrackSpec("audio", 1111), TrackSpec("video", 2222)]
            peer = ClientPeer()
            remote = await negotiate_publisher(http, "probe", "p", peer, tracks)
            async with UdpClientPeer.connect(peer, remote.address) as udp:
                await udp.connected(timeout=10)
                keyframe = b"\x10\x00\x9d\x01\x2a" + bytes(range(100))
                for seq in range(1, 101):
                    udp.send_rtp(1111, 111, seq, seq * 960, bytes(80))
                    udp.send_rtp(2222, 96, seq, seq * 3000, keyframe, marker=True)
                    sent += 2
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.3)
                stats = (await http.get("/v1/rooms/probe/participants/p/stats")).json()
    finally:
        await server.stop()
    received = sum(t["packets"] for t in stats["inbound"])
    print(json.dumps({"modules": sorted(sys.modules), "imported": imported,
                      "sent": sent, "received": received}))


asyncio.run(main())
"""


def _maps_findings(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted(
        {line.split()[-1] for line in maps.splitlines() if DECODER_LIBRARIES.search(line)}
    )


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(x) for x in text)
    return found


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_probe_sees_decoders() -> None:
    """The check itself works: an interpreter that loaded PyAV shows up in both lists."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import av, codecs, sys, json;print(json.dumps(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "av" in set(json.loads(out.stdout)) & DECODER_MODULES
    probe = subprocess.Popen(
        [sys.executable, "-c", "import av, sys, time; print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
        assert any("libavcodec" in f for f in _maps_findings(probe.pid))
    finally:
        probe.kill()
        probe.wait()


def test_no_decoder_module_in_the_server_process() -> None:
    """Every relay module imported and the server started, with RTP carried through it: no
    decoder module is loaded."""
    api_port = free_port(socket.SOCK_STREAM)
    media_port = free_ports(socket.SOCK_DGRAM, 1)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(api_port), str(media_port)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "relay.server" in result["imported"] and "relay.sfu.sfu" in result["imported"]
    assert result["received"] > 0, result  # media really went through the packet path
    loaded = {name.split(".")[0] for name in result["modules"]}
    assert not loaded & DECODER_MODULES, sorted(loaded & DECODER_MODULES)
    assert "aioice" in loaded  # the STUN codec is there, and allowed


async def _call(api: str, room: str) -> None:
    """A short two-party aiortc call: real Opus and VP8 through the relay."""
    headers = auth_headers("testkey")
    async with httpx.AsyncClient(base_url=api, headers=headers) as http:
        (await http.post("/v1/rooms", json={"room_id": room})).raise_for_status()
    clients = [CallClient(api, "testkey", room, name) for name in ("red", "green")]
    try:
        for c in clients:
            await c.join()
        for c in clients:
            await c.subscribe()
            await c.publish()
        assert await wait_for(
            lambda: (
                clients[0].received.frames.get("green", 0) >= 10
                and clients[1].received.frames.get("red", 0) >= 10
            ),
            45,
        ), [c.received for c in clients]
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest.mark.parametrize("workers", [1, 2])
async def test_no_decoder_library_in_any_relay_process(tmp_path: Path, workers: int) -> None:
    """``relay serve`` (one process, and ``--workers 2``) carrying a call: no decoder library
    in the memory map of the front or of any worker, and no other child process."""
    # load shedding off: a busy test machine must not turn the call away
    extra = "[overload]\nenabled = false\n"
    config, api_port, _media = write_config(tmp_path, extra, media_ports=workers)
    args = ["serve", "--config", str(config), "--workers", str(workers)]
    spawned = spawn_relay(tmp_path, args)
    api = f"http://127.0.0.1:{api_port}"
    try:
        # a generous start-up time: other tests may keep the machine's cores busy
        assert wait_healthy(spawned, api, timeout=60), spawned.stderr()[-3000:]
        pids = [spawned.process.pid]
        if workers > 1:
            deadline = time.monotonic() + 20
            listed: list[dict] = []
            while time.monotonic() < deadline:
                r = httpx.get(f"{api}/v1/workers", headers=auth_headers("testkey"))
                listed = r.json()["workers"]
                if len(listed) == workers and all(w["state"] == "ready" for w in listed):
                    break
                await asyncio.sleep(0.1)
            assert len(listed) == workers, listed
            pids += [w["pid"] for w in listed]
        await _call(api, "blind")
        findings = {pid: _maps_findings(pid) for pid in pids}
        assert not any(findings.values()), findings
        # the front's only children are its media workers (no decoding helper process)
        children = _children(spawned.process.pid)
        assert children == set(pids[1:]), {c: _cmdline(c) for c in children}
    finally:
        spawned.stop()
