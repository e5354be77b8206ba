"""The Dependency Descriptor RTP header extension (AV1 RTP specification, Appendix A).

Every descriptor here is built bit by bit by :class:`Bits`, a writer of the test's own that
follows the spec's syntax (§A.8.2) and shares no code with the module. The template structures
are the spec's examples (§A.10.2.1 L1T3, §A.10.2.2 L3T3; the tables number templates from 1,
the syntax from 0: row n is template index n - 1) and the custom values the dynamic example of
§A.10.1.3.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from relay.rtc.dependency_descriptor import (
    DEPENDENCY_DESCRIPTOR_URI,
    BitReader,
    BitWriter,
    DecodeTargetIndication,
    DependencyDescriptorError,
    FrameDescriptor,
    FrameTemplate,
    RenderResolution,
    StructureUnknownError,
    TemplateStructure,
    decode_target_mask,
    frame_needed,
    parse,
    select_decode_target,
    write,
    write_with_bitmask,
)

DTI = DecodeTargetIndication
NP, D, S, R = DTI.NOT_PRESENT, DTI.DISCARDABLE, DTI.SWITCH, DTI.REQUIRED


class Bits:
    """The test's bit writer: a string of '0'/'1', most significant bit first."""

    def __init__(self) -> None:
        self.s = ""

    def raw(self, bits: str) -> Bits:
        assert set(bits) <= {"0", "1"}
        self.s += bits
        return self

    def f(self, n: int, value: int) -> Bits:
        """f(n): ``value`` in ``n`` bits."""
        assert 0 <= value < 2**n, (n, value)
        if n:
            self.s += format(value, "b").zfill(n)
        return self

    def ns(self, n: int, value: int) -> Bits:
        """write_ns(n, v) of §A.8.2: with w the bit length of n and m = 2**w - n, v < m in
        w - 1 bits, else v + m in w bits."""
        assert 0 <= value < n
        w = len(format(n, "b"))
        m = 2**w - n
        if value < m:
            return self.f(w - 1, value)
        return self.f(w, value + m)

    def bytes(self) -> bytes:
        """The bits, then zero_padding to a whole number of bytes."""
        s = self.s + "0" * (-len(self.s) % 8)
        return bytes(int(s[i : i + 8], 2) for i in range(0, len(s), 8))


# A template table row as in the spec's appendix: (S, T, Fdiffs, Chain fdiffs, DTIs), the DTIs
# as the spec's symbols: '-' not present, 'D' discardable, 'S' switch, 'R' required.
Row = tuple[int, int, tuple[int, ...], tuple[int, ...], str]

# §A.10.2.1 L1T3, decode targets 30 fps (DT0), 15 fps (DT1), 7.5 fps (DT2), one chain (the
# T0 frames) protecting all three.
L1T3: list[Row] = [
    (0, 0, (), (0,), "SSS"),  # 1: keyframe
    (0, 0, (4,), (4,), "SSS"),  # 2: T0, refers to the previous T0 (4 frames back)
    (0, 1, (2,), (2,), "SD-"),  # 3: T1
    (0, 2, (1,), (1,), "D--"),  # 4: T2 right after T0
    (0, 2, (1,), (3,), "D--"),  # 5: T2 right after T1
]
L1T3_PROTECTED_BY = (0, 0, 0)

# §A.10.2.2 L3T3 full SVC. Decode targets HD30, HD15, HD7.5, VGA30, VGA15, VGA7.5, QVGA30,
# QVGA15, QVGA7.5 (DT0..DT8). Chain 0: S0T0 frames; chain 1: S0/S1 T0; chain 2: all T0.
L3T3: list[Row] = [
    (0, 0, (), (0, 0, 0), "SSSSSSSSS"),  # 1
    (0, 0, (12,), (12, 11, 10), "RRRRRRSSS"),  # 2
    (0, 1, (6,), (6, 5, 4), "RR-RR-SD-"),  # 3
    (0, 2, (3,), (3, 2, 1), "R--R--D--"),  # 4
    (0, 2, (3,), (9, 8, 7), "R--R--D--"),  # 5
    (1, 0, (1,), (1, 1, 1), "SSSSSS---"),  # 6
    (1, 0, (12, 1), (1, 1, 1), "RRRSSS---"),  # 7
    (1, 1, (6, 1), (7, 6, 5), "RR-SD----"),  # 8
    (1, 2, (3, 1), (4, 3, 2), "R--D-----"),  # 9
    (1, 2, (3, 1), (10, 9, 8), "R--D-----"),  # 10
    (2, 0, (1,), (2, 1, 1), "SSS------"),  # 11
    (2, 0, (12, 1), (2, 1, 1), "SSS------"),  # 12
    (2, 1, (6, 1), (8, 7, 6), "SD-------"),  # 13
    (2, 2, (3, 1), (5, 4, 3), "D--------"),  # 14
    (2, 2, (3, 1), (11, 10, 9), "D--------"),  # 15
]
L3T3_PROTECTED_BY = (2, 2, 2, 1, 1, 1, 0, 0, 0)
L3T3_RESOLUTIONS = ((320, 180), (640, 360), (1280, 720))

# §A.10.1.3 (dynamic prediction structure, the first way): quality layers S0 and S1, DT0 = S0,
# DT1 = S0 + S1, chain 0 protects DT0 and chain 1 DT1. The spec's table gives layers, fdiffs and
# chain 0; the DTIs and chain 1 values are this test's choice.
Q2T1: list[Row] = [
    (0, 0, (), (0, 0), "SS"),  # 0: keyframe
    (0, 0, (2,), (2, 1), "RR"),  # 1: S0 steady state
    (1, 0, (1,), (1, 1), "-S"),  # 2: S1 first frame
    (1, 0, (1, 2), (1, 1), "-R"),  # 3: S1 steady state
]
Q2T1_PROTECTED_BY = (0, 1)


