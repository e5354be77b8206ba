"""The media tap of consent-gated recording: which tracks of this process are written where.

The recording service (relay/recording/service.py, in the control-plane process) decides what
is recorded; the process that holds a track's publisher writes it. :class:`TrackRecorders`
(one per media process, :attr:`relay.sfu.sfu.Sfu.recording`) opens one file per track and
consent interval with the process's :class:`relay.recording.writer.RecordingWriter` (made on
first use, closed with the media plane) and hangs it on the track: :meth:`Track.receive` hands
each plain packet to it, which only queues it for the writer thread. With simulcast the top
layer is written. Nothing here decodes media.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.config import RecordingSettings
from relay.sfu.errors import Conflict

if TYPE_CHECKING:
    from relay.recording.writer import RecordingWriter, TrackFile
    from relay.sfu.track import Track

__all__ = ["Tap", "TrackRecorders"]

log = logging.getLogger(__name__)


@dataclass
class Tap:
    """One track of one recording being written: the stream that feeds the file."""

    recording_id: str
    track_id: str
    participant_id: str
    kind: str
    stream: Track
    file: TrackFile
    #: wall-clock time the file was hung on the stream, and taken off it
    started_at: float = 0.0
    ended_at: float | None = None


class TrackRecorders:
    """The recording files this process writes, by (recording id, track id).

    ``on_failure`` is called (on the event loop) with ``{recording_id, track_id,
    participant_id, path, reason}`` when the writer gives up on a file (``reason``:
    ``disk_full`` or ``io_error``); the file is then already detached from its track.
    """

    def __init__(self, settings: RecordingSettings) -> None:
        self.settings = settings
        self.writer: RecordingWriter | None = None
        self.taps: dict[tuple[str, str], Tap] = {}
        self.on_failure: Callable[[dict[str, Any]], None] | None = None

    def _get_writer(self) -> RecordingWriter:
        if self.writer is None:
            from relay.recording.writer import RecordingWriter

            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self.writer = RecordingWriter(
                self.settings.queue_packets,
                self.settings.min_free_bytes,
                on_failure=self._failed,
                loop=loop,
            )
        return self.writer

    def start(self, track: Track, recording_id: str, path_base: str, now: float) -> dict[str, Any]:
        """Write ``track`` (its top simulcast layer) to a new file ``path_base`` + extension,
        from its next keyframe (asked for at once); the file's description. Writing a track
        already written for this recording changes nothing."""
        key = (recording_id, track.track_id)
        tap = self.taps.get(key)
        if tap is None:
            stream = track.receive_streams()[-1]
            codec = track.codec
            try:
                file = self._get_writer().open_track(
                    path_base, track.kind, codec.name, codec.clock_rate, codec.channels or 2
                )
            except ValueError as exc:  # a codec no container here takes
                raise Conflict(str(exc), code="codec_not_recordable") from None
            tap = Tap(
                recording_id,
                track.track_id,
                track.participant_id,
                track.kind,
                stream,
                file,
                started_at=time.time(),
            )
            self.taps[key] = tap
            stream.recorders = [*stream.recorders, file]
            if track.kind == "video":
                stream.keyframes.request(now, force=True)
        return self._describe(tap)

    def stop(self, recording_id: str, track_id: str) -> dict[str, Any] | None:
        """Stop writing a track: no packet reaches its file from now on, and the writer
        finalizes it. The file's description, or None if it was not being written."""
        tap = self.taps.pop((recording_id, track_id), None)
        if tap is None:
            return None
        self._detach(tap)
        tap.ended_at = time.time()
        tap.file.close()
        return self._describe(tap)

    def stop_recording(self, recording_id: str) -> list[dict[str, Any]]:
        """Stop every track of one recording."""
        stopped = []
        for rec, track_id in [key for key in self.taps if key[0] == recording_id]:
            info = self.stop(rec, track_id)
            if info is not None:
                stopped.append(info)
        return stopped

    def close(self, timeout: float = 5.0) -> None:
        """Stop every file and finalize them (the media plane shuts down)."""
        for recording_id, track_id in list(self.taps):
            self.stop(recording_id, track_id)
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close(timeout)

    @staticmethod
    def _detach(tap: Tap) -> None:
        stream = tap.stream
        stream.recorders = [r for r in stream.recorders if r is not tap.file]

    @staticmethod
    def _describe(tap: Tap) -> dict[str, Any]:
        try:
            info = dict(tap.file.info())
        except Exception:  # the description is informative only
            info = {}
        info.update(
            path=tap.file.path,
            container=tap.file.container,
            recording_id=tap.recording_id,
            track_id=tap.track_id,
            participant_id=tap.participant_id,
            kind=tap.kind,
            started_at=tap.started_at,
            ended_at=tap.ended_at,
        )
        return info

    def _failed(self, path: str, reason: str) -> None:
        """The writer gave up on a file: detach it and tell."""
        for key, tap in list(self.taps.items()):
            if tap.file.path != path:
                continue
            del self.taps[key]
            self._detach(tap)
            try:
                tap.file.close()
            except Exception:
                log.debug("closing a failed recording file failed", exc_info=True)
            log.warning(
                "recording %s: writing track %s failed (%s)", tap.recording_id, tap.track_id, reason
            )
            callback = self.on_failure
            if callback is not None:
                try:
                    callback(
                        {
                            "recording_id": tap.recording_id,
                            "track_id": tap.track_id,
                            "participant_id": tap.participant_id,
                            "path": path,
                            "reason": reason,
                        }
                    )
                except Exception:
                    log.exception("recording failure callback failed")
