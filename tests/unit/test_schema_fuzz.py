"""Property-based requests generated from the served OpenAPI document (schemathesis), against
the app and the real SFU core in process: no 5xx and every response matches its documented
schema. A fixed seed and a bounded number of examples per operation keep it under a minute;
raise ``RELAY_FUZZ_EXAMPLES`` to run longer by hand."""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, seed, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from tests.unit.test_api import AUTH, World, make_settings  # noqa: E402

EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "25"))

world = World(make_settings(max_body_bytes=16384))
#: Path parameters of existing objects, so that cases reach the handlers and not only 404.
KNOWN = {"room_id": "r1", "participant_id": "alice"}
_calls = [0]


def _ensure_known() -> None:
    """Recreate the room and participant the cases point at (a case may have deleted them)."""
    if "r1" not in world.sfu.rooms:
        world.sfu.create_room("r1")
    if "alice" not in world.sfu.get_room("r1").participants:
        world.sfu.add_participant("r1", "alice")


# The event stream never ends by itself: it is covered by tests/unit/test_events.py.
schema = schemathesis.openapi.from_asgi("/openapi.json", world.app).exclude(path="/v1/events")


@schema.parametrize()
@seed(20261129)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=list(HealthCheck),
)
def test_api_against_its_own_schema(case) -> None:
    _ensure_known()
    _calls[0] += 1
    if case.path_parameters and _calls[0] % 2:  # every other case addresses real objects
        for name in case.path_parameters:
            case.path_parameters[name] = KNOWN.get(name, case.path_parameters[name])
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error, response_schema_conformance])