def put_mandatory(b: Bits, template_id: int, frame_number: int, sof: int = 1, eof: int = 1) -> Bits:
    """mandatory_descriptor_fields(): start_of_frame, end_of_frame, frame_dependency_template_id
    (6 bits), frame_number (16 bits)."""
    return b.f(1, sof).f(1, eof).f(6, template_id).f(16, frame_number)


def put_flags(
    b: Bits,
    structure: int = 0,
    bitmask: int = 0,
    dtis: int = 0,
    fdiffs: int = 0,
    chains: int = 0,
) -> Bits:
    """The five flags of extended_descriptor_fields(), in order."""
    return b.f(1, structure).f(1, bitmask).f(1, dtis).f(1, fdiffs).f(1, chains)


def put_structure(
    b: Bits,
    offset: int,
    table: list[Row],
    chain_count: int,
    protected_by: tuple[int, ...],
    resolutions: tuple[tuple[int, int], ...] | None = None,
) -> Bits:
    """template_dependency_structure() for a table of the spec's appendix."""
    dt_count = len(table[0][4])
    b.f(6, offset)  # template_id_offset
    b.f(5, dt_count - 1)  # dt_cnt_minus_one
    # template_layers(): a next_layer_idc after each template, 3 after the last
    for (s0, t0, *_), (s1, t1, *_) in zip(table, table[1:], strict=False):
        if (s1, t1) == (s0, t0):
            b.f(2, 0)  # same spatial and temporal id
        elif (s1, t1) == (s0, t0 + 1):
            b.f(2, 1)  # next temporal id
        else:
            assert (s1, t1) == (s0 + 1, 0)
            b.f(2, 2)  # next spatial id, temporal id 0
    b.f(2, 3)  # no more templates
    for *_, dtis in table:  # template_dtis(): 2 bits per decode target
        for symbol in dtis:
            b.f(2, "-DSR".index(symbol))
    for _, _, fdiffs, _, _ in table:  # template_fdiffs(): fdiff_follows_flag, fdiff_minus_one
        for fdiff in fdiffs:
            b.f(1, 1).f(4, fdiff - 1)
        b.f(1, 0)
    b.ns(dt_count + 1, chain_count)  # template_chains(): chain_cnt
    if chain_count:
        for chain in protected_by:  # decode_target_protected_by
            b.ns(chain_count, chain)
        for _, _, _, chains, _ in table:  # template_chain_fdiff, 4 bits each
            for fdiff in chains:
                b.f(4, fdiff)
    if resolutions is None:
        b.f(1, 0)  # resolutions_present_flag
    else:
        b.f(1, 1)
        for width, height in resolutions:  # max_render_{width,height}_minus_1
            b.f(16, width - 1).f(16, height - 1)
    return b


def keyframe(
    offset: int,
    table: list[Row],
    chain_count: int,
    protected_by: tuple[int, ...],
    frame_number: int = 100,
    resolutions: tuple[tuple[int, int], ...] | None = None,
    bitmask: int | None = None,
) -> bytes:
    """The first packet of a keyframe: template index 0, the structure, maybe a bitmask."""
    b = put_mandatory(Bits(), offset, frame_number, sof=1, eof=0)
    put_flags(b, structure=1, bitmask=bitmask is not None)
    put_structure(b, offset, table, chain_count, protected_by, resolutions)
    if bitmask is not None:
        b.f(len(table[0][4]), bitmask)  # active_decode_targets_bitmask, f(DtCnt)
    return b.bytes()


def check_template(frame: FrameDescriptor, row: Row) -> None:
    spatial, temporal, fdiffs, chains, dtis = row
    assert (frame.spatial_id, frame.temporal_id) == (spatial, temporal)
    assert frame.fdiffs == fdiffs
    assert frame.chain_fdiffs == chains
    assert "".join("-DSR"[dti] for dti in frame.dtis) == dtis
    assert all(type(dti) is DecodeTargetIndication for dti in frame.dtis)


@pytest.fixture
def l1t3() -> TemplateStructure:
    return parse(keyframe(60, L1T3, 1, L1T3_PROTECTED_BY), None).structure


@pytest.fixture
def l3t3() -> TemplateStructure:
    data = keyframe(10, L3T3, 3, L3T3_PROTECTED_BY, resolutions=L3T3_RESOLUTIONS)
    return parse(data, None).structure


@pytest.fixture
def q2t1() -> TemplateStructure:
    return parse(keyframe(0, Q2T1, 2, Q2T1_PROTECTED_BY), None).structure


# --- bits ---------------------------------------------------------------------------------------


def test_f_reads_msb_first_and_stops_at_the_end() -> None:
    reader = BitReader(b"\xa5\x0f")  # 1010 0101 0000 1111
    assert reader.f(0) == 0
    assert reader.f(1) == 1
    assert reader.f(3) == 0b010
    assert reader.f(6) == 0b010100
    assert (reader.position, reader.remaining) == (10, 6)
    assert reader.f(6) == 0b001111
    with pytest.raises(DependencyDescriptorError, match="truncated"):
        reader.f(1)
    assert reader.f(0) == 0
    with pytest.raises(DependencyDescriptorError):
        BitReader(b"").f(1)


