"""A participant never learns another participant's address, and the log shows client
addresses only as ``[log] client_addresses`` says (and never metadata, SDP or keys).

A real 3-party aiortc call through ``relay serve``, once per ``client_addresses`` mode, at log
level debug. For every participant the test keeps what the relay hands it (its publisher
answers and subscriber offers) and what the API says about it (its participant dict and
stats), plus every event of the room on SSE, every webhook delivery and ``GET /v1/rooms``.
Each client's own transport addresses are read from its aiortc ICE transports (the local
candidates: on loopback every client has the IP 127.0.0.1, so what tells them apart is the
port). In ``full`` mode the relay's "latched to" log lines must name those very addresses,
which shows the test looks at the right ones.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.clients import CallClient, wait_for
from tests.integration.conftest import (
    EventListener,
    RunningRelay,
    auth_headers,
    new_room,
    spawn_relay,
    stop_relay,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.integration

IDENTITIES = ["red", "green", "blue"]
#: in every participant's metadata; must never reach the log, even at debug level
MARKER = "privacy-marker-5f1c9e"
TAG = re.compile(r"client#[0-9a-f]{8}\b")

Address = tuple[str, int]


class Webhook:
    """A local webhook receiver that keeps every body it is sent."""

    def __init__(self) -> None:
        bodies: list[bytes] = []
        self.bodies = bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server interface
                length = int(self.headers.get("Content-Length") or 0)
                bodies.append(self.rfile.read(length))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RecordingClient(CallClient):
    """A call participant that joins with metadata and keeps every SDP the relay hands it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sdps: list[str] = []
        self.http.event_hooks["response"].append(self._keep_sdp)

    async def _keep_sdp(self, response: httpx.Response) -> None:
        path = response.request.url.path
        if response.status_code < 300 and path.endswith(("/publisher", "/subscriber")):
            await response.aread()
            if response.content:
                body = response.json()
                if isinstance(body, dict) and isinstance(body.get("sdp"), str):
                    self.sdps.append(body["sdp"])

    async def join(self) -> None:
        await self.join_with({"label": MARKER, "nested": {"note": MARKER}})

    async def join_with(self, metadata: dict[str, Any]) -> None:
        r = await self.http.post(
            f"/v1/rooms/{self.room}/participants",
            json={"participant_id": self.participant_id, "metadata": metadata},
        )
        r.raise_for_status()
        self._tasks.append(asyncio.create_task(self._follow_events()))

    def local_addresses(self) -> set[Address]:
        """Every (ip, port) this client's ICE transports gathered: where its packets come from."""
        found: set[Address] = set()
        for pc in (self.pub, self.sub):
            if pc is None:
                continue
            for transceiver in pc.getTransceivers():
                for dtls in (transceiver.sender.transport, transceiver.receiver.transport):
                    if dtls is None:
                        continue
                    gatherer = dtls.transport.iceGatherer
                    for candidate in gatherer.getLocalCandidates():
                        found.add((candidate.ip, int(candidate.port)))
        return found


def _decodes_everyone(clients: list[RecordingClient]) -> bool:
    names = set(IDENTITIES)
    return all(
        all(c.received.frames.get(n, 0) >= 10 for n in names - {c.identity}) for c in clients
    )


def _address_patterns(addresses: set[Address]) -> list[re.Pattern[str]]:
    """What an address looks like in text: ip:port, [ip]:port, "ip port" (a candidate line),
    and the bare port number."""
    patterns = []
    for ip, port in addresses:
        patterns.append(re.compile(rf"{re.escape(ip)}\]?[: ]{port}(?!\d)"))
        patterns.append(re.compile(rf"(?<![\d.]){port}(?!\d)"))
    return patterns


