"""Plumbing for browser tests: a network namespace, an event loop inside it, the relay, a
statistics collector, headless Chromium and Firefox ESR, and an aiortc participant.

Everything WebRTC happens inside a network namespace the tests make and remove:
browsers and aioice do not use 127.0.0.1 as a host candidate. The relay, the browsers and the
collector run there; the test process joins it from one thread only (``setns`` changes the
namespace of the calling thread), which runs an asyncio loop for the API calls, the event
stream, the collector and the aiortc client. Every socket that loop opens lives in the
namespace, while pytest's own thread stays where it was.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import ctypes
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from relay.config import DEV_API_KEY

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
#: Addresses of the veth pair inside the namespace: the relay's media host, and a second one.
RELAY_ADDRESS = "10.200.0.1"
PEER_ADDRESS = "10.200.0.2"
API_PORT = 8080
MEDIA_PORT = 40000
API_KEY = "browser-test-key"
CONSENT_TIMEOUT = 5.0

CHROMIUM = "chromium"
FIREFOX = "firefox-esr"
INSTALL_HINT = {
    CHROMIUM: "apt-get install -y --no-install-recommends chromium",
    FIREFOX: "apt-get install -y firefox-esr",
}


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(ok: bool, reason: str) -> None:
    """Skip when a prerequisite is missing; under CI (``CI=true``) that is a failure."""
    if ok:
        return
    if under_ci():
        pytest.fail(f"{reason} (CI=true: a missing prerequisite is a failure)", pytrace=False)
    pytest.skip(reason)


def browser_path(name: str) -> str:
    """The executable of a browser, or skip (fail under CI) saying how to install it."""
    path = shutil.which(name)
    need(path is not None, f"{name} is not installed: {INSTALL_HINT[name]}")
    assert path is not None
    return path


# --------------------------------------------------------------------------------------------
# Network namespace


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


class Namespace:
    """A network namespace with a veth pair ``rtc0``/``rtc1`` (both ends inside it).

    libnice skips interfaces named ``veth*``, hence the names. IPv6 is off, and a default
    route points at ``rtc1`` so that a browser without camera permission, which gathers
    candidates only on the default route's interface, still finds one.
    """

    _count = itertools.count()

    def __init__(self) -> None:
        self.name = f"relaytest{os.getpid()}n{next(self._count)}"
        self.created = False

    def create(self) -> None:
        need(os.geteuid() == 0, "browser tests make a network namespace: run them as root")
        need(
            shutil.which("ip") is not None, "browser tests need iproute2: apt-get install iproute2"
        )
        self._remove_stale()
        try:
            _run("ip", "netns", "add", self.name)
        except (subprocess.CalledProcessError, OSError) as error:
            stderr = getattr(error, "stderr", b"") or b""
            need(False, f"cannot make a network namespace: {stderr.decode().strip() or error}")
        self.created = True
        ns = self.name
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "add", "rtc0", "type", "veth", "peer", "name", "rtc1")
        _run("ip", "-n", ns, "addr", "add", f"{RELAY_ADDRESS}/24", "dev", "rtc0")
        _run("ip", "-n", ns, "addr", "add", f"{PEER_ADDRESS}/24", "dev", "rtc1")
        _run("ip", "-n", ns, "link", "set", "rtc0", "up")
        _run("ip", "-n", ns, "link", "set", "rtc1", "up")
        _run("ip", "-n", ns, "route", "add", "default", "dev", "rtc1")
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")

    @staticmethod
    def _remove_stale() -> None:
        """Remove namespaces left by earlier test runs whose process is gone (killed runs)."""
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for line in listing.stdout.splitlines():
            match = re.fullmatch(r"relaytest(\d+)n\d+", line.split(" ")[0])
            if match and not Path(f"/proc/{match.group(1)}").exists():
                subprocess.run(["ip", "netns", "del", match.group(0)], capture_output=True)

    def remove(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
            self.created = False

    def prefix(self) -> list[str]:
        """Prefix of a command line that runs inside the namespace."""
        return ["ip", "netns", "exec", self.name]


class NamespaceLoop:
    """An asyncio loop on a thread that has joined the namespace."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="netns-loop", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.namespace.name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
        except BaseException as error:
            self._error = error
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the namespace's loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Start a coroutine on the namespace's loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(cancel_all(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


# --------------------------------------------------------------------------------------------
# Processes


def _session_members(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (a browser and everything it started)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            members.append(int(entry))
    return members


class Process:
    """A child started in a session of its own, so that it and its children can be ended."""

    def __init__(self, args: list[str], log_path: Path, **options: Any) -> None:
        self.log_path = log_path
        log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.popen = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **options
            )
        finally:
            log_file.close()
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole session at once: no goodbye of any kind reaches the relay."""
        for pid in [self.pid, *_session_members(self.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL whatever of the session is left."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        self.kill()

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


# --------------------------------------------------------------------------------------------
# The relay


@dataclass
class RelayInNamespace:
    process: Process
    #: Signs the participant tokens the test makes ("" when the relay makes its own secret).
    token_secret: str
    api: str = f"http://127.0.0.1:{API_PORT}"
    api_key: str = API_KEY

    def log(self, tail: int = 6000) -> str:
        return self.process.log(tail)


def relay_config(token_secret: str, extra: str = "") -> str:
    return (
        f"""
[api]
host = "127.0.0.1"
port = {API_PORT}
keys = ["{API_KEY}"]

[auth]
token_secret = "{token_secret}"

[media]
host = "{RELAY_ADDRESS}"
port = {MEDIA_PORT}

[session]
consent_timeout = {CONSENT_TIMEOUT}

[demo]
enabled = true
"""
        + extra
        # one process unless the test asks for workers (the embedded defaults run one per core)
        + ("" if "[workers]" in extra else "\n[workers]\ncount = 1\n")
    )


def wait_healthy(loop: NamespaceLoop, process: Process, api: str) -> None:
    """Wait (up to 30 s) until the relay started in the namespace answers ``/healthz``;
    stop it and raise with its log if it exits or does not answer in time."""

    async def healthy() -> bool:
        async with httpx.AsyncClient(timeout=2) as http:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if not process.alive():
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{api}/healthz")).status_code == 200:
                        return True
                await asyncio.sleep(0.1)
        return False

    if not loop.run(healthy(), timeout=40):
        process.stop()
        raise RuntimeError(f"relay did not start in the namespace:\n{process.log()}")


def start_relay(
    namespace: Namespace,
    loop: NamespaceLoop,
    folder: Path,
    extra: str = "",
    *,
    config: bool = True,
) -> RelayInNamespace:
    """``relay serve`` inside the namespace: API on its 127.0.0.1, media on the veth address.

    Without ``config``: ``relay serve`` alone, on its embedded defaults (no file, no ``RELAY_*``
    variable), whose API key is the development key and whose tokens only the relay signs."""
    command = [*namespace.prefix(), sys.executable, "-m", "relay", "serve"]
    if config:
        secret = secrets.token_urlsafe(32)
        path = folder / "relay.toml"
        path.write_text(relay_config(secret, extra))
        command += ["--config", str(path)]
    else:
        secret = ""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    process = Process(command, folder / "relay.log", env=env, cwd=ROOT)
    relay = RelayInNamespace(process, secret, api_key=API_KEY if config else DEV_API_KEY)

    wait_healthy(loop, process, relay.api)
    return relay


# --------------------------------------------------------------------------------------------
# Statistics collector: the pages POST a summary of their state and getStats() every second


class Collector:
    """A tiny HTTP server (inside the namespace) that keeps every page's reports."""

    def __init__(self) -> None:
        self.reports: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self.lock = threading.Lock()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self, label: str) -> str:
        return f"http://127.0.0.1:{self.port}/report/{label}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
            if method == "POST" and path.startswith("/report/"):
                label = path[len("/report/") :]
                data = json.loads(body)
                with self.lock:
                    history = self.reports.setdefault(label, [])
                    history.append((time.monotonic(), data))
                    del history[:-600]
            writer.write(
                b"HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\n"
                b"Connection: close\r\n\r\n"
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()

    def latest(self, label: str) -> dict[str, Any] | None:
        with self.lock:
            history = self.reports.get(label)
            return history[-1][1] if history else None

    def latest_at(self, label: str) -> tuple[float, dict[str, Any]] | None:
        with self.lock:
            history = self.reports.get(label)
            return history[-1] if history else None


# --------------------------------------------------------------------------------------------
# Browsers


FIREFOX_PREFS = {
    "media.navigator.streams.fake": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    "app.update.disabledForTesting": True,
    "datareporting.policy.dataSubmissionEnabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.sessionstore.resume_from_crash": False,
    "toolkit.startup.max_resumed_crashes": -1,
    "browser.startup.homepage_override.mstone": "ignore",
    "startup.homepage_welcome_url": "about:blank",
    "trailhead.firstrun.didSeeAboutWelcome": True,
    "browser.aboutwelcome.enabled": False,
    "extensions.update.enabled": False,
    "network.dns.disableIPv6": True,
}

#: Firefox gathers on every interface (rtc0 and rtc1), as it does by default. Against an
#: ICE-lite peer it puts USE-CANDIDATE on its checks of every pair, and the relay latches the
#: last one it processes, which need not be the pair Firefox selected: the relay then answers
#: Firefox's DTLS only once a consent check has authenticated the selected address again (about
#: 6 s later; seen in about one Firefox connection in four here). The tests' timeouts allow
#: for that; an unanswered handshake would fail them (connect_timeout).


class Browser:
    """One headless browser showing one page."""

    def __init__(self, kind: str, label: str, process: Process, cdp: CdpPipe | None) -> None:
        self.kind = kind
        self.label = label
        self.process = process
        self.cdp = cdp
        self.started = time.monotonic()

    def kill(self) -> None:
        self.process.kill()

    def close(self) -> None:
        if self.cdp is not None:
            self.cdp.close()
        self.process.stop(grace=2)


def launch_chromium(
    namespace: Namespace,
    url: str,
    folder: Path,
    label: str,
    *,
    camera: bool = True,
    devtools: bool = False,
) -> Browser:
    """Headless Chromium with a fake camera and microphone (or with media permission denied)."""
    executable = browser_path(CHROMIUM)
    profile = folder / f"{label}-profile"
    profile.mkdir()
    args = [
        executable,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-device-for-media-stream",
        "--window-size=1280,800",
        f"--user-data-dir={profile}",
    ]
    args.append("--use-fake-ui-for-media-stream" if camera else "--deny-permission-prompts")
    cdp_fds: tuple[int, int] | None = None
    options: dict[str, Any] = {}
    if devtools:
        # DevTools over a pipe (fd 3 in, fd 4 out): used to take a screenshot.
        commands_read, commands_write = os.pipe()
        replies_read, replies_write = os.pipe()
        args.append("--remote-debugging-pipe")
        shell = f'exec "$@" 3<&{commands_read} 4>&{replies_write}'
        command = [*namespace.prefix(), "bash", "-c", shell, "bash", *args, url]
        options["pass_fds"] = (commands_read, replies_write)
        cdp_fds = (commands_write, replies_read)
    else:
        command = [*namespace.prefix(), *args, url]
    process = Process(command, folder / f"{label}.log", **options)
    cdp = None
    if cdp_fds is not None:
        os.close(options["pass_fds"][0])
        os.close(options["pass_fds"][1])
        cdp = CdpPipe(*cdp_fds)
    return Browser("chromium", label, process, cdp)


def launch_firefox(
    namespace: Namespace, url: str, folder: Path, label: str, *, camera: bool = True
) -> Browser:
    """Headless Firefox ESR with fake devices (or with camera and microphone denied)."""
    executable = browser_path(FIREFOX)
    profile = folder / f"{label}-profile"
    profile.mkdir()
    prefs = dict(FIREFOX_PREFS)
    if camera:
        prefs["media.navigator.permission.disabled"] = True
        prefs["permissions.default.camera"] = 1
        prefs["permissions.default.microphone"] = 1
    else:
        prefs["media.navigator.permission.disabled"] = False
        prefs["permissions.default.camera"] = 2
        prefs["permissions.default.microphone"] = 2
    lines = [f"user_pref({json.dumps(k)}, {json.dumps(v)});" for k, v in prefs.items()]
    (profile / "user.js").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, MOZ_HEADLESS="1", HOME=str(profile))
    args = [executable, "--headless", "--no-remote", "--profile", str(profile)]
    args += ["--window-size=1280,800", url]
    process = Process([*namespace.prefix(), *args], folder / f"{label}.log", env=env)
    return Browser("firefox", label, process, None)


class CdpPipe:
    """Chrome DevTools Protocol over ``--remote-debugging-pipe`` (NUL-terminated JSON)."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self._write = os.fdopen(write_fd, "wb", buffering=0)
        self._read = os.fdopen(read_fd, "rb", buffering=0)
        self._ids = itertools.count(1)
        self._pending: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._session: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="cdp", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self._read.read(65536)
            except (OSError, ValueError):
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                data = json.loads(message)
                with self._lock:
                    future = self._pending.pop(data.get("id", -1), None)
                if future is not None:
                    future.set_result(data)
        with self._lock:
            for future in self._pending.values():
                future.set_exception(ConnectionError("DevTools pipe closed"))
            self._pending.clear()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 20,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        with self._lock:
            self._pending[message["id"]] = future
        self._write.write(json.dumps(message).encode() + b"\0")
        reply = future.result(timeout)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method}: {reply['error']}")
        return reply.get("result", {})

    def page_session(self) -> str:
        """A DevTools session attached to the first page target."""
        if self._session is None:
            targets = self.call("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            attached = self.call(
                "Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}
            )
            self._session = attached["sessionId"]
        return self._session

    def screenshot(self) -> bytes:
        """A PNG of the page."""
        shot = self.call("Page.captureScreenshot", {"format": "png"}, session=self.page_session())
        return base64.b64decode(shot["data"])

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (as a person's click would run)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "userGesture": True},
            session=self.page_session(),
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        for stream in (self._write, self._read):
            with contextlib.suppress(OSError):
                stream.close()


# --------------------------------------------------------------------------------------------
# Waiting


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.25,
    what: str | Callable[[], str] = "",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            description = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {description}")
        time.sleep(interval)


def sdp_streams(sdp: str) -> dict[str, str]:
    """mid -> msid stream id of every sending m-line of an offer."""
    result: dict[str, str] = {}
    for section in re.split(r"\r?\n(?=m=)", sdp)[1:]:
        mid = re.search(r"^a=mid:(\S+)", section, re.M)
        msid = re.search(r"^a=msid:(\S+)", section, re.M)
        if mid and msid and re.search(r"^a=(sendonly|sendrecv)", section, re.M):
            result[mid.group(1)] = msid.group(1)
    return result


@dataclass
class EventLog:
    """The room's events as the test saw them, with arrival times (monotonic)."""

    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> tuple[float, dict] | None:
        return next(((t, e) for t, e in self.events if predicate(e)), None)

    def __iter__(self) -> Iterator[tuple[float, dict[str, Any]]]:
        return iter(list(self.events))


# --------------------------------------------------------------------------------------------
# Firefox driven over WebDriver BiDi (its remote agent): a script before the page's own


def launch_firefox_bidi(
    namespace: Namespace, folder: Path, label: str, port: int, *, camera: bool = False
) -> Browser:
    """Headless Firefox ESR as :func:`launch_firefox`, on about:blank, with its remote agent
    (WebDriver BiDi) listening on ``port`` of the namespace's 127.0.0.1."""
    executable = browser_path(FIREFOX)
    profile = folder / f"{label}-profile"
    profile.mkdir()
    prefs = dict(FIREFOX_PREFS)
    allowed = 1 if camera else 2
    prefs["media.navigator.permission.disabled"] = camera
    prefs["permissions.default.camera"] = allowed
    prefs["permissions.default.microphone"] = allowed
    lines = [f"user_pref({json.dumps(k)}, {json.dumps(v)});" for k, v in prefs.items()]
    (profile / "user.js").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, MOZ_HEADLESS="1", HOME=str(profile))
    # libwebrtc's own log lines (frame buffer, VP8 reference finder), one file per process
    env["MOZ_LOG"] = os.environ.get("FIREFOX_MOZ_LOG", "webrtc_trace:4,timestamp,sync")
    env["MOZ_LOG_FILE"] = str(folder / f"{label}-moz.log")
    args = [executable, "--headless", "--no-remote", "--profile", str(profile)]
    args += [f"--remote-debugging-port={port}", "--window-size=1280,800", "about:blank"]
    process = Process([*namespace.prefix(), *args], folder / f"{label}.log", env=env)
    return Browser("firefox", label, process, None)


