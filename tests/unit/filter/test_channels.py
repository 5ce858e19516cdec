"""Unit tests for `cellmesh.filter.channels`: the header hash, declarations and the channel table."""

from __future__ import annotations

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmesh.filter.channels import (
    CHANNEL_HASH_CONTEXT,
    CONTROL_CHANNEL,
    MAX_DECLARATIONS,
    ChannelSpec,
    ChannelTable,
    channel_hash,
    parse_channel_spec,
)

SEGMENT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-",
    min_size=1,
    max_size=12,
)
NAMES = st.lists(SEGMENT, min_size=1, max_size=6).map("/".join)


# --- channel_hash ------------------------------------------------------------------------------


def test_channel_hash_is_domain_separated_blake3_of_the_name() -> None:
    name = "telemetry/engine-3"
    expected = int.from_bytes(
        blake3.blake3(name.encode("ascii"), derive_key_context=CHANNEL_HASH_CONTEXT).digest(4),
        "big",
    )
    assert channel_hash(name) == expected
    # Not the plain (context-free) hash: another protocol's BLAKE3 of the name cannot collide.
    assert channel_hash(name) != int.from_bytes(blake3.blake3(b"telemetry/engine-3").digest(4))


def test_channel_hash_is_stable_and_fits_in_32_bits() -> None:
    h = channel_hash("chat")
    assert h == channel_hash("chat")
    assert 0 < h < CONTROL_CHANNEL
    assert CONTROL_CHANNEL == 0xFFFFFFFF


def test_channel_hash_distinguishes_names() -> None:
    names = [f"telemetry/engine-{i}" for i in range(200)]
    hashes = {channel_hash(n) for n in names}
    assert len(hashes) == len(names)
    # Case matters: channel names are case-sensitive.
    assert channel_hash("Chat") != channel_hash("chat")


@settings(max_examples=200, deadline=None)
@given(NAMES)
def test_channel_hash_is_never_a_reserved_value(name: str) -> None:
    h = channel_hash(name)
    assert h not in (0, CONTROL_CHANNEL)
    assert 0 < h < 2**32
    assert channel_hash(name) == h


class _FixedDigest:
    def __init__(self, digest: bytes) -> None:
        self._digest = digest

    def digest(self, length: int) -> bytes:
        assert length == 4
        return self._digest


@pytest.mark.parametrize("raw", [bytes(4), b"\xff\xff\xff\xff"])
def test_reserved_digests_are_folded_to_one(monkeypatch: pytest.MonkeyPatch, raw: bytes) -> None:
    """Force BLAKE3 to produce each reserved value: the hash folds it instead of returning it."""

    def fake(data: bytes, derive_key_context: str) -> _FixedDigest:
        assert derive_key_context == CHANNEL_HASH_CONTEXT
        return _FixedDigest(raw)

    monkeypatch.setattr(blake3, "blake3", fake)  # the module channels.py calls
    assert channel_hash("any/name") == 1


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a//b",
        "/a",
        "a/",
        "a/*",
        "a/**",
        "*",
        "has space",
        "caf\u00e9",
        "x" * 256,
        "/".join(["s"] * 33),
    ],
)
def test_channel_hash_refuses_invalid_names(bad: str) -> None:
    with pytest.raises(ValueError, match="channel"):
        channel_hash(bad)


def test_channel_hash_accepts_limits() -> None:
    assert channel_hash("x" * 255) != channel_hash("x" * 254)
    assert channel_hash("/".join(["s"] * 32)) > 0


def test_channel_hash_refuses_non_str() -> None:
    with pytest.raises(ValueError, match="must be str"):
        channel_hash(b"chat")  # type: ignore[arg-type]


# --- ChannelSpec ---------------------------------------------------------------------------------


def test_channel_spec_defaults_are_token_and_mesh() -> None:
    spec = ChannelSpec("telemetry/**")
    assert spec.access == "token"
    assert spec.visibility == "mesh"
    assert spec.text() == "telemetry/** token mesh"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pattern": "a/**/b"}, "only allowed as the last"),
        ({"pattern": ""}, "length"),
        ({"pattern": "ok", "access": "public"}, "access must be one of"),
        ({"pattern": "ok", "visibility": "global"}, "visibility must be one of"),
    ],
)
def test_channel_spec_validates(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChannelSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec",
    [
        ChannelSpec("chat"),
        ChannelSpec("chat/*", "open", "local"),
        ChannelSpec("telemetry/**", "token", "local"),
        ChannelSpec("a/*/c", "open", "mesh"),
    ],
)
def test_channel_spec_text_round_trips(spec: ChannelSpec) -> None:
    assert parse_channel_spec(spec.text()) == spec


def test_channel_spec_is_frozen() -> None:
    spec = ChannelSpec("chat")
    with pytest.raises(AttributeError):
        spec.access = "open"  # type: ignore[misc]


