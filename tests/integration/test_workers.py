"""Calls through `relay serve` with two worker processes (``[workers] count = 2``, spread
placement): aiortc participants on both workers decode each other (media between the workers
goes over their pipe sockets); a worker SIGKILLed during a call costs only its own
participants, is restarted and takes new participants; SIGTERM of the front process leaves no
worker behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay import scheduling
from tests.integration.clients import CallClient, wait_for
from tests.integration.conftest import (
    EventListener,
    RunningRelay,
    api_client,
    auth_headers,
    new_room,
    spawn_relay,
    start_relay,
    stop_relay,
    wait_healthy,
    wait_until,
    write_config,
)
from tests.integration.test_calls import _close, _decodes, _start

pytestmark = pytest.mark.integration

WORKERS = 2
#: Set explicitly: a failed worker's participants must be told well before consent would
#: have timed them out.
CONSENT_TIMEOUT = 10.0
CONFIG = (
    f'[workers]\ncount = {WORKERS}\nplacement = "spread"\n'
    f"[session]\nconsent_timeout = {CONSENT_TIMEOUT}\n"
)
EVERYONE = ["red", "green", "blue", "yellow"]
#: The longest gap between two decoded frames of a surviving publisher, after the kill.
MAX_FREEZE = 1.0
#: How long the survivors' video is watched after the kill.
WATCH = 3.0


def read_workers(relay: RunningRelay) -> list[dict]:
    """``GET /v1/workers``, by index."""
    r = httpx.get(f"{relay.api}/v1/workers", headers=auth_headers(relay.key), timeout=5)
    assert r.status_code == 200, r.text
    return sorted(r.json()["workers"], key=lambda w: w["index"])


def wait_workers_ready(relay: RunningRelay, timeout: float = 20.0) -> list[dict]:
    """The workers once all WORKERS of them are ready."""
    deadline = time.monotonic() + timeout
    workers: list[dict] = []
    while time.monotonic() < deadline:
        workers = read_workers(relay)
        if len(workers) == WORKERS and all(w["state"] == "ready" for w in workers):
            return workers
        time.sleep(0.1)
    raise AssertionError(f"workers not ready after {timeout} s: {workers}\n{relay.log()[-3000:]}")


def process_state(pid: int) -> str | None:
    """The state letter of a process (``Z``: exited, not reaped), None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


def running(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def assert_worker_process(relay: RunningRelay, worker: dict) -> None:
    """The pid /v1/workers reports is a live worker process, a child of the front."""
    pid = worker["pid"]
    assert running(pid), worker
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "relay.workers.worker" in cmdline, (worker, cmdline)
    assert parent(pid) == relay.process.pid, (worker, parent(pid), relay.process.pid)


async def placement(http: httpx.AsyncClient, room: str) -> dict[str, int]:
    """participant id -> index of the worker holding it, from the room's participant dicts."""
    r = await http.get(f"/v1/rooms/{room}")
    assert r.status_code == 200, r.text
    return {p["participant_id"]: p["worker"] for p in r.json()["participants"]}


async def explain(http: httpx.AsyncClient, room: str, clients: list[CallClient]) -> None:
    """Print what each client decoded, the room as the relay lists it and the pipes'
    counters (on a failure)."""
    for c in clients:
        received = c.received
        print(f"{c.participant_id}: frames {received.frames} tones {received.tones}")
    r = await http.get(f"/v1/rooms/{room}")
    for p in r.json().get("participants", []):
        tracks = [(t["participant_id"], t["kind"]) for t in p["tracks"]]
        print(f"{p['participant_id']} on worker {p.get('worker')}: state {p['state']}")
        print(f"  tracks {tracks}\n  subscriptions {p['subscriptions']}")
    metrics = (await http.get("/metrics")).text.splitlines()
    pipe = [
        line
        for line in metrics
        if ("pipe" in line or "dropped" in line)
        and not line.startswith("#")
        and not line.endswith(" 0")
    ]
    print("pipe metrics:", *pipe, sep="\n  ")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRelay]:
    running_relay = start_relay(tmp_path_factory.mktemp("workers"), CONFIG, media_ports=WORKERS)
    try:
        wait_workers_ready(running_relay)
        yield running_relay
    finally:
        stop_relay(running_relay)