def _json_leaks(value: Any, addresses: set[Address], where: str) -> list[str]:
    """Address-like findings in a JSON document: a string with ip:port or the port in it, or a
    number equal to a client port under a key that names an address or a port."""
    problems: list[str] = []
    ports = {port for _, port in addresses}
    patterns = _address_patterns(addresses)

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str):
            if any(p.search(node) for p in patterns):
                problems.append(f"{where}: {key} = {node!r}")
        elif isinstance(node, int) and not isinstance(node, bool):
            lowered = key.lower()
            named = any(w in lowered for w in ("port", "addr", "ip", "candidate", "remote"))
            if named and node in ports:
                problems.append(f"{where}: {key} = {node}")

    walk(value, "")
    return problems


def _sdp_leaks(sdp: str, addresses: set[Address], relay_ports: set[int], where: str) -> list[str]:
    """An SDP from the relay may carry the relay's own candidates and ports only."""
    problems = [
        f"{where}: {p.pattern} in the SDP" for p in _address_patterns(addresses) if p.search(sdp)
    ]
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            port = int(line.split()[5])
            if port not in relay_ports:
                problems.append(f"{where}: candidate on a port not the relay's: {line}")
        elif line.startswith("m="):
            port = int(line.split()[1])
            if port not in relay_ports | {0, 9}:
                problems.append(f"{where}: m-line port not the relay's: {line}")
    return problems


def _http_peer_port(relay: RunningRelay) -> int:
    """Send one malformed request to the API from a socket whose port the test knows."""
    with socket.create_connection(("127.0.0.1", relay.api_port), timeout=5) as s:
        port = s.getsockname()[1]
        s.sendall(b"NOT-HTTP \x00\r\n\r\n")
        s.settimeout(5)
        try:
            s.recv(4096)
        except OSError:
            pass
    return port


@pytest.fixture()
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


async def _call(relay: RunningRelay, webhook: Webhook) -> dict[str, Any]:
    """A 3-party call: every view of every participant, and each client's addresses."""
    room = new_room(relay, "privacy")
    headers = auth_headers(relay.key)
    clients = [RecordingClient(relay.api, relay.key, room, name) for name in IDENTITIES]
    views: dict[str, dict[str, Any]] = {}
    try:
        async with EventListener(relay, room) as listener:
            for c in clients:
                await c.join()
            for c in clients:
                await c.subscribe()
                await c.publish()
            assert await wait_for(lambda: _decodes_everyone(clients), 45), [
                (c.identity, c.received) for c in clients
            ]
            async with httpx.AsyncClient(base_url=relay.api, headers=headers) as http:
                for c in clients:
                    base = f"/v1/rooms/{room}/participants/{c.participant_id}"
                    views[c.identity] = {
                        "sdps": list(c.sdps),
                        "participant": (await http.get(base)).json(),
                        "stats": (await http.get(f"{base}/stats")).json(),
                    }
                shared = {
                    "rooms": (await http.get("/v1/rooms")).json(),
                    "room": (await http.get(f"/v1/rooms/{room}")).json(),
                }
            addresses = {c.identity: c.local_addresses() for c in clients}
            for c in clients:
                await c.leave()
            await listener.wait_for("participant.left", 10, participant_id=IDENTITIES[-1])
            events = list(listener.events)
        await wait_for(lambda: len(webhook.bodies) >= len(events), 10)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return {
        "room": room,
        "views": views,
        "shared": shared,
        "events": events,
        "webhooks": [json.loads(body) for body in webhook.bodies],
        "addresses": addresses,
    }


def _relay_with(tmp: Path, mode: str, webhook: Webhook) -> RunningRelay:
    extra = (
        f'[log]\nlevel = "debug"\nclient_addresses = "{mode}"\n'
        f'[events]\nwebhook_url = "{webhook.url}"\n'
        # load shedding off: a busy test machine must not turn the call away
        "[overload]\nenabled = false\n"
    )
    config, api_port, media_port = write_config(tmp, extra)
    spawned = spawn_relay(tmp, ["serve", "--config", str(config)])
    api = f"http://127.0.0.1:{api_port}"
    # a generous start-up time: other tests may keep the machine's cores busy
    if not wait_healthy(spawned, api, timeout=60):
        spawned.stop()
        raise AssertionError(f"relay did not start: {spawned.stderr()[-3000:]}")
    return RunningRelay(api, media_port, "testkey", spawned.process, spawned.stderr_path)


