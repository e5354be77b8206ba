"""relay: a real-time media relay (SFU) for WebRTC."""

__version__ = "0.1.0"