@pytest.mark.parametrize(
    ("value", "bits"), [(0, "00"), (1, "01"), (2, "10"), (3, "110"), (4, "111")]
)
def test_ns_5_is_the_spec_table(value: int, bits: str) -> None:
    """§A.8.2's table of ns(5) encodings."""
    data = Bits().raw(bits).raw("1").bytes()  # a 1 after it: the read must stop before it
    reader = BitReader(data)
    assert reader.ns(5) == value
    assert reader.position == len(bits)
    writer = BitWriter()
    writer.ns(5, value)
    assert writer.position == len(bits)


@pytest.mark.parametrize("n", [*range(1, 18), 31, 32, 33, 63, 64, 65, 255, 256, 257])
def test_ns_every_value(n: int) -> None:
    """Every value of ns(n): powers of two (no short codes), one past them (one short code),
    one below them (all but one short), and n = 1 (no bits at all)."""
    for value in range(n):
        b = Bits().ns(n, value)
        width = len(b.s)
        reader = BitReader(b.raw("1" * 16).bytes())  # trailing ones must stay unread
        assert reader.ns(n) == value
        assert reader.position == width
        writer = BitWriter()
        writer.ns(n, value)
        assert writer.position == width
        assert writer.to_bytes() == Bits().ns(n, value).bytes()
    assert len(Bits().ns(1, 0).s) == 0


def test_ns_errors() -> None:
    with pytest.raises(DependencyDescriptorError):
        BitReader(b"\xff").ns(0)
    with pytest.raises(DependencyDescriptorError, match="truncated"):
        BitReader(b"").ns(2)
    with pytest.raises(DependencyDescriptorError, match="truncated"):
        BitReader(b"\xff").ns(1000)  # needs 9 or 10 bits
    assert BitReader(b"").ns(1) == 0  # reads nothing
    for n, value in [(5, 5), (5, -1), (1, 1), (0, 0)]:
        with pytest.raises(DependencyDescriptorError):
            BitWriter().ns(n, value)


def test_bit_writer() -> None:
    writer = BitWriter()
    writer.f(1, 1)
    writer.f(0, 0)
    writer.f(4, 0b0011)
    assert writer.to_bytes() == b"\x98"  # 10011 + 000 zero padding
    with pytest.raises(DependencyDescriptorError):
        writer.f(3, 8)
    with pytest.raises(DependencyDescriptorError):
        writer.f(3, -1)
    assert BitWriter().to_bytes() == b""


# --- L1T3 ---------------------------------------------------------------------------------------


def test_l1t3_keyframe_bit_by_bit() -> None:
    """The L1T3 keyframe descriptor written out by hand, field by field, equals the table
    encoding; then parsed."""
    # fmt: off
    bits = (
        "1"  # start_of_frame
        "1"  # end_of_frame
        "000000"  # frame_dependency_template_id 0
        "0000000000000001"  # frame_number 1
        "1"  # template_dependency_structure_present_flag
        "0"  # active_decode_targets_present_flag
        "000"  # custom_dtis_flag, custom_fdiffs_flag, custom_chains_flag
        "000000"  # template_id_offset 0
        "00010"  # dt_cnt_minus_one: 3 decode targets
        "00" "01" "01" "00" "11"  # next_layer_idc: same, T+1, T+1, same, end (T0 T0 T1 T2 T2)
        "101010" "101010" "100100" "010000" "010000"  # DTIs: SSS SSS SD- D-- D--
        "0"  # template 1: no fdiff (fdiff_follows_flag 0)
        "1" "0011" "0"  # template 2: fdiff 4 (flag, fdiff_minus_one 3, flag)
        "1" "0001" "0"  # template 3: fdiff 2
        "1" "0000" "0"  # template 4: fdiff 1
        "1" "0000" "0"  # template 5: fdiff 1
        "01"  # chain_cnt = ns(4) of 1: w = 3, m = 4, so 2 bits
        ""  # decode_target_protected_by = ns(1) x 3: no bits at all
        "0000" "0100" "0010" "0001" "0011"  # template chain fdiffs 0, 4, 2, 1, 3
        "0"  # resolutions_present_flag
    )
    # fmt: on
    assert len(bits) == 128  # exactly 16 bytes: no zero_padding
    data = Bits().raw(bits).bytes()
    b = put_mandatory(Bits(), 0, 1)
    assert data == put_structure(put_flags(b, structure=1), 0, L1T3, 1, L1T3_PROTECTED_BY).bytes()
    frame = parse(data)
    assert frame.start_of_frame and frame.end_of_frame
    assert (frame.template_id, frame.frame_number) == (0, 1)
    assert frame.new_structure
    structure = frame.structure
    assert structure.template_id_offset == 0
    assert structure.decode_target_count == 3
    assert structure.chain_count == 1
    assert structure.decode_target_protected_by == (0, 0, 0)
    assert structure.resolutions is None
    assert len(structure.templates) == 5
    for template, row in zip(structure.templates, L1T3, strict=True):
        assert (template.spatial_id, template.temporal_id) == row[:2]
        assert template.fdiffs == row[2]
        assert template.chain_fdiffs == row[3]
        assert "".join("-DSR"[dti] for dti in template.dtis) == row[4]
    # decode_target_layers(): 30 fps is T2, 15 fps T1, 7.5 fps T0
    assert structure.decode_target_layers == ((0, 2), (0, 1), (0, 0))
    assert (structure.max_spatial_id, structure.max_temporal_id) == (0, 2)
    check_template(frame, L1T3[0])
    assert frame.active_decode_targets_bitmask is None
    assert frame.active_decode_targets == 0b111  # a structure without a bitmask: all active
    assert frame.referred_frame_numbers == ()
    assert frame.resolution is None
    assert write(frame) == data


