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
from collections.abc import Iterator
from typing import Any

import uvicorn

from relay.addresses import media_candidate_addresses
from relay.api.app import create_app
from relay.api.events import EventBus
from relay.api.http import bounded_protocol
from relay.config import Settings
from relay.metrics import Metrics
from relay.rtc.dtls import Certificate
from relay.sfu.sfu import Sfu

log = logging.getLogger(__name__)

#: Housekeeping period (consent, reports, stats), seconds.
TICK = 1.0
#: DTLS retransmission timer resolution, seconds.
TIMER_RESOLUTION = 0.05
#: Event-loop lag sampling period, seconds.
LOOP_LAG_INTERVAL = 0.25
#: Everything is closed within this many seconds of SIGINT/SIGTERM.
SHUTDOWN_GRACE = 3.0


class MediaProtocol(asyncio.DatagramProtocol):
    """The shared UDP port: every datagram goes straight to the media router."""

    def __init__(self, sfu: Sfu) -> None:
        self.datagram_received = sfu.router.handle_datagram  # type: ignore[method-assign]
        self.metrics = sfu.metrics

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away, and the like.
        self.metrics.send_errors += 1


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: the relay drains on signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Relay:
    """One running relay: media plane + control API on one event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.events = EventBus(settings, on_drop=self._event_dropped)
        self.sfu: Sfu | None = None
        self.udp: asyncio.DatagramTransport | None = None
        self.api: _ApiServer | None = None
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    def _event_dropped(self) -> None:
        self.metrics.events_dropped += 1

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        certificate = Certificate.generate(settings.media.certificate)
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
            sock.bind((settings.media.host, settings.media.port))
        except OSError as exc:
            sock.close()
            raise SystemExit(
                f"relay: cannot bind media port {settings.media.host}:"
                f"{settings.media.port}: {exc.strerror}"
            ) from None
        port = sock.getsockname()[1]
        candidates = [(addr, port) for addr in media_candidate_addresses(settings.media)]
        self.sfu = sfu = Sfu(
            settings,
            certificate=certificate,
            candidates=candidates,
            send=lambda data, addr: None,
            emit=self.events.publish,
            metrics=self.metrics,
        )
        self.udp, _ = await loop.create_datagram_endpoint(lambda: MediaProtocol(sfu), sock=sock)
        sfu.router.send = self.udp.sendto
        self.media_port = port
        app = create_app(sfu, settings, self.events, self.metrics)
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
        self.api = _ApiServer(config)
        self.events.start()
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        self._tasks.append(asyncio.create_task(self._timers(), name="dtls-timers"))
        self._tasks.append(asyncio.create_task(self._loop_lag(), name="loop-lag"))
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
        log.info(
            "media on udp %s:%d, ICE candidates %s",
            settings.media.host,
            port,
            ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in candidates),
        )
        log.info("control API on %s/v1  docs %s/docs  metrics %s/metrics", base, base, base)
        log.info(
            "DTLS certificate %s, fingerprint sha-256 %s",
            settings.media.certificate,
            certificate.fingerprint,
        )

    async def _housekeeping(self) -> None:
        assert self.sfu is not None
        while True:
            await asyncio.sleep(TICK)
            try:
                self.sfu.tick(self.sfu.clock())
            except Exception:  # keep the relay alive; a bug here must not stop every call
                log.exception("housekeeping failed")

    async def _timers(self) -> None:
        """DTLS retransmissions and publisher feedback (transport-cc, NACK, REMB)."""
        assert self.sfu is not None
        router = self.sfu.router
        interval = min(TIMER_RESOLUTION, self.settings.rtp.feedback_interval)
        while True:
            await asyncio.sleep(interval)
            now = self.sfu.clock()
            try:
                if router.handshaking:
                    router.poll_timers(now)
                if router.feedback_transports:
                    router.poll_feedback(now)
            except Exception:  # keep the relay alive; a bug here must not stop every call
                log.exception("timers failed")

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

    async def stop(self) -> None:
        """Stop accepting, close every session, stop the API; bounded by SHUTDOWN_GRACE."""
        log.info("draining: closing every session")
        if self.sfu is not None:
            self.sfu.drain()
        for task in self._tasks:
            task.cancel()
        await self.events.aclose()
        if self.api is not None:
            self.api.should_exit = True
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._api_task, SHUTDOWN_GRACE)
        if self.udp is not None:
            self.udp.close()
        log.info("stopped")

    async def run_until_signal(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
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
