"""cellmesh.anchor: Deterministic Anchor Truth, sans-IO.

One member of a mesh, chosen by a deterministic rule rather than a vote, holds the *anchor* role:
it pulses every 5 s and makes a fresh epoch key every 60 s, delivered to each member sealed to
that member's X25519 key and signed. Pulses carry a MAC under the epoch key and a signature.
Joining members ask with a signed REQ_EPOCH and get the key in one round trip; a silent anchor is
replaced after 3 missed pulses. Start with `AnchorCore` (theory of operation in
`cellmesh.anchor.core`), its `AnchorSettings`, the rule in `cellmesh.anchor.rule`, the message
layouts in `cellmesh.anchor.messages`, and docs/anchor.md.
"""

from cellmesh.anchor.core import AnchorCore, Outgoing
from cellmesh.anchor.events import (
    AnchorChanged,
    AnchorEvent,
    AnchorFailed,
    AnchorStats,
    EpochKeyInstalled,
    Role,
)
from cellmesh.anchor.messages import (
    AnchorMessage,
    AnchorMsgType,
    EpochGrant,
    EpochRequest,
    Pulse,
    decode_message,
    encode_message,
    is_anchor_message,
)
from cellmesh.anchor.rule import (
    Member,
    cap_ego,
    claim_outranks,
    election_order,
    election_top,
    seniority_level,
    tiebreak,
)
from cellmesh.anchor.settings import AnchorSettings

__all__ = [
    "AnchorChanged",
    "AnchorCore",
    "AnchorEvent",
    "AnchorFailed",
    "AnchorMessage",
    "AnchorMsgType",
    "AnchorSettings",
    "AnchorStats",
    "EpochGrant",
    "EpochKeyInstalled",
    "EpochRequest",
    "Member",
    "Outgoing",
    "Pulse",
    "Role",
    "cap_ego",
    "claim_outranks",
    "decode_message",
    "election_order",
    "election_top",
    "encode_message",
    "is_anchor_message",
    "seniority_level",
    "tiebreak",
]