def test_l1t3_frames_refer_to_templates() -> None:
    """A keyframe with template_id_offset 60 (so ids wrap: 60, 61, 62, 63, 0), then one period
    of L1T3 in 3-byte descriptors that only name a template."""
    data = keyframe(60, L1T3, 1, L1T3_PROTECTED_BY, frame_number=65534)
    key = parse(data, None)
    structure = key.structure
    assert key.template_id == 60
    check_template(key, L1T3[0])
    assert write(key) == data
    # frame number (wrapping at 2**16), template id, template row
    period = [(65535, 63, 3), (0, 62, 2), (1, 0, 4), (2, 61, 1), (3, 63, 3)]
    for frame_number, template_id, index in period:
        data = put_mandatory(Bits(), template_id, frame_number).bytes()
        assert len(data) == 3  # mandatory fields only: no extended fields
        frame = parse(data, structure)
        assert frame.structure is structure
        assert not frame.new_structure
        assert frame.frame_number == frame_number
        check_template(frame, L1T3[index])
        assert frame.active_decode_targets_bitmask is None
        assert frame.active_decode_targets is None  # no change
        assert not (frame.custom_dtis or frame.custom_fdiffs or frame.custom_chains)
        assert write(frame) == data
    # the T1 frame 0 refers to frame 65534 (the keyframe), across the wrap
    assert parse(put_mandatory(Bits(), 62, 0).bytes(), structure).referred_frame_numbers == (65534,)


def test_template_id_outside_the_structure(l1t3: TemplateStructure) -> None:
    """Ids 60..64 (mod 64) are valid for the L1T3 structure at offset 60; 1 and 59 are not,
    e.g. after the packet of a newer structure was lost."""
    for template_id in (1, 2, 59):
        with pytest.raises(StructureUnknownError, match="template id"):
            parse(put_mandatory(Bits(), template_id, 7).bytes(), l1t3)


def test_no_structure() -> None:
    data = put_mandatory(Bits(), 0, 7).bytes()
    with pytest.raises(StructureUnknownError):
        parse(data)
    with pytest.raises(StructureUnknownError):  # a bitmask needs DtCnt
        parse(put_flags(put_mandatory(Bits(), 0, 7), bitmask=1).f(3, 7).bytes())
    assert issubclass(StructureUnknownError, DependencyDescriptorError)
    assert issubclass(DependencyDescriptorError, ValueError)


def test_shorter_than_three_bytes(l1t3: TemplateStructure) -> None:
    for data in (b"", b"\x80", b"\x80\x00"):
        with pytest.raises(DependencyDescriptorError, match="at least 3"):
            parse(data, l1t3)


# --- L3T3 ---------------------------------------------------------------------------------------


def test_l3t3_keyframe() -> None:
    data = keyframe(10, L3T3, 3, L3T3_PROTECTED_BY, frame_number=500, resolutions=L3T3_RESOLUTIONS)
    frame = parse(data, None)
    structure = frame.structure
    assert structure.template_id_offset == 10
    assert structure.decode_target_count == 9
    assert structure.chain_count == 3
    assert structure.decode_target_protected_by == L3T3_PROTECTED_BY
    assert structure.resolutions == tuple(RenderResolution(w, h) for w, h in L3T3_RESOLUTIONS)
    assert len(structure.templates) == 15
    for index, row in enumerate(L3T3):
        template = structure.templates[index]
        assert (template.spatial_id, template.temporal_id, template.fdiffs) == row[:3]
        assert template.chain_fdiffs == row[3]
        assert "".join("-DSR"[dti] for dti in template.dtis) == row[4]
    assert structure.decode_target_layers == (
        (2, 2), (2, 1), (2, 0), (1, 2), (1, 1), (1, 0), (0, 2), (0, 1), (0, 0),
    )  # fmt: skip
    assert (structure.max_spatial_id, structure.max_temporal_id) == (2, 2)
    check_template(frame, L3T3[0])
    assert frame.resolution == RenderResolution(320, 180)
    assert frame.active_decode_targets == 0x1FF
    assert write(frame) == data


def test_l3t3_frames(l3t3: TemplateStructure) -> None:
    """A temporal unit of L3T3 after the keyframe (S0, S1, S2 at T0; template ids from 10)."""
    for frame_number, index in [(501, 5), (502, 10), (503, 3), (504, 8), (505, 13), (512, 6)]:
        data = put_mandatory(Bits(), 10 + index, frame_number, sof=1, eof=0).bytes()
        frame = parse(data, l3t3)
        check_template(frame, L3T3[index])
        assert frame.start_of_frame and not frame.end_of_frame
        assert frame.resolution == RenderResolution(*L3T3_RESOLUTIONS[frame.spatial_id])
        assert write(frame) == data
    frame = parse(put_mandatory(Bits(), 16, 512).bytes(), l3t3)  # row 7: S1T0, fdiffs 12, 1
    assert frame.referred_frame_numbers == (500, 511)


# --- active decode targets ----------------------------------------------------------------------


def test_bitmask_with_a_new_structure() -> None:
    """The bitmask follows the structure and has its DtCnt bits (9 for L3T3), DT0 last."""
    data = keyframe(10, L3T3, 3, L3T3_PROTECTED_BY, bitmask=0b000000111)
    frame = parse(data, None)
    assert frame.active_decode_targets_bitmask == 0b111  # HD 30, 15, 7.5 fps
    assert frame.active_decode_targets == 0b111
    assert write(frame) == data
    assert Bits().ns(10, 3).s == "011"  # chain_cnt 3 = ns(10), in 3 bits