async def test_four_party_call_across_two_workers(relay: RunningRelay) -> None:
    workers = wait_workers_ready(relay)
    for worker in workers:
        assert_worker_process(relay, worker)
    assert [w["media_port"] for w in workers] == [relay.media_port + i for i in range(WORKERS)]
    room = new_room(relay, "workers")
    clients = await _start(relay, room, EVERYONE)
    try:
        async with api_client(relay) as http:
            placed = await placement(http, room)
        print(f"placement: {placed}")
        assert set(placed) == set(EVERYONE), placed
        assert set(placed.values()) == set(range(WORKERS)), placed
        everyone = set(EVERYONE)
        assert await wait_for(
            lambda: all(_decodes(c, everyone - {c.identity}) for c in clients), 45
        ), (
            [(c.identity, c.received.frames, c.received.tones) for c in clients],
            relay.log()[-3000:],
        )
        for c in clients:
            assert c.identity not in c.received.frames
            assert c.identity not in c.received.tones
        workers = read_workers(relay)
        assert sum(w["participants"] for w in workers) == len(EVERYONE), workers
        assert all(w["participants"] > 0 for w in workers), workers
        # the media between the workers went over their pipes, both ways
        metrics = relay.metrics()
        for i in range(WORKERS):
            assert metrics[f'relay_pipe_packets_received_total{{worker="{i}"}}'] > 0, metrics
    finally:
        await _close(clients)


