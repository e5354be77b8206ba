"""Consent-gated recording through `relay serve`: aiortc participants publish a known colour and
tone; the test (never the relay) reads the files with PyAV and finds exactly the consenting
participants' media, for as long as they consented.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from tests.integration.clients import (
    CallClient,
    classify_colour,
    classify_tone,
    dominant_frequency,
    wait_for,
)
from tests.integration.conftest import (
    EventListener,
    RunningRelay,
    api_client,
    auth_headers,
    new_room,
    spawn_relay,
    stop_relay,
    wait_healthy,
    write_config,
)
from tests.integration.test_calls import _close

pytestmark = pytest.mark.integration

#: How far a file's media duration may be from the interval the relay says it wrote, on an
#: idle machine. The event-loop lag measured in the relay and in this test process (whose
#: aiortc clients produce the media) is added: media the relay has not yet processed when a
#: file starts or stops, or that a stalled sender produced late, shifts the file's content.
TOLERANCE = 0.5


class LagMeter:
    """The longest event-loop lag of this process while it runs (``async with``)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.max = 0.0
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> LagMeter:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.max = max(self.max, loop.time() - before - self.interval)


async def relay_lag(http: httpx.AsyncClient) -> float:
    """The longest event-loop lag of the relay's processes so far."""
    text = (await http.get("/metrics")).text
    values = [
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("relay_event_loop_lag_max_seconds")
    ]
    return max(values, default=0.0)


def recording_config(directory: Path, extra: str = "") -> str:
    # load shedding off: the machine may be busy with other tests, and no test here is
    # about overload
    return f'[overload]\nenabled = false\n[recording]\ndirectory = "{directory}"\n{extra}'


def start(tmp: Path, extra: str, media_ports: int = 1) -> RunningRelay:
    """``relay serve`` like conftest's start_relay, with more time to become healthy (the
    machine may be busy)."""
    tmp.mkdir(parents=True, exist_ok=True)
    config, api_port, media_port = write_config(tmp, extra, media_ports)
    spawned = spawn_relay(tmp, ["serve", "--config", str(config)])
    api = f"http://127.0.0.1:{api_port}"
    if not wait_healthy(spawned, api, timeout=60):
        spawned.stop()
        raise RuntimeError(f"relay did not start: {spawned.stderr()[-3000:]}")
    return RunningRelay(api, media_port, "testkey", spawned.process, spawned.stderr_path)


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recordings")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, rec_dir: Path) -> Iterator[RunningRelay]:
    running = start(tmp_path_factory.mktemp("relay"), extra=recording_config(rec_dir))
    yield running
    stop_relay(running)


# --------------------------------------------------------------------------------------------
# Reading the files (PyAV, in the test process only)


def media_span(path: Path) -> float:
    """Seconds from the first packet's start to the last packet's end."""
    with av.open(str(path)) as container:
        stream = container.streams[0]
        first = last = None
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            end = packet.pts + (packet.duration or 0)
            first = packet.pts if first is None else min(first, packet.pts)
            last = end if last is None else max(last, end)
        assert first is not None and last is not None, f"{path.name}: no packets"
        return float((last - first) * stream.time_base)


def colours(path: Path, frames: int = 30) -> dict[str, int]:
    """The identities of the first ``frames`` decoded video frames."""
    seen: dict[str, int] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            name = classify_colour(frame)
            seen[name] = seen.get(name, 0) + 1
            if i + 1 >= frames:
                break
    return seen


