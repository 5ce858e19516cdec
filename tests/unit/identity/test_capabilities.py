"""Tests for cellmesh.identity.capabilities: adverts, their encoding, and the index."""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.errors import (
    AuthenticationError,
    DecodeError,
    MalformedError,
    OversizeError,
    TruncatedError,
    VersionError,
)
from cellmesh.identity.capabilities import (
    ADVERT_CONTEXT,
    MAX_ADVERT_LEN,
    MIN_ADVERT_LEN,
    AdvertError,
    CapabilityAdvert,
    CapabilityIndex,
    Deadlines,
    advert_signing_message,
    decode_advert,
    encode_advert,
    issue_advert,
    parse_tag,
    validate_tag,
    verify_advert,
)
from cellmesh.identity.cellid import CellId
from cellmesh.identity.keys import Identity
from cellmesh.identity.tokens import TOKEN_CONTEXT

T0 = 1_800_000_000
HOUR = 3600
SKEW = 120
TAGS = {"storage": "", "gpu": "a100", "relay": "", "bandwidth": "100M"}


@pytest.fixture(scope="module")
def ids() -> list[Identity]:
    return [Identity.generate() for _ in range(6)]


def advert(
    who: Identity,
    seq: int = 1,
    tags: dict[str, str] | None = None,
    start: int = T0,
    end: int = T0 + HOUR,
) -> CapabilityAdvert:
    return issue_advert(who, seq, TAGS if tags is None else tags, start, end)


def resign(a: CapabilityAdvert, signer: Identity, **changes: object) -> CapabilityAdvert:
    """Change fields and sign honestly (to build adverts `issue_advert` would refuse)."""
    changed = dataclasses.replace(a, **changes)  # type: ignore[arg-type]
    body = ADVERT_CONTEXT + raw_body(changed)
    return dataclasses.replace(changed, signature=signer.sign(body))


def raw_body(a: CapabilityAdvert) -> bytes:
    """Encode without validation (to craft invalid encodings)."""
    out = struct.pack(
        "!B32sQQQB", a.version, a.issuer, a.seq, a.issued_at, a.expires_at, len(a.tags)
    )
    for name, value in a.tags:
        n, v = name.encode(), value.encode("utf-8", "surrogatepass")
        out += bytes([len(n)]) + n + bytes([len(v)]) + v
    return out


def reason_of(a: object, now: float = T0 + 10) -> str:
    with pytest.raises(AdvertError) as info:
        verify_advert(a, now)  # type: ignore[arg-type]
    return info.value.reason