def test_bitmask_without_a_structure(l3t3: TemplateStructure) -> None:
    b = put_flags(put_mandatory(Bits(), 13, 600), bitmask=1)
    data = b.raw("000000001").bytes()  # only DT0 (the last bit read) active
    frame = parse(data, l3t3)
    assert frame.active_decode_targets_bitmask == 1
    assert frame.active_decode_targets == 1
    assert not frame.new_structure
    check_template(frame, L3T3[3])
    assert write(frame) == data
    assert len(data) == 5  # 24 + 5 + 9 bits
    frame = parse(put_flags(put_mandatory(Bits(), 13, 600), bitmask=1).raw("1" * 9).bytes(), l3t3)
    assert frame.active_decode_targets_bitmask == 0x1FF


def test_bitmask_absent(l1t3: TemplateStructure) -> None:
    frame = parse(put_mandatory(Bits(), 60, 7).bytes(), l1t3)
    assert frame.active_decode_targets_bitmask is None
    assert frame.active_decode_targets is None


def test_extended_fields_with_all_flags_clear(l1t3: TemplateStructure) -> None:
    """sz > 3 with every flag 0 (legal, not what encoders send): the same frame; written back
    in the 3-byte form. Nonzero zero_padding is ignored as §A.8.3 asks."""
    short = put_mandatory(Bits(), 61, 9).bytes()
    for data in (
        put_flags(put_mandatory(Bits(), 61, 9)).bytes(),
        put_flags(put_mandatory(Bits(), 61, 9)).raw("111").bytes(),
        put_flags(put_mandatory(Bits(), 61, 9)).raw("0" * 19).bytes(),
    ):
        assert len(data) > 3
        frame = parse(data, l1t3)
        assert frame == parse(short, l1t3)
        assert write(frame) == short


# --- custom values ------------------------------------------------------------------------------


def test_custom_chains_and_fdiffs_of_the_dynamic_example(q2t1: TemplateStructure) -> None:
    """§A.10.1.3: S0 skips frames 105..107, so F105..F107 (template 2, S1 first frame) carry
    custom chain 0 fdiffs 2, 3, 4, and F108 (template 1) a custom fdiff 5 and chain fdiff 5."""
    for frame_number, chain0 in [(105, 2), (106, 3), (107, 4)]:
        b = put_flags(put_mandatory(Bits(), 2, frame_number), chains=1)
        data = b.f(8, chain0).f(8, 1).bytes()  # frame_chain_fdiff[0], [1]: 8 bits each
        frame = parse(data, q2t1)
        assert frame.custom_chains and not (frame.custom_fdiffs or frame.custom_dtis)
        assert frame.chain_fdiffs == (chain0, 1)
        assert frame.fdiffs == (1,)  # the template's
        assert frame.referred_frame_numbers == (frame_number - 1,)
        assert write(frame) == data
    b = put_flags(put_mandatory(Bits(), 1, 108), fdiffs=1, chains=1)
    b.f(2, 1).f(4, 5 - 1).f(2, 0)  # next_fdiff_size 1, fdiff_minus_one 4; next_fdiff_size 0
    data = b.f(8, 5).f(8, 2).bytes()
    frame = parse(data, q2t1)
    assert frame.custom_fdiffs and frame.custom_chains
    assert frame.fdiffs == (5,)
    assert frame.referred_frame_numbers == (103,)
    assert frame.chain_fdiffs == (5, 2)
    assert (frame.spatial_id, frame.dtis) == (0, (R, R))
    assert write(frame) == data


def test_custom_fdiff_sizes(q2t1: TemplateStructure) -> None:
    """next_fdiff_size 1, 2 and 3 (4, 8, 12 bits), the edges of each, and no fdiff at all."""
    fdiffs = [1, 16, 17, 256, 257, 4096]
    b = put_flags(put_mandatory(Bits(), 3, 1000), fdiffs=1)
    for fdiff in fdiffs:
        size = 1 if fdiff <= 16 else 2 if fdiff <= 256 else 3
        b.f(2, size).f(4 * size, fdiff - 1)
    data = b.f(2, 0).bytes()
    frame = parse(data, q2t1)
    assert frame.fdiffs == tuple(fdiffs)
    assert frame.referred_frame_numbers == tuple((1000 - x) % 65536 for x in fdiffs)
    assert write(frame) == data
    data = put_flags(put_mandatory(Bits(), 3, 1000), fdiffs=1).f(2, 0).bytes()
    frame = parse(data, q2t1)
    assert frame.fdiffs == ()  # a frame that refers to nothing, though its template does
    assert write(frame) == data


def test_custom_fdiff_in_more_units_than_needed(q2t1: TemplateStructure) -> None:
    """fdiff 1 coded with next_fdiff_size 3 reads as 1; it is written back in 1 unit."""
    wide = put_flags(put_mandatory(Bits(), 3, 9), fdiffs=1).f(2, 3).f(12, 0).f(2, 0).bytes()
    narrow = put_flags(put_mandatory(Bits(), 3, 9), fdiffs=1).f(2, 1).f(4, 0).f(2, 0).bytes()
    frame = parse(wide, q2t1)
    assert frame.fdiffs == (1,)
    assert write(frame) == narrow
    assert parse(narrow, q2t1) == frame


