"""Channels: named endpoints, their 32-bit header hash, and the declarations a node hosts.

Theory of operation: a channel is a `/`-separated name such as `telemetry/engine-3` (the same
grammar as permission tokens use). On the wire, channel traffic carries a 32-bit hash of the name
in the frame header (and in CHANNEL_MSG records) so that the ring 0 gate and relays can act on it
without decrypting. The hash is domain-separated BLAKE3 and never 0 (no channel) or 0xFFFFFFFF
(the channel protocol's own control channel).

A node hosts channels by declaring patterns: `ChannelSpec("telemetry/**", access="token",
visibility="mesh")`. `access` says whether a peer needs a permission token for the right it asks
for (`token`) or only the ring-1 policy's consent (`open`). `visibility` says who may know the
channel exists: `mesh` channels answer peers, `local` channels answer only this node's own
applications; to a peer a local channel is indistinguishable from one that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import blake3

from cellmesh.identity.tokens import channel_matches, validate_channel, validate_pattern

CHANNEL_HASH_CONTEXT: Final = "cellmesh 2026-11 channel hash v1"
CONTROL_CHANNEL: Final = 0xFFFFFFFF
ACCESS_MODES: Final = ("open", "token")
VISIBILITIES: Final = ("mesh", "local")
MAX_DECLARATIONS: Final = 1024

Access = Literal["open", "token"]
Visibility = Literal["mesh", "local"]


def channel_hash(name: str) -> int:
    """The 32-bit header hash of channel `name` (validated); never 0 nor 0xFFFFFFFF.

    Raises `ValueError` for an invalid name. Collisions are possible (32 bits) and harmless for
    safety: every per-packet verdict is keyed by (peer, hash) and was granted for a full name,
    so a collision can only let a peer that already holds a grant reach a channel with the same
    hash, and the receiver maps the hash back to the name it granted, never to another.
    """
    validate_channel(name)
    digest = blake3.blake3(name.encode("ascii"), derive_key_context=CHANNEL_HASH_CONTEXT).digest(4)
    value = int.from_bytes(digest, "big")
    if value in (0, CONTROL_CHANNEL):
        value = 1  # two reserved values out of 2**32: folding them costs nothing measurable
    return value


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """A channel declaration: which names this node hosts, and how peers may use them."""

    pattern: str
    access: Access = "token"
    visibility: Visibility = "mesh"

    def __post_init__(self) -> None:
        validate_pattern(self.pattern)
        if self.access not in ACCESS_MODES:
            raise ValueError(
                f"access must be one of {', '.join(ACCESS_MODES)}, not {self.access!r}"
            )
        if self.visibility not in VISIBILITIES:
            raise ValueError(
                f"visibility must be one of {', '.join(VISIBILITIES)}, not {self.visibility!r}"
            )

    def text(self) -> str:
        """The declaration as `parse_channel_spec` reads it."""
        return f"{self.pattern} {self.access} {self.visibility}"


def parse_channel_spec(text: str) -> ChannelSpec:
    """Parse 'PATTERN [open|token] [mesh|local]' (defaults: token, mesh). Raises `ValueError`."""
    words = text.split()
    if not words:
        raise ValueError("empty channel declaration")
    pattern, options = words[0], words[1:]
    access: Access = "token"
    visibility: Visibility = "mesh"
    seen: set[str] = set()
    for word in options:
        if word in seen:
            raise ValueError(f"{text!r}: {word!r} given twice")
        seen.add(word)
        if word == "open":
            access = "open"
        elif word == "token":
            access = "token"
        elif word == "mesh":
            visibility = "mesh"
        elif word == "local":
            visibility = "local"
        else:
            raise ValueError(
                f"{text!r}: unknown option {word!r} (expected open, token, mesh or local)"
            )
    if seen >= {"open", "token"} or seen >= {"mesh", "local"}:
        raise ValueError(f"{text!r}: contradictory options")
    return ChannelSpec(pattern, access, visibility)


class ChannelTable:
    """The channels a node hosts: first declaration whose pattern matches a name wins."""

    def __init__(self, specs: tuple[ChannelSpec, ...] = ()) -> None:
        self._specs: list[ChannelSpec] = []
        for spec in specs:
            self.declare(spec)

    def declare(self, spec: ChannelSpec) -> None:
        """Add (or replace, same pattern) a declaration."""
        for i, old in enumerate(self._specs):
            if old.pattern == spec.pattern:
                self._specs[i] = spec
                return
        if len(self._specs) >= MAX_DECLARATIONS:
            raise ValueError(f"at most {MAX_DECLARATIONS} channel declarations")
        self._specs.append(spec)

    def remove(self, pattern: str) -> bool:
        """Drop the declaration with this pattern; True if there was one."""
        before = len(self._specs)
        self._specs = [s for s in self._specs if s.pattern != pattern]
        return len(self._specs) != before

    def lookup(self, name: str) -> ChannelSpec | None:
        """The declaration that hosts channel `name`, or None."""
        for spec in self._specs:
            if channel_matches(spec.pattern, name):
                return spec
        return None

    def specs(self) -> tuple[ChannelSpec, ...]:
        """Every declaration, in order."""
        return tuple(self._specs)
