"""cellmesh.sim: a deterministic discrete-event network simulator for the sans-IO cores.

It drives the real protocol cores (today the transport `Endpoint`) in virtual time, with seeded
latency, jitter, bandwidth queues, loss, duplication, reordering, MTU limits, partitions and
broadcast segments. No sockets, no asyncio, no wall clock. Start with `SimNetwork` (the theory of
operation is in `cellmesh.sim.network`) and `add_endpoint`.
"""

from cellmesh.sim.endpoints import SIM_CONFIG, add_endpoint, sim_identity, sim_random_bytes
from cellmesh.sim.links import LinkModel, is_multicast
from cellmesh.sim.network import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_MAX_EVENTS_PER_INSTANT,
    DEFAULT_SEGMENT,
    SIM_PORT,
    EventLimitError,
    NetworkStats,
    NodeRef,
    NodeStats,
    SimEvent,
    SimNetwork,
    SimNode,
    SimulationError,
)
from cellmesh.sim.protocol import Addr, SansIOCore
from cellmesh.sim.scripted import Received, ScriptedCore, TimerFired

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_MAX_EVENTS_PER_INSTANT",
    "DEFAULT_SEGMENT",
    "SIM_CONFIG",
    "SIM_PORT",
    "Addr",
    "EventLimitError",
    "LinkModel",
    "NetworkStats",
    "NodeRef",
    "NodeStats",
    "Received",
    "SansIOCore",
    "ScriptedCore",
    "SimEvent",
    "SimNetwork",
    "SimNode",
    "SimulationError",
    "TimerFired",
    "add_endpoint",
    "is_multicast",
    "sim_identity",
    "sim_random_bytes",
]
