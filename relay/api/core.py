"""What the control API drives: one SFU core in this process, or a pool of worker processes.

The API's handlers await a :class:`ControlCore`. :class:`LocalCore` adapts the synchronous
:class:`relay.sfu.sfu.Sfu` of a single-process relay; :class:`relay.workers.front.WorkerPool`
is the same surface over worker processes. Results are the JSON objects the API returns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
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
        e2ee: bool = False,
    ) -> dict[str, Any]: ...
    async def get_participant(self, room_id: str, participant_id: str) -> dict[str, Any]: ...
    async def remove_participant(self, room_id: str, participant_id: str, reason: str) -> None: ...
    async def publisher_offer(
        self, room_id: str, participant_id: str, sdp: str, e2ee: bool = False
    ) -> str: ...
    async def moderate_track(
        self, room_id: str, participant_id: str, track_id: str, muted: bool
    ) -> dict[str, Any]: ...
    async def subscriber_offer(self, room_id: str, participant_id: str) -> tuple[str, int]: ...
    async def subscriber_answer(
        self, room_id: str, participant_id: str, sdp: str, revision: int
    ) -> None: ...
    async def set_subscription_preferences(
        self, room_id: str, participant_id: str, track_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]: ...
    async def participant_stats(self, room_id: str, participant_id: str) -> dict[str, Any]: ...
    async def viewer_offer(
        self,
        room_id: str,
        participant_id: str,
        sdp: str,
        publisher_id: str | None = None,
        track_id: str | None = None,
    ) -> str: ...
    async def ice_restart(
        self, room_id: str, participant_id: str, connection: str, ufrag: str, pwd: str
    ) -> dict[str, Any]: ...
    async def workers(self) -> list[dict[str, Any]]: ...
    async def record_track(
        self, room_id: str, track_id: str, recording_id: str, path_base: str
    ) -> dict[str, Any]: ...
    async def stop_track_recording(
        self, room_id: str, track_id: str, recording_id: str
    ) -> dict[str, Any] | None: ...
    def set_recording_failure_handler(
        self, handler: Callable[[dict[str, Any]], None] | None
    ) -> None: ...
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
        e2ee: bool = False,
    ) -> dict[str, Any]:
        return self.sfu.add_participant(
            room_id,
            participant_id=participant_id,
            metadata=metadata,
            can_publish=can_publish,
            can_subscribe=can_subscribe,
            auto_subscribe=auto_subscribe,
            e2ee=e2ee,
        ).to_dict()

    async def get_participant(self, room_id: str, participant_id: str) -> dict[str, Any]:
        return self.sfu.get_participant(room_id, participant_id).to_dict()

    async def remove_participant(self, room_id: str, participant_id: str, reason: str) -> None:
        self.sfu.remove_participant(room_id, participant_id, reason=reason)

    async def publisher_offer(
        self, room_id: str, participant_id: str, sdp: str, e2ee: bool = False
    ) -> str:
        return self.sfu.publisher_offer(room_id, participant_id, sdp, e2ee=e2ee)

    async def moderate_track(
        self, room_id: str, participant_id: str, track_id: str, muted: bool
    ) -> dict[str, Any]:
        return self.sfu.moderate_track(room_id, participant_id, track_id, muted).to_dict()

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

    async def viewer_offer(
        self,
        room_id: str,
        participant_id: str,
        sdp: str,
        publisher_id: str | None = None,
        track_id: str | None = None,
    ) -> str:
        return self.sfu.viewer_offer(room_id, participant_id, sdp, publisher_id, track_id)

    async def ice_restart(
        self, room_id: str, participant_id: str, connection: str, ufrag: str, pwd: str
    ) -> dict[str, Any]:
        return self.sfu.ice_restart(room_id, participant_id, connection, ufrag, pwd)

    async def record_track(
        self, room_id: str, track_id: str, recording_id: str, path_base: str
    ) -> dict[str, Any]:
        return self.sfu.record_track(room_id, track_id, recording_id, path_base)

    async def stop_track_recording(
        self, room_id: str, track_id: str, recording_id: str
    ) -> dict[str, Any] | None:
        return self.sfu.stop_track_recording(room_id, track_id, recording_id)

    def set_recording_failure_handler(
        self, handler: Callable[[dict[str, Any]], None] | None
    ) -> None:
        self.sfu.recording.on_failure = handler

    async def workers(self) -> list[dict[str, Any]]:
        """This process is the one worker."""
        sfu = self.sfu
        return [
            {
                "index": 0,
                "pid": os.getpid(),
                "state": "ready",
                "media_port": next(
                    (port for _, port in sfu.candidates or sfu.tcp_candidates), None
                ),
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
