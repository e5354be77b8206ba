"""Scenarios run against one server under test, from the load generator's process.

The server runs in its own process pinned to core 0; this process (signalling, sending,
receiving, statistics) is pinned to core 1. A scenario sets every connection up through the
system's signalling and a real ICE/DTLS/SRTP handshake, starts sending, lets the system
settle, and then measures one window (a ramp measures one window per step).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import profile
from bench.common import cpu_seconds, machine_busy_seconds, memory, percentiles, threads
from bench.loadgen import (
    Conn,
    MediaSpec,
    Sender,
    SendStream,
    WindowMarks,
    mark,
    window_stats,
)
from bench.servers import Server
from bench.systems import SYSTEMS, RelaySystem, System
from relay.client.peer import TrackSpec
from relay.rtc.dtls import Certificate

#: Quantiles (percent) kept for latency CDF plots.
CDF_QUANTILES = np.concatenate(
    [np.arange(0, 99, 1.0), np.arange(99, 99.9, 0.1), [99.9, 99.95, 99.99, 100.0]]
)
GRACE = 0.5  # seconds to wait after a window for packets still in flight
#: A window during which other processes used more than this (in cores) is measured again,
#: at most RETRIES times, after waiting up to QUIET_WAIT seconds for the machine to calm down.
MAX_BACKGROUND = 0.3
RETRIES = 2
QUIET_WAIT = 45.0
CONNECT_TIMEOUT = 30.0
PARALLEL_HANDSHAKES = 8

Progress = Callable[[str, float | None], None]


def _no_progress(message: str, fraction: float | None = None) -> None:
    return None


@dataclass
class Scenario:
    """One load: rooms of publishers (and pure subscribers) sending the same media."""

    name: str
    rooms: int = 1
    publishers: int = 1  # per room
    subscribers: int = 0  # pure subscribers per room
    group: bool = False  # publishers also subscribe to the other publishers of their room
    media: tuple[MediaSpec, ...] = field(
        default_factory=lambda: (MediaSpec.audio(), MediaSpec.video())
    )
    settle: float = 2.0
    duration: float = 5.0
    codec_frames: list[list[bytes]] | None = None  # real VP8 instead of stamped filler

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("codec_frames")
        out["codec"] = "vp8 (real frames)" if self.codec_frames is not None else "stamped filler"
        out["media"] = [
            {
                "kind": m.kind,
                "size_bytes": m.size,
                "packets_per_second": round(m.packets_per_second, 2),
                "bitrate_bps": round(m.bitrate),
            }
            for m in self.media
        ]
        out["publisher_bitrate_bps"] = round(sum(m.bitrate for m in self.media))
        return out


class Run:
    """Connections, streams and measurement against one running server."""

    def __init__(
        self,
        server: Server,
        progress: Progress = _no_progress,
        profile_dir: Path | None = None,
        retries: int = RETRIES,
    ) -> None:
        self.server = server
        self.retries = retries
        self.profile_dir = profile_dir
        self.system: System = SYSTEMS[server.name](server)
        self.progress = progress
        self.certificate = None if self.system.plain else Certificate.generate()
        self.conns: list[Conn] = []
        self.receivers: list[Conn] = []
        self.streams: list[SendStream] = []
        self.sender: Sender | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._semaphore = asyncio.Semaphore(PARALLEL_HANDSHAKES)
        self._next_ssrc = random.Random(7).randrange(1 << 20, 1 << 30)
        self.setup_seconds = 0.0
        self.last_marks: WindowMarks | None = None  # of the last window measured

    async def __aenter__(self) -> Run:
        await self.system.open()
        self._ticker = asyncio.create_task(self._tick(), name="ticker")
        self.sender = Sender()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.sender is not None:
            await self.sender.stop()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for conn in self.conns:
            conn.close()
        with contextlib.suppress(Exception):
            await self.system.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            for conn in self.conns:
                conn.tick()

    def _conn(self, name: str, stamped: bool) -> Conn:
        conn = Conn(
            name,
            self.certificate,
            plain=self.system.plain,
            stamped=stamped,
            host=self.system.bind_host,
        )
        self.conns.append(conn)
        return conn

    async def _connected(self, conn: Conn) -> None:
        if self.system.plain:
            await asyncio.sleep(0.05)
            return
        await conn.connected(CONNECT_TIMEOUT)

    # -- setup --------------------------------------------------------------------------
    async def add_publisher(self, scenario: Scenario, room: str, who: str) -> list[SendStream]:
        conn = self._conn(f"{who}/pub", stamped=scenario.codec_frames is None)
        specs = []
        tracks = []
        for i, spec in enumerate(scenario.media):
            self._next_ssrc += 1
            tracks.append(TrackSpec(spec.kind, self._next_ssrc, str(i)))
            specs.append(spec)
        async with self._semaphore:
            await self.system.publish(room, who, conn, tracks)
            await self._connected(conn)
        streams = []
        for track, spec in zip(tracks, specs, strict=True):
            stream = SendStream(
                len(self.streams),
                conn,
                spec,
                track.ssrc,
                mid=track.mid,
                frames=scenario.codec_frames,
            )
            stream.room = room  # type: ignore[attr-defined]
            stream.who = who  # type: ignore[attr-defined]
            self.streams.append(stream)
            streams.append(stream)
        return streams

    async def add_subscriber(
        self, scenario: Scenario, room: str, who: str, publishers: Sequence[str]
    ) -> Conn:
        conn = self._conn(f"{who}/sub", stamped=scenario.codec_frames is None)
        async with self._semaphore:
            await self.system.subscribe(room, who, conn, publishers)
            await self._connected(conn)
        conn.room = room  # type: ignore[attr-defined]
        conn.who = who  # type: ignore[attr-defined]
        self.receivers.append(conn)
        for stream in self.streams:
            if stream.room == room and stream.who != who:  # type: ignore[attr-defined]
                stream.receivers.append(conn)
        return conn

    async def setup(self, scenario: Scenario) -> None:
        started = time.monotonic()
        total = scenario.rooms * (
            scenario.publishers * (2 if scenario.group else 1) + scenario.subscribers
        )
        done = 0

        def step(what: str) -> None:
            nonlocal done
            done += 1
            self.progress(f"{self.system.name}: {what}", done / max(total, 1))

        for r in range(scenario.rooms):
            room = f"{scenario.name}-{r}"
            await self.system.create_room(room, scenario.publishers + scenario.subscribers + 1)
            pubs = [f"p{r}-{i}" for i in range(scenario.publishers)]
            subs = [f"s{r}-{i}" for i in range(scenario.subscribers)]
            for who in pubs:
                await self.system.join(room, who, True, scenario.group)
            for who in subs:
                await self.system.join(room, who, False, True)

            async def publish(who: str, room: str = room) -> None:
                await self.add_publisher(scenario, room, who)
                step("publishers connected")

            await asyncio.gather(*(publish(w) for w in pubs))

            async def subscribe(who: str, room: str = room, pubs: list[str] = pubs) -> None:
                await self.add_subscriber(scenario, room, who, pubs)
                step("subscribers connected")

            listeners = (pubs if scenario.group else []) + subs
            await asyncio.gather(*(subscribe(w) for w in listeners))
        self.setup_seconds = time.monotonic() - started

    def start_sending(self) -> None:
        assert self.sender is not None
        rng = random.Random(11)
        for stream in self.streams:
            if stream not in self.sender.streams:
                self.sender.add(stream, rng.random() * stream.interval)
        if self.sender._task is None:
            self.sender.start()

    # -- measuring ----------------------------------------------------------------------
    async def quiet(self, max_wait: float, threshold: float = MAX_BACKGROUND) -> float:
        """Wait (sending on) until other processes use less than ``threshold`` of a core."""
        deadline = time.monotonic() + max_wait
        server = self.server
        while True:
            busy0, cpu0, gen0 = (
                machine_busy_seconds(),
                server.cpu_seconds(),
                cpu_seconds(os.getpid()),
            )
            await asyncio.sleep(2.0)
            busy1, cpu1, gen1 = (
                machine_busy_seconds(),
                server.cpu_seconds(),
                cpu_seconds(os.getpid()),
            )
            background = max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (gen1 - gen0)) / 2.0
            if background < threshold or time.monotonic() >= deadline:
                return background

    async def measure_quietly(self, duration: float) -> dict[str, Any]:
        """:meth:`measure`, repeated (after waiting for quiet) while other processes on the
        machine took more than ``MAX_BACKGROUND`` of a core during the window."""
        for attempt in range(1, self.retries + 2):
            result = await self.measure(duration)
            result["attempts"] = attempt
            result["disturbed"] = result["background_cpu_fraction"] > MAX_BACKGROUND
            if not result["disturbed"] or attempt > self.retries:
                return result
            self.progress(f"{self.system.name}: machine busy, measuring again", None)
            await self.quiet(QUIET_WAIT)
        return result

    async def measure(self, duration: float) -> dict[str, Any]:
        """One measurement window over every stream and receiver set up so far."""
        pid = self.server.pid
        relay = self.system if isinstance(self.system, RelaySystem) else None
        for conn in self.receivers:
            conn.rec.clear()
        metrics0 = await relay.metrics() if relay else {}
        lags: list[float] = []
        marks = WindowMarks()
        rx0 = sum(c.rec.packets for c in self.receivers)
        late0 = self.sender.late if self.sender else 0
        gen0 = cpu_seconds(os.getpid())
        busy0 = machine_busy_seconds()
        # the server's whole process tree (a relay with workers: the front and every worker)
        pids = self.server.pids()
        cpu0 = self.server.cpu_by_pid(pids)
        sleeps0 = self.server.sleeps_by_pid(pids) if len(pids) > 1 else {}
        t0 = time.monotonic()
        marks.start = mark(self.streams)
        spy = None
        if self.profile_dir is not None and relay is not None:
            if profile.available() is not None:
                raise RuntimeError(profile.available())
            raw = self.profile_dir / f"relay-{int(t0 * 1000)}.txt"
            spy = profile.start(pid, duration, raw)
        end = t0 + duration
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(left, 1.0))
            self.progress(
                f"{self.system.name}: measuring", 1 - max(0.0, end - time.monotonic()) / duration
            )
        marks.end = mark(self.streams)
        cpu1 = self.server.cpu_by_pid(pids)
        sleeps1 = self.server.sleeps_by_pid(pids) if len(pids) > 1 else {}
        t1 = time.monotonic()
        busy1 = machine_busy_seconds()
        gen1 = cpu_seconds(os.getpid())
        rx1 = sum(c.rec.packets for c in self.receivers)
        mem = memory(pid)
        nthreads = threads(pid)
        if relay:
            metrics1 = await relay.metrics()
            lags.append(
                max(
                    (
                        v
                        for k, v in metrics1.items()
                        if metric_series(k)[0] == "relay_event_loop_lag_seconds"
                    ),
                    default=0.0,
                )
            )
        await asyncio.sleep(GRACE)
        stats = window_stats(self.streams, self.receivers, marks)
        self.last_marks = marks
        wall = t1 - t0
        cpu_by_pid = {p: cpu1[p] - cpu0[p] for p in pids if p in cpu0 and p in cpu1}
        server_cpu = sum(cpu_by_pid.values())
        sent = sum(marks.end[s.sid] - marks.start[s.sid] for s in self.streams)
        stamped = any(c.stamped for c in self.receivers)
        forwarded = stats["received"] if stamped else rx1 - rx0
        lat = stats.pop("latency_ns")
        result: dict[str, Any] = {
            "system": self.system.name,
            "window_s": round(wall, 3),
            "connections": len(self.conns),
            "receivers": len(self.receivers),
            "streams": len(self.streams),
            "sent_packets": int(sent),
            **stats,
            "forwarded_packets": int(forwarded),
            "forwarded_pps": forwarded / wall if wall else 0.0,
            "server_cpu_s": server_cpu,
            "server_cpu_fraction": server_cpu / wall if wall else 0.0,
            "cpu_per_packet_us": server_cpu / forwarded * 1e6 if forwarded else None,
            "packets_per_cpu_second": forwarded / server_cpu if server_cpu > 0 else None,
            "generator_cpu_fraction": (gen1 - gen0) / wall if wall else 0.0,
            # everything else that ran on this machine meanwhile (other processes), in cores
            "background_cpu_fraction": max(
                0.0, (busy1 - busy0 - server_cpu - (gen1 - gen0)) / wall if wall else 0.0
            ),
            "generator_late_frames": (self.sender.late if self.sender else 0) - late0,
            "server_memory": mem,
            "server_threads": nthreads,
            "server_processes": len(pids),
            "setup_s": round(self.setup_seconds, 2),
        }
        if not stamped:
            for key in ("received", "lost", "loss", "duplicates", "reordered"):
                result[key] = None
            result["note"] = "codec payloads: packets counted, not matched (no latency, no loss)"
        if lat.size:
            result["latency_ms"] = percentiles(lat, 1e-6)
            result["latency_cdf_ms"] = (np.percentile(lat, CDF_QUANTILES) * 1e-6).round(4).tolist()
        else:
            result["latency_ms"] = {"n": 0}
        if len(pids) > 1:
            result["server_cpu_by_pid"] = {str(p): v for p, v in cpu_by_pid.items()}
            # how often each process slept (and so was woken) and its CPU in the kernel
            result["server_sleeps_by_pid"] = {
                str(p): {
                    "sleeps": sleeps1[p][0] - sleeps0[p][0],
                    "kernel_s": sleeps1[p][1] - sleeps0[p][1],
                }
                for p in pids
                if p in sleeps0 and p in sleeps1
            }
            result["server_processes_gone"] = len(pids) - len(cpu_by_pid)
            result["server_memory_total_rss_bytes"] = sum(memory(p)["rss_bytes"] for p in pids)
        if relay:
            result["relay_metrics"] = _relay_window(metrics0, metrics1, lags)
        if spy is not None:
            try:
                spy.wait(timeout=15)
                result["profile"] = profile.summarize(raw)
                result["profile"]["tool"] = "py-spy record --nonblocking (raw stacks)"
            except (subprocess.TimeoutExpired, OSError) as exc:
                spy.kill()
                result["profile"] = {"error": str(exc)}
        rx_errors = sum(c.rec.errors for c in self.receivers)
        if rx_errors:
            result["receiver_srtp_errors"] = rx_errors
        return result


def metric_series(name: str) -> tuple[str, dict[str, str]]:
    """``'relay_x{a="1",b="2"}'`` -> ``("relay_x", {"a": "1", "b": "2"})``."""
    base, _, rest = name.partition("{")
    labels: dict[str, str] = {}
    for part in rest.rstrip("}").split(","):
        key, eq, value = part.partition("=")
        if eq:
            labels[key.strip()] = value.strip().strip('"')
    return base, labels


def metric_total(values: dict[str, float], name: str, **match: str) -> float:
    """Sum of every series of ``name`` (with or without a ``worker`` label: a relay with workers
    reports each worker's series under ``worker="i"``) whose other labels are ``match``."""
    total = 0.0
    for key, value in values.items():
        if not key.startswith(name):
            continue
        base, labels = metric_series(key)
        labels.pop("worker", None)
        if base == name and labels == match:
            total += value
    return total


def _relay_window(m0: dict[str, float], m1: dict[str, float], lags: list[float]) -> dict[str, Any]:
    def delta(name: str) -> float:
        return metric_total(m1, name) - metric_total(m0, name)

    count = delta("relay_forward_latency_seconds_count")
    drops: dict[str, float] = {}
    for key, value in m1.items():
        base, labels = metric_series(key)
        if base == "relay_packets_dropped_total" and "reason" in labels:
            grown = value - m0.get(key, 0.0)
            if grown > 0:
                drops[labels["reason"]] = drops.get(labels["reason"], 0.0) + grown
    lag_max = [
        v for k, v in m1.items() if metric_series(k)[0] == "relay_event_loop_lag_max_seconds"
    ]
    by_worker: dict[str, dict[str, float]] = {}
    for key, value in m1.items():
        base, labels = metric_series(key)
        field = {"relay_packets_in_total": "packets_in", "relay_packets_out_total": "packets_out"}
        if base in field and set(labels) == {"worker"}:
            row = by_worker.setdefault(labels["worker"], {})
            row[field[base]] = value - m0.get(key, 0.0)
    return {
        "by_worker": by_worker,
        "packets_in": delta("relay_packets_in_total"),
        "packets_out": delta("relay_packets_out_total"),
        "send_errors": delta("relay_send_errors_total"),
        "drops": drops,
        "forward_time_mean_us": delta("relay_forward_latency_seconds_sum") / count * 1e6
        if count
        else None,
        "event_loop_lag_s": max(lags) if lags else None,
        "event_loop_lag_max_since_start_s": max(lag_max) if lag_max else None,
    }


async def run_scenario(
    server: Server,
    scenario: Scenario,
    progress: Progress = _no_progress,
    profile_dir: Path | None = None,
    retries: int = RETRIES,
) -> dict[str, Any]:
    """Set a scenario up against a running server, send, settle, measure one window
    (with a py-spy profile of the relay when ``profile_dir`` is given)."""
    async with Run(server, progress, profile_dir, retries) as run:
        await run.setup(scenario)
        run.start_sending()
        progress(f"{server.name}: settling", None)
        await asyncio.sleep(scenario.settle)
        result = await run.measure_quietly(scenario.duration)
    result["scenario"] = scenario.describe()
    return result


async def run_ramp(
    server: Server,
    base: Scenario,
    steps: Sequence[int],
    *,
    max_loss: float = 0.01,
    max_p99_ms: float = 50.0,
    progress: Progress = _no_progress,
    retries: int = RETRIES,
) -> dict[str, Any]:
    """One publisher; subscribers added step by step until loss or p99 latency passes its limit.

    The capacity is the forwarded packet rate of the last step within both limits."""
    results: list[dict[str, Any]] = []
    stop_reason = f"reached the last step ({steps[-1]} subscribers)"
    room = f"{base.name}-0"
    async with Run(server, progress, retries=retries) as run:
        await run.system.create_room(room, steps[-1] + 2)
        await run.system.join(room, "pub", True, False)
        await run.add_publisher(base, room, "pub")
        run.start_sending()
        count = 0
        for target in steps:
            whos = [f"s{i}" for i in range(count, target)]
            for who in whos:
                await run.system.join(room, who, False, True)

            async def subscribe(who: str) -> None:
                await run.add_subscriber(base, room, who, ["pub"])

            progress(f"{server.name}: ramp to {target} subscribers", None)
            try:
                await asyncio.gather(*(subscribe(w) for w in whos))
            except Exception as exc:  # a server that cannot take more is a result, not a crash
                stop_reason = f"setting up {target} subscribers failed: {exc}"
                break
            count = target
            await asyncio.sleep(base.settle)
            step = await run.measure_quietly(base.duration)
            step["subscribers"] = count
            results.append(step)
            p99 = step["latency_ms"].get("p99", float("inf"))
            # latency of a window disturbed by other processes says nothing about the relay
            late = p99 > max_p99_ms and not step["disturbed"]
            if step["loss"] > max_loss or late:
                stop_reason = (
                    f"{count} subscribers: loss {step['loss']:.2%}, p99 {p99:.1f} ms "
                    f"(limits {max_loss:.0%}, {max_p99_ms:g} ms)"
                )
                break
            if step["generator_cpu_fraction"] > 0.95:
                stop_reason = f"{count} subscribers: the load generator is saturated"
                break
    passing = [
        r
        for r in results
        if r["loss"] <= max_loss
        and (r["disturbed"] or r["latency_ms"].get("p99", float("inf")) <= max_p99_ms)
    ]
    best = max(passing, key=lambda r: r["forwarded_pps"]) if passing else None
    return {
        "scenario": base.describe(),
        "limits": {"loss": max_loss, "latency_p99_ms": max_p99_ms},
        "steps": results,
        "stop_reason": stop_reason,
        "capacity": {
            "subscribers": best["subscribers"],
            "forwarded_pps": best["forwarded_pps"],
            "server_cpu_fraction": best["server_cpu_fraction"],
            "cpu_per_packet_us": best["cpu_per_packet_us"],
        }
        if best
        else None,
    }
