"""BEACON and SOLICIT frames: the signed announcements discovery sends on the link.

Theory of operation
-------------------
Both frames use the standard 64-byte header (`cellmesh.wire.header`) with type BEACON (6) or
SOLICIT (7), `src` = the sender's CellID, `session_id` 0, `packet_number` = the sender's
announcement sequence number and `dst` = all zero ("whoever is there"). The body layouts are in
docs/wire.md, section 10.
Both bodies start with the same 16-byte prefix (version, flags, reserved, timestamp, interval) and
end with an optional 16-byte mesh MAC and a 64-byte Ed25519 signature, so the two cheap checks can
run before anything else is parsed:

1. the header and the prefix (`read_frame`): lengths, version, flags, reserved bits;
2. the mesh (`check_mesh`): the 8-byte mesh tag, whether the frame must (keyed mesh) or must not
   (open mesh) carry a MAC, and the MAC itself, in constant time;
3. the content (`parse_beacon` / `parse_solicit`): every field bounded, strict UTF-8, and the
   header's `src` must be the CellID of the carried public key;
4. the signature (`UnverifiedBeacon.verify`), the expensive step, last.

What is signed: ``"cellmesh/v1 discovery\\0" || header with hop_ttl zeroed || body up to the
signature`` (so the MAC is signed too). What is MACed: the same without the context string, up to
the MAC. `hop_ttl` is the only byte anyone may change in flight.

`pull_beacon` / `pull_solicit` run all four steps and raise a `DecodeError` subclass for
structure and `AuthenticationError` (an `AdmissionError` with a `reason`) for everything else. The
discovery core calls the steps one by one so it can put its cheap replay, freshness and
rate-limit checks before the signature.

The *static region* of a beacon is everything from the mesh tag to the end of the optional
certificate: the fields that do not change from one announcement to the next. The core keeps it
per peer and, when a new beacon's static region is byte-identical to the last verified one, skips
re-parsing it (the MAC and the signature are still checked over the whole frame).
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from cellmesh.discovery.mesh import (
    MAC_LEN,
    MESH_TAG_LEN,
    AdmissionError,
    MembershipCert,
    Mesh,
    Verifier,
    decode_text,
    pull_cert,
    push_cert,
    validate_text,
)
from cellmesh.errors import (
    AuthenticationError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.identity.cellid import CellId, cell_id_from_public_key
from cellmesh.identity.keys import (
    ED25519_PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    X25519_KEY_LEN,
    Identity,
    verify_signature,
)
from cellmesh.wire.header import (
    HEADER_LEN,
    WIRE_VERSION,
    ZERO_CELL,
    FrameType,
    associated_data,
    pack_header,
    pull_header_fields,
)

__all__ = [
    "BODY_VERSION",
    "CAPS_KNOWN_MASK",
    "FLAG_CERT",
    "FLAG_KNOWN",
    "FLAG_MAC",
    "FLAG_REPLY",
    "MAX_ADDRESSES",
    "MAX_FRAME",
    "MAX_KNOWN_FILTER",
    "MAX_NAME",
    "MAX_TAGS",
    "MAX_TAG_BYTES",
    "MAX_TAG_KEY",
    "MAX_TAG_VALUE",
    "MAX_TYPE",
    "MAX_ZONE",
    "SIGNING_CONTEXT",
    "STATIC_OFFSET",
    "Addr",
    "Beacon",
    "BeaconFields",
    "Capabilities",
    "FrameView",
    "Solicit",
    "UnverifiedBeacon",
    "UnverifiedSolicit",
    "check_mesh",
    "check_signature",
    "encode_tags",
    "filter_contains",
    "is_discovery_frame",
    "known_filter",
    "normalize_addr",
    "parse_beacon",
    "parse_solicit",
    "peek_known",
    "pull_beacon",
    "pull_solicit",
    "push_beacon",
    "push_solicit",
    "read_frame",
    "signed_message",
]

Addr = tuple[str, int]

BODY_VERSION = 1
MAX_FRAME = 1200
"""Largest discovery datagram, header included (fits any IPv6 link's minimum MTU of 1280)."""
FLAG_MAC = 0x01
FLAG_CERT = 0x02
FLAG_REPLY = 0x04
FLAG_KNOWN = 0x08
_KNOWN_FLAGS = FLAG_MAC | FLAG_CERT | FLAG_REPLY | FLAG_KNOWN
MAX_KNOWN_FILTER = 768
"""Largest known-peers filter in a SOLICIT, bytes (6144 bits)."""
_FILTER_BITS_PER_PEER = 10  # with 4 probes: about 1% false positives
SIGNING_CONTEXT = b"cellmesh/v1 discovery\x00"
"""Domain-separation prefix of every discovery signature (never sent)."""

MAX_NAME = 64
MAX_TYPE = 32
MAX_ZONE = 64
MAX_TAGS = 8
MAX_TAG_KEY = 16
MAX_TAG_VALUE = 64
MAX_TAG_BYTES = 256
"""Sum of the UTF-8 lengths of all tag keys and values."""
MAX_ADDRESSES = 8
MAX_INTERVAL_MS = 2**32 - 1

_PREFIX = struct.Struct("!BBHQI")  # version, flags, reserved, timestamp ms, interval ms
_HEAD = struct.Struct("!BBBBHH16s16sQQII")  # the 64-byte frame header (cellmesh.wire.header)
PREFIX_LEN = _PREFIX.size  # 16
STATIC_OFFSET = HEADER_LEN + PREFIX_LEN
"""Where the static region (and the mesh tag) starts in a discovery frame."""
_TAG_END = STATIC_OFFSET + MESH_TAG_LEN
_PK_END = _TAG_END + ED25519_PUBLIC_KEY_LEN
_NOISE_END = _PK_END + X25519_KEY_LEN
_CAPS_EGO = struct.Struct("!IB")
_BEACON_FIXED_END = _NOISE_END + _CAPS_EGO.size  # first length-prefixed string
_SOLICIT_FIXED_END = _PK_END
_PORT = struct.Struct("!H")
_FILTER_WORDS = struct.Struct("!IIII")
_SALT = struct.Struct("!Q")
_FAMILY_LEN = {4: 4, 6: 16}

CAPS_KNOWN_MASK = 0x000000F7
"""The capability bits this version names (relay, storage, anchor-eligible, bandwidth class)."""

_BEACON = FrameType.BEACON
_SOLICIT = FrameType.SOLICIT


# ------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a node offers, as announced in its beacons (a u32 of bit flags on the wire).

    Bits: 0 relay, 1 storage, 2 anchor-eligible, 3 reserved, 4-7 bandwidth class (0-15, a
    coarse log scale the operator chooses). Bits this version does not name are kept in
    `other_bits` so that a node can show, and an upgrade can use, what newer peers announce.
    """

    relay: bool = False
    storage: bool = False
    anchor_eligible: bool = False
    bandwidth_class: int = 0
    other_bits: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.bandwidth_class <= 15:
            raise ValueError("bandwidth_class must be 0..15")
        if not 0 <= self.other_bits < 2**32 or self.other_bits & CAPS_KNOWN_MASK:
            raise ValueError("other_bits must be a u32 that uses none of the named bits")

    def to_bits(self) -> int:
        """The u32 sent on the wire."""
        return (
            (1 if self.relay else 0)
            | (2 if self.storage else 0)
            | (4 if self.anchor_eligible else 0)
            | (self.bandwidth_class << 4)
            | self.other_bits
        )

    @classmethod
    def from_bits(cls, bits: int) -> Capabilities:
        """Decode the wire u32 (never fails: unknown bits land in `other_bits`)."""
        return cls(
            bool(bits & 1),
            bool(bits & 2),
            bool(bits & 4),
            (bits >> 4) & 0xF,
            bits & ~CAPS_KNOWN_MASK & 0xFFFFFFFF,
        )


@dataclass(frozen=True, slots=True)
class BeaconFields:
    """Everything a node says about itself in one beacon, apart from its keys.

    `seq` goes in the header's packet number; `timestamp_ms` is Unix time in milliseconds;
    `interval_ms` is the longest the sender promises to stay silent before its next multicast
    beacon (receivers expire it after a few such intervals).
    """

    seq: int
    timestamp_ms: int
    interval_ms: int
    name: str = ""
    node_type: str = ""
    zone: str = ""
    ego: int = 0
    caps: Capabilities = field(default_factory=Capabilities)
    tags: tuple[tuple[str, str], ...] = ()
    addresses: tuple[Addr, ...] = ()
    cert: MembershipCert | None = None


@dataclass(frozen=True, slots=True)
class Beacon:
    """A decoded (and, from `pull_beacon`, verified) beacon.

    `reply` is True for a beacon sent unicast in answer to a SOLICIT (flag bit 2), which its
    receiver must not count as a transmission the whole link heard. `keyed` says whether it
    carried (a valid) mesh MAC.
    """

    cell_id: CellId
    public_key: bytes
    noise_static: bytes
    fields: BeaconFields
    reply: bool = False
    keyed: bool = False


@dataclass(frozen=True, slots=True)
class Solicit:
    """A decoded SOLICIT: `cell_id` asks every neighbour to announce itself now.

    `known` is an optional Bloom filter of the CellIDs the solicitor already knows (a repeated
    SOLICIT): a neighbour found in it need not answer (`filter_contains`). `reply` marks a SOLICIT
    sent unicast back to a solicitor whose beacon we never heard (it must not ask back).
    """

    cell_id: CellId
    public_key: bytes
    seq: int
    timestamp_ms: int
    cert: MembershipCert | None = None
    keyed: bool = False
    known: bytes | None = None
    reply: bool = False


class FrameView(NamedTuple):
    """What `read_frame` learnt from the header and the body prefix, before any crypto."""

    ftype: int
    src: bytes
    dst: bytes
    seq: int
    flags: int
    timestamp_ms: int
    interval_ms: int
    static_end: int
    """Offset of the MAC (keyed) or of the signature (open): where the static region ends."""
    sig_offset: int


# ------------------------------------------------------------------------------- helpers


def is_discovery_frame(data: bytes | bytearray | memoryview) -> bool:
    """True when `data` looks like a BEACON or SOLICIT (version and type bytes only).

    For the node driver, which shares one UDP port between transport and discovery: hand these
    datagrams to the `DiscoveryCore` and everything else to the transport `Endpoint`.
    """
    return len(data) >= HEADER_LEN and data[0] == WIRE_VERSION and data[1] in (_BEACON, _SOLICIT)


def _encode_addr(addr: Addr) -> bytes:
    host, port = addr
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise MalformedError(f"address {host!r} is not an IP literal") from None
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise MalformedError(f"port {port!r} is outside 1..65535")
    family = 4 if ip.version == 4 else 6
    return bytes((family,)) + ip.packed + _PORT.pack(port)


def normalize_addr(addr: Addr) -> Addr:
    """`addr` with its host in canonical form (IPv6 compressed, scope id dropped).

    Raises `ValueError` for a host that is not an IP literal or a port outside 1..65535.
    """
    try:
        raw = _encode_addr(addr)
    except MalformedError as exc:
        raise ValueError(str(exc)) from None
    ip = ipaddress.ip_address(raw[1:-2])
    return (str(ip), addr[1])


def _check_fields(f: BeaconFields) -> tuple[bytes, bytes, bytes]:
    name = validate_text(f.name, "node name", MAX_NAME)
    ntype = validate_text(f.node_type, "node type", MAX_TYPE)
    zone = validate_text(f.zone, "zone", MAX_ZONE)
    if not 0 <= f.ego <= 255:
        raise MalformedError("ego must be 0..255")
    if not 1 <= f.interval_ms <= MAX_INTERVAL_MS:
        raise MalformedError("interval_ms must be 1..2**32-1")
    if len(f.tags) > MAX_TAGS:
        raise OversizeError(f"at most {MAX_TAGS} tags")
    if len(f.addresses) > MAX_ADDRESSES:
        raise OversizeError(f"at most {MAX_ADDRESSES} addresses")
    return name, ntype, zone


def encode_tags(tags: Sequence[tuple[str, str]]) -> bytes:
    parts = [bytes((len(tags),))]
    total = 0
    seen: set[str] = set()
    for key, value in tags:
        k = validate_text(key, "tag key", MAX_TAG_KEY, allow_empty=False)
        v = validate_text(value, "tag value", MAX_TAG_VALUE)
        if key in seen:
            raise MalformedError(f"duplicate tag key {key!r}")
        seen.add(key)
        total += len(k) + len(v)
        parts += [bytes((len(k),)), k, bytes((len(v),)), v]
    if total > MAX_TAG_BYTES:
        raise OversizeError(f"tags hold {total} bytes, the limit is {MAX_TAG_BYTES}")
    return b"".join(parts)


def _seal(identity: Identity, ftype: int, seq: int, body: bytes, mesh: Mesh) -> bytes:
    """Finish a frame: header, body, optional MAC, signature; check the size."""
    body_len = len(body) + (MAC_LEN if mesh.keyed else 0) + SIGNATURE_LEN
    if HEADER_LEN + body_len > MAX_FRAME:
        raise OversizeError(f"discovery frame of {HEADER_LEN + body_len} bytes exceeds {MAX_FRAME}")
    if not 0 <= seq < 2**64:
        raise MalformedError("seq must fit in 64 bits")
    header = pack_header(ftype, identity.cell_id, ZERO_CELL, 0, seq, body_len)
    ad = associated_data(header)
    if mesh.keyed:
        body += mesh.mac(ad, body)
    sig = identity.sign(SIGNING_CONTEXT + ad + body)
    return header + body + sig


def _prefix(flags: int, timestamp_ms: int, interval_ms: int) -> bytes:
    if not 0 <= timestamp_ms < 2**64:
        raise MalformedError("timestamp_ms must fit in 64 bits")
    return _PREFIX.pack(BODY_VERSION, flags, 0, timestamp_ms, interval_ms)


# ------------------------------------------------------------------------------- encoders


def push_beacon(identity: Identity, fields: BeaconFields, mesh: Mesh, reply: bool = False) -> bytes:
    """Encode and sign a BEACON frame (header included).

    `reply` marks a beacon sent unicast in answer to a SOLICIT (flag bit 2).
    Raises `OversizeError` / `MalformedError` for fields outside their bounds (docs/wire.md).
    """
    name, ntype, zone = _check_fields(fields)
    flags = (
        (FLAG_MAC if mesh.keyed else 0)
        | (FLAG_CERT if fields.cert is not None else 0)
        | (FLAG_REPLY if reply else 0)
    )
    parts = [
        _prefix(flags, fields.timestamp_ms, fields.interval_ms),
        mesh.tag,
        identity.public_key,
        identity.noise_static_public,
        _CAPS_EGO.pack(fields.caps.to_bits(), fields.ego),
        bytes((len(name),)),
        name,
        bytes((len(ntype),)),
        ntype,
        bytes((len(zone),)),
        zone,
        encode_tags(fields.tags),
        bytes((len(fields.addresses),)),
        *(_encode_addr(a) for a in fields.addresses),
    ]
    if fields.cert is not None:
        parts.append(push_cert(fields.cert))
    return _seal(identity, _BEACON, fields.seq, b"".join(parts), mesh)


def _probes(cell: bytes, seq: int) -> tuple[int, int, int, int]:
    salt = _SALT.pack(seq)
    digest = hashlib.blake2s(cell, digest_size=16, salt=salt, person=b"cm-known").digest()
    w0, w1, w2, w3 = _FILTER_WORDS.unpack(digest)
    return w0, w1, w2, w3


def known_filter(cells: Sequence[bytes], seq: int) -> bytes:
    """A Bloom filter of `cells` (16-byte CellIDs) for the `known` field of SOLICIT `seq`.

    About 10 bits per CellID (about 1% false positives), at most `MAX_KNOWN_FILTER` bytes. The
    four probes are the u32 words of ``BLAKE2s(cell, digest 16, salt = u64 seq, person
    "cm-known")`` modulo the size in bits; salting with the SOLICIT's sequence number makes the
    false positives of successive repeats independent, so a neighbour wrongly taken for known
    once is asked again. Beyond about 600 CellIDs the filter saturates and answers "known" more
    and more often; that only makes fewer neighbours answer a repeated SOLICIT.
    """
    size = min(MAX_KNOWN_FILTER, max(1, (len(cells) * _FILTER_BITS_PER_PEER + 7) // 8))
    bits = bytearray(size)
    nbits = size * 8
    for cell in cells:
        for w in _probes(cell, seq):
            i = w % nbits
            bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def peek_known(data: bytes, view: FrameView) -> bytes | None:
    """The known-peers filter of a SOLICIT without decoding the rest (None if it has none or
    its length does not fit; `parse_solicit` then reports the fault)."""
    if not view.flags & FLAG_KNOWN:
        return None
    start = _SOLICIT_FIXED_END + 2
    if start > view.static_end:
        return None
    (size,) = _PORT.unpack_from(data, _SOLICIT_FIXED_END)
    if not 1 <= size <= MAX_KNOWN_FILTER or start + size > view.static_end:
        return None
    return data[start : start + size]


def filter_contains(known: bytes, cell: bytes, seq: int) -> bool:
    """True when `cell` is (probably) in the filter `known` of SOLICIT `seq` (never a false
    negative)."""
    nbits = len(known) * 8
    for w in _probes(cell, seq):
        i = w % nbits
        if not known[i >> 3] & (1 << (i & 7)):
            return False
    return True


def push_solicit(
    identity: Identity,
    seq: int,
    timestamp_ms: int,
    mesh: Mesh,
    cert: MembershipCert | None = None,
    known: bytes | None = None,
    reply: bool = False,
) -> bytes:
    """Encode and sign a SOLICIT frame (header included); `known` from `known_filter`;
    `reply` for a SOLICIT sent back to a solicitor we did not know."""
    flags = (
        (FLAG_MAC if mesh.keyed else 0)
        | (FLAG_CERT if cert is not None else 0)
        | (FLAG_KNOWN if known is not None else 0)
        | (FLAG_REPLY if reply else 0)
    )
    parts = [_prefix(flags, timestamp_ms, 0), mesh.tag, identity.public_key]
    if known is not None:
        if not 1 <= len(known) <= MAX_KNOWN_FILTER:
            raise OversizeError(f"known-peers filter must be 1 to {MAX_KNOWN_FILTER} bytes")
        parts += [_PORT.pack(len(known)), known]
    if cert is not None:
        parts.append(push_cert(cert))
    return _seal(identity, _SOLICIT, seq, b"".join(parts), mesh)


# ------------------------------------------------------------------------------- decoders


def read_frame(data: bytes, ftype: int) -> FrameView:
    """Step 1: check the header and the body prefix of a frame of type `ftype`. No crypto.

    Raises `OversizeError` (over 1200 bytes, trailing bytes), `TruncatedError`, `VersionError`
    or `MalformedError` (wrong type, non-zero session id or reserved bits, unknown flags, a
    non-zero destination, a SOLICIT with an interval, a BEACON with interval 0 or a filter).
    """
    n = len(data)
    if n > MAX_FRAME:
        raise OversizeError(f"discovery frame of {n} bytes exceeds {MAX_FRAME}")
    if n < STATIC_OFFSET:
        _header_error(data, ftype)
        raise TruncatedError("discovery body shorter than its 16-byte prefix")
    # One unpack for the header and the body prefix (the hot path); any header fault is then
    # classified exactly as `pull_header_fields` would.
    (wire, t, hflags, _ttl, plen, frag, src, dst, sid, seq, _chan, hrsvd) = _HEAD.unpack_from(data)
    if wire != WIRE_VERSION or hflags or frag or hrsvd or plen != n - HEADER_LEN or t != ftype:
        _header_error(data, ftype)
    if sid != 0:
        raise MalformedError("discovery frames carry session id 0")
    ver, flags, rsvd, ts, interval = _PREFIX.unpack_from(data, HEADER_LEN)
    if ver != BODY_VERSION:
        raise VersionError(f"discovery body version {ver} is not supported")
    if flags & ~_KNOWN_FLAGS:
        raise MalformedError(f"unknown discovery flag bits 0x{flags:02x}")
    if rsvd:
        raise MalformedError("reserved discovery body bits must be zero")
    sig_offset = n - SIGNATURE_LEN
    static_end = sig_offset - MAC_LEN if flags & FLAG_MAC else sig_offset
    fixed = _BEACON_FIXED_END + 5 if t == _BEACON else _SOLICIT_FIXED_END  # 3 strings, 2 counts
    if static_end < fixed:
        raise TruncatedError("discovery frame too short for its fixed fields")
    if dst != ZERO_CELL:
        raise MalformedError("discovery frames are addressed to the all-zero CellID")
    if t == _BEACON:
        if interval == 0:
            raise MalformedError("a beacon must announce an interval of at least 1 ms")
        if flags & FLAG_KNOWN:
            raise MalformedError("only a SOLICIT carries a known-peers filter")
    elif interval != 0:
        raise MalformedError("a SOLICIT has no interval")
    return FrameView(t, src, dst, seq, flags, ts, interval, static_end, sig_offset)


def _header_error(data: bytes, ftype: int) -> None:
    """Raise the error `pull_header_fields` gives for `data`, or a type mismatch."""
    t = pull_header_fields(data)[0]
    if t != ftype:
        raise MalformedError(f"frame type {t} where {FrameType(ftype).name} was expected")


def check_mesh(data: bytes, view: FrameView, mesh: Mesh) -> None:
    """Step 2: the mesh tag, the MAC's presence, and the MAC (raises `AdmissionError`).

    Reasons: ``other_mesh`` (another mesh name), ``unkeyed`` (we need a MAC, the frame has
    none), ``keyed`` (we are an open mesh, the frame carries a MAC), ``bad_mac``.
    """
    if data[STATIC_OFFSET:_TAG_END] != mesh.tag:
        raise AdmissionError("other_mesh", "frame belongs to another mesh")
    has_mac = view.flags & FLAG_MAC
    if mesh.mac_key is None:
        if has_mac:
            raise AdmissionError("keyed", "keyed frame, and this node is in an open mesh")
        return
    if not has_mac:
        raise AdmissionError("unkeyed", "frame without a mesh MAC in a keyed mesh")
    mv = memoryview(data)
    if not mesh.check_mac(
        mv[view.static_end : view.sig_offset], associated_data(mv), mv[HEADER_LEN : view.static_end]
    ):
        raise AdmissionError("bad_mac", "mesh MAC did not verify")


def signed_message(data: bytes, view: FrameView) -> bytes:
    """The message the frame's signature covers (context || header, TTL zeroed || body)."""
    return SIGNING_CONTEXT + associated_data(data) + data[HEADER_LEN : view.sig_offset]


class _Reader:
    """Bounded reads from `data[pos:end]` that raise `TruncatedError` instead of running over."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def take(self, n: int, what: str) -> bytes:
        p = self.pos
        q = p + n
        if q > self.end:
            raise TruncatedError(f"{what} runs past the end of the beacon")
        self.pos = q
        return self.data[p:q]

    def u8(self, what: str) -> int:
        p = self.pos
        if p >= self.end:
            raise TruncatedError(f"{what} runs past the end of the beacon")
        self.pos = p + 1
        return self.data[p]

    def text(self, what: str, limit: int) -> str:
        n = self.u8(what)
        if n > limit:
            raise OversizeError(f"{what} of {n} bytes exceeds {limit}")
        return decode_text(self.take(n, what), what) if n else ""


def _bind(src: bytes, public_key: bytes) -> CellId:
    cell = cell_id_from_public_key(public_key)
    if cell != src:
        raise AdmissionError("cell_mismatch", "header source is not the carried key's CellID")
    return cell


def _pull_tags(r: _Reader) -> tuple[tuple[str, str], ...]:
    count = r.u8("tag count")
    if count > MAX_TAGS:
        raise OversizeError(f"{count} tags, the limit is {MAX_TAGS}")
    tags: list[tuple[str, str]] = []
    total = 0
    for _ in range(count):
        klen = r.u8("tag key length")
        if not 1 <= klen <= MAX_TAG_KEY:
            raise MalformedError(f"tag key length {klen} is outside 1..{MAX_TAG_KEY}")
        key = decode_text(r.take(klen, "tag key"), "tag key")
        value = r.text("tag value", MAX_TAG_VALUE)
        total += klen + len(value.encode("utf-8"))
        if any(k == key for k, _ in tags):
            raise MalformedError(f"duplicate tag key {key!r}")
        tags.append((key, value))
    if total > MAX_TAG_BYTES:
        raise OversizeError(f"tags hold {total} bytes, the limit is {MAX_TAG_BYTES}")
    return tuple(tags)


def _pull_addresses(r: _Reader) -> tuple[Addr, ...]:
    count = r.u8("address count")
    if count > MAX_ADDRESSES:
        raise OversizeError(f"{count} addresses, the limit is {MAX_ADDRESSES}")
    out: list[Addr] = []
    for _ in range(count):
        family = r.u8("address family")
        size = _FAMILY_LEN.get(family)
        if size is None:
            raise MalformedError(f"unknown address family {family}")
        raw = r.take(size, "address")
        (port,) = _PORT.unpack(r.take(2, "port"))
        if port == 0:
            raise MalformedError("port 0 in an announced address")
        ip = ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
        out.append((str(ip), port))
    return tuple(out)


def _pull_cert_in(data: bytes, r: _Reader) -> MembershipCert:
    cert, end = pull_cert(data[: r.end], r.pos)
    r.pos = end
    return cert


@dataclass(frozen=True, slots=True)
class UnverifiedBeacon:
    """A beacon that passed steps 1-3; `verify` does step 4 and returns the `Beacon`."""

    beacon: Beacon
    message: bytes
    signature: bytes

    def verify(self, verify: Verifier = verify_signature) -> Beacon:
        """Check the Ed25519 signature (raises `AdmissionError` ``bad_signature``)."""
        check_signature(verify, self.beacon.public_key, self.message, self.signature)
        return self.beacon


@dataclass(frozen=True, slots=True)
class UnverifiedSolicit:
    """A SOLICIT that passed steps 1-3; `verify` does step 4."""

    solicit: Solicit
    message: bytes
    signature: bytes

    def verify(self, verify: Verifier = verify_signature) -> Solicit:
        """Check the Ed25519 signature (raises `AdmissionError` ``bad_signature``)."""
        check_signature(verify, self.solicit.public_key, self.message, self.signature)
        return self.solicit


def check_signature(verify: Verifier, public_key: bytes, message: bytes, signature: bytes) -> None:
    """Run `verify`, turning any `AuthenticationError` into `AdmissionError` ``bad_signature``."""
    try:
        verify(public_key, message, signature)
    except AdmissionError:
        raise
    except AuthenticationError:
        raise AdmissionError("bad_signature", "signature did not verify") from None


def parse_beacon(data: bytes, view: FrameView) -> UnverifiedBeacon:
    """Step 3 for a BEACON: decode every field and bind `src` to the public key.

    Raises `DecodeError` subclasses for bad fields and `AdmissionError` ``cell_mismatch``.
    """
    public_key = data[_TAG_END:_PK_END]
    noise = data[_PK_END:_NOISE_END]
    caps_bits, ego = _CAPS_EGO.unpack_from(data, _NOISE_END)
    r = _Reader(data, _BEACON_FIXED_END, view.static_end)
    name = r.text("node name", MAX_NAME)
    ntype = r.text("node type", MAX_TYPE)
    zone = r.text("zone", MAX_ZONE)
    tags = _pull_tags(r)
    addresses = _pull_addresses(r)
    cert = _pull_cert_in(data, r) if view.flags & FLAG_CERT else None
    if r.pos != view.static_end:
        raise OversizeError(f"{view.static_end - r.pos} bytes of junk after the beacon fields")
    cell = _bind(view.src, public_key)
    fields = BeaconFields(
        view.seq,
        view.timestamp_ms,
        view.interval_ms,
        name,
        ntype,
        zone,
        ego,
        Capabilities.from_bits(caps_bits),
        tags,
        addresses,
        cert,
    )
    flags = view.flags
    beacon = Beacon(
        cell, public_key, noise, fields, bool(flags & FLAG_REPLY), bool(flags & FLAG_MAC)
    )
    return UnverifiedBeacon(beacon, signed_message(data, view), data[view.sig_offset :])


def parse_solicit(data: bytes, view: FrameView) -> UnverifiedSolicit:
    """Step 3 for a SOLICIT: decode the key and the optional certificate, bind `src`."""
    public_key = data[_TAG_END:_PK_END]
    r = _Reader(data, _SOLICIT_FIXED_END, view.static_end)
    known = None
    if view.flags & FLAG_KNOWN:
        (size,) = _PORT.unpack(r.take(2, "filter length"))
        if not 1 <= size <= MAX_KNOWN_FILTER:
            raise MalformedError(f"known-peers filter of {size} bytes, not 1..{MAX_KNOWN_FILTER}")
        known = r.take(size, "known-peers filter")
    cert = _pull_cert_in(data, r) if view.flags & FLAG_CERT else None
    if r.pos != view.static_end:
        raise OversizeError(f"{view.static_end - r.pos} bytes of junk after the SOLICIT fields")
    cell = _bind(view.src, public_key)
    flags = view.flags
    solicit = Solicit(
        cell,
        public_key,
        view.seq,
        view.timestamp_ms,
        cert,
        bool(flags & FLAG_MAC),
        known,
        bool(flags & FLAG_REPLY),
    )
    return UnverifiedSolicit(solicit, signed_message(data, view), data[view.sig_offset :])


def pull_beacon(data: bytes, mesh: Mesh, verify: Verifier = verify_signature) -> Beacon:
    """Decode and authenticate a BEACON frame (all four steps).

    Raises a `DecodeError` subclass for a frame that is not a well-formed beacon, and
    `AuthenticationError` (`AdmissionError`, see its `reason`) for another mesh, a missing,
    unexpected or wrong MAC, a `src` that is not the key's CellID, or a bad signature.
    Freshness, replay and membership are the discovery core's business, not the codec's.
    """
    data = bytes(data)
    view = read_frame(data, _BEACON)
    check_mesh(data, view, mesh)
    return parse_beacon(data, view).verify(verify)


def pull_solicit(data: bytes, mesh: Mesh, verify: Verifier = verify_signature) -> Solicit:
    """Decode and authenticate a SOLICIT frame; errors as for `pull_beacon`."""
    data = bytes(data)
    view = read_frame(data, _SOLICIT)
    check_mesh(data, view, mesh)
    return parse_solicit(data, view).verify(verify)