def test_custom_dtis(l3t3: TemplateStructure) -> None:
    """An S1T0 frame (row 6) whose DTIs override the template's SSSSSS---."""
    b = put_flags(put_mandatory(Bits(), 15, 42), dtis=1)
    dtis = "RRRRSS--D"
    for symbol in dtis:
        b.f(2, "-DSR".index(symbol))
    data = b.bytes()
    frame = parse(data, l3t3)
    assert frame.custom_dtis
    assert "".join("-DSR"[dti] for dti in frame.dtis) == dtis
    assert frame.fdiffs == (1,) and frame.chain_fdiffs == (1, 1, 1)  # the template's
    assert (frame.spatial_id, frame.temporal_id) == (1, 0)
    assert write(frame) == data


def test_everything_at_once(l3t3: TemplateStructure) -> None:
    """Bitmask, custom DTIs, fdiffs and chains in one descriptor, in the syntax's order."""
    b = put_flags(put_mandatory(Bits(), 17, 65535, sof=0, eof=1), 0, 1, 1, 1, 1)
    b.f(9, 0x1F8)  # active_decode_targets_bitmask: DT3..DT8
    for symbol in "---RRRRRR":
        b.f(2, "-DSR".index(symbol))
    b.f(2, 2).f(8, 99).f(2, 1).f(4, 2).f(2, 0)  # fdiffs 100, 3
    b.f(8, 0).f(8, 255).f(8, 7)  # chain fdiffs
    data = b.bytes()
    frame = parse(data, l3t3)
    assert not frame.start_of_frame and frame.end_of_frame
    assert frame.frame_number == 65535
    assert frame.active_decode_targets == 0x1F8
    assert frame.dtis == (NP, NP, NP, R, R, R, R, R, R)
    assert frame.fdiffs == (100, 3)
    assert frame.chain_fdiffs == (0, 255, 7)
    assert (frame.spatial_id, frame.temporal_id) == (1, 1)  # template 17 - 10 = 7: row 8
    assert write(frame) == data


# --- truncation and garbage ---------------------------------------------------------------------


def truncation_cases() -> list[tuple[str, bytes, bool]]:
    """(name, full descriptor, whether it needs the L3T3 structure)."""
    b = put_flags(put_mandatory(Bits(), 23, 65535), 0, 1, 1, 1, 1).f(9, 0x1F8)
    for _ in range(9):
        b.f(2, 3)
    b.f(2, 3).f(12, 4000).f(2, 0).f(8, 1).f(8, 2).f(8, 3)
    return [
        ("l1t3 keyframe", keyframe(60, L1T3, 1, L1T3_PROTECTED_BY), False),
        (
            "l3t3 keyframe",
            keyframe(10, L3T3, 3, L3T3_PROTECTED_BY, resolutions=L3T3_RESOLUTIONS, bitmask=5),
            False,
        ),
        ("custom", b.bytes(), True),
        ("bitmask", put_flags(put_mandatory(Bits(), 13, 1), bitmask=1).f(9, 1).bytes(), True),
    ]


@pytest.mark.parametrize(("name", "data", "needs_structure"), truncation_cases())
def test_truncated_at_every_length(name: str, data: bytes, needs_structure: bool) -> None:
    """Every prefix fails with the module's error (never IndexError): below 3 bytes always;
    from 4 bytes on because the flags ask for fields that are cut (a canonical descriptor's last
    byte holds at least one field bit). A 3-byte prefix is a complete mandatory-only descriptor:
    it fails only without a structure."""
    structure = None
    if needs_structure:
        structure = parse(keyframe(10, L3T3, 3, L3T3_PROTECTED_BY), None).structure
    parse(data, structure)  # the whole one is fine
    for size in range(len(data)):
        prefix = data[:size]
        if size == 3 and structure is not None:
            parse(prefix, structure)
            continue
        with pytest.raises(DependencyDescriptorError):
            parse(prefix, structure)


def test_too_many_templates() -> None:
    """64 templates are the most a 6-bit template id tells apart; the 65th is refused."""
    b = put_flags(put_mandatory(Bits(), 0, 0), structure=1).f(6, 0).f(5, 0)
    for _ in range(64):
        b.f(2, 0)  # next_layer_idc: one more template of the same layer
    with pytest.raises(DependencyDescriptorError, match="more than 64 templates"):
        parse(b.raw("1" * 400).bytes())


def test_garbage_raises_only_the_module_error(l3t3: TemplateStructure) -> None:
    """Random bytes (seeded), with and without a structure: a descriptor or the module's error."""
    rng = random.Random(20260101)
    parsed = 0
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 48))
        for structure in (None, l3t3):
            try:
                frame = parse(data, structure)
            except DependencyDescriptorError:
                continue
            parsed += 1
            again = parse(write(frame), structure if not frame.new_structure else None)
            assert again == frame
    assert parsed > 100


# --- write --------------------------------------------------------------------------------------


def test_write_a_new_bitmask(l3t3: TemplateStructure) -> None:
    """What the relay sends a subscriber: the same descriptor with its own active set."""
    data = put_mandatory(Bits(), 14, 77).bytes()  # S0T2 (row 5), no extended fields
    frame = parse(data, l3t3)
    out = write(replace(frame, active_decode_targets_bitmask=0x1B0))
    assert out == put_flags(put_mandatory(Bits(), 14, 77), bitmask=1).raw("110110000").bytes()
    again = parse(out, l3t3)
    assert again.active_decode_targets_bitmask == 0x1B0
    assert replace(again, active_decode_targets_bitmask=None) == frame
    assert write(replace(again, active_decode_targets_bitmask=None)) == data  # and back
    # on a keyframe the structure is written again, followed by the bitmask
    key = parse(keyframe(10, L3T3, 3, L3T3_PROTECTED_BY, resolutions=L3T3_RESOLUTIONS), None)
    out = write(replace(key, active_decode_targets_bitmask=0x100))
    assert out == keyframe(
        10, L3T3, 3, L3T3_PROTECTED_BY, resolutions=L3T3_RESOLUTIONS, bitmask=0x100
    )


