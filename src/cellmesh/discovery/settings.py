"""Discovery settings: one frozen dataclass, validated on construction, plus the NX0_* aliases.

Every field has a docstring; `cellmesh.config` can turn them into config keys and
``CELLMESH_*`` variables. `nx0_aliases` maps the NEXUS-0 environment variables (``NX0_NAME`` ...)
onto these field names for compatibility with that system's deployment scripts.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from cellmesh.discovery.beacon import (
    MAX_NAME,
    MAX_TAGS,
    MAX_TYPE,
    MAX_ZONE,
    Addr,
    Capabilities,
    encode_tags,
)
from cellmesh.discovery.mesh import DEFAULT_MESH_NAME, MembershipCert, Mesh, validate_text
from cellmesh.errors import DecodeError
from cellmesh.identity.cellid import CELL_ID_LEN
from cellmesh.identity.keys import ED25519_PUBLIC_KEY_LEN

__all__ = [
    "DEFAULT_GROUP_V4",
    "DEFAULT_GROUP_V6",
    "DEFAULT_PORT",
    "NX0_ALIASES",
    "DiscoverySettings",
    "nx0_aliases",
]

DEFAULT_PORT = 19541
"""The discovery UDP port (NEXUS-0's NMC port)."""
DEFAULT_GROUP_V6 = "ff02::1"
"""IPv6 link-local all-nodes multicast: every host on the link receives it, no join needed."""
DEFAULT_GROUP_V4 = "224.0.0.1"
"""IPv4 all-hosts multicast (link-local scope, never routed): the IPv4 fallback group."""

NX0_ALIASES: dict[str, str] = {
    "NX0_NAME": "name",
    "NX0_TYPE": "node_type",
    "NX0_ZONE": "zone",
    "NX0_EGO": "ego",
    "NX0_PORT": "group_port",
}
"""NEXUS-0 environment variable -> `DiscoverySettings` field."""


def nx0_aliases(env: Mapping[str, str]) -> dict[str, str]:
    """Map the NEXUS-0 variables present in `env` to `DiscoverySettings` field names.

    Pure: returns ``{"name": "Alpha", "group_port": "19541", ...}`` with the values unparsed
    (the config loader converts and validates them like any other value). Variables that are
    absent are left out.
    """
    return {field: env[var] for var, field in NX0_ALIASES.items() if var in env}


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """How a node finds and admits its neighbours. Defaults suit a LAN of up to a few thousand.

    Raises `ValueError` on construction for any value outside its documented range.
    """

    mesh_name: str = DEFAULT_MESH_NAME
    """Name of the mesh to join (1-64 bytes of UTF-8). Nodes of other meshes are ignored."""
    mesh_key: bytes | None = field(default=None, repr=False)
    """Secret mesh key (16-32 bytes) or None for an open mesh. With a key, every frame carries a
    MAC under it; frames without one (or with a wrong one) are dropped."""
    allowlist: frozenset[bytes] | None = None
    """CellIDs admitted as members, or None. With `authority_keys` too, either admits a peer."""
    authority_keys: frozenset[bytes] = frozenset()
    """Ed25519 public keys of mesh authorities whose membership certificates admit a peer."""
    membership_cert: MembershipCert | None = None
    """Our own membership certificate, carried in every frame we send (or None)."""
    name: str = ""
    """Node name announced to peers (NX0_NAME), up to 64 bytes."""
    node_type: str = ""
    """Node role announced to peers (NX0_TYPE: Bridge, Rig-Hub, Data-Mule, Agent ...)."""
    zone: str = ""
    """Logical zone announced to peers (NX0_ZONE: Command, Medical ...)."""
    ego: int = 0
    """Seniority score 0-100 for anchor election (NX0_EGO), announced to peers."""
    caps: Capabilities = field(default_factory=Capabilities)
    """Capabilities announced to peers (relay, storage, anchor-eligible, bandwidth class)."""
    tags: tuple[tuple[str, str], ...] = ()
    """Small key/value tags announced to peers (at most 8; 256 bytes in all)."""
    group_hosts: tuple[str, ...] = (DEFAULT_GROUP_V6,)
    """Multicast groups beacons are sent to. The node driver sends to DEFAULT_GROUP_V4 on its own
    on interfaces without IPv6; an IPv4 group listed here takes its place."""
    group_port: int = DEFAULT_PORT
    """UDP port of the multicast groups (NX0_PORT)."""
    adaptive: bool = True
    """Trickle-adaptive announcements. False: a fixed pulse every `imax`, never suppressed."""
    imin: float = 0.1
    """Shortest announcement interval (Trickle Imin), seconds."""
    imax: float = 5.0
    """Longest Trickle interval, seconds: the steady pulse of a small mesh."""
    k: int = 3
    """Trickle redundancy constant: an interval in which k consistent beacons were heard stays
    silent. Also sets the liveness promise: ``imax * (peers + 1) / k``."""
    max_announce_interval: float = 300.0
    """Cap on the liveness interval a node promises in a dense mesh, seconds."""
    max_peer_interval: float = 3600.0
    """Cap on the interval we believe a peer's promise for (limits how long it stays listed)."""
    expiry_multiplier: float = 3.0
    """A peer expires after this many of its announced intervals without a beacon."""
    skew: float = 120.0
    """Accepted difference between a frame's timestamp and our wall clock, seconds."""
    reset_holdoff: float = 5.0
    """Minimum time between two Trickle resets caused by neighbours (a join storm bound)."""
    solicit_on_start: bool = True
    """Send a SOLICIT at `start`, so neighbours answer at once instead of at their next pulse."""
    solicit_retry: float = 2.5
    """First repeat of the start SOLICIT, seconds after `start` (then 5 s later, and 10 s after
    that if still needed), listing the peers already heard so only the others answer; 0 disables
    the repeats."""
    introduce: bool = True
    """Answer the first multicast beacon of an unknown peer with a unicast beacon, as if it had
    solicited (repairs an introduction lost on a lossy link)."""
    solicit_reply_jitter: float = 0.2
    """Answers to a SOLICIT are spread uniformly over this many seconds."""
    solicit_interval: float = 2.0
    """Per-source limit: at most one SOLICIT answered per CellID and per address per interval."""
    solicit_rate: float = 200.0
    """Global budget: SOLICITs answered per second, all sources together."""
    solicit_burst: float = 400.0
    """Global budget burst."""
    reply_reuse: float = 1.0
    """How long one signed answer to SOLICITs may be re-sent to further solicitors, seconds."""
    beacon_source_rate: float = 20.0
    """Frames per second one source address may make us verify (before the signature check)."""
    beacon_source_burst: float = 40.0
    """Burst of the per-address budget."""
    max_peers: int = 4096
    """Peer table size; a full table evicts the peer heard least recently."""

    def __post_init__(self) -> None:
        Mesh(self.mesh_name, self.mesh_key)  # name and key checks
        for cell in self.allowlist or ():
            if not isinstance(cell, bytes) or len(cell) != CELL_ID_LEN:
                raise ValueError("allowlist entries must be 16-byte CellIDs")
        for key in self.authority_keys:
            if not isinstance(key, bytes) or len(key) != ED25519_PUBLIC_KEY_LEN:
                raise ValueError("authority keys must be 32-byte Ed25519 public keys")
        if self.membership_cert is not None and self.membership_cert.mesh_name != self.mesh_name:
            raise ValueError("the membership certificate is for another mesh")
        try:
            validate_text(self.name, "name", MAX_NAME)
            validate_text(self.node_type, "node_type", MAX_TYPE)
            validate_text(self.zone, "zone", MAX_ZONE)
            if len(self.tags) > MAX_TAGS:
                raise ValueError(f"at most {MAX_TAGS} tags")
            encode_tags(self.tags)
        except DecodeError as exc:
            raise ValueError(str(exc)) from None
        if not 0 <= self.ego <= 255:
            raise ValueError("ego must be 0..255")
        if not self.group_hosts:
            raise ValueError("at least one multicast group is needed")
        for host in self.group_hosts:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"group {host!r} is not an IP address") from None
            if not ip.is_multicast:
                raise ValueError(f"group {host!r} is not a multicast address")
        if not 1 <= self.group_port <= 65535:
            raise ValueError("group_port must be 1..65535")
        for name in (
            "imin",
            "imax",
            "max_announce_interval",
            "max_peer_interval",
            "skew",
            "solicit_interval",
            "solicit_rate",
            "beacon_source_rate",
        ):
            _positive(name, getattr(self, name))
        if self.imin > self.imax:
            raise ValueError("imin must be <= imax")
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if self.expiry_multiplier < 1 or not math.isfinite(self.expiry_multiplier):
            raise ValueError("expiry_multiplier must be >= 1")
        if min(self.reset_holdoff, self.solicit_reply_jitter, self.reply_reuse) < 0:
            raise ValueError("reset_holdoff, solicit_reply_jitter and reply_reuse must be >= 0")
        if not (self.solicit_retry >= 0 and math.isfinite(self.solicit_retry)):
            raise ValueError("solicit_retry must be >= 0 (0 disables it)")
        if self.solicit_burst < 1 or self.beacon_source_burst < 1:
            raise ValueError("bursts must be >= 1")
        if self.max_peers < 1:
            raise ValueError("max_peers must be >= 1")

    @property
    def mesh(self) -> Mesh:
        """The `Mesh` (name, key, tag, MAC key) these settings describe."""
        return Mesh(self.mesh_name, self.mesh_key)

    @property
    def groups(self) -> tuple[Addr, ...]:
        """The (host, port) addresses every multicast frame is sent to."""
        return tuple((h, self.group_port) for h in self.group_hosts)
