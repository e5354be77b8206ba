"""Unit tests for relay.rtc.sdp.

Fixtures in tests/fixtures/sdp/:
- chrome_offer.sdp: captured from headless Chromium 156 (fake devices): audio sendrecv (addTrack),
  video sendonly (addTransceiver), one data channel; gathering complete.
- firefox_offer.sdp: captured from headless Firefox ESR 153 (fake devices), same page. This build
  has no OpenH264 plugin, so it offers no H264.
- aiortc_offer.sdp: captured from aiortc 1.16 (AudioStreamTrack + VideoStreamTrack).
- safari_offer.sdp: HAND-WRITTEN in the style of Safari 17/18 (libwebrtc-based, H264 first,
  H265 offered, audio and video sendrecv, no data channel). Not a capture.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest

from relay.rtc.sdp import (
    DATA_CHANNELS_UNSUPPORTED,
    SUPPORTED_EXTENSIONS,
    SUPPORTED_RTCP_FB,
    Codec,
    Extmap,
    LocalTransport,
    OfferedMedia,
    SdpError,
    build_answer,
    build_offer,
    check_answer,
    parse_sdp,
    remote_transport,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sdp"
FIXTURE_NAMES = ["chrome", "firefox", "aiortc", "safari"]

TWCC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
FINGERPRINT = ("sha-256", ":".join(["3C"] * 32))


def load(name: str) -> str:
    return (FIXTURES / f"{name}_offer.sdp").read_bytes().decode()


def local_transport(setup: str = "actpass") -> LocalTransport:
    return LocalTransport(
        ice_ufrag="rlyU",
        ice_pwd="relaypasswordrelaypasswd",
        fingerprint=FINGERPRINT,
        candidates=[("192.0.2.10", 40000), ("fd00::10", 40001)],
        setup=setup,
        session_id=4242,
        session_version=7,
    )


def names(codecs: list[Codec]) -> list[str]:
    return [c.name for c in codecs]


def answer_lines(sdp: str) -> list[str]:
    return sdp.split("\r\n")


# ---------------------------------------------------------------------------------------------
# Parsing the fixtures


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_parses_with_crlf_and_lf(name: str) -> None:
    text = load(name)
    assert "\r\n" in text
    crlf = parse_sdp(text)
    lf = parse_sdp(text.replace("\r\n", "\n"))
    assert crlf == lf
    assert crlf.media and crlf.bundle_mids == [m.mid for m in crlf.media]
    for m in crlf.media:
        assert m.ice_ufrag and m.ice_pwd and m.fingerprints
        assert m.setup == "actpass"


def test_parse_chrome() -> None:
    d = parse_sdp(load("chrome"))
    assert d.session_id == 6826443339223409227 and d.session_version == 2
    assert d.extmap_allow_mixed and not d.ice_lite
    assert [m.mid for m in d.media] == ["0", "1", "2"]
    audio, video, app = d.media

    assert (audio.kind, audio.port, audio.protocol) == ("audio", 52830, "UDP/TLS/RTP/SAVPF")
    assert audio.direction == "sendrecv"
    assert audio.rtcp_mux and audio.rtcp_rsize
    opus = audio.codecs[0]
    assert (opus.payload_type, opus.name, opus.clock_rate, opus.channels) == (111, "opus", 48000, 2)
    assert opus.mime_type == "audio/opus" and opus.kind == "audio"
    assert opus.fmtp == {"minptime": "10", "useinbandfec": "1"}
    assert opus.rtcp_fb == ["transport-cc"]
    assert names(audio.codecs) == [
        "opus",
        "red",
        "G722",
        "PCMU",
        "PCMA",
        "CN",
        "telephone-event",
        "telephone-event",
    ]
    assert audio.codec(63) is not None and audio.codec(63).fmtp == {"111/111": ""}
    assert [(e.id, e.uri) for e in audio.extmaps] == [
        (1, AUDIO_LEVEL),
        (2, ABS_SEND_TIME),
        (3, TWCC),
        (4, MID_URI),
    ]
    assert audio.ssrcs == [457497428]
    assert audio.ssrc_cnames == {457497428: "zX2JadBjeYjwMPOS"}
    stream = "6387c22d-8c8e-41d2-a287-34101bdb7650"
    assert audio.msid == (stream, "740f17e1-2da9-47d5-ba7d-65c9aaf7f928")
    assert audio.ice_ufrag == "gjKa" and audio.ice_pwd == "1h/DLXLdCcF7QXR9Ae+MQxzM"
    assert audio.fingerprints == [
        (
            "sha-256",
            "24:01:65:F1:B4:9E:24:9D:F4:6C:DD:D4:96:1F:ED:6A:2B:44:E6:B5:64:A4:A3:5F:9B:8C:6A:19:29:C3:3C:40",
        )
    ]
    assert len(audio.candidates) == 4
    assert audio.candidates[0].startswith("621479308 1 udp 2122194687 192.0.2.2 52830 typ host")

    assert video.direction == "sendonly"
    rtx_of = {c.payload_type: c.rtx_payload_type for c in video.codecs}
    assert rtx_of[96] == 97 and rtx_of[102] == 103 and rtx_of[45] == 46 and rtx_of[118] == 119
    assert rtx_of[120] is None
    assert all(c.name != "rtx" for c in video.codecs)
    assert names(video.codecs)[:2] == ["VP8", "H264"]
    assert video.codec(104).param("PACKETIZATION-MODE") == "0"
    assert video.codec(102).param("packetization-mode") == "1"
    assert video.codec(96).rtcp_fb == ["goog-remb", "transport-cc", "ccm fir", "nack", "nack pli"]
    assert video.codec(96).has_feedback("NACK PLI")
    ext = {e.uri: e.id for e in video.extmaps}
    assert ext["urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"] == 10
    assert ext["urn:ietf:params:rtp-hdrext:toffset"] == 14 and ext[MID_URI] == 4
    assert video.ssrcs == [1840449578, 2592241827]
    assert video.ssrc_groups == [("FID", [1840449578, 2592241827])]
    assert video.rtx_ssrc(1840449578) == 2592241827 and video.rtx_ssrc(2592241827) is None
    assert video.msid == (stream, "78c3c49d-d47d-4595-8393-f811a62454ad")

    assert (app.kind, app.protocol, app.formats) == (
        "application",
        "UDP/DTLS/SCTP",
        ["webrtc-datachannel"],
    )
    assert app.codecs == [] and app.sctp_port == 5000 and not app.rtcp_mux


def test_parse_firefox_session_level_fallbacks() -> None:
    d = parse_sdp(load("firefox"))
    fp = "B5:15:B5:B4:67:15:C0:14:B4:CA:31:21:C1:46:FE:CB:00:66:C7:E8:26:A1:7F:8F:C5:0C:1F:75:ED:32:F8:D7"
    assert d.fingerprints == [("sha-256", fp)]
    audio, video, app = d.media
    # Fingerprint only at session level; ufrag/pwd per media.
    assert audio.fingerprints == video.fingerprints == app.fingerprints == [("sha-256", fp)]
    assert audio.ice_ufrag == "f0edf2e2" and audio.ice_pwd == "9c2cbfbfedff4d200e97335d7be9d78c"
    # Session says a=sendrecv, media-level overrides.
    assert (audio.direction, video.direction) == ("sendrecv", "sendonly")
    assert audio.codecs[0].name == "opus" and audio.codecs[0].payload_type == 109
    assert audio.codecs[0].fmtp["stereo"] == "1"
    g722 = audio.codec(9)
    assert (g722.clock_rate, g722.channels) == (8000, 1)
    assert audio.codec(101).fmtp == {"0-15": ""}
    assert Extmap(2, "urn:ietf:params:rtp-hdrext:csrc-audio-level", "recvonly") in audio.extmaps
    assert [(c.payload_type, c.name, c.rtx_payload_type) for c in video.codecs] == [
        (120, "VP8", 124),
        (121, "VP9", 125),
        (99, "AV1", 100),
        (123, "ulpfec", None),
        (122, "red", 119),
    ]
    assert Extmap(6, "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay", "recvonly") in (
        video.extmaps
    )
    # ssrc lines come before the FID group in Firefox's offers.
    assert video.ssrcs == [4177493558, 2707499915]
    assert video.ssrc_groups == [("FID", [4177493558, 2707499915])]
    assert video.ssrc_cnames[2707499915] == "{2b717001-32a3-483b-a6c2-3f5c3e765843}"
    assert video.msid == (
        "{8f8dba4a-08b2-43a9-8563-a9fade492de3}",
        "{4ffdc9b6-9216-4238-bb5f-46ac4209784a}",
    )
    assert audio.rtcp_mux and not audio.rtcp_rsize and video.rtcp_rsize
    assert audio.end_of_candidates and len(audio.candidates) == 8


def test_parse_aiortc() -> None:
    d = parse_sdp(load("aiortc"))
    audio, video = d.media
    assert [(c.payload_type, c.name, c.clock_rate, c.channels) for c in audio.codecs] == [
        (96, "opus", 48000, 2),
        (9, "G722", 8000, None),
        (0, "PCMU", 8000, None),
        (8, "PCMA", 8000, None),
    ]
    assert [(c.payload_type, c.rtx_payload_type) for c in video.codecs] == [
        (97, 98),
        (99, 100),
        (101, 102),
    ]
    assert video.codec(101).param("profile-level-id") == "42e01f"
    assert [(e.id, e.uri) for e in video.extmaps] == [(1, MID_URI), (3, ABS_SEND_TIME)]
    assert video.ssrc_groups == [("FID", [789159697, 3923720075])]
    assert [algo for algo, _ in audio.fingerprints] == ["sha-256", "sha-384", "sha-512"]
    assert audio.msid[0] == video.msid[0] == "0e418f54-f4a6-444f-bbc8-2516c5ad2268"
    assert not audio.rtcp_rsize and audio.rtcp_mux


def test_parse_safari() -> None:
    d = parse_sdp(load("safari"))
    audio, video = d.media
    assert audio.direction == video.direction == "sendrecv"
    assert [(c.payload_type, c.name) for c in video.codecs][:3] == [
        (96, "H264"),
        (98, "H264"),
        (100, "H265"),
    ]
    assert video.codec(96).param("profile-level-id") == "640c1f"
    assert video.codec(100).rtx_payload_type == 101
    assert video.ssrc_groups == [("FID", [1174406389, 3027661817])]
    assert video.ssrc_msids[3027661817] == video.msid
    assert any(" typ srflx raddr 192.168.1.23 " in c for c in video.candidates)


def test_msid_from_ssrc_lines_when_no_msid_attribute() -> None:
    text = load("chrome").replace("a=msid:6387c22d", "a=x-removed:6387c22d")
    video = parse_sdp(text).media[1]
    assert video.msid == (
        "6387c22d-8c8e-41d2-a287-34101bdb7650",
        "78c3c49d-d47d-4595-8393-f811a62454ad",
    )


def test_parse_rids_and_simulcast() -> None:
    text = load("chrome").replace(
        "a=mid:1\r\n",
        "a=mid:1\r\na=rid:h send\r\na=rid:m send\r\na=rid:l send\r\na=simulcast:send h;m;l\r\n",
    )
    video = parse_sdp(text).media[1]
    assert video.rids == [("h", "send"), ("m", "send"), ("l", "send")]
    assert video.simulcast == "send h;m;l"


# ---------------------------------------------------------------------------------------------
# Answering the fixtures

# One codec is accepted (with its RTX), the first of the default preference the client offers:
# VP8 everywhere, even from Safari, which lists H.264 High first.
EXPECTED_VIDEO = {
    "chrome": [(96, 97)],
    "firefox": [(120, 124)],
    "aiortc": [(97, 98)],
    "safari": [(102, 103)],
}
EXPECTED_OPUS_PT = {"chrome": 111, "firefox": 109, "aiortc": 96, "safari": 111}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_answer_fixture(name: str) -> None:
    offer = parse_sdp(load(name))
    sdp, answered = build_answer(offer, local_transport())
    assert [a.mid for a in answered] == [m.mid for m in offer.media]

    audio = next(a for a in answered if a.kind == "audio")
    video = next(a for a in answered if a.kind == "video")
    assert not audio.rejected and not video.rejected
    assert [(c.payload_type, c.name) for c in audio.codecs] == [(EXPECTED_OPUS_PT[name], "opus")]
    assert [(c.payload_type, c.rtx_payload_type) for c in video.codecs] == EXPECTED_VIDEO[name]
    assert audio.direction == "recvonly" and video.direction == "recvonly"
    for a in (audio, video):
        assert all(e.uri in SUPPORTED_EXTENSIONS for e in a.extmaps)
        offered_ids = {(e.id, e.uri) for e in a.offer.extmaps}
        assert all((e.id, e.uri) in offered_ids for e in a.extmaps)
        for c in a.codecs:
            # plus exactly one kind of congestion-control feedback (transport-cc when offered)
            assert set(c.rtcp_fb) <= SUPPORTED_RTCP_FB | {"transport-cc", "goog-remb"}
            assert not {"transport-cc", "goog-remb"} <= set(c.rtcp_fb)
            assert c.name != "H264" or c.param("packetization-mode") == "1"

    lines = answer_lines(sdp)
    assert lines[:4] == ["v=0", "o=- 4242 7 IN IP4 0.0.0.0", "s=-", "t=0 0"]
    assert "a=ice-lite" in lines
    # every m-line, rejected ones too, carries the bundle transport's attributes
    assert lines.count("a=setup:passive") == len(answered)
    assert "a=setup:actpass" not in lines and "a=setup:active" not in lines

    parsed = parse_sdp(sdp)
    assert parsed.ice_lite
    assert [m.mid for m in parsed.media] == [a.mid for a in answered]
    accepted = [a.mid for a in answered if not a.rejected]
    assert parsed.bundle_mids == accepted
    for a, m in zip(answered, parsed.media, strict=True):
        if a.rejected:
            assert m.port == 0 and m.formats == a.offer.formats and m.protocol == a.offer.protocol
            continue
        assert m.port == 40000 and m.connection_address == "192.0.2.10"
        assert m.direction == "recvonly" and m.rtcp_mux and m.setup == "passive"
        assert m.rtcp_rsize == a.offer.rtcp_rsize
        assert m.ice_ufrag == "rlyU" and m.fingerprints == [FINGERPRINT]
        assert m.codecs == a.codecs
        assert m.extmaps == a.extmaps
        assert m.candidates == [
            "1 1 udp 2130706431 192.0.2.10 40000 typ host",
            "2 1 udp 2130706175 fd00::10 40001 typ host",
        ]
        assert m.end_of_candidates


@pytest.mark.parametrize("name", ["chrome", "firefox"])
def test_answer_rejects_data_channel(name: str) -> None:
    offer = parse_sdp(load(name))
    sdp, answered = build_answer(offer, local_transport())
    app = answered[2]
    assert app.kind == "application" and app.rejected
    assert app.reason == DATA_CHANNELS_UNSUPPORTED
    assert "audio and video only" in app.reason and "turned off" in app.reason
    assert "m=application 0 UDP/DTLS/SCTP webrtc-datachannel" in answer_lines(sdp)
    assert "a=group:BUNDLE 0 1" in answer_lines(sdp)
    parsed = parse_sdp(sdp)
    assert parsed.media[2].mid == "2" and parsed.media[2].port == 0
    assert "2" not in parsed.bundle_mids
    # with the transport's attributes and candidates, as aiortc requires of every m-line
    app_answer, video_answer = parsed.media[2], parsed.media[1]
    assert app_answer.connection_address == "0.0.0.0"
    assert (app_answer.ice_ufrag, app_answer.ice_pwd) == ("rlyU", "relaypasswordrelaypasswd")
    assert app_answer.fingerprints == [FINGERPRINT] and app_answer.setup == "passive"
    assert app_answer.candidates == video_answer.candidates and app_answer.end_of_candidates
    assert not app_answer.rtcp_mux and app_answer.sctp_port is None


def test_answer_drops_recvonly_extensions_and_unsupported_feedback() -> None:
    offer = parse_sdp(load("firefox"))
    _, answered = build_answer(offer, local_transport())
    audio_uris = [e.uri for e in answered[0].extmaps]
    assert "urn:ietf:params:rtp-hdrext:csrc-audio-level" not in audio_uris
    video_uris = [e.uri for e in answered[1].extmaps]
    assert "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay" not in video_uris
    # transport-wide-cc (7) is taken, so abs-send-time (4), only used with REMB, is not
    assert [e.id for e in answered[1].extmaps] == [3, 5, 7]

    text = load("chrome").replace(
        "a=rtcp-fb:96 nack pli\r\n", "a=rtcp-fb:96 nack pli\r\na=rtcp-fb:96 rrtr\r\n"
    )
    _, answered = build_answer(parse_sdp(text), local_transport())
    assert "rrtr" not in answered[1].codecs[0].rtcp_fb


def test_answer_sendonly_extension_answered_recvonly() -> None:
    text = load("aiortc").replace(
        f"a=extmap:3 {ABS_SEND_TIME}", f"a=extmap:3/sendonly {ABS_SEND_TIME}"
    )
    sdp, answered = build_answer(parse_sdp(text), local_transport())
    assert Extmap(3, ABS_SEND_TIME, "recvonly") in answered[1].extmaps
    assert f"a=extmap:3/recvonly {ABS_SEND_TIME}" in answer_lines(sdp)


def test_answer_rtx_dropped_without_nack() -> None:
    text = load("aiortc").replace("a=rtcp-fb:97 nack\r\n", "")
    _, answered = build_answer(parse_sdp(text), local_transport())
    video = answered[1]
    assert video.codecs[0].payload_type == 97 and video.codecs[0].rtx_payload_type is None
    assert len(video.codecs) == 1


def test_answer_setup_roles() -> None:
    text = load("aiortc")
    sdp, _ = build_answer(
        parse_sdp(text.replace("a=setup:actpass", "a=setup:active")), local_transport()
    )
    assert {m.setup for m in parse_sdp(sdp).media} == {"passive"}
    sdp, _ = build_answer(
        parse_sdp(text.replace("a=setup:actpass", "a=setup:passive")), local_transport()
    )
    assert {m.setup for m in parse_sdp(sdp).media} == {"active"}
    # local.setup is for offers only.
    sdp, _ = build_answer(parse_sdp(text), local_transport(setup="active"))
    assert {m.setup for m in parse_sdp(sdp).media} == {"passive"}
    with pytest.raises(SdpError, match="setup"):
        build_answer(
            parse_sdp(text.replace("a=setup:actpass", "a=setup:holdconn")), local_transport()
        )


def test_answer_recvonly_and_inactive_offers_are_inactive_not_rejected() -> None:
    text = load("aiortc")
    head, audio, video = text.split("m=")
    text = (
        head
        + "m="
        + audio.replace("a=sendrecv", "a=recvonly")
        + "m="
        + video.replace("a=sendrecv", "a=inactive")
    )
    sdp, answered = build_answer(parse_sdp(text), local_transport())
    assert [(a.rejected, a.direction) for a in answered] == [
        (False, "inactive"),
        (False, "inactive"),
    ]
    assert answered[1].codecs
    parsed = parse_sdp(sdp)
    assert [m.direction for m in parsed.media] == ["inactive", "inactive"]
    assert parsed.bundle_mids == ["0", "1"]


def test_answer_no_supported_codec_rejected() -> None:
    text = load("aiortc")
    text = text.replace(
        "m=audio 37342 UDP/TLS/RTP/SAVPF 96 9 0 8", "m=audio 37342 UDP/TLS/RTP/SAVPF 9 0 8"
    )
    sdp, answered = build_answer(parse_sdp(text), local_transport())
    assert answered[0].rejected and answered[0].reason == "no supported codec"
    parsed = parse_sdp(sdp)
    assert parsed.media[0].port == 0 and parsed.media[0].formats == ["9", "0", "8"]
    assert parsed.bundle_mids == ["1"]


def test_answer_every_mline_rejected_still_parses() -> None:
    text = load("chrome")
    head, *sections = text.split("m=")
    text = head + "m=" + sections[2]
    text = text.replace("a=group:BUNDLE 0 1 2", "a=group:BUNDLE 2")
    sdp, answered = build_answer(parse_sdp(text), local_transport())
    assert [a.rejected for a in answered] == [True]
    parsed = parse_sdp(sdp)
    assert parsed.bundle_mids == [] and parsed.media[0].port == 0 and parsed.media[0].mid == "2"


def test_answer_disabled_offer_mline_rejected() -> None:
    text = load("aiortc").replace("m=audio 37342 ", "m=audio 0 ").replace("BUNDLE 0 1", "BUNDLE 1")
    _, answered = build_answer(parse_sdp(text), local_transport())
    assert answered[0].rejected and not answered[1].rejected


def test_answer_without_candidates_uses_port_9() -> None:
    local = local_transport()
    local.candidates = []
    sdp, _ = build_answer(parse_sdp(load("aiortc")), local)
    parsed = parse_sdp(sdp)
    assert [m.port for m in parsed.media] == [9, 9]
    assert parsed.media[0].connection_address == "0.0.0.0" and parsed.media[0].candidates == []


VIDEO_ONLY_OFFER = """v=0
o=- 1 1 IN IP4 0.0.0.0
s=-
t=0 0
a=group:BUNDLE v
a=fingerprint:sha-256 {fp}
m=video 9 UDP/TLS/RTP/SAVPF {pts}
c=IN IP4 0.0.0.0
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuvwx
a=setup:actpass
a=mid:v
a=sendonly
a=rtcp-mux
{codecs}"""


def video_only_offer(pts: str, codecs: str) -> str:
    return VIDEO_ONLY_OFFER.format(fp=FINGERPRINT[1], pts=pts, codecs=codecs)


def test_h264_requires_packetization_mode_1() -> None:
    mode0 = video_only_offer(
        "100 101",
        "a=rtpmap:100 H264/90000\na=fmtp:100 profile-level-id=42e01f;packetization-mode=0\n"
        "a=rtpmap:101 H264/90000\na=fmtp:101 profile-level-id=42e01f\n",
    )
    _, answered = build_answer(parse_sdp(mode0), local_transport())
    assert answered[0].rejected and answered[0].reason == "no supported codec"

    mode1 = video_only_offer(
        "100 101 102",
        "a=rtpmap:100 H264/90000\na=fmtp:100 profile-level-id=42e01f;packetization-mode=0\n"
        "a=rtpmap:101 H264/90000\na=fmtp:101 profile-level-id=42e01f;Packetization-Mode=1\n"
        "a=rtcp-fb:101 nack\na=rtpmap:102 rtx/90000\na=fmtp:102 apt=101\n",
    )
    sdp, answered = build_answer(parse_sdp(mode1), local_transport())
    assert not answered[0].rejected
    assert [(c.payload_type, c.rtx_payload_type) for c in answered[0].codecs] == [(101, 102)]
    assert "m=video 40000 UDP/TLS/RTP/SAVPF 101 102" in answer_lines(sdp)
    assert "a=fmtp:101 profile-level-id=42e01f;Packetization-Mode=1" in answer_lines(sdp)


def test_wildcard_rtcp_fb() -> None:
    text = video_only_offer("96", "a=rtpmap:96 VP8/90000\na=rtcp-fb:* nack\na=rtcp-fb:* ccm fir\n")
    d = parse_sdp(text)
    assert d.media[0].codecs[0].rtcp_fb == ["nack", "ccm fir"]


# ---------------------------------------------------------------------------------------------
# Offers the relay must refuse


def test_missing_rtcp_mux() -> None:
    text = load("chrome").replace("a=rtcp-mux\r\n", "", 1)
    with pytest.raises(SdpError, match="m-line 0: missing a=rtcp-mux"):
        build_answer(parse_sdp(text), local_transport())


def test_missing_bundle() -> None:
    text = load("firefox").replace("a=group:BUNDLE 0 1 2\r\n", "")
    with pytest.raises(SdpError, match="BUNDLE"):
        build_answer(parse_sdp(text), local_transport())


def test_missing_fingerprint() -> None:
    text = "\r\n".join(
        line for line in load("chrome").split("\r\n") if not line.startswith("a=fingerprint")
    )
    with pytest.raises(SdpError, match="missing a=fingerprint"):
        build_answer(parse_sdp(text), local_transport())
    # Firefox: session-level only.
    text = "\r\n".join(
        line for line in load("firefox").split("\r\n") if not line.startswith("a=fingerprint")
    )
    with pytest.raises(SdpError, match="missing a=fingerprint"):
        build_answer(parse_sdp(text), local_transport())


def test_missing_ice_credentials() -> None:
    text = "\r\n".join(
        line for line in load("aiortc").split("\r\n") if not line.startswith("a=ice-pwd")
    )
    with pytest.raises(SdpError, match="ice-pwd"):
        build_answer(parse_sdp(text), local_transport())


def test_missing_mid() -> None:
    text = load("aiortc").replace("a=mid:1\r\n", "")
    with pytest.raises(SdpError, match="m-line 1: missing a=mid"):
        build_answer(parse_sdp(text), local_transport())


def test_mline_outside_bundle_rejected() -> None:
    text = load("aiortc").replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0")
    _, answered = build_answer(parse_sdp(text), local_transport())
    assert not answered[0].rejected
    assert answered[1].rejected and answered[1].reason == "not in the BUNDLE group"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "v= line"),
        ("o=- 1 1 IN IP4 0.0.0.0\r\n", "v= line"),
        ("v=1\r\n", "version"),
        ("v=0\r\nhello\r\n", "line 2"),
        ("v=0\r\nm=audio\r\n", "m-line 0"),
        ("v=0\r\nm=audio x UDP/TLS/RTP/SAVPF 111\r\n", "port"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF opus\r\n", "payload type"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 200\r\n", "out of range"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:abc opus/48000/2\r\n", "rtpmap"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus\r\n", "rtpmap"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/fast\r\n", "clock rate"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fmtp:x a=1\r\n", "fmtp"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=extmap:one urn:x\r\n", "extmap"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ssrc:-1 cname:x\r\n", "ssrc"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ssrc:99999999999 cname:x\r\n", "ssrc"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ssrc-group:FID 1 x\r\n", "ssrc-group"),
        ("v=0\r\na=fingerprint:sha-256\r\n", "fingerprint"),
        ("v=0\r\nm=audio 9 P 1\r\na=mid:a\r\nm=audio 9 P 1\r\na=mid:a\r\n", "duplicate mid"),
        ("v=0\r\nm=audio 9 RTP/SAVPF 1\r\na=rtpmap:1 a/1\r\na=rtpmap:1 b/1\r\n", "duplicate"),
        ("v=0\r\nm=audio ９ UDP/TLS/RTP/SAVPF 111\r\n", "port"),
    ],
)
def test_structural_errors(text: str, message: str) -> None:
    with pytest.raises(SdpError, match=message):
        parse_sdp(text)


def test_non_string_input() -> None:
    with pytest.raises(SdpError):
        parse_sdp(b"v=0\r\n")  # type: ignore[arg-type]
    with pytest.raises(SdpError):
        parse_sdp(None)  # type: ignore[arg-type]


def test_too_large() -> None:
    with pytest.raises(SdpError, match="too large"):
        parse_sdp("v=0\r\n" + "a=x\r\n" * 300_000)


def _fuzz_inputs(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    fixtures = [load(n) for n in FIXTURE_NAMES]
    alphabet = "v=oamcst0123456789 :/;\r\n-*.abcxyzAVP\x00\u00e9\u2028\u0663"
    out: list[str] = [
        "\x00",
        "v=0",
        "v=0\r\n" * 3,
        "=",
        "v=\r\n",
        "\ufeffv=0\r\n",
        "v=0\r\nm=\r\n",
        "v=0\r\nm=a 1 RTP/AVP\r\n",
        "v=0\r\na=rtpmap:\r\n",
        "v=0\r\nm=audio 9 RTP/AVP 1\r\na=rtcp-fb:\r\na=ssrc:\r\na=ssrc-group:\r\na=extmap:\r\n",
        "v=0\r\nm=audio 9 RTP/AVP 1\r\na=rtpmap:1 x/1/\r\na=fmtp:1 ;;=;=x\r\n",
        "v=0\r\nm=audio 9 RTP/AVP 1\r\na=fmtp:1 apt=\r\na=rtpmap:1 rtx/90000\r\n",
    ]
    for _ in range(count):
        choice = rng.random()
        if choice < 0.3:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))))
        elif choice < 0.5:
            base = rng.choice(fixtures)
            cut = rng.randint(0, len(base))
            out.append(base[:cut])
        else:
            lines = rng.choice(fixtures).split("\r\n")
            for _ in range(rng.randint(1, 8)):
                op = rng.random()
                i = rng.randrange(len(lines))
                if op < 0.3:
                    del lines[i]
                elif op < 0.5:
                    lines.insert(rng.randrange(len(lines)), lines[i])
                elif op < 0.8 and lines[i]:
                    j = rng.randrange(len(lines[i]))
                    chars = list(lines[i])
                    chars[j] = rng.choice(alphabet)
                    lines[i] = "".join(chars)
                else:
                    tokens = lines[i].split(" ")
                    k = rng.randrange(len(tokens))
                    tokens[k] = rng.choice(["", "x", "-1", "999999999999", "/", ":", "0"])
                    lines[i] = " ".join(tokens)
            out.append("\r\n".join(lines))
    return out


def test_fuzz_only_sdp_error() -> None:
    parsed_ok = 0
    for text in _fuzz_inputs(seed=1234, count=3000):
        try:
            desc = parse_sdp(text)
        except SdpError:
            continue
        parsed_ok += 1
        try:
            sdp, _ = build_answer(desc, local_transport())
        except SdpError:
            continue
        parse_sdp(sdp)  # whatever we answer must parse back
    assert parsed_ok > 100


# ---------------------------------------------------------------------------------------------
# Subscriber offers

OPUS = Codec(
    111, "opus", 48000, 2, {"minptime": "10", "useinbandfec": "1"}, ["transport-cc"], kind="audio"
)
VP8 = Codec(96, "VP8", 90000, None, {}, ["goog-remb", "ccm fir", "nack", "nack pli"], 97, "video")
H264 = Codec(
    102,
    "H264",
    90000,
    None,
    {"level-asymmetry-allowed": "1", "packetization-mode": "1", "profile-level-id": "42e01f"},
    ["nack", "nack pli"],
    103,
    "video",
)
AUDIO_EXT = [Extmap(1, AUDIO_LEVEL), Extmap(4, MID_URI)]
VIDEO_EXT = [Extmap(2, ABS_SEND_TIME), Extmap(4, MID_URI)]


def subscriber_media() -> list[OfferedMedia]:
    return [
        OfferedMedia("a0", "audio", "sendonly", [OPUS], AUDIO_EXT, 1111, None, "al", ("st", "ta")),
        OfferedMedia(
            "v0", "video", "sendonly", [VP8, H264], VIDEO_EXT, 2222, 2223, "al", ("st", "tv")
        ),
        OfferedMedia("x", "video", "inactive", [VP8], VIDEO_EXT, None),
    ]


def test_build_offer_round_trip() -> None:
    media = subscriber_media()
    sdp = build_offer(local_transport(), media)
    lines = answer_lines(sdp)
    assert "a=group:BUNDLE a0 v0 x" in lines and "a=ice-lite" in lines
    assert lines.count("a=setup:actpass") == 3
    assert "a=ssrc-group:FID 2222 2223" in lines
    assert "a=ssrc:2223 msid:st tv" in lines and "a=ssrc:2222 cname:al" in lines
    assert "m=video 40000 UDP/TLS/RTP/SAVPF 96 97 102 103" in lines

    d = parse_sdp(sdp)
    assert d.ice_lite and d.bundle_mids == ["a0", "v0", "x"]
    a, v, x = d.media
    assert (a.direction, v.direction, x.direction) == ("sendonly", "sendonly", "inactive")
    assert a.msid == ("st", "ta") and v.msid == ("st", "tv") and x.msid is None
    assert a.codecs == [OPUS] and v.codecs == [VP8, H264] and x.codecs == [VP8]
    assert v.extmaps == VIDEO_EXT
    assert v.ssrcs == [2222, 2223] and v.ssrc_groups == [("FID", [2222, 2223])]
    assert v.ssrc_cnames == {2222: "al", 2223: "al"}
    assert x.ssrcs == [] and x.mid == "x"
    assert all(m.rtcp_mux and m.rtcp_rsize and m.setup == "actpass" for m in d.media)
    priorities = {c.split()[3] for c in a.candidates}
    assert len(priorities) == len(a.candidates) == 2
    t = remote_transport(d)
    assert (t.ice_ufrag, t.setup, t.fingerprints) == ("rlyU", "actpass", [FINGERPRINT])


def test_build_offer_default_cname_and_empty() -> None:
    media = [OfferedMedia("a", "audio", "sendonly", [OPUS], [], 5, msid=("s1", "t1"))]
    assert "a=ssrc:5 cname:s1" in answer_lines(build_offer(local_transport(), media))
    empty = parse_sdp(build_offer(local_transport(), []))
    assert empty.media == [] and empty.bundle_mids == []


@pytest.mark.parametrize(
    "media",
    [
        [OfferedMedia("a", "audio", "sendonly", [], [], 1)],
        [OfferedMedia("a", "audio", "sideways", [OPUS], [], 1)],
        [OfferedMedia("a", "audio", "sendonly", [OPUS], [], None, rtx_ssrc=2)],
        [OfferedMedia("a", "audio", "sendonly", [OPUS], [], 1, rtx_ssrc=2)],
        [OfferedMedia("a", "audio", "sendonly", [OPUS], [], 1)] * 2,
        [OfferedMedia("a b", "audio", "sendonly", [OPUS], [], 1)],
    ],
)
def test_build_offer_rejects_bad_input(media: list[OfferedMedia]) -> None:
    with pytest.raises(SdpError):
        build_offer(local_transport(), media)


def test_check_answer_errors() -> None:
    media = subscriber_media()
    good = (
        build_offer(local_transport(), media)
        .replace("a=setup:actpass", "a=setup:active")
        .replace("a=sendonly", "a=recvonly")
    )
    assert check_answer(media, parse_sdp(good)).setup == "active"
    with pytest.raises(SdpError, match="actpass"):
        check_answer(media, parse_sdp(build_offer(local_transport(), media)))
    with pytest.raises(SdpError, match="m-lines"):
        check_answer(media[:2], parse_sdp(good))
    with pytest.raises(SdpError, match="kind"):
        check_answer(list(reversed(media)), parse_sdp(good))
    renamed = [media[0], dataclasses.replace(media[1], mid="zz"), media[2]]
    with pytest.raises(SdpError, match="mid 'v0' answers an offered 'zz'"):
        check_answer(renamed, parse_sdp(good))
    with pytest.raises(SdpError, match="rtcp-mux"):
        check_answer(media, parse_sdp(good.replace("a=rtcp-mux\r\n", "", 1)))


# ---------------------------------------------------------------------------------------------
# Real aiortc peers


async def _close(pc) -> None:
    await asyncio.wait_for(pc.close(), timeout=10)


async def test_aiortc_accepts_answer() -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTrack(AudioStreamTrack())
        pc.addTrack(VideoStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        offer = parse_sdp(pc.localDescription.sdp)
        sdp, answered = build_answer(offer, local_transport())
        assert not any(a.rejected for a in answered)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        assert pc.signalingState == "stable"
        assert [t.mid for t in pc.getTransceivers()] == [a.mid for a in answered]
        assert [t.currentDirection for t in pc.getTransceivers()] == ["sendonly", "sendonly"]
    finally:
        await _close(pc)


async def test_aiortc_answers_subscriber_offer() -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    media = subscriber_media()
    offer = build_offer(local_transport(), media)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    tracks = []
    pc.on("track", tracks.append)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = parse_sdp(pc.localDescription.sdp)
        assert [m.mid for m in answer.media] == ["a0", "v0", "x"]
        assert [m.kind for m in answer.media] == ["audio", "video", "video"]
        assert [m.direction for m in answer.media] == ["recvonly", "recvonly", "inactive"]
        assert answer.bundle_mids == ["a0", "v0", "x"]
        transport = check_answer(media, answer)
        assert transport is not None and transport.setup in ("active", "passive")
        assert transport.fingerprints
        assert [t.kind for t in tracks] == ["audio", "video"]
        assert answer.media[1].codecs[0].name == "VP8"
        assert answer.media[1].codecs[0].rtx_payload_type == 97
    finally:
        await _close(pc)


@pytest.mark.parametrize(
    ("mode", "fb", "uri"),
    [
        ("auto", "transport-cc", TWCC),
        ("remb", "goog-remb", "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"),
        ("none", None, None),
    ],
)
def test_answer_congestion_control_modes(mode: str, fb: str | None, uri: str | None) -> None:
    _, answered = build_answer(parse_sdp(load("chrome")), local_transport(), mode)
    video = answered[1]
    feedback = set(video.codecs[0].rtcp_fb) & {"transport-cc", "goog-remb"}
    assert feedback == ({fb} if fb else set())
    uris = {e.uri for e in video.extmaps}
    cc_uris = {TWCC, "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"}
    assert uris & cc_uris == ({uri} if uri else set())


def test_answer_falls_back_to_remb_without_twcc_offer() -> None:
    text = "\r\n".join(
        line for line in load("chrome").split("\r\n") if "transport-wide-cc" not in line
    )
    _, answered = build_answer(parse_sdp(text), local_transport(), "auto")
    assert "goog-remb" in answered[1].codecs[0].rtcp_fb


# ---------------------------------------------------------------------------------------------
# a=extmap-allow-mixed and extension ids above 14 (RFC 8285)


def session_part(sdp: str) -> list[str]:
    """The session-level lines of an SDP (before the first m=)."""
    return answer_lines(sdp.split("\r\nm=", 1)[0])


def test_answer_echoes_session_level_extmap_allow_mixed() -> None:
    sdp, _ = build_answer(parse_sdp(load("chrome")), local_transport())
    assert "a=extmap-allow-mixed" in session_part(sdp)
    assert answer_lines(sdp).count("a=extmap-allow-mixed") == 1
    assert parse_sdp(sdp).extmap_allow_mixed


def test_answer_echoes_media_level_extmap_allow_mixed() -> None:
    # Firefox writes it in each m-line: answered in each accepted m-line, not the rejected one
    sdp, answered = build_answer(parse_sdp(load("firefox")), local_transport())
    assert "a=extmap-allow-mixed" not in session_part(sdp)
    parsed = parse_sdp(sdp)
    assert not parsed.extmap_allow_mixed
    assert [m.extmap_allow_mixed for m in parsed.media] == [not a.rejected for a in answered]
    assert [a.rejected for a in answered] == [False, False, True]


def test_answer_without_extmap_allow_mixed_when_not_offered() -> None:
    sdp, _ = build_answer(parse_sdp(load("aiortc")), local_transport())
    assert "a=extmap-allow-mixed" not in answer_lines(sdp)
    parsed = parse_sdp(sdp)
    assert not parsed.extmap_allow_mixed
    assert not any(m.extmap_allow_mixed for m in parsed.media)


def test_subscriber_offer_carries_extmap_allow_mixed() -> None:
    sdp = build_offer(local_transport(), subscriber_media())
    assert "a=extmap-allow-mixed" in session_part(sdp)
    assert parse_sdp(sdp).extmap_allow_mixed
    plain = build_offer(local_transport(), subscriber_media(), extmap_allow_mixed=False)
    assert "a=extmap-allow-mixed" not in answer_lines(plain)


def chrome_with_wide_ids(allow_mixed: bool) -> str:
    """Chrome's offer with transport-cc at id 17, mid at 16 and audio level at 15."""
    text = (
        load("chrome")
        .replace(f"a=extmap:3 {TWCC}", f"a=extmap:17 {TWCC}")
        .replace(f"a=extmap:4 {MID_URI}", f"a=extmap:16 {MID_URI}")
        .replace(f"a=extmap:1 {AUDIO_LEVEL}", f"a=extmap:15 {AUDIO_LEVEL}")
    )
    assert text.count("a=extmap:17 ") == 2 and text.count("a=extmap:16 ") == 2
    if not allow_mixed:
        text = text.replace("a=extmap-allow-mixed\r\n", "")
    return text