# --- tags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("relay", ("relay", "")),
        ("gpu=a100", ("gpu", "a100")),
        ("bandwidth=100M", ("bandwidth", "100M")),
        ("k=a=b", ("k", "a=b")),
        ("x" * 32, ("x" * 32, "")),
        ("0zone.eu-west_1", ("0zone.eu-west_1", "")),
        ("loc=Zürich", ("loc", "Zürich")),
    ],
)
def test_parse_tag(text: str, tag: tuple[str, str]) -> None:
    assert parse_tag(text) == tag


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("", "", "tag name"),
        ("GPU", "", "tag name"),
        ("-gpu", "", "tag name"),
        ("_gpu", "", "tag name"),
        ("gpu model", "", "tag name"),
        ("x" * 33, "", "tag name"),
        ("gpü", "", "tag name"),
        ("gpu", "x" * 65, "65 bytes"),
        ("gpu", "€" * 22, "66 bytes"),
        ("gpu", "a\nb", "control"),
        ("gpu", "a\x7fb", "control"),
        ("gpu", "abc\u202e", "bidirectional"),
        ("gpu", "\ud800", "surrogate"),
    ],
)
def test_invalid_tags(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_tag(name, value)


def test_value_limits_are_in_bytes() -> None:
    validate_tag("gpu", "x" * 64)
    validate_tag("gpu", "€" * 21)  # 63 bytes


# --- encoding ---------------------------------------------------------------------------------


def test_round_trip(ids: list[Identity]) -> None:
    for tags in ({}, TAGS, {"a": ""}, {f"t{i:02}": "v" * 40 for i in range(20)}):
        a = advert(ids[0], tags=tags)
        data = encode_advert(a)
        assert decode_advert(data) == a
        assert encode_advert(decode_advert(data)) == data
        verify_advert(a, T0)
    assert len(encode_advert(advert(ids[0], tags={}))) == MIN_ADVERT_LEN


def test_tags_are_sorted_and_helpers(ids: list[Identity]) -> None:
    a = issue_advert(ids[0], 1, [("relay", ""), ("gpu", "a100"), ("bandwidth", "1G")], T0, T0)
    assert a.tags == (("bandwidth", "1G"), ("gpu", "a100"), ("relay", ""))
    assert a.tag_names == frozenset({"bandwidth", "gpu", "relay"})
    assert a.value_of("gpu") == "a100"
    assert a.value_of("relay") == ""
    assert a.value_of("storage") is None
    assert a.cell_id == ids[0].cell_id


def test_layout_is_as_documented(ids: list[Identity]) -> None:
    a = issue_advert(ids[0], 7, {"relay": "", "gpu": "a100"}, T0, T0 + HOUR)
    data = encode_advert(a)
    assert data[0] == 1
    assert data[1:33] == ids[0].public_key
    assert int.from_bytes(data[33:41], "big") == 7
    assert int.from_bytes(data[41:49], "big") == T0
    assert int.from_bytes(data[49:57], "big") == T0 + HOUR
    assert data[57] == 2
    assert data[58:-64] == b"\x03gpu\x04a100" + b"\x05relay\x00"
    assert data[-64:] == a.signature
    assert len(data) == 58 + 9 + 7 + 64


def test_signed_message_is_domain_separated(ids: list[Identity]) -> None:
    a = advert(ids[0])
    msg = advert_signing_message(a)
    assert msg.startswith(ADVERT_CONTEXT)
    assert msg[len(ADVERT_CONTEXT) :] == encode_advert(a)[:-64]
    assert not ADVERT_CONTEXT.startswith(TOKEN_CONTEXT)
    assert not TOKEN_CONTEXT.startswith(ADVERT_CONTEXT)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq": -1}, "seq"),
        ({"seq": 2**64}, "seq"),
        ({"start": T0 + 1, "end": T0}, "validity window"),
        ({"start": -1}, "validity window"),
        ({"end": 2**64}, "validity window"),
        ({"tags": {f"t{i}": "" for i in range(33)}}, "33 tags"),
        ({"tags": {"x" * 30 + f"{i:02}": "v" * 64 for i in range(32)}}, "at most 2048"),
        ({"tags": {"GPU": ""}}, "tag name"),
    ],
)
def test_issue_refuses_invalid_arguments(
    ids: list[Identity], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        advert(ids[0], **kwargs)  # type: ignore[arg-type]


def test_issue_refuses_duplicate_names(ids: list[Identity]) -> None:
    with pytest.raises(ValueError, match="duplicate tag names: gpu"):
        issue_advert(ids[0], 1, [("gpu", "a100"), ("gpu", "h100")], T0, T0)
    with pytest.raises(ValueError, match="pair"):
        issue_advert(ids[0], 1, ["gpu"], T0, T0)  # type: ignore[list-item]


def test_encode_refuses_invalid_adverts(ids: list[Identity]) -> None:
    a = advert(ids[0])
    for bad in (
        dataclasses.replace(a, tags=(("b", ""), ("a", ""))),
        dataclasses.replace(a, tags=(("a", ""), ("a", ""))),
        dataclasses.replace(a, issuer=b"short"),
        dataclasses.replace(a, signature=b""),
        dataclasses.replace(a, version=2),
        dataclasses.replace(a, tags=[("a", "")]),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="invalid capability advert"):
            encode_advert(bad)


def test_largest_advert_fits(ids: list[Identity]) -> None:
    # 24 maximal tags: 58 + 24 * 98 + 64 = 2474 > 2048; 20 of them: 2082 > 2048; 19: 1984.
    tags = {"x" * 30 + f"{i:02}": "v" * 64 for i in range(19)}
    data = encode_advert(advert(ids[0], tags=tags))
    assert len(data) == 58 + 19 * 98 + 64 <= MAX_ADVERT_LEN
    assert decode_advert(data).tags == tuple(sorted(tags.items()))


def test_decode_errors(ids: list[Identity]) -> None:
    a = advert(ids[0])
    data = encode_advert(a)
    with pytest.raises(TruncatedError):
        decode_advert(data[:-1])
    with pytest.raises(TruncatedError):
        decode_advert(b"\x01")
    with pytest.raises(MalformedError, match="trailing"):
        decode_advert(data + b"\x00")
    with pytest.raises(VersionError):
        decode_advert(b"\x02" + data[1:])
    with pytest.raises(OversizeError):
        decode_advert(data + bytes(MAX_ADVERT_LEN))
    with pytest.raises(TruncatedError):
        decode_advert(b"")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tags": (("b", ""), ("a", ""))}, "sorted and unique"),
        ({"tags": (("a", "1"), ("a", "2"))}, "sorted and unique"),
        ({"tags": (("GPU", ""),)}, "tag name"),
        ({"tags": (("gpu", "a\x00"),)}, "control"),
        ({"tags": (("gpu", "v" * 65),)}, "65 bytes"),
        ({"tags": (("gpu", "\ud800"),)}, "UTF-8"),
        ({"issued_at": T0 + 1, "expires_at": T0}, "validity window"),
    ],
)
def test_decode_refuses_non_canonical(
    ids: list[Identity], changes: dict[str, object], message: str
) -> None:
    bad = resign(advert(ids[0]), ids[0], **changes)
    with pytest.raises(MalformedError, match=message):
        decode_advert(raw_body(bad) + bad.signature)


