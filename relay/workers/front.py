"""The front process of a relay with several media workers.

:class:`WorkerPool` is what the control API drives when ``[workers] count`` is above 1 (the
same surface as :class:`relay.api.core.LocalCore`). It starts the worker processes, keeps the
room directory (every room, which worker holds each participant, which tracks are published
where and which are piped to which worker), places new participants, routes every call about a
participant to its worker, turns the workers' events into the relay's events, and handles a
worker that dies or stops answering.

A room lives in the front. On a worker it exists as a *shard* holding that worker's
participants, created when the first of them is placed there and deleted when the last leaves.
When a room has shards on several workers, every track published on one is piped (plain RTP on
loopback, :mod:`relay.workers.pipe`) to each of the others, which fan it out to their own
subscribers; the pipe ends with the track or with the receiving shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.api.events import EventBus
from relay.cli import format_toml
from relay.config import Settings, settings_as_dict
from relay.metrics import Metrics
from relay.sfu import events
from relay.sfu.errors import (
    Draining,
    NotFound,
    Overloaded,
    SfuError,
    participant_exists,
    participant_not_found,
    room_full,
    room_not_found,
)
from relay.sfu.room import Room
from relay.sfu.sfu import check_id, new_room
from relay.workers.channel import Channel, ChannelError

log = logging.getLogger(__name__)

#: Seconds a starting worker has to say hello before it is taken for failed.
START_TIMEOUT = 30.0
#: Seconds between two load calls to each worker (also how a hung worker is noticed).
LOAD_INTERVAL = 1.0
#: Forwarded packets per second taken as one core's worth of load when placing participants.
PACKETS_PER_CORE = 20000.0
#: A room shard on a worker never closes by itself: the front closes rooms.
SHARD_EMPTY_TIMEOUT = 1e9
#: Seconds between the front's room housekeeping passes (empty rooms closing).
HOUSEKEEPING_INTERVAL = 1.0
#: A restarted worker waits this long before the next restart (a worker that dies at start-up
#: does not spin).
RESTART_DELAY = 0.5


class WorkerUnavailable(SfuError):
    """The participant's worker failed (or no worker is ready): the call cannot be served."""

    status = 503
    code = "worker_unavailable"


@dataclass
class WorkerHandle:
    """One worker process as the front sees it."""

    index: int
    state: str = "starting"
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    pid: int | None = None
    media_port: int | None = None
    pipe_port: int | None = None
    cpu: float | None = None
    packet_rate: float = 0.0
    shedding: bool = False
    rooms: int = 0
    restarts: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def peer(self) -> list[Any]:
        """The address of its pipe socket."""
        return ["127.0.0.1", self.pipe_port]

    def load_score(self) -> float:
        """CPU and forwarding load in cores, coarse enough that noise does not decide."""
        cpu = self.cpu or 0.0
        return round(max(cpu, self.packet_rate / PACKETS_PER_CORE), 1)


@dataclass
class RoomEntry:
    """A room of the directory: its settings and where its participants and tracks are."""

    room: Room
    #: participant id -> worker index
    members: dict[str, int] = field(default_factory=dict)
    #: workers holding a shard of the room
    shards: set[int] = field(default_factory=set)
    #: track id -> (worker index, publisher id)
    tracks: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: (track id, from worker, to worker) of every pipe
    pipes: set[tuple[str, int, int]] = field(default_factory=set)
    #: the speaker last announced (events from shards are deduplicated)
    speaker: str | None = None

    def on(self, index: int) -> list[str]:
        return [pid for pid, w in self.members.items() if w == index]