def test_write_with_bitmask(l1t3: TemplateStructure, l3t3: TemplateStructure) -> None:
    """write_with_bitmask(d, m) is write(replace(d, active_decode_targets_bitmask=m)) and leaves
    d alone, for plain frames (its short path), keyframes and custom frames."""
    data = put_mandatory(Bits(), 62, 300, sof=0, eof=1).bytes()  # L1T3 T1 frame
    frame = parse(data, l1t3)
    # 24 mandatory bits, flags 01000, 3 bitmask bits: exactly 4 bytes, no zero_padding
    expected = put_flags(put_mandatory(Bits(), 62, 300, sof=0, eof=1), bitmask=1).raw("110")
    assert len(expected.s) == 32
    assert write_with_bitmask(frame, 0b110) == expected.bytes()
    assert write_with_bitmask(frame, None) == data
    assert frame.active_decode_targets_bitmask is None
    custom = put_flags(put_mandatory(Bits(), 15, 42), dtis=1, chains=1)
    for symbol in "RRRRSS--D":
        custom.f(2, "-DSR".index(symbol))
    custom.f(8, 1).f(8, 2).f(8, 3)
    descriptors = [
        (data, l1t3),
        (put_mandatory(Bits(), 14, 77).bytes(), l3t3),
        (keyframe(10, L3T3, 3, L3T3_PROTECTED_BY, resolutions=L3T3_RESOLUTIONS), None),
        (keyframe(60, L1T3, 1, L1T3_PROTECTED_BY, bitmask=0b011), None),
        (custom.bytes(), l3t3),
    ]
    for raw, structure in descriptors:
        frame = parse(raw, structure)
        count = frame.structure.decode_target_count
        for bitmask in (None, 0, 1, (1 << count) - 1):
            out = write_with_bitmask(frame, bitmask)
            assert out == write(replace(frame, active_decode_targets_bitmask=bitmask))
            again = parse(out, structure)
            assert again.active_decode_targets_bitmask == bitmask
            assert replace(again, active_decode_targets_bitmask=None) == replace(
                frame, active_decode_targets_bitmask=None
            )
        assert write(frame) == raw
        with pytest.raises(DependencyDescriptorError):
            write_with_bitmask(frame, 1 << count)


def test_same_structure_bytes_give_the_same_structure() -> None:
    """Keyframes repeating a structure share one parsed TemplateStructure (a cache keyed by the
    bytes from the extended flags on); the frame fields still come from each packet."""
    first = parse(keyframe(10, L3T3, 3, L3T3_PROTECTED_BY, frame_number=1))
    second = parse(keyframe(10, L3T3, 3, L3T3_PROTECTED_BY, frame_number=999))
    assert second.structure is first.structure
    assert (first.frame_number, second.frame_number) == (1, 999)
    other = parse(keyframe(10, L3T3, 3, L3T3_PROTECTED_BY, frame_number=1, bitmask=3))
    assert other.structure == first.structure
    assert other.active_decode_targets_bitmask == 3
    assert first.active_decode_targets_bitmask is None


def test_write_refuses_what_does_not_fit(l3t3: TemplateStructure, q2t1: TemplateStructure) -> None:
    frame = parse(put_mandatory(Bits(), 14, 77).bytes(), l3t3)
    custom = parse(
        put_flags(put_mandatory(Bits(), 3, 9), fdiffs=1, chains=1)
        .f(2, 1)
        .f(4, 0)
        .f(2, 0)
        .f(8, 1)
        .f(8, 1)
        .bytes(),
        q2t1,
    )
    bad = [
        replace(frame, active_decode_targets_bitmask=0x200),  # 10 bits for 9 targets
        replace(frame, active_decode_targets_bitmask=-1),
        replace(frame, template_id=9),  # just below the offset
        replace(frame, template_id=64),
        replace(frame, frame_number=65536),
        replace(frame, custom_dtis=True, dtis=(S,) * 8),
        replace(custom, fdiffs=(0,)),
        replace(custom, fdiffs=(4097,)),
        replace(custom, chain_fdiffs=(256, 0)),
        replace(custom, chain_fdiffs=(1,)),
    ]
    for descriptor in bad:
        with pytest.raises(DependencyDescriptorError):
            write(descriptor)


def test_built_structures_are_checked() -> None:
    ok = FrameTemplate(0, 0, (S, S))
    assert ok.dtis == (S, S)
    assert FrameTemplate(0, 0, (2, 3)).dtis == (S, R)  # type: ignore[arg-type]
    TemplateStructure(0, 2, (ok,))
    bad_structures = [
        lambda: TemplateStructure(64, 2, (ok,)),  # offset in 6 bits
        lambda: TemplateStructure(0, 0, ()),  # no decode target, no template
        lambda: TemplateStructure(0, 33, (FrameTemplate(0, 0, (S,) * 33),)),
        lambda: TemplateStructure(0, 3, (ok,)),  # 2 DTIs for 3 targets
        lambda: TemplateStructure(0, 2, (FrameTemplate(0, 1, (S, S)),)),  # not S0T0 first
        lambda: TemplateStructure(0, 2, (ok, FrameTemplate(0, 2, (S, S)))),  # skips T1
        lambda: TemplateStructure(0, 2, (ok, FrameTemplate(1, 1, (S, S)))),  # S1 not at T0
        lambda: TemplateStructure(0, 2, (ok,), 1),  # a chain, no chain fdiffs
        lambda: TemplateStructure(0, 2, (FrameTemplate(0, 0, (S, S), (), (0,)),), 1, (0, 1)),
        lambda: TemplateStructure(0, 2, (FrameTemplate(0, 0, (S, S), (), (0,) * 3),), 3),
        lambda: TemplateStructure(0, 2, (ok,), 0, (0, 0)),  # protected by without chains
        lambda: TemplateStructure(0, 2, (ok,), resolutions=()),
        lambda: FrameTemplate(0, 0, (4,)),  # type: ignore[arg-type]
        lambda: FrameTemplate(0, 0, (S,), (17,)),
        lambda: FrameTemplate(0, 0, (S,), (0,)),
        lambda: FrameTemplate(0, 0, (S,), (), (16,)),
        lambda: FrameTemplate(-1, 0, (S,)),
        lambda: RenderResolution(0, 10),
        lambda: RenderResolution(65537, 10),
    ]
    for build in bad_structures:
        with pytest.raises(DependencyDescriptorError):
            build()


