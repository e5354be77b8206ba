"""A WebRTC client made of the relay's own protocol cores, for tests and load generation.

Not part of the relay's media plane: it owns sockets, asyncio and HTTP (the control API's URLs),
which the sans-I/O ``relay.rtc`` package never does.
"""
