"""Chromium and Firefox in one call through `relay serve` with two worker processes
(``[workers] count = 2``, spread placement): each browser sits on its own worker (media port
40000 or 40001), so every packet between them crosses the pipe between the workers."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.browser.conftest import Call, World, make_world
from tests.browser.harness import MEDIA_PORT, wait_until
from tests.browser.test_browsers import note, wait_for_media

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

WORKERS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The namespace with a relay of two worker processes (media ports 40000 and 40001)."""
    extra = f'\n[workers]\ncount = {WORKERS}\nplacement = "spread"\n'
    yield from make_world(tmp_path_factory.mktemp("workers"), extra)


def test_chromium_and_firefox_on_two_workers(call: Call, request: pytest.FixtureRequest) -> None:
    """With spread placement the two participants land on different workers; each browser
    decodes the other's video and receives its audio."""

    def ready() -> list[dict] | None:
        workers = call.api("GET", "/v1/workers").json()["workers"]
        ok = len(workers) == WORKERS and all(w["state"] == "ready" for w in workers)
        return workers if ok else None

    workers = wait_until(ready, 30, what="two ready workers")
    ports = sorted(w["media_port"] for w in workers)
    assert ports == [MEDIA_PORT + i for i in range(WORKERS)], workers
    call.open_page("chromium", "chromium")
    call.open_page("firefox", "firefox")
    room = call.api("GET", f"/v1/rooms/{call.room}").json()
    placed = {p["participant_id"]: p["worker"] for p in room["participants"]}
    note(request, "placement", placed)
    assert set(placed) == {"chromium", "firefox"}, placed
    assert placed["chromium"] != placed["firefox"], placed
    for label in ("chromium", "firefox"):
        call.wait_joined(label)
    window = wait_for_media(call, {"chromium": {"firefox"}, "firefox": {"chromium"}})
    for label in ("chromium", "firefox"):
        report = call.report(label)
        assert report["mode"] == "sendrecv"
        assert report["states"]["publisher"] == report["states"]["subscriber"] == "connected"
        assert report["tiles"] == ["firefox" if label == "chromium" else "chromium"]
    # each worker holds one of them
    workers = call.api("GET", "/v1/workers").json()["workers"]
    assert sorted(w["participants"] for w in workers) == [1, 1], workers
    # and each one's media reached the other over the pipe between the workers
    metrics = call.api("GET", "/metrics").text
    for i in range(WORKERS):
        match = re.search(
            rf'^relay_pipe_packets_received_total{{worker="{i}"}} (\S+)$', metrics, re.M
        )
        assert match is not None and float(match.group(1)) > 0, metrics
    note(request, "media window", window)
