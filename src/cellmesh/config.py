"""Node configuration: the `NodeConfig` record, its validation, and pure loading.

Settings come from four layers, later ones winning::

    defaults  <  config.toml  <  CELLMESH_<FIELD> environment variables  <  CLI overrides

`load_config` takes the TOML *text* and the environment mapping, so it is pure: reading the
file is the caller's job (`cellmesh.node.home.NodeHome.load_config`). Every problem raises
`ConfigError` with a one-line message naming where the bad value came from (the TOML source,
the environment variable, or the CLI flag) and the setting.

Every `NodeConfig` field carries ``metadata={"doc": ...}``; `config_fields()` exposes them for
CLI ``--help`` and documentation, and `render_default_config()` writes a commented template.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cellmesh.errors import ConfigError
from cellmesh.filter.channels import parse_channel_spec

__all__ = [
    "DEFAULT_PORT",
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "ConfigField",
    "NodeConfig",
    "config_fields",
    "env_var_name",
    "load_config",
    "parse_beacon_tags",
    "parse_host_port",
    "render_default_config",
]

DEFAULT_PORT: Final = 19541
"""UDP port cellmesh listens on and assumes for peers given without one."""

ENV_PREFIX: Final = "CELLMESH_"
"""Environment variables ``CELLMESH_<FIELD_UPPER>`` override config.toml."""

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")

MAX_NAME_LEN: Final = 64
_CAPABILITY_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
# The beacon codec's tag limits (cellmesh.discovery.beacon), restated because the transport
# layer imports this module and must not depend on discovery; a unit test keeps them equal.
MAX_BEACON_TAGS: Final = 8
MAX_BEACON_TAG_KEY: Final = 16
MAX_BEACON_TAG_VALUE: Final = 64
MAX_BEACON_TAG_BYTES: Final = 256
_CONTROL_CHAR: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MIN_REPLAY_WINDOW: Final = 2048
MAX_REPLAY_WINDOW: Final = 1 << 20
MAX_REKEY_AFTER_PACKETS: Final = 1 << 63
MIN_DATAGRAM: Final = 1200
MAX_DATAGRAM: Final = 65507
MIN_RECV_BUFFER: Final = 4096
NX0_ALIASES: Final = {
    "NX0_NAME": "name",
    "NX0_TYPE": "node_type",
    "NX0_ZONE": "zone",
    "NX0_EGO": "ego",
    "NX0_PORT": "discovery_port",
}
MIN_WINDOW: Final = 64 * 1024
MAX_WINDOW: Final = 1 << 30
CONGESTION_CONTROLLERS: Final = ("bbr", "reno")
MAX_RECV_BUFFER: Final = (1 << 31) - 1
MAX_LISTEN: Final = 64
MAX_PEERS: Final = 4096


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class NodeConfig:
    """Validated settings of one node. Construct directly, or via `load_config`.

    Construction validates every field and raises `ConfigError` naming the bad one. Lists
    given for tuple fields are turned into tuples, ints given for float fields into floats,
    and `log_level` / `log_format` are lower-cased.
    """

    listen: tuple[str, ...] = field(
        default=(f"[::]:{DEFAULT_PORT}",),
        metadata=_doc(
            "UDP addresses to listen on, as HOST:PORT (IPv6 in brackets; port 0 picks a free port)."
        ),
    )
    peers: tuple[str, ...] = field(
        default=(), metadata=_doc("Peers to contact at startup, as HOST:PORT (IPv6 in brackets).")
    )
    name: str = field(
        default="",
        metadata=_doc("Human-readable node name, shown by `status` (at most 64 characters)."),
    )
    log_level: str = field(
        default="info", metadata=_doc("Log verbosity: debug, info, warning or error.")
    )
    log_format: str = field(default="text", metadata=_doc("Log output format: text or json."))
    handshake_timeout: float = field(
        default=5.0,
        metadata=_doc("Seconds before a pending handshake gives up, across all retransmissions."),
    )
    handshake_retries: int = field(
        default=4,
        metadata=_doc("Times a handshake initiation is retransmitted before the attempt fails."),
    )
    rekey_after_seconds: float = field(
        default=120.0,
        metadata=_doc("Seconds after which a session handshakes again to replace its keys."),
    )
    rekey_after_packets: int = field(
        default=2**48, metadata=_doc("Packets sent under one key after which the session rekeys.")
    )
    reject_after_seconds: float = field(
        default=180.0,
        metadata=_doc(
            "Seconds after which a session key is refused outright (must exceed "
            "rekey_after_seconds)."
        ),
    )
    keepalive_interval: float = field(
        default=10.0,
        metadata=_doc("Seconds without sending after which a session sends a keepalive."),
    )
    idle_timeout: float = field(
        default=60.0, metadata=_doc("Seconds with nothing received after which a session closes.")
    )
    replay_window: int = field(
        default=4096,
        metadata=_doc("Anti-replay window size in packets (at least 2048, a multiple of 64)."),
    )
    max_sessions: int = field(
        default=4096, metadata=_doc("Maximum number of established sessions.")
    )
    max_pending_handshakes: int = field(
        default=1024, metadata=_doc("Maximum number of handshakes in progress at once.")
    )
    handshake_rate: float = field(
        default=1000.0,
        metadata=_doc("Handshake initiations per second processed before cookies are demanded."),
    )
    max_datagram: int = field(
        default=MAX_DATAGRAM,
        metadata=_doc(
            "Largest UDP datagram sent or accepted, in bytes (1200 to 65507); path MTU discovery probes up to it."
        ),
    )
    recv_buffer: int = field(
        default=4 * 1024 * 1024, metadata=_doc("UDP socket receive buffer (SO_RCVBUF) in bytes.")
    )
    congestion_control: str = field(
        default="bbr",
        metadata=_doc(
            "Congestion controller: bbr (model-based, tolerant of random loss) or reno (loss-based)."
        ),
    )
    stream_window: int = field(
        default=4 * 1024 * 1024,
        metadata=_doc("Bytes a peer may send on one stream ahead of what we have read."),
    )
    connection_window: int = field(
        default=16 * 1024 * 1024,
        metadata=_doc("Bytes a peer may send on all streams ahead of what we have read."),
    )
    send_buffer: int = field(
        default=4 * 1024 * 1024,
        metadata=_doc(
            "Unacknowledged bytes buffered per stream before writers wait (the starting size: "
            "it follows 2x the congestion window up to send_buffer_max)."
        ),
    )
    stream_window_max: int = field(
        default=16 * 1024 * 1024,
        metadata=_doc(
            "Largest stream_window auto-tuning may grow to, for a reader that keeps up with a "
            "fast sender (it doubles when window updates go out under 2 RTTs apart)."
        ),
    )
    connection_window_max: int = field(
        default=64 * 1024 * 1024,
        metadata=_doc(
            "Largest connection_window auto-tuning may grow to: the most one peer can make us "
            "buffer for a reader that stops reading."
        ),
    )
    send_buffer_max: int = field(
        default=16 * 1024 * 1024,
        metadata=_doc("Largest send buffer per stream, however large the congestion window."),
    )
    max_streams: int = field(
        default=1024, metadata=_doc("Streams open at once per peer, in each direction.")
    )
    tune_malloc: bool = field(
        default=True,
        metadata=_doc(
            "Fix glibc's malloc thresholds (mmap 4 MiB, trim 64 MiB) when the node starts: bulk "
            "transfer is up to ~1.5x faster; up to 64 MiB of freed memory may stay with the "
            "process. It changes the whole process: an application embedding a node may turn "
            "it off."
        ),
    )
    discovery: bool = field(
        default=True,
        metadata=_doc(
            "Find peers on the link with signed multicast beacons (only when listening on a "
            "wildcard address such as [::])."
        ),
    )
    mesh_name: str = field(
        default="cellmesh",
        metadata=_doc("Name of the mesh to join; nodes of other meshes are ignored."),
    )
    mesh_key: str = field(
        default="",
        repr=False,
        metadata=_doc(
            "Secret mesh key as hex (16-32 bytes), or empty for an open mesh; without it, "
            "beacons are ignored. Prefer CELLMESH_MESH_KEY to writing it in a file."
        ),
    )
    allowlist: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "CellIDs admitted to the mesh: discovery and handshakes (empty: anyone with the mesh key)."
        ),
    )
    denylist: tuple[str, ...] = field(
        default=(),
        metadata=_doc("CellIDs whose datagrams are dropped on arrival, before any cryptography."),
    )
    mesh_authorities: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Ed25519 public keys (64 hex) of mesh authorities: discovery admits a peer whose "
            "beacons carry a valid membership certificate signed by one of them (with allowlist "
            "too, either admits). Empty: certificates are not asked for."
        ),
    )
    membership_cert: str = field(
        default="",
        metadata=_doc(
            "This node's membership certificate (`cellmesh mesh cert issue`), a file relative to "
            "the home directory, carried in every beacon; it must be for this node's CellID and "
            "mesh_name, unexpired and validly signed. Empty: none."
        ),
    )
    node_type: str = field(default="", metadata=_doc("Node role announced in beacons (NX0_TYPE)."))
    zone: str = field(default="", metadata=_doc("Logical zone announced in beacons (NX0_ZONE)."))
    ego: int = field(
        default=0,
        metadata=_doc(
            "Seniority score 0-100 announced in beacons (NX0_EGO); the anchor election counts "
            "a peer's higher ego (the wire carries 0-255) as 100."
        ),
    )
    discovery_port: int = field(
        default=19541, metadata=_doc("UDP port of the discovery multicast group (NX0_PORT).")
    )
    discovery_groups: tuple[str, ...] = field(
        default=("ff02::1",),
        metadata=_doc(
            "Multicast groups for beacons. Interfaces without IPv6 fall back to IPv4 224.0.0.1 "
            "on their own; IPv4 groups listed here replace that group."
        ),
    )
    announce_storage: bool = field(
        default=False,
        metadata=_doc(
            "Announce the storage capability in beacons (a hint for peers choosing where to "
            "keep data; it does not turn the blob store on or off)."
        ),
    )
    bandwidth_class: int = field(
        default=0,
        metadata=_doc(
            "Bandwidth class 0-15 announced in beacons: a coarse log scale the operator chooses "
            "(0: not said)."
        ),
    )
    beacon_tags: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Key/value tags announced in beacons, as 'KEY=VALUE' (at most 8; KEY 1-16 bytes, "
            "VALUE at most 64, 256 bytes in all). Unlike capabilities, which are signed adverts "
            "exchanged with connected peers, these reach every node on the link."
        ),
    )
    anchor: bool = field(
        default=True,
        metadata=_doc(
            "Take part in the anchor election (docs/anchor.md): members are the peers discovery "
            "admits; one of them, chosen by a deterministic rule, pulses and hands out epoch keys "
            "sealed to each member. Runs only when discovery does."
        ),
    )
    anchor_pulse_interval: float = field(
        default=5.0,
        metadata=_doc(
            "Seconds between two pulses of the anchor (0.5 to 60); 3 missed pulses fail it over, "
            "and a starting node listens that long before it may claim the role."
        ),
    )
    anchor_epoch_seconds: float = field(
        default=60.0,
        metadata=_doc(
            "Seconds between two epoch keys made by the anchor (5 to 86400, and at least two "
            "pulse intervals)."
        ),
    )
    failure_threshold: float = field(
        default=8.0,
        metadata=_doc(
            "Phi-accrual suspicion level at which a silent peer is reported suspect (higher = slower)."
        ),
    )
    peer_packet_rate: float = field(
        default=100000.0,
        metadata=_doc(
            "Ring 0: packets per second accepted from one authenticated peer before decryption "
            "(0 = unlimited); the excess is dropped and counted as peer_rate. The default is above "
            "what one Python node receives, so it caps floods without slowing a legitimate peer; "
            "lower it on nodes with many peers to share the CPU fairly."
        ),
    )
    peer_packet_burst: float = field(
        default=10000.0,
        metadata=_doc("Ring 0: burst allowance (packets) of the per-peer bucket."),
    )
    global_packet_rate: float = field(
        default=0.0,
        metadata=_doc(
            "Ring 0: packets per second accepted from all peers together (0 = unlimited); "
            "the excess is dropped and counted as global_rate."
        ),
    )
    routing: bool = field(
        default=True,
        metadata=_doc(
            "Run the distance-vector routing protocol with direct neighbours, so peers that "
            "cannot be reached directly are reached through relays."
        ),
    )
    route_update_interval: float = field(
        default=30.0,
        metadata=_doc(
            "Seconds between full routing updates to neighbours (changes are sent at once); "
            "routes expire after 3.5 intervals without refresh."
        ),
    )
    relay: bool = field(
        default=True,
        metadata=_doc(
            "Relay frames between neighbours that cannot reach each other (never decrypting "
            "them); off: only this node's own traffic uses the mesh."
        ),
    )
    relay_rate: float = field(
        default=20000.0,
        metadata=_doc(
            "Frames per second this node relays for one neighbour (0 = unlimited); the excess "
            "is dropped and counted as relay_rate."
        ),
    )
    relay_burst: float = field(
        default=2000.0, metadata=_doc("Burst allowance (frames) of the per-neighbour relay budget.")
    )
    policy_file: str = field(
        default="",
        metadata=_doc(
            "Ring 1 policy file (docs/policy.md), relative to the home directory; reloaded when "
            "it changes, and a broken file keeps the policy in force. Empty: pass everything "
            "that the channel declarations and tokens allow."
        ),
    )
    channels: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Channels this node hosts, each 'PATTERN [open|token] [mesh|local]': token = peers "
            "need a permission token for the right they ask; local = invisible to peers."
        ),
    )
    trusted_roots: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Ed25519 public keys (64 hex) whose permission tokens this node honours, besides "
            "its own key, which is always trusted."
        ),
    )
    capabilities: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "Capabilities this node advertises to its peers, as 'NAME' or 'NAME=VALUE' "
            "(e.g. storage, gpu=a100); peers can find nodes by them."
        ),
    )
    threat_list: str = field(
        default="",
        metadata=_doc(
            "Ring 2: file of CellIDs (32 hex per line, # comments) whose channel traffic is "
            "dropped and who are then banned at ring 0; relative to the home directory."
        ),
    )
    blob_dir: str = field(
        default="blobs",
        metadata=_doc(
            "Directory of the content-addressed blob store (docs/blobs_sync.md), relative to "
            "the home directory; empty: no blob store (blobs are neither served nor fetched)."
        ),
    )
    serve_blobs: bool = field(
        default=True,
        metadata=_doc(
            "Serve the blocks of the blob store to peers that ask for them (BLOCK_WANT); off: "
            "every request is answered REFUSED. Fetching from peers works either way."
        ),
    )
    database: str = field(
        default="cellmesh.db",
        metadata=_doc(
            "SQLite file of the channel logs (docs/state.md), relative to the home directory; "
            "empty: no state layer (pub, sub and log are unavailable)."
        ),
    )
    sync_interval: float = field(
        default=30.0,
        metadata=_doc(
            "Seconds between anti-entropy syncs of each channel this node subscribes to with "
            "its host (jittered); a new subscription and a gap in a log sync at once anyway. "
            "0: only those (no periodic sync)."
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fixed = _coerce_python(f.name, _kind_of(f), value, label=None)
            if fixed is not value:
                object.__setattr__(self, f.name, fixed)
        for name in ("log_level", "log_format"):
            object.__setattr__(self, name, getattr(self, name).lower())
        for _fields, message in _problems({f.name: getattr(self, f.name) for f in _FIELDS}):
            raise ConfigError(message)

    @property
    def listen_addresses(self) -> tuple[tuple[str, int], ...]:
        """`listen` parsed into (host, port) pairs; IPv6 hosts without brackets."""
        return tuple(parse_host_port(a) for a in self.listen)

    @property
    def peer_addresses(self) -> tuple[tuple[str, int], ...]:
        """`peers` parsed into (host, port) pairs; IPv6 hosts without brackets."""
        return tuple(parse_host_port(a) for a in self.peers)


@dataclass(frozen=True, slots=True)
class ConfigField:
    """Description of one `NodeConfig` setting, for CLI help and documentation."""

    name: str
    type_name: str
    default: object
    doc: str

    @property
    def env_var(self) -> str:
        """The environment variable that sets this field."""
        return env_var_name(self.name)


def env_var_name(field_name: str) -> str:
    """Return the ``CELLMESH_*`` environment variable for a `NodeConfig` field."""
    return ENV_PREFIX + field_name.upper()


_FIELDS: Final = dataclasses.fields(NodeConfig)


def config_fields() -> list[ConfigField]:
    """Describe every `NodeConfig` field, in declaration order."""
    return [
        ConfigField(f.name, str(f.type), f.default, str(f.metadata["doc"]))
        for f in dataclasses.fields(NodeConfig)
    ]


# --- addresses -------------------------------------------------------------------------------

_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DOTTED_NUMERIC = re.compile(r"[0-9.]+")


def _check_hostname(text: str, host: str) -> None:
    if _DOTTED_NUMERIC.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(
                f"invalid address {text!r}: {host!r} is not an IPv4 address"
            ) from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOSTNAME_LABEL.fullmatch(lbl) for lbl in name.split(".")):
        raise ConfigError(
            f"invalid address {text!r}: {host!r} is not a valid host name or IP address"
        )


def _parse_port(text: str, port_text: str) -> int:
    if not port_text:
        raise ConfigError(f"invalid address {text!r}: missing port after ':'")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ConfigError(f"invalid address {text!r}: port must be a number 0-65535")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"invalid address {text!r}: port {port} is out of range 0-65535")
    return port


def parse_host_port(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Parse ``HOST:PORT`` into (host, port).

    Accepted: ``1.2.3.4:5``, ``host.example:5``, ``[::1]:5``, ``[::]:19541``, and a host without
    a port (``1.2.3.4``, ``host``, ``[::1]``), which gets `default_port`. IPv6 addresses must be
    in brackets; the returned host has no brackets. Ports 0-65535 are accepted (0 means "any
    free port" and only makes sense for listening). Raises `ConfigError` saying what is wrong.
    """
    if not isinstance(text, str):
        raise ConfigError(f"address must be a string, got {type(text).__name__}")
    if not 0 <= default_port <= 65535:
        raise ConfigError(f"default port {default_port} is out of range 0-65535")
    stripped = text.strip()
    if not stripped:
        raise ConfigError("address is empty; expected HOST:PORT")
    if stripped.startswith("["):
        end = stripped.find("]")
        if end < 0:
            raise ConfigError(f"invalid address {text!r}: missing ']' after IPv6 address")
        host = stripped[1:end]
        rest = stripped[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"invalid address {text!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ConfigError(f"invalid address {text!r}: expected ':PORT' after ']'")
        return host, _parse_port(text, rest[1:])
    colons = stripped.count(":")
    if colons > 1:
        raise ConfigError(
            f"invalid address {text!r}: put IPv6 addresses in brackets, "
            f"e.g. [{stripped}]:{default_port}"
        )
    if colons == 1:
        host, port_text = stripped.split(":")
        if not host:
            raise ConfigError(
                f"invalid address {text!r}: missing host (use 0.0.0.0{stripped} or [::]{stripped})"
            )
        _check_hostname(text, host)
        return host, _parse_port(text, port_text)
    _check_hostname(text, stripped)
    return stripped, default_port


# --- types and coercion ----------------------------------------------------------------------

_KINDS: Final = {
    "tuple[str, ...]": "tuple",
    "str": "str",
    "int": "int",
    "float": "float",
    "bool": "bool",
}
_EXPECTED: Final = {
    "tuple": "an array of strings",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
}


def _kind_of(f: dataclasses.Field[Any]) -> str:
    return _KINDS[str(f.type)]


def _type_name(value: object) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _coerce_python(name: str, kind: str, value: object, label: str | None) -> object:
    """Check/convert a typed value (from TOML, an override or a constructor) to `kind`."""
    where = f"{label}: " if label else ""

    def bad(extra: str = "") -> ConfigError:
        got = extra or f"got {_type_name(value)}"
        return ConfigError(f"{where}{name} must be {_EXPECTED[kind]}, {got}")

    if kind == "tuple":
        if not isinstance(value, list | tuple):
            raise bad()
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise bad(f"but item {i + 1} is {_type_name(item)}")
        return value if isinstance(value, tuple) else tuple(value)
    if kind == "str":
        if not isinstance(value, str):
            raise bad()
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if isinstance(value, bool):
        raise bad()
    if kind == "int":
        if not isinstance(value, int):
            raise bad()
        return value
    if isinstance(value, int):
        return float(value)
    if not isinstance(value, float):
        raise bad()
    return value


_TRUE: Final = frozenset(("1", "true", "yes", "on"))
_FALSE: Final = frozenset(("0", "false", "no", "off"))


def _parse_text(name: str, kind: str, text: str, label: str) -> object:
    """Parse a string (environment variable or CLI text) into a value of `kind`."""
    if kind == "tuple":
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if kind == "str":
        return text
    stripped = text.strip()
    shown = text if len(text) <= 40 else text[:40] + "..."
    try:
        if not stripped.isascii():
            raise ValueError
        if kind == "bool":
            if stripped.lower() in _TRUE:
                return True
            if stripped.lower() in _FALSE:
                return False
            raise ValueError
        if kind == "int":
            return int(stripped, 10)
        return float(stripped)
    except ValueError:
        raise ConfigError(f"{label}: {name} must be {_EXPECTED[kind]}, got {shown!r}") from None


# --- validation ------------------------------------------------------------------------------


def parse_beacon_tags(entries: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """`beacon_tags` entries ('KEY=VALUE') as the (key, value) pairs a beacon carries.

    Raises `ValueError` naming the first entry the beacon codec would refuse (no '=', a key of
    0 or more than 16 bytes, a value over 64 bytes, control characters, a repeated key, more
    than 8 tags or more than 256 bytes in all), so a bad tag stops the config, not discovery.
    """
    if len(entries) > MAX_BEACON_TAGS:
        raise ValueError(f"{len(entries)} tags, at most {MAX_BEACON_TAGS} are allowed")
    tags: dict[str, str] = {}
    total = 0
    for entry in entries:
        key, sep, value = entry.partition("=")
        shown = repr(entry[:40])
        if not sep:
            raise ValueError(f"entry {shown} must be KEY=VALUE")
        klen, vlen = len(key.encode()), len(value.encode())
        if not 1 <= klen <= MAX_BEACON_TAG_KEY:
            raise ValueError(f"entry {shown}: the key must be 1 to {MAX_BEACON_TAG_KEY} bytes")
        if vlen > MAX_BEACON_TAG_VALUE:
            raise ValueError(f"entry {shown}: the value is over {MAX_BEACON_TAG_VALUE} bytes")
        if _CONTROL_CHAR.search(entry):
            raise ValueError(f"entry {shown} contains a control character")
        if key in tags:
            raise ValueError(f"entry {shown} repeats the key {key!r}")
        tags[key] = value
        total += klen + vlen
        if total > MAX_BEACON_TAG_BYTES:
            raise ValueError(
                f"entry {shown} brings the tags to {total} bytes, the limit is "
                f"{MAX_BEACON_TAG_BYTES}"
            )
    return tuple(tags.items())


def _problems(v: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Yield (fields involved, message) for every invalid value of already-typed settings."""

    def positive(name: str, unit: str = "seconds") -> Iterator[tuple[tuple[str, ...], str]]:
        value: float = v[name]
        if not (math.isfinite(value) and value > 0):
            yield (name,), f"{name} must be a positive number of {unit}, got {value}"

    def int_range(
        name: str, lo: int, hi: int | None = None
    ) -> Iterator[tuple[tuple[str, ...], str]]:
        value: int = v[name]
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            yield (name,), f"{name} must be {bound}, got {value}"

    for name, limit in (("listen", MAX_LISTEN), ("peers", MAX_PEERS)):
        addresses: tuple[str, ...] = v[name]
        if len(addresses) > limit:
            yield (name,), f"{name} has {len(addresses)} entries; at most {limit} are allowed"
        for address in addresses:
            try:
                _, port = parse_host_port(address)
            except ConfigError as exc:
                yield (name,), f"{name}: {exc}"
                continue
            if name == "peers" and port == 0:
                yield (name,), f"peers: port 0 is not a valid peer port in {address!r}"
    if not v["listen"]:
        yield ("listen",), "listen must contain at least one HOST:PORT address"
    if len(v["name"]) > MAX_NAME_LEN:
        yield ("name",), f"name must be at most {MAX_NAME_LEN} characters, got {len(v['name'])}"
    if not v["name"].isprintable():
        yield ("name",), "name must not contain control characters"
    if v["log_level"] not in LOG_LEVELS:
        yield (
            ("log_level",),
            f"log_level must be one of {', '.join(LOG_LEVELS)}; got {v['log_level'][:40]!r}",
        )
    if v["log_format"] not in LOG_FORMATS:
        yield (
            ("log_format",),
            f"log_format must be one of {', '.join(LOG_FORMATS)}; got {v['log_format'][:40]!r}",
        )
    yield from positive("handshake_timeout")
    yield from int_range("handshake_retries", 0, 100)
    yield from positive("rekey_after_seconds")
    yield from int_range("rekey_after_packets", 1, MAX_REKEY_AFTER_PACKETS)
    yield from positive("reject_after_seconds")
    if v["reject_after_seconds"] <= v["rekey_after_seconds"]:
        yield (
            ("reject_after_seconds", "rekey_after_seconds"),
            (
                f"reject_after_seconds ({v['reject_after_seconds']}) must exceed "
                f"rekey_after_seconds ({v['rekey_after_seconds']})"
            ),
        )
    yield from positive("keepalive_interval")
    yield from positive("idle_timeout")
    if v["keepalive_interval"] >= v["idle_timeout"]:
        yield (
            ("keepalive_interval", "idle_timeout"),
            (
                f"keepalive_interval ({v['keepalive_interval']}) must be less than "
                f"idle_timeout ({v['idle_timeout']})"
            ),
        )
    yield from int_range("replay_window", MIN_REPLAY_WINDOW, MAX_REPLAY_WINDOW)
    if v["replay_window"] % 64:
        yield (
            ("replay_window",),
            f"replay_window must be a multiple of 64, got {v['replay_window']}",
        )
    yield from int_range("max_sessions", 1)
    yield from int_range("max_pending_handshakes", 1)
    yield from positive("handshake_rate", "initiations per second")
    yield from int_range("max_datagram", MIN_DATAGRAM, MAX_DATAGRAM)
    yield from int_range("recv_buffer", MIN_RECV_BUFFER, MAX_RECV_BUFFER)
    if v["congestion_control"] not in CONGESTION_CONTROLLERS:
        yield (
            ("congestion_control",),
            f"congestion_control must be one of {', '.join(CONGESTION_CONTROLLERS)}; "
            f"got {v['congestion_control'][:40]!r}",
        )
    yield from int_range("stream_window", MIN_WINDOW, MAX_WINDOW)
    yield from int_range("connection_window", MIN_WINDOW, MAX_WINDOW)
    if v["connection_window"] < v["stream_window"]:
        yield (
            ("connection_window", "stream_window"),
            f"connection_window ({v['connection_window']}) must be at least "
            f"stream_window ({v['stream_window']})",
        )
    yield from int_range("send_buffer", MIN_WINDOW, MAX_WINDOW)
    for name in ("stream_window_max", "connection_window_max", "send_buffer_max"):
        yield from int_range(name, MIN_WINDOW, MAX_WINDOW)
    for small, large in (
        ("stream_window", "stream_window_max"),
        ("connection_window", "connection_window_max"),
        ("send_buffer", "send_buffer_max"),
        ("stream_window_max", "connection_window_max"),
    ):
        if v[large] < v[small]:
            yield ((large, small), f"{large} ({v[large]}) must be at least {small} ({v[small]})")
    yield from int_range("max_streams", 1, 65536)
    yield from positive("failure_threshold", "phi")
    if v["mesh_key"]:
        try:
            key = bytes.fromhex(v["mesh_key"])
        except ValueError:
            key = b""
        if not 16 <= len(key) <= 32:
            yield (("mesh_key",), "mesh_key must be 32 to 64 hex characters (16 to 32 bytes)")
    if not 1 <= len(v["mesh_name"].encode()) <= 64:
        yield (("mesh_name",), "mesh_name must be 1 to 64 bytes")
    for list_name in ("allowlist", "denylist"):
        for cell in v[list_name]:
            if len(cell) != 32 or any(c not in "0123456789abcdefABCDEF" for c in cell):
                yield (
                    (list_name,),
                    f"{list_name} entry {cell[:40]!r} is not a 32-hex-character CellID",
                )
    # The beacon carries a u8, but the anchor election clamps egos to 0..100 (docs/anchor.md):
    # refusing more here keeps an operator from announcing a seniority that counts as 100.
    yield from int_range("ego", 0, 100)
    for key in v["mesh_authorities"]:
        if len(key) != 64 or any(c not in "0123456789abcdefABCDEF" for c in key):
            yield (
                ("mesh_authorities",),
                f"mesh_authorities entry {key[:40]!r} is not a 64-hex-character Ed25519 public key",
            )
    if v["membership_cert"] and not v["membership_cert"].strip():
        yield (("membership_cert",), "membership_cert must be a file name, or empty for none")
    yield from int_range("bandwidth_class", 0, 15)
    try:
        parse_beacon_tags(v["beacon_tags"])
    except ValueError as exc:
        yield (("beacon_tags",), f"beacon_tags: {exc}")
    if not (
        math.isfinite(v["route_update_interval"]) and 1.0 <= v["route_update_interval"] <= 3600
    ):
        yield (
            ("route_update_interval",),
            f"route_update_interval must be between 1 and 3600 seconds, got {v['route_update_interval']}",
        )
    if not (
        math.isfinite(v["sync_interval"])
        and (v["sync_interval"] == 0 or 0.5 <= v["sync_interval"] <= 86400)
    ):
        yield (
            ("sync_interval",),
            f"sync_interval must be 0 or between 0.5 and 86400 seconds, got {v['sync_interval']}",
        )
    for name in ("peer_packet_rate", "peer_packet_burst", "global_packet_rate", "relay_rate"):
        rate: float = v[name]
        if not (math.isfinite(rate) and rate >= 0):
            yield (name,), f"{name} must be a number >= 0, got {rate}"
    if v["peer_packet_rate"] and v["peer_packet_burst"] < 1:
        yield (("peer_packet_burst",), "peer_packet_burst must be at least 1 packet")
    if v["relay_rate"] and not (math.isfinite(v["relay_burst"]) and v["relay_burst"] >= 1):
        yield (("relay_burst",), "relay_burst must be at least 1 frame")
    for spec in v["channels"]:
        try:
            parse_channel_spec(spec)
        except ValueError as exc:
            yield (("channels",), f"channels: {exc}")
    for key in v["trusted_roots"]:
        if len(key) != 64 or any(c not in "0123456789abcdefABCDEF" for c in key):
            yield (
                ("trusted_roots",),
                f"trusted_roots entry {key[:40]!r} is not a 64-hex-character Ed25519 public key",
            )
    for cap in v["capabilities"]:
        name, _, value = cap.partition("=")
        if not _CAPABILITY_NAME.fullmatch(name) or len(value.encode()) > 64:
            yield (
                ("capabilities",),
                f"capabilities entry {cap[:40]!r} must be NAME or NAME=VALUE with NAME "
                "[a-z0-9][a-z0-9_.-]{0,31} and VALUE at most 64 bytes",
            )
    yield from int_range("discovery_port", 1, 65535)
    for g in v["discovery_groups"]:
        try:
            ip = ipaddress.ip_address(g)
        except ValueError:
            ip = None
        if ip is None or not ip.is_multicast:
            yield (
                ("discovery_groups",),
                f"discovery_groups entry {g[:40]!r} is not a multicast address",
            )
    pulse: float = v["anchor_pulse_interval"]
    epoch: float = v["anchor_epoch_seconds"]
    if not (math.isfinite(pulse) and 0.5 <= pulse <= 60):
        yield (
            ("anchor_pulse_interval",),
            f"anchor_pulse_interval must be between 0.5 and 60 seconds, got {pulse}",
        )
    if not (math.isfinite(epoch) and 5 <= epoch <= 86400):
        yield (
            ("anchor_epoch_seconds",),
            f"anchor_epoch_seconds must be between 5 and 86400 seconds, got {epoch}",
        )
    elif math.isfinite(pulse) and epoch < 2 * pulse:
        yield (
            ("anchor_epoch_seconds", "anchor_pulse_interval"),
            f"anchor_epoch_seconds ({epoch}) must be at least twice anchor_pulse_interval "
            f"({pulse}): an epoch spans at least two pulses",
        )


# --- loading ---------------------------------------------------------------------------------

_TOML_POS = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.S)
_TOML_END = re.compile(r"^(?P<msg>.*?)\s*\(at end of document\)$", re.S)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _parse_toml(toml_text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        if m := _TOML_POS.match(message):
            line, col = m["line"], m["col"]
            message = m["msg"]
        elif m := _TOML_END.match(message):
            line = str(toml_text.count("\n") + 1)
            col = str(len(toml_text) - toml_text.rfind("\n"))
            message = m["msg"]
        else:
            raise ConfigError(f"{source}: {_one_line(message)}") from None
        raise ConfigError(f"{source}:{line}:{col}: {_one_line(message)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: arrays or tables are nested too deeply") from None
    except ValueError:
        raise ConfigError(f"{source}: a value is too large to parse") from None


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(
    toml_text: str | None,
    env: Mapping[str, str],
    overrides: Mapping[str, object] | None = None,
    *,
    source: str = "config.toml",
) -> NodeConfig:
    """Build a `NodeConfig` from TOML text, environment variables and CLI overrides.

    Precedence: defaults < `toml_text` < ``CELLMESH_<FIELD_UPPER>`` in `env` < `overrides`.
    `toml_text` None means there is no config file. Tuple fields come from the environment as
    comma-separated lists (empty string = empty list). `overrides` maps field names to values;
    None values are skipped (an unset CLI flag), strings are parsed like environment values.
    `source` names the TOML text in messages. Raises `ConfigError`.
    """
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    names = list(fields)
    values: dict[str, object] = {}
    origin: dict[str, str] = {}

    if toml_text is not None:
        doc = _parse_toml(toml_text, source)
        for key, value in doc.items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key, names)}")
            values[key] = _coerce_python(key, _kind_of(fields[key]), value, label=source)
            origin[key] = source

    # NEXUS-0 compatibility: NX0_* variables stand in for the matching CELLMESH_* ones.
    for nx0, name in NX0_ALIASES.items():
        if nx0 in env and env_var_name(name) not in env:
            values[name] = _parse_text(name, _kind_of(fields[name]), env[nx0], label=nx0)
            origin[name] = nx0

    for name, f in fields.items():
        var = env_var_name(name)
        if var in env:
            values[name] = _parse_text(name, _kind_of(f), env[var], label=var)
            origin[name] = var

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r}{_suggest(key, names)}")
        kind = _kind_of(fields[key])
        if isinstance(value, str) and kind != "str":
            values[key] = _parse_text(key, kind, value, label=flag)
        else:
            values[key] = _coerce_python(key, kind, value, label=flag)
        origin[key] = flag

    # Validate once with provenance, so the message says where the bad value came from.
    merged: dict[str, Any] = {f.name: f.default for f in _FIELDS}
    merged.update(values)
    for key in ("log_level", "log_format"):
        merged[key] = merged[key].lower()
    for involved, message in _problems(merged):
        where = next((origin[f] for f in involved if f in origin), None)
        raise ConfigError(f"{where}: {message}" if where else message)
    return NodeConfig(**merged)


# --- template --------------------------------------------------------------------------------


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def render_default_config() -> str:
    """Return a commented config.toml template listing every setting at its default.

    Each setting is commented out, so the file as written changes nothing; uncomment a line to
    change it.
    """
    lines = [
        "# cellmesh node configuration.",
        "#",
        "# Every setting is shown commented out at its default value. Uncomment to change it.",
        f"# Environment variables {ENV_PREFIX}<SETTING_IN_UPPER_CASE> override this file,",
        "# and command-line flags override both.",
    ]
    for f in config_fields():
        lines.append("")
        lines.append(f"# {f.doc}")
        lines.append(f"# Type: {f.type_name}. Environment: {f.env_var}.")
        lines.append(f"# {f.name} = {_toml_value(f.default)}")
    return "\n".join(lines) + "\n"
