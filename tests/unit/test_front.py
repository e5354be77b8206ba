"""The front process's room directory, placement, worker failure handling and metrics merge,
without worker processes (relay/workers/front.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relay.config import Settings, WorkerSettings
from relay.metrics import Metrics
from relay.sfu import events
from relay.sfu.errors import Conflict, LimitReached, NotFound, Overloaded
from relay.workers import front
from relay.workers.front import WorkerPool, WorkerUnavailable, merge_metrics


class Bus:
    def __init__(self) -> None:
        self.events: list[events.Event] = []

    def publish(self, event: events.Event) -> None:
        self.events.append(event)


class FakeChannel:
    """Answers the calls the front makes, as a worker would; records them."""

    def __init__(self, index: int, calls: list[tuple[int, str, dict[str, Any]]]) -> None:
        self.index = index
        self.calls = calls
        self.closed = False
        self.pool: WorkerPool | None = None

    async def call(self, method: str, params: dict[str, Any], timeout: float | None = None) -> Any:
        self.calls.append((self.index, method, dict(params)))
        pool = self.pool
        if method == "delete_room" and pool is not None:
            # a worker deleting its shard: its participants leave, then the shard closes
            room_id = params["room_id"]
            entry = pool.rooms.get(room_id)
            for pid in entry.on(self.index) if entry else []:
                left = event(
                    events.ParticipantLeft, room_id, participant_id=pid, reason="room_closed"
                )
                pool._worker_event(pool.handles[self.index], left)
            pool._worker_event(pool.handles[self.index], event(events.RoomClosed, room_id))
        if method == "add_participant":
            return {"participant_id": params["participant_id"], "room_id": params["room_id"]}
        if method == "export_track":
            return {"track_id": params["track_id"]}
        return None

    def close(self) -> None:
        self.closed = True


def make_pool(count: int = 2, placement: str = "spread") -> tuple[WorkerPool, Bus, list[Any]]:
    settings = Settings(workers=WorkerSettings(count=count, placement=placement))
    bus = Bus()
    pool = WorkerPool(settings, bus, Metrics(), count)  # type: ignore[arg-type]
    calls: list[tuple[int, str, dict[str, Any]]] = []
    for handle in pool.handles:
        handle.state = "ready"
        handle.pid = 1000 + handle.index
        handle.pipe_port = 5000 + handle.index
        channel = FakeChannel(handle.index, calls)
        channel.pool = pool
        handle.channel = channel  # type: ignore[assignment]
    return pool, bus, calls


async def run_jobs(pool: WorkerPool) -> None:
    while not pool._jobs.empty():
        job = pool._jobs.get_nowait()
        async with pool._lock:
            await job


async def join(pool: WorkerPool, room: str, *pids: str) -> list[int]:
    placed = []
    for pid in pids:
        participant = await pool.add_participant(room, pid, None, True, True, True)
        placed.append(participant["worker"])
        await run_jobs(pool)
    return placed


def event(cls: type[events.Event], room: str = "r1", **fields: Any) -> dict[str, Any]:
    return cls(room_id=room, at=1.0, **fields).to_dict()


async def test_spread_places_by_load_then_by_participants() -> None:
    pool, _bus, calls = make_pool(2)
    await pool.create_room("r1", None, False, None, None)
    assert await join(pool, "r1", "a", "b", "c", "d") == [0, 1, 0, 1]
    # each worker got its shard of the room once, before its first participant
    creates = [(i, p["empty_timeout"]) for i, m, p in calls if m == "create_room"]
    assert creates == [(0, front.SHARD_EMPTY_TIMEOUT), (1, front.SHARD_EMPTY_TIMEOUT)]
    # a busy worker (forwarding a core's worth of packets) gets no one new
    pool.handles[0].packet_rate = front.PACKETS_PER_CORE
    assert await join(pool, "r1", "e", "f") == [1, 1]
    pool.handles[1].cpu = 1.0
    assert await join(pool, "r1", "g") == [0]  # both busy: the one with fewer participants


async def test_pack_keeps_a_room_on_the_worker_that_holds_it() -> None:
    pool, _bus, _calls = make_pool(2, placement="pack")
    await pool.create_room("r1", None, False, None, None)
    await pool.create_room("r2", None, False, None, None)
    assert await join(pool, "r1", "a", "b", "c") == [0, 0, 0]
    assert await join(pool, "r2", "x", "y") == [1, 1]  # a new room: the least loaded worker


async def test_placement_skips_workers_that_shed_or_failed() -> None:
    pool, _bus, _calls = make_pool(2)
    await pool.create_room("r1", None, False, None, None)
    pool.handles[0].shedding = True
    assert await join(pool, "r1", "a", "b") == [1, 1]
    pool.handles[1].shedding = True
    with pytest.raises(Overloaded):
        await join(pool, "r1", "c")
    pool.handles[0].state = pool.handles[1].state = "starting"
    with pytest.raises(WorkerUnavailable) as info:
        await join(pool, "r1", "c")
    assert info.value.status == 503 and info.value.code == "worker_unavailable"


async def test_room_limits_hold_across_workers() -> None:
    pool, _bus, _calls = make_pool(2)
    await pool.create_room("r1", 3, False, None, None)
    await join(pool, "r1", "a", "b", "c")
    with pytest.raises(LimitReached) as full:
        await join(pool, "r1", "d")
    assert full.value.code == "room_full"
    with pytest.raises(Conflict) as taken:
        await join(pool, "r1", "a")
    assert taken.value.code == "participant_exists"
    with pytest.raises(NotFound):
        await pool.get_participant("r1", "zz")
    with pytest.raises(Conflict):
        await pool.create_room("r1", None, False, None, None)


async def test_a_track_is_piped_to_every_other_shard_and_unpiped_when_it_ends() -> None:
    pool, bus, calls = make_pool(2)
    await pool.create_room("r1", None, False, None, None)
    await join(pool, "r1", "a", "b")  # a on 0, b on 1
    track = {"track_id": "T1", "participant_id": "a", "kind": "video"}
    pool._worker_event(
        pool.handles[0], event(events.TrackPublished, participant_id="a", track=track)
    )
    calls.clear()
    await run_jobs(pool)
    assert [(i, m) for i, m, _ in calls] == [(0, "export_track"), (1, "import_track")]
    assert calls[0][2]["peer"] == ["127.0.0.1", 5001]  # to worker 1's pipe socket
    assert calls[1][2]["peer"] == ["127.0.0.1", 5000]  # from worker 0's
    assert pool.rooms["r1"].pipes == {("T1", 0, 1)}
    # a third participant on worker 0 needs no new pipe
    calls.clear()
    await join(pool, "r1", "c")
    assert [m for _, m, _ in calls] == ["add_participant"]
    pool._worker_event(
        pool.handles[0], event(events.TrackUnpublished, participant_id="a", track_id="T1")
    )
    calls.clear()
    await run_jobs(pool)
    assert [(i, m) for i, m, _ in calls] == [(1, "remove_import")]
    assert pool.rooms["r1"].pipes == set()
    assert [e.type for e in bus.events] == ["track.published", "track.unpublished"]


async def test_a_new_shard_gets_the_rooms_tracks_before_its_first_participant_is_answered() -> None:
    pool, _bus, calls = make_pool(2)
    await pool.create_room("r1", None, False, None, None)
    await join(pool, "r1", "a")  # worker 0
    track = {"track_id": "T1", "participant_id": "a"}
    pool._worker_event(
        pool.handles[0], event(events.TrackPublished, participant_id="a", track=track)
    )
    await run_jobs(pool)
    calls.clear()
    participant = await pool.add_participant("r1", "b", None, True, True, True)
    assert participant["worker"] == 1
    # no job left to run: the import happened within the call, so b's first offer has T1
    assert pool._jobs.empty()
    assert [(i, m) for i, m, _ in calls] == [
        (1, "create_room"),
        (1, "add_participant"),
        (0, "export_track"),
        (1, "import_track"),
    ]


async def test_the_last_participant_of_a_shard_closes_its_pipes_and_the_shard() -> None:
    pool, bus, calls = make_pool(2)
    await pool.create_room("r1", None, False, None, None)
    await join(pool, "r1", "a", "b")
    track = {"track_id": "T1", "participant_id": "a"}
    pool._worker_event(
        pool.handles[0], event(events.TrackPublished, participant_id="a", track=track)
    )
    await run_jobs(pool)
    calls.clear()
    pool._worker_event(
        pool.handles[1], event(events.ParticipantLeft, participant_id="b", reason="left")
    )
    await run_jobs(pool)
    assert [(i, m) for i, m, _ in calls] == [(0, "unexport_track"), (1, "delete_room")]
    assert pool.rooms["r1"].shards == {0}
    # the shard's own room.closed is the front's business, not the clients'
    pool._worker_event(pool.handles[1], event(events.RoomClosed))
    assert [e.type for e in bus.events] == ["track.published", "participant.left"]


async def test_closing_a_room_tells_every_participant_on_every_worker() -> None:
    pool, bus, calls = make_pool(2)
    await pool.create_room("r1", None, False, None, None)
    await join(pool, "r1", "a", "b", "c")
    bus.events.clear()
    calls.clear()
    await pool.delete_room("r1")
    await run_jobs(pool)
    assert sorted((i, m) for i, m, _ in calls) == [(0, "delete_room"), (1, "delete_room")]
    assert [(e.type, getattr(e, "participant_id", None)) for e in bus.events] == [
        ("participant.left", "a"),
        ("participant.left", "c"),
        ("participant.left", "b"),
        ("room.closed", None),
    ]
    assert "r1" not in pool.rooms
    with pytest.raises(NotFound):
        await pool.get_room("r1")


async def test_speaker_changes_are_announced_once_per_room() -> None:
    pool, bus, _calls = make_pool(2)
    await pool.create_room("r1", None, False, None, None)
    await join(pool, "r1", "a", "b")
    for worker in (0, 1, 0):
        pool._worker_event(pool.handles[worker], event(events.SpeakerChanged, participant_id="a"))
    pool._worker_event(pool.handles[1], event(events.SpeakerChanged, participant_id=None))
    assert [(e.type, e.participant_id) for e in bus.events] == [  # type: ignore[attr-defined]
        ("speaker.changed", "a"),
        ("speaker.changed", None),
    ]
    pool._worker_event(pool.handles[0], {"type": "no.such", "room_id": "r1", "at": 1})
    pool._worker_event(pool.handles[0], {"type": "participant.left", "room_id": "r1"})
    assert len(bus.events) == 2


async def test_a_failed_worker_takes_its_participants_and_tracks_away(monkeypatch) -> None:
    pool, bus, calls = make_pool(2)
    monkeypatch.setattr(front, "RESTART_DELAY", 0.0)
    spawned: list[int] = []

    async def spawn(worker: Any) -> None:
        spawned.append(worker.index)

    monkeypatch.setattr(pool, "_spawn", spawn)
    await pool.create_room("r1", None, False, None, None)
    await join(pool, "r1", "a", "b", "c", "d")  # a, c on 0; b, d on 1
    track = {"track_id": "TB", "participant_id": "b"}
    pool._worker_event(
        pool.handles[1], event(events.TrackPublished, participant_id="b", track=track)
    )
    await run_jobs(pool)
    bus.events.clear()
    calls.clear()
    await pool._failed(pool.handles[1], "exited with code -9")
    assert sorted(
        (e.type, e.participant_id, getattr(e, "reason", None))  # type: ignore[attr-defined]
        for e in bus.events
    ) == [
        ("participant.left", "b", "worker_failed"),
        ("participant.left", "d", "worker_failed"),
        ("track.unpublished", "b", None),
    ]
    await run_jobs(pool)
    assert [(i, m, p) for i, m, p in calls] == [(0, "drop_peer", {"peer": ["127.0.0.1", 5001]})]
    entry = pool.rooms["r1"]
    assert set(entry.members) == {"a", "c"} and entry.shards == {0} and not entry.pipes
    assert spawned == [1] and pool.handles[1].restarts == 1
    workers = await pool.workers()
    assert [(w["state"], w["participants"]) for w in workers] == [("ready", 2), ("failed", 0)]
    # a second report of the same failure changes nothing
    await pool._failed(pool.handles[1], "connection lost")
    assert spawned == [1] and len(bus.events) == 3


async def test_a_call_that_times_out_fails_the_worker(monkeypatch) -> None:
    pool, _bus, _calls = make_pool(2)
    failed: list[str] = []

    async def on_failed(worker: Any, reason: str) -> None:
        failed.append(f"{worker.index}: {reason}")

    monkeypatch.setattr(pool, "_failed", on_failed)

    class Silent:
        async def call(self, method: str, params: Any, timeout: float | None = None) -> Any:
            from relay.workers.channel import ChannelTimeout

            raise ChannelTimeout(method, 2.0)

    pool.handles[1].channel = Silent()  # type: ignore[assignment]
    with pytest.raises(WorkerUnavailable):
        await pool._call(pool.handles[1], "load")
    await asyncio.sleep(0)
    assert failed == ["1: no answer to 'load' within 2 s"]


def test_metrics_of_the_workers_merge_by_family_with_a_worker_label() -> None:
    worker = (
        "# HELP relay_rooms Rooms open.\n"
        "# TYPE relay_rooms gauge\n"
        "relay_rooms 1\n"
        "# HELP relay_packets_out_total RTP forwarded.\n"
        "# TYPE relay_packets_out_total counter\n"
        "relay_packets_out_total {n}\n"
        "# HELP relay_forward_latency_seconds Latency.\n"
        "# TYPE relay_forward_latency_seconds histogram\n"
        'relay_forward_latency_seconds_bucket{{le="0.001"}} {n}\n'
        "relay_forward_latency_seconds_count {n}\n"
    )
    own = (
        "# HELP relay_packets_out_total RTP forwarded.\n"
        "# TYPE relay_packets_out_total counter\n"
        "relay_packets_out_total 0\n"
        "# HELP relay_rooms Rooms open.\n"
        "# TYPE relay_rooms gauge\n"
        "relay_rooms 3\n"
    )
    text = merge_metrics(own, [("0", worker.format(n=5)), ("1", worker.format(n=7))])
    assert text.splitlines() == [
        "# HELP relay_rooms Rooms open.",
        "# TYPE relay_rooms gauge",
        "relay_rooms 3",
        "# HELP relay_packets_out_total RTP forwarded.",
        "# TYPE relay_packets_out_total counter",
        'relay_packets_out_total{worker="0"} 5',
        'relay_packets_out_total{worker="1"} 7',
        "# HELP relay_forward_latency_seconds Latency.",
        "# TYPE relay_forward_latency_seconds histogram",
        'relay_forward_latency_seconds_bucket{worker="0",le="0.001"} 5',
        'relay_forward_latency_seconds_count{worker="0"} 5',
        'relay_forward_latency_seconds_bucket{worker="1",le="0.001"} 7',
        'relay_forward_latency_seconds_count{worker="1"} 7',
    ]
    assert merge_metrics("", []) == ""
