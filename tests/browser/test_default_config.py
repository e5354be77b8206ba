"""Browsers against `relay serve` on its embedded defaults: no config file, no RELAY_* variable.

This is what the README's first command runs. Firefox never pairs with a loopback candidate,
so the relay must announce this machine's interface addresses (inside the test's namespace:
10.200.0.1 and 10.200.0.2, then 127.0.0.1 last) for Firefox to join the demo at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.browser.conftest import Call, World, make_world
from tests.browser.harness import MEDIA_PORT, RELAY_ADDRESS
from tests.browser.test_browsers import note, wait_for_media

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The namespace with ``relay serve`` started without any configuration."""
    yield from make_world(tmp_path_factory.mktemp("default-config"), config=False)


def announced_candidates(log: str, port: int) -> list[str]:
    """The ICE candidates of the media port ``port`` as the start-up log states them (the
    default runs one media worker per core, each logging its own port's line)."""
    for line in re.findall(r"ICE candidates (.+)$", log, re.M):
        candidates = line.strip().split(", ")
        if all(c.endswith(f":{port}") for c in candidates):
            return candidates
    raise AssertionError(f"no ICE candidates logged for port {port}:\n{log}")


def test_firefox_and_chromium_call_through_the_embedded_default(
    call: Call, request: pytest.FixtureRequest
) -> None:
    """Firefox and Chromium join one room of the default relay the way a person does (the
    page asks the relay's development endpoint for a token) and each decodes the other's
    video and receives its audio."""
    log = call.relay.log(20000)
    assert "config: embedded defaults" in log, log
    assert f"media on udp 0.0.0.0:{MEDIA_PORT}" in log, log
    # one media worker per core by default: each announces its own port the same way
    workers = call.api("GET", "/v1/workers").json()["workers"]
    assert [w["media_port"] for w in workers] == [MEDIA_PORT + i for i in range(len(workers))]
    for worker in workers:
        port = worker["media_port"]
        candidates = announced_candidates(log, port)
        assert f"{RELAY_ADDRESS}:{port}" in candidates, candidates
        assert candidates[0] != f"127.0.0.1:{port}", candidates
        assert candidates[-1] == f"127.0.0.1:{port}", candidates

    call.open_page("firefox", "firefox", token=False)
    call.open_page("chromium", "chromium", token=False)
    for label in ("firefox", "chromium"):
        call.wait_joined(label)
    window = wait_for_media(call, {"firefox": {"chromium"}, "chromium": {"firefox"}})
    for label in ("firefox", "chromium"):
        report = call.report(label)
        assert report["mode"] == "sendrecv"
        assert report["states"]["publisher"] == report["states"]["subscriber"] == "connected"
    note(request, "media window", window)
