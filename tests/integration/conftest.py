"""A real `relay serve` in a subprocess, on free ports, for each test module."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from relay.client.peer import (
    ClientPeer,
    RemoteDescription,
    TrackSpec,
    UdpClientPeer,
    negotiate_publisher,
    negotiate_subscriber,
)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(kind: int, count: int) -> int:
    """The first of ``count`` consecutive free ports (worker i of a multi-worker relay has the
    media port ``[media] port + i``)."""
    for _ in range(100):
        first = free_port(kind)
        with contextlib.ExitStack() as held:
            try:
                for port in range(first + 1, first + count):
                    s = held.enter_context(socket.socket(socket.AF_INET, kind))
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


@dataclass
class RunningRelay:
    api: str
    media_port: int
    key: str
    process: subprocess.Popen
    log_path: Path

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.api}/metrics").text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def api_port(self) -> int:
        return int(self.api.rsplit(":", 1)[1])


def stop_process(
    process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0
) -> int:
    """Signal the process (if still running) and reap it; kill it if it lingers (-9)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return -9
    return process.returncode


def start_relay(
    tmp: Path,
    extra: str = "",
    api: str = "",
    preexec_fn: Callable[[], None] | None = None,
    media_ports: int = 1,
) -> RunningRelay:
    """``relay serve`` with media on loopback only: the test clients (the project's own, bound
    to 127.0.0.1, and aiortc) reach it there without a network namespace.

    ``media_ports``: how many consecutive UDP ports from the media port must be free (one per
    worker process with ``[workers] count``)."""
    api_port = free_port(socket.SOCK_STREAM)
    media_port = free_ports(socket.SOCK_DGRAM, media_ports)
    config = tmp / "relay.toml"
    config.write_text(
        f'[api]\nport = {api_port}\nkeys = ["testkey"]\n{api}\n'
        f'[media]\nhost = "127.0.0.1"\nport = {media_port}\n{extra}\n'
        # one process unless the test asks for workers (their tests set [workers] themselves)
        + ("" if "[workers]" in extra else "[workers]\ncount = 1\n")
    )
    log_path = tmp / "relay.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=preexec_fn,
    )
    log_file.close()
    api = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"relay exited: {log_path.read_text()}")
        try:
            if httpx.get(f"{api}/healthz", timeout=1).status_code == 200:
                return RunningRelay(api, media_port, "testkey", process, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"relay did not start: {log_path.read_text()}")


def stop_relay(relay: RunningRelay, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    return stop_process(relay.process, sig, timeout)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRelay]:
    running = start_relay(tmp_path_factory.mktemp("relay"), extra="")
    yield running
    stop_relay(running)


# --------------------------------------------------------------------------------------------
# Helpers for tests that drive the relay with ClientPeer (relay/client/peer.py), read its metrics,
# follow its events or run it with their own command line.


def auth_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api_client(relay: RunningRelay, timeout: float = 10.0) -> httpx.AsyncClient:
    """An async client for the relay's API, authenticated with its key."""
    return httpx.AsyncClient(base_url=relay.api, headers=auth_headers(relay.key), timeout=timeout)


def parse_metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def read_metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """/metrics of the relay behind ``http``, without blocking the event loop."""
    r = await http.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


async def read_drops(http: httpx.AsyncClient) -> dict[str, float]:
    """``relay_packets_dropped_total`` by reason."""
    prefix = 'relay_packets_dropped_total{reason="'
    return {
        name[len(prefix) : -2]: value
        for name, value in (await read_metrics(http)).items()
        if name.startswith(prefix)
    }


