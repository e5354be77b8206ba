"""What the control API drives: one SFU core in this process, or a pool of worker processes.

The API's handlers await a :class:`ControlCore`. :class:`LocalCore` adapts the synchronous
:class:`relay.sfu.sfu.Sfu` of a single-process relay; :class:`relay.workers.front.WorkerPool`
is the same surface over worker processes. Results are the JSON objects the API returns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

from relay.sfu.sfu import Sfu

__all__ = ["ControlCore", "LocalCore"]


class ControlCore(Protocol):
    """Rooms, participants and negotiation, as the control API needs them."""

    @property
    def draining(self) -> bool: ...
    @property
    def overload(self) -> Any: ...  # shedding (bool), retry_after (int)

    async def create_room(
        self,
        room_id: str | None,
        max_participants: int | None,
        e2ee_required: bool,
        empty_timeout: float | None,
        codec_preference: Sequence[str] | None,
    ) -> dict[str, Any]: ...
    async def list_rooms(self) -> list[dict[str, Any]]: ...
    async def get_room(self, room_id: str) -> dict[str, Any]: ...
    async def delete_room(self, room_id: str) -> None: ...
    async def add_participant(
        self,
        room_id: str,
        participant_id: str | None,
        metadata: dict[str, Any] | None,
        can_publish: bool,
        can_subscribe: bool,
        auto_subscribe: bool,
    ) -> dict[str, Any]: ...
    async def get_participant(self, room_id: str, participant_id: str) -> dict[str, Any]: ...
    async def remove_participant(self, room_id: str, participant_id: str, reason: str) -> None: ...
    async def publisher_offer(self, room_id: str, participant_id: str, sdp: str) -> str: ...
    async def subscriber_offer(self, room_id: str, participant_id: str) -> tuple[str, int]: ...
    async def subscriber_answer(
        self, room_id: str, participant_id: str, sdp: str, revision: int
    ) -> None: ...
    async def set_subscription_preferences(
        self, room_id: str, participant_id: str, track_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]: ...
    async def participant_stats(self, room_id: str, participant_id: str) -> dict[str, Any]: ...
    async def workers(self) -> list[dict[str, Any]]: ...
    async def metrics_text(self, own: str) -> str: ...


class LocalCore:
    """The single-process relay: the SFU core on the API's own event loop."""

    def __init__(self, sfu: Sfu) -> None:
        self.sfu = sfu
        self._started = time.monotonic()

    @property
    def draining(self) -> bool:
        return self.sfu.draining

    @property
    def overload(self) -> Any:
        return self.sfu.overload

    async def create_room(
        self,
        room_id: str | None,
        max_participants: int | None,
        e2ee_required: bool,
        empty_timeout: float | None,
        codec_preference: Sequence[str] | None,
    ) -> dict[str, Any]:
        return self.sfu.create_room(
            room_id=room_id,
            max_participants=max_participants,
            e2ee_required=e2ee_required,
            empty_timeout=empty_timeout,
            codec_preference=codec_preference,
        ).to_dict()

    async def list_rooms(self) -> list[dict[str, Any]]:
        return [room.to_dict() for room in self.sfu.list_rooms()]

    async def get_room(self, room_id: str) -> dict[str, Any]:
        return self.sfu.get_room(room_id).to_dict()

    async def delete_room(self, room_id: str) -> None:
        self.sfu.delete_room(room_id)

    async def add_participant(
        self,
        room_id: str,
        participant_id: str | None,
        metadata: dict[str, Any] | None,
        can_publish: bool,
        can_subscribe: bool,
        auto_subscribe: bool,
    ) -> dict[str, Any]:
        return self.sfu.add_participant(
            room_id,
            participant_id=participant_id,
            metadata=metadata,
            can_publish=can_publish,
            can_subscribe=can_subscribe,
            auto_subscribe=auto_subscribe,
        ).to_dict()

    async def get_participant(self, room_id: str, participant_id: str) -> dict[str, Any]:
        return self.sfu.get_participant(room_id, participant_id).to_dict()

    async def remove_participant(self, room_id: str, participant_id: str, reason: str) -> None:
        self.sfu.remove_participant(room_id, participant_id, reason=reason)

    async def publisher_offer(self, room_id: str, participant_id: str, sdp: str) -> str:
        return self.sfu.publisher_offer(room_id, participant_id, sdp)

    async def subscriber_offer(self, room_id: str, participant_id: str) -> tuple[str, int]:
        return self.sfu.subscriber_offer(room_id, participant_id)

    async def subscriber_answer(
        self, room_id: str, participant_id: str, sdp: str, revision: int
    ) -> None:
        self.sfu.subscriber_answer(room_id, participant_id, sdp, revision)

    async def set_subscription_preferences(
        self, room_id: str, participant_id: str, track_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        return self.sfu.set_subscription_preferences(
            room_id, participant_id, track_id, changes
        ).to_dict()

    async def participant_stats(self, room_id: str, participant_id: str) -> dict[str, Any]:
        return self.sfu.participant_stats(room_id, participant_id)

    async def workers(self) -> list[dict[str, Any]]:
        """This process is the one worker."""
        sfu = self.sfu
        return [
            {
                "index": 0,
                "pid": os.getpid(),
                "state": "ready",
                "media_port": sfu.candidates[0][1] if sfu.candidates else None,
                "participants": sum(len(r.participants) for r in sfu.rooms.values()),
                "rooms": len(sfu.rooms),
                "packet_rate": sfu.overload.packet_rate,
                "cpu": None,
                "restarts": 0,
            }
        ]

    async def metrics_text(self, own: str) -> str:
        """The relay's metrics: this process's own."""
        return own
