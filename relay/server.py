"""Composition root: the event loop, the media port, the control API, timers, signals, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from relay import scheduling
from relay.addresses import media_candidate_addresses
from relay.api.app import create_app
from relay.api.events import EventBus
from relay.api.http import bounded_protocol
from relay.config import Settings, worker_count
from relay.metrics import Metrics
from relay.recording.service import RecordingService
from relay.rtc.dtls import Certificate
from relay.sfu.events import Event
from relay.sfu.port import MediaPort
from relay.sfu.sfu import Sfu
from relay.sfu.timers import Timers
from relay.tcp import IceTcpServer, MediaSender, bind_tcp
from relay.udp import BatchSender
from relay.workers.front import WorkerPool

log = logging.getLogger(__name__)

#: Event-loop lag sampling period, seconds.
LOOP_LAG_INTERVAL = 0.25
#: Everything is closed within this many seconds of SIGINT/SIGTERM.
SHUTDOWN_GRACE = 3.0


class MediaProtocol(asyncio.DatagramProtocol):
    """The shared UDP port: every datagram goes straight to the media port (dropped and
    counted until the SFU around the socket exists)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.port: MediaPort | None = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        port = self.port
        if port is None:
            self.metrics.drops["unknown_address"] += 1
            return
        port.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away, and the like.
        self.metrics.send_errors += 1