async def test_worker_killed_during_a_call(relay: RunningRelay) -> None:
    wait_workers_ready(relay)
    room = new_room(relay, "workers")
    clients: list[CallClient] = []
    async with api_client(relay) as http, EventListener(relay, room) as events:
        try:
            clients += await _start(relay, room, EVERYONE)
            placed = await placement(http, room)
            by_worker = {i: [p for p, w in placed.items() if w == i] for i in range(WORKERS)}
            assert all(by_worker.values()), placed
            # kill the worker with fewer participants: at least two survive, to watch
            victim = min(by_worker, key=lambda i: len(by_worker[i]))
            killed = set(by_worker[victim])
            survivors = [c for c in clients if c.participant_id not in killed]
            assert len(survivors) >= 2, placed
            everyone = set(EVERYONE)
            assert await wait_for(
                lambda: all(_decodes(c, everyone - {c.identity}) for c in clients), 45
            ), [(c.identity, c.received.frames, c.received.tones) for c in clients]

            worker = read_workers(relay)[victim]
            assert worker["state"] == "ready", worker
            assert_worker_process(relay, worker)
            print(f"placement {placed}: SIGKILL worker {victim} (pid {worker['pid']})")
            killed_at = time.monotonic()
            os.kill(worker["pid"], signal.SIGKILL)

            # its participants are told, well within the consent timeout
            for pid in sorted(killed):
                remaining = CONSENT_TIMEOUT - (time.monotonic() - killed_at)
                left = await events.wait_for("participant.left", remaining, participant_id=pid)
                assert left is not None, (pid, events.events, relay.log()[-3000:])
                assert left["reason"] == "worker_failed", left
            told = time.monotonic() - killed_at
            print(f"participant.left (worker_failed) for {sorted(killed)} after {told:.2f} s")
            assert told <= CONSENT_TIMEOUT

            # the others keep decoding each other without a freeze
            await asyncio.sleep(max(0.0, killed_at + WATCH - time.monotonic()))
            names = {c.identity for c in survivors}
            freezes = {
                (c.identity, n): round(
                    c.received.longest_freeze(n, killed_at, killed_at + WATCH), 2
                )
                for c in survivors
                for n in names - {c.identity}
            }
            print(f"longest freeze of each survivor's video in {WATCH} s after the kill: {freezes}")
            assert all(f <= MAX_FREEZE for f in freezes.values()), freezes
            # nobody else left, and each of them once
            gone = [e["participant_id"] for e in events.events if e["type"] == "participant.left"]
            assert sorted(gone) == sorted(killed), events.events
            assert set(await placement(http, room)) == {c.participant_id for c in survivors}
            # the surviving worker dropped what it imported from the dead one and stopped
            # exporting to it
            survivor = 1 - victim
            pipes = [f'relay_pipe_{n}{{worker="{survivor}"}}' for n in ("imports", "exports")]

            def pipes_dropped() -> bool:
                metrics = relay.metrics()
                return all(metrics.get(name, -1) == 0 for name in pipes)

            assert await wait_for(pipes_dropped, 5), relay.metrics()

            # the worker comes back: a new process in the same place
            def restarted() -> bool:
                now = read_workers(relay)[victim]
                return now["state"] == "ready" and now["pid"] != worker["pid"]

            assert await wait_for(restarted, 15), (read_workers(relay), relay.log()[-3000:])
            back = read_workers(relay)[victim]
            print(f"worker {victim} ready again after {time.monotonic() - killed_at:.2f} s")
            assert back["restarts"] == 1, back
            assert back["media_port"] == worker["media_port"], back
            assert_worker_process(relay, back)
            assert not running(worker["pid"])

            # ... and takes a new participant, who connects and decodes the survivors (piped
            # from the surviving worker to the restarted one)
            identity = sorted(c.identity for c in clients if c.participant_id in killed)[0]
            newcomer = CallClient(
                relay.api, relay.key, room, identity, participant_id=f"{identity}-again"
            )
            clients.append(newcomer)
            await newcomer.join()
            assert (await placement(http, room))[newcomer.participant_id] == victim
            await newcomer.subscribe()
            await newcomer.publish()
            decoded = await wait_for(lambda: _decodes(newcomer, names), 30)
            if not decoded:
                await explain(http, room, [*survivors, newcomer])
            assert decoded, "the newcomer on the restarted worker: see the captured stdout"
            # The other way, the survivors' worker sends them the newcomer's media. (They
            # cannot decode it: the relay gives the newcomer's tracks the subscriber m-lines
            # the killed participants' tracks freed, same mids, as a single process does, and
            # aiortc learns an m-line's SSRCs only when it first receives on it.)
            r = await http.get(f"/v1/rooms/{room}/participants/{newcomer.participant_id}")
            tracks = {t["track_id"] for t in r.json()["tracks"]}
            assert len(tracks) == 2, r.json()

            async def forwarded() -> dict[str, list[int]]:
                result = {}
                for c in survivors:
                    r = await http.get(f"/v1/rooms/{room}/participants/{c.participant_id}/stats")
                    outbound = r.json()["outbound"]
                    result[c.participant_id] = [
                        s["packets"] for s in outbound if s["track_id"] in tracks
                    ]
                return result

            async def all_forwarded() -> bool:
                counts = await forwarded()
                return all(len(n) == 2 and min(n) >= 30 for n in counts.values())

            assert await wait_until(all_forwarded, 15, interval=0.5), await forwarded()
        finally:
            await _close(clients)


