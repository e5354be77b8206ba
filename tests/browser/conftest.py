"""Fixtures for browser tests: one namespace and relay per module, and a call helper per test."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from relay.api.tokens import encode_token
from tests.browser.harness import (
    Browser,
    Collector,
    EventLog,
    Namespace,
    NamespaceLoop,
    RelayInNamespace,
    launch_chromium,
    launch_firefox,
    start_relay,
    wait_until,
)
from tests.browser.participants import AiortcParticipant

#: Camera size and rate asked of the browsers' fake devices: enough frames, little CPU.
CAMERA = {"width": "320", "height": "240", "fps": "15"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A network namespace with the relay, a statistics collector and an event loop in it."""
    yield from make_world(tmp_path_factory.mktemp("browsers"))


def make_world(
    folder: Path,
    relay_extra: str = "",
    *,
    config: bool = True,
    start: Callable[[Namespace, NamespaceLoop, Path], RelayInNamespace] | None = None,
) -> Iterator[World]:
    """Namespace, loop, collector and relay (with extra TOML, or with no config file at all;
    or the one ``start`` starts), removed when done."""
    namespace = Namespace()
    loop: NamespaceLoop | None = None
    relay: RelayInNamespace | None = None
    try:
        namespace.create()
        loop = NamespaceLoop(namespace)
        loop.start()
        collector = Collector()
        loop.run(collector.start())
        if start is not None:
            relay = start(namespace, loop, folder)
        else:
            relay = start_relay(namespace, loop, folder, relay_extra, config=config)
        yield World(namespace, loop, relay, collector, folder)
    finally:
        if relay is not None:
            relay.process.stop()
        if loop is not None:
            loop.stop()
        namespace.remove()


class World:
    """The namespace, its loop, the relay and the collector."""

    def __init__(
        self,
        namespace: Namespace,
        loop: NamespaceLoop,
        relay: RelayInNamespace,
        collector: Collector,
        folder: Path,
    ) -> None:
        self.namespace = namespace
        self.loop = loop
        self.relay = relay
        self.collector = collector
        self.folder = folder
        self.rooms = itertools.count()