def test_write_a_built_structure() -> None:
    """A structure built in code (as a test sender would) is written and read back."""
    structure = TemplateStructure(
        5,
        2,
        (
            FrameTemplate(0, 0, (S, S), (), (0,)),
            FrameTemplate(0, 1, (D, R), (1,), (1,)),
            FrameTemplate(1, 0, (NP, S), (1,), (1,)),
        ),
        1,
        (0, 0),
        (RenderResolution(640, 480), RenderResolution(1280, 960)),
    )
    frame = FrameDescriptor(
        True, True, 5, 3, structure, True, None, False, False, False, 0, 0, (S, S), (), (0,)
    )
    back = parse(write(frame))
    assert back.structure == structure
    # decode_target_layers() takes the highest spatial and temporal ids separately: DT1 has
    # S0T1 and S1T0 frames, so (1, 1), though no S1T1 template exists
    assert back.structure.decode_target_layers == ((0, 1), (1, 1))
    assert back == frame


# --- selection ----------------------------------------------------------------------------------


def test_select_decode_target_l3t3(l3t3: TemplateStructure) -> None:
    cases = {
        (2, 2): 0,  # HD 30 fps
        (9, 9): 0,
        (2, 1): 1,
        (2, 0): 2,
        (1, 2): 3,  # VGA 30 fps
        (1, 1): 4,
        (1, 0): 5,
        (0, 2): 6,  # QVGA 30 fps
        (0, 1): 7,
        (0, 0): 8,  # QVGA 7.5 fps
    }
    for (spatial, temporal), expected in cases.items():
        assert select_decode_target(l3t3, spatial, temporal) == expected
    assert select_decode_target(l3t3, -1, 2) is None
    assert select_decode_target(l3t3, 2, -1) is None
    # the sender stopped HD (bitmask 0x1F8): the best left is VGA
    assert select_decode_target(l3t3, 2, 2, 0x1F8) == 3
    assert select_decode_target(l3t3, 2, 1, 0x1F8) == 4
    assert select_decode_target(l3t3, 2, 2, 0) is None


def test_select_decode_target_l1t3(l1t3: TemplateStructure) -> None:
    assert [select_decode_target(l1t3, 0, t) for t in range(4)] == [2, 1, 0, 0]
    assert select_decode_target(l1t3, 0, 2, 0b110) == 1


def test_frame_needed_l3t3(l3t3: TemplateStructure) -> None:
    """Which L3T3 frames a VGA 15 fps subscriber (DT4) and a QVGA 7.5 fps one (DT8) get."""
    needed_dt4 = []
    needed_dt8 = []
    for index in range(15):
        frame = parse(put_mandatory(Bits(), 10 + index, index).bytes(), l3t3)
        if frame_needed(frame, 4):
            needed_dt4.append((frame.spatial_id, frame.temporal_id))
        if frame_needed(frame, 8):
            needed_dt8.append((frame.spatial_id, frame.temporal_id))
    assert needed_dt4 == [(0, 0), (0, 0), (0, 1), (1, 0), (1, 0), (1, 1)]
    assert needed_dt8 == [(0, 0), (0, 0)]
    frame = parse(put_mandatory(Bits(), 13, 1).bytes(), l3t3)  # row 4, S0T2: "R--R--D--"
    assert [frame_needed(frame, dt) for dt in range(9)] == [
        True, False, False, True, False, False, True, False, False,
    ]  # fmt: skip
    for dt in (-1, 9):
        with pytest.raises(DependencyDescriptorError):
            frame_needed(frame, dt)


def test_decode_target_mask(l3t3: TemplateStructure, l1t3: TemplateStructure) -> None:
    """A subscriber fed DT4 (VGA 15) can also decode VGA 7.5, QVGA 15 and QVGA 7.5, not the 30
    fps targets (they need the T2 frames it does not get)."""
    assert decode_target_mask(l3t3, 4) == 1 << 4 | 1 << 5 | 1 << 7 | 1 << 8
    assert decode_target_mask(l3t3, 0) == 0x1FF
    assert decode_target_mask(l3t3, 1) == 0x1B6  # HD 15: all 15 and 7.5 fps targets
    assert decode_target_mask(l3t3, 3) == 0x1F8
    assert decode_target_mask(l3t3, 8) == 0x100
    assert [decode_target_mask(l1t3, dt) for dt in range(3)] == [0b111, 0b110, 0b100]
    for dt in (-1, 9):
        with pytest.raises(DependencyDescriptorError):
            decode_target_mask(l3t3, dt)


def test_uri() -> None:
    assert DEPENDENCY_DESCRIPTOR_URI == (
        "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension"
    )
