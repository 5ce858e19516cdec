"""Helpers that put real transport `Endpoint` cores into a `SimNetwork`, reproducibly.

An `Endpoint` takes two sources of randomness: `rng` (a `random.Random` for retransmission jitter)
and `random_bytes` (session indices, ping ids, cookie secrets; `os.urandom` by default). For a run
to be reproducible from its seed, both must be seeded here. Noise ephemeral keys still come from the
OS CSPRNG inside `cryptography`, which changes ciphertext bytes but never sizes or timing, so the
delivery trace (`SimNetwork.trace_digest`) stays reproducible. Identities made by
`Identity.generate()` differ between runs (and so do CellIDs); use `sim_identity` for runs that
must be bit-for-bit identical.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable

from cellmesh.config import NodeConfig
from cellmesh.identity.keys import IDENTITY_SECRET_LEN, Identity
from cellmesh.sim.network import DEFAULT_SEGMENT, SimNetwork, SimNode
from cellmesh.sim.protocol import Addr
from cellmesh.transport.endpoint import Endpoint

__all__ = ["SIM_CONFIG", "add_endpoint", "sim_identity", "sim_random_bytes"]

SIM_CONFIG = NodeConfig(listen=("0.0.0.0:19541",), name="sim")
"""The default config of simulated endpoints: protocol defaults, so the sim shows real behaviour."""


def sim_random_bytes(rng: random.Random) -> Callable[[int], bytes]:
    """A `random_bytes(n)` function drawing from the seeded `rng`.

    FOR SIMULATION ONLY: these bytes are predictable by anyone who knows the seed. A real node
    must use the OS CSPRNG (`os.urandom`, the `Endpoint` default) for session indices, ping ids
    and cookie secrets, which an attacker must not be able to guess.
    """
    return rng.randbytes


def sim_identity(network: SimNetwork | int, label: str) -> Identity:
    """A deterministic identity derived from a network (or seed) and `label`.

    FOR SIMULATION ONLY: the secret key follows from the seed, so it is public knowledge.
    """
    seed = network.seed if isinstance(network, SimNetwork) else network
    secret = hashlib.blake2b(
        f"{seed}|{label}".encode(), digest_size=IDENTITY_SECRET_LEN, person=b"cellmesh-simid"
    ).digest()
    return Identity.from_secret(secret)


def add_endpoint(
    network: SimNetwork,
    config: NodeConfig | None = None,
    identity: Identity | None = None,
    *,
    addr: Addr | None = None,
    name: str | None = None,
    segments: Iterable[str] = (DEFAULT_SEGMENT,),
    on_event: Callable[[SimNode[Endpoint], object], None] | None = None,
    record_events: bool = True,
) -> SimNode[Endpoint]:
    """Create an `Endpoint` (seeded randomness, `SIM_CONFIG` by default) and attach it.

    The endpoint's `rng` and `random_bytes` are derived from the network seed and the node's
    index, so a script that adds nodes in the same order gets the same streams. `identity`
    defaults to `Identity.generate()` (OS randomness); pass `sim_identity(network, label)` when
    CellIDs must be the same from run to run.
    """
    index = len(network.nodes)
    rng = random.Random(network.derive_seed(f"endpoint/{index}/rng"))
    byte_rng = random.Random(network.derive_seed(f"endpoint/{index}/bytes"))
    ep = Endpoint(
        identity if identity is not None else Identity.generate(),
        config if config is not None else SIM_CONFIG,
        network.now,
        rng,
        sim_random_bytes(byte_rng),  # simulation only: real nodes use os.urandom
    )
    return network.add_node(
        ep, addr, name=name, segments=segments, on_event=on_event, record_events=record_events
    )
