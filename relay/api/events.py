"""Event delivery: fan-out to Server-Sent Events subscribers and to an optional webhook.

The SFU core calls :meth:`EventBus.publish` synchronously on the event loop with one
:class:`relay.sfu.events.Event`; publishing never blocks and never awaits. Each subscriber
(one ``GET /v1/events`` stream) has a bounded queue; a subscriber that falls behind is dropped
(its stream ends, the client reconnects and re-reads the state) and counted. The webhook has
its own bounded queue drained by one background task. Event metadata is never logged.

One event costs O(1) per stream that receives it: subscriptions are indexed by room (a
publish touches only the streams of the event's room and the unfiltered ones), and an event is
serialised once per publish (:class:`Delivery`: its JSON object, the JSON bytes and the SSE
frame), shared by every stream and the webhook; nothing is serialised when nobody listens.
The number of open streams is bounded per owner (an API key, or one participant's token): one
more is refused with :class:`TooManyStreams` (429).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

import httpx

from relay import __version__
from relay.config import Settings
from relay.metrics import Metrics
from relay.sfu.errors import LimitReached
from relay.sfu.events import Event

__all__ = [
    "KEEPALIVE_INTERVAL",
    "Delivery",
    "RETRY_MS",
    "WEBHOOK_RETRIES",
    "EventBus",
    "Subscription",
    "TooManyStreams",
    "encode_event",
    "format_sse",
    "sign",
    "sse_stream",
]

log = logging.getLogger("relay.events")

#: Seconds between ``: keepalive`` comments on an idle stream.
KEEPALIVE_INTERVAL = 15.0
#: Reconnection delay suggested to EventSource clients (``retry:`` field), milliseconds.
RETRY_MS = 2000
#: Extra attempts after a failed webhook delivery.
WEBHOOK_RETRIES = 2
#: Seconds before the first retry; doubled for the next one.
WEBHOOK_BACKOFF = 0.5

_END = None  # queue sentinel: the subscription is over


class TooManyStreams(LimitReached):
    """The caller already holds as many event streams as its limit allows."""

    code = "too_many_streams"
    headers = {"Retry-After": str(max(1, RETRY_MS // 1000))}


class Delivery:
    """One published event, serialised once and shared by every stream and the webhook.

    ``data`` is the JSON object consumers receive (:meth:`Event.to_dict`), ``body`` its compact
    JSON (an SSE ``data:`` line, a webhook body) and ``frame`` the whole SSE message.
    """

    __slots__ = ("body", "data", "event", "frame", "kind")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.data = event.to_dict()
        self.body = encode_event(self.data)
        #: the event type as a header value (``X-Relay-Event``, log lines)
        self.kind = _kind(event.type)
        self.frame = _sse_frame(event.type, self.body)


def encode_event(data: Mapping[str, Any]) -> bytes:
    """Compact JSON of an event's object, as sent in SSE ``data:`` lines and webhook bodies."""
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    except UnicodeEncodeError:  # a lone surrogate somewhere: escape everything instead
        return json.dumps(data, separators=(",", ":"), default=str).encode()


