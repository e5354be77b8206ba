"""RTP header extensions the relay knows, by URI: the one place each URI is spelled out."""

from __future__ import annotations

#: RFC 8843 §15: the m-line (mid) a packet belongs to, for BUNDLE demultiplexing
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
#: RFC 8852: the simulcast stream (rid) a packet belongs to, and the one an RTX packet repairs
RTP_STREAM_ID_URI = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
REPAIRED_RTP_STREAM_ID_URI = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
#: RFC 6464: the audio level of the packet's payload (and voice activity)
AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
#: RFC 5450: transmission time offset
TOFFSET_URI = "urn:ietf:params:rtp-hdrext:toffset"
#: 3GPP TS 26.114: coordination of video orientation
VIDEO_ORIENTATION_URI = "urn:3gpp:video-orientation"
#: libwebrtc: the receiver's playout delay limits
PLAYOUT_DELAY_URI = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay"
#: libwebrtc: the sender's absolute send time (for REMB's delay estimate)
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
#: draft-holmer-rmcat-transport-wide-cc-extensions-01: transport-wide sequence number
TRANSPORT_CC_URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
#: AV1 RTP specification, Appendix A: the dependency descriptor (layers of AV1, and of VP9 and
#: H.264 when the sender uses it), read to filter layers within one RTP stream
DEPENDENCY_DESCRIPTOR_URI = (
    "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension"
)
