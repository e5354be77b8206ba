"""Consent-gated recording, control side: recordings, consent, and what is written when.

:class:`RecordingService` lives in the control-plane process (the single process, or the front
process of a relay with workers). It keeps every recording by id (``rec_`` and random hex),
its state (``requested`` -> ``recording`` -> ``stopped`` or ``failed``) and its timeline: each
participant's consent answers (``{participant_id, consent, at}``) and the intervals each of its
tracks was written (``{participant_id, track_id, kind, file, started_at, ended_at}``).

It follows the rooms by observing the event bus (:meth:`EventBus.add_observer`): a track
published by a participant who consented is written from then on; a track unpublished, a
participant leaving or the room closing stop what they end. Only participants who said yes are
written; a refusal or a withdrawal stops that participant's files before the consent call
answers. The process holding a track's publisher writes it (:meth:`ControlCore.record_track`,
relay/sfu/recording.py); the service only says which track goes to which file.

Files go to ``<recording.directory>/<recording_id>/``, named by opaque ids only
(``<participant_id>-<track_id>-<n>.<ext>``, a new file for each consent interval), with a
``manifest.json`` (written atomically) holding the state and timeline, read back at start so
that listing, deleting and retention work across restarts. Recordings stopped more than
``recording.retention_days`` ago are deleted by a periodic sweep (0 keeps them until deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.config import Settings
from relay.sfu import events
from relay.sfu.errors import Conflict, NotFound, SfuError

__all__ = [
    "MANIFEST",
    "RECORDING_ID_PATTERN",
    "Recording",
    "RecordingService",
    "RecordingUnavailable",
    "recording_not_found",
]

log = logging.getLogger(__name__)

#: The manifest of a recording, in its directory.
MANIFEST = "manifest.json"
#: Recording ids: ``rec_`` and 16 hex digits.
RECORDING_ID_PATTERN = r"^rec_[0-9a-f]{16}$"
_RECORDING_ID = re.compile(RECORDING_ID_PATTERN)
#: Seconds between two retention sweeps.
SWEEP_INTERVAL = 3600.0
#: Seconds after a delete at which the recording's directory is erased again, in case a writer
#: thread was still finishing one of its files (see RecordingWriter: closing is asynchronous).
ERASE_AGAIN = (0.25, 0.5, 1.0, 2.0, 4.0)
#: Reasons a recording stops, and the state each leaves it in.
STOP_STATES = {
    "requested": "stopped",
    "room_closed": "stopped",
    "disk_full": "failed",
    "io_error": "failed",
}


def _time(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and value > 0 else default


class RecordingUnavailable(SfuError):
    """The recording directory cannot be written."""

    status = 503
    code = "recording_unavailable"


def recording_not_found(recording_id: str) -> NotFound:
    return NotFound(f"recording {recording_id} not found", code="recording_not_found")


@dataclass
class Recording:
    """One recording: its state and timeline (the manifest), and what is being written now."""

    recording_id: str
    room_id: str
    requested_at: float
    state: str = "requested"
    #: why it stopped (see :data:`STOP_STATES`), None while it runs
    reason: str | None = None
    started_at: float | None = None
    stopped_at: float | None = None
    #: consent answers in order: {participant_id, consent, at}
    consent: list[dict[str, Any]] = field(default_factory=list)
    #: written intervals in order: {participant_id, track_id, kind, file, started_at, ended_at}
    files: list[dict[str, Any]] = field(default_factory=list)
    # -- while it runs (not in the manifest) --
    #: each participant's current answer (absent: not answered, or left)
    answers: dict[str, bool] = field(default_factory=dict)
    #: track id -> its open interval (an entry of ``files``)
    open: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ("requested", "recording")

    def manifest(self) -> dict[str, Any]:
        return {
            "recording_id": self.recording_id,
            "room_id": self.room_id,
            "state": self.state,
            "reason": self.reason,
            "requested_at": self.requested_at,
            "started_at": self.started_at,
            "stopped_at": self.stopped_at,
            "consent": [dict(c) for c in self.consent],
            "files": [dict(f) for f in self.files],
        }

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> Recording:
        return cls(
            recording_id=str(data["recording_id"]),
            room_id=str(data["room_id"]),
            requested_at=float(data["requested_at"]),
            state=str(data.get("state") or "stopped"),
            reason=data.get("reason"),
            started_at=data.get("started_at"),
            stopped_at=data.get("stopped_at"),
            consent=list(data.get("consent") or []),
            files=list(data.get("files") or []),
        )


class RecordingService:
    """Recordings of the relay; see the module docstring. ``core`` is the control API's
    :class:`relay.api.core.ControlCore` (it needs ``get_room``, ``get_participant``,
    ``record_track``, ``stop_track_recording``), ``bus`` the relay's event bus."""

    def __init__(
        self,
        settings: Settings,
        core: Any,
        bus: Any,
        *,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.directory = settings.recording.directory
        self.retention_days = settings.recording.retention_days
        self.core = core
        self.bus = bus
        self.wallclock = wallclock
        self.recordings: dict[str, Recording] = {}
        #: room id -> its running recording
        self._active: dict[str, Recording] = {}
        self._lock = asyncio.Lock()
        self._queue: asyncio.Queue[events.Event] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = False
        self._closed = False
        bus.add_observer(self._observe)
        set_handler = getattr(core, "set_recording_failure_handler", None)
        if set_handler is not None:
            set_handler(self._writer_failed)

    @property
    def enabled(self) -> bool:
        return bool(self.directory)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Read the manifests, sweep, and start following events (idempotent)."""
        if self._started or self._closed:
            return
        self._started = True
        if self.enabled:
            try:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                log.error("recording.directory %s cannot be created: %s", self.directory, exc)
            self._load()
            self.sweep()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._follow(), name="recording-events"))
        if self.enabled and self.retention_days > 0:
            self._tasks.append(loop.create_task(self._sweep_periodically(), name="recording-sweep"))

    async def aclose(self) -> None:
        """Handle the events still queued, stop every running recording (``room_closed``:
        the relay shuts down and its rooms with it), write the manifests (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        async with self._lock:
            while not self._queue.empty():
                await self._handle_safely(self._queue.get_nowait())
            for rec in list(self._active.values()):
                await self._stop(rec, "room_closed")
        self.bus.remove_observer(self._observe)

    # -- the API's operations -------------------------------------------------------------
    async def request(self, room_id: str) -> Recording:
        """Ask for a recording of a room: every participant is asked for consent."""
        if not self.enabled:
            raise Conflict(
                "recording is off on this relay (recording.directory is empty)",
                code="recording_disabled",
            )
        room = await self.core.get_room(room_id)
        if room.get("e2ee_required"):
            raise Conflict(
                f"room {room_id} is end-to-end encrypted: the relay cannot record it",
                code="e2ee_room",
            )
        async with self._lock:
            running = self._active.get(room_id)
            if running is not None:
                raise Conflict(
                    f"room {room_id} is already being recorded ({running.recording_id})",
                    code="recording_active",
                )
            recording_id = "rec_" + secrets.token_hex(8)
            try:
                os.makedirs(self._path(recording_id), mode=0o700)
            except OSError as exc:
                raise RecordingUnavailable(
                    f"the recording directory cannot be written: {exc.strerror}"
                ) from None
            rec = Recording(recording_id, room_id, self.wallclock())
            self.recordings[recording_id] = rec
            self._active[room_id] = rec
            await self._save(rec)
            asked = [str(p["participant_id"]) for p in room.get("participants", [])]
            self._emit(rec, events.RecordingRequested, participant_ids=asked)
            log.info("recording %s of room %s requested", recording_id, room_id)
            return rec

    async def set_consent(self, room_id: str, participant_id: str, consent: bool) -> None:
        """A participant's answer for the room's running recording. Yes: its tracks are
        written from now on; no: nothing of it is written from now on (files closed before
        this returns)."""
        rec = self._active.get(room_id)
        if rec is None:
            await self.core.get_room(room_id)  # 404 for a room that does not exist
            raise Conflict(f"room {room_id} is not being recorded", code="no_recording")
        async with self._lock:
            participant = await self.core.get_participant(room_id, participant_id)
            if self._active.get(room_id) is not rec:
                raise Conflict(f"room {room_id} is not being recorded", code="no_recording")
            if consent and participant.get("e2ee"):
                raise Conflict(
                    f"participant {participant_id} encrypts its media end to end: the relay "
                    "cannot record it",
                    code="e2ee_participant",
                )
            now = self.wallclock()
            previous = rec.answers.get(participant_id)
            rec.answers[participant_id] = consent
            rec.consent.append({"participant_id": participant_id, "consent": consent, "at": now})
            if consent:
                for track in participant.get("tracks", []):
                    await self._start_track(rec, participant_id, track)
            else:
                await self._stop_participant(rec, participant_id)
                if previous is not False:
                    self._emit(
                        rec,
                        events.RecordingParticipantExcluded,
                        participant_id=participant_id,
                        reason="withdrawn" if previous else "no_consent",
                    )
            await self._save(rec)

    async def stop(self, recording_id: str, reason: str = "requested") -> Recording:
        async with self._lock:
            rec = self.get(recording_id)
            await self._stop(rec, reason)
            return rec

    def get(self, recording_id: str) -> Recording:
        rec = self.recordings.get(recording_id) if _RECORDING_ID.match(recording_id) else None
        if rec is None:
            raise recording_not_found(recording_id)
        return rec

    def list_recordings(self) -> list[Recording]:
        return sorted(self.recordings.values(), key=lambda r: r.requested_at)

    async def delete(self, recording_id: str) -> None:
        """Stop the recording if it runs, then erase its directory and forget it."""
        async with self._lock:
            rec = self.get(recording_id)
            if rec.active:
                await self._stop(rec, "requested")
            path = self._erase(rec)
            await asyncio.to_thread(shutil.rmtree, path, True)
        # a writer thread may still be finalizing a file it was just told to close (and
        # create it, if its first packet was still queued): erase again once it is done
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(
            asyncio.get_running_loop().create_task(
                self._erase_again(self._path(recording_id)), name="recording-erase"
            )
        )

    @staticmethod
    async def _erase_again(path: str) -> None:
        for delay in ERASE_AGAIN:
            await asyncio.sleep(delay)
            if os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)

    def view(self, rec: Recording) -> dict[str, Any]:
        """A recording as the API shows it (sizes of the files as they are on disk now)."""
        out = rec.manifest()
        for entry in out["files"]:
            try:
                entry["bytes"] = os.path.getsize(
                    os.path.join(self._path(rec.recording_id), entry["file"])
                )
            except OSError:
                entry["bytes"] = None
        return out

    def sweep(self) -> list[str]:
        """Delete the recordings stopped more than ``retention_days`` ago; their ids."""
        if self.retention_days <= 0:
            return []
        limit = self.wallclock() - self.retention_days * 86400.0
        expired = [
            rec
            for rec in self.recordings.values()
            if not rec.active and (rec.stopped_at or rec.requested_at) < limit
        ]
        for rec in expired:
            shutil.rmtree(self._erase(rec), ignore_errors=True)
            log.info(
                "recording %s deleted (retention %d days)", rec.recording_id, self.retention_days
            )
        return [rec.recording_id for rec in expired]

    # -- events of the rooms ------------------------------------------------------------
    def _observe(self, event: events.Event) -> None:
        """Every event of the bus, synchronously: queue those of rooms being recorded."""
        if event.room_id in self._active and not event.type.startswith("recording."):
            self._queue.put_nowait(event)

    async def _follow(self) -> None:
        while True:
            event = await self._queue.get()
            async with self._lock:
                await self._handle_safely(event)

    async def _handle_safely(self, event: events.Event) -> None:
        try:
            await self._handle(event)
        except Exception:
            log.exception("recording: handling %s failed", event.type)

    async def _handle(self, event: events.Event) -> None:
        rec = self._active.get(event.room_id)
        if rec is None:
            return
        if isinstance(event, events.TrackPublished):
            if rec.answers.get(event.participant_id):
                await self._start_track(rec, event.participant_id, event.track)
                await self._save(rec)
        elif isinstance(event, events.TrackUnpublished):
            if event.track_id in rec.open:
                await self._stop_track(rec, event.track_id)
                await self._save(rec)
        elif isinstance(event, events.ParticipantJoined):
            self._emit(rec, events.RecordingRequested, participant_ids=[event.participant_id])
        elif isinstance(event, events.ParticipantLeft):
            was_recorded = rec.answers.pop(event.participant_id, None)
            await self._stop_participant(rec, event.participant_id)
            if was_recorded:
                self._emit(
                    rec,
                    events.RecordingParticipantExcluded,
                    participant_id=event.participant_id,
                    reason="left",
                )
            await self._save(rec)
        elif isinstance(event, events.RoomClosed):
            await self._stop(rec, "room_closed")

    def _writer_failed(self, info: dict[str, Any]) -> None:
        """A media process's writer gave up on a file: the recording stops (the call goes on)."""
        rec = self.recordings.get(str(info.get("recording_id")))
        if rec is None or not rec.active:
            return
        reason = info.get("reason")
        reason = reason if reason in ("disk_full", "io_error") else "io_error"

        async def stop() -> None:
            async with self._lock:
                track_id = info.get("track_id")
                if isinstance(track_id, str):
                    entry = rec.open.pop(track_id, None)
                    if entry is not None:
                        entry["ended_at"] = self.wallclock()
                await self._stop(rec, reason)

        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(stop(), name="recording-failed"))

    # -- writing ----------------------------------------------------------------------------
    async def _start_track(
        self, rec: Recording, participant_id: str, track: dict[str, Any]
    ) -> None:
        track_id = track.get("track_id")
        if not isinstance(track_id, str) or track_id in rec.open or not rec.active:
            return
        n = 1 + sum(
            1
            for f in rec.files
            if f["participant_id"] == participant_id and f["track_id"] == track_id
        )
        base = os.path.join(self._path(rec.recording_id), f"{participant_id}-{track_id}-{n}")
        try:
            info = await self.core.record_track(rec.room_id, track_id, rec.recording_id, base)
        except SfuError as exc:  # the track ended meanwhile, or its worker is gone
            log.info("recording %s: track %s not written: %s", rec.recording_id, track_id, exc)
            return
        except Exception:
            log.exception("recording %s: cannot write track %s", rec.recording_id, track_id)
            await self._stop(rec, "io_error")
            return
        # the media process's clock: when the file was hung on the track
        now = _time(info.get("started_at"), self.wallclock())
        entry = {
            "participant_id": participant_id,
            "track_id": track_id,
            "kind": track.get("kind") or info.get("kind"),
            "codec": track.get("codec") or info.get("codec"),
            "file": os.path.basename(str(info.get("path") or base)),
            "started_at": now,
            "ended_at": None,
        }
        rec.files.append(entry)
        rec.open[track_id] = entry
        if rec.state == "requested":
            rec.state = "recording"
            rec.started_at = now
            self._emit(rec, events.RecordingStarted)
            log.info("recording %s of room %s started", rec.recording_id, rec.room_id)

    async def _stop_track(self, rec: Recording, track_id: str) -> None:
        entry = rec.open.pop(track_id, None)
        if entry is None:
            return
        info: dict[str, Any] | None = None
        try:
            info = await self.core.stop_track_recording(rec.room_id, track_id, rec.recording_id)
        except Exception:
            log.exception("recording %s: stopping track %s failed", rec.recording_id, track_id)
        # the media process's clock: when the file was taken off the track
        entry["ended_at"] = _time((info or {}).get("ended_at"), self.wallclock())

    async def _stop_participant(self, rec: Recording, participant_id: str) -> None:
        for track_id, entry in list(rec.open.items()):
            if entry["participant_id"] == participant_id:
                await self._stop_track(rec, track_id)

    async def _stop(self, rec: Recording, reason: str) -> None:
        if not rec.active:
            return
        for track_id in list(rec.open):
            await self._stop_track(rec, track_id)
        rec.state = STOP_STATES.get(reason, "stopped")
        rec.reason = reason
        rec.stopped_at = self.wallclock()
        if self._active.get(rec.room_id) is rec:
            del self._active[rec.room_id]
        await self._save(rec)
        self._emit(rec, events.RecordingStopped, reason=reason)
        log.info("recording %s of room %s stopped (%s)", rec.recording_id, rec.room_id, reason)

    def _emit(self, rec: Recording, event_type: type[events.Event], **fields: Any) -> None:
        make: Any = event_type  # each recording event has a recording_id
        self.bus.publish(
            make(room_id=rec.room_id, at=self.wallclock(), recording_id=rec.recording_id, **fields)
        )

    # -- files ------------------------------------------------------------------------------
    def _path(self, recording_id: str) -> str:
        return os.path.join(self.directory, recording_id)

    async def _save(self, rec: Recording) -> None:
        """Write the manifest atomically, in a thread: the event loop (in one process, the
        media plane's) never waits for the disk."""
        text = json.dumps(rec.manifest(), separators=(",", ":"))
        await asyncio.to_thread(self._write_manifest, rec.recording_id, text)

    def _write_manifest(self, recording_id: str, text: str) -> None:
        """A temporary file, synced, renamed over the manifest."""
        target = os.path.join(self._path(recording_id), MANIFEST)
        temporary = target + ".tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except OSError as exc:
            if recording_id in self.recordings:
                log.error("recording %s: manifest not written: %s", recording_id, exc)

    def _erase(self, rec: Recording) -> str:
        """Forget a recording; its directory, for the caller to remove."""
        self.recordings.pop(rec.recording_id, None)
        if self._active.get(rec.room_id) is rec:
            del self._active[rec.room_id]
        return self._path(rec.recording_id)

    def _load(self) -> None:
        """The recordings of earlier runs, from their manifests. One that was still running
        when the relay stopped ended with its room: it is stopped (``room_closed``) at the time
        its manifest was last written."""
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            log.error("recording.directory %s cannot be read: %s", self.directory, exc)
            return
        for name in names:
            if not _RECORDING_ID.match(name):
                continue
            path = os.path.join(self._path(name), MANIFEST)
            try:
                with open(path, encoding="utf-8") as source:
                    rec = Recording.from_manifest(json.load(source))
                written = os.path.getmtime(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("recording %s: manifest unreadable (%s); left alone", name, exc)
                continue
            if rec.recording_id != name:
                continue
            if rec.active:
                rec.state, rec.reason, rec.stopped_at = "stopped", "room_closed", written
                for entry in rec.files:
                    if entry.get("ended_at") is None:
                        entry["ended_at"] = written
                self._write_manifest(name, json.dumps(rec.manifest(), separators=(",", ":")))
            self.recordings[name] = rec
        if self.recordings:
            log.info("%d recordings found in %s", len(self.recordings), self.directory)

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            async with self._lock:
                self.sweep()
