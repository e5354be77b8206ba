"""The recording writer: one daemon thread that owns every open recording file.

The packet path hands each decrypted RTP packet of a recorded track to
:meth:`TrackFile.packet`, which only puts a small tuple on a bounded queue (a full queue drops
the packet and counts it; the packet path never waits for the disk). The thread takes packets
off the queue, depacketizes them (:mod:`relay.recording.depacketize`) and writes the frames
into the track's container (:mod:`relay.recording.containers`).

Files are created by the thread at a track's first packet (or at its close, if no packet came)
with mode 0o600 and ``O_EXCL`` (an existing file is never overwritten or followed as a link);
missing parent directories are created with mode 0o700. Before writing, at most every
:data:`CHECK_INTERVAL` seconds per file, the thread compares the free space of the file's
file system with ``min_free_bytes``. When it falls below, or when a write fails (ENOSPC,
EIO, ...), that file is finalized as far as possible, closed, and reported through
``on_failure(path, reason)`` with reason ``"disk_full"`` or ``"io_error"`` (on the event loop
when one was given); its later packets are ignored. Nothing here decodes media.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO

from relay.recording.containers import AnnexBWriter, IvfWriter, OggOpusWriter
from relay.recording.depacketize import Depacketizer, Frame, depacketizer_for

__all__ = ["CHECK_INTERVAL", "CONTAINERS", "RecordingWriter", "TrackFile"]

log = logging.getLogger("relay.recording")

#: seconds between two checks of the free disk space of one file (and flushes to the OS)
CHECK_INTERVAL = 0.5

#: container and file extension by codec (lower case)
CONTAINERS: dict[str, tuple[str, str]] = {
    "opus": ("ogg", ".ogg"),
    "vp8": ("ivf", ".ivf"),
    "vp9": ("ivf", ".ivf"),
    "av1": ("ivf", ".ivf"),
    "h264": ("h264", ".h264"),
}

#: seconds a close waits for room in a full queue before the file is closed without the
#: packets still queued for it
LATE_CLOSE_WAIT = 2.0

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class _Timeline:
    """RTP timestamps to positions (clock units since the first frame): unwraps the 32-bit
    timestamps, and replaces a jump the wall clock does not explain (the sender restarted its
    timestamps) with the wall-clock time between the two frames."""

    __slots__ = ("_now", "_position", "_rate", "_ts")

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._ts: int | None = None
        self._now = 0.0
        self._position = 0

    def position(self, ts: int, now: float) -> int:
        if self._ts is None:
            self._ts, self._now = ts, now
            return 0
        delta = ((ts - self._ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        wall = (now - self._now) * self._rate
        if delta < -self._rate or delta > wall + 2 * self._rate:
            delta = max(int(wall), 0)
        self._ts, self._now = ts, now
        self._position += delta
        return self._position


class TrackFile:
    """One recorded track's file. Made by :meth:`RecordingWriter.open_track`; fed from the
    packet path with :meth:`packet`; :meth:`close` when the track leaves the recording."""

    def __init__(
        self,
        writer: RecordingWriter,
        path: str,
        kind: str,
        codec: str,
        clock_rate: int,
        channels: int,
    ) -> None:
        key = codec.lower()
        container, _ext = CONTAINERS[key]
        #: the file's path (path_base + extension)
        self.path = path
        #: "ogg", "ivf" or "h264"
        self.container = container
        self.kind = kind
        #: the codec, lower case
        self.codec = key
        self.clock_rate = clock_rate
        self.channels = channels
        #: packets dropped because the writer's queue was full
        self.dropped = 0
        #: "pending" (no file yet), "open", "closed" or "failed"
        self.state = "pending"
        #: "disk_full" or "io_error" when the state is "failed"
        self.failure: str | None = None
        #: packets the writer thread took
        self.packets = 0
        #: RTP timestamp of the first frame written
        self.first_ts: int | None = None
        self._writer = writer
        self._put = writer._queue.put_nowait
        self._closed = False
        # the writer thread's state
        self._depacketizer: Depacketizer = depacketizer_for(key)
        self._timeline = _Timeline(clock_rate)
        self._file: BinaryIO | None = None
        self._out: OggOpusWriter | IvfWriter | AnnexBWriter | None = None
        self._next_check = 0.0
        self._last_position = 0

    def packet(self, plain: bytes, offset: int, seq: int, ts: int, now: float) -> None:
        """Queue one decrypted RTP packet (``plain[offset:]`` is its payload; ``plain`` must not
        change afterwards). Never blocks: a full queue drops the packet and counts it."""
        if self._closed:
            return
        try:
            self._put((self, plain, offset, seq, ts, now))
        except queue.Full:
            self.dropped += 1
            self._writer.dropped += 1

    def close(self) -> None:
        """No more packets: the writer thread finalizes the file. Does not block."""
        if self._closed:
            return
        self._closed = True
        try:
            self._put((self, None, 0, 0, 0, 0.0))
        except queue.Full:
            self._writer._late_closes.append((self, time.monotonic()))

    def info(self) -> dict[str, Any]:
        """What was recorded so far: counts, first RTP timestamp, duration in seconds."""
        depacketizer = self._depacketizer
        out = self._out
        frames = written = 0
        duration = 0.0
        if out is not None:
            if isinstance(out, OggOpusWriter):
                frames, written, duration = out.packets, out.bytes, out.duration / 48000
            else:
                frames, written = out.frames, out.bytes
                if out.frames and self.container == "ivf":
                    duration = self._last_position / self.clock_rate
        return {
            "path": self.path,
            "container": self.container,
            "codec": self.codec,
            "kind": self.kind,
            "state": self.state,
            "failure": self.failure,
            "packets": self.packets,
            "frames": frames,
            "bytes": written,
            "first_ts": self.first_ts,
            "duration": duration,
            "dropped": self.dropped,
            "lost_packets": depacketizer.lost_packets,
            "lost_frames": depacketizer.lost_frames,
            "skipped_frames": depacketizer.skipped_frames,
            "late_packets": depacketizer.late,
        }

    # -- the writer thread's side ---------------------------------------------------------

    def _open(self) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.path, flags, 0o600)
        self._file = file = os.fdopen(fd, "wb")
        self.state = "open"
        if self.container == "ogg":
            self._out = OggOpusWriter(file, self.channels)
        elif self.container == "ivf":
            self._out = IvfWriter(file, self.codec, self.clock_rate)
        else:
            self._out = AnnexBWriter(file)

    def _write(self, frame: Frame) -> None:
        out = self._out
        assert out is not None
        position = self._timeline.position(frame.ts, frame.now)
        if self.first_ts is None:
            self.first_ts = frame.ts
        if isinstance(out, OggOpusWriter):
            if self.clock_rate != 48000:
                position = position * 48000 // self.clock_rate
            out.write(position, frame.data)
        else:
            if position > self._last_position or out.frames == 0:
                self._last_position = position
            out.write(position, frame.data, frame.keyframe)

    def _finish(self) -> None:
        """Write what the depacketizer still holds, the container's trailer; close."""
        if self.state == "open":
            for frame in self._depacketizer.flush():
                self._write(frame)
        self._shut()
        if self.state == "open":
            self.state = "closed"

    def _shut(self) -> None:
        """Finalize the container and close the file, as far as the disk lets us."""
        out, file = self._out, self._file
        self._file = None
        if file is None:
            return
        try:
            if out is not None:
                out.close()
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()