def tone(path: Path) -> str | None:
    """The identity whose tone the file's audio carries."""
    chunks = []
    rate = 48000
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            rate = frame.sample_rate
            array = frame.to_ndarray()
            planar = frame.format.is_planar
            chunks.append(
                array[0] if planar else array.reshape(-1, len(frame.layout.channels))[:, 0]
            )
    samples = np.concatenate(chunks).astype(np.float64)
    assert len(samples) > rate // 2, f"{path.name}: {len(samples)} samples"
    middle = samples[len(samples) // 4 : len(samples) // 4 + rate // 2]
    return classify_tone(dominant_frequency(middle, rate))


# --------------------------------------------------------------------------------------------
# Helpers


async def start_publishers(relay: RunningRelay, room: str, names: list[str]) -> list[CallClient]:
    clients = [CallClient(relay.api, relay.key, room, name) for name in names]
    for c in clients:
        await c.join()
    for c in clients:
        await c.publish()
    return clients


async def media_flowing(http: httpx.AsyncClient, room: str, names: list[str]) -> bool:
    """Every participant named publishes audio and video that reach the relay."""
    for name in names:
        r = await http.get(f"/v1/rooms/{room}/participants/{name}/stats")
        if r.status_code != 200:
            return False
        inbound = r.json()["inbound"]
        if {s["kind"] for s in inbound if s["packets"] > 20} != {"audio", "video"}:
            return False
    return True


async def wait_flowing(http: httpx.AsyncClient, room: str, names: list[str]) -> None:
    deadline = time.monotonic() + 30
    while not await media_flowing(http, room, names):
        assert time.monotonic() < deadline, f"media of {names} did not reach the relay"
        await asyncio.sleep(0.2)


async def consent(http: httpx.AsyncClient, room: str, pid: str, value: bool) -> float:
    """Answer for ``pid``; the monotonic time the answer was acknowledged."""
    r = await http.put(f"/v1/rooms/{room}/participants/{pid}/consent", json={"recording": value})
    assert r.status_code == 204, r.text
    return time.monotonic()


def files_of(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in directory.iterdir() if p.name != "manifest.json"}


async def wait_finalized(directory: Path, timeout: float = 5.0) -> None:
    """Until no file of the recording changes size for a moment (the writer thread is done)."""
    deadline = time.monotonic() + timeout
    before: dict[str, int] = {}
    while time.monotonic() < deadline:
        now = {p.name: p.stat().st_size for p in directory.iterdir()}
        if now == before:
            return
        before = now
        await asyncio.sleep(0.3)


def recording_events(listener: EventListener) -> list[dict[str, Any]]:
    return [e for e in listener.events if e["type"].startswith("recording.")]


# --------------------------------------------------------------------------------------------
# Tests


async def test_only_consenting_participants_are_recorded(
    relay: RunningRelay, rec_dir: Path
) -> None:
    """A consents, B refuses, C consents and withdraws after ~2 s; D joins later without
    consenting. Exactly A's and C's tracks are in the files, each as long as its consent."""
    room = new_room(relay, "rec")
    a, b, c, d = "red", "green", "blue", "yellow"
    clients: list[CallClient] = []
    async with (
        api_client(relay) as http,
        EventListener(relay, room) as listener,
        LagMeter() as own_lag,
    ):
        try:
            clients = await start_publishers(relay, room, [a, b, c])
            await wait_flowing(http, room, [a, b, c])

            r = await http.post(f"/v1/rooms/{room}/recordings")
            assert r.status_code == 201, r.text
            recording_id = r.json()["recording_id"]
            assert r.json()["state"] == "requested"
            requested = await listener.wait_for("recording.requested", 5)
            assert requested is not None and set(requested["participant_ids"]) == {a, b, c}

            t_a = await consent(http, room, a, True)
            await consent(http, room, b, False)
            t_c = await consent(http, room, c, True)
            await asyncio.sleep(2.0)
            t_c_end = await consent(http, room, c, False)

            # a late joiner is asked, publishes, and is not recorded without consent
            late = await start_publishers(relay, room, [d])
            clients += late
            await wait_flowing(http, room, [d])
            await asyncio.sleep(max(0.0, t_a + 4.0 - time.monotonic()))

            r = await http.post(f"/v1/recordings/{recording_id}/stop")
            t_stop = time.monotonic()
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "stopped" and r.json()["reason"] == "requested"
            assert await listener.wait_for("recording.stopped", 5) is not None
            # the call goes on after the recording
            assert await media_flowing(http, room, [a, b, c, d])
            tolerance = TOLERANCE + own_lag.max + await relay_lag(http)
        finally:
            await _close(clients)

        info = (await http.get(f"/v1/recordings/{recording_id}")).json()
        timeline = [(e["participant_id"], e["consent"]) for e in info["consent"]]
        assert timeline == [(a, True), (b, False), (c, True), (c, False)], info
        events = recording_events(listener)
        summary = [
            (
                e["type"],
                e.get("participant_id"),
                e.get("reason"),
                tuple(e.get("participant_ids", ())),
            )
            for e in events
        ]
        assert summary == [
            ("recording.requested", None, None, tuple(requested["participant_ids"])),
            ("recording.started", None, None, ()),
            ("recording.participant_excluded", b, "no_consent", ()),
            ("recording.participant_excluded", c, "withdrawn", ()),
            ("recording.requested", None, None, (d,)),
            ("recording.stopped", None, "requested", ()),
        ], summary
        assert all(e["recording_id"] == recording_id for e in events)
        assert [e["at"] for e in events] == sorted(e["at"] for e in events)

    directory = rec_dir / recording_id
    await wait_finalized(directory)
    on_disk = files_of(directory)
    listed = {f["file"]: f for f in info["files"]}
    assert set(on_disk) == set(listed), (sorted(on_disk), sorted(listed))
    owners = {f["participant_id"] for f in info["files"]}
    assert owners == {a, c}, info["files"]
    assert not any(name.startswith((f"{b}-", f"{d}-")) for name in on_disk)
    kinds = sorted((f["participant_id"], f["kind"]) for f in info["files"])
    assert kinds == sorted([(a, "audio"), (a, "video"), (c, "audio"), (c, "video")]), kinds

    spans = {}
    for name, entry in listed.items():
        path = on_disk[name]
        wrote = entry["ended_at"] - entry["started_at"]
        span = media_span(path)
        spans[name] = (round(span, 2), round(wrote, 2))
        assert abs(span - wrote) < tolerance, (name, span, wrote, tolerance)
        who = entry["participant_id"]
        # the test's own clock agrees with the relay's intervals
        expected = (t_stop - t_a) if who == a else (t_c_end - t_c)
        assert abs(span - expected) < tolerance, (name, span, expected, tolerance)
        if entry["kind"] == "video":
            seen = colours(path)
            assert max(seen, key=lambda k: seen[k]) == who and seen.get(who, 0) >= 10, seen
        else:
            assert tone(path) == who, name
    print("recording timeline:", json.dumps({"consent": info["consent"], "files": info["files"]}))
    print("file spans (media, relay interval):", spans, "tolerance", round(tolerance, 2))


async def test_e2ee_room_is_not_recorded(relay: RunningRelay) -> None:
    async with api_client(relay) as http:
        r = await http.post("/v1/rooms", json={"room_id": "rec-e2ee", "e2ee_required": True})
        assert r.status_code == 201, r.text
        r = await http.post("/v1/rooms/rec-e2ee/recordings")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "e2ee_room"
        r = await http.post("/v1/rooms/no-such-room/recordings")
        assert r.status_code == 404
        r = await http.get("/v1/recordings/rec_0123456789abcdef")
        assert r.status_code == 404 and r.json()["error"]["code"] == "recording_not_found"
        spec = (await http.get("/openapi.json")).json()
        for path in (
            "/v1/rooms/{room_id}/recordings",
            "/v1/recordings",
            "/v1/recordings/{recording_id}",
            "/v1/recordings/{recording_id}/stop",
            "/v1/rooms/{room_id}/participants/{participant_id}/consent",
        ):
            assert path in spec["paths"], path


async def test_delete_erases_the_files(relay: RunningRelay, rec_dir: Path) -> None:
    room = new_room(relay, "recdel")
    clients: list[CallClient] = []
    async with api_client(relay) as http:
        try:
            clients = await start_publishers(relay, room, ["red"])
            await wait_flowing(http, room, ["red"])
            r = await http.post(f"/v1/rooms/{room}/recordings")
            recording_id = r.json()["recording_id"]
            await consent(http, room, "red", True)
            directory = rec_dir / recording_id
            assert await wait_for(lambda: len(files_of(directory)) == 2, 5), list(
                directory.iterdir()
            )
            # a participant token answers for its own participant, and only for it
            r = await http.post("/demo/token", json={"room_id": room, "participant_id": "tok"})
            assert r.status_code == 201, r.text
            token = {"Authorization": f"Bearer {r.json()['token']}"}
            own = f"/v1/rooms/{room}/participants/tok/consent"
            other = f"/v1/rooms/{room}/participants/red/consent"
            r = await http.put(own, json={"recording": False}, headers=token)
            assert r.status_code == 204, r.text
            r = await http.put(other, json={"recording": False}, headers=token)
            assert r.status_code == 403, r.text
            r = await http.get(f"/v1/recordings/{recording_id}", headers=token)
            assert r.status_code == 403, r.text
            assert ("tok", False) in [
                (e["participant_id"], e["consent"])
                for e in (await http.get(f"/v1/recordings/{recording_id}")).json()["consent"]
            ]

            r = await http.delete(f"/v1/recordings/{recording_id}")
            assert r.status_code == 204, r.text
            assert not directory.exists()
            r = await http.get(f"/v1/recordings/{recording_id}")
            assert r.status_code == 404
            await asyncio.sleep(2.0)
            assert not directory.exists()  # nothing left behind after the delete
            assert await media_flowing(http, room, ["red"])
        finally:
            await _close(clients)


async def test_recording_disabled(tmp_path: Path) -> None:
    running = start(tmp_path, extra="")
    try:
        async with api_client(running) as http:
            await http.post("/v1/rooms", json={"room_id": "off"})
            r = await http.post("/v1/rooms/off/recordings")
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "recording_disabled"
    finally:
        stop_relay(running)


async def test_full_disk_stops_the_recording_not_the_call(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    running = start(
        tmp_path, extra=recording_config(directory, "min_free_bytes = 1000000000000000000\n")
    )
    room = "full"
    clients: list[CallClient] = []
    try:
        async with api_client(running) as http, EventListener(running, room) as listener:
            await http.post("/v1/rooms", json={"room_id": room})
            clients = [CallClient(running.api, running.key, room, n) for n in ("red", "green")]
            for client in clients:
                await client.join()
            for client in clients:
                await client.subscribe()
                await client.publish()
            red, green = clients
            assert await wait_for(lambda: green.received.frames.get("red", 0) >= 10, 30)
            r = await http.post(f"/v1/rooms/{room}/recordings")
            recording_id = r.json()["recording_id"]
            await consent(http, room, "red", True)
            stopped = await listener.wait_for("recording.stopped", 10)
            assert stopped is not None and stopped["reason"] == "disk_full", listener.events
            info = (await http.get(f"/v1/recordings/{recording_id}")).json()
            assert info["state"] == "failed" and info["reason"] == "disk_full"
            # the call keeps flowing: the subscriber still decodes the publisher
            before = green.received.frames.get("red", 0)
            assert await wait_for(lambda: green.received.frames.get("red", 0) >= before + 15, 10)
            assert red.received.frames.get("green", 0) > 0
    finally:
        await _close(clients)
        stop_relay(running)


async def test_manifests_survive_a_restart_and_retention_sweeps(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    config = recording_config(directory, "retention_days = 7\n")
    running = start(tmp_path / "one", extra=config)
    ids = []
    try:
        for room in ("old", "recent"):
            r = httpx.post(
                f"{running.api}/v1/rooms", json={"room_id": room}, headers=auth_headers(running.key)
            )
            assert r.status_code == 201
            r = httpx.post(
                f"{running.api}/v1/rooms/{room}/recordings", headers=auth_headers(running.key)
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["recording_id"])
        r = httpx.post(
            f"{running.api}/v1/recordings/{ids[0]}/stop", headers=auth_headers(running.key)
        )
        assert r.json()["state"] == "stopped"
    finally:
        stop_relay(running)
    old, recent = ids
    manifest = directory / old / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["state"] == "stopped"
    data["stopped_at"] = time.time() - 8 * 86400
    manifest.write_text(json.dumps(data))
    # the recording still running when the relay stopped was stopped with its room
    assert json.loads((directory / recent / "manifest.json").read_text())["state"] == "stopped"

    again = start(tmp_path / "two", extra=config)
    try:
        headers = auth_headers(again.key)
        assert httpx.get(f"{again.api}/v1/recordings/{old}", headers=headers).status_code == 404
        assert not (directory / old).exists()
        r = httpx.get(f"{again.api}/v1/recordings/{recent}", headers=headers)
        assert r.status_code == 200 and r.json()["reason"] == "room_closed", r.text
        listed = httpx.get(f"{again.api}/v1/recordings", headers=headers).json()["recordings"]
        assert [x["recording_id"] for x in listed] == [recent]
        assert (
            httpx.delete(f"{again.api}/v1/recordings/{recent}", headers=headers).status_code == 204
        )
        assert not (directory / recent).exists()
    finally:
        stop_relay(again)


async def test_recording_with_workers(tmp_path: Path) -> None:
    """Two worker processes: each participant's tracks are written by the worker it is on."""
    directory = tmp_path / "rec"
    running = start(
        tmp_path,
        extra=recording_config(directory) + '[workers]\ncount = 2\nplacement = "spread"\n',
        media_ports=2,
    )
    room = "workers"
    clients: list[CallClient] = []
    try:
        async with api_client(running) as http, LagMeter() as own_lag:
            await http.post("/v1/rooms", json={"room_id": room})
            clients = await start_publishers(running, room, ["red", "green"])
            await wait_flowing(http, room, ["red", "green"])
            workers = {
                (await http.get(f"/v1/rooms/{room}/participants/{n}")).json()["worker"]
                for n in ("red", "green")
            }
            assert workers == {0, 1}
            recording_id = (await http.post(f"/v1/rooms/{room}/recordings")).json()["recording_id"]
            await consent(http, room, "red", True)
            await consent(http, room, "green", True)
            await asyncio.sleep(2.0)
            await http.post(f"/v1/recordings/{recording_id}/stop")
            info = (await http.get(f"/v1/recordings/{recording_id}")).json()
            tolerance = TOLERANCE + own_lag.max + await relay_lag(http)
        await wait_finalized(directory / recording_id)
        assert len(info["files"]) == 4, info
        for entry in info["files"]:
            path = directory / recording_id / entry["file"]
            wrote = entry["ended_at"] - entry["started_at"]
            assert abs(media_span(path) - wrote) < tolerance, (entry, tolerance)
            if entry["kind"] == "video":
                seen = colours(path)
                assert max(seen, key=lambda k: seen[k]) == entry["participant_id"], seen
    finally:
        await _close(clients)
        stop_relay(running)
