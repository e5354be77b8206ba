"""Abuse reports through a real `relay serve`: in a reporting region a participant reports
another one, the report lands in the JSON-lines file (durable across a restart) and reaches
the webhook signed, never an event stream; bad reports get their documented errors; the rate
limit holds; outside such a region the endpoint does not exist for anyone."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from relay.api.tokens import encode_token
from relay.client.peer import TrackSpec
from tests.integration.conftest import (
    EventListener,
    RtpSender,
    RunningRelay,
    add_participant,
    add_room,
    api_client,
    peer_publisher,
    room_name,
    start_relay,
    stop_relay,
    wait_until,
)

pytestmark = pytest.mark.integration

SECRET = "reports-test-token-secret-0123456789abcdef"
WEBHOOK_SECRET = "reports-test-webhook-secret"
PER_HOUR = 3
TRACKS = [TrackSpec("audio", 0x0C0C0C0C), TrackSpec("video", 0x0D0D0D0D)]
RECORD_FIELDS = {
    "report_id",
    "received_at",
    "room_id",
    "reporter_participant_id",
    "reported_participant_id",
    "category",
    "explanation",
    "contact",
    "good_faith",
    "reported_tracks",
    "reported_stats",
    "relay_version",
}


@dataclass
class Webhook:
    """A local HTTP server that keeps every request POSTed to it."""

    url: str
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def of_type(self, kind: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b in self.requests if h.get("x-relay-event") == kind]


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook: Webhook

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server spelling
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            hook.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook = Webhook(f"http://127.0.0.1:{server.server_address[1]}/hook")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()
    thread.join(5)


def config(reports_file: Path | None, region: str, webhook_url: str = "") -> str:
    text = f'[auth]\ntoken_secret = "{SECRET}"\n[compliance]\nregion = "{region}"\n'
    if reports_file is not None:
        text += f'reports_file = "{reports_file}"\nreports_per_hour = {PER_HOUR}\n'
    if webhook_url:
        text += f'[events]\nwebhook_url = "{webhook_url}"\nwebhook_secret = "{WEBHOOK_SECRET}"\n'
    return text


def token(room: str, participant: str) -> dict[str, str]:
    value = encode_token(room, participant, secret=SECRET, expires_at=time.time() + 600)
    return {"Authorization": f"Bearer {value}"}


def report(reported: str, **fields: object) -> dict[str, object]:
    return {
        "reported_participant_id": reported,
        "category": "harassment",
        "explanation": "shouted insults at me on camera",
        "good_faith": True,
        **fields,
    }


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class EuRelay:
    relay: RunningRelay
    reports_file: Path


@pytest.fixture(scope="module")
def eu(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> Iterator[EuRelay]:
    tmp = tmp_path_factory.mktemp("reports")
    reports_file = tmp / "compliance" / "reports.jsonl"
    relay = start_relay(tmp, config(reports_file, "EU", webhook.url))
    yield EuRelay(relay, reports_file)
    stop_relay(relay)


async def test_a_report_is_stored_and_sent_to_the_webhook_only(
    eu: EuRelay, webhook: Webhook
) -> None:
    relay = eu.relay
    room = room_name("rep")
    async with api_client(relay) as http:
        await add_room(http, room)
        await add_participant(http, room, "alice")
        async with (
            EventListener(relay, room) as events,
            peer_publisher(http, room, "bob", TRACKS) as bob,
            RtpSender(bob, TRACKS),
        ):

            async def bob_sends() -> bool:
                stats = (await http.get(f"/v1/rooms/{room}/participants/bob/stats")).json()
                inbound = stats["inbound"]
                return len(inbound) == 2 and all(t["packets"] >= 20 for t in inbound)

            assert await wait_until(bob_sends, 10)
            r = await http.post(
                f"/v1/rooms/{room}/reports",
                json=report("bob", category="hate_speech", contact="reporter@example.org"),
                headers=token(room, "alice"),
            )
            assert r.status_code == 201, r.text
            receipt = r.json()
            assert receipt["report_id"].startswith("rep_")
            assert abs(receipt["received_at"] - time.time()) < 60
            assert "received" in receipt["message"]

            # on disk before the answer, with the reported participant's tracks and stats
            assert stat.S_IMODE(eu.reports_file.stat().st_mode) == 0o600
            (record,) = [x for x in records(eu.reports_file) if x["room_id"] == room]
            assert set(record) == RECORD_FIELDS
            assert record["report_id"] == receipt["report_id"]
            assert record["received_at"] == receipt["received_at"]
            assert (record["reporter_participant_id"], record["reported_participant_id"]) == (
                "alice",
                "bob",
            )
            assert record["category"] == "hate_speech"
            assert record["explanation"] == "shouted insults at me on camera"
            assert record["contact"] == "reporter@example.org"
            assert record["good_faith"] is True
            kinds = {t["kind"]: t for t in record["reported_tracks"]}
            assert set(kinds) == {"audio", "video"}
            assert kinds["audio"]["codec"].lower() == "audio/opus"
            assert kinds["video"]["codec"].lower() == "video/vp8"
            stats = record["reported_stats"]
            assert stats["participant_id"] == "bob"
            assert {t["track_id"] for t in stats["inbound"]} == {
                t["track_id"] for t in record["reported_tracks"]
            }
            assert all(t["packets"] >= 20 for t in stats["inbound"])
            assert "127.0.0.1" not in eu.reports_file.read_text()

            # the webhook gets report.created, signed; contact stays in the file
            assert await wait_until(lambda: webhook.of_type("report.created"), 5)
            matching = [
                (h, b)
                for h, b in webhook.of_type("report.created")
                if json.loads(b)["report_id"] == receipt["report_id"]
            ]
            assert len(matching) == 1
            headers, body = matching[0]
            expected = (
                "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
            )
            assert hmac.compare_digest(headers["x-relay-signature"], expected)
            event = json.loads(body)
            assert event["type"] == "report.created" and event["room_id"] == room
            assert event["reported_participant_id"] == "bob"
            assert event["reporter_participant_id"] == "alice"
            assert event["category"] == "hate_speech" and event["has_contact"] is True
            assert b"reporter@example.org" not in body

            # the room's event stream never sees it: an event published after the report
            # arrives, the report does not
            await add_participant(http, room, "carol")
            assert await events.wait_for("participant.joined", 5, participant_id="carol")
            assert events.find("report.created") is None, events.events
            # the other events do reach the webhook too (it is the same signed channel)
            assert await wait_until(
                lambda: any(
                    json.loads(b).get("participant_id") == "carol"
                    for _, b in webhook.of_type("participant.joined")
                ),
                5,
            )
    log = relay.log()
    assert receipt["report_id"] in log
    assert "shouted insults" not in log and "reporter@example.org" not in log


async def test_bad_reports_get_their_documented_errors(eu: EuRelay) -> None:
    relay = eu.relay
    room, other = room_name("rep"), room_name("rep")
    async with api_client(relay) as http:
        await add_room(http, room)
        await add_room(http, other)
        for pid in ("alice", "bob"):
            await add_participant(http, room, pid)
        before = len(records(eu.reports_file))
        url = f"/v1/rooms/{room}/reports"
        alice = token(room, "alice")

        async def expect(status: int, code: str, body: object, headers: dict) -> None:
            r = await http.post(url, json=body, headers=headers)
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code, r.text

        await expect(400, "good_faith_required", report("bob", good_faith=False), alice)
        await expect(422, "invalid_request", report("bob", good_faith="yes"), alice)
        await expect(404, "participant_not_found", report("nobody"), alice)
        await expect(400, "self_report", report("alice"), alice)
        await expect(422, "invalid_request", report("bob", explanation="x" * 4001), alice)
        await expect(422, "invalid_request", report("bob", explanation="   "), alice)
        await expect(422, "invalid_request", report("bob", category="rudeness"), alice)
        await expect(422, "invalid_request", report("bob", contact="c" * 321), alice)
        await expect(403, "forbidden", report("bob"), token(other, "alice"))
        await expect(400, "reporter_required", report("bob"), {})  # the API key
        await expect(401, "unauthorized", report("bob"), {"Authorization": "Bearer wrong"})
        assert len(records(eu.reports_file)) == before
        # at the limits it is taken; an API key may report for a participant of the room
        r = await http.post(url, json=report("bob", explanation="x" * 4000), headers=alice)
        assert r.status_code == 201, r.text
        r = await http.post(url, json=report("alice", reporter_participant_id="bob"))
        assert r.status_code == 201, r.text
        mine = [x for x in records(eu.reports_file) if x["room_id"] == room]
        assert [(x["reporter_participant_id"], x["contact"]) for x in mine] == [
            ("alice", None),
            ("bob", None),
        ]
        assert len(mine[0]["explanation"]) == 4000


async def test_reports_are_rate_limited_per_reporter(eu: EuRelay) -> None:
    relay = eu.relay
    room = room_name("rep")
    async with api_client(relay) as http:
        await add_room(http, room)
        for pid in ("alice", "bob", "carol"):
            await add_participant(http, room, pid)
        url = f"/v1/rooms/{room}/reports"
        ids = []
        for _ in range(PER_HOUR):
            r = await http.post(url, json=report("bob"), headers=token(room, "alice"))
            assert r.status_code == 201, r.text
            ids.append(r.json()["report_id"])
        r = await http.post(url, json=report("carol"), headers=token(room, "alice"))
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "too_many_reports"
        assert 3500 <= int(r.headers["Retry-After"]) <= 3600
        # another reporter of the room still has its own budget
        r = await http.post(url, json=report("bob"), headers=token(room, "carol"))
        assert r.status_code == 201, r.text
        ids.append(r.json()["report_id"])
    mine = [x["report_id"] for x in records(eu.reports_file) if x["room_id"] == room]
    assert mine == ids


async def test_reports_survive_a_restart(tmp_path: Path) -> None:
    reports_file = tmp_path / "reports.jsonl"
    ids = []
    for run in range(2):
        run_dir = tmp_path / f"run{run}"
        run_dir.mkdir()
        relay = start_relay(run_dir, config(reports_file, "DE"))
        try:
            room = room_name("rep")
            async with api_client(relay) as http:
                await add_room(http, room)
                for pid in ("alice", "bob"):
                    await add_participant(http, room, pid)
                before = reports_file.read_bytes() if reports_file.exists() else b""
                for _ in range(2):
                    r = await http.post(
                        f"/v1/rooms/{room}/reports",
                        json=report("bob"),
                        headers=token(room, "alice"),
                    )
                    assert r.status_code == 201, r.text
                    ids.append(r.json()["report_id"])
                after = reports_file.read_bytes()
                assert after.startswith(before)  # appended, nothing rewritten
        finally:
            assert stop_relay(relay) == 0
    assert [x["report_id"] for x in records(reports_file)] == ids
    assert len(set(ids)) == 4


@pytest.mark.parametrize("region", ["", "US"])
async def test_outside_a_reporting_region_there_are_no_reports(tmp_path: Path, region: str) -> None:
    relay = start_relay(tmp_path, config(None, region))
    try:
        room = room_name("rep")
        async with api_client(relay) as http:
            await add_room(http, room)
            for pid in ("alice", "bob"):
                await add_participant(http, room, pid)
            for headers in (token(room, "alice"), {}):  # a participant, the API key
                r = await http.post(
                    f"/v1/rooms/{room}/reports",
                    json=report("bob", reporter_participant_id="alice"),
                    headers=headers,
                )
                assert r.status_code == 404, r.text
                assert r.json()["error"]["code"] == "not_available_in_region"
        # even a caller without credentials learns only that
        r = httpx.post(f"{relay.api}/v1/rooms/{room}/reports", json={})
        assert r.json()["error"]["code"] == "not_available_in_region"
    finally:
        assert stop_relay(relay) == 0