def sign(body: bytes, secret: str) -> str:
    """The ``X-Relay-Signature`` value of a webhook body: ``sha256=<hex HMAC-SHA256>``."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def format_sse(event: Event) -> bytes:
    """One SSE message: ``event: <type>`` and a single ``data:`` line of JSON."""
    return Delivery(event).frame


def _sse_frame(kind: str, body: bytes) -> bytes:
    name = "".join(ch for ch in kind if ch not in "\r\n") or "message"
    # Compact JSON never contains a raw newline: no data line has to be split.
    return b"event: " + name.encode() + b"\ndata: " + body + b"\n\n"


def _kind(kind: object) -> str:
    return kind if isinstance(kind, str) and kind.isprintable() else "unknown"


class Subscription:
    """One consumer of events, optionally limited to one room; ``owner`` names who holds it
    (for the per-owner stream limit)."""

    def __init__(
        self, bus: EventBus, room_id: str | None, maxsize: int, owner: str | None = None
    ) -> None:
        self.room_id = room_id
        self.owner = owner
        self.queue: asyncio.Queue[Delivery | None] = asyncio.Queue(maxsize)
        #: True once ended by overflow, shutdown or :meth:`close`
        self.closed = False
        #: True if it ended because the consumer fell behind
        self.overflowed = False
        self._bus = bus

    def matches(self, event: Event) -> bool:
        return self.room_id is None or event.room_id == self.room_id

    def _offer(self, delivery: Delivery) -> bool:
        """Queue an event; False (and the subscription ends) if the queue is full."""
        try:
            self.queue.put_nowait(delivery)
        except asyncio.QueueFull:
            self.overflowed = True
            self._end()
            return False
        return True

    def _end(self) -> None:
        """Finish the stream: discard what is queued and wake the consumer."""
        if self.closed:
            return
        self.closed = True
        if self.overflowed:
            while not self.queue.empty():
                self.queue.get_nowait()
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(_END)
            return
        # Full queue at shutdown: make room for the end marker.
        self.queue.get_nowait()
        self.queue.put_nowait(_END)

    async def get(self) -> Event | None:
        """The next event, or None once the subscription has ended."""
        delivery = await self.next_delivery()
        return None if delivery is None else delivery.event

    def next_ready(self) -> Delivery | None | Literal[False]:
        """The next event if one is queued (None once ended), else False; never waits."""
        if self.queue.empty():
            return None if self.closed else False
        delivery = self.queue.get_nowait()
        if delivery is _END:
            self.queue.put_nowait(_END)
        return delivery

    async def next_delivery(self) -> Delivery | None:
        """The next event with its shared serialisation, or None once the subscription ended."""
        if self.closed and self.queue.empty():
            return None
        delivery = await self.queue.get()
        if delivery is _END:
            # Keep the marker for any later call.
            self.queue.put_nowait(_END)
        return delivery

    def close(self) -> None:
        """Stop receiving events (idempotent)."""
        self._bus._remove(self)
        self._end()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while (event := await self.get()) is not None:
            yield event


class EventBus:
    """Fans events out to subscribers and the webhook.

    ``publish`` is safe to call before ``start`` and after ``close``; events for the webhook
    queue up (bounded) until the delivery task runs. Every drop (a subscriber cut off, an event
    the webhook queue had no room for) increments ``metrics.events_dropped`` and calls
    ``on_drop``. ``transport`` replaces the HTTP transport of the webhook client (tests).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        on_drop: Callable[[], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.queue_size = settings.limits.event_queue_size
        self.webhook_url = settings.events.webhook_url
        self.webhook_secret = settings.events.webhook_secret
        self.webhook_timeout = settings.events.webhook_timeout
        self.streams_per_key = settings.limits.event_streams_per_key
        self.streams_per_token = settings.limits.event_streams_per_token
        #: subscriptions by the room they follow (None: every room)
        self._by_room: dict[str | None, set[Subscription]] = {}
        self._count = 0
        #: open subscriptions per owner
        self._owned: dict[str, int] = {}
        self._webhook_queue: asyncio.Queue[Delivery] | None = (
            asyncio.Queue(self.queue_size) if self.webhook_url else None
        )
        self._webhook_task: asyncio.Task[None] | None = None
        self._transport = transport
        self._metrics = metrics
        self._on_drop = on_drop
        #: called with every published event, synchronously, before any delivery
        self._observers: list[Callable[[Event], None]] = []
        self.closed = False
        #: events published
        self.published = 0
        #: subscribers ended because their queue overflowed
        self.subscribers_dropped = 0
        #: events not queued for the webhook because its queue was full
        self.webhook_dropped = 0
        #: webhook deliveries that succeeded / failed after every retry
        self.webhook_delivered = 0
        self.webhook_failed = 0

    # -- publishing ----------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Hand an event to every matching subscriber and the webhook; never blocks.

        The event is serialised once, and only if a stream or the webhook takes it.
        """
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                log.exception("event observer failed")
        if self.closed:
            return
        self.published += 1
        room = self._by_room.get(event.room_id)
        everything = self._by_room.get(None)
        webhook = self._webhook_queue
        if not (room or everything or webhook is not None):
            return
        delivery = Delivery(event)
        for targets in (room, everything):
            if not targets:
                continue
            for subscription in [s for s in targets if not s._offer(delivery)]:
                self._remove(subscription)
                self.subscribers_dropped += 1
                self._dropped()
        if webhook is not None:
            try:
                webhook.put_nowait(delivery)
            except asyncio.QueueFull:
                self.webhook_dropped += 1
                self._dropped()

    def publish_webhook_only(self, event: Event) -> bool:
        """Hand an event to the webhook alone (never to an event stream); never blocks.

        For events meant for the operator, not for a room's participants (``report.created``).
        Delivered, signed and retried like every other webhook event. False when it was not
        queued: no webhook configured, the bus closed, or the webhook queue full (counted as a
        drop).
        """
        webhook = self._webhook_queue
        if self.closed or webhook is None:
            return False
        self.published += 1
        try:
            webhook.put_nowait(Delivery(event))
        except asyncio.QueueFull:
            self.webhook_dropped += 1
            self._dropped()
            return False
        return True

    def add_observer(self, observer: Callable[[Event], None]) -> None:
        """Call ``observer(event)`` for every event published from now on, synchronously in
        :meth:`publish` (also after :meth:`close`). It must not block or publish; in-process
        consumers (the recording service) use it to follow what happens in rooms."""
        self._observers.append(observer)

    def remove_observer(self, observer: Callable[[Event], None]) -> None:
        """Stop calling ``observer`` (idempotent)."""
        if observer in self._observers:
            self._observers.remove(observer)

    def _dropped(self) -> None:
        if self._metrics is not None:
            self._metrics.events_dropped += 1
        if self._on_drop is not None:
            try:
                self._on_drop()
            except Exception:
                log.exception("event drop callback failed")

    # -- subscribers ---------------------------------------------------------------------

    def subscribe(
        self, room_id: str | None = None, owner: str | None = None, limit: int | None = None
    ) -> Subscription:
        """A new subscription to every event, or to those of one room.

        With an ``owner`` and a ``limit``, raises :class:`TooManyStreams` if that owner already
        holds ``limit`` open subscriptions.
        """
        if owner is not None and limit is not None and self._owned.get(owner, 0) >= limit:
            raise TooManyStreams(
                f"{limit} event stream{'s' if limit != 1 else ''} already open for these "
                "credentials; close one first"
            )
        subscription = Subscription(self, room_id, self.queue_size, owner)
        if self.closed:
            subscription._end()
            return subscription
        self._by_room.setdefault(room_id, set()).add(subscription)
        self._count += 1
        if owner is not None:
            self._owned[owner] = self._owned.get(owner, 0) + 1
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        """Forget a subscription (idempotent) and give its owner's slot back."""
        targets = self._by_room.get(subscription.room_id)
        if targets is None or subscription not in targets:
            return
        targets.discard(subscription)
        if not targets:
            del self._by_room[subscription.room_id]
        self._count -= 1
        owner = subscription.owner
        if owner is not None:
            left = self._owned[owner] - 1
            if left:
                self._owned[owner] = left
            else:
                del self._owned[owner]

    @property
    def subscriber_count(self) -> int:
        return self._count

    def streams_of(self, owner: str) -> int:
        """Open subscriptions held by ``owner``."""
        return self._owned.get(owner, 0)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the webhook delivery task (if a webhook is configured); idempotent."""
        if self._webhook_queue is None or self._webhook_task is not None or self.closed:
            return
        if not self.webhook_secret:
            log.warning("events.webhook_secret is empty: webhook requests are not signed")
        self._webhook_task = asyncio.get_running_loop().create_task(
            self._deliver_webhooks(), name="relay-webhook"
        )

    def close(self) -> None:
        """End every subscriber stream and stop accepting events; idempotent."""
        self.closed = True
        for targets in list(self._by_room.values()):
            for subscription in list(targets):
                subscription._end()
        self._by_room.clear()
        self._owned.clear()
        self._count = 0

    async def aclose(self, timeout: float = 2.0) -> None:
        """:meth:`close`, then let the webhook task send what is queued (up to ``timeout``)."""
        self.close()
        task, self._webhook_task = self._webhook_task, None
        if task is None:
            return
        queue = self._webhook_queue
        if queue is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.join(), timeout)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- webhook ------------------------------------------------------------------------

    async def _deliver_webhooks(self) -> None:
        queue = self._webhook_queue
        assert queue is not None
        async with httpx.AsyncClient(
            timeout=self.webhook_timeout,
            transport=self._transport,
            follow_redirects=False,
            headers={"User-Agent": f"relay/{__version__}"},
        ) as client:
            while True:
                delivery = await queue.get()
                try:
                    await self._deliver(client, delivery)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("webhook delivery of %s failed", delivery.kind)
                finally:
                    queue.task_done()

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        """POST one event, retrying at most :data:`WEBHOOK_RETRIES` times."""
        body = delivery.body
        kind = delivery.kind
        headers = {"Content-Type": "application/json", "X-Relay-Event": kind}
        if self.webhook_secret:
            headers["X-Relay-Signature"] = sign(body, self.webhook_secret)
        delay = WEBHOOK_BACKOFF
        for attempt in range(1 + WEBHOOK_RETRIES):
            final = attempt == WEBHOOK_RETRIES
            try:
                response = await client.post(self.webhook_url, content=body, headers=headers)
            except httpx.HTTPError as error:
                problem = type(error).__name__
            else:
                if response.is_success:
                    self.webhook_delivered += 1
                    return
                problem = f"status {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    final = True  # the receiver rejects this request: retrying will not help
            log.warning(
                "webhook delivery of %s failed (%s), attempt %d of %d",
                kind,
                problem,
                attempt + 1,
                1 + WEBHOOK_RETRIES,
            )
            if final:
                break
            await asyncio.sleep(delay)
            delay *= 2
        self.webhook_failed += 1


async def sse_stream(
    subscription: Subscription,
    *,
    keepalive: float = KEEPALIVE_INTERVAL,
    retry_ms: int = RETRY_MS,
) -> AsyncIterator[bytes]:
    """The body of an SSE response: a ``retry:`` hint, events and keepalive comments.

    Ends when the subscription ends (overflow or shutdown); closing the generator (client
    disconnect) closes the subscription.
    """
    try:
        yield f"retry: {retry_ms}\n\n".encode()
        while True:
            delivery = subscription.next_ready()
            if delivery is False:
                try:
                    # Only a stream that has to wait arms a timer; asyncio.timeout, unlike
                    # wait_for, costs no extra task.
                    async with asyncio.timeout(keepalive):
                        delivery = await subscription.next_delivery()
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
            if delivery is None:
                if subscription.overflowed:
                    yield b": dropped: events were produced faster than this stream read them\n\n"
                return
            yield delivery.frame
    finally:
        subscription.close()
