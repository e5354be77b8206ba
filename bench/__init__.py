"""Bench suite of the relay: the packet path's stages in isolation (``hotpath``), the real relay
under load from another process (``load``) and side by side with Janus, a naive aiortc relay
and a bare UDP forwarder (``compare``). Run ``python -m bench --help``."""
