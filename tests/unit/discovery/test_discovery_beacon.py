"""BEACON / SOLICIT codec: round trips, every decode and authentication error, and totality."""

from __future__ import annotations

import contextlib
import struct
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmesh.discovery.beacon import (
    FLAG_CERT,
    FLAG_KNOWN,
    FLAG_MAC,
    FLAG_REPLY,
    MAX_FRAME,
    MAX_KNOWN_FILTER,
    MAX_TAG_BYTES,
    STATIC_OFFSET,
    Beacon,
    BeaconFields,
    Capabilities,
    check_mesh,
    filter_contains,
    is_discovery_frame,
    known_filter,
    normalize_addr,
    parse_beacon,
    pull_beacon,
    pull_solicit,
    push_beacon,
    push_solicit,
    read_frame,
)
from cellmesh.discovery.mesh import AdmissionError, Mesh, issue_membership_cert
from cellmesh.discovery.verifier import CachedVerifier
from cellmesh.errors import (
    AuthenticationError,
    DecodeError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.identity.keys import Identity
from cellmesh.wire.header import HEADER_LEN, FrameType, pack_header

ALICE = Identity.from_secret(bytes(range(64)))
BOB = Identity.from_secret(bytes(range(1, 65)))
AUTHORITY = Identity.from_secret(bytes(range(2, 66)))
OPEN = Mesh("lab")
KEYED = Mesh("lab", b"k" * 32)
TS = 1_800_000_000_000
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fields(**kw: object) -> BeaconFields:
    base = BeaconFields(
        seq=7,
        timestamp_ms=TS,
        interval_ms=5000,
        name="Alpha",
        node_type="Bridge",
        zone="Command",
        ego=100,
        caps=Capabilities(relay=True, anchor_eligible=True, bandwidth_class=9),
        tags=(("rack", "b2"), ("os", "")),
        addresses=(("fe80::1", 19541), ("198.18.0.7", 4000)),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def resign(identity: Identity, frame: bytes, mesh: Mesh = OPEN) -> bytes:
    """Re-MAC and re-sign a hand-edited frame, so only the structural fault remains."""
    from cellmesh.discovery.beacon import SIGNING_CONTEXT
    from cellmesh.wire.header import associated_data

    body = frame[HEADER_LEN:-64]
    if mesh.keyed:
        body = body[:-16]
    header = frame[:HEADER_LEN]
    ad = associated_data(header)
    if mesh.keyed:
        body += mesh.mac(ad, body)
    return header + body + identity.sign(SIGNING_CONTEXT + ad + body)


def with_len(frame: bytes, new_body_len: int) -> bytes:
    """`frame` with the header's payload_len set to `new_body_len`."""
    return frame[:4] + struct.pack("!H", new_body_len) + frame[6:]


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", [OPEN, KEYED], ids=["open", "keyed"])
@pytest.mark.parametrize("reply", [False, True])
def test_beacon_round_trip(mesh: Mesh, reply: bool) -> None:
    f = fields()
    frame = push_beacon(ALICE, f, mesh, reply=reply)
    assert len(frame) <= MAX_FRAME
    assert is_discovery_frame(frame)
    b = pull_beacon(frame, mesh)
    assert b == Beacon(
        ALICE.cell_id, ALICE.public_key, ALICE.noise_static_public, f, reply, mesh.keyed
    )
    assert frame[1] == FrameType.BEACON
    assert frame[8:24] == ALICE.cell_id
    assert frame[24:40] == bytes(16)
    assert struct.unpack_from("!Q", frame, 48)[0] == f.seq


def test_beacon_with_certificate_round_trip() -> None:
    cert = issue_membership_cert(AUTHORITY, ALICE.cell_id, "lab", TS + 10**6)
    f = fields(cert=cert)
    for mesh in (OPEN, KEYED):
        assert pull_beacon(push_beacon(ALICE, f, mesh), mesh).fields.cert == cert


def test_minimal_beacon_and_sizes() -> None:
    f = BeaconFields(seq=1, timestamp_ms=TS, interval_ms=1)
    frame = push_beacon(ALICE, f, OPEN)
    # header 64 + prefix 16 + tag 8 + keys 64 + caps/ego 5 + 3 empty strings + 2 counts + sig 64
    assert len(frame) == 64 + 16 + 8 + 64 + 5 + 3 + 2 + 64
    assert len(frame) == 226
    assert len(push_beacon(ALICE, f, KEYED)) == len(frame) + 16
    assert len(push_solicit(ALICE, 1, TS, OPEN)) == 184
    assert pull_beacon(frame, OPEN).fields == f


def test_largest_beacon_fits_in_1200_bytes() -> None:
    cert = issue_membership_cert(AUTHORITY, ALICE.cell_id, "m" * 64, 2**64 - 1)
    f = BeaconFields(
        seq=2**64 - 1,
        timestamp_ms=2**64 - 1,
        interval_ms=2**32 - 1,
        name="n" * 64,
        node_type="t" * 32,
        zone="z" * 64,
        ego=255,
        caps=Capabilities(True, True, True, 15, 0xFFFFFF08),
        tags=tuple((f"k{i}" + "x" * 14, "v" * 16) for i in range(8)),
        addresses=tuple((f"2001:db8::{i + 1}", 65535) for i in range(8)),
        cert=cert,
    )
    assert sum(len(k) + len(v) for k, v in f.tags) <= MAX_TAG_BYTES
    mesh = Mesh("m" * 64, b"k" * 16)
    frame = push_beacon(ALICE, f, mesh)
    assert len(frame) == 1011  # docs/wire.md, section 10.2
    assert len(frame) <= MAX_FRAME
    assert pull_beacon(frame, mesh).fields == f


@pytest.mark.parametrize("mesh", [OPEN, KEYED], ids=["open", "keyed"])
def test_solicit_round_trip(mesh: Mesh) -> None:
    frame = push_solicit(BOB, 99, TS, mesh)
    s = pull_solicit(frame, mesh)
    assert (s.cell_id, s.public_key, s.seq, s.timestamp_ms, s.cert, s.keyed) == (
        BOB.cell_id,
        BOB.public_key,
        99,
        TS,
        None,
        mesh.keyed,
    )
    cert = issue_membership_cert(AUTHORITY, BOB.cell_id, "lab", TS)
    assert pull_solicit(push_solicit(BOB, 1, TS, mesh, cert), mesh).cert == cert


def test_capabilities_bits() -> None:
    c = Capabilities(relay=True, storage=True, anchor_eligible=True, bandwidth_class=15)
    assert c.to_bits() == 0xF7
    assert Capabilities.from_bits(0xF7) == c
    unknown = Capabilities.from_bits(0x8000_0008)
    assert unknown.other_bits == 0x8000_0008
    assert unknown.to_bits() == 0x8000_0008
    with pytest.raises(ValueError, match="bandwidth"):
        Capabilities(bandwidth_class=16)
    with pytest.raises(ValueError, match="other_bits"):
        Capabilities(other_bits=1)


def test_addresses_are_normalised() -> None:
    assert normalize_addr(("FE80:0:0::1%eth0", 1)) == ("fe80::1", 1)
    assert normalize_addr(("198.18.0.1", 65535)) == ("198.18.0.1", 65535)
    for bad in (("host.example", 1), ("198.18.0.1", 0), ("198.18.0.1", 65536)):
        with pytest.raises(ValueError, match=r"IP literal|port"):
            normalize_addr(bad)
    f = fields(addresses=(("FE80::1%eth0", 5),))
    assert pull_beacon(push_beacon(ALICE, f, OPEN), OPEN).fields.addresses == (("fe80::1", 5),)


def test_is_discovery_frame() -> None:
    beacon = push_beacon(ALICE, fields(), OPEN)
    assert is_discovery_frame(beacon)
    assert is_discovery_frame(push_solicit(ALICE, 1, TS, OPEN))
    assert not is_discovery_frame(pack_header(FrameType.DATA, bytes(16), bytes(16), 1, 0, 0))
    assert not is_discovery_frame(beacon[:63])
    assert not is_discovery_frame(b"\x02" + beacon[1:])


def test_hop_ttl_is_not_authenticated() -> None:
    frame = bytearray(push_beacon(ALICE, fields(), KEYED))
    frame[3] = 1
    assert pull_beacon(bytes(frame), KEYED).cell_id == ALICE.cell_id


def test_cached_verifier_gives_the_same_answers() -> None:
    v = CachedVerifier(capacity=2)
    frame = push_beacon(ALICE, fields(), OPEN)
    assert pull_beacon(frame, OPEN, v) == pull_beacon(frame, OPEN, v)
    assert (v.hits, v.misses) == (1, 1)
    bad = frame[:-1] + bytes([frame[-1] ^ 1])
    for _ in range(2):
        with pytest.raises(AdmissionError) as e:
            pull_beacon(bad, OPEN, v)
        assert e.value.reason == "bad_signature"
    assert v.misses == 3  # failures are never remembered
    with pytest.raises(AuthenticationError):
        v(b"short", b"m", bytes(64))


# --- encoder errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "exc"),
    [
        ({"name": "n" * 65}, OversizeError),
        ({"node_type": "t" * 33}, OversizeError),
        ({"zone": "z" * 65}, OversizeError),
        ({"name": "bad\x1b[0m"}, MalformedError),
        ({"ego": 256}, MalformedError),
        ({"interval_ms": 0}, MalformedError),
        ({"interval_ms": 2**32}, MalformedError),
        ({"timestamp_ms": -1}, MalformedError),
        ({"seq": 2**64}, MalformedError),
        ({"tags": tuple((f"k{i}", "") for i in range(9))}, OversizeError),
        ({"tags": (("k", "a"), ("k", "b"))}, MalformedError),
        ({"tags": (("", "v"),)}, MalformedError),
        ({"tags": (("k" * 17, "v"),)}, OversizeError),
        ({"tags": (("k", "v" * 65),)}, OversizeError),
        ({"tags": tuple((f"k{i}", "v" * 64) for i in range(5))}, OversizeError),
        ({"addresses": tuple(("198.18.0.1", i + 1) for i in range(9))}, OversizeError),
        ({"addresses": (("not-an-ip", 1),)}, MalformedError),
        ({"addresses": (("198.18.0.1", 0),)}, MalformedError),
    ],
)
def test_push_beacon_rejects_out_of_bounds_fields(kw: dict[str, object], exc: type) -> None:
    with pytest.raises(exc):
        push_beacon(ALICE, fields(**kw), OPEN)


# --- decoder errors ------------------------------------------------------------------------------


def decode_error(frame: bytes, mesh: Mesh = OPEN) -> type[Exception]:
    with pytest.raises((DecodeError, AuthenticationError)) as e:
        pull_beacon(frame, mesh)
    return type(e.value)


def admission_reason(frame: bytes, mesh: Mesh = OPEN, solicit: bool = False) -> str:
    with pytest.raises(AdmissionError) as e:
        (pull_solicit if solicit else pull_beacon)(frame, mesh)
    return e.value.reason


def test_every_prefix_is_truncated() -> None:
    frame = push_beacon(ALICE, fields(), OPEN)
    for n in range(len(frame)):
        cut = frame[:n]
        if n >= HEADER_LEN:
            cut = with_len(cut, n - HEADER_LEN)  # a consistent header over a short body
        with pytest.raises((TruncatedError, MalformedError, OversizeError, AdmissionError)):
            pull_beacon(cut, OPEN)


def test_trailing_junk_and_oversize() -> None:
    frame = push_beacon(ALICE, fields(), OPEN)
    assert decode_error(frame + b"x") is OversizeError  # header says fewer bytes
    big = with_len(frame + bytes(MAX_FRAME), len(frame) - HEADER_LEN + MAX_FRAME)
    assert decode_error(big) is OversizeError
    # junk inside the signed body, after the last field: the parser sees extra bytes
    padded = with_len(frame[:-64] + b"\x00" + frame[-64:], len(frame) - HEADER_LEN + 1)
    assert decode_error(resign(ALICE, padded)) is OversizeError


def test_version_errors() -> None:
    frame = push_beacon(ALICE, fields(), OPEN)
    assert decode_error(b"\x02" + frame[1:]) is VersionError
    body_v2 = frame[:HEADER_LEN] + b"\x02" + frame[HEADER_LEN + 1 :]
    assert decode_error(resign(ALICE, body_v2)) is VersionError


def _patch(frame: bytes, offset: int, new: bytes) -> bytes:
    return frame[:offset] + new + frame[offset + len(new) :]


@pytest.mark.parametrize(
    ("offset", "new"),
    [
        (1, bytes([FrameType.SOLICIT])),  # a SOLICIT type over a beacon body
        (1, bytes([FrameType.DATA])),
        (2, b"\x01"),  # header flags
        (6, b"\x00\x01"),  # header frag
        (24, b"\x01"),  # destination
        (40, b"\x01"),  # session id
        (60, b"\x00\x00\x00\x01"),  # header reserved
        (HEADER_LEN + 1, b"\x80"),  # unknown body flag
        (HEADER_LEN + 2, b"\x00\x01"),  # body reserved
        (HEADER_LEN + 12, b"\x00\x00\x00\x00"),  # interval 0
    ],
)
def test_malformed_fields(offset: int, new: bytes) -> None:
    frame = push_beacon(ALICE, fields(), OPEN)
    assert decode_error(resign(ALICE, _patch(frame, offset, new))) is MalformedError


def _beacon_with_raw(tail: bytes) -> bytes:
    """A signed beacon whose variable part (from the name length on) is `tail`."""
    frame = push_beacon(ALICE, BeaconFields(seq=1, timestamp_ms=TS, interval_ms=1), OPEN)
    fixed_end = STATIC_OFFSET + 8 + 64 + 5
    body = frame[HEADER_LEN:fixed_end] + tail
    raw = pack_header(FrameType.BEACON, ALICE.cell_id, bytes(16), 0, 1, len(body) + 64)
    return resign(ALICE, raw + body + bytes(64))


@pytest.mark.parametrize(
    ("tail", "exc"),
    [
        (b"\x02\xff\xfe\x00\x00\x00\x00", MalformedError),  # name is not UTF-8
        (b"\x01\x07\x00\x00\x00\x00", MalformedError),  # control character in the name
        (b"\x41" + b"a" * 65 + b"\x00\x00\x00\x00", OversizeError),  # name over 64
        (b"\x00\x00\x00\x09" + b"\x00" * 9, OversizeError),  # 9 tags
        (b"\x00\x00\x00\x01\x00\x00\x00", MalformedError),  # empty tag key
        (b"\x00\x00\x00\x02\x01k\x00\x01k\x00\x00", MalformedError),  # duplicate tag key
        (b"\x00\x00\x00\x01\x01k\x41" + b"v" * 65 + b"\x00", OversizeError),  # tag value over 64
        (b"\x00\x00\x00\x00\x09", OversizeError),  # 9 addresses
        (b"\x00\x00\x00\x00\x01\x05" + bytes(6), MalformedError),  # address family 5
        (b"\x00\x00\x00\x00\x01\x04\xc6\x12\x00\x01\x00\x00", MalformedError),  # port 0
        (b"\x00\x00\x00\x00\x01\x06" + bytes(10), TruncatedError),  # IPv6 address cut short
        (b"\x05ab", TruncatedError),  # name runs past the end
        (b"\x00\x00\x00\x00\x00\x00", OversizeError),  # one byte of junk
    ],
)
def test_bad_variable_fields(tail: bytes, exc: type) -> None:
    assert decode_error(_beacon_with_raw(tail)) is exc


def test_tags_over_the_total_budget() -> None:
    tags = b"".join(bytes([2]) + f"k{i}".encode() + bytes([64]) + b"v" * 64 for i in range(4))
    tail = b"\x00\x00\x00\x04" + tags + b"\x00"
    assert decode_error(_beacon_with_raw(tail)) is OversizeError


def test_bad_certificate_encoding() -> None:
    cert = issue_membership_cert(AUTHORITY, ALICE.cell_id, "lab", TS)
    frame = push_beacon(ALICE, fields(cert=cert), OPEN)
    flags_off = HEADER_LEN + 1
    assert frame[flags_off] == FLAG_CERT
    # a certificate flag with no certificate: the parser runs out of bytes
    no_cert = push_beacon(ALICE, fields(), OPEN)
    assert decode_error(resign(ALICE, _patch(no_cert, flags_off, bytes([FLAG_CERT])))) is (
        TruncatedError
    )
    # mesh name length 0 inside the certificate
    name_len_at = len(frame) - 64 - 64 - 3 - 1
    assert frame[name_len_at] == 3
    assert decode_error(resign(ALICE, _patch(frame, name_len_at, b"\x00"))) is MalformedError


# --- authentication -------------------------------------------------------------------------------


def test_other_mesh_is_refused() -> None:
    frame = push_beacon(ALICE, fields(), Mesh("other"))
    assert admission_reason(frame) == "other_mesh"


def test_open_and_keyed_meshes_do_not_mix() -> None:
    assert admission_reason(push_beacon(ALICE, fields(), KEYED), OPEN) == "keyed"
    assert admission_reason(push_beacon(ALICE, fields(), OPEN), KEYED) == "unkeyed"
    assert admission_reason(push_solicit(ALICE, 1, TS, KEYED), OPEN, solicit=True) == "keyed"
    assert admission_reason(push_solicit(ALICE, 1, TS, OPEN), KEYED, solicit=True) == "unkeyed"


def test_wrong_mesh_key_is_a_bad_mac() -> None:
    frame = push_beacon(ALICE, fields(), Mesh("lab", b"x" * 32))
    assert admission_reason(frame, KEYED) == "bad_mac"
    assert admission_reason(push_solicit(ALICE, 1, TS, Mesh("lab", b"y" * 16)), KEYED, True) == (
        "bad_mac"
    )


def test_mac_covers_every_byte_before_it() -> None:
    frame = push_beacon(ALICE, fields(), KEYED)
    view = read_frame(frame, FrameType.BEACON)
    for i in [*range(3), *range(4, view.sig_offset)]:  # all but hop_ttl and the signature
        tampered = bytearray(frame)
        tampered[i] ^= 0x01
        with pytest.raises((DecodeError, AuthenticationError)) as e:
            pull_beacon(bytes(tampered), KEYED)
        if isinstance(e.value, AdmissionError):
            assert e.value.reason in {"bad_mac", "other_mesh", "unkeyed"}, i


def test_signature_covers_every_field() -> None:
    """In an open mesh only the signature protects the fields: every byte counts."""
    frame = push_beacon(ALICE, fields(), OPEN)
    reasons = set()
    for i in [*range(3), *range(4, len(frame))]:
        tampered = bytearray(frame)
        tampered[i] ^= 0x01
        with pytest.raises((DecodeError, AuthenticationError)) as e:
            pull_beacon(bytes(tampered), OPEN)
        if isinstance(e.value, AdmissionError):
            reasons.add(e.value.reason)
    assert reasons == {"bad_signature", "cell_mismatch", "other_mesh", "keyed"}


def test_forged_signature_and_foreign_key() -> None:
    frame = push_beacon(ALICE, fields(), OPEN)
    assert admission_reason(frame[:-64] + BOB.sign(b"x")) == "bad_signature"
    # Bob's key in a frame claiming Alice's CellID
    view = read_frame(frame, FrameType.BEACON)
    swapped = _patch(frame, STATIC_OFFSET + 8, BOB.public_key)
    assert admission_reason(resign(BOB, swapped)) == "cell_mismatch"
    # signed by Bob, everything else Alice's
    assert view.sig_offset == len(frame) - 64
    assert admission_reason(resign(BOB, frame)) == "bad_signature"


def test_parse_without_verification_then_verify() -> None:
    frame = push_beacon(ALICE, fields(), KEYED)
    view = read_frame(frame, FrameType.BEACON)
    check_mesh(frame, view, KEYED)
    assert view.flags == FLAG_MAC
    ub = parse_beacon(frame, view)
    assert ub.verify() == pull_beacon(frame, KEYED)
    reply = push_beacon(ALICE, fields(), OPEN, reply=True)
    assert read_frame(reply, FrameType.BEACON).flags == FLAG_REPLY


def test_malformed_solicit_and_misplaced_flags() -> None:
    frame = push_solicit(ALICE, 1, TS, OPEN)
    with pytest.raises(MalformedError, match="interval"):  # a SOLICIT has no interval
        pull_solicit(resign(ALICE, _patch(frame, HEADER_LEN + 12, b"\x00\x00\x00\x01")), OPEN)
    beacon = push_beacon(ALICE, fields(), OPEN)
    with pytest.raises(MalformedError, match="filter"):  # only a SOLICIT carries a filter
        pull_beacon(resign(ALICE, _patch(beacon, HEADER_LEN + 1, bytes([FLAG_KNOWN]))), OPEN)
    for size in (b"\x00\x00", b"\x03\x01"):  # filter of 0 or 769 bytes
        bad = _patch(push_solicit(ALICE, 1, TS, OPEN, known=b"\x01"), STATIC_OFFSET + 40, size)
        with pytest.raises((MalformedError, TruncatedError)):
            pull_solicit(resign(ALICE, bad), OPEN)


def test_solicit_with_a_known_filter_and_the_reply_flag() -> None:
    cells = [Identity.from_secret(bytes([i]) * 64).cell_id for i in range(1, 60)]
    known = known_filter(cells, 77)
    assert len(known) == (59 * 10 + 7) // 8
    assert all(filter_contains(known, c, 77) for c in cells)  # never a false negative
    others = [Identity.from_secret(bytes([i]) * 64).cell_id for i in range(100, 200)]
    assert sum(filter_contains(known, c, 77) for c in others) <= 5  # about 1% false positives
    # salted with the SOLICIT's seq: the false positives of one filter are not those of another
    fp77 = {c for c in others if filter_contains(known, c, 77)}
    fp78 = {c for c in others if filter_contains(known_filter(cells, 78), c, 78)}
    assert not fp77 or fp77 != fp78
    assert len(known_filter([bytes(16)] * 5000, 1)) == MAX_KNOWN_FILTER
    s = pull_solicit(push_solicit(BOB, 77, TS, KEYED, known=known, reply=True), KEYED)
    assert (s.known, s.reply) == (known, True)
    with pytest.raises(OversizeError):
        push_solicit(BOB, 1, TS, OPEN, known=bytes(MAX_KNOWN_FILTER + 1))


def test_solicit_errors() -> None:
    frame = push_solicit(ALICE, 1, TS, OPEN)
    with pytest.raises(OversizeError):
        pull_solicit(
            resign(ALICE, with_len(frame[:-64] + b"\x00" + frame[-64:], len(frame) - 63)), OPEN
        )
    with pytest.raises(TruncatedError):
        pull_solicit(with_len(frame[:100], 36), OPEN)
    assert admission_reason(frame[:-1] + b"\x00", solicit=True) == "bad_signature"
    with pytest.raises(MalformedError):
        pull_beacon(frame, OPEN)  # a SOLICIT is not a BEACON


# --- totality -----------------------------------------------------------------------------------


def _total(frame: bytes) -> None:
    for pull in (pull_beacon, pull_solicit):
        for mesh in (OPEN, KEYED):
            with contextlib.suppress(DecodeError, AuthenticationError):
                pull(frame, mesh)


@PROPS
@given(st.binary(max_size=1300))
def test_arbitrary_bytes_give_a_frame_or_a_clean_error(data: bytes) -> None:
    _total(data)


VALID = [
    push_beacon(ALICE, fields(), OPEN),
    push_beacon(
        ALICE, fields(cert=issue_membership_cert(AUTHORITY, ALICE.cell_id, "lab", TS)), KEYED
    ),
    push_solicit(BOB, 3, TS, KEYED),
]


@PROPS
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 1299), st.integers(0, 255)), max_size=6),
    st.integers(0, 1300),
)
def test_mutated_frames_give_a_frame_or_a_clean_error(
    frame: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    buf = bytearray(frame)
    for pos, value in edits:
        if pos < len(buf):
            buf[pos] = value
    _total(bytes(buf))
    _total(bytes(buf[:cut]))
    _total(with_len(bytes(buf[:cut]), max(0, cut - HEADER_LEN)) if cut >= HEADER_LEN else b"")


WIRE_MD_EXAMPLE = """
0000  01 06 00 10 00 d0 00 00 f9 08 9e 5d 48 65 14 6a
0010  ac 0c fa 96 fd 5b 94 cd 00 00 00 00 00 00 00 00
0020  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0030  00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 00
0040  01 01 00 00 00 00 01 a3 18 5c 50 00 00 00 13 88
0050  32 84 bb 0e 71 a6 43 b6 03 a1 07 bf f3 ce 10 be
0060  1d 70 dd 18 e7 4b c0 99 67 e4 d6 30 9b a5 0d 5f
0070  1d dc 86 64 12 55 31 b8 35 80 72 d6 36 58 80 d1
0080  ae ea 32 9a df 91 21 38 38 51 ed 21 a2 8e 3b 75
0090  e9 65 d0 d2 cd 16 62 54 00 00 00 35 64 05 41 6c
00a0  70 68 61 06 42 72 69 64 67 65 00 00 01 06 fe 80
00b0  00 00 00 00 00 00 00 00 00 00 00 00 00 01 4c 55
00c0  75 8e 9b 35 fd ab c0 f1 0a 9d 5d 04 74 dc a3 b1
00d0  dc 7e 63 bd b2 92 2b 3b 0e 72 50 8e 40 26 0c 83
00e0  3f a2 73 f2 5e c3 bc 45 68 da fe 09 b2 e5 62 6d
00f0  92 8a 2d d1 1a 89 7d 22 a3 86 f9 64 6f 1c 73 c0
0100  96 93 93 36 32 bf d3 2b 75 ae bd 87 fb 35 ac 04
"""


def test_the_worked_example_in_wire_md() -> None:
    """docs/wire.md, section 10.7: the same inputs give exactly these bytes."""
    alice = Identity.from_secret(bytes(range(64)))
    f = BeaconFields(
        seq=1,
        timestamp_ms=1_800_000_000_000,
        interval_ms=5000,
        name="Alpha",
        node_type="Bridge",
        ego=100,
        caps=Capabilities(relay=True, anchor_eligible=True, bandwidth_class=3),
        addresses=(("fe80::1", 19541),),
    )
    mesh = Mesh("lab", bytes(range(32)))
    expected = bytes.fromhex(
        "".join(line[6:] for line in WIRE_MD_EXAMPLE.strip().splitlines()).replace(" ", "")
    )
    frame = push_beacon(alice, f, mesh)
    assert frame == expected
    assert pull_beacon(frame, mesh).fields == f
