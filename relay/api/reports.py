"""Abuse reports: the notice of the EU Digital Services Act, Article 16.

Where the law requires a way to report illegal content (``compliance.region`` in
:data:`relay.config.REPORTING_REGIONS`), ``POST /v1/rooms/{room_id}/reports`` takes a notice
from one participant about another: a category, an explanation of why the content is
illegal, an optional contact and a statement of good faith. The relay confirms receipt with a
report id once the report is on disk: one JSON object a line in ``compliance.reports_file``
(:class:`ReportStore`), flushed and fsynced before the answer. Anywhere else the endpoint
answers ``404 not_available_in_region``.

A report holds metadata only: ids, times, what the reporter wrote, and the reported
participant's tracks (ids, kinds, codecs) and statistics at that moment; never media, never an
IP address. It is announced to the webhook alone as ``report.created`` (never to an event
stream, which the reported participant may be reading). Nothing of a report is logged except
its id. The relay never deletes reports: keeping and erasing them is the operator's duty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, get_args

from fastapi import APIRouter, Depends, Request, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from relay import __version__
from relay.api.auth import Principal, authenticate
from relay.api.events import EventBus
from relay.api.schemas import ErrorResponse, Identifier, RoomIdParam, valid_text
from relay.config import REPORTING_REGIONS, Settings
from relay.sfu.errors import BadRequest, Forbidden, LimitReached, NotFound, SfuError
from relay.sfu.events import Event

__all__ = [
    "CATEGORIES",
    "MAX_CONTACT_CHARS",
    "MAX_EXPLANATION_CHARS",
    "RECEIPT_MESSAGE",
    "ReportCreated",
    "ReportLimiter",
    "ReportReceipt",
    "ReportRequest",
    "ReportStore",
    "reports_router",
]

log = logging.getLogger("relay.reports")

#: What a report may be about (``category``).
ReportCategory = Literal[
    "illegal_content",
    "harassment",
    "hate_speech",
    "child_safety",
    "violence",
    "impersonation",
    "spam",
    "other",
]
CATEGORIES: tuple[str, ...] = get_args(ReportCategory)
MAX_EXPLANATION_CHARS = 4000
#: RFC 5321's longest e-mail address (a contact may be anything, but not longer than that)
MAX_CONTACT_CHARS = 320
#: The window of ``compliance.reports_per_hour``, in seconds.
RATE_WINDOW = 3600.0
#: The confirmation of receipt sent with every stored report.
RECEIPT_MESSAGE = (
    "Your report has been received and stored. The operator of this service reviews it; "
    "quote the report id when you refer to it."
)
#: Dictionary keys never copied from the statistics into a report (defence in depth: the
#: statistics hold no addresses today, and a report must never hold one).
_ADDRESS_KEYS = ("address", "addr", "candidate", "ip")


# --------------------------------------------------------------------------------------------
# Errors


class NotAvailableInRegion(NotFound):
    code = "not_available_in_region"


class TooManyReports(LimitReached):
    code = "too_many_reports"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class ReportStoreUnavailable(SfuError):
    status = 503
    code = "report_store_unavailable"


# --------------------------------------------------------------------------------------------
# Schemas


class ReportRequest(BaseModel):
    """``POST /v1/rooms/{room_id}/reports``: a notice about another participant of the room."""

    model_config = ConfigDict(strict=True, extra="forbid")

    reported_participant_id: Identifier = Field(
        description="The participant reported: in the room now, not the reporter."
    )
    category: ReportCategory = Field(description="What the report is about.")
    explanation: str = Field(
        min_length=1,
        max_length=MAX_EXPLANATION_CHARS,
        description=(
            "Why the reporter considers the content illegal or abusive, in their own words "
            f"(1-{MAX_EXPLANATION_CHARS} characters, not only white space)."
        ),
    )
    contact: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CONTACT_CHARS,
        description=(
            "Optional: how the operator may reach the reporter about this report (for example "
            f"an e-mail address; at most {MAX_CONTACT_CHARS} characters). Stored in the reports "
            "file only; never sent to the webhook."
        ),
    )
    good_faith: bool = Field(
        description=(
            "Must be `true`: the reporter states in good faith that the report is accurate "
            "and complete."
        )
    )
    reporter_participant_id: Identifier | None = Field(
        default=None,
        description=(
            "API keys only (required there): the participant of the room who reports. A "
            "participant token reports as its own participant."
        ),
    )

    @field_validator("explanation")
    @classmethod
    def _explained(cls, value: str) -> str:
        valid_text(value)
        if not value.strip():
            raise ValueError("must not be only white space")
        return value

    @field_validator("contact")
    @classmethod
    def _contact_text(cls, value: str | None) -> str | None:
        return None if value is None else valid_text(value)


class ReportReceipt(BaseModel):
    """The confirmation of receipt: the report is stored."""

    report_id: str = Field(description="Unique id of the report (`rep_...`).")
    received_at: float = Field(description="Unix time in seconds.")
    message: str = Field(description="A short confirmation to show the reporter.")


# --------------------------------------------------------------------------------------------
# The event


@dataclass(frozen=True, slots=True)
class ReportCreated(Event):
    """A report was stored (webhook only). ``contact`` is left out: the reporter's way to be
    reached stays in the reports file alone; ``has_contact`` says whether there is one."""

    type: ClassVar[str] = "report.created"
    report_id: str
    reporter_participant_id: str
    reported_participant_id: str
    category: str
    explanation: str
    has_contact: bool
    #: the reported participant's tracks: ``track_id``, ``kind``, ``codec``
    tracks: list[dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Rate limit


class ReportLimiter:
    """At most ``per_hour`` reports per reporter in any hour (a sliding window).

    Memory is bounded: a reporter holds at most ``per_hour`` timestamps, and reporters with
    none left in the window are forgotten (swept at most once a minute).
    """

    def __init__(
        self,
        per_hour: int,
        window: float = RATE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_hour = per_hour
        self.window = window
        self._clock = clock
        self._times: dict[tuple[str, str], deque[float]] = {}
        self._swept = clock()
        #: reports refused by the limit
        self.refused = 0

    def __len__(self) -> int:
        """Reporters remembered now."""
        return len(self._times)

    def reserve(self, key: tuple[str, str]) -> tuple[float | None, int]:
        """Take one report of ``key``'s budget: ``(stamp, 0)``, or ``(None, retry_after)``
        (whole seconds until one is free again) when the budget is spent."""
        now = self._clock()
        self._sweep(now)
        times = self._times.get(key)
        if times is not None:
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.per_hour:
                self.refused += 1
                return None, max(1, math.ceil(times[0] + self.window - now))
        else:
            times = self._times[key] = deque()
        times.append(now)
        return now, 0

    def release(self, key: tuple[str, str], stamp: float) -> None:
        """Give back a reservation whose report was not stored."""
        times = self._times.get(key)
        if times is None:
            return
        with contextlib.suppress(ValueError):
            times.remove(stamp)
        if not times:
            del self._times[key]

    def _sweep(self, now: float) -> None:
        if now - self._swept < 60.0:
            return
        self._swept = now
        cutoff = now - self.window
        for key in [key for key, times in self._times.items() if not times or times[-1] <= cutoff]:
            del self._times[key]


# --------------------------------------------------------------------------------------------
# Storage


class ReportStore:
    """Appends reports to a JSON-lines file: one object a line, each fsynced before it counts.

    The file (and any missing parent directory) is created on the first report, readable by
    its owner only (mode 0o600; directories 0o700). Each append opens the file, writes the
    whole line, fsyncs it and closes it again, in a worker thread, one append at a time; a
    line that could not be written whole is cut off again, so the file stays one object a
    line. Any failure raises :class:`OSError`.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock = asyncio.Lock()

    async def append(self, record: dict[str, Any]) -> None:
        line = _encode(record)
        async with self._lock:
            await asyncio.to_thread(self._write, line)

    def _write(self, line: bytes) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        created = not os.path.exists(self.path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if created:  # make the new directory entry durable too
            dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _encode(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8") + b"\n"


def _clean(value: Any) -> Any:
    """Statistics made safe for a report: no address-like keys, no NaN or infinity."""
    if isinstance(value, dict):
        return {
            str(key): _clean(item)
            for key, item in value.items()
            if not any(part in str(key).lower().split("_") for part in _ADDRESS_KEYS)
            and "address" not in str(key).lower()
        }
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# --------------------------------------------------------------------------------------------
# The route


class Reports:
    """What the route needs: whether reports are on, where they go, and the rate limit."""

    def __init__(self, settings: Settings) -> None:
        compliance = settings.compliance
        self.region = compliance.region
        self.enabled = compliance.region in REPORTING_REGIONS and bool(
            compliance.reports_file.strip()
        )
        self.store = ReportStore(compliance.reports_file) if self.enabled else None
        self.limiter = ReportLimiter(compliance.reports_per_hour)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": description}
    for code, description in {
        400: "`good_faith_required` (good_faith is not true), `self_report` (the reporter "
        "reports itself), `reporter_required` (an API key named no reporter_participant_id).",
        401: "Missing or invalid credentials.",
        403: "`forbidden`: a participant token of another room, or naming another reporter.",
        404: "`not_available_in_region` (reports are off where the relay runs; checked before "
        "anything else), `room_not_found`, `participant_not_found` (the reported participant, "
        "or the reporter, is not in the room now).",
        413: "Body over `api.max_body_bytes`.",
        422: "The body does not match the schema (unknown category, explanation empty or over "
        f"{MAX_EXPLANATION_CHARS} characters, contact over {MAX_CONTACT_CHARS}).",
        429: "`too_many_reports`: the reporter made `compliance.reports_per_hour` reports in "
        "the last hour; `Retry-After` says when the next one is taken.",
        503: "`report_store_unavailable`: the report could not be written to disk, so it was "
        "not received; try again later.",
    }.items()
}


def reports_router(settings: Settings) -> APIRouter:
    """``POST /v1/rooms/{room_id}/reports``, answering 404 ``not_available_in_region`` unless
    ``compliance.region`` is one of :data:`relay.config.REPORTING_REGIONS`."""
    reports = Reports(settings)
    router = APIRouter(prefix="/v1", tags=["reports"])
    if reports.enabled:
        assert reports.store is not None
        log.info(
            "abuse reports on (compliance.region %s): appended to %s",
            reports.region,
            reports.store.path,
        )

    async def reports_available() -> None:
        if not reports.enabled:
            raise NotAvailableInRegion(
                "abuse reports are not available where this relay runs (compliance.region)"
            )

    @router.post(
        "/rooms/{room_id}/reports",
        status_code=status.HTTP_201_CREATED,
        response_model=ReportReceipt,
        summary="Report a participant (notice of illegal content)",
        responses=_RESPONSES,
        dependencies=[Depends(reports_available)],
    )
    async def create_report(
        room_id: RoomIdParam,
        body: ReportRequest,
        request: Request,
        principal: Annotated[Principal, Depends(authenticate)],
    ) -> ReportReceipt:
        """A participant reports another participant of the room: the notice of the Digital
        Services Act, Article 16 (why the content is illegal, where it is: the room, the
        participant and its tracks, an optional contact, and a statement of good faith).

        Only where `compliance.region` requires it (the EU and EEA and their members);
        anywhere else `404 not_available_in_region`. A participant token reports as its own
        participant, in its own room; an API key names the reporter in
        `reporter_participant_id`. Both participants must be in the room now.

        The answer `201` comes once the report is stored durably (the reports file, fsynced);
        it carries the report id and a confirmation of receipt. The report holds the ids, the
        time, the category, explanation, contact and good-faith statement, and the reported
        participant's tracks (ids, kinds, codecs) and statistics at that moment; never media,
        never an IP address. The webhook (only; never an event stream) gets `report.created`.

        Categories: `illegal_content`, `harassment`, `hate_speech`, `child_safety`,
        `violence`, `impersonation`, `spam`, `other`. Each reporter may make
        `compliance.reports_per_hour` reports an hour; one more is `429 too_many_reports`."""
        core = request.app.state.sfu
        events: EventBus = request.app.state.events
        if not principal.may_access(room_id):
            raise Forbidden("these credentials are not valid for this room")
        if principal.is_admin:
            if body.reporter_participant_id is None:
                raise BadRequest(
                    "reporter_participant_id is required with an API key",
                    code="reporter_required",
                )
            reporter = body.reporter_participant_id
        else:
            assert principal.participant_id is not None
            reporter = principal.participant_id
            if body.reporter_participant_id not in (None, reporter):
                raise Forbidden("a participant token reports as its own participant only")
        if body.good_faith is not True:
            raise BadRequest(
                "good_faith must be true: state that the report is accurate and made in good faith",
                code="good_faith_required",
            )
        reported_id = body.reported_participant_id
        if reported_id == reporter:
            raise BadRequest("a participant cannot report itself", code="self_report")
        try:
            await core.get_participant(room_id, reporter)
        except NotFound as error:
            if error.code != "participant_not_found":
                raise
            raise NotFound(
                f"the reporter {reporter} is not in room {room_id}", code="participant_not_found"
            ) from None
        reported = await core.get_participant(room_id, reported_id)
        stats = await core.participant_stats(room_id, reported_id)

        key = (room_id, reporter)
        stamp, retry_after = reports.limiter.reserve(key)
        if stamp is None:
            raise TooManyReports(
                f"at most {reports.limiter.per_hour} reports an hour; try again in {retry_after} s",
                retry_after,
            )
        report_id = "rep_" + secrets.token_urlsafe(18)
        received_at = round(time.time(), 3)
        tracks = [
            {"track_id": t.get("track_id"), "kind": t.get("kind"), "codec": t.get("codec")}
            for t in reported.get("tracks", [])
        ]
        record = {
            "report_id": report_id,
            "received_at": received_at,
            "room_id": room_id,
            "reporter_participant_id": reporter,
            "reported_participant_id": reported_id,
            "category": body.category,
            "explanation": body.explanation,
            "contact": body.contact,
            "good_faith": True,
            "reported_tracks": tracks,
            "reported_stats": _clean(stats),
            "relay_version": __version__,
        }
        assert reports.store is not None
        try:
            await reports.store.append(record)
        except OSError as error:
            reports.limiter.release(key, stamp)
            log.error(
                "abuse report %s could not be stored (%s: %s)",
                report_id,
                type(error).__name__,
                error.strerror or "write failed",
            )
            raise ReportStoreUnavailable(
                "the report could not be stored and was not received; try again later"
            ) from None
        log.info("abuse report %s stored", report_id)
        events.publish_webhook_only(
            ReportCreated(
                room_id=room_id,
                at=received_at,
                report_id=report_id,
                reporter_participant_id=reporter,
                reported_participant_id=reported_id,
                category=body.category,
                explanation=body.explanation,
                has_contact=body.contact is not None,
                tracks=tracks,
            )
        )
        return ReportReceipt(report_id=report_id, received_at=received_at, message=RECEIPT_MESSAGE)

    return router
