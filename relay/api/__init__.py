"""The HTTP control plane: routes, schemas, authentication and event delivery."""

from relay.api.app import create_app
from relay.api.events import EventBus

__all__ = ["EventBus", "create_app"]
