"""Chromium and Firefox chat through the relay's data channels, on the demo page.

Each page publishes a "chat" data channel next to its camera (a receive-only page publishes
the channel alone); the relay relays what is sent on it to the others over their subscriber
connections, on channels whose protocol names the sender. The pages' ``chat=`` and ``chatto=``
options make them send a room-wide and a one-to-one message every second, and their reports
list what they received. A third Chromium page checks that one-to-one messages reach nobody
else; a flood from the first page is refused and counted by the relay.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import Call, World, make_world
from tests.browser.harness import wait_until
from tests.browser.test_e2ee import PASSPHRASE, e2ee_room

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The relay without load shedding: this test is about chat, and three browsers starting
    on a busy two-core machine can make the relay refuse new sessions for a while."""
    yield from make_world(
        tmp_path_factory.mktemp("chat"), relay_extra="[overload]\nenabled = false\n"
    )


def received(call: Call, label: str) -> list[dict[str, Any]]:
    return list(call.report(label).get("chat") or [])


def has(call: Call, label: str, sender: str, pattern: str, direct: bool) -> bool:
    return any(
        m["from"] == sender
        and m["direct"] is direct
        and m["label"] == "chat"
        and re.fullmatch(pattern, m["text"])
        for m in received(call, label)
    )


def dropped(call: Call, reason: str) -> float:
    text = call.api("GET", "/metrics").text
    match = re.search(rf'^relay_datachannel_dropped_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_chromium_and_firefox_chat_both_ways_one_to_all_and_one_to_one(call: Call) -> None:
    # one page after the other: three browsers starting at once on two cores can make the
    # relay shed load (a 503 to the last one)
    chromium = call.open_page(
        "chromium", "chromium", devtools=True, chat="hi from chromium", chatto="firefox"
    )
    call.wait_joined("chromium")
    call.open_page("firefox", "firefox", chat="hi from firefox", chatto="chromium")
    call.wait_joined("firefox")
    call.open_page("chromium", "observer")
    call.wait_joined("observer")

    def show() -> str:
        return "; ".join(
            f"{label}: {[(m['from'], m['direct'], m['text']) for m in received(call, label)][-6:]}"
            for label in ("chromium", "firefox", "observer")
        )

    expected = [
        ("firefox", "chromium", r"hi from chromium #\d+", False),
        ("firefox", "chromium", r"hi from chromium \(to firefox\) #\d+", True),
        ("chromium", "firefox", r"hi from firefox #\d+", False),
        ("chromium", "firefox", r"hi from firefox \(to chromium\) #\d+", True),
        ("observer", "chromium", r"hi from chromium #\d+", False),
        ("observer", "firefox", r"hi from firefox #\d+", False),
    ]
    wait_until(
        lambda: all(has(call, *e) for e in expected),
        TIMEOUT,
        what=lambda: f"chat messages both ways ({show()})",
    )
    # one-to-one messages reached their addressee only
    assert not any(m["direct"] or "(to" in m["text"] for m in received(call, "observer")), show()

    # a flood from the Chromium page: the relay passes the sender's burst and refuses the rest
    before = dropped(call, "rate_limited")
    started = time.monotonic()
    sent = chromium.cdp.evaluate(  # type: ignore[union-attr]
        "(() => { let n = 0; for (let i = 0; i < 400; i++) n += demoChat.send('flood ' + i);"
        " return n; })()"
    )
    assert sent == 400

    def flood_seen() -> int:
        return sum(1 for m in received(call, "firefox") if m["text"].startswith("flood "))

    def accounted() -> float:
        return dropped(call, "rate_limited") - before + flood_seen()

    # every flood message was either relayed to Firefox or refused and counted
    wait_until(lambda: accounted() >= 400, 60, what=lambda: f"the flood ({accounted()})")
    elapsed = time.monotonic() - started
    # the burst (20 messages/s for 2 s), then 20 a second (the page's own chat takes some)
    assert 0 < flood_seen() <= 40 + 20 * elapsed + 2, (flood_seen(), elapsed)
    assert dropped(call, "rate_limited") - before > 0


def test_chat_in_an_end_to_end_encrypted_room_is_encrypted(call: Call) -> None:
    """In an end-to-end encrypted room the pages encrypt their chat with the room's key: a page
    with the passphrase reads it, a page with another passphrase cannot."""
    e2ee_room(call)
    call.open_page("chromium", "alice", token=False, passphrase=PASSPHRASE, chat="sealed hello")
    call.wait_joined("alice")
    call.open_page("chromium", "bob", token=False, passphrase=PASSPHRASE)
    call.wait_joined("bob")
    call.open_page("chromium", "eve", token=False, passphrase="another passphrase")
    call.wait_joined("eve")
    wait_until(
        lambda: (
            has(call, "bob", "alice", r"sealed hello #\d+", False)
            and has(call, "eve", "alice", r"\(a message this page cannot decrypt\)", False)
        ),
        TIMEOUT,
        what=lambda: f"chat: bob {received(call, 'bob')[-3:]}, eve {received(call, 'eve')[-3:]}",
    )
    assert not any("sealed" in m["text"] for m in received(call, "eve"))