class BidiSession:
    """A WebDriver BiDi session over a minimal WebSocket client (asyncio streams; call its
    coroutines on the namespace's loop)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ids = itertools.count(1)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write(
            (
                f"GET /session HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"BiDi handshake refused: {head.decode(errors='replace')}")

    async def _send(self, text: str) -> None:
        assert self.writer is not None
        data = text.encode()
        header = bytearray([0x81])
        if len(data) < 126:
            header.append(0x80 | len(data))
        elif len(data) < 65536:
            header.append(0x80 | 126)
            header += len(data).to_bytes(2, "big")
        else:
            header.append(0x80 | 127)
            header += len(data).to_bytes(8, "big")
        mask = os.urandom(4)
        header += mask
        self.writer.write(bytes(header) + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        await self.writer.drain()

    async def _receive(self) -> dict[str, Any]:
        assert self.reader is not None
        message = b""
        while True:
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(await self.reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await self.reader.readexactly(8), "big")
            mask = await self.reader.readexactly(4) if second & 0x80 else b""
            payload = await self.reader.readexactly(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("BiDi connection closed")
            if opcode in (0x9, 0xA):
                continue
            message += payload
            if first & 0x80:
                return json.loads(message)

    async def command(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send a command; its result (events in between are dropped)."""
        ident = next(self.ids)
        await self._send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            reply = await asyncio.wait_for(self._receive(), 30)
            if reply.get("id") == ident:
                if reply.get("type") == "error":
                    raise RuntimeError(f"BiDi {method}: {reply}")
                return reply.get("result", {})

    async def open_with_script(self, url: str, script: str) -> None:
        """A new session; ``script`` runs in every document before its own scripts; the first
        tab navigates to ``url``."""
        await self.connect()
        await self.command("session.new", {"capabilities": {}})
        await self.command(
            "script.addPreloadScript", {"functionDeclaration": f"() => {{ {script} }}"}
        )
        tree = await self.command("browsingContext.getTree", {})
        context = tree["contexts"][0]["context"]
        await self.command(
            "browsingContext.navigate", {"context": context, "url": url, "wait": "none"}
        )

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()


#: Page script: ``viaProxy(sdp)``, the SDP with the relay's candidates (and the m-line ports)
#: pointing at ``proxy`` (a ``{host, port}`` const the including script defines first) and its
#: TCP candidates dropped, so that the page's media goes through an impairing proxy.
VIA_PROXY_JS = """  const viaProxy = (sdp) =>
    sdp.split('\\r\\n').filter((line) => !/^a=candidate:\\S+ \\d+ tcp /i.test(line)).map((line) => {
      if (line.startsWith('a=candidate:')) {
        const parts = line.split(' ');
        parts[4] = proxy.host;
        parts[5] = String(proxy.port);
        return parts.join(' ');
      }
      if (line.startsWith('m=') && line.split(' ')[1] !== '0') {
        const parts = line.split(' ');
        parts[1] = String(proxy.port);
        return parts.join(' ');
      }
      return line;
    }).join('\\r\\n');
"""
