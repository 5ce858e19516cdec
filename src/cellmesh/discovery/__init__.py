"""cellmesh.discovery: zero-configuration neighbour discovery on a link.

Nodes announce themselves with signed BEACON frames sent to a link-local multicast group
(``ff02::1`` UDP 19541 by default), paced by Trickle (RFC 6206) so a dense mesh stays quiet, and
ask for immediate announcements with a SOLICIT when they arrive. Admission: a mesh name, an
optional mesh key (every frame MACed), an optional allowlist and optional membership
certificates. Start with `DiscoveryCore` (theory of operation in `cellmesh.discovery.core`), its
`DiscoverySettings`, and docs/discovery.md.
"""

from cellmesh.discovery.beacon import (
    MAX_FRAME,
    Beacon,
    BeaconFields,
    Capabilities,
    Solicit,
    is_discovery_frame,
    pull_beacon,
    pull_solicit,
    push_beacon,
    push_solicit,
)
from cellmesh.discovery.core import DiscoveryCore
from cellmesh.discovery.events import (
    DiscoveryEvent,
    DiscoveryStats,
    PeerDiscovered,
    PeerExpired,
    PeerUpdated,
)
from cellmesh.discovery.mesh import (
    AdmissionError,
    MembershipCert,
    Mesh,
    issue_membership_cert,
    pull_cert,
    push_cert,
    verify_cert,
)
from cellmesh.discovery.settings import (
    DEFAULT_GROUP_V4,
    DEFAULT_GROUP_V6,
    DEFAULT_PORT,
    NX0_ALIASES,
    DiscoverySettings,
    nx0_aliases,
)
from cellmesh.discovery.table import PeerRecord, PeerState, PeerTable
from cellmesh.discovery.trickle import Trickle
from cellmesh.discovery.verifier import CachedVerifier

__all__ = [
    "DEFAULT_GROUP_V4",
    "DEFAULT_GROUP_V6",
    "DEFAULT_PORT",
    "MAX_FRAME",
    "NX0_ALIASES",
    "AdmissionError",
    "Beacon",
    "BeaconFields",
    "CachedVerifier",
    "Capabilities",
    "DiscoveryCore",
    "DiscoveryEvent",
    "DiscoverySettings",
    "DiscoveryStats",
    "MembershipCert",
    "Mesh",
    "PeerDiscovered",
    "PeerExpired",
    "PeerRecord",
    "PeerState",
    "PeerTable",
    "PeerUpdated",
    "Solicit",
    "Trickle",
    "is_discovery_frame",
    "issue_membership_cert",
    "nx0_aliases",
    "pull_beacon",
    "pull_cert",
    "pull_solicit",
    "push_beacon",
    "push_cert",
    "push_solicit",
    "verify_cert",
]