def test_decode_refuses_too_many_tags_and_bad_ascii(ids: list[Identity]) -> None:
    data = bytearray(encode_advert(advert(ids[0], tags={})))
    data[57] = 33
    with pytest.raises(MalformedError, match="33 tags"):
        decode_advert(bytes(data))
    body = raw_body(advert(ids[0], tags={}))[:-1] + b"\x01\x01\xff\x00"
    with pytest.raises(MalformedError, match="ASCII"):
        decode_advert(body + bytes(64))


def test_every_prefix_and_extension_is_a_decode_error(ids: list[Identity]) -> None:
    data = encode_advert(advert(ids[0]))
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            decode_advert(data[:n])
    for junk in (b"\x00", b"\xff" * 3, data):
        with pytest.raises(DecodeError):
            decode_advert(data + junk)


@given(st.binary(max_size=MAX_ADVERT_LEN + 8))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        a = decode_advert(data)
    except DecodeError:
        return
    assert encode_advert(a) == data  # anything accepted is canonical


@given(
    st.binary(min_size=57, max_size=57),
    st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=70)), max_size=34),
    st.integers(0, 70),
)
def test_fuzz_structured(head: bytes, tags: list[tuple[bytes, bytes]], sig_len: int) -> None:
    body = b"\x01" + head[1:56] + bytes([len(tags)])
    for name, value in tags:
        body += bytes([len(name)]) + name + bytes([len(value)]) + value
    data = body + bytes(sig_len)
    try:
        a = decode_advert(data)
    except DecodeError:
        return
    assert encode_advert(a) == data


@settings(max_examples=300)
@given(index=st.integers(0, 10_000), flip=st.integers(1, 255), cut=st.integers(0, 200))
def test_fuzz_mutations(ids: list[Identity], index: int, flip: int, cut: int) -> None:
    data = bytearray(encode_advert(advert(ids[0])))
    data[index % len(data)] ^= flip
    mutated = bytes(data[: len(data) - cut % 8])
    try:
        a = decode_advert(mutated)
    except DecodeError:
        return
    assert encode_advert(a) == mutated
    with pytest.raises(AdvertError):
        verify_advert(a, T0)


# --- verification -----------------------------------------------------------------------------


def test_verify_good_advert_within_skew(ids: list[Identity]) -> None:
    a = advert(ids[0])
    for now in (T0 - SKEW, T0, T0 + HOUR, T0 + HOUR + SKEW):
        verify_advert(a, now, skew=SKEW)
    with pytest.raises(AdvertError, match="not_yet_valid"):
        verify_advert(a, T0 - 1, skew=0)


