"""SRTP/SRTCP protection (RFC 3711, RFC 7714) with keys from a DTLS-SRTP handshake.

libsrtp through pylibsrtp's compiled cffi binding (``pylibsrtp._binding``: no compiler at
install time). pylibsrtp creates each libsrtp session (policy, ``srtp_create``) and owns it:
its ``Session`` frees the ``srtp_t`` exactly once, when it is garbage collected, and an
``SrtpSession`` holds its two ``Session`` objects for as long as it lives. The packet calls
skip pylibsrtp's wrapper: ``srtp_protect`` and friends run directly on one preallocated
buffer and length per direction, so a packet costs one copy in, the libsrtp call and one
copy out (the result ``bytes``). Every error surfaces as ``SrtpError``.
"""

from __future__ import annotations

from typing import Any

import pylibsrtp
from pylibsrtp._binding import ffi, lib

from relay.rtc.dtls import SrtpKeys

__all__ = ["REPLAY_WINDOW", "SrtpError", "SrtpSession"]

#: Replay window in packets for received streams (libsrtp accepts 64..32768; default 128).
#: Large enough for reordering at high video bitrates.
REPLAY_WINDOW = 1024

_PROFILES = {
    "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
}

#: Size of each direction's work buffer: a packet is copied in, processed in place (protect
#: appends its trailer) and copied out. The same size pylibsrtp uses.
BUFFER_SIZE = 1500
#: Room libsrtp may append when protecting: the authentication tag and an MKI (libsrtp's
#: SRTP_MAX_TAG_LEN + SRTP_MAX_MKI_LEN), and for SRTCP also the E flag and index. The same
#: bounds pylibsrtp checks, larger than anything the two profiles here append.
RTP_TRAILER = 16 + 128
RTCP_TRAILER = 4 + 16 + 128
#: Longest packet each call accepts; anything longer raises SrtpError before any copy.
MAX_RTP = BUFFER_SIZE - RTP_TRAILER  # 1356
MAX_RTCP = BUFFER_SIZE - RTCP_TRAILER  # 1352
MAX_SRTP = BUFFER_SIZE  # unprotect only shrinks a packet

_ERROR_TEXT: list[str] = list(getattr(pylibsrtp, "ERRORS", ()))

# pylibsrtp raises its own Error for libsrtp failures, ValueError and TypeError for bad keys.
_ERRORS = (pylibsrtp.Error, ValueError, TypeError)

_memmove = ffi.memmove
_srtp_protect = lib.srtp_protect
_srtp_unprotect = lib.srtp_unprotect
_srtp_protect_rtcp = lib.srtp_protect_rtcp
_srtp_unprotect_rtcp = lib.srtp_unprotect_rtcp


class SrtpError(Exception):
    """Protecting or unprotecting a packet failed (authentication, replay, malformed, size)."""