def test_sigterm_leaves_no_worker(tmp_path: Path) -> None:
    """``relay serve --workers 2`` (the command-line flag this time), SIGTERM to the front
    while both workers hold a participant: it exits 0 and none of its workers is left."""
    config, api_port, media_port = write_config(
        tmp_path, '[workers]\nplacement = "spread"\n', media_ports=WORKERS
    )
    spawned = spawn_relay(tmp_path, ["serve", "--config", str(config), "--workers", str(WORKERS)])
    pids: list[int] = []
    try:
        api = f"http://127.0.0.1:{api_port}"
        assert wait_healthy(spawned, api), spawned.stderr()
        relay = RunningRelay(api, media_port, "testkey", spawned.process, spawned.stderr_path)
        workers = wait_workers_ready(relay)
        for worker in workers:
            assert_worker_process(relay, worker)
        pids += [w["pid"] for w in workers]
        # [media] scheduler_slice_us, by default 100, in each worker
        if scheduling.per_thread_slices():
            assert [scheduling.current_slice_us(pid) for pid in pids] == [100] * WORKERS
            assert "scheduler slice 100 µs requested: 100 µs" in relay.log(), relay.log()[-3000:]
        room = new_room(relay, "workers")
        for name in EVERYONE[:WORKERS]:
            r = httpx.post(
                f"{relay.api}/v1/rooms/{room}/participants",
                json={"participant_id": name},
                headers=auth_headers(relay.key),
            )
            assert r.status_code == 201, r.text
        assert [w["participants"] for w in read_workers(relay)] == [1] * WORKERS
        sent_at = time.monotonic()
        code = spawned.stop(signal.SIGTERM, timeout=10)
        elapsed = time.monotonic() - sent_at
        print(f"front exit {code} {elapsed:.2f} s after SIGTERM")
        assert code == 0, relay.log()[-3000:]
        remaining = {pid: process_state(pid) for pid in pids if running(pid)}
        assert not remaining, (remaining, relay.log()[-3000:])
        assert "Traceback" not in relay.log(), relay.log()[-3000:]
    finally:
        spawned.stop(signal.SIGKILL)
        for pid in pids:
            if running(pid):  # a worker the front left behind
                os.kill(pid, signal.SIGKILL)


async def test_a_moderator_mutes_a_track_for_subscribers_on_both_workers(
    relay: RunningRelay,
) -> None:
    """``POST .../tracks/{id}/mute``: the relay stops forwarding the track to its subscribers
    on the publisher's worker and on the other one (the pipe), tells them with
    ``track.muted`` (``by: "moderator"``), and forwards it again after ``/unmute``; the
    others' media keeps flowing throughout."""
    wait_workers_ready(relay)
    room = new_room(relay, "mute")
    names = ["red", "green", "blue"]
    async with api_client(relay) as http, EventListener(relay, room) as events:
        clients = await _start(relay, room, names)
        try:
            placed = await placement(http, room)
            assert set(placed.values()) == set(range(WORKERS)), placed
            red = next(c for c in clients if c.identity == "red")
            watchers = [c for c in clients if c is not red]
            assert {placed[c.participant_id] for c in watchers} == set(range(WORKERS)), placed
            assert await wait_for(
                lambda: all(_decodes(c, set(names) - {c.identity}) for c in clients), 45
            ), [(c.identity, c.received.frames, c.received.tones) for c in clients]
            r = await http.get(f"/v1/rooms/{room}/participants/{red.participant_id}")
            tracks = {t["kind"]: t["track_id"] for t in r.json()["tracks"]}
            base = f"/v1/rooms/{room}/participants/{red.participant_id}/tracks"
            for kind in ("video", "audio"):
                r = await http.post(f"{base}/{tracks[kind]}/mute")
                assert r.status_code == 204, r.text
                muted = await events.wait_for("track.muted", 5, track_id=tracks[kind])
                assert muted is not None and muted["by"] == "moderator", events.events
            await asyncio.sleep(1.0)  # what was in flight arrives
            start = time.monotonic()
            frames = {c.identity: c.received.frames.get("red", 0) for c in watchers}
            tones = {c.identity: c.received.tones.get("red", 0) for c in watchers}
            await asyncio.sleep(2.0)
            end = time.monotonic()
            assert {c.identity: c.received.frames.get("red", 0) for c in watchers} == frames
            assert {c.identity: c.received.tones.get("red", 0) for c in watchers} == tones
            for c in watchers:  # the others' media went on
                other = next(n for n in names if n not in ("red", c.identity))
                assert c.received.frames_between(other, start, end) >= 10, (c.identity, other)
            for kind in ("video", "audio"):
                r = await http.post(f"{base}/{tracks[kind]}/unmute")
                assert r.status_code == 204, r.text
            assert await events.wait_for("track.unmuted", 5, track_id=tracks["video"])
            assert await wait_for(
                lambda: all(
                    c.received.frames.get("red", 0) >= frames[c.identity] + 10
                    and c.received.tones.get("red", 0) > tones[c.identity]
                    for c in watchers
                ),
                15,
            ), [(c.identity, c.received.frames, c.received.tones) for c in watchers]
        finally:
            await _close(clients)