def test_verify_reasons(ids: list[Identity]) -> None:
    a = advert(ids[0])
    assert reason_of(a, T0 - SKEW - 1) == "not_yet_valid"
    assert reason_of(a, T0 + HOUR + SKEW + 1) == "expired"
    assert reason_of(dataclasses.replace(a, signature=bytes(64))) == "bad_signature"
    sig = bytearray(a.signature)
    sig[5] ^= 1
    assert reason_of(dataclasses.replace(a, signature=bytes(sig))) == "bad_signature"
    assert reason_of(dataclasses.replace(a, seq=2)) == "bad_signature"
    assert reason_of(dataclasses.replace(a, tags=(("gpu", "h100"),))) == "bad_signature"
    assert reason_of(dataclasses.replace(a, issuer=ids[1].public_key)) == "bad_signature"
    assert reason_of(resign(a, ids[1])) == "bad_signature"  # signed by someone else
    assert reason_of(dataclasses.replace(a, tags=(("b", ""), ("a", "")))) == "malformed"
    assert reason_of("not an advert") == "malformed"
    # A signature over the same bytes without the domain prefix must not verify.
    raw = dataclasses.replace(a, signature=ids[0].sign(encode_advert(a)[:-64]))
    assert reason_of(raw) == "bad_signature"
    assert issubclass(AdvertError, AuthenticationError)


def test_verify_order_signature_before_time(ids: list[Identity]) -> None:
    forged = dataclasses.replace(advert(ids[0]), signature=bytes(64))
    assert reason_of(forged, T0 + 100 * HOUR) == "bad_signature"


# --- the index --------------------------------------------------------------------------------


def test_index_accepts_and_finds(ids: list[Identity]) -> None:
    idx = CapabilityIndex(skew=SKEW)
    assert idx.accept(advert(ids[0], tags={"gpu": "a100", "storage": ""}), T0)
    assert idx.accept(advert(ids[1], tags={"gpu": "h100"}), T0)
    assert idx.accept(advert(ids[2], tags={"relay": ""}), T0)
    both = sorted([ids[0].cell_id, ids[1].cell_id])
    assert idx.find("gpu", now=T0) == both
    assert idx.find("gpu", "a100", now=T0) == [ids[0].cell_id]
    assert idx.find("gpu", "v100", now=T0) == []
    assert idx.find("storage", "", now=T0) == [ids[0].cell_id]
    assert idx.find("nothing", now=T0) == []
    assert idx.capabilities_of(ids[0].cell_id, T0) == {"gpu", "storage"}
    assert idx.capabilities_of(ids[5].cell_id, T0) == frozenset()
    got = idx.get(ids[2].cell_id, T0)
    assert got is not None
    assert got.tags == (("relay", ""),)
    assert len(idx) == 3
    assert ids[1].cell_id in idx
    assert idx.tag_names() == {"gpu", "storage", "relay"}
    assert idx.events["accepted"] == 3
    with pytest.raises(ValueError, match="tag name"):
        idx.find("GPU", now=T0)


def test_index_sequence_replacement(ids: list[Identity]) -> None:
    idx = CapabilityIndex(skew=SKEW)
    cid = ids[0].cell_id
    assert idx.accept(advert(ids[0], 5, {"gpu": "a100"}), T0)
    assert not idx.accept(advert(ids[0], 4, {"relay": ""}), T0)
    assert idx.drops["stale"] == 1
    assert not idx.accept(advert(ids[0], 5, {"gpu": "a100"}), T0)
    assert idx.drops["duplicate"] == 1
    assert not idx.accept(advert(ids[0], 5, {"relay": ""}), T0)
    assert idx.drops["conflict"] == 1
    assert idx.capabilities_of(cid, T0) == {"gpu"}
    assert idx.accept(advert(ids[0], 6, {"relay": ""}), T0)
    assert idx.events["replaced"] == 1
    assert idx.find("gpu", now=T0) == []
    assert idx.find("gpu", "a100", now=T0) == []
    assert idx.find("relay", now=T0) == [cid]
    assert idx.capabilities_of(cid, T0) == {"relay"}
    assert len(idx) == 1


