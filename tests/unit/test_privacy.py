"""Client addresses in log lines follow ``[log] client_addresses``; lines a client can cause
are rate-limited."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from relay import privacy
from relay.rtc import rtcp
from relay.sfu.port import LOG_BURST, LOG_RATE
from tests.unit.harness import Harness
from tests.unit.test_latch import ALICE, BOB, BOB_MOVED, _call, check
from tests.unit.test_sfu import aiortc_offer

ADDRESS = ("198.51.100.7", 40123)
TAG_IN = re.compile(r"client#[0-9a-f]{8}")


@pytest.fixture(autouse=True)
def restore_mode() -> Iterator[None]:
    yield
    privacy.configure("hashed")


def test_hashed_is_a_keyed_tag_without_the_address() -> None:
    privacy.configure("hashed")
    shown = privacy.client_address(ADDRESS)
    assert re.fullmatch(r"client#[0-9a-f]{8}", shown)
    assert "198.51" not in shown and "40123" not in shown
    # the same host gives the same tag (whatever its port) within a process run ...
    assert privacy.client_address((ADDRESS[0], 5000)) == shown
    assert privacy.client_address(("198.51.100.8", ADDRESS[1])) != shown
    # ... and another one after a new salt: tags cannot be matched across runs
    privacy.configure("hashed")
    assert privacy.client_address(ADDRESS) != shown


def test_none_and_full() -> None:
    privacy.configure("none")
    assert privacy.client_address(ADDRESS) == "client"
    privacy.configure("full")
    assert privacy.client_address(ADDRESS) == "198.51.100.7:40123"
    assert privacy.client_address(("2001:db8::1", 443)) == "[2001:db8::1]:443"
    with pytest.raises(ValueError):
        privacy.configure("partial")


def test_log_limit_per_key_and_refill() -> None:
    limit = privacy.LogLimit(rate=1.0, burst=3)
    assert [limit.allow("a", 1.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert limit.allow("b", 1.0) == 0  # another key has its own budget
    assert limit.allow("a", 2.0) == 2  # refilled; says how many were left out
    assert limit.suppressed == 2


def test_log_limit_bounds_all_keys_together() -> None:
    limit = privacy.LogLimit(rate=1.0, burst=2, overall_rate=10.0)
    written = sum(limit.allow(key, 5.0) is not None for key in range(100))
    assert written == 10


def test_access_log_follows_the_setting(caplog: pytest.LogCaptureFixture) -> None:
    access = logging.getLogger("uvicorn.access")
    for mode, expected in (("none", "client"), ("full", "198.51.100.7:40123")):
        privacy.configure(mode)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="uvicorn.access"):
            access.info(
                '%s - "%s %s HTTP/%s" %d', "198.51.100.7:40123", "GET", "/v1/rooms", "1.1", 200
            )
        assert caplog.records[0].getMessage().startswith(f'{expected} - "GET')
    privacy.configure("hashed")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        access.info('%s - "%s %s HTTP/%s" %d', "198.51.100.7:40123", "GET", "/", "1.1", 200)
    assert "198.51" not in caplog.text and "40123" not in caplog.text


def _port_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "relay.sfu.port"]


@pytest.mark.parametrize("mode", ["none", "hashed", "full"])
def test_latch_lines(caplog: pytest.LogCaptureFixture, mode: str) -> None:
    privacy.configure(mode)
    with caplog.at_level(logging.DEBUG):
        h = Harness()
        _alice, bob, _video = _call(h)
        h.rebind(BOB, BOB_MOVED)
        h.receive(check(h, "bob", "subscriber", nominate=False), BOB_MOVED)
        h.receive(rtcp.receiver_report(1234, []), BOB_MOVED)
    lines = _port_lines(caplog)
    latched = [line for line in lines if "bob: subscriber connection latched to" in line]
    moved = [line for line in lines if "bob: subscriber connection moved from" in line]
    assert len(latched) == 1 and len(moved) == 1, lines
    assert moved[0].endswith("(same host, new port)")
    text = "\n".join(lines)
    if mode == "full":
        assert latched[0].endswith("10.0.0.2:5000")
        assert "from 10.0.0.2:5000 to 10.0.0.2:5999" in moved[0]
    else:
        assert "10.0.0" not in text and "5000" not in text and "5999" not in text
        assert ("client#" in latched[0]) == (mode == "hashed")


def test_latch_moves_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """A client flipping between two addresses cannot flood the log."""
    with caplog.at_level(logging.INFO):
        h = Harness()
        _alice, bob, _video = _call(h)
        sub = bob.subscriber_leg
        h.rebind(BOB, BOB_MOVED)
        h.receive(check(h, "bob", "subscriber", nominate=False), BOB_MOVED)
        for i in range(40):
            where = BOB_MOVED if i % 2 == 0 else BOB
            h.receive(rtcp.receiver_report(1234, []), where)
            assert sub.transport.addr == where
        lines = [line for line in _port_lines(caplog) if "bob: subscriber" in line]
        assert len(lines) == LOG_BURST  # the latch and LOG_BURST - 1 moves
        h.now += 1 / LOG_RATE
        h.receive(rtcp.receiver_report(1234, []), BOB_MOVED)
        lines = [line for line in _port_lines(caplog) if "bob: subscriber" in line]
    assert len(lines) == LOG_BURST + 1
    assert lines[-1].endswith(f"({40 - (LOG_BURST - 1)} similar lines suppressed)"), lines[-1]


@pytest.mark.parametrize("mode", ["hashed", "full"])
def test_failed_dtls_handshake_line(caplog: pytest.LogCaptureFixture, mode: str) -> None:
    """A client that passes ICE but whose DTLS certificate is not the one its SDP announced:
    one warning, with the address as configured."""
    privacy.configure(mode)
    with caplog.at_level(logging.INFO):
        h = Harness()
        h.sfu.add_participant("r", "alice")
        h.publish("alice", aiortc_offer())
        leg = h.sfu.get_participant("r", "alice").publisher_leg
        # the relay expects another certificate than the one the client will present
        leg.transport.remote_fingerprints = [("sha-256", ":".join(["AB"] * 32))]
        with pytest.raises(RuntimeError):
            h.connect(leg, ALICE)
        assert leg.transport.addr == ALICE and leg.transport.failure_reason
    failed = [line for line in _port_lines(caplog) if "DTLS handshake" in line]
    assert len(failed) == 1, _port_lines(caplog)
    assert "alice" in failed[0] and "publisher connection" in failed[0]
    if mode == "full":
        assert "with 10.0.0.1:4000 failed" in failed[0]
    else:
        assert TAG_IN.search(failed[0]) and "10.0.0.1" not in failed[0]