@pytest.mark.parametrize("mode", ["hashed", "none", "full"])
async def test_addresses_stay_private(tmp_path: Path, webhook: Webhook, mode: str) -> None:
    relay = _relay_with(tmp_path, mode, webhook)
    try:
        http_port = _http_peer_port(relay)
        seen = await _call(relay, webhook)
        await asyncio.sleep(0.5)  # the last log lines out
        log = relay.log()
    finally:
        stop_relay(relay)
    addresses: dict[str, set[Address]] = seen["addresses"]
    relay_ports = {relay.media_port}
    everyone = set().union(*addresses.values())
    for name in IDENTITIES:
        assert ("127.0.0.1", relay.media_port) not in addresses[name]
        assert addresses[name], f"{name}: no local ICE candidates found"

    # -- what each participant is handed or shown -----------------------------------------
    problems: list[str] = []
    for name in IDENTITIES:
        view = seen["views"][name]
        others = set().union(*(addresses[o] for o in IDENTITIES if o != name))
        assert len(view["sdps"]) >= 2, f"{name}: publisher answer and subscriber offer kept"
        for i, sdp in enumerate(view["sdps"]):
            problems += _sdp_leaks(sdp, others, relay_ports, f"{name} sdp {i}")
        problems += _json_leaks(view["participant"], others, f"{name} participant")
        problems += _json_leaks(view["stats"], others, f"{name} stats")
        assert view["stats"]["inbound"] and view["stats"]["outbound"], view["stats"]
    # events, webhooks and room listings are seen by (or about) everyone: no address at all
    assert len(seen["events"]) >= 9, seen["events"]
    assert len(seen["webhooks"]) >= len(seen["events"]), (len(seen["webhooks"]), seen["events"])
    for i, event in enumerate(seen["events"]):
        problems += _json_leaks(event, everyone, f"event {i} {event.get('type')}")
    for i, body in enumerate(seen["webhooks"]):
        problems += _json_leaks(body, everyone, f"webhook {i}")
    problems += _json_leaks(seen["shared"], everyone, "GET /v1/rooms")
    assert not problems, "\n".join(problems)

    # -- the log ---------------------------------------------------------------------------
    # the marker was stored with each participant (the API shows it), and never logged
    assert all(v["participant"]["metadata"]["label"] == MARKER for v in seen["views"].values())
    assert MARKER not in log, "participant metadata in the log"
    assert "testkey" not in log, "the API key in the log"
    assert "/hook" not in log, "the webhook URL (it may carry a credential) in the log"
    for sdp in (s for v in seen["views"].values() for s in v["sdps"]):
        for line in sdp.splitlines():
            if line.startswith("a=ice-pwd:"):
                assert line.split(":", 1)[1] not in log, f"SDP content in the log: {line}"
    latched = re.findall(
        r"participant (\w+): (publisher|subscriber) connection latched to (.*)", log
    )
    assert {(p, role) for p, role, _ in latched} >= {
        (p, role) for p in IDENTITIES for role in ("publisher", "subscriber")
    }, log[-4000:]
    text_addresses = _address_patterns(everyone | {("127.0.0.1", http_port)})
    if mode == "full":
        for participant, role, shown in latched:
            ip, _, port = shown.strip().rpartition(":")
            assert (ip, int(port)) in addresses[participant], (participant, role, shown)
    else:
        found = [p.pattern for p in text_addresses if p.search(log)]
        assert not found, (found, log[-4000:])
        assert all(
            (TAG.fullmatch(shown.strip()) if mode == "hashed" else shown.strip() == "client")
            for _, _, shown in latched
        ), latched
    # the HTTP server's peer address never shows in the log, whatever the mode (no access log)
    assert not re.search(rf"(?<!\d){http_port}(?!\d)", log)