class Deferred:
    """``defer(callback, *args)`` for the packet path (``MediaContext.defer``): the callbacks
    run, in order, on the event loop's next turn, after the datagrams it read in this one.
    ``send_soon(send, batch)`` (``MediaContext.send_soon``): the batches given the same
    ``send`` in one turn go out together, in one call, at the place in that order of the
    first of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._sends: dict[Callable[[list[Any]], object], list[Any]] = {}

    def send_soon(self, send: Callable[[list[Any]], object], batch: list[Any]) -> None:
        pending = self._sends.get(send)
        if pending is not None:
            pending.extend(batch)
            return
        if not self._sends:
            self.defer(self._flush_sends)
        self._sends[send] = list(batch)

    def _flush_sends(self) -> None:
        sends, self._sends = self._sends, {}
        for send, batch in sends.items():
            send(batch)

    def defer(self, callback: Callable[..., None], *args: Any) -> None:
        if not self._queue:
            self.loop.call_soon(self._run)
        self._queue.append((callback, args))

    def _run(self) -> None:
        queue, self._queue = self._queue, []
        for callback, args in queue:
            try:
                callback(*args)
            except Exception:  # one packet's failure must not lose the others queued with it
                log.exception("deferred packet work failed")


#: Seconds before its deadline a timer may fire. uvloop's timers count whole milliseconds of
#: a loop time cached at the start of each turn, so they fire up to about a millisecond
#: early; a deadline found that close is taken as due. Re-arming it instead asked for a
#: delay that rounds to 0 ms: the loop spun, turn after turn, until the deadline passed
#: (most of a worker's timer turns fired nothing).
TIMER_SLACK = 0.001


class TimerDriver:
    """Keeps one ``loop.call_at`` armed for the earliest deadline of the media plane's timers
    (the SFU's clock is ``time.monotonic``; the loop's own clock may differ by an offset).
    A turn fires every timer due within :data:`TIMER_SLACK`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        self.loop = loop
        self.clock = clock
        self.timers = Timers(on_earlier=self.arm)
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None

    def arm(self, when: float) -> None:
        if self._armed_for is not None and self._armed_for <= when:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = when
        delay = max(0.0, when - self.clock())
        self._handle = self.loop.call_at(self.loop.time() + delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_for = None
        deadline = self.timers.run(self.clock(), TIMER_SLACK)
        if deadline is not None:
            self.arm(deadline)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: the relay drains on signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MediaPlane:
    """The media side of one process: the UDP port, the SFU core around it, its timers, and the
    event-loop lag sampling that feeds load shedding. The single-process relay and every
    worker process run one."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        emit: Callable[[Event], None],
        port: int | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.emit = emit
        self.port = settings.media.port if port is None else port
        self.sfu: Sfu | None = None
        self.udp: asyncio.DatagramTransport | None = None
        self.timer_driver: TimerDriver | None = None
        self.certificate: Certificate | None = None
        self.candidates: list[tuple[str, int]] = []
        #: ICE-TCP on the same port number (relay/tcp.py), when [media] transports has tcp
        self.tcp: IceTcpServer | None = None
        self.tcp_server: asyncio.AbstractServer | None = None
        self.tcp_candidates: list[tuple[str, int]] = []
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> Sfu:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.certificate = certificate = Certificate.generate(settings.media.certificate)
        family = socket.AF_INET6 if ":" in settings.media.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, settings.media.receive_buffer_bytes
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.media.send_buffer_bytes)
            if settings.media.host == "::":
                # "::" is announced with the IPv4 addresses too: take IPv4 on the same socket.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((settings.media.host, self.port))
        except OSError as exc:
            sock.close()
            raise SystemExit(
                f"relay: cannot bind media port {settings.media.host}:{self.port}: {exc.strerror}"
            ) from None
        self.port = port = sock.getsockname()[1]
        self.candidates = candidates = [
            (addr, port) for addr in media_candidate_addresses(settings.media)
        ]
        tcp_sock = self._bind_tcp(port)
        if tcp_sock is not None:
            self.tcp_candidates = [(addr, port) for addr, _ in candidates]
        if settings.media.transports == "tcp":
            self.candidates = candidates = []
        self.timer_driver = driver = TimerDriver(loop, time.monotonic)
        protocol = MediaProtocol(self.metrics)
        self.udp, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        # direct sends wait while uvloop still queues datagrams, so none overtakes another
        # (asyncio's DatagramTransport type lacks the method; uvloop's transport has it)
        queued = self.udp.get_write_buffer_size  # type: ignore[attr-defined]
        sender = BatchSender(sock, self.udp.sendto, queued)
        media_sender = sender if tcp_sock is None else MediaSender(sender)
        self.sfu = sfu = Sfu(
            settings,
            certificate=certificate,
            candidates=candidates,
            sender=media_sender,
            clock=time.monotonic,
            emit=self.emit,
            metrics=self.metrics,
            timers=driver.timers,
            tcp_candidates=self.tcp_candidates,
        )
        protocol.port = sfu.port
        deferred = Deferred(loop)
        sfu.media.defer, sfu.media.send_soon = deferred.defer, deferred.send_soon
        if tcp_sock is not None:
            await self._start_tcp(tcp_sock, sfu, media_sender)
        for path in ("batched", "direct", "fallback"):
            self.metrics.counter(
                f"udp_sent_{path}_total",
                {
                    "batched": "Datagrams sent several per sendmmsg call.",
                    "direct": "Datagrams sent one per sendto call.",
                    "fallback": "Datagrams handed to the event loop's transport (socket busy).",
                }[path],
                lambda path=path: getattr(sender, f"sent_{path}"),  # type: ignore[misc]
            )
        self.metrics.counter(
            "sendmmsg_calls_total", "sendmmsg system calls.", lambda: sender.sendmmsg_calls
        )
        self._tasks.append(asyncio.create_task(self._loop_lag(), name="loop-lag"))
        log.info(
            "media on udp %s:%d, ICE candidates %s",
            settings.media.host,
            port,
            ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in candidates),
        )
        return sfu

    def _bind_tcp(self, port: int) -> socket.socket | None:
        """The ICE-TCP listening socket on the media port number, or None (no TCP: by the
        settings, or, with "udp+tcp", when the port cannot be bound)."""
        media = self.settings.media
        if media.transports == "udp":
            return None
        try:
            return bind_tcp(media.host, port)
        except OSError as exc:
            if media.transports == "tcp":
                raise SystemExit(
                    f"relay: cannot bind ICE-TCP port {media.host}:{port}: {exc.strerror}"
                ) from None
            log.warning(
                "ICE-TCP off: cannot bind TCP port %s:%d (%s); announcing UDP candidates only",
                media.host,
                port,
                exc.strerror,
            )
            return None

    async def _start_tcp(self, sock: socket.socket, sfu: Sfu, sender: Any) -> None:
        """Accept ICE-TCP connections: their frames go to the SFU's media port."""
        self.tcp = tcp = IceTcpServer(
            self.settings.media,
            self.metrics,
            time.monotonic,
            idle_timeout=self.settings.session.consent_timeout,
        )
        tcp.port = sfu.port
        tcp.sender = sender
        tcp.start_timers(sfu.timers)
        loop = asyncio.get_running_loop()
        self.tcp_server = await loop.create_server(tcp.protocol, sock=sock)
        log.info(
            "ICE-TCP on tcp %s:%d, candidates %s",
            self.settings.media.host,
            self.port,
            ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in self.tcp_candidates),
        )

    async def _loop_lag(self) -> None:
        """Sample the event loop's lag; feed it and the forwarded packets to load shedding."""
        assert self.sfu is not None
        overload = self.sfu.overload
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LOOP_LAG_INTERVAL)
            now = loop.time()
            lag = max(0.0, now - before - LOOP_LAG_INTERVAL)
            self.metrics.loop_lag = lag
            self.metrics.loop_lag_max = max(self.metrics.loop_lag_max, lag)
            change = overload.sample(now, lag, self.metrics.packets_out)
            if change is None:
                continue
            if change.shedding:
                log.warning(
                    "overloaded (%s): refusing new sessions; loop lag %.0f ms, "
                    "forwarding %.0f packets/s",
                    change.reason,
                    change.loop_lag * 1000,
                    change.packet_rate,
                )
            else:
                log.info(
                    "load back to normal: accepting new sessions; loop lag %.0f ms, "
                    "forwarding %.0f packets/s (%d sessions refused so far)",
                    change.loop_lag * 1000,
                    change.packet_rate,
                    overload.refused,
                )

    def drain(self) -> None:
        """Close every session and stop sampling."""
        if self.sfu is not None:
            self.sfu.drain()
        for task in self._tasks:
            task.cancel()
        if self.timer_driver is not None:
            self.timer_driver.close()
        if self.tcp_server is not None:
            self.tcp_server.close()  # stop accepting
        if self.tcp is not None:
            self.tcp.close_all()

    def close(self) -> None:
        if self.sfu is not None:
            self.sfu.recording.close()  # finalize every recording file of this process
        if self.udp is not None:
            self.udp.close()