class SrtpSession:
    """SRTP and SRTCP for one transport: protect with our key, unprotect with the peer's.

    Packets may be ``bytes``, ``bytearray`` or a contiguous ``memoryview`` (copied straight
    into the work buffer; a non-contiguous view costs one extra copy). The result is always
    a new ``bytes``. Protect accepts at most 1356 bytes of RTP and 1352 of RTCP, unprotect at
    most 1500; anything longer raises SrtpError.

    Not thread-safe: each direction (protect, unprotect) has one work buffer, and libsrtp
    releases the GIL while it runs.
    """

    __slots__ = (
        "profile",
        "_tx",
        "_rx",
        "_tx_ctx",
        "_rx_ctx",
        "_tx_cdata",
        "_rx_cdata",
        "_tx_buf",
        "_rx_buf",
        "_tx_len",
        "_rx_len",
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
            # The Sessions own the libsrtp contexts (srtp_dealloc when collected): keep them
            # for as long as the raw context pointers below are used.
            self._tx = pylibsrtp.Session(tx_policy)
            self._rx = pylibsrtp.Session(rx_policy)
        except _ERRORS as exc:
            raise SrtpError(f"cannot create SRTP session: {exc}") from exc
        self.profile = keys.profile
        self._tx_ctx: Any = self._tx._srtp[0]
        self._rx_ctx: Any = self._rx._srtp[0]
        self._tx_cdata: Any = ffi.new("unsigned char[]", BUFFER_SIZE)
        self._rx_cdata: Any = ffi.new("unsigned char[]", BUFFER_SIZE)
        self._tx_buf: Any = ffi.buffer(self._tx_cdata)
        self._rx_buf: Any = ffi.buffer(self._rx_cdata)
        self._tx_len: Any = ffi.new("int *")
        self._rx_len: Any = ffi.new("int *")

    def protect(self, rtp: bytes | bytearray | memoryview) -> bytes:
        """Encrypt and authenticate one RTP packet."""
        if rtp.__class__ is bytes:
            n = len(rtp)
        else:
            rtp, n = _contiguous(rtp)
        if n > MAX_RTP:
            raise SrtpError(f"RTP packet of {n} bytes is too long (at most {MAX_RTP})")
        cdata = self._tx_cdata
        length = self._tx_len
        _memmove(cdata, rtp, n)
        length[0] = n
        rc = _srtp_protect(self._tx_ctx, cdata, length)
        if rc:
            raise SrtpError(_error_text(rc))
        return self._tx_buf[0 : length[0]]

    def unprotect(self, srtp: bytes | bytearray | memoryview) -> bytes:
        """Authenticate and decrypt one SRTP packet; SrtpError on failure or replay."""
        if srtp.__class__ is bytes:
            n = len(srtp)
        else:
            srtp, n = _contiguous(srtp)
        if n > MAX_SRTP:
            raise SrtpError(f"SRTP packet of {n} bytes is too long (at most {MAX_SRTP})")
        cdata = self._rx_cdata
        length = self._rx_len
        _memmove(cdata, srtp, n)
        length[0] = n
        rc = _srtp_unprotect(self._rx_ctx, cdata, length)
        if rc:
            raise SrtpError(_error_text(rc))
        return self._rx_buf[0 : length[0]]

    def protect_rtcp(self, rtcp: bytes | bytearray | memoryview) -> bytes:
        """Encrypt and authenticate one RTCP compound packet."""
        return self._rtcp(
            _srtp_protect_rtcp, self._tx_ctx, self._tx_cdata, self._tx_len, self._tx_buf, rtcp
        )

    def unprotect_rtcp(self, srtcp: bytes | bytearray | memoryview) -> bytes:
        """Authenticate and decrypt one SRTCP packet; SrtpError on failure or replay."""
        return self._rtcp(
            _srtp_unprotect_rtcp, self._rx_ctx, self._rx_cdata, self._rx_len, self._rx_buf, srtcp
        )

    @staticmethod
    def _rtcp(call: Any, ctx: Any, cdata: Any, length: Any, buf: Any, packet: Any) -> bytes:
        """SRTCP either way (RTP's two calls above are spelled out: they are the hot path)."""
        if packet.__class__ is bytes:
            n = len(packet)
        else:
            packet, n = _contiguous(packet)
        limit = MAX_RTCP if call is _srtp_protect_rtcp else MAX_SRTP
        if n > limit:
            raise SrtpError(f"RTCP packet of {n} bytes is too long (at most {limit})")
        _memmove(cdata, packet, n)
        length[0] = n
        rc = call(ctx, cdata, length)
        if rc:
            raise SrtpError(_error_text(rc))
        return buf[0 : length[0]]


def _contiguous(packet: object) -> tuple[bytes | bytearray | memoryview, int]:
    """Slow path: a packet that is not exactly ``bytes``, and its length in bytes.

    The length passed to ``ffi.memmove`` must be the true size of the source: memmove does
    not check it against the source's buffer. So a ``memoryview`` counts in ``nbytes``
    (not items), and a non-contiguous one is copied once.
    """
    if isinstance(packet, bytes | bytearray):
        return packet, len(packet)
    if isinstance(packet, memoryview):
        try:
            if not packet.c_contiguous:
                packet = packet.tobytes()
                return packet, len(packet)
            return packet, packet.nbytes
        except ValueError as exc:  # a released memoryview
            raise SrtpError(str(exc)) from exc
    raise SrtpError(f"packet must be bytes, not {type(packet).__name__}")


def _error_text(rc: int) -> str:
    if 0 <= rc < len(_ERROR_TEXT):
        return _ERROR_TEXT[rc]
    return f"libsrtp error {rc}"
