"""Build throwaway multi-host networks from Linux network namespaces, for tests and benchmarks.

Theory of operation. Each *host* is a network namespace with a loopback and one veth interface
(`eth0`) whose other end is enslaved to a bridge living in its own *switch* namespace, so nothing
touches the machine's real interfaces and all traffic stays inside namespaces this process created.
Duplicate address detection is switched off before interfaces come up, so IPv6 link-local addresses
are usable at once. IPv4, when wanted, uses the RFC 2544 benchmarking range 198.18.0.0/15.
Everything is torn down on `close()` (also on garbage collection and at interpreter exit), and
namespace names carry a per-run prefix so parallel runs never collide.

Needs root and iproute2's `ip`. `require_netns()` says exactly what is missing.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be used here; the message says why."""


def require_netns() -> None:
    """Raise `NetnsUnavailable` with the reason if namespaces cannot be built."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network-namespace tests need root (run as root, as CI does)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` is missing (make test installs it with apt-get)")
    probe = f"cmprobe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` failed: {r.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)


def _ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


@dataclass
class Host:
    """One namespace on the network."""

    name: str
    netns: str
    ifname: str = "eth0"
    ipv4: str | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def link_local(self) -> str:
        """The IPv6 link-local address of eth0 (without the zone)."""
        out = _ip("-n", self.netns, "-6", "addr", "show", "dev", self.ifname, "scope", "link")
        m = re.search(r"inet6 (fe80::[0-9a-f:]+)/64", out)
        if m is None:
            raise RuntimeError(f"{self.name} has no link-local address yet")
        return m.group(1)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run to completion inside the namespace."""
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            self.exec_argv(argv), capture_output=True, text=True, check=False, **kw
        )

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start a process inside the namespace (killed on topology close)."""
        p: subprocess.Popen[bytes] = subprocess.Popen(self.exec_argv(argv), **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p


class Topology:
    """A set of hosts on bridges. Use as a context manager."""

    def __init__(self) -> None:
        require_netns()
        self.prefix = f"cm{secrets.token_hex(3)}"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._switches: dict[str, str] = {}
        self._extra_ifaces: dict[str, list[str]] = {}
        self._closed = False
        atexit.register(self.close)

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _netns(self, label: str) -> str:
        name = f"{self.prefix}-{label}"
        _ip("netns", "add", name)
        self._namespaces.append(name)
        for key in ("all", "default"):
            subprocess.run(
                ["ip", "netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0"],
                capture_output=True,
                check=False,
            )
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def switch(self, label: str = "lan") -> str:
        """A bridge (created on first use) that hosts can be attached to."""
        if label not in self._switches:
            ns = self._netns(f"sw-{label}")
            _ip("-n", ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", ns, "link", "set", "br0", "up")
            self._switches[label] = ns
        return self._switches[label]

    def add_host(self, name: str, lan: str = "lan", ipv4: str | None = None) -> Host:
        """A new namespace with eth0 attached to the bridge `lan`."""
        sw = self.switch(lan)
        ns = self._netns(name)
        port = f"p{len(self.hosts)}"
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", sw)
        _ip("-n", sw, "link", "set", port, "master", "br0")
        _ip("-n", sw, "link", "set", port, "up")
        _ip("-n", ns, "link", "set", "eth0", "up")
        if ipv4 is not None:
            _ip("-n", ns, "addr", "add", ipv4, "dev", "eth0")
        host = Host(name, ns, ipv4=ipv4.split("/")[0] if ipv4 else None)
        self.hosts[name] = host
        return host

    def attach(self, host: Host, lan: str, ipv4: str | None = None) -> str:
        """Give `host` one more interface (eth1, eth2, ...) on the bridge `lan`; returns its name."""
        sw = self.switch(lan)
        n = 1 + sum(1 for _ in self._extra_ifaces.get(host.name, []))
        ifname = f"eth{n}"
        port = f"p{len(self.hosts)}x{n}"
        _ip("link", "add", ifname, "netns", host.netns, "type", "veth", "peer", "name", port,
            "netns", sw)  # fmt: skip
        _ip("-n", sw, "link", "set", port, "master", "br0")
        _ip("-n", sw, "link", "set", port, "up")
        _ip("-n", host.netns, "link", "set", ifname, "up")
        if ipv4 is not None:
            _ip("-n", host.netns, "addr", "add", ipv4, "dev", ifname)
        self._extra_ifaces.setdefault(host.name, []).append(ifname)
        return ifname

    def add_nat_router(
        self, name: str, inside_lan: str, inside_ipv4: str, outside_lan: str, outside_ipv4: str
    ) -> Host:
        """A host that forwards between two LANs and masquerades the inside behind its outside
        address with nftables (a home router's NAT: one public address, ports rewritten, and
        nothing unsolicited accepted from outside for the router itself)."""
        if shutil.which("nft") is None:
            raise NetnsUnavailable(
                "nftables' `nft` is missing (make test installs it with apt-get)"
            )
        router = self.add_host(name, inside_lan, inside_ipv4)
        self.attach(router, outside_lan, outside_ipv4)
        router_run = router.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        if router_run.returncode != 0:
            raise RuntimeError(f"cannot enable forwarding: {router_run.stderr.strip()}")
        # Masquerade plus the stateful firewall every home router has: nothing unsolicited from
        # the outside reaches the router itself. (Without it, a stray packet to the router's
        # own port leaves a conntrack entry that makes the NAT pick another port later.)
        rules = (
            "table ip nat {\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            '    oifname "eth1" masquerade\n'
            "  }\n"
            "}\n"
            "table inet firewall {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            '    iifname "eth1" ct state established,related accept\n'
            '    iifname "eth1" drop\n'
            "  }\n"
            "}\n"
        )
        r = subprocess.run(
            router.exec_argv(["nft", "-f", "-"]), input=rules, capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"nft: {r.stderr.strip()}")
        return router

    def default_route(self, host: Host, via: str) -> None:
        """Send everything `host` does not reach directly through `via` (its router)."""
        _ip("-n", host.netns, "route", "add", "default", "via", via)

    def close(self) -> None:
        """Kill processes started in the hosts and delete every namespace."""
        if self._closed:
            return
        self._closed = True
        for h in self.hosts.values():
            for p in h.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