async def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` (sync or async) until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


class EventListener:
    """Collects the SSE events of one room in a background task (``async with``)."""

    def __init__(self, relay: RunningRelay, room_id: str) -> None:
        self.relay = relay
        self.room_id = room_id
        self.events: list[dict] = []
        self.ended = False
        self.error: BaseException | None = None
        self._task = None
        self._subscribed = None

    async def __aenter__(self) -> EventListener:
        self._subscribed = asyncio.Event()
        self._task = asyncio.create_task(self._run())
        waiter = asyncio.create_task(self._subscribed.wait())
        await asyncio.wait({waiter, self._task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not self._subscribed.is_set():
            self._task.cancel()
            raise RuntimeError(f"event stream did not open: {self.error!r}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        try:
            async with httpx.AsyncClient(
                base_url=self.relay.api, headers=auth_headers(self.relay.key), timeout=None
            ) as http:
                async with http.stream(
                    "GET", "/v1/events", params={"room_id": self.room_id}
                ) as stream:
                    stream.raise_for_status()
                    async for line in stream.aiter_lines():
                        # the stream opens with a retry: hint once the subscription exists
                        self._subscribed.set()
                        if line.startswith("data:"):
                            self.events.append(json.loads(line[5:]))
        except httpx.HTTPError as exc:  # the relay went away mid-stream
            self.error = exc
        finally:
            self.ended = True

    def find(self, type_: str, **fields: object) -> dict | None:
        for event in self.events:
            if event.get("type") == type_ and all(event.get(k) == v for k, v in fields.items()):
                return event
        return None

    async def wait_for(self, type_: str, timeout: float, **fields: object) -> dict | None:
        await wait_until(lambda: self.find(type_, **fields) is not None or self.ended, timeout)
        return self.find(type_, **fields)

    async def wait_ended(self, timeout: float) -> bool:
        return await wait_until(lambda: self.ended, timeout)


def write_config(tmp: Path, extra: str = "", media_ports: int = 1) -> tuple[Path, int, int]:
    """A config like start_relay's, on fresh free ports: (path, api port, media port)."""
    api_port = free_port(socket.SOCK_STREAM)
    media_port = free_ports(socket.SOCK_DGRAM, media_ports)
    config = tmp / "relay.toml"
    config.write_text(
        f'[api]\nport = {api_port}\nkeys = ["testkey"]\n'
        f'[media]\nhost = "127.0.0.1"\nport = {media_port}\n{extra}\n'
        # one process unless the test asks for workers (their tests set [workers] themselves)
        + ("" if "[workers]" in extra else "[workers]\ncount = 1\n")
    )
    return config, api_port, media_port


@dataclass
class SpawnedRelay:
    """A ``relay`` process with stdout and stderr in separate files."""

    process: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the process (if still running) and reap it; kill it if it lingers."""
        return stop_process(self.process, sig, timeout)


def spawn_relay(tmp: Path, args: list[str], env: dict[str, str] | None = None) -> SpawnedRelay:
    """Run ``python -m relay <args>``; the environment's RELAY_* variables are removed."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    base["PYTHONUNBUFFERED"] = "1"
    base.update(env or {})
    stdout_path, stderr_path = tmp / "stdout.log", tmp / "stderr.log"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", *args], stdout=out, stderr=err, env=base
        )
    return SpawnedRelay(process, stdout_path, stderr_path)


def wait_healthy(spawned: SpawnedRelay, api: str, timeout: float = 20.0) -> bool:
    """True once GET /healthz answers 200; False if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if spawned.process.poll() is not None:
            return False
        try:
            if httpx.get(f"{api}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


_room_numbers = itertools.count()


def room_name(prefix: str = "room") -> str:
    """A room id no other test of this run uses: ``prefix`` and a number."""
    return f"{prefix}{next(_room_numbers)}"


def new_room(relay: RunningRelay, prefix: str = "room") -> str:
    """Create a room with a fresh name (see :func:`room_name`) and return its id."""
    name = room_name(prefix)
    r = httpx.post(f"{relay.api}/v1/rooms", json={"room_id": name}, headers=auth_headers(relay.key))
    assert r.status_code == 201, r.text
    return name


async def add_room(http: httpx.AsyncClient, room_id: str) -> None:
    r = await http.post("/v1/rooms", json={"room_id": room_id})
    assert r.status_code == 201, r.text


async def add_participant(http: httpx.AsyncClient, room_id: str, participant_id: str) -> None:
    r = await http.post(
        f"/v1/rooms/{room_id}/participants", json={"participant_id": participant_id}
    )
    assert r.status_code == 201, r.text


@asynccontextmanager
async def peer_publisher(
    http: httpx.AsyncClient,
    room_id: str,
    participant_id: str,
    tracks: list[TrackSpec],
    setup: str = "actpass",
) -> AsyncIterator[UdpClientPeer]:
    """A ClientPeer participant that joined, published ``tracks`` and connected."""
    await add_participant(http, room_id, participant_id)
    peer = ClientPeer()
    remote = await negotiate_publisher(http, room_id, participant_id, peer, tracks, setup=setup)
    async with UdpClientPeer.connect(peer, remote.address) as udp:
        await udp.connected(timeout=15)
        yield udp


@asynccontextmanager
async def peer_subscriber(
    http: httpx.AsyncClient, room_id: str, participant_id: str, setup: str = "active"
) -> AsyncIterator[tuple[UdpClientPeer, RemoteDescription]]:
    """A ClientPeer participant that joined, answered its subscriber offer and connected."""
    await add_participant(http, room_id, participant_id)
    peer = ClientPeer()
    remote = await negotiate_subscriber(http, room_id, participant_id, peer, setup=setup)
    async with UdpClientPeer.connect(peer, remote.address) as udp:
        await udp.connected(timeout=15)
        yield udp, remote


class RtpSender:
    """Sends RTP for every track of a connected publisher at a steady pace (``async with``)."""

    def __init__(
        self, udp: UdpClientPeer, tracks: list[TrackSpec], interval: float = 0.02, size: int = 120
    ) -> None:
        self.udp = udp
        self.tracks = tracks
        self.interval = interval
        self.payload = bytes(range(256))[:size]
        # video payloads read as the first packet of a VP8 keyframe (descriptor S=1, payload
        # header P=0), so that a new subscription starts on the very next packet
        self.video_payload = b"\x10\x00\x9d\x01\x2a" + self.payload[5:]
        self.seq = {t.ssrc: 1000 for t in tracks}
        self.sent = 0
        self.errors: list[BaseException] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> RtpSender:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while True:
            for t in self.tracks:
                seq = self.seq[t.ssrc]
                self.seq[t.ssrc] = seq + 1
                step = 960 if t.kind == "audio" else 3000
                try:
                    payload = self.payload if t.kind == "audio" else self.video_payload
                    self.udp.send_rtp(t.ssrc, t.payload_type, seq, seq * step, payload)
                    self.sent += 1
                except Exception as exc:  # a closed peer: keep the reason for the test
                    self.errors.append(exc)
                    return
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * self.interval - loop.time()))