def test_index_counts_refusals(ids: list[Identity]) -> None:
    idx = CapabilityIndex(skew=SKEW)
    a = advert(ids[0])
    assert not idx.accept(dataclasses.replace(a, signature=bytes(64)), T0)
    assert not idx.accept(a, T0 + HOUR + SKEW + 1)
    assert not idx.accept(a, T0 - SKEW - 1)
    assert not idx.accept(dataclasses.replace(a, issuer=b"x"), T0)
    assert not idx.accept("junk", T0)  # type: ignore[arg-type]
    assert not idx.accept_encoded(b"\x01junk", T0)
    assert idx.accept_encoded(encode_advert(a), T0)
    assert dict(idx.drops) == {
        "bad_signature": 1,
        "expired": 1,
        "not_yet_valid": 1,
        "malformed": 2,
        "undecodable": 1,
    }
    # A forged advert with a higher sequence never displaces the real one.
    forged = dataclasses.replace(a, seq=99, tags=(("evil", ""),))
    assert not idx.accept(forged, T0)
    assert idx.capabilities_of(ids[0].cell_id, T0) == set(TAGS)


def test_index_eviction_bound(ids: list[Identity]) -> None:
    idx = CapabilityIndex(capacity=3, skew=SKEW)
    for i in range(5):
        assert idx.accept(advert(ids[i], tags={"relay": ""}), T0 + i)
    assert len(idx) == 3
    assert idx.events["evicted"] == 2
    assert idx.find("relay", now=T0 + 5) == sorted(ids[i].cell_id for i in (2, 3, 4))
    # Updating an issuer makes it the most recently updated: ids[3] is evicted next, not ids[2].
    assert idx.accept(advert(ids[2], 2, {"relay": ""}), T0 + 6)
    assert idx.accept(advert(ids[0], tags={"relay": ""}), T0 + 7)
    assert ids[3].cell_id not in idx
    assert ids[2].cell_id in idx


def test_index_expiry(ids: list[Identity]) -> None:
    idx = CapabilityIndex(skew=SKEW)
    idx.accept(advert(ids[0], end=T0 + 100, tags={"gpu": "a100"}), T0)
    idx.accept(advert(ids[1], end=T0 + 1000, tags={"gpu": "a100"}), T0)
    late = T0 + 100 + SKEW + 1
    # Past its deadline an advert stops answering queries even before it is swept.
    assert idx.find("gpu", now=late) == [ids[1].cell_id]
    assert idx.capabilities_of(ids[0].cell_id, late) == frozenset()
    assert idx.get(ids[0].cell_id, late) is None
    assert len(idx) == 2
    assert idx.expire(T0 + 100 + SKEW) == 0  # the deadline itself is still valid
    assert idx.expire(late) == 1
    assert len(idx) == 1
    assert idx.find("gpu", "a100", now=late) == [ids[1].cell_id]
    assert idx.events["expired"] == 1
    # Once expired, an older advert of that issuer is accepted again.
    assert idx.accept(advert(ids[0], 0, start=late, end=late + 10), late)


def test_index_forget(ids: list[Identity]) -> None:
    idx = CapabilityIndex()
    idx.accept(advert(ids[0], 3), T0)
    assert idx.forget(ids[0].cell_id)
    assert not idx.forget(ids[0].cell_id)
    assert idx.find("gpu", now=T0) == []
    assert idx.tag_names() == frozenset()
    assert idx.accept(advert(ids[0], 1), T0)


def test_index_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="capacity"):
        CapabilityIndex(capacity=0)
    with pytest.raises(ValueError, match="skew"):
        CapabilityIndex(skew=-1)


# --- a property test against a naive model ----------------------------------------------------

VOCAB = ["gpu", "relay", "storage", "bw"]
VALUES = ["", "a", "b"]


class Model:
    """The index's specification, written the slow, obvious way."""

    def __init__(self, capacity: int, skew: int) -> None:
        self.capacity, self.skew = capacity, skew
        self.entries: dict[CellId, CapabilityAdvert] = {}  # insertion order = update order

    def live(self, a: CapabilityAdvert, now: float) -> bool:
        return now - self.skew <= a.expires_at

    def expire(self, now: float) -> None:
        for cid in [c for c, a in self.entries.items() if not self.live(a, now)]:
            del self.entries[cid]

    def accept(self, a: CapabilityAdvert, good: bool, now: float) -> bool:
        self.expire(now)
        if not good or now + self.skew < a.issued_at or not self.live(a, now):
            return False
        cur = self.entries.get(a.cell_id)
        if cur is not None and a.seq <= cur.seq:
            return False
        if cur is not None:
            del self.entries[a.cell_id]
        elif len(self.entries) >= self.capacity:
            del self.entries[next(iter(self.entries))]
        self.entries[a.cell_id] = a
        return True

    def find(self, tag: str, value: str | None, now: float) -> list[CellId]:
        return sorted(
            c
            for c, a in self.entries.items()
            if self.live(a, now)
            and a.value_of(tag) is not None
            and (value is None or a.value_of(tag) == value)
        )