class FrontOverload:
    """Load shedding as the front sees it: on when every ready worker sheds load."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.retry_after = pool.settings.overload.retry_after

    @property
    def shedding(self) -> bool:
        """True while every ready worker sheds load, or none is ready (restarting)."""
        ready = [w for w in self.pool.handles if w.state == "ready"]
        return all(w.shedding for w in ready)


class WorkerPool:
    """Worker processes behind the control API; see the module docstring."""

    def __init__(self, settings: Settings, bus: EventBus, metrics: Metrics, count: int) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.handles = [WorkerHandle(i) for i in range(count)]
        self.rooms: dict[str, RoomEntry] = {}
        self.overload = FrontOverload(self)
        self._draining = False
        self._stopping = False
        self._started = False
        self._start_failed = asyncio.Event()
        self._start_problem = ""
        self._dir = ""
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._jobs: asyncio.Queue[Coroutine[Any, Any, Any]] = asyncio.Queue()
        self._lock = asyncio.Lock()
        #: (recording id, track id) -> index of the worker writing that track
        self._recording_taps: dict[tuple[str, str], int] = {}
        self._recording_failure: Callable[[dict[str, Any]], None] | None = None
        metrics.gauge(
            "workers_ready", "Media worker processes ready.", lambda: float(self._ready_count())
        )
        metrics.counter(
            "worker_restarts_total",
            "Media worker processes restarted after a failure.",
            lambda: float(sum(w.restarts for w in self.handles)),
        )
        metrics.gauge("rooms", "Rooms open.", lambda: float(len(self.rooms)))
        metrics.gauge(
            "participants",
            "Participants in all rooms.",
            lambda: float(sum(len(e.members) for e in self.rooms.values())),
        )

    def _ready_count(self) -> int:
        return sum(1 for w in self.handles if w.state == "ready")

    @property
    def draining(self) -> bool:
        return self._draining

    # -- processes ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker and wait until all are ready."""
        self._dir = tempfile.mkdtemp(prefix="relay-workers-")
        os.chmod(self._dir, 0o700)
        # the workers get the effective settings (secrets included) on their stdin, never in a file
        self._settings_text = format_toml(settings_as_dict(self.settings, redact=False)).encode()
        self._socket = os.path.join(self._dir, "front.sock")
        self._server = await asyncio.start_unix_server(self._connected, path=self._socket)
        for worker in self.handles:
            await self._spawn(worker)
        ready = asyncio.ensure_future(self._all_ready())
        failed = asyncio.ensure_future(self._start_failed.wait())
        done, _ = await asyncio.wait(
            {ready, failed}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in (ready, failed):
            waiter.cancel()
        if ready not in done:
            await self.stop(1.0)
            raise SystemExit(
                f"relay: {self._start_problem or 'the media workers did not start within '}"
                f"{'' if self._start_problem else f'{START_TIMEOUT:g} s'} (see the log above)"
            )
        self._started = True
        self._tasks.append(asyncio.create_task(self._run_jobs(), name="directory"))
        self._tasks.append(asyncio.create_task(self._watch_load(), name="worker-load"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="rooms"))
        log.info(
            "%d media workers on udp ports %s",
            len(self.handles),
            ", ".join(str(w.media_port) for w in self.handles),
        )

    async def _all_ready(self) -> None:
        for worker in self.handles:
            await worker.ready.wait()

    async def _spawn(self, worker: WorkerHandle) -> None:
        worker.state = "starting"
        worker.ready.clear()
        worker.channel = None
        worker.cpu = None
        worker.packet_rate = 0.0
        worker.shedding = False
        command = [
            sys.executable,
            "-m",
            "relay.workers.worker",
            "--index",
            str(worker.index),
            "--socket",
            self._socket,
        ]
        process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.PIPE)
        worker.process = process
        worker.pid = process.pid
        assert process.stdin is not None
        process.stdin.write(self._settings_text)
        with contextlib.suppress(ConnectionError):
            await process.stdin.drain()
        process.stdin.close()
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(
            asyncio.create_task(self._watch_exit(worker, process), name=f"worker-{worker.index}")
        )

    async def _watch_exit(self, worker: WorkerHandle, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self._stopping or worker.process is not process:
            return
        if not self._started:
            # a worker that cannot start (its media port taken, ...) stops the relay's start
            self._start_problem = f"media worker {worker.index} exited with code {code} at start-up"
            self._start_failed.set()
            return
        await self._failed(worker, f"exited with code {code}")

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A worker connected: its hello binds the channel to its handle."""
        holder: dict[str, WorkerHandle] = {}

        def on_notification(method: str, params: dict[str, Any]) -> None:
            if method == "hello":
                index = params.get("index")
                if not isinstance(index, int) or not 0 <= index < len(self.handles):
                    log.error("worker hello with a bad index %r; closing", index)
                    channel.close()
                    return
                worker = self.handles[index]
                if worker.pid != params.get("pid"):
                    log.error(
                        "worker %d: hello from pid %s, expected %s",
                        index,
                        params.get("pid"),
                        worker.pid,
                    )
                    channel.close()
                    return
                holder["worker"] = worker
                worker.channel = channel
                worker.media_port = params.get("media_port")
                worker.pipe_port = params.get("pipe_port")
                worker.state = "ready"
                worker.ready.set()
                log.info(
                    "worker %d ready (pid %s, media port %s)", index, worker.pid, worker.media_port
                )
                return
            sender = holder.get("worker")
            if sender is None:
                log.warning("notification %r before hello; ignored", method)
                return
            if method == "event":
                self._worker_event(sender, params.get("event"))
            elif method == "recording_failure":
                self._recording_failed(sender, params)
            elif method == "datachannel":
                self._datachannel(sender, params)
            else:
                log.debug("worker %d: notification %r ignored", sender.index, method)

        channel = Channel(
            reader,
            writer,
            on_notification=on_notification,
            call_timeout=self.settings.workers.call_timeout,
            name="worker",
        )
        await channel.run()
        worker = holder.get("worker")
        if worker is not None and worker.channel is channel and not self._stopping:
            await self._failed(worker, "connection to the front lost")

    async def _failed(self, worker: WorkerHandle, reason: str) -> None:
        """A worker died or stopped answering: tell, clean up, restart."""
        if worker.state == "failed" or self._draining:
            return
        worker.state = "failed"
        log.error("worker %d (pid %s) failed: %s; restarting it", worker.index, worker.pid, reason)
        process = worker.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        if worker.channel is not None:
            worker.channel.close()
            worker.channel = None
        now = time.time()
        lost_peer = worker.peer
        for entry in list(self.rooms.values()):
            room = entry.room
            for pid in entry.on(worker.index):
                del entry.members[pid]
                self._publish(
                    events.ParticipantLeft(
                        room_id=room.room_id, at=now, participant_id=pid, reason="worker_failed"
                    )
                )
            for track_id, (where, publisher) in list(entry.tracks.items()):
                if where == worker.index:
                    del entry.tracks[track_id]
                    self._publish(
                        events.TrackUnpublished(
                            room_id=room.room_id,
                            at=now,
                            participant_id=publisher,
                            track_id=track_id,
                        )
                    )
            entry.pipes = {p for p in entry.pipes if worker.index not in (p[1], p[2])}
            entry.shards.discard(worker.index)
            if not entry.members and room.empty_since is None:
                room.empty_since = time.monotonic()
        for other in self.handles:
            if other is not worker and other.state == "ready":
                self._job(self._call_quietly(other, "drop_peer", peer=lost_peer))
        worker.restarts += 1
        if process is not None:
            with contextlib.suppress(Exception):
                await process.wait()
        await asyncio.sleep(RESTART_DELAY)
        if not self._stopping:
            await self._spawn(worker)

    async def stop(self, grace: float) -> None:
        """Drain every worker, end the processes (killed after ``grace`` seconds)."""
        self._draining = True
        ready = [w for w in self.handles if w.state == "ready" and w.channel is not None]
        await asyncio.gather(
            *(self._call_quietly(w, "drain", timeout=grace) for w in ready),
            return_exceptions=True,
        )
        now = time.time()
        for room_id in list(self.rooms):
            # the workers closed their shards; the rooms close with them
            self._publish(events.RoomClosed(room_id=room_id, at=now))
        self.rooms.clear()
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        while not self._jobs.empty():
            self._jobs.get_nowait().close()
        for worker in self.handles:
            if worker.channel is not None:
                worker.channel.close()
        processes = [w.process for w in self.handles if w.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                for process in processes:
                    await process.wait()
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._server is not None:
            self._server.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- calls ----------------------------------------------------------------------------
    async def _call(self, worker: WorkerHandle, method: str, **params: Any) -> Any:
        """A call to a worker; a worker that does not answer in time is failed."""
        channel = worker.channel
        if worker.state != "ready" or channel is None:
            raise WorkerUnavailable(f"worker {worker.index} is not available")
        try:
            return await channel.call(method, params)
        except ChannelError as exc:
            task = asyncio.create_task(self._failed(worker, str(exc)), name="worker-failed")
            self._tasks.append(task)  # held until done (and cancelled by stop)
            raise WorkerUnavailable(f"worker {worker.index} failed: {exc}") from None

    async def _call_quietly(
        self, worker: WorkerHandle, method: str, timeout: float | None = None, **params: Any
    ) -> Any:
        """A call whose failure is only logged (clean-up and housekeeping)."""
        channel = worker.channel
        if channel is None:
            return None
        try:
            return await channel.call(method, params, timeout)
        except (SfuError, ChannelError) as exc:
            log.debug("worker %d: %s failed: %s", worker.index, method, exc)
            return None

    async def _watch_load(self) -> None:
        """Every worker's load once a second; a worker that does not answer in time failed."""
        while True:
            await asyncio.sleep(LOAD_INTERVAL)
            ready = [w for w in self.handles if w.state == "ready"]
            results = await asyncio.gather(
                *(self._call(w, "load") for w in ready), return_exceptions=True
            )
            for worker, result in zip(ready, results, strict=True):
                if isinstance(result, dict):
                    worker.cpu = result.get("cpu")
                    worker.packet_rate = float(result.get("packet_rate") or 0.0)
                    worker.shedding = bool(result.get("shedding"))
                    worker.rooms = int(result.get("rooms") or 0)

    # -- directory jobs (one at a time, in order) ---------------------------------------
    def _job(self, job: Coroutine[Any, Any, Any]) -> None:
        """Run ``job`` after the directory jobs before it, holding the directory lock."""
        self._jobs.put_nowait(job)

    async def _run_jobs(self) -> None:
        while True:
            job = await self._jobs.get()
            try:
                async with self._lock:
                    await job
            except Exception:
                log.exception("directory job failed")

    async def _pipe(self, room_id: str, track_id: str, source: int, target: int) -> None:
        """Pipe one track from its worker to another shard of the room (under the lock)."""
        entry = self.rooms.get(room_id)
        if entry is None or target not in entry.shards or track_id not in entry.tracks:
            return
        if (track_id, source, target) in entry.pipes:
            return
        src, dst = self.handles[source], self.handles[target]
        description = await self._call(
            src, "export_track", room_id=room_id, track_id=track_id, peer=dst.peer
        )
        await self._call(
            dst, "import_track", room_id=room_id, peer=src.peer, description=description
        )
        entry.pipes.add((track_id, source, target))

    async def _pipes_from(self, room_id: str, track_id: str) -> None:
        entry = self.rooms.get(room_id)
        if entry is None or track_id not in entry.tracks:
            return
        source = entry.tracks[track_id][0]
        for target in sorted(entry.shards - {source}):
            await self._pipe(room_id, track_id, source, target)

    async def _unpipe_track(self, room_id: str, track_id: str) -> None:
        """A track ended: every shard that imported it drops it."""
        entry = self.rooms.get(room_id)
        if entry is None:
            return
        for pipe in [p for p in entry.pipes if p[0] == track_id]:
            entry.pipes.discard(pipe)
            await self._call_quietly(
                self.handles[pipe[2]], "remove_import", room_id=room_id, track_id=track_id
            )

    async def _close_shard(self, room_id: str, index: int) -> None:
        """The last participant of a shard left: stop its pipes and delete it."""
        entry = self.rooms.get(room_id)
        if entry is None or index not in entry.shards or entry.on(index):
            return
        worker = self.handles[index]
        for pipe in [p for p in entry.pipes if p[2] == index]:
            entry.pipes.discard(pipe)
            await self._call_quietly(
                self.handles[pipe[1]],
                "unexport_track",
                room_id=room_id,
                track_id=pipe[0],
                peer=worker.peer,
            )
        entry.shards.discard(index)
        await self._call_quietly(worker, "delete_room", room_id=room_id)

    async def _close_room(self, room_id: str) -> None:
        """Delete every shard (their participants leave with ``room_closed``, events that pass
        through the directory), then the room."""
        entry = self.rooms.get(room_id)
        if entry is None:
            return
        for index in sorted(entry.shards):
            await self._call_quietly(self.handles[index], "delete_room", room_id=room_id)
        if self.rooms.get(room_id) is entry:
            del self.rooms[room_id]
        self._publish(events.RoomClosed(room_id=room_id, at=time.time()))
        log.info("room %s closed", room_id)

    # -- events -----------------------------------------------------------------------------
    def _publish(self, event: events.Event) -> None:
        self.bus.publish(event)

    def _datachannel(self, worker: WorkerHandle, params: dict[str, Any]) -> None:
        """Data channel traffic of a participant on ``worker``: to the room's other shards, in
        order (a notification on each one's channel; relay/sfu/datachannels.py)."""
        entry = self.rooms.get(str(params.get("room_id")))
        if entry is None:
            return
        for index in sorted(entry.shards - {worker.index}):
            target = self.handles[index]
            if target.channel is not None and target.state == "ready":
                target.channel.notify("datachannel", params)

    def _worker_event(self, worker: WorkerHandle, data: Any) -> None:
        """An event of a worker's core: update the directory, pass it on."""
        if not isinstance(data, dict):
            return
        cls = events.EVENT_TYPES.get(data.get("type", ""))
        if cls is None:
            log.warning("worker %d: unknown event %r", worker.index, data.get("type"))
            return
        try:
            event = cls(**{k: v for k, v in data.items() if k != "type"})
        except TypeError:
            log.warning("worker %d: malformed %s event", worker.index, cls.type)
            return
        room_id = event.room_id
        entry = self.rooms.get(room_id)
        if isinstance(event, events.RoomClosed):
            return  # a shard closing: the front closes rooms
        if entry is None:
            return  # a shard of a room already closed
        if isinstance(event, events.ParticipantLeft):
            if entry.members.get(event.participant_id) != worker.index:
                return
            del entry.members[event.participant_id]
            if not entry.on(worker.index):
                self._job(self._close_shard(room_id, worker.index))
            if not entry.members:
                entry.room.empty_since = time.monotonic()
        elif isinstance(event, events.TrackPublished):
            track_id = event.track.get("track_id")
            if isinstance(track_id, str):
                entry.tracks[track_id] = (worker.index, event.participant_id)
                self._job(self._pipes_from(room_id, track_id))
        elif isinstance(event, events.TrackUnpublished):
            if entry.tracks.get(event.track_id, (None,))[0] == worker.index:
                del entry.tracks[event.track_id]
                self._job(self._unpipe_track(room_id, event.track_id))
        elif isinstance(event, events.SpeakerChanged):
            if event.participant_id == entry.speaker:
                return
            entry.speaker = event.participant_id
        self._publish(event)

    async def _housekeeping(self) -> None:
        """Close rooms that stayed empty longer than their empty_timeout."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now = time.monotonic()
            for room_id, entry in list(self.rooms.items()):
                room = entry.room
                if entry.members:
                    room.empty_since = None
                elif room.empty_since is not None and now - room.empty_since >= room.empty_timeout:
                    async with self._lock:
                        if not entry.members and self.rooms.get(room_id) is entry:
                            await self._close_room(room_id)

    # -- placement --------------------------------------------------------------------------
    def _place(self, entry: RoomEntry) -> WorkerHandle:
        ready = [w for w in self.handles if w.state == "ready"]
        if not ready:
            raise WorkerUnavailable("no media worker is ready; try again shortly")
        calm = [w for w in ready if not w.shedding]
        if not calm:
            raise Overloaded(
                "the relay is overloaded and accepts no new sessions for now",
                retry_after=self.settings.overload.retry_after,
            )
        counts = {w.index: 0 for w in calm}
        for e in self.rooms.values():
            for index in e.members.values():
                if index in counts:
                    counts[index] += 1
        if self.settings.workers.placement == "pack":
            holders = [w for w in calm if entry.on(w.index)]
            if holders:
                return min(holders, key=lambda w: (w.load_score(), counts[w.index], w.index))
        return min(calm, key=lambda w: (w.load_score(), counts[w.index], w.index))

    # -- the control API's surface ----------------------------------------------------------
    def _entry(self, room_id: str) -> RoomEntry:
        entry = self.rooms.get(room_id)
        if entry is None:
            raise room_not_found(room_id)
        return entry

    def _member(self, room_id: str, participant_id: str) -> WorkerHandle:
        entry = self._entry(room_id)
        index = entry.members.get(participant_id)
        if index is None:
            raise participant_not_found(room_id, participant_id)
        return self.handles[index]

    async def create_room(
        self,
        room_id: str | None,
        max_participants: int | None,
        e2ee_required: bool,
        empty_timeout: float | None,
        codec_preference: Sequence[str] | None,
    ) -> dict[str, Any]:
        if self._draining:
            raise Draining("the relay is draining and accepts no new rooms")
        existing = {room_id: e.room for room_id, e in self.rooms.items()}
        room = new_room(
            self.settings,
            existing,
            room_id,
            max_participants,
            e2ee_required,
            empty_timeout,
            codec_preference,
            time.time(),
            time.monotonic(),
        )
        self.rooms[room.room_id] = RoomEntry(room)
        log.info("room %s created", room.room_id)
        return room.to_dict()

    async def _participants(self, entries: list[RoomEntry]) -> dict[str, list[dict[str, Any]]]:
        """The participants of these rooms, from the workers holding their shards."""
        wanted = {e.room.room_id for e in entries}
        indexes = sorted({i for e in entries for i in e.shards})
        results = await asyncio.gather(
            *(self._call(self.handles[i], "list_rooms") for i in indexes), return_exceptions=True
        )
        found: dict[str, list[dict[str, Any]]] = {room_id: [] for room_id in wanted}
        for index, result in zip(indexes, results, strict=True):
            if not isinstance(result, list):
                continue
            for room in result:
                room_id = room.get("room_id")
                if room_id not in wanted:
                    continue
                members = self.rooms[room_id].members if room_id in self.rooms else {}
                for participant in room.get("participants", []):
                    if members.get(participant.get("participant_id")) == index:
                        found[room_id].append({**participant, "worker": index})
        return found

    def _room_dict(self, entry: RoomEntry, participants: list[dict[str, Any]]) -> dict[str, Any]:
        out = entry.room.to_dict()
        order = list(entry.members)
        out["participants"] = sorted(
            participants,
            key=lambda p: (
                order.index(p["participant_id"]) if p["participant_id"] in order else len(order)
            ),
        )
        return out

    async def list_rooms(self) -> list[dict[str, Any]]:
        entries = list(self.rooms.values())
        found = await self._participants(entries)
        return [self._room_dict(e, found.get(e.room.room_id, [])) for e in entries]

    async def get_room(self, room_id: str) -> dict[str, Any]:
        entry = self._entry(room_id)
        found = await self._participants([entry])
        return self._room_dict(entry, found.get(room_id, []))

    async def delete_room(self, room_id: str) -> None:
        self._entry(room_id)
        async with self._lock:
            await self._close_room(room_id)

    async def add_participant(
        self,
        room_id: str,
        participant_id: str | None,
        metadata: dict[str, Any] | None,
        can_publish: bool,
        can_subscribe: bool,
        auto_subscribe: bool,
        e2ee: bool = False,
    ) -> dict[str, Any]:
        if self._draining:
            raise Draining("the relay is draining and accepts no new participants")
        entry = self._entry(room_id)
        if participant_id is not None:
            check_id(participant_id, "participant_id")
        async with self._lock:
            if self.rooms.get(room_id) is not entry:
                raise room_not_found(room_id)
            if participant_id is not None and participant_id in entry.members:
                raise participant_exists(room_id, participant_id)
            room = entry.room
            if len(entry.members) >= room.max_participants:
                raise room_full(room_id, room.max_participants)
            worker = self._place(entry)
            new_shard = worker.index not in entry.shards
            if new_shard:
                await self._call(
                    worker,
                    "create_room",
                    room_id=room_id,
                    max_participants=room.max_participants,
                    e2ee_required=room.e2ee_required,
                    empty_timeout=SHARD_EMPTY_TIMEOUT,
                    codec_preference=list(room.codec_preference),
                )
                entry.shards.add(worker.index)
            try:
                participant = await self._call(
                    worker,
                    "add_participant",
                    room_id=room_id,
                    participant_id=participant_id,
                    metadata=metadata,
                    can_publish=can_publish,
                    can_subscribe=can_subscribe,
                    auto_subscribe=auto_subscribe,
                    e2ee=e2ee,
                )
            except SfuError:
                if new_shard:
                    self._job(self._close_shard(room_id, worker.index))
                raise
            entry.members[participant["participant_id"]] = worker.index
            room.empty_since = None
            if new_shard:
                # the room's tracks are on the new shard before the participant's first
                # subscriber offer, which then carries them all
                try:
                    await self._pipes_to(room_id, worker.index)
                except SfuError as exc:
                    log.warning(
                        "room %s: piping to worker %d failed: %s", room_id, worker.index, exc
                    )
        return {**participant, "worker": worker.index}

    async def _pipes_to(self, room_id: str, target: int) -> None:
        """Every track of the room published elsewhere, piped to a new shard on ``target``."""
        entry = self.rooms.get(room_id)
        if entry is None:
            return
        for track_id, (where, _publisher) in list(entry.tracks.items()):
            if where != target:
                await self._pipe(room_id, track_id, where, target)

    async def get_participant(self, room_id: str, participant_id: str) -> dict[str, Any]:
        worker = self._member(room_id, participant_id)
        result = await self._call(
            worker, "get_participant", room_id=room_id, participant_id=participant_id
        )
        return {**result, "worker": worker.index}

    async def _on_member(
        self, method: str, room_id: str, participant_id: str, **params: Any
    ) -> Any:
        """``method`` of the SFU core, called on the worker that holds the participant."""
        worker = self._member(room_id, participant_id)
        return await self._call(
            worker, method, room_id=room_id, participant_id=participant_id, **params
        )

    async def remove_participant(self, room_id: str, participant_id: str, reason: str) -> None:
        await self._on_member("remove_participant", room_id, participant_id, reason=reason)

    async def publisher_offer(
        self, room_id: str, participant_id: str, sdp: str, e2ee: bool = False
    ) -> str:
        answer: str = await self._on_member(
            "publisher_offer", room_id, participant_id, sdp=sdp, e2ee=e2ee
        )
        return answer

    async def moderate_track(
        self, room_id: str, participant_id: str, track_id: str, muted: bool
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._on_member(
            "moderate_track", room_id, participant_id, track_id=track_id, muted=muted
        )
        # the workers its track is piped to stop (and restart) their own subscribers; a pipe
        # set up later carries the state in its description
        entry = self._entry(room_id)
        source = entry.members.get(participant_id)
        for tid, origin, target in sorted(entry.pipes):
            if tid != track_id or origin != source:
                continue
            try:
                await self._call(
                    self.handles[target],
                    "moderate_track",
                    room_id=room_id,
                    participant_id=participant_id,
                    track_id=track_id,
                    muted=muted,
                )
            except SfuError as exc:
                log.warning("room %s: muting on worker %d failed: %s", room_id, target, exc)
        return result

    async def subscriber_offer(self, room_id: str, participant_id: str) -> tuple[str, int]:
        sdp, revision = await self._on_member("subscriber_offer", room_id, participant_id)
        return sdp, revision

    async def subscriber_answer(
        self, room_id: str, participant_id: str, sdp: str, revision: int
    ) -> None:
        await self._on_member(
            "subscriber_answer", room_id, participant_id, sdp=sdp, revision=revision
        )

    async def set_subscription_preferences(
        self, room_id: str, participant_id: str, track_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._on_member(
            "set_subscription_preferences",
            room_id,
            participant_id,
            track_id=track_id,
            changes=changes,
        )
        return result

    async def participant_stats(self, room_id: str, participant_id: str) -> dict[str, Any]:
        stats: dict[str, Any] = await self._on_member("participant_stats", room_id, participant_id)
        return stats

    async def viewer_offer(
        self,
        room_id: str,
        participant_id: str,
        sdp: str,
        publisher_id: str | None = None,
        track_id: str | None = None,
    ) -> str:
        answer: str = await self._on_member(
            "viewer_offer",
            room_id,
            participant_id,
            sdp=sdp,
            publisher_id=publisher_id,
            track_id=track_id,
        )
        return answer

    async def ice_restart(
        self, room_id: str, participant_id: str, connection: str, ufrag: str, pwd: str
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._on_member(
            "ice_restart", room_id, participant_id, connection=connection, ufrag=ufrag, pwd=pwd
        )
        return result

    # -- recording: the worker holding a track's publisher writes it -----------------------
    async def record_track(
        self, room_id: str, track_id: str, recording_id: str, path_base: str
    ) -> dict[str, Any]:
        entry = self._entry(room_id)
        where = entry.tracks.get(track_id)
        if where is None:
            raise NotFound(
                f"no track {track_id} published in room {room_id}", code="track_not_found"
            )
        index = where[0]
        result: dict[str, Any] = await self._call(
            self.handles[index],
            "record_track",
            room_id=room_id,
            track_id=track_id,
            recording_id=recording_id,
            path_base=path_base,
        )
        self._recording_taps[(recording_id, track_id)] = index
        return result

    async def stop_track_recording(
        self, room_id: str, track_id: str, recording_id: str
    ) -> dict[str, Any] | None:
        index = self._recording_taps.pop((recording_id, track_id), None)
        if index is None:
            return None
        result: dict[str, Any] | None = await self._call_quietly(
            self.handles[index],
            "stop_track_recording",
            room_id=room_id,
            track_id=track_id,
            recording_id=recording_id,
        )
        return result

    def set_recording_failure_handler(
        self, handler: Callable[[dict[str, Any]], None] | None
    ) -> None:
        """Who hears that a worker's writer gave up on a recording file."""
        self._recording_failure = handler

    def _recording_failed(self, worker: WorkerHandle, params: dict[str, Any]) -> None:
        key = (params.get("recording_id"), params.get("track_id"))
        if self._recording_taps.get(key) == worker.index:  # type: ignore[arg-type]
            del self._recording_taps[key]  # type: ignore[arg-type]
        handler = self._recording_failure
        if handler is not None:
            try:
                handler(params)
            except Exception:
                log.exception("recording failure handler failed")

    async def workers(self) -> list[dict[str, Any]]:
        counts = {w.index: 0 for w in self.handles}
        for entry in self.rooms.values():
            for index in entry.members.values():
                counts[index] += 1
        return [
            {
                "index": w.index,
                "pid": w.pid,
                "state": w.state,
                "media_port": w.media_port,
                "participants": counts[w.index],
                "rooms": sum(1 for e in self.rooms.values() if w.index in e.shards),
                "packet_rate": w.packet_rate,
                "cpu": w.cpu,
                "restarts": w.restarts,
            }
            for w in self.handles
        ]

    async def metrics_text(self, own: str) -> str:
        """The front's own series (``own``) and every ready worker's, merged by family: the
        room directory's families are the front's, the media families the workers', each
        sample with a ``worker`` label."""
        ready = [w for w in self.handles if w.state == "ready"]
        texts = await asyncio.gather(
            *(self._call_quietly(w, "metrics") for w in ready), return_exceptions=True
        )
        return merge_metrics(
            own,
            [(str(w.index), t) for w, t in zip(ready, texts, strict=True) if isinstance(t, str)],
        )


#: Families the front process reports for the whole relay (the workers' own are dropped).
FRONT_FAMILIES = frozenset(
    {
        "relay_rooms",
        "relay_participants",
        "relay_workers_ready",
        "relay_worker_restarts_total",
        "relay_events_dropped_total",
    }
)


def _label(line: str, worker: str) -> str:
    """A sample line with ``worker="..."`` as its first label."""
    name, sep, rest = line.partition("{")
    if sep:
        return f'{name}{{worker="{worker}",{rest}'
    name, _, value = line.partition(" ")
    return f'{name}{{worker="{worker}"}} {value}'


def _families(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """Prometheus text by family: (HELP and TYPE lines, sample lines), in order."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    family = ""
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                family = parts[2]
                families.setdefault(family, ([], []))[0].append(line)
            continue
        families.setdefault(family, ([], []))[1].append(line)
    return families


def merge_metrics(own: str, workers: list[tuple[str, str]]) -> str:
    """One exposition of the front's text and the workers' (index, text): each family once;
    a family of :data:`FRONT_FAMILIES` or that no worker reports keeps the front's samples,
    any other the workers', each labelled ``worker="<index>"``."""
    front = _families(own)
    merged: dict[str, tuple[list[str], list[str]]] = {}
    for index, text in workers:
        for family, (head, samples) in _families(text).items():
            if family in FRONT_FAMILIES:
                continue
            entry = merged.setdefault(family, (head, []))
            entry[1].extend(_label(line, index) for line in samples)
    out: list[str] = []
    for family, (head, samples) in front.items():
        if family in merged and family not in FRONT_FAMILIES:
            continue
        out.extend(head)
        out.extend(samples)
    for head, samples in merged.values():
        out.extend(head)
        out.extend(samples)
    return "\n".join(out) + ("\n" if out else "")