def api_server(settings: Settings, app: Any) -> _ApiServer:
    """uvicorn for the control API, with the relay's limits on connections and headers."""
    config = uvicorn.Config(
        app,
        host=settings.api.host,
        port=settings.api.port,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=1,
        timeout_keep_alive=settings.api.keep_alive_timeout,  # type: ignore[arg-type]
        http=bounded_protocol(settings.api.max_connections, settings.api.header_timeout),
    )
    return _ApiServer(config)


class Relay:
    """One running relay: the control API with either the media plane on the same event loop
    (one process) or a pool of media worker processes (``[workers] count`` above 1)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.events = EventBus(settings, on_drop=self._event_dropped)
        self.media: MediaPlane | None = None
        self.pool: WorkerPool | None = None
        self.api: _ApiServer | None = None
        self.recordings: RecordingService | None = None
        self.stopping = asyncio.Event()
        self.media_port = 0

    @property
    def sfu(self) -> Sfu | None:
        return self.media.sfu if self.media is not None else None

    def _event_dropped(self) -> None:
        self.metrics.events_dropped += 1

    async def start(self) -> None:
        settings = self.settings
        core: Sfu | WorkerPool
        workers = worker_count(settings.workers)
        if workers > 1:
            self.pool = core = WorkerPool(settings, self.events, self.metrics, workers)
            await self.pool.start()
            self.media_port = settings.media.port
        else:
            self.media = MediaPlane(settings, self.metrics, self.events.publish)
            core = await self.media.start()
            self.media_port = self.media.port
        app = create_app(core, settings, self.events, self.metrics)
        self.recordings = app.state.recordings
        await self.recordings.start()
        self.api = api_server(settings, app)
        self.events.start()
        self._api_task = asyncio.create_task(self.api.serve(), name="api")
        while not self.api.started:
            if self._api_task.done():
                self._api_task.result()
                raise SystemExit(
                    f"relay: cannot serve the control API on {settings.api.host}:"
                    f"{settings.api.port}"
                )
            await asyncio.sleep(0.01)
        self.api_port = self.api.servers[0].sockets[0].getsockname()[1]
        host = settings.api.host if ":" not in settings.api.host else f"[{settings.api.host}]"
        base = f"http://{host}:{self.api_port}"
        log.info("control API on %s/v1  docs %s/docs  metrics %s/metrics", base, base, base)
        if self.media is not None and self.media.certificate is not None:
            log.info(
                "DTLS certificate %s, fingerprint sha-256 %s",
                settings.media.certificate,
                self.media.certificate.fingerprint,
            )

    async def stop(self) -> None:
        """Stop accepting, close every session, stop the API; bounded by SHUTDOWN_GRACE."""
        log.info("draining: closing every session")
        if self.media is not None:
            self.media.drain()
        if self.pool is not None:
            await self.pool.stop(SHUTDOWN_GRACE)
        if self.recordings is not None:
            await self.recordings.aclose()  # the rooms closed: every recording stops
        await self.events.aclose()
        if self.api is not None:
            self.api.should_exit = True
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._api_task, SHUTDOWN_GRACE)
        if self.media is not None:
            self.media.close()
        log.info("stopped")

    async def run_until_signal(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.start()
        except BaseException:
            if self.pool is not None:
                await self.pool.stop(SHUTDOWN_GRACE)
            raise
        waiter = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait({waiter, self._api_task}, return_when=asyncio.FIRST_COMPLETED)
        if self._api_task in done and not self.stopping.is_set():
            waiter.cancel()
            log.error("control API stopped unexpectedly")
            await self.stop()
            return 1
        await self.stop()
        return 0


def raise_open_file_limit(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (every API connection is a descriptor),
    and warn when it stays below ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, exc)
        else:
            log.info("raised the open-file limit RLIMIT_NOFILE from %d to %d", soft, hard)
            soft = hard
    else:
        log.info("open-file limit RLIMIT_NOFILE %d", soft)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "RLIMIT_NOFILE %d is below api.max_connections plus room for media and files "
            "(%d): raise the hard limit (e.g. LimitNOFILE= in the systemd unit)",
            soft,
            wanted,
        )


def run(settings: Settings) -> int:
    """Run the relay until SIGINT or SIGTERM; the exit code."""
    raise_open_file_limit(settings.api.max_connections + 256)
    if worker_count(settings.workers) == 1:  # media in this process (workers ask for their own)
        scheduling.apply(settings.media.scheduler_slice_us, "relay")
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep a clear fallback
        factory = None
    started = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            code = runner.run(Relay(settings).run_until_signal())
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 1
        raise
    log.debug("ran for %.1f s", time.monotonic() - started)
    return code
