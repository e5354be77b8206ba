"""Servers under test, each started in its own process pinned to the server core.

Every server binds to 127.0.0.1 only: the relay and the bare forwarder through their own
config, Janus through a generated config (HTTP on 127.0.0.1, ICE gathering only on ``lo``,
no STUN/TURN), the naive aiortc relay through a patched host-address list.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import httpx

from bench import netns
from bench.common import (
    SERVER_CORE,
    cpu_seconds,
    descendants,
    free_port,
    pinning_preexec,
    sleeps_and_kernel_seconds,
)

JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")
BENCH_KEY = "benchkey"


def _pythonpath() -> str:
    """The checkout's root first, so that ``python -m bench.*`` works from any directory."""
    root = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + rest if rest else "")


T = TypeVar("T")


def _each(pids: Collection[int], read: Callable[[int], T]) -> dict[int, T]:
    """``read(pid)`` of each of ``pids``, leaving out the processes gone (or unreadable)."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[pid] = read(pid)
    return out


class ServerError(RuntimeError):
    """A server under test did not start or died."""


class Server:
    """A running server under test: its process, ports and a log file."""

    name = "server"

    def __init__(self, workdir: Path, cores: Collection[int] | None = None) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.api_url = ""
        self.media_port = 0
        self.log_path = workdir / f"{self.name}.log"
        #: cores the server (and every process it starts) may run on: by default the server core
        self.cores = frozenset(cores) if cores is not None else frozenset({SERVER_CORE})

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        """The server's process and every process it started (a relay's worker processes)."""
        return [self.pid, *descendants(self.pid)]

    def cpu_by_pid(self, pids: Collection[int] | None = None) -> dict[int, float]:
        """CPU seconds so far of each of ``pids`` (default: :meth:`pids`); gone ones left out."""
        return _each(self.pids() if pids is None else pids, cpu_seconds)

    def sleeps_by_pid(self, pids: Collection[int]) -> dict[int, tuple[int, float]]:
        """:func:`bench.common.sleeps_and_kernel_seconds` of each of ``pids`` still there."""
        return _each(pids, sleeps_and_kernel_seconds)

    def cpu_seconds(self) -> float:
        """CPU seconds so far of the server's whole process tree."""
        return sum(self.cpu_by_pid().values())

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=_pythonpath(), **(env or {})),
                preexec_fn=pinning_preexec(self.cores),
                cwd=self.workdir,
            )
        finally:
            log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise ServerError(f"{self.name} exited:\n{self.log_tail()}")

    def _wait_http(self, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise ServerError(
            f"{self.name} did not answer {url} within {timeout:g} s:\n{self.log_tail()}"
        )

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=8)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def workers_supported() -> bool:
    """Whether this checkout's relay takes a ``[workers]`` config section."""
    try:
        from relay.config import CHECKS
    except ImportError:
        return False
    return "count" in CHECKS.get("workers", {})


def free_port_range(count: int, attempts: int = 50) -> int:
    """The first of ``count`` consecutive UDP ports free on 127.0.0.1 (worker i takes base + i)."""
    for _ in range(attempts):
        base = free_port(socket.SOCK_DGRAM)
        if base + count - 1 > 65535:
            continue
        socks = []
        try:
            for i in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise ServerError(f"no {count} consecutive free UDP ports found")


class RelayServer(Server):
    """``relay serve`` exactly as an operator starts it, with a generated TOML config.

    ``workers`` is ``[workers] count`` (None: 1, written only when the relay knows the section,
    so that the embedded default ``"auto"`` never changes what the bench measures) and
    ``placement`` its ``placement``. With workers the relay is a front process and its worker
    processes: :meth:`pids` lists them all."""

    name = "relay"

    def __init__(
        self,
        workdir: Path,
        max_participants: int = 1000,
        *,
        workers: int | None = None,
        placement: str | None = None,
        cores: Collection[int] | None = None,
        scheduler_slice_us: int | None = None,
    ) -> None:
        super().__init__(workdir, cores)
        self.max_participants = max_participants
        self.key = BENCH_KEY
        self.workers = workers
        self.placement = placement
        self.scheduler_slice_us = scheduler_slice_us  # None: the relay's default
        self.workers_section = ""

    def _workers_section(self) -> str:
        if not workers_supported():
            if self.workers not in (None, 1) or self.placement is not None:
                raise ServerError("this relay has no [workers] config section")
            return ""
        lines = [f"count = {self.workers or 1}"]
        if self.placement is not None:
            lines.append(f'placement = "{self.placement}"')
        return "[workers]\n" + "\n".join(lines) + "\n"

    def start(self) -> None:
        api_port = free_port(socket.SOCK_STREAM)
        self.media_port = free_port_range(self.workers or 1)
        self.workers_section = self._workers_section()
        config = self.workdir / "relay.toml"
        config.write_text(
            "[api]\n"
            f'host = "127.0.0.1"\nport = {api_port}\nkeys = ["{self.key}"]\n'
            "[media]\n"
            f'host = "127.0.0.1"\nport = {self.media_port}\n'
            "receive_buffer_bytes = 8388608\nsend_buffer_bytes = 8388608\n"
            + (
                f"scheduler_slice_us = {self.scheduler_slice_us}\n"
                if self.scheduler_slice_us is not None
                else ""
            )
            + "[limits]\n"
            f"max_participants_per_room = {self.max_participants}\nmax_rooms = 1000\n"
            '[log]\nlevel = "warning"\n'
            # the bench sets connections up in bursts and measures forwarding up to saturation:
            # load shedding (which would refuse those bursts) is measured by the overload tests
            "[overload]\nenabled = false\n" + self.workers_section
        )
        self._spawn([sys.executable, "-m", "relay", "serve", "--config", str(config)])
        self.api_url = f"http://127.0.0.1:{api_port}"
        self._wait_http(f"{self.api_url}/healthz")