_STOP = (None, None, 0, 0, 0, 0.0)


class RecordingWriter:
    """One per process: a daemon thread that owns every open recording file, fed by a bounded
    queue of ``queue_packets`` packets."""

    def __init__(
        self,
        queue_packets: int,
        min_free_bytes: int,
        on_failure: Callable[[str, str], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        #: a file fails with "disk_full" when its file system has less free space than this
        self.min_free_bytes = min_free_bytes
        #: packets dropped because the queue was full
        self.dropped = 0
        self._on_failure = on_failure
        self._loop = loop
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=queue_packets)
        self._late_closes: deque[tuple[TrackFile, float]] = deque()
        self._tracks: list[TrackFile] = []
        self._lock = threading.Lock()
        self._closed = False
        self._stop_now = False
        self._thread = threading.Thread(target=self._run, name="relay-recording", daemon=True)
        self._thread.start()

    def open_track(
        self, path_base: str, kind: str, codec: str, clock_rate: int, channels: int = 2
    ) -> TrackFile:
        """A new track file at ``path_base`` + the container's extension (".ogg" for Opus,
        ".ivf" for VP8/VP9/AV1, ".h264" for H.264). The file is created by the writer thread.
        Raises ValueError for another codec, RuntimeError after :meth:`close`."""
        if self._closed:
            raise RuntimeError("the recording writer is closed")
        key = codec.lower()
        if key not in CONTAINERS:
            raise ValueError(f"recording does not support codec {codec!r}")
        track = TrackFile(self, path_base + CONTAINERS[key][1], kind, key, clock_rate, channels)
        with self._lock:
            self._tracks.append(track)
        return track

    def close(self, timeout: float = 5.0) -> None:
        """Write every packet already queued, finalize every file, stop the thread (waiting at
        most about ``timeout`` seconds)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            self._stop_now = True
        self._thread.join(max(deadline - time.monotonic(), 0.1))
        if self._thread.is_alive():
            log.warning("recording writer did not finish within %.1f s", timeout)

    @property
    def tracks(self) -> list[TrackFile]:
        """The track files not finished yet."""
        with self._lock:
            return list(self._tracks)

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        get = self._queue.get
        next_tick = time.monotonic() + CHECK_INTERVAL
        while not self._stop_now:
            try:
                item = get(timeout=CHECK_INTERVAL)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    track, plain = item[0], item[1]
                    if track is None:
                        break
                    if plain is None:
                        self._close_track(track)
                    else:
                        self._packet(track, plain, item[2], item[3], item[4], item[5])
                if self._late_closes:
                    self._late_close()
                mono = time.monotonic()
                if mono >= next_tick:
                    next_tick = mono + CHECK_INTERVAL
                    self._tick()
            except Exception:  # the thread must outlive any one file's trouble
                log.exception("recording writer")
        for track in self.tracks:
            self._close_track(track)

    def _late_close(self) -> None:
        """A close that found the queue full: queue it behind the track's packets now that
        there may be room, or, after :data:`LATE_CLOSE_WAIT` seconds, close right away."""
        track, since = self._late_closes[0]
        try:
            self._queue.put_nowait((track, None, 0, 0, 0, 0.0))
        except queue.Full:
            if time.monotonic() - since < LATE_CLOSE_WAIT:
                return
            self._close_track(track)
        self._late_closes.popleft()

    def _packet(
        self, track: TrackFile, plain: bytes, offset: int, seq: int, ts: int, now: float
    ) -> None:
        state = track.state
        if state == "closed" or state == "failed":
            return
        try:
            if state == "pending":
                track._open()
            mono = time.monotonic()
            if mono >= track._next_check:
                track._next_check = mono + CHECK_INTERVAL
                if self._low_space(track):
                    self._fail(track, "disk_full")
                    return
            track.packets += 1
            for frame in track._depacketizer.push(plain, offset, seq, ts, now):
                track._write(frame)
        except OSError as exc:
            self._fail(track, _reason(exc))
        except Exception:
            log.exception("recording writer: %s failed", track.path)
            self._fail(track, "io_error")

    def _low_space(self, track: TrackFile) -> bool:
        stat = os.statvfs(os.path.dirname(track.path) or ".")
        return stat.f_bavail * stat.f_frsize < self.min_free_bytes

    def _close_track(self, track: TrackFile) -> None:
        if track.state == "closed" or track.state == "failed":
            return
        try:
            if track.state == "pending":
                track._open()
            track._finish()
        except OSError as exc:
            self._fail(track, _reason(exc))
        except Exception:
            log.exception("recording writer: closing %s failed", track.path)
            self._fail(track, "io_error")
        self._forget(track)

    def _tick(self) -> None:
        """Hand buffered data of every open file to the OS."""
        for track in self.tracks:
            file = track._file
            if file is not None and track.state == "open":
                try:
                    file.flush()
                except OSError as exc:
                    self._fail(track, _reason(exc))

    def _fail(self, track: TrackFile, reason: str) -> None:
        track.state = "failed"
        track.failure = reason
        try:
            track._shut()
        except OSError:
            pass
        except Exception:
            log.exception("recording writer: closing %s failed", track.path)
        self._forget(track)
        log.warning("recording file %s stopped: %s", track.path, reason)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._on_failure, track.path, reason)
            except RuntimeError:  # the loop is closed
                pass
        else:
            try:
                self._on_failure(track.path, reason)
            except Exception:
                log.exception("recording writer: on_failure raised")

    def _forget(self, track: TrackFile) -> None:
        with self._lock:
            if track in self._tracks:
                self._tracks.remove(track)


def _reason(exc: OSError) -> str:
    return "disk_full" if exc.errno in _DISK_FULL_ERRNOS else "io_error"