@pytest.fixture(scope="module")
def pool(ids: list[Identity]) -> list[tuple[CapabilityAdvert, bool]]:
    """Adverts from six issuers with random tags, sequences and windows; some forged."""
    rng = random.Random(5)
    out = []
    for who in ids:
        for seq in range(5):
            tags = {t: rng.choice(VALUES) for t in rng.sample(VOCAB, rng.randint(0, 3))}
            start = T0 + rng.randint(-50, 150)
            a = issue_advert(who, seq, tags, start, start + rng.randint(0, 300))
            out.append((a, True))
            if rng.random() < 0.2:
                out.append((dataclasses.replace(a, seq=seq + 10, signature=bytes(64)), False))
    return out


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 5),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["accept", "accept", "accept", "forget", "expire"]),
            st.integers(0, 10_000),
            st.integers(0, 15),
        ),
        max_size=60,
    ),
)
def test_index_matches_model(
    ids: list[Identity],
    pool: list[tuple[CapabilityAdvert, bool]],
    capacity: int,
    ops: list[tuple[str, int, int]],
) -> None:
    skew = 20
    idx = CapabilityIndex(capacity=capacity, skew=skew)
    model = Model(capacity, skew)
    now = float(T0)
    for op, pick, step in ops:
        now += step
        if op == "accept":
            a, good = pool[pick % len(pool)]
            assert idx.accept(a, now) == model.accept(a, good, now)
        elif op == "forget":
            cid = ids[pick % len(ids)].cell_id
            assert idx.forget(cid) == (cid in model.entries)
            model.entries.pop(cid, None)
        else:
            idx.expire(now)
            model.expire(now)
        assert len(idx) == len(model.entries)
        for tag in VOCAB:
            assert idx.find(tag, now=now) == model.find(tag, None, now)
            for value in VALUES:
                assert idx.find(tag, value, now=now) == model.find(tag, value, now)
        for who in ids:
            cid = who.cell_id
            expect = model.entries.get(cid)
            want = expect.tag_names if expect and model.live(expect, now) else frozenset()
            assert idx.capabilities_of(cid, now) == want
        check_internals(idx)


def check_internals(idx: CapabilityIndex) -> None:
    """The inverted indexes and the deadline heap say exactly what the entries say."""
    by_name: dict[str, set[CellId]] = {}
    by_pair: dict[tuple[str, str], set[CellId]] = {}
    for cid, entry in idx._entries.items():
        assert entry.names == entry.advert.tag_names
        assert idx._deadlines.get(cid) == entry.advert.expires_at + idx.skew
        for tag in entry.advert.tags:
            by_name.setdefault(tag[0], set()).add(cid)
            by_pair.setdefault(tag, set()).add(cid)
    assert idx._by_name == by_name
    assert idx._by_pair == by_pair
    assert len(idx._deadlines) == len(idx._entries)
    assert len(idx._entries) <= idx.capacity


# --- Deadlines --------------------------------------------------------------------------------


def test_deadlines_basics() -> None:
    d: Deadlines[str] = Deadlines()
    d.set("a", 5.0)
    d.set("b", 3.0)
    d.set("c", 9.0)
    d.set("b", 7.0)  # moved later: its old entry is stale
    assert d.soonest() == ("a", 5.0)
    assert d.pop_before(7.0) == ["a"]
    assert d.pop_before(7.5) == ["b"]
    d.discard("c")
    assert d.soonest() is None
    assert len(d) == 0
    with pytest.raises(ValueError, match="NaN"):
        d.set("x", float("nan"))


def test_deadlines_heap_stays_bounded() -> None:
    d: Deadlines[int] = Deadlines()
    for i in range(10_000):
        d.set(i % 10, float(i))
    assert len(d) == 10
    assert len(d._heap) <= 2 * 10 + 33
    assert d.pop_before(float("inf")) == list(range(10))
