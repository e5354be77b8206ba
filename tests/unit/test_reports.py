"""Abuse reports (relay/api/reports.py): configuration, the rate limit, the store, and the
route in process against the real SFU core."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.api.app import create_app
from relay.api.events import EventBus
from relay.api.reports import CATEGORIES, ReportCreated, ReportLimiter, ReportStore, _clean
from relay.api.tokens import encode_token
from relay.config import ConfigError, Settings, load_settings
from relay.metrics import Metrics
from relay.rtc.dtls import Certificate
from relay.sfu.leg import CallbackSender
from relay.sfu.sfu import Sfu

KEY = "devkey"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "s" * 40
WEBHOOK_SECRET = "hook-secret"
CERTIFICATE = Certificate.generate()


# --------------------------------------------------------------------------------------------
# Configuration


def test_region_eu_without_reports_file_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[compliance]\nregion = "eu"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    assert "compliance.reports_file" in str(info.value)


def test_region_settings_are_read(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[compliance]\nregion = "de"\nreports_file = "{tmp_path / "r.jsonl"}"\n'
        "reports_per_hour = 3\n"
    )
    compliance = load_settings(config, environ={}).compliance
    assert (compliance.region, compliance.reports_per_hour) == ("DE", 3)
    # outside a reporting region no file is needed
    config.write_text('[compliance]\nregion = "US"\n')
    assert load_settings(config, environ={}).compliance.region == "US"


# --------------------------------------------------------------------------------------------
# Rate limit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_allows_per_hour_then_refuses_with_retry_after() -> None:
    clock = Clock()
    limiter = ReportLimiter(2, clock=clock)
    key = ("r1", "alice")
    assert limiter.reserve(key)[0] is not None
    clock.now += 600
    assert limiter.reserve(key)[0] is not None
    stamp, retry_after = limiter.reserve(key)
    assert stamp is None and retry_after == 3000  # the first report leaves the window then
    assert limiter.refused == 1
    # another reporter, or the same participant id in another room, has its own budget
    assert limiter.reserve(("r1", "bob"))[0] is not None
    assert limiter.reserve(("r2", "alice"))[0] is not None
    clock.now += 3000
    assert limiter.reserve(key)[0] is not None
    assert limiter.reserve(key)[0] is None


def test_limiter_release_gives_the_report_back() -> None:
    limiter = ReportLimiter(1, clock=Clock())
    stamp, _ = limiter.reserve(("r1", "alice"))
    assert stamp is not None
    limiter.release(("r1", "alice"), stamp)
    assert limiter.reserve(("r1", "alice"))[0] is not None


def test_limiter_forgets_reporters_outside_the_window() -> None:
    clock = Clock()
    limiter = ReportLimiter(5, clock=clock)
    for index in range(1000):
        limiter.reserve(("r1", f"p{index}"))
    assert len(limiter) == 1000
    clock.now += 3601
    limiter.reserve(("r1", "late"))
    assert len(limiter) == 1


# --------------------------------------------------------------------------------------------
# Store


async def test_store_appends_lines_to_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "reports.jsonl"
    store = ReportStore(str(path))
    await asyncio.gather(*(store.append({"n": n, "text": "ü\nline"}) for n in range(20)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]
    assert sorted(r["n"] for r in records) == list(range(20))
    assert all(r["text"] == "ü\nline" for r in records)


async def test_store_failure_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = ReportStore(str(blocker / "reports.jsonl"))  # a parent that is a file
    with pytest.raises(OSError):
        await store.append({"n": 1})


def test_statistics_lose_address_keys_and_non_finite_numbers() -> None:
    stats = {
        "inbound": [{"packets": 3, "jitter": float("nan"), "remote_address": "192.0.2.1"}],
        "ip": "192.0.2.1",
        "candidate_pair": {"local": "x"},
        "skip_count": 1,
    }
    assert _clean(stats) == {"inbound": [{"packets": 3, "jitter": None}], "skip_count": 1}


# --------------------------------------------------------------------------------------------
# The route, in process


class World:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        self.bus = EventBus(settings, transport=transport)
        self.sfu = Sfu(
            settings,
            certificate=CERTIFICATE,
            candidates=[("127.0.0.1", 40000)],
            sender=CallbackSender(lambda data, addr: None),
            clock=time.monotonic,
            emit=self.bus.publish,
            metrics=Metrics(),
        )
        self.app = create_app(self.sfu, settings, self.bus, Metrics())

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://x")


def make_settings(tmp_path: Path, region: str = "EU", **compliance: Any) -> Settings:
    settings = Settings()
    return dataclasses.replace(
        settings,
        api=dataclasses.replace(settings.api, keys=(KEY,)),
        auth=dataclasses.replace(settings.auth, token_secret=SECRET),
        events=dataclasses.replace(
            settings.events, webhook_url="http://hook.test/events", webhook_secret=WEBHOOK_SECRET
        ),
        compliance=dataclasses.replace(
            settings.compliance,
            region=region,
            reports_file=compliance.pop("reports_file", str(tmp_path / "reports.jsonl")),
            **compliance,
        ),
    )


def token(room: str, participant: str) -> dict[str, str]:
    value = encode_token(room, participant, secret=SECRET, expires_at=time.time() + 600)
    return {"Authorization": f"Bearer {value}"}


def report(reported: str = "bob", **fields: Any) -> dict[str, Any]:
    return {
        "reported_participant_id": reported,
        "category": "harassment",
        "explanation": "insults in the chat",
        "good_faith": True,
        **fields,
    }


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    world = World(make_settings(tmp_path))
    async with world.client() as http:
        assert (await http.post("/v1/rooms", json={"room_id": "r1"}, headers=AUTH)).is_success
        for pid in ("alice", "bob"):
            r = await http.post(
                "/v1/rooms/r1/participants", json={"participant_id": pid}, headers=AUTH
            )
            assert r.status_code == 201
    yield world


async def test_openapi_shows_the_route_and_its_errors(world: World) -> None:
    async with world.client() as http:
        document = (await http.get("/openapi.json")).json()
    operation = document["paths"]["/v1/rooms/{room_id}/reports"]["post"]
    assert {"201", "400", "401", "403", "404", "422", "429", "503"} <= set(operation["responses"])
    assert "not_available_in_region" in operation["responses"]["404"]["description"]
    assert "too_many_reports" in operation["responses"]["429"]["description"]
    schema = document["components"]["schemas"]["ReportRequest"]
    assert set(schema["required"]) == {
        "reported_participant_id",
        "category",
        "explanation",
        "good_faith",
    }
    assert sorted(schema["properties"]["category"]["enum"]) == sorted(CATEGORIES)


async def test_api_key_names_the_reporter(world: World, tmp_path: Path) -> None:
    async with world.client() as http:
        r = await http.post("/v1/rooms/r1/reports", json=report(), headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == "reporter_required"
        r = await http.post(
            "/v1/rooms/r1/reports", json=report(reporter_participant_id="nobody"), headers=AUTH
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "participant_not_found"
        assert "reporter" in r.json()["error"]["message"]
        r = await http.post(
            "/v1/rooms/r1/reports", json=report(reporter_participant_id="alice"), headers=AUTH
        )
        assert r.status_code == 201, r.text
    (line,) = (tmp_path / "reports.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["reporter_participant_id"] == "alice"
    assert record["reported_participant_id"] == "bob"
    assert record["report_id"] == r.json()["report_id"]


async def test_token_reports_only_as_itself_in_its_room(world: World) -> None:
    async with world.client() as http:
        r = await http.post("/v1/rooms/r2/reports", json=report(), headers=token("r2", "alice"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "room_not_found"
        r = await http.post("/v1/rooms/r1/reports", json=report(), headers=token("r2", "alice"))
        assert r.status_code == 403
        r = await http.post(
            "/v1/rooms/r1/reports",
            json=report(reported="alice", reporter_participant_id="bob"),
            headers=token("r1", "alice"),
        )
        assert r.status_code == 403
        # a participant that left may not report any more
        r = await http.delete("/v1/rooms/r1/participants/alice", headers=AUTH)
        assert r.status_code == 204
        r = await http.post("/v1/rooms/r1/reports", json=report(), headers=token("r1", "alice"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "participant_not_found"


async def test_a_report_that_cannot_be_stored_is_not_received(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    settings = make_settings(
        tmp_path, reports_file=str(blocker / "reports.jsonl"), reports_per_hour=1
    )
    world = World(settings)
    async with world.client() as http:
        await http.post("/v1/rooms", json={"room_id": "r1"}, headers=AUTH)
        for pid in ("alice", "bob"):
            await http.post("/v1/rooms/r1/participants", json={"participant_id": pid}, headers=AUTH)
        for _ in range(2):  # a failed report does not use up the reporter's budget
            r = await http.post("/v1/rooms/r1/reports", json=report(), headers=token("r1", "alice"))
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "report_store_unavailable"
    queue = world.bus._webhook_queue
    assert queue is not None
    kinds = [queue.get_nowait().kind for _ in range(queue.qsize())]
    assert "participant.joined" in kinds and "report.created" not in kinds


async def test_report_created_goes_to_the_webhook_only(tmp_path: Path) -> None:
    received: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(204)

    world = World(make_settings(tmp_path), transport=httpx.MockTransport(handler))
    world.bus.start()
    stream = world.bus.subscribe("r1")
    everything = world.bus.subscribe()
    try:
        async with world.client() as http:
            await http.post("/v1/rooms", json={"room_id": "r1"}, headers=AUTH)
            for pid in ("alice", "bob"):
                await http.post(
                    "/v1/rooms/r1/participants", json={"participant_id": pid}, headers=AUTH
                )
            r = await http.post(
                "/v1/rooms/r1/reports",
                json=report(contact="reach-me@example.org"),
                headers=token("r1", "alice"),
            )
            assert r.status_code == 201, r.text
        for _ in range(100):
            if any(q.headers["X-Relay-Event"] == "report.created" for q in received):
                break
            await asyncio.sleep(0.02)
        (request,) = [q for q in received if q.headers["X-Relay-Event"] == "report.created"]
        body = request.content
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers["X-Relay-Signature"], expected)
        data = json.loads(body)
        assert data["type"] == ReportCreated.type and data["report_id"] == r.json()["report_id"]
        assert data["has_contact"] is True and "contact" not in data
        assert b"reach-me" not in body
        for subscription in (stream, everything):
            kinds = []
            while (delivery := subscription.next_ready()) not in (False, None):
                assert delivery is not None and delivery is not False
                kinds.append(delivery.kind)
            assert "participant.joined" in kinds and "report.created" not in kinds
    finally:
        await world.bus.aclose()


async def test_outside_a_reporting_region_the_route_is_not_available(tmp_path: Path) -> None:
    for region in ("", "US"):
        world = World(make_settings(tmp_path, region=region, reports_file=""))
        async with world.client() as http:
            for headers in (AUTH, {}, token("r1", "alice")):
                r = await http.post("/v1/rooms/r1/reports", json={"x": 1}, headers=headers)
                assert r.status_code == 404, r.text
                assert r.json()["error"]["code"] == "not_available_in_region"
    assert not os.listdir(tmp_path)
