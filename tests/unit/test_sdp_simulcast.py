"""Simulcast in relay.rtc.sdp: RID simulcast (RFC 8851 a=rid, RFC 8853 a=simulcast) and
libwebrtc's SSRC simulcast (a=ssrc-group:SIM), parsed into layers and answered.

Fixtures in tests/fixtures/sdp/, all HAND-WRITTEN from the captured offers next to them, from
what is known of each client's format (not captures):
- chrome_simulcast_offer.sdp: chrome_offer.sdp with the video m-line in the style of Chromium
  120+ for ``sendEncodings`` with rids q, h, f (low to high): ``a=rid:<id> send`` lines and
  ``a=simulcast:send q;h;f`` after the codecs, the mid/rid/repaired-rid extmaps, no a=ssrc lines.
- firefox_simulcast_offer.sdp: firefox_offer.sdp with rids h, m, l in Firefox's (alphabetical)
  attribute order, the rid extmaps added, and one a=ssrc per layer and RTX with an FID group
  each (the SSRCs are not tied to rids in the SDP).
- libwebrtc_ssrc_simulcast_offer.sdp: chrome_offer.sdp with legacy SSRC simulcast as a
  libwebrtc native app sends it: ``a=ssrc-group:SIM`` of three SSRCs (lowest layer first), one
  FID group per SSRC.
- answers_without_simulcast.json: build_answer's output for the four captured offers (none has
  simulcast) under each congestion-control mode, recorded from the code before simulcast
  support; it must not change.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from relay.rtc import extensions as ext
from relay.rtc.sdp import (
    MAX_RID_ATTRIBUTE_LENGTH,
    MAX_RID_LENGTH,
    MAX_RIDS,
    MAX_SIM_SSRCS,
    AnsweredMedia,
    Codec,
    LocalTransport,
    OfferedMedia,
    RidDescription,
    RidRestrictions,
    SdpError,
    SimulcastLayer,
    build_answer,
    build_offer,
    parse_sdp,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sdp"
FINGERPRINT = ("sha-256", ":".join(["3C"] * 32))
CHROME_SIMULCAST = "a=simulcast:send q;h;f"


def load(name: str) -> str:
    return (FIXTURES / f"{name}_offer.sdp").read_bytes().decode()


def local_transport() -> LocalTransport:
    return LocalTransport(
        ice_ufrag="rlyU",
        ice_pwd="relaypasswordrelaypasswd",
        fingerprint=FINGERPRINT,
        candidates=[("192.0.2.10", 40000), ("fd00::10", 40001)],
        setup="actpass",
        session_id=4242,
        session_version=7,
    )


def answer(text: str, *, simulcast: bool = True) -> tuple[str, list[AnsweredMedia]]:
    return build_answer(parse_sdp(text), local_transport(), simulcast=simulcast)


def chrome_with(*lines: str, simulcast: str | None = CHROME_SIMULCAST) -> str:
    """The Chrome simulcast offer with ``lines`` added to its video m-line and its
    ``a=simulcast`` line replaced by ``simulcast`` (None: removed)."""
    text = load("chrome_simulcast")
    replacement = [simulcast] if simulcast is not None else []
    new = "\r\n".join([*lines, *replacement])
    return text.replace(CHROME_SIMULCAST + "\r\n", new + "\r\n" if new else "")


def simulcast_lines(sdp: str) -> list[str]:
    return [line for line in sdp.split("\r\n") if line.startswith(("a=rid:", "a=simulcast"))]


def rids(layers: list[SimulcastLayer]) -> list[str | None]:
    return [layer.rid for layer in layers]


NO_RESTRICTIONS = RidRestrictions()


# ---------------------------------------------------------------------------------------------
# Parsing the fixtures


def test_chrome_rid_layers() -> None:
    offer = parse_sdp(load("chrome_simulcast"))
    audio, video = offer.media[0], offer.media[1]
    assert audio.simulcast_layers == [] and audio.rid_descriptions == []
    assert video.simulcast_layers == [
        SimulcastLayer("q", "send", 0),
        SimulcastLayer("h", "send", 1),
        SimulcastLayer("f", "send", 2),
    ]
    assert all(layer.restrictions == NO_RESTRICTIONS for layer in video.simulcast_layers)
    assert video.rid_descriptions == [
        RidDescription("q", "send"),
        RidDescription("h", "send"),
        RidDescription("f", "send"),
    ]
    # the older fields keep their meaning
    assert video.rids == [("q", "send"), ("h", "send"), ("f", "send")]
    assert video.simulcast == "send q;h;f"
    assert not video.simulcast_draft
    # RID simulcast from Chromium signals no SSRC: they are learned from packets
    assert video.ssrcs == [] and video.ssrc_groups == []
    uris = {e.uri: e.id for e in video.extmaps}
    assert uris[ext.MID_URI] == 4
    assert uris[ext.RTP_STREAM_ID_URI] == 10
    assert uris[ext.REPAIRED_RTP_STREAM_ID_URI] == 11


def test_firefox_rid_layers_are_not_tied_to_the_signalled_ssrcs() -> None:
    video = parse_sdp(load("firefox_simulcast")).media[1]
    assert rids(video.simulcast_layers) == ["h", "m", "l"]
    assert [layer.stream for layer in video.simulcast_layers] == [0, 1, 2]
    assert all(layer.ssrc is None and layer.rtx_ssrc is None for layer in video.simulcast_layers)
    assert len(video.ssrcs) == 6
    assert [g for g, _ in video.ssrc_groups] == ["FID", "FID", "FID"]


def test_ssrc_simulcast_layers_from_sim_and_fid_groups() -> None:
    video = parse_sdp(load("libwebrtc_ssrc_simulcast")).media[1]
    assert video.simulcast_layers == [
        SimulcastLayer(None, "send", 0, ssrc=1840449578, rtx_ssrc=2592241827),
        SimulcastLayer(None, "send", 1, ssrc=3120585447, rtx_ssrc=1377356221),
        SimulcastLayer(None, "send", 2, ssrc=2217713614, rtx_ssrc=4093157552),
    ]
    # every SSRC of the SIM group (and their RTX) is exposed
    assert set(video.ssrcs) == {
        1840449578,
        3120585447,
        2217713614,
        2592241827,
        1377356221,
        4093157552,
    }
    assert video.rid_descriptions == [] and video.simulcast is None


def test_ssrc_simulcast_group_order_and_missing_rtx() -> None:
    text = load("libwebrtc_ssrc_simulcast")
    sim = "a=ssrc-group:SIM 1840449578 3120585447 2217713614\r\n"
    # the SIM group after the FID groups, and one FID group missing
    text = text.replace(sim, "").replace(
        "a=ssrc-group:FID 3120585447 1377356221\r\n",
        "a=ssrc-group:FID 3120585447 1377356221\r\n" + sim,
    )
    text = text.replace("a=ssrc-group:FID 2217713614 4093157552\r\n", "")
    video = parse_sdp(text).media[1]
    assert [(layer.ssrc, layer.rtx_ssrc) for layer in video.simulcast_layers] == [
        (1840449578, 2592241827),
        (3120585447, 1377356221),
        (2217713614, None),
    ]


def test_order_is_kept_as_given() -> None:
    # Chromium lists sendEncodings in the application's order, others may go high to low.
    # Nothing is sorted: the first listed is the first layer.
    video = parse_sdp(chrome_with(simulcast="a=simulcast:send f;h;q")).media[1]
    assert rids(video.simulcast_layers) == ["f", "h", "q"]
    sdp, _ = answer(chrome_with(simulcast="a=simulcast:send f;h;q"))
    assert simulcast_lines(sdp)[-1] == "a=simulcast:recv f;h;q"


def test_restrictions_are_parsed() -> None:
    text = load("chrome_simulcast").replace(
        "a=rid:f send\r\n",
        "a=rid:f send pt=96,98;max-width=1280;max-height=720;max-fps=30;max-fs=921600;"
        "max-br=2500000;max-pps=27648000;max-bpp=1.50;x-vendor=a b;max-width2\r\n",
    )
    f = parse_sdp(text).media[1].simulcast_layers[2]
    assert f.rid == "f"
    assert f.restrictions == RidRestrictions(
        payload_types=(96, 98),
        max_width=1280,
        max_height=720,
        max_fps=30,
        max_fs=921600,
        max_br=2500000,
        max_pps=27648000,
        max_bpp=1.5,
        other=(("x-vendor", "a b"), ("max-width2", None)),
    )


def test_paused_and_alternatives() -> None:
    text = chrome_with("a=rid:h2 send", simulcast="a=simulcast:send q;~h,h2;f")
    layers = parse_sdp(text).media[1].simulcast_layers
    assert [(x.rid, x.stream, x.alternative, x.paused) for x in layers] == [
        ("q", 0, 0, False),
        ("h", 1, 0, True),
        ("h2", 1, 1, False),
        ("f", 2, 0, False),
    ]


def test_recv_layers_are_listed_after_send_ones_as_written() -> None:
    text = chrome_with("a=rid:r recv", simulcast="a=simulcast:recv r send q;h;f")
    layers = parse_sdp(text).media[1].simulcast_layers
    assert [(x.rid, x.direction, x.stream) for x in layers] == [
        ("r", "recv", 0),
        ("q", "send", 0),
        ("h", "send", 1),
        ("f", "send", 2),
    ]


def test_draft_form_of_old_firefox() -> None:
    text = load("firefox_simulcast").replace(
        "a=simulcast:send h;m;l", "a=simulcast: send rid=h;m;l paused=m"
    )
    video = parse_sdp(text).media[1]
    assert video.simulcast_draft
    assert [(x.rid, x.paused) for x in video.simulcast_layers] == [
        ("h", False),
        ("m", True),
        ("l", False),
    ]


def test_draft_form_by_payload_type_gives_no_layers() -> None:
    text = load("firefox_simulcast").replace(
        "a=simulcast:send h;m;l", "a=simulcast: send pt=120;121"
    )
    video = parse_sdp(text).media[1]
    assert video.simulcast_draft and video.simulcast_layers == []
    sdp, answered = answer(text)
    assert simulcast_lines(sdp) == [] and answered[1].layers == []


def test_rid_simulcast_wins_over_a_sim_group() -> None:
    text = chrome_with("a=ssrc-group:SIM 1 2 3", "a=ssrc:1 cname:x")
    assert rids(parse_sdp(text).media[1].simulcast_layers) == ["q", "h", "f"]


def test_sim_group_without_rid_simulcast_next_to_unused_rids() -> None:
    # a=rid lines without a=simulcast describe no layer
    text = chrome_with("a=ssrc-group:SIM 1 2", simulcast=None)
    video = parse_sdp(text).media[1]
    assert [x.ssrc for x in video.simulcast_layers] == [1, 2]
    assert len(video.rid_descriptions) == 3


# ---------------------------------------------------------------------------------------------
# Answering


@pytest.mark.parametrize(
    ("name", "expected", "rid_id", "repaired_id"),
    [("chrome_simulcast", ["q", "h", "f"], 10, 11), ("firefox_simulcast", ["h", "m", "l"], 8, 9)],
)
def test_rid_simulcast_answer(
    name: str, expected: list[str], rid_id: int, repaired_id: int
) -> None:
    sdp, answered = answer(load(name))
    lines = [f"a=rid:{r} recv" for r in expected] + ["a=simulcast:recv " + ";".join(expected)]
    assert simulcast_lines(sdp) == lines
    assert rids(answered[1].layers) == expected
    assert answered[0].layers == []

    parsed = parse_sdp(sdp)
    audio, video = parsed.media[0], parsed.media[1]
    assert audio.rid_descriptions == [] and audio.simulcast is None
    assert video.direction == "recvonly"
    assert video.rid_descriptions == [RidDescription(r, "recv") for r in expected]
    assert [(x.rid, x.direction, x.stream, x.paused) for x in video.simulcast_layers] == [
        (r, "recv", i, False) for i, r in enumerate(expected)
    ]
    uris = {e.uri: e.id for e in video.extmaps}
    assert uris[ext.RTP_STREAM_ID_URI] == rid_id
    assert uris[ext.REPAIRED_RTP_STREAM_ID_URI] == repaired_id


@pytest.mark.parametrize("name", ["chrome_simulcast", "firefox_simulcast"])
def test_simulcast_adds_only_its_lines(name: str) -> None:
    """The simulcast answer is the answer without simulcast plus the a=rid and a=simulcast
    lines, after the video codecs."""
    text = load(name)
    with_simulcast, _ = answer(text)
    without, answered = answer(text, simulcast=False)
    assert simulcast_lines(without) == []
    assert answered[1].layers == []
    added = simulcast_lines(with_simulcast)
    assert [line for line in with_simulcast.split("\r\n") if line not in added] == without.split(
        "\r\n"
    )
    lines = with_simulcast.split("\r\n")
    first = lines.index(added[0])
    assert lines[first : first + len(added)] == added
    assert lines[first - 1].startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"))
    assert lines[first + len(added)].startswith("a=candidate:")


def test_ssrc_simulcast_answer_is_unchanged_and_exposes_layers() -> None:
    text = load("libwebrtc_ssrc_simulcast")
    sdp, answered = answer(text)
    assert sdp == answer(text, simulcast=False)[0]
    assert simulcast_lines(sdp) == []
    # whatever the answer says, the client sends every SIM layer
    for a in (answered, answer(text, simulcast=False)[1]):
        assert [(x.ssrc, x.rtx_ssrc) for x in a[1].layers] == [
            (1840449578, 2592241827),
            (3120585447, 1377356221),
            (2217713614, 4093157552),
        ]


def test_paused_and_alternatives_answer() -> None:
    text = chrome_with("a=rid:h2 send", simulcast="a=simulcast:send q;~h,h2;f")
    sdp, answered = answer(text)
    assert simulcast_lines(sdp) == [
        "a=rid:q recv",
        "a=rid:h recv",
        "a=rid:h2 recv",
        "a=rid:f recv",
        "a=simulcast:recv q;~h,h2;f",
    ]
    video = parse_sdp(sdp).media[1]
    assert [(x.rid, x.stream, x.alternative, x.paused) for x in video.simulcast_layers] == [
        ("q", 0, 0, False),
        ("h", 1, 0, True),
        ("h2", 1, 1, False),
        ("f", 2, 0, False),
    ]
    assert [x.paused for x in answered[1].layers] == [False, True, False, False]


def test_draft_form_is_answered_in_the_draft_form() -> None:
    text = load("firefox_simulcast").replace(
        "a=simulcast:send h;m;l", "a=simulcast: send rid=h;m;l paused=m"
    )
    sdp, _ = answer(text)
    assert simulcast_lines(sdp)[-1] == "a=simulcast: recv rid=h;m;l paused=m"
    video = parse_sdp(sdp).media[1]
    assert video.simulcast_draft
    assert [(x.rid, x.direction, x.paused) for x in video.simulcast_layers] == [
        ("h", "recv", False),
        ("m", "recv", True),
        ("l", "recv", False),
    ]


def test_answer_echoes_known_restrictions_and_filters_payload_types() -> None:
    # VP8 (96) is the codec taken; VP9 (98) is not, so it leaves the pt= list
    text = load("chrome_simulcast").replace(
        "a=rid:f send\r\n",
        "a=rid:f send pt=96,98;max-width=1280;max-height=720;max-fps=30;max-fs=921600;"
        "max-br=2500000;max-pps=27648000;max-bpp=1.50;x-vendor=1;max-width2\r\n",
    )
    sdp, answered = answer(text)
    assert simulcast_lines(sdp)[2] == (
        "a=rid:f recv pt=96;max-width=1280;max-height=720;max-fps=30;max-fs=921600;"
        "max-br=2500000;max-pps=27648000;max-bpp=1.5"
    )
    assert answered[1].layers[2].restrictions == RidRestrictions(
        payload_types=(96,),
        max_width=1280,
        max_height=720,
        max_fps=30,
        max_fs=921600,
        max_br=2500000,
        max_pps=27648000,
        max_bpp=1.5,
    )
    parsed = parse_sdp(sdp).media[1].simulcast_layers[2].restrictions
    assert parsed == answered[1].layers[2].restrictions


def test_valueless_and_unknown_restrictions_are_not_answered() -> None:
    text = load("chrome_simulcast").replace(
        "a=rid:h send\r\n", "a=rid:h send max-width;max-height=360;x-foo=bar\r\n"
    )
    sdp, _ = answer(text)
    assert simulcast_lines(sdp)[1] == "a=rid:h recv max-height=360"


def test_rid_without_the_answered_codec_is_removed() -> None:
    # f may only be sent in VP9 (98), which the answer does not take
    text = load("chrome_simulcast").replace("a=rid:f send\r\n", "a=rid:f send pt=98\r\n")
    sdp, answered = answer(text)
    assert simulcast_lines(sdp) == ["a=rid:q recv", "a=rid:h recv", "a=simulcast:recv q;h"]
    assert rids(answered[1].layers) == ["q", "h"]


def test_rid_keeps_the_answered_codec_and_its_rtx() -> None:
    text = load("chrome_simulcast").replace("a=rid:f send\r\n", "a=rid:f send pt=98,96,97\r\n")
    sdp, _ = answer(text)
    assert "a=rid:f recv pt=96,97" in simulcast_lines(sdp)


def test_rid_with_the_answered_rtx_but_not_its_codec_is_removed() -> None:
    text = load("chrome_simulcast").replace("a=rid:f send\r\n", "a=rid:f send pt=97,98\r\n")
    sdp, _ = answer(text)
    assert simulcast_lines(sdp)[-1] == "a=simulcast:recv q;h"


def test_dependent_rid_is_removed() -> None:
    text = load("chrome_simulcast").replace("a=rid:h send\r\n", "a=rid:h send depend=q\r\n")
    assert parse_sdp(text).media[1].simulcast_layers[1].restrictions.depend == ("q",)
    sdp, _ = answer(text)
    assert simulcast_lines(sdp) == ["a=rid:q recv", "a=rid:f recv", "a=simulcast:recv q;f"]


def test_no_rid_left_means_no_simulcast() -> None:
    text = load("chrome_simulcast")
    for rid in "qhf":
        text = text.replace(f"a=rid:{rid} send\r\n", f"a=rid:{rid} send pt=98\r\n")
    sdp, answered = answer(text)
    assert simulcast_lines(sdp) == [] and answered[1].layers == []
    assert sdp == answer(text, simulcast=False)[0]


def test_alternative_removed_keeps_its_stream() -> None:
    text = chrome_with("a=rid:h2 send pt=98", simulcast="a=simulcast:send q;h2,h;f")
    sdp, _ = answer(text)
    assert simulcast_lines(sdp)[-1] == "a=simulcast:recv q;h;f"


def test_without_the_rid_extension_no_simulcast_is_answered() -> None:
    # the relay could not tell the layers apart: the client is left to send one stream
    text = load("chrome_simulcast").replace(
        "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n", ""
    )
    sdp, answered = answer(text)
    assert simulcast_lines(sdp) == [] and answered[1].layers == []
    # the rid extension offered with an id the answer cannot take (15 without allow-mixed)
    text = (
        load("chrome_simulcast")
        .replace("a=extmap-allow-mixed\r\n", "")
        .replace(
            "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
            "a=extmap:15 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
        )
    )
    sdp, answered = answer(text)
    assert simulcast_lines(sdp) == [] and answered[1].layers == []


def test_offered_recv_simulcast_is_not_answered() -> None:
    text = chrome_with("a=rid:r recv", simulcast="a=simulcast:send q;h;f recv r")
    sdp, answered = answer(text)
    assert simulcast_lines(sdp) == [
        "a=rid:q recv",
        "a=rid:h recv",
        "a=rid:f recv",
        "a=simulcast:recv q;h;f",
    ]
    assert [x.direction for x in answered[1].layers] == ["send"] * 3


def test_mline_the_client_does_not_send_gets_no_simulcast() -> None:
    text = load("chrome_simulcast").replace("a=sendonly\r\n", "a=recvonly\r\n")
    sdp, answered = answer(text)
    assert answered[1].direction == "inactive"
    assert simulcast_lines(sdp) == [] and answered[1].layers == []


def test_rejected_mline_gets_no_simulcast() -> None:
    text = load("chrome_simulcast").replace("a=mid:1\r\n", "a=mid:1\r\na=bundle-only\r\n", 1)
    text = text.replace("m=video 41143 ", "m=video 0 ")
    text = text.replace("a=group:BUNDLE 0 1 2", "a=group:BUNDLE 0 2")
    sdp, answered = answer(text)
    assert answered[1].rejected and answered[1].layers == []
    assert simulcast_lines(sdp) == []


def test_audio_simulcast_is_not_answered() -> None:
    text = load("chrome_simulcast").replace(
        "a=mid:0\r\n",
        "a=mid:0\r\na=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n"
        "a=rid:a send\r\na=rid:b send\r\na=simulcast:send a;b\r\n",
    )
    assert rids(parse_sdp(text).media[0].simulcast_layers) == ["a", "b"]
    sdp, answered = answer(text)
    assert answered[0].layers == []
    assert simulcast_lines(sdp) == [
        "a=rid:q recv",
        "a=rid:h recv",
        "a=rid:f recv",
        "a=simulcast:recv q;h;f",
    ]


def test_subscriber_offer_carries_no_simulcast() -> None:
    _, answered = answer(load("chrome_simulcast"))
    video = answered[1]
    offered = [
        OfferedMedia(
            mid="0",
            kind="video",
            direction="sendonly",
            codecs=[
                Codec(
                    c.payload_type,
                    c.name,
                    c.clock_rate,
                    rtx_payload_type=c.rtx_payload_type,
                    kind="video",
                )
                for c in video.codecs
            ],
            extmaps=video.extmaps,
            ssrc=1111,
            rtx_ssrc=2222,
            msid=("s", "t"),
        )
    ]
    offer = build_offer(local_transport(), offered)
    assert simulcast_lines(offer) == []
    assert "a=ssrc-group:SIM" not in offer
    assert parse_sdp(offer).media[0].simulcast_layers == []


# ---------------------------------------------------------------------------------------------
# Offers without simulcast: answered exactly as before


def test_offers_without_simulcast_are_answered_as_before() -> None:
    recorded = json.loads((FIXTURES / "answers_without_simulcast.json").read_text())
    assert len(recorded) == 12
    for key, expected in recorded.items():
        name, mode = key.split()
        offer = parse_sdp((FIXTURES / name).read_bytes().decode())
        sdp, answered = build_answer(offer, local_transport(), mode)
        assert sdp == expected, key
        assert all(a.layers == [] for a in answered)


def test_rids_added_to_the_captured_chrome_offer() -> None:
    # the offer of test_sdp.py's test_parse_rids_and_simulcast: the older fields and the layers
    text = load("chrome").replace(
        "a=mid:1\r\n",
        "a=mid:1\r\na=rid:h send\r\na=rid:m send\r\na=rid:l send\r\na=simulcast:send h;m;l\r\n",
    )
    video = parse_sdp(text).media[1]
    assert video.rids == [("h", "send"), ("m", "send"), ("l", "send")]
    assert video.simulcast == "send h;m;l"
    # chrome_offer.sdp has a FID group and a=ssrc lines: no SIM, so no SSRC layer
    assert rids(video.simulcast_layers) == ["h", "m", "l"]


# ---------------------------------------------------------------------------------------------
# Malformed lines: SdpError naming the m-line and the problem


MALFORMED = [
    # a=rid (RFC 8851 §10)
    (["a=rid:x"], CHROME_SIMULCAST, "malformed a=rid"),
    (["a=rid:x sendrecv"], CHROME_SIMULCAST, "direction 'sendrecv' is neither send nor recv"),
    (["a=rid:x SEND"], CHROME_SIMULCAST, "neither send nor recv"),
    (["a=rid:x! send"], CHROME_SIMULCAST, "characters other than letters, digits"),
    (["a=rid:é send"], CHROME_SIMULCAST, "characters other than letters, digits"),
    (["a=rid:x send pt="], CHROME_SIMULCAST, "empty pt= list"),
    (["a=rid:x send pt=96,abc"], CHROME_SIMULCAST, "pt: not a number: 'abc'"),
    (["a=rid:x send pt=96,,97"], CHROME_SIMULCAST, "pt: not a number: ''"),
    (["a=rid:x send pt=200"], CHROME_SIMULCAST, "pt: 200 out of range 0..127"),
    (["a=rid:x send max-width=1;pt=96"], CHROME_SIMULCAST, "pt= must be the first restriction"),
    (["a=rid:x send max-width=wide"], CHROME_SIMULCAST, "max-width: not a number: 'wide'"),
    (["a=rid:x send max-width=-1"], CHROME_SIMULCAST, "max-width: not a number"),
    (["a=rid:x send max-br=99999999999"], CHROME_SIMULCAST, "max-br: not a number"),
    (["a=rid:x send max-width=1;max-width=2"], CHROME_SIMULCAST, "'max-width' given twice"),
    (["a=rid:x send max-width=1;;max-height=2"], CHROME_SIMULCAST, "empty restriction"),
    (["a=rid:x send max-width=1;"], CHROME_SIMULCAST, "empty restriction"),
    (["a=rid:x send max-bpp=1"], CHROME_SIMULCAST, "max-bpp '1' is not of the form 1.5"),
    (["a=rid:x send max-bpp=12345.1"], CHROME_SIMULCAST, "is not of the form 1.5"),
    (["a=rid:x send depend="], CHROME_SIMULCAST, "depend: empty rid-id"),
    (["a=rid:x send depend=q,!"], CHROME_SIMULCAST, "depend: rid-id '!' has characters"),
    (["a=rid:x send max width=1"], CHROME_SIMULCAST, "malformed restriction 'max width=1'"),
    (["a=rid:x send x-foo=\x01"], CHROME_SIMULCAST, "restriction 'x-foo' has a non-printable"),
    (["a=rid:q send"], CHROME_SIMULCAST, "duplicate a=rid:q"),
    (["a=rid:q recv"], CHROME_SIMULCAST, "duplicate a=rid:q"),
    # a=simulcast (RFC 8853 §5.1)
    ([], "a=simulcast:send", "a=simulcast: expected send|recv <streams>"),
    ([], "a=simulcast:", "a=simulcast: expected send|recv <streams>"),
    ([], "a=simulcast:send q h", "a=simulcast: expected send|recv <streams>"),
    ([], "a=simulcast:sendrecv q;h;f", "direction 'sendrecv' is neither send nor recv"),
    ([], "a=simulcast:send q;h;f send q", "a=simulcast: send given twice"),
    ([], "a=simulcast:send q;;f", "a=simulcast send: empty stream in 'q;;f'"),
    ([], "a=simulcast:send q;h;f;", "empty stream"),
    ([], "a=simulcast:send q;h,;f", "a=simulcast send: empty rid-id"),
    ([], "a=simulcast:send q;~;f", "empty rid-id"),
    ([], "a=simulcast:send q;h~;f", "rid-id 'h~' has characters"),
    ([], "a=simulcast:send q;h;f;x", "a=simulcast send lists rid 'x' that no a=rid:x send"),
    ([], "a=simulcast:recv q;h;f", "a=simulcast recv lists rid 'q' that no a=rid:q recv"),
    ([], "a=simulcast:send q;h;q", "a=simulcast lists rid 'q' twice"),
    ([], "a=simulcast:send q;h,q;f", "a=simulcast lists rid 'q' twice"),
    ([CHROME_SIMULCAST], CHROME_SIMULCAST, "more than one a=simulcast"),
    # the draft-03 form
    ([], "a=simulcast: send rid=", "a=simulcast send: empty stream"),
    ([], "a=simulcast: send rid=q;h;f paused=x!", "paused=: rid-id 'x!' has characters"),
    ([], "a=simulcast: send rid=q;h;f paused=", "paused=: empty rid-id"),
    ([], "a=simulcast: send pt=96;abc", "a=simulcast send pt: not a number: 'abc'"),
    ([], "a=simulcast: send rid=q;h;f recv", "no stream list after recv"),
    ([], "a=simulcast: send q;h;f paused=h", "expected rid= or pt= after send, got 'q;h;f'"),
    ([], "a=simulcast: paused=q", "no send or recv stream list"),
    ([], "a=simulcast: send rid=q;h;x", "lists rid 'x' that no a=rid:x send"),
    # a=ssrc-group:SIM
    (["a=ssrc-group:SIM"], None, "a=ssrc-group:SIM lists no SSRC"),
    (["a=ssrc-group:SIM 1 2 1"], None, "a=ssrc-group:SIM lists an SSRC twice"),
    (["a=ssrc-group:SIM 1 2", "a=ssrc-group:SIM 3 4"], None, "more than one a=ssrc-group:SIM"),
    (["a=ssrc-group:SIM 1 x"], None, "ssrc-group ssrc: not a number"),
]


@pytest.mark.parametrize(("lines", "simulcast", "message"), MALFORMED)
def test_malformed(lines: list[str], simulcast: str | None, message: str) -> None:
    with pytest.raises(SdpError) as info:
        parse_sdp(chrome_with(*lines, simulcast=simulcast))
    assert "m-line 1: " in str(info.value)
    assert message in str(info.value)


def test_malformed_in_an_answer_too() -> None:
    sdp, _ = answer(load("chrome_simulcast"))
    with pytest.raises(SdpError, match="recv lists rid 'f' that no a=rid:f recv"):
        parse_sdp(sdp.replace("a=rid:f recv\r\n", ""))


# ---------------------------------------------------------------------------------------------
# Limits


def test_rid_length_limit() -> None:
    longest = "r" * MAX_RID_LENGTH
    text = chrome_with(f"a=rid:{longest} send", simulcast=f"a=simulcast:send q;h;{longest}")
    assert parse_sdp(text).media[1].simulcast_layers[2].rid == longest
    sdp, _ = answer(text)
    assert f"a=rid:{longest} recv" in simulcast_lines(sdp)
    with pytest.raises(SdpError, match=f"longer than {MAX_RID_LENGTH} characters"):
        parse_sdp(chrome_with(f"a=rid:{longest}x send"))
    with pytest.raises(SdpError, match=f"longer than {MAX_RID_LENGTH} characters"):
        parse_sdp(chrome_with(simulcast=f"a=simulcast:send q;h;{longest}x"))


def test_rid_count_limit() -> None:
    extra = [f"r{i}" for i in range(MAX_RIDS - 3)]
    listed = "q;h;f;" + ";".join(extra)
    text = chrome_with(*(f"a=rid:{r} send" for r in extra), simulcast=f"a=simulcast:send {listed}")
    assert len(parse_sdp(text).media[1].simulcast_layers) == MAX_RIDS
    assert simulcast_lines(answer(text)[0])[-1] == f"a=simulcast:recv {listed}"
    with pytest.raises(SdpError, match=f"m-line 1: more than {MAX_RIDS} a=rid lines"):
        parse_sdp(chrome_with(*(f"a=rid:{r} send" for r in [*extra, "one-more"])))
    with pytest.raises(SdpError, match=f"a=simulcast send: more than {MAX_RIDS} rids"):
        parse_sdp(chrome_with(simulcast=f"a=simulcast:send {listed};x1"))


def test_attribute_length_limit() -> None:
    long_value = "x-a=" + "b" * MAX_RID_ATTRIBUTE_LENGTH
    with pytest.raises(SdpError, match=f"a=rid value longer than {MAX_RID_ATTRIBUTE_LENGTH}"):
        parse_sdp(load("chrome_simulcast").replace("a=rid:f send", f"a=rid:f send {long_value}"))
    spaces = " " * MAX_RID_ATTRIBUTE_LENGTH
    with pytest.raises(SdpError, match="a=simulcast value longer than"):
        parse_sdp(chrome_with(simulcast=f"a=simulcast:send q;h;f{spaces}recv x"))


def test_sim_ssrc_count_limit() -> None:
    ssrcs = " ".join(str(1000 + i) for i in range(MAX_SIM_SSRCS))
    video = parse_sdp(chrome_with(f"a=ssrc-group:SIM {ssrcs}", simulcast=None)).media[1]
    assert len(video.simulcast_layers) == MAX_SIM_SSRCS
    with pytest.raises(SdpError, match=f"lists more than {MAX_SIM_SSRCS} SSRCs"):
        parse_sdp(chrome_with(f"a=ssrc-group:SIM {ssrcs} 9", simulcast=None))


# ---------------------------------------------------------------------------------------------
# Garbage never gets past SdpError


def test_random_rid_and_simulcast_lines_raise_only_sdp_error() -> None:
    """Random rid and simulcast lines, mostly well formed and some not, either parse or give
    SdpError; what parses is answered, and the answer parses again with the layers answered."""
    rng = random.Random(8853)

    def rid_id() -> str:
        if rng.random() < 0.9:
            return rng.choice(["q", "h", "f", "r", "x"])
        return rng.choice(["", "~q", "é", "a" * 17, "q!"])

    def rid_line() -> str:
        direction = rng.choice(["send", "send", "recv", "sendrecv", ""])
        restrictions = rng.choice(
            ["", "", " pt=96", " pt=98", " pt=96,97;max-width=320", " depend=q", " max-bpp=1.5"]
            + [" max-fps", " x=1;;", " pt=96;max-fps=x", " pt=", " max-br=1;max-br=2"]
        )
        return f"a=rid:{rid_id()} {direction}{restrictions}".rstrip()

    def simulcast_line() -> str:
        def streams() -> str:
            text = ""
            for _ in range(rng.randrange(1, 5)):
                text += rng.choice(["", "~"]) + rid_id() + rng.choice([";", ";", ",", ";;", ""])
            return text.rstrip(";,") if rng.random() < 0.8 else text

        value = rng.choice(["send", "recv", "send", "send", "bogus"]) + " " + streams()
        if rng.random() < 0.2:
            value += rng.choice([" recv ", " send ", " "]) + streams()
        if rng.random() < 0.15:
            # the draft-03 form: "a=simulcast: send rid=q;h recv rid=x paused=h"
            parts = value.split(" ")
            value = " " + " ".join(x if i % 2 == 0 else "rid=" + x for i, x in enumerate(parts))
            value += rng.choice(["", " paused=h"])
        return "a=simulcast:" + value

    base = load("chrome_simulcast").split("\r\n")
    targets = [i for i, line in enumerate(base) if line.startswith(("a=rid:", "a=simulcast"))]
    answered = with_layers = 0
    for _ in range(1500):
        lines = list(base)
        for _ in range(rng.randrange(1, 3)):
            line = rid_line() if rng.random() < 0.5 else simulcast_line()
            if rng.random() < 0.6:
                lines[rng.choice(targets)] = line
            else:
                lines.insert(rng.choice(targets), line)
        try:
            offer = parse_sdp("\r\n".join(lines))
        except SdpError:
            continue
        sdp, result = build_answer(offer, local_transport())
        answered += 1
        with_layers += bool(result[1].layers)
        assert rids(parse_sdp(sdp).media[1].simulcast_layers) == rids(result[1].layers)
    assert answered >= 30 and with_layers >= 20, (answered, with_layers)
