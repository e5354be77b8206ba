"""The video codec the relay answers a publisher with: the room's preference, not the client's
order, and H.264 told apart by its profile-level-id (RFC 6184)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.rtc.sdp import (
    DEFAULT_VIDEO_PREFERENCE,
    LocalTransport,
    build_answer,
    parse_profile_level_id,
    parse_sdp,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sdp"
#: Safari's video m-line: H.264 Constrained High 640c1f (96, rtx 97), H.264 Constrained Baseline
#: 42e01f (98, rtx 99), H265 (100), VP8 (102, rtx 103), VP9 profile 0 (104) and 2 (106), ...
SAFARI_VIDEO_FORMATS = "96 97 98 99 100 101 102 103 104 105 106 107 108 109 127"


def safari(formats: str = SAFARI_VIDEO_FORMATS) -> str:
    """The Safari fixture, its video m-line listing ``formats`` (the client's order)."""
    text = (FIXTURES / "safari_offer.sdp").read_text()
    return text.replace(
        f"m=video 58120 UDP/TLS/RTP/SAVPF {SAFARI_VIDEO_FORMATS}",
        f"m=video 58120 UDP/TLS/RTP/SAVPF {formats}",
    )


def local() -> LocalTransport:
    return LocalTransport(
        "rlyU",
        "relaypasswordrelaypasswd",
        ("sha-256", "AB:CD"),
        [("192.0.2.10", 40000)],
        "actpass",
        1,
        1,
    )


def video_answer(offer: str, **options: object) -> list[tuple[int, str, int | None, str | None]]:
    """(payload type, name, rtx payload type, profile-level-id) of the answered video codecs."""
    sdp, answered = build_answer(parse_sdp(offer), local(), **options)  # type: ignore[arg-type]
    video = next(a for a in answered if a.kind == "video")
    # the answer SDP says the same as the returned description
    section = sdp[sdp.index("m=video") :]
    listed = re.match(r"m=video (\d+) \S+ ?(.*)", section)
    assert listed is not None
    if video.rejected:
        assert listed.group(1) == "0"
        return []
    pts = [str(c.payload_type) for c in video.codecs]
    pts += [str(c.rtx_payload_type) for c in video.codecs if c.rtx_payload_type is not None]
    assert listed.group(2).split() == pts
    return [
        (c.payload_type, c.name, c.rtx_payload_type, c.param("profile-level-id"))
        for c in video.codecs
    ]


def test_default_preference_is_what_every_client_decodes_first() -> None:
    assert DEFAULT_VIDEO_PREFERENCE == ("VP8", "H264", "VP9", "AV1")


def test_safari_gets_vp8_although_it_lists_h264_high_first() -> None:
    assert video_answer(safari()) == [(102, "VP8", 103, None)]


@pytest.mark.parametrize(
    "formats",
    [
        "102 103 96 97 98 99 100 101 104 105 106 107 108 109 127",  # VP8 first
        "104 105 106 107 96 97 98 99 100 101 108 109 127 102 103",  # VP8 last
    ],
)
def test_vp8_is_chosen_whatever_the_clients_order(formats: str) -> None:
    assert video_answer(safari(formats)) == [(102, "VP8", 103, None)]


def test_h264_preference_takes_constrained_baseline_not_high() -> None:
    """Safari lists 640c1f before 42e01f: the room's "H264" means the one everyone decodes."""
    assert video_answer(safari(), codec_preference=["H264"]) == [(98, "H264", 99, "42e01f")]
    assert video_answer(safari(), codec_preference=("H264", "VP8")) == [(98, "H264", 99, "42e01f")]


def test_preference_order_beats_the_clients_order() -> None:
    assert video_answer(safari(), codec_preference=["VP9", "VP8"]) == [(104, "VP9", 105, None)]
    # VP9 profile 2 (106) is not taken while profile 0 (104) is offered, whatever the order
    formats = "106 107 104 105 102 103"
    assert video_answer(safari(formats), codec_preference=["VP9"]) == [(104, "VP9", 105, None)]


def test_h264_high_is_a_last_resort() -> None:
    """Only forms some clients cannot decode on offer: the client's first listed one is taken,
    and only for a codec the preference names."""
    high_and_vp9_profile_2 = "106 107 96 97"
    assert video_answer(safari(high_and_vp9_profile_2)) == [(106, "VP9", 107, None)]
    assert video_answer(safari("96 97 106 107")) == [(96, "H264", 97, "640c1f")]
    assert video_answer(safari("96 97 106 107"), codec_preference=["VP9"]) == [
        (106, "VP9", 107, None)
    ]
    # anything on the list in a form everyone decodes beats every last resort
    assert video_answer(safari("96 97 106 107 98 99"), codec_preference=["VP9", "H264"]) == [
        (98, "H264", 99, "42e01f")
    ]


def test_codecs_left_out_of_the_preference_are_never_taken() -> None:
    assert video_answer(safari(), codec_preference=["AV1"]) == []
    sdp, answered = build_answer(parse_sdp(safari()), local(), codec_preference=["AV1"])
    audio = next(a for a in answered if a.kind == "audio")
    assert not audio.rejected and [c.name for c in audio.codecs] == ["opus"]


def test_h264_needs_packetization_mode_1() -> None:
    offer = safari("98 99").replace(
        "packetization-mode=1;profile-level-id=42e01f", "profile-level-id=42e01f"
    )
    assert video_answer(offer, codec_preference=["H264"]) == []


def test_h264_without_profile_level_id_counts_as_constrained_baseline() -> None:
    offer = safari("96 97 98 99").replace(";profile-level-id=42e01f", "")
    assert video_answer(offer, codec_preference=["H264"]) == [(98, "H264", 99, None)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("42e01f", ("constrained-baseline", 31)),  # Chrome, Firefox, Safari
        ("42E01F", ("constrained-baseline", 31)),
        ("42c01f", ("constrained-baseline", 31)),  # constraint_set1 is what counts
        ("4de01f", ("constrained-baseline", 31)),  # Main with set1: decodable as CB
        ("4d801f", ("constrained-baseline", 31)),
        ("58c01f", ("constrained-baseline", 31)),  # Extended with set0 and set1
        ("42001f", ("baseline", 31)),
        ("58801f", ("baseline", 31)),
        ("4d001f", ("main", 31)),
        ("640c1f", ("constrained-high", 31)),  # Safari's first H.264
        ("64001f", ("high", 31)),
        ("640034", ("high", 52)),
        ("f4001f", ("predictive-high-444", 31)),
        ("42f00b", ("constrained-baseline", 0)),  # level 1.1 with constraint_set3: level 1b
        ("42e00b", ("constrained-baseline", 11)),
        ("42e00a", ("constrained-baseline", 10)),
        (None, ("constrained-baseline", 31)),  # absent: libwebrtc's compatible default
        ("42e0ff", None),  # no such level
        ("42e009", None),
        ("6e001f", None),  # High 10: not a WebRTC profile
        ("42e01", None),
        ("42e01f0", None),
        ("zze01f", None),
        ("", None),
        ("0x42e0", None),
    ],
)
def test_profile_level_id(value: str | None, expected: tuple[str, int] | None) -> None:
    assert parse_profile_level_id(value) == expected
