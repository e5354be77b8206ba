"""The recording service's control logic against a fake core: consent decides what is written,
events follow the rooms, the manifest survives a restart, retention and deletion erase."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from relay.api.events import EventBus
from relay.config import RecordingSettings, Settings
from relay.recording.service import MANIFEST, RecordingService
from relay.sfu import events
from relay.sfu.errors import Conflict, NotFound, participant_not_found, room_not_found


class FakeCore:
    """Rooms of participants with tracks; remembers which tracks it was told to write."""

    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, Any]] = {}
        self.writing: dict[tuple[str, str], str] = {}
        self.calls: list[tuple[str, str]] = []
        self.failure_handler: Any = None

    def add(self, room_id: str, pid: str, tracks: list[str], e2ee_required: bool = False) -> None:
        room = self.rooms.setdefault(
            room_id, {"room_id": room_id, "e2ee_required": e2ee_required, "participants": {}}
        )
        room["participants"][pid] = {
            "participant_id": pid,
            "tracks": [
                {"track_id": t, "kind": "audio" if t.startswith("a") else "video"} for t in tracks
            ],
        }

    async def get_room(self, room_id: str) -> dict[str, Any]:
        room = self.rooms.get(room_id)
        if room is None:
            raise room_not_found(room_id)
        return {**room, "participants": list(room["participants"].values())}

    async def get_participant(self, room_id: str, pid: str) -> dict[str, Any]:
        room = await self.get_room(room_id)
        for p in room["participants"]:
            if p["participant_id"] == pid:
                return p
        raise participant_not_found(room_id, pid)

    async def record_track(
        self, room_id: str, track_id: str, recording_id: str, path_base: str
    ) -> dict[str, Any]:
        self.calls.append(("record", track_id))
        self.writing[(recording_id, track_id)] = path_base
        Path(path_base + ".ogg").write_bytes(b"OggS")
        return {"path": path_base + ".ogg"}

    async def stop_track_recording(
        self, room_id: str, track_id: str, recording_id: str
    ) -> dict[str, Any] | None:
        self.calls.append(("stop", track_id))
        return {} if self.writing.pop((recording_id, track_id), None) else None

    def set_recording_failure_handler(self, handler: Any) -> None:
        self.failure_handler = handler


def make(tmp_path: Path, retention_days: int = 7, directory: str | None = None):
    settings = Settings(
        recording=RecordingSettings(
            directory=str(tmp_path / "rec") if directory is None else directory,
            retention_days=retention_days,
        )
    )
    core = FakeCore()
    bus = EventBus(settings)
    seen: list[dict[str, Any]] = []
    bus.add_observer(lambda e: seen.append(e.to_dict()))
    return RecordingService(settings, core, bus), core, bus, seen


def recording_events(seen: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for e in seen:
        if e["type"].startswith("recording."):
            extra = tuple(str(e[k]) for k in ("participant_id", "reason") if k in e)
            out.append((e["type"], *extra))
    return out


async def settle(service: RecordingService) -> None:
    """Let the service handle the events queued so far (manifests are written in a thread)."""
    await asyncio.sleep(0)
    for _ in range(500):
        if service._queue.empty() and not service._lock.locked():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the recording service did not settle within 5 s")


async def test_consent_decides_what_is_written(tmp_path: Path) -> None:
    service, core, bus, seen = make(tmp_path)
    core.add("r", "A", ["aA", "vA"])
    core.add("r", "B", ["aB"])
    await service.start()
    rec = await service.request("r")
    assert rec.state == "requested" and rec.recording_id.startswith("rec_")
    assert seen[-1]["participant_ids"] == ["A", "B"]

    await service.set_consent("r", "A", True)
    await service.set_consent("r", "B", False)
    assert set(core.writing) == {(rec.recording_id, "aA"), (rec.recording_id, "vA")}
    assert rec.state == "recording"

    # a new track of a consenting participant is written; of a refusing one, not
    core.add("r", "A", ["aA", "vA", "sA"])
    core.add("r", "B", ["aB", "vB"])
    bus.publish(
        events.TrackPublished(room_id="r", at=0, participant_id="A", track={"track_id": "sA"})
    )
    bus.publish(
        events.TrackPublished(room_id="r", at=0, participant_id="B", track={"track_id": "vB"})
    )
    await settle(service)
    assert {k[1] for k in core.writing} == {"aA", "vA", "sA"}

    # withdrawing stops the files before the call returns
    await service.set_consent("r", "A", False)
    assert core.writing == {}
    await service.set_consent("r", "A", True)  # a new interval, a new file
    assert {k[1] for k in core.writing} == {"aA", "vA", "sA"}
    names = sorted(f["file"] for f in rec.files if f["track_id"] == "aA")
    assert names == ["A-aA-1.ogg", "A-aA-2.ogg"]

    # a late joiner is asked, and not written until it says yes
    core.add("r", "D", ["aD"])
    bus.publish(events.ParticipantJoined(room_id="r", at=0, participant_id="D"))
    bus.publish(
        events.TrackPublished(room_id="r", at=0, participant_id="D", track={"track_id": "aD"})
    )
    await settle(service)
    assert all(k[1] != "aD" for k in core.writing)

    stopped = await service.stop(rec.recording_id)
    assert stopped.state == "stopped" and stopped.reason == "requested"
    assert core.writing == {}
    assert all(f["ended_at"] is not None for f in rec.files)
    assert recording_events(seen) == [
        ("recording.requested",),
        ("recording.started",),
        ("recording.participant_excluded", "B", "no_consent"),
        ("recording.participant_excluded", "A", "withdrawn"),
        ("recording.requested",),
        ("recording.stopped", "requested"),
    ]
    answers = [(c["participant_id"], c["consent"]) for c in rec.consent]
    assert answers == [("A", True), ("B", False), ("A", False), ("A", True)]
    await service.aclose()


async def test_tracks_end_with_unpublish_leave_and_room_close(tmp_path: Path) -> None:
    service, core, bus, seen = make(tmp_path)
    core.add("r", "A", ["aA", "vA"])
    await service.start()
    rec = await service.request("r")
    await service.set_consent("r", "A", True)
    bus.publish(events.TrackUnpublished(room_id="r", at=0, participant_id="A", track_id="vA"))
    await settle(service)
    assert {k[1] for k in core.writing} == {"aA"}
    bus.publish(events.ParticipantLeft(room_id="r", at=0, participant_id="A", reason="left"))
    await settle(service)
    assert core.writing == {}
    assert ("recording.participant_excluded", "A", "left") in recording_events(seen)
    bus.publish(events.RoomClosed(room_id="r", at=0))
    await settle(service)
    assert rec.state == "stopped" and rec.reason == "room_closed"
    await service.aclose()


async def test_refusals(tmp_path: Path) -> None:
    service, core, _bus, _seen = make(tmp_path)
    core.add("e", "A", [], e2ee_required=True)
    core.add("r", "A", [])
    await service.start()
    with pytest.raises(Conflict) as err:
        await service.request("e")
    assert err.value.code == "e2ee_room"
    with pytest.raises(NotFound):
        await service.request("nowhere")
    with pytest.raises(Conflict) as err:
        await service.set_consent("r", "A", True)
    assert err.value.code == "no_recording"
    await service.request("r")
    with pytest.raises(Conflict) as err:
        await service.request("r")
    assert err.value.code == "recording_active"
    # a participant that encrypts end to end cannot be recorded, even in a plain room
    core.rooms["r"]["participants"]["A"]["e2ee"] = True
    with pytest.raises(Conflict) as err:
        await service.set_consent("r", "A", True)
    assert err.value.code == "e2ee_participant"

    with pytest.raises(NotFound) as err:
        await service.set_consent("r", "nobody", True)
    assert err.value.code == "participant_not_found"
    with pytest.raises(NotFound) as err:
        service.get("rec_0000000000000000")
    assert err.value.code == "recording_not_found"
    await service.aclose()

    off, *_ = make(tmp_path, directory="")
    with pytest.raises(Conflict) as err:
        await off.request("r")
    assert err.value.code == "recording_disabled"


async def test_writer_failure_stops_the_recording(tmp_path: Path) -> None:
    service, core, _bus, seen = make(tmp_path)
    core.add("r", "A", ["aA"])
    await service.start()
    rec = await service.request("r")
    await service.set_consent("r", "A", True)
    core.failure_handler(
        {"recording_id": rec.recording_id, "track_id": "aA", "reason": "disk_full"}
    )
    await settle(service)
    for _ in range(500):
        if not rec.active and not service._lock.locked():
            break
        await asyncio.sleep(0.01)
    assert rec.state == "failed" and rec.reason == "disk_full"
    assert recording_events(seen)[-1] == ("recording.stopped", "disk_full")
    await service.aclose()


async def test_manifest_survives_a_restart_and_retention_sweeps(tmp_path: Path) -> None:
    service, core, _bus, _seen = make(tmp_path)
    core.add("r", "A", ["aA"])
    await service.start()
    rec = await service.request("r")
    await service.set_consent("r", "A", True)
    directory = tmp_path / "rec" / rec.recording_id
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["state"] == "recording" and manifest["files"][0]["ended_at"] is None
    # the relay dies: nothing stops the recording; a new service finds it, stopped
    service._closed = True
    for task in service._tasks:
        task.cancel()

    again, *_ = make(tmp_path)
    await again.start()
    found = again.get(rec.recording_id)
    assert found.state == "stopped" and found.reason == "room_closed"
    assert found.files[0]["ended_at"] is not None
    assert [c["participant_id"] for c in found.consent] == ["A"]
    await again.aclose()

    # stopped long ago: the next start sweeps it
    data = json.loads((directory / MANIFEST).read_text())
    data["stopped_at"] = time.time() - 8 * 86400
    (directory / MANIFEST).write_text(json.dumps(data))
    kept, *_ = make(tmp_path, retention_days=0)
    await kept.start()
    assert kept.get(rec.recording_id)  # 0: kept until deleted
    await kept.aclose()
    swept, *_ = make(tmp_path, retention_days=7)
    await swept.start()
    assert swept.list_recordings() == []
    assert not directory.exists()
    await swept.aclose()


async def test_delete_erases(tmp_path: Path) -> None:
    service, core, _bus, _seen = make(tmp_path)
    core.add("r", "A", ["aA"])
    await service.start()
    rec = await service.request("r")
    await service.set_consent("r", "A", True)
    directory = tmp_path / "rec" / rec.recording_id
    assert any(name.endswith(".ogg") for name in os.listdir(directory))
    await service.delete(rec.recording_id)
    assert not directory.exists()
    assert core.writing == {}
    with pytest.raises(NotFound):
        service.get(rec.recording_id)
    await service.aclose()