def janus_available() -> str | None:
    """None when Janus can run here, else the reason it cannot."""
    if shutil.which("janus") is None:
        return "janus is not installed (Debian package: janus)"
    if not netns.inside():
        reason = netns.unavailable()
        if reason is not None:
            return f"Janus gathers no candidate on loopback and {reason}"
    for rel in ("plugins/libjanus_videoroom.so", "transports/libjanus_http.so"):
        if not (JANUS_LIB / rel).exists():
            return f"{JANUS_LIB / rel} is missing"
    return None


class JanusServer(Server):
    """Janus with only the videoroom plugin and the HTTP transport (on 127.0.0.1), gathering
    ICE candidates only on the bench namespace's ``rb0``; no STUN/TURN."""

    name = "janus"

    def start(self) -> None:
        reason = janus_available()
        if reason is not None:
            raise ServerError(reason)
        if not netns.inside():
            raise ServerError("Janus runs only inside the bench's network namespace")
        conf = self.workdir / "janus-conf"
        for sub in ("plugins", "transports", "events", "loggers"):
            (conf / sub).mkdir(parents=True, exist_ok=True)
        for sub, lib in (("plugins", "libjanus_videoroom.so"), ("transports", "libjanus_http.so")):
            link = conf / sub / lib
            if not link.exists():
                link.symlink_to(JANUS_LIB / sub / lib)
        http_port = free_port(socket.SOCK_STREAM)
        (conf / "janus.jcfg").write_text(
            "general: {\n"
            f'  configs_folder = "{conf}"\n'
            f'  plugins_folder = "{conf}/plugins"\n'
            f'  transports_folder = "{conf}/transports"\n'
            f'  events_folder = "{conf}/events"\n'
            f'  loggers_folder = "{conf}/loggers"\n'
            f"  debug_level = {os.environ.get('BENCH_JANUS_DEBUG', '3')}\n"
            "  session_timeout = 300\n"
            "}\n"
            "certificates: {\n}\n"
            'media: {\n  rtp_port_range = "30000-39999"\n}\n'
            "nat: {\n"
            f"  nice_debug = {os.environ.get('BENCH_NICE_DEBUG', 'false')}\n"
            f'  ice_enforce_list = "{netns.SERVER_IF}"\n'
            "  ignore_mdns = true\n"
            "}\n"
            "plugins: {\n}\ntransports: {\n}\nloggers: {\n}\nevents: {\n}\n"
        )
        (conf / "janus.transport.http.jcfg").write_text(
            "general: {\n"
            '  json = "plain"\n  base_path = "/janus"\n  http = true\n'
            f'  port = {http_port}\n  ip = "127.0.0.1"\n  https = false\n'
            "}\n"
            "admin: {\n  admin_http = false\n  admin_https = false\n}\n"
            "cors: {\n}\n"
        )
        (conf / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")
        self._spawn(["janus", "-F", str(conf), "-C", str(conf / "janus.jcfg"), "-o"])
        self.api_url = f"http://127.0.0.1:{http_port}/janus"
        self._wait_http(f"{self.api_url}/info")


class CeilingServer(Server):
    """The bare uvloop UDP forwarder of :mod:`bench.ceiling` (no SRTP, no rewriting)."""

    name = "ceiling"

    def start(self) -> None:
        self.media_port = free_port(socket.SOCK_DGRAM)
        self._spawn([sys.executable, "-m", "bench.ceiling", "--port", str(self.media_port)])
        deadline = time.monotonic() + 15
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.2)
            while time.monotonic() < deadline:
                self.check_alive()
                probe.sendto(b"PING", ("127.0.0.1", self.media_port))
                with contextlib.suppress(OSError):
                    if probe.recv(64) == b"PONG":
                        return
        self.stop()
        raise ServerError(f"ceiling forwarder did not start:\n{self.log_tail()}")


class NaiveAiortcServer(Server):
    """The naive aiortc relay of :mod:`bench.naive_aiortc` (decodes and re-encodes)."""

    name = "naive_aiortc"

    def start(self) -> None:
        api_port = free_port(socket.SOCK_STREAM)
        self._spawn([sys.executable, "-m", "bench.naive_aiortc", "--port", str(api_port)])
        self.api_url = f"http://127.0.0.1:{api_port}"
        self._wait_http(f"{self.api_url}/healthz")


def workdir(prefix: str = "relay-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


SERVERS: dict[str, type[Server]] = {
    "relay": RelayServer,
    "janus": JanusServer,
    "ceiling": CeilingServer,
    "naive_aiortc": NaiveAiortcServer,
}


def make_server(name: str, wd: Path, **kwargs: Any) -> Server:
    return SERVERS[name](wd, **kwargs)