def test_answer_takes_ids_above_14_with_extmap_allow_mixed() -> None:
    sdp, answered = build_answer(parse_sdp(chrome_with_wide_ids(True)), local_transport())
    audio, video = answered[0], answered[1]
    assert {(e.id, e.uri) for e in audio.extmaps} >= {(15, AUDIO_LEVEL), (16, MID_URI), (17, TWCC)}
    assert {(e.id, e.uri) for e in video.extmaps} >= {(16, MID_URI), (17, TWCC)}
    assert "transport-cc" in video.codecs[0].rtcp_fb
    lines = answer_lines(sdp)
    assert f"a=extmap:17 {TWCC}" in lines and "a=extmap-allow-mixed" in lines


def test_answer_drops_ids_above_14_without_extmap_allow_mixed() -> None:
    _, answered = build_answer(parse_sdp(chrome_with_wide_ids(False)), local_transport())
    audio, video = answered[0], answered[1]
    for a in (audio, video):
        assert all(1 <= e.id <= 14 for e in a.extmaps)
        assert not {e.uri for e in a.extmaps} & {TWCC, MID_URI}
    # transport-cc cannot be carried: the relay estimates the bandwidth itself (REMB)
    assert "transport-cc" not in video.codecs[0].rtcp_fb
    assert "goog-remb" in video.codecs[0].rtcp_fb
    assert (2, ABS_SEND_TIME) in {(e.id, e.uri) for e in video.extmaps}