# --- parse_channel_spec ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("chat", ChannelSpec("chat", "token", "mesh")),
        ("chat open", ChannelSpec("chat", "open", "mesh")),
        ("chat local", ChannelSpec("chat", "token", "local")),
        ("chat local open", ChannelSpec("chat", "open", "local")),
        ("  telemetry/**   token   mesh  ", ChannelSpec("telemetry/**", "token", "mesh")),
        ("a/*\topen", ChannelSpec("a/*", "open", "mesh")),
    ],
)
def test_parse_channel_spec_accepts(text: str, expected: ChannelSpec) -> None:
    assert parse_channel_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty channel declaration"),
        ("   ", "empty channel declaration"),
        ("chat open open", "given twice"),
        ("chat local local", "given twice"),
        ("chat open token", "contradictory"),
        ("chat token open", "contradictory"),
        ("chat mesh local", "contradictory"),
        ("chat local mesh open", "contradictory"),
        ("chat public", "unknown option 'public'"),
        ("chat OPEN", "unknown option"),
        ("a/**/b open", "only allowed as the last"),
        ("bad name open", "unknown option 'name'"),
        ("caf\u00e9", "ASCII"),
    ],
)
def test_parse_channel_spec_refuses(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_channel_spec(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_parse_channel_spec_only_raises_value_error(text: str) -> None:
    try:
        spec = parse_channel_spec(text)
    except ValueError:
        return
    assert parse_channel_spec(spec.text()) == spec


# --- ChannelTable ------------------------------------------------------------------------------


def test_lookup_first_declaration_that_matches_wins() -> None:
    broad = ChannelSpec("telemetry/**", "token", "mesh")
    narrow = ChannelSpec("telemetry/public", "open", "mesh")
    table = ChannelTable((broad, narrow))
    # The broad pattern comes first, so it decides even for the narrow name.
    assert table.lookup("telemetry/public") is broad
    assert table.lookup("telemetry/engine/3") is broad
    assert table.lookup("chat") is None
    # "**" needs at least one further segment.
    assert table.lookup("telemetry") is None

    reordered = ChannelTable((narrow, broad))
    assert reordered.lookup("telemetry/public") is narrow
    assert reordered.lookup("telemetry/private") is broad


def test_lookup_of_invalid_names_is_none() -> None:
    table = ChannelTable((ChannelSpec("**", "open"),))
    assert table.lookup("anything/at/all") is not None
    assert table.lookup("") is None
    assert table.lookup("a/*") is None
    assert table.lookup("bad name") is None


def test_declare_same_pattern_replaces_in_place() -> None:
    a = ChannelSpec("a/*", "token")
    b = ChannelSpec("b", "open")
    table = ChannelTable((a, b))
    a2 = ChannelSpec("a/*", "open", "local")
    table.declare(a2)
    assert table.specs() == (a2, b)  # same position, new options
    assert table.lookup("a/x") is a2


def test_remove_reports_whether_it_removed() -> None:
    table = ChannelTable((ChannelSpec("a"), ChannelSpec("b")))
    assert table.remove("a") is True
    assert table.remove("a") is False
    assert table.remove("c") is False
    assert table.specs() == (ChannelSpec("b"),)
    assert table.lookup("a") is None


def test_empty_table() -> None:
    table = ChannelTable()
    assert table.specs() == ()
    assert table.lookup("chat") is None
    assert table.remove("chat") is False


def test_table_is_bounded_but_replacing_at_the_bound_works() -> None:
    table = ChannelTable(tuple(ChannelSpec(f"c{i}") for i in range(MAX_DECLARATIONS)))
    assert len(table.specs()) == MAX_DECLARATIONS
    with pytest.raises(ValueError, match=f"at most {MAX_DECLARATIONS}"):
        table.declare(ChannelSpec("one-more"))
    # Replacing an existing pattern does not grow the table, so it is still allowed.
    table.declare(ChannelSpec("c0", "open"))
    assert table.specs()[0] == ChannelSpec("c0", "open")
    # Removing one makes room again.
    assert table.remove("c1")
    table.declare(ChannelSpec("one-more"))
    assert table.specs()[-1] == ChannelSpec("one-more")
    assert len(table.specs()) == MAX_DECLARATIONS


def test_constructor_refuses_too_many_declarations() -> None:
    with pytest.raises(ValueError, match="at most"):
        ChannelTable(tuple(ChannelSpec(f"c{i}") for i in range(MAX_DECLARATIONS + 1)))


def test_specs_is_a_snapshot() -> None:
    table = ChannelTable((ChannelSpec("a"),))
    snap = table.specs()
    table.declare(ChannelSpec("b"))
    assert snap == (ChannelSpec("a"),)
    assert len(table.specs()) == 2
