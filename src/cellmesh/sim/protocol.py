"""The interface the simulator drives: the aioquic-shaped sans-IO core.

Every cellmesh protocol core (the transport `Endpoint` today; discovery, anchor and routing cores
later) exposes the same five methods, so `SimNetwork` can drive any of them, exactly as the asyncio
driver in `cellmesh.node` does, but in virtual time. The parameters are positional-only here so a
core may name its own parameters however it likes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cellmesh.wire.header import Datagram

Addr = tuple[str, int]
"""A network address as the cores see it: (host, port)."""


class SansIOCore(Protocol):
    """What the simulator needs from a protocol core (the aioquic shape, DESIGN.md).

    The driver feeds datagrams and timer expiries in, then collects what the core wants sent,
    the events it reports and the one absolute deadline at which it wants `handle_timer` called.
    """

    def receive_datagram(self, data: bytes, addr: Addr, now: float, /) -> None:
        """Feed one datagram that arrived from `addr` at virtual time `now`."""

    def datagrams_to_send(self) -> Sequence[tuple[Datagram, Addr]]:
        """Take every datagram the core wants sent, each with its destination."""
        ...

    def get_timer(self) -> float | None:
        """The absolute time at which `handle_timer` must next be called, or None."""

    def handle_timer(self, now: float, /) -> None:
        """Do whatever is due at `now`."""

    def next_event(self) -> object | None:
        """The next event the core reports, or None when there is none."""