@pytest.mark.parametrize("ext_id", [0, 256, 4096])
def test_answer_never_takes_ids_outside_1_to_255(ext_id: int) -> None:
    text = load("chrome").replace(f"a=extmap:4 {MID_URI}", f"a=extmap:{ext_id} {MID_URI}")
    _, answered = build_answer(parse_sdp(text), local_transport())
    assert MID_URI not in {e.uri for a in answered for e in a.extmaps}


# ---------------------------------------------------------------------------------------------
# Data channels


def data_channel_only_offer() -> str:
    """Chrome's offer with only its m=application (a page that made a data channel only)."""
    head, *sections = load("chrome").split("m=")
    return head.replace("a=group:BUNDLE 0 1 2", "a=group:BUNDLE 2") + "m=" + sections[2]


def test_answer_data_channel_only_offer_rejects_it() -> None:
    sdp, answered = build_answer(parse_sdp(data_channel_only_offer()), local_transport())
    assert [(a.kind, a.rejected, a.reason) for a in answered] == [
        ("application", True, DATA_CHANNELS_UNSUPPORTED)
    ]
    assert "m=application 0 UDP/DTLS/SCTP webrtc-datachannel" in answer_lines(sdp)
    assert not any(line.startswith("a=group:BUNDLE") for line in answer_lines(sdp))


def test_dependency_descriptor_is_taken_with_av1_only() -> None:
    dd = "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension"
    codecs = (
        "a=rtpmap:96 VP8/90000\na=rtpmap:45 AV1/90000\n"
        f"a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\na=extmap:11 {dd}\n"
    )
    offer = parse_sdp(video_only_offer("96 45", codecs))
    _, answered = build_answer(offer, local_transport(), codec_preference=("AV1", "VP8"))
    assert answered[0].codecs[0].name == "AV1"
    assert [(e.id, e.uri) for e in answered[0].extmaps] == [
        (4, "urn:ietf:params:rtp-hdrext:sdes:mid"),
        (11, dd),
    ]
    # with VP8 (its payload descriptor says its layers) the relay does not ask for it
    _, answered = build_answer(offer, local_transport(), codec_preference=("VP8", "AV1"))
    assert answered[0].codecs[0].name == "VP8"
    assert [e.uri for e in answered[0].extmaps] == ["urn:ietf:params:rtp-hdrext:sdes:mid"]