@pytest.fixture
def call(world: World, request: pytest.FixtureRequest) -> Iterator[Call]:
    """A room for one test; closes its browsers and clients, and explains a failure."""
    helper = Call(world, request.node.name)
    try:
        yield helper
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(helper.diagnostics())
        helper.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Keep the outcome of the test itself, for the diagnostics printed on failure."""
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


class Call:
    """One room of one test: participants, pages, and the room's events as the test sees them."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.loop = world.loop
        self.relay = world.relay
        self.collector = world.collector
        self.room = f"room{next(world.rooms)}"
        self.folder = world.folder / self.room
        self.folder.mkdir()
        self.browsers: dict[str, Browser] = {}
        self.clients: list[AiortcParticipant] = []
        self.events = EventLog()
        self.labels: dict[str, str] = {}
        self.loop.run(self._create_room())
        self._events_task = self.loop.spawn(self._follow_events())
        wait_until(lambda: self._events_open, 10, what="the test's event stream")

    _events_open = False

    # -- API (on the namespace's loop) -------------------------------------------------------

    async def _api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.relay.api_key}"}
        async with httpx.AsyncClient(base_url=self.relay.api, headers=headers, timeout=10) as h:
            return await h.request(method, path, **kwargs)

    async def _create_room(self) -> None:
        r = await self._api("POST", "/v1/rooms", json={"room_id": self.room})
        assert r.status_code == 201, r.text

    async def _follow_events(self) -> None:
        headers = {"Authorization": f"Bearer {self.relay.api_key}"}
        async with httpx.AsyncClient(base_url=self.relay.api, headers=headers, timeout=None) as h:
            async with h.stream("GET", "/v1/events", params={"room_id": self.room}) as stream:
                self._events_open = True
                async for line in stream.aiter_lines():
                    if line.startswith("data:"):
                        self.events.events.append((time.monotonic(), json.loads(line[5:])))

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run(self._api(method, path, **kwargs))

    def participant(self, participant_id: str, *, can_publish: bool = True) -> str:
        """Create a participant with the API key, as a signaling server would; its token."""
        r = self.api(
            "POST",
            f"/v1/rooms/{self.room}/participants",
            json={"participant_id": participant_id, "can_publish": can_publish},
        )
        assert r.status_code == 201, r.text
        return encode_token(
            self.room,
            participant_id,
            secret=self.relay.token_secret,
            expires_at=time.time() + 3600,
            can_publish=can_publish,
        )

    # -- pages ---------------------------------------------------------------------------

    def page_url(self, label: str, **fragment: str) -> str:
        values = {"room": self.room, **CAMERA, "report": self.collector.url(label), **fragment}
        return f"{self.relay.api}/demo#{urlencode(values)}"

    def open_page(
        self,
        browser: str,
        participant_id: str,
        *,
        token: bool = True,
        camera: bool = True,
        devtools: bool = False,
        **fragment: str,
    ) -> Browser:
        """A browser showing the demo page, joined as ``participant_id``.

        With ``token`` the test makes the participant and puts its token in the page's URL
        fragment (a signaling server's way); without, the page gets one from
        ``POST /demo/token`` itself (a person's way)."""
        label = participant_id
        if token:
            fragment["token"] = self.participant(participant_id, can_publish=camera)
        else:
            fragment["join"] = "1"
        fragment["participant"] = participant_id
        url = self.page_url(f"{self.room}.{label}", **fragment)
        if browser == "chromium":
            page = launch_chromium(
                self.world.namespace, url, self.folder, label, camera=camera, devtools=devtools
            )
        else:
            page = launch_firefox(self.world.namespace, url, self.folder, label, camera=camera)
        self.browsers[label] = page
        return page

    def report(self, label: str) -> dict[str, Any]:
        """The latest report of the page of participant ``label``."""
        return self.collector.latest(f"{self.room}.{label}") or {}

    def wait_joined(self, label: str, timeout: float = 45) -> dict[str, Any]:
        def joined() -> dict[str, Any] | None:
            report = self.report(label)
            if report.get("state") == "error":
                raise AssertionError(f"{label} could not join: {report.get('error')}")
            return report if report.get("state") == "joined" else None

        return wait_until(joined, timeout, what=f"{label} to join")

    def inbound(self, label: str, publisher: str, kind: str) -> dict[str, Any]:
        stats = self.report(label).get("stats") or {}
        return ((stats.get("inbound") or {}).get(publisher) or {}).get(kind) or {}

    # -- aiortc ------------------------------------------------------------------------

    def aiortc(self, participant_id: str, identity: str = "blue") -> AiortcParticipant:
        token = self.participant(participant_id)

        async def start() -> AiortcParticipant:
            client = AiortcParticipant(self.relay.api, token, self.room, participant_id, identity)
            self.clients.append(client)
            await client.join()
            await client.subscribe()
            await client.publish()
            return client

        return self.loop.run(start())

    # -- teardown and diagnostics --------------------------------------------------------

    def close(self) -> None:
        for page in self.browsers.values():
            page.close()

        async def close_clients() -> None:
            await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

        with contextlib.suppress(Exception):
            self.loop.run(close_clients(), timeout=20)
        self._events_task.cancel()
        with contextlib.suppress(Exception):
            self.api("DELETE", f"/v1/rooms/{self.room}")

    def diagnostics(self) -> str:
        parts = [f"--- relay log (tail)\n{self.relay.log(4000)}"]
        for label, page in self.browsers.items():
            report = self.report(label)
            brief = {k: report.get(k) for k in ("state", "error", "mode", "tiles", "states")}
            brief["notices"] = (report.get("notices") or [])[-8:]
            parts.append(f"--- {label} page: {json.dumps(brief)}")
            parts.append(f"--- {label} browser log (tail)\n{page.process.log(1500)}")
        return "\n".join(parts)
