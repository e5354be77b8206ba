"""SRTP/SRTCP protection (RFC 3711, RFC 7714) with keys from a DTLS-SRTP handshake.

Thin wrapper over pylibsrtp: one libsrtp session per direction, every error surfaced as
``SrtpError``. This sits on the hot path, so the methods do nothing but call libsrtp.
"""

from __future__ import annotations

import pylibsrtp

from relay.rtc.dtls import SrtpKeys

__all__ = ["REPLAY_WINDOW", "SrtpError", "SrtpSession"]

#: Replay window in packets for received streams (libsrtp accepts 64..32768; default 128).
#: Large enough for reordering at high video bitrates.
REPLAY_WINDOW = 1024

_PROFILES = {
    "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
}

# pylibsrtp raises its own Error for libsrtp failures, ValueError for oversized packets and
# TypeError for anything that is not ``bytes``.
_ERRORS = (pylibsrtp.Error, ValueError, TypeError)


class SrtpError(Exception):
    """Protecting or unprotecting a packet failed (authentication, replay, malformed, size)."""


class SrtpSession:
    """SRTP and SRTCP for one transport: protect with our key, unprotect with the peer's.

    Packets should be ``bytes``; a ``bytearray`` or ``memoryview`` costs one extra copy
    (pylibsrtp only takes ``bytes``). The result is always a new ``bytes``. pylibsrtp works
    in a 1500-byte buffer: protect accepts at most 1356 bytes of RTP and 1352 of RTCP,
    unprotect at most 1500; anything longer raises SrtpError.
    """

    __slots__ = (
        "profile",
        "_tx",
        "_rx",
        "_protect",
        "_unprotect",
        "_protect_rtcp",
        "_unprotect_rtcp",
    )

    def __init__(self, keys: SrtpKeys) -> None:
        profile = _PROFILES.get(keys.profile)
        if profile is None:
            raise SrtpError(f"unsupported SRTP profile {keys.profile!r}")
        try:
            tx_policy = pylibsrtp.Policy(
                key=keys.local_key,
                ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                srtp_profile=profile,
            )
            # A NACK-triggered retransmission protects the same (SSRC, seq) again. Only resend
            # identical packets that way: with GCM a different payload under the same
            # (SSRC, ROC, seq) would reuse the nonce.
            tx_policy.allow_repeat_tx = True
            rx_policy = pylibsrtp.Policy(
                key=keys.remote_key,
                ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                srtp_profile=profile,
            )
            rx_policy.window_size = REPLAY_WINDOW
            self._tx = pylibsrtp.Session(tx_policy)
            self._rx = pylibsrtp.Session(rx_policy)
        except _ERRORS as exc:
            raise SrtpError(f"cannot create SRTP session: {exc}") from exc
        self.profile = keys.profile
        self._protect = self._tx.protect
        self._protect_rtcp = self._tx.protect_rtcp
        self._unprotect = self._rx.unprotect
        self._unprotect_rtcp = self._rx.unprotect_rtcp

    def protect(self, rtp: bytes) -> bytes:
        """Encrypt and authenticate one RTP packet."""
        if rtp.__class__ is not bytes:
            rtp = _as_bytes(rtp)
        try:
            return self._protect(rtp)
        except _ERRORS as exc:
            raise SrtpError(str(exc)) from exc

    def unprotect(self, srtp: bytes) -> bytes:
        """Authenticate and decrypt one SRTP packet; SrtpError on failure or replay."""
        if srtp.__class__ is not bytes:
            srtp = _as_bytes(srtp)
        try:
            return self._unprotect(srtp)
        except _ERRORS as exc:
            raise SrtpError(str(exc)) from exc

    def protect_rtcp(self, rtcp: bytes) -> bytes:
        """Encrypt and authenticate one RTCP compound packet."""
        if rtcp.__class__ is not bytes:
            rtcp = _as_bytes(rtcp)
        try:
            return self._protect_rtcp(rtcp)
        except _ERRORS as exc:
            raise SrtpError(str(exc)) from exc

    def unprotect_rtcp(self, srtcp: bytes) -> bytes:
        """Authenticate and decrypt one SRTCP packet; SrtpError on failure or replay."""
        if srtcp.__class__ is not bytes:
            srtcp = _as_bytes(srtcp)
        try:
            return self._unprotect_rtcp(srtcp)
        except _ERRORS as exc:
            raise SrtpError(str(exc)) from exc


def _as_bytes(packet: object) -> bytes:
    """Slow path: copy a bytearray or memoryview (pylibsrtp only takes ``bytes``)."""
    if isinstance(packet, bytes | bytearray | memoryview):
        return bytes(packet)
    raise SrtpError(f"packet must be bytes, not {type(packet).__name__}")
