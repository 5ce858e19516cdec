"""cellmesh.routing: CellID routing, sans-IO.

A loop-free distance-vector protocol in the spirit of Babel (RFC 8966): each node originates a
route to its own CellID with a sequence number; neighbours exchange UPDATE messages over their
encrypted sessions; routes are selected by an additive ETX-weighted RTT metric under the
feasibility condition, so no transient loop ever forms; a node left without a feasible route
asks the origin for a newer sequence number (SEQNO_REQUEST). Start with `RoutingCore` (theory of
operation in `cellmesh.routing.core`), its `RoutingSettings`, the metric in
`cellmesh.routing.metric`, the message layouts in `cellmesh.routing.messages`, and
docs/routing.md. `GatewayCache` is the bounded CellID -> gateway cache fed by handshakes.
"""

from cellmesh.routing.core import Outgoing, RoutingCore
from cellmesh.routing.events import (
    NeighbourInfo,
    RouteChanged,
    RouteInfo,
    RoutingEvent,
    RoutingStats,
)
from cellmesh.routing.gateway import GatewayCache, GatewayEntry, GatewayStats
from cellmesh.routing.messages import (
    MessageType,
    RouteRecord,
    RoutingMessage,
    SeqnoRequest,
    SeqnoRequestRecord,
    Update,
    decode_message,
    encode_message,
)
from cellmesh.routing.metric import (
    INFINITY,
    add_metric,
    feasible,
    link_cost,
    seqno_newer,
)
from cellmesh.routing.settings import RoutingSettings

__all__ = [
    "INFINITY",
    "GatewayCache",
    "GatewayEntry",
    "GatewayStats",
    "MessageType",
    "NeighbourInfo",
    "Outgoing",
    "RouteChanged",
    "RouteInfo",
    "RouteRecord",
    "RoutingCore",
    "RoutingEvent",
    "RoutingMessage",
    "RoutingSettings",
    "RoutingStats",
    "SeqnoRequest",
    "SeqnoRequestRecord",
    "Update",
    "add_metric",
    "decode_message",
    "encode_message",
    "feasible",
    "link_cost",
    "seqno_newer",
]
