"""Tests for cellmesh.config."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellmesh.config import (
    ConfigField,
    NodeConfig,
    config_fields,
    env_var_name,
    load_config,
    parse_host_port,
    render_default_config,
)
from cellmesh.errors import ConfigError

EXPECTED_DEFAULTS: dict[str, object] = {
    "listen": ("[::]:19541",),
    "peers": (),
    "name": "",
    "log_level": "info",
    "log_format": "text",
    "handshake_timeout": 5.0,
    "handshake_retries": 4,
    "rekey_after_seconds": 120.0,
    "rekey_after_packets": 2**48,
    "reject_after_seconds": 180.0,
    "keepalive_interval": 10.0,
    "idle_timeout": 60.0,
    "replay_window": 4096,
    "max_sessions": 4096,
    "max_pending_handshakes": 1024,
    "handshake_rate": 1000.0,
    "max_datagram": 65507,
    "recv_buffer": 4 * 1024 * 1024,
    "congestion_control": "bbr",
    "stream_window": 4 * 1024 * 1024,
    "connection_window": 16 * 1024 * 1024,
    "send_buffer": 4 * 1024 * 1024,
    "stream_window_max": 16 * 1024 * 1024,
    "connection_window_max": 64 * 1024 * 1024,
    "send_buffer_max": 16 * 1024 * 1024,
    "max_streams": 1024,
    "tune_malloc": True,
    "discovery": True,
    "mesh_name": "cellmesh",
    "mesh_key": "",
    "allowlist": (),
    "denylist": (),
    "mesh_authorities": (),
    "membership_cert": "",
    "node_type": "",
    "zone": "",
    "ego": 0,
    "discovery_port": 19541,
    "discovery_groups": ("ff02::1",),
    "announce_storage": False,
    "bandwidth_class": 0,
    "beacon_tags": (),
    "anchor": True,
    "anchor_pulse_interval": 5.0,
    "anchor_epoch_seconds": 60.0,
    "failure_threshold": 8.0,
    "peer_packet_rate": 100000.0,
    "peer_packet_burst": 10000.0,
    "global_packet_rate": 0.0,
    "routing": True,
    "route_update_interval": 30.0,
    "relay": True,
    "relay_rate": 20000.0,
    "relay_burst": 2000.0,
    "policy_file": "",
    "channels": (),
    "trusted_roots": (),
    "capabilities": (),
    "threat_list": "",
    "blob_dir": "blobs",
    "serve_blobs": True,
    "database": "cellmesh.db",
    "sync_interval": 30.0,
}


def test_defaults() -> None:
    assert dataclasses.asdict(NodeConfig()) == EXPECTED_DEFAULTS
    assert load_config(None, {}) == NodeConfig()
    assert load_config("", {}) == NodeConfig()


def test_config_is_frozen() -> None:
    cfg = NodeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]


def test_config_fields_describe_every_field() -> None:
    fields = config_fields()
    assert [f.name for f in fields] == list(EXPECTED_DEFAULTS)
    for f in fields:
        assert isinstance(f, ConfigField)
        assert f.default == EXPECTED_DEFAULTS[f.name]
        assert f.doc
        assert "\n" not in f.doc
        assert f.type_name in {"tuple[str, ...]", "str", "int", "float", "bool"}
        assert f.env_var == "CELLMESH_" + f.name.upper() == env_var_name(f.name)
    by_name = {f.name: f for f in fields}
    assert by_name["listen"].type_name == "tuple[str, ...]"
    assert by_name["handshake_retries"].type_name == "int"
    assert by_name["handshake_timeout"].type_name == "float"


def test_render_default_config_is_commented_and_complete() -> None:
    text = render_default_config()
    assert tomllib.loads(text) == {}
    for f in config_fields():
        assert f"# {f.doc}" in text
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)
    assert tomllib.loads(uncommented) == EXPECTED_DEFAULTS | {
        "listen": ["[::]:19541"],
        "peers": [],
        "allowlist": [],
        "denylist": [],
        "mesh_authorities": [],
        "discovery_groups": ["ff02::1"],
        "beacon_tags": [],
        "channels": [],
        "trusted_roots": [],
        "capabilities": [],
    }
    assert load_config(uncommented, {}) == NodeConfig()


def test_toml_values() -> None:
    cfg = load_config(
        """
        listen = ["0.0.0.0:1000", "[::1]:1001"]
        peers = ["peer.example:19541"]
        name = "alpha"
        log_level = "DEBUG"
        handshake_timeout = 3          # int accepted for a float field
        handshake_retries = 2
        replay_window = 8192
        """,
        {},
    )
    assert cfg.listen == ("0.0.0.0:1000", "[::1]:1001")
    assert cfg.listen_addresses == (("0.0.0.0", 1000), ("::1", 1001))
    assert cfg.peers == ("peer.example:19541",)
    assert cfg.peer_addresses == (("peer.example", 19541),)
    assert cfg.name == "alpha"
    assert cfg.log_level == "debug"
    assert cfg.handshake_timeout == 3.0
    assert isinstance(cfg.handshake_timeout, float)
    assert cfg.handshake_retries == 2
    assert cfg.replay_window == 8192


def test_precedence_defaults_toml_env_overrides() -> None:
    toml = 'name = "toml"\nhandshake_retries = 1\nmax_sessions = 10\nidle_timeout = 30.0\n'
    env = {"CELLMESH_NAME": "env", "CELLMESH_HANDSHAKE_RETRIES": "2", "UNRELATED": "x"}
    overrides: dict[str, object] = {"name": "cli", "max_sessions": None}
    cfg = load_config(toml, env, overrides)
    assert cfg.name == "cli"  # override beats env and TOML
    assert cfg.handshake_retries == 2  # env beats TOML
    assert cfg.max_sessions == 10  # None override is skipped
    assert cfg.idle_timeout == 30.0  # TOML beats default
    assert cfg.log_level == "info"  # default


def test_env_parsing() -> None:
    cfg = load_config(
        None,
        {
            "CELLMESH_LISTEN": " 0.0.0.0:1 , [::]:2,",
            "CELLMESH_PEERS": "",
            "CELLMESH_HANDSHAKE_TIMEOUT": "2.5",
            "CELLMESH_REKEY_AFTER_PACKETS": "1_000_000",
            "CELLMESH_LOG_FORMAT": "json",
            "CELLMESH_HOME": "/somewhere",  # not a setting: ignored
            "CELLMESH_PASSPHRASE": "secret",  # not a setting: ignored
        },
    )
    assert cfg.listen == ("0.0.0.0:1", "[::]:2")
    assert cfg.peers == ()
    assert cfg.handshake_timeout == 2.5
    assert cfg.rekey_after_packets == 1_000_000
    assert cfg.log_format == "json"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("CELLMESH_HANDSHAKE_RETRIES", "four", "CELLMESH_HANDSHAKE_RETRIES: handshake_retries must be an integer, got 'four'"),
        ("CELLMESH_HANDSHAKE_RETRIES", "4.0", "must be an integer, got '4.0'"),
        ("CELLMESH_HANDSHAKE_TIMEOUT", "", "CELLMESH_HANDSHAKE_TIMEOUT: handshake_timeout must be a number, got ''"),
        ("CELLMESH_HANDSHAKE_TIMEOUT", "\uff15", "must be a number"),
        ("CELLMESH_HANDSHAKE_TIMEOUT", "-1", "CELLMESH_HANDSHAKE_TIMEOUT: handshake_timeout must be a positive"),
        ("CELLMESH_HANDSHAKE_TIMEOUT", "nan", "CELLMESH_HANDSHAKE_TIMEOUT: handshake_timeout must be a positive"),
        ("CELLMESH_LOG_LEVEL", "loud", "CELLMESH_LOG_LEVEL: log_level must be one of debug, info"),
        ("CELLMESH_PEERS", "::1", "CELLMESH_PEERS: peers: invalid address '::1': put IPv6"),
    ],
)  # fmt: skip
def test_env_errors_name_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {var: value})
    assert str(info.value).startswith(message) or message in str(info.value)
    assert str(info.value).startswith(var)


def test_override_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--handshake-retries: handshake_retries must be"):
        load_config(None, {}, {"handshake_retries": "x"})
    with pytest.raises(ConfigError, match=r"^--max-sessions: max_sessions must be at least 1"):
        load_config(None, {}, {"max_sessions": 0})
    with pytest.raises(ConfigError, match=r"^--listen: listen must be an array of strings"):
        load_config(None, {}, {"listen": 5})


def test_overrides_accept_typed_and_text_values() -> None:
    cfg = load_config(None, {}, {"listen": ["127.0.0.1:0"], "handshake_timeout": "1.5"})
    assert cfg.listen == ("127.0.0.1:0",)
    assert cfg.handshake_timeout == 1.5


def test_unknown_override() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'nmae' \(did you mean 'name'\?\)"):
        load_config(None, {}, {"nmae": "x"})


def test_unknown_key_with_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_config('lissten = ["[::]:1"]', {})
    assert str(info.value) == "config.toml: unknown key 'lissten' (did you mean 'listen'?)"


def test_unknown_key_without_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("zzzzzz = 1", {}, source="/etc/cellmesh.toml")
    assert str(info.value) == "/etc/cellmesh.toml: unknown key 'zzzzzz'"


def test_unknown_table_is_unknown_key() -> None:
    with pytest.raises(ConfigError, match="unknown key 'node'"):
        load_config("[node]\nname = 'x'\n", {})


@pytest.mark.parametrize(
    ("text", "line", "col"),
    [
        ("name = \n", 1, 8),
        ('name = "x"\nlisten = [1,\n', 3, 1),
        ('name = "x"\n\nname = "y"\n', 3, 11),
        ("= 3", 1, 1),
        ('name = "unterminated', 1, 21),
    ],
)
def test_syntax_error_has_line_and_column(text: str, line: int, col: int) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text, {})
    message = str(info.value)
    assert message.startswith(f"config.toml:{line}:{col}: "), message
    assert "\n" not in message
    assert "(at line" not in message


def test_deeply_nested_toml() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config("listen = " + "[" * 5000 + "]" * 5000, {})


def test_huge_integer_toml() -> None:
    with pytest.raises(ConfigError, match="too large"):
        load_config("max_sessions = " + "9" * 5000, {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen = 5", "config.toml: listen must be an array of strings, got an integer"),
        ('listen = "[::]:1"', "config.toml: listen must be an array of strings, got a string"),
        ("listen = [1]", "config.toml: listen must be an array of strings, but item 1 is an integer"),
        ("name = 3", "config.toml: name must be a string, got an integer"),
        ("handshake_retries = 1.5", "config.toml: handshake_retries must be an integer, got a float"),
        ("handshake_retries = true", "config.toml: handshake_retries must be an integer, got a boolean"),
        ('handshake_timeout = "5"', "config.toml: handshake_timeout must be a number, got a string"),
        ("handshake_timeout = {a = 1}", "config.toml: handshake_timeout must be a number, got a table"),
        ("handshake_timeout = 1979-05-27", "config.toml: handshake_timeout must be a number, got a date"),
    ],
)  # fmt: skip
def test_type_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text, {})
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"listen": ()}, "listen must contain at least one HOST:PORT address"),
        ({"listen": ("::1",)}, "listen: invalid address '::1'"),
        ({"peers": ("host:0",)}, "port 0 is not a valid peer port"),
        ({"name": "x" * 65}, "name must be at most 64 characters, got 65"),
        ({"name": "a\nb"}, "name must not contain control characters"),
        ({"log_level": "verbose"}, "log_level must be one of debug, info, warning, error"),
        ({"log_format": "xml"}, "log_format must be one of text, json"),
        ({"handshake_timeout": 0.0}, "handshake_timeout must be a positive number of seconds"),
        ({"handshake_timeout": float("inf")}, "handshake_timeout must be a positive number"),
        ({"handshake_retries": -1}, "handshake_retries must be between 0 and 100, got -1"),
        ({"rekey_after_seconds": -5.0}, "rekey_after_seconds must be a positive number"),
        ({"rekey_after_packets": 0}, "rekey_after_packets must be between 1 and"),
        ({"reject_after_seconds": 120.0}, "reject_after_seconds (120.0) must exceed rekey_after_seconds (120.0)"),
        ({"keepalive_interval": 60.0}, "keepalive_interval (60.0) must be less than idle_timeout (60.0)"),
        ({"idle_timeout": 0.0}, "idle_timeout must be a positive number of seconds"),
        ({"replay_window": 1024}, "replay_window must be between 2048 and"),
        ({"replay_window": 2048 + 32}, "replay_window must be a multiple of 64, got 2080"),
        ({"max_sessions": 0}, "max_sessions must be at least 1, got 0"),
        ({"max_pending_handshakes": 0}, "max_pending_handshakes must be at least 1, got 0"),
        ({"handshake_rate": 0.0}, "handshake_rate must be a positive number of initiations per second"),
        ({"max_datagram": 65508}, "max_datagram must be between 1200 and 65507, got 65508"),
        ({"recv_buffer": 10}, "recv_buffer must be between 4096 and"),
        ({"congestion_control": "cubic"}, "congestion_control must be one of bbr, reno"),
        ({"stream_window": 10}, "stream_window must be between 65536 and"),
        (
            {"connection_window": 1 << 19, "stream_window": 1 << 20},
            "connection_window (524288) must be at least stream_window (1048576)",
        ),
        (
            {"stream_window": 1 << 25, "connection_window": 1 << 26},
            "stream_window_max (16777216) must be at least stream_window (33554432)",
        ),
        (
            {"connection_window_max": 1 << 20},
            "connection_window_max (1048576) must be at least connection_window (16777216)",
        ),
        (
            {"send_buffer_max": 1 << 20},
            "send_buffer_max (1048576) must be at least send_buffer (4194304)",
        ),
        (
            {"stream_window_max": 1 << 27},
            "connection_window_max (67108864) must be at least stream_window_max (134217728)",
        ),
        ({"send_buffer_max": 10}, "send_buffer_max must be between 65536 and"),
        ({"max_streams": 0}, "max_streams must be between 1 and 65536"),
        ({"failure_threshold": 0.0}, "failure_threshold must be a positive number"),
        ({"anchor_pulse_interval": 0.1}, "anchor_pulse_interval must be between 0.5 and 60 seconds, got 0.1"),
        ({"anchor_pulse_interval": float("nan")}, "anchor_pulse_interval must be between 0.5 and 60"),
        ({"anchor_epoch_seconds": 4.0}, "anchor_epoch_seconds must be between 5 and 86400 seconds, got 4.0"),
        ({"anchor_epoch_seconds": float("inf")}, "anchor_epoch_seconds must be between 5 and 86400"),
        (
            {"anchor_epoch_seconds": 30.0, "anchor_pulse_interval": 20.0},
            "anchor_epoch_seconds (30.0) must be at least twice anchor_pulse_interval (20.0)",
        ),
    ],
)  # fmt: skip
def test_validation(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig(**changes)
    assert message in str(info.value)
    # The same problem through load_config names where the value came from.
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, changes)
    assert message in str(info.value)
    assert str(info.value).startswith("--" + next(iter(changes)).replace("_", "-") + ": ")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"listen": "[::]:1"}, "listen must be an array of strings, got a string"),
        ({"listen": ("[::]:1", 2)}, "listen must be an array of strings, but item 2 is an integer"),
        ({"name": None}, "name must be a string, got None"),
        ({"max_sessions": 1.0}, "max_sessions must be an integer, got a float"),
        ({"max_sessions": True}, "max_sessions must be an integer, got a boolean"),
        ({"handshake_rate": "fast"}, "handshake_rate must be a number, got a string"),
    ],
)
def test_constructor_type_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig(**changes)
    assert str(info.value) == message


def test_validation_coerces_lists_and_ints() -> None:
    cfg = NodeConfig(listen=["1.2.3.4:5"], handshake_timeout=2)  # type: ignore[arg-type]
    assert cfg.listen == ("1.2.3.4:5",)
    assert isinstance(cfg.handshake_timeout, float)
    assert hash(cfg) == hash(NodeConfig(listen=("1.2.3.4:5",), handshake_timeout=2.0))


def test_cross_field_error_names_the_source_that_set_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("rekey_after_seconds = 500.0", {})
    assert str(info.value) == (
        "config.toml: reject_after_seconds (180.0) must exceed rekey_after_seconds (500.0)"
    )


def test_cross_field_error_from_env() -> None:
    with pytest.raises(ConfigError, match=r"^CELLMESH_KEEPALIVE_INTERVAL: "):
        load_config(None, {"CELLMESH_KEEPALIVE_INTERVAL": "100"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4:5", ("1.2.3.4", 5)),
        ("[::1]:5", ("::1", 5)),
        ("host:5", ("host", 5)),
        ("node-1.example.org:65535", ("node-1.example.org", 65535)),
        ("[::]:19541", ("::", 19541)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
        ("1.2.3.4", ("1.2.3.4", 19541)),
        ("host", ("host", 19541)),
        ("[::1]", ("::1", 19541)),
        ("  10.0.0.1:80  ", ("10.0.0.1", 80)),
    ],
)
def test_parse_host_port_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("::1", "put IPv6 addresses in brackets, e.g. [::1]:19541"),
        ("::", "put IPv6 addresses in brackets, e.g. [::]:19541"),
        ("", "address is empty; expected HOST:PORT"),
        ("host:", "missing port after ':'"),
        (":5", "missing host"),
        ("host:65536", "port 65536 is out of range 0-65535"),
        ("host:-1", "port must be a number 0-65535"),
        ("host:http", "port must be a number 0-65535"),
        ("host:\uff11", "port must be a number 0-65535"),
        ("host:999999", "port must be a number 0-65535"),
        ("[::1:5", "missing ']'"),
        ("[::1]5", "expected ':PORT' after ']'"),
        ("[1.2.3.4]:5", "in brackets is not an IPv6 address"),
        ("1.2.3.256:5", "is not an IPv4 address"),
        ("bad_host:5", "is not a valid host name or IP address"),
        ("-host:5", "is not a valid host name or IP address"),
        ("a..b:5", "is not a valid host name or IP address"),
    ],
)
def test_parse_host_port_rejects(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_host_port(text)
    assert message in str(info.value)


def test_parse_host_port_default_port() -> None:
    assert parse_host_port("host", default_port=7) == ("host", 7)
    with pytest.raises(ConfigError, match=r"put IPv6 addresses in brackets, e.g. \[::1\]:7"):
        parse_host_port("::1", default_port=7)


@given(st.text(max_size=200))
def test_arbitrary_toml_text_gives_config_or_config_error(text: str) -> None:
    try:
        cfg = load_config(text, {})
    except ConfigError as exc:
        message = str(exc)
    else:
        assert isinstance(cfg, NodeConfig)
        return
    assert "\n" not in message


_NAMES = [f.name for f in config_fields()]


@given(st.dictionaries(st.sampled_from(_NAMES), st.text(max_size=30), max_size=4))
def test_arbitrary_env_gives_config_or_config_error(values: dict[str, str]) -> None:
    env = {env_var_name(k): v for k, v in values.items()}
    try:
        cfg = load_config(None, env)
    except ConfigError:
        return
    assert isinstance(cfg, NodeConfig)


@given(st.sampled_from(_NAMES), st.text(max_size=30))
def test_arbitrary_toml_value_gives_config_or_config_error(name: str, value: str) -> None:
    try:
        cfg = load_config(f"{name} = {value}", {})
    except ConfigError:
        return
    assert isinstance(cfg, NodeConfig)


def test_nx0_variables_are_aliases_and_cellmesh_ones_win() -> None:
    env = {
        "NX0_NAME": "Alpha",
        "NX0_TYPE": "Rig-Hub",
        "NX0_ZONE": "Medical",
        "NX0_EGO": "42",
        "NX0_PORT": "19600",
    }
    cfg = load_config(None, env)
    assert (cfg.name, cfg.node_type, cfg.zone, cfg.ego, cfg.discovery_port) == (
        "Alpha",
        "Rig-Hub",
        "Medical",
        42,
        19600,
    )
    cfg = load_config(None, env | {"CELLMESH_NAME": "Bravo"})
    assert cfg.name == "Bravo"
    with pytest.raises(ConfigError, match="NX0_EGO"):
        load_config(None, {"NX0_EGO": "500"})


def test_mesh_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="mesh_key"):
        NodeConfig(mesh_key="abc")
    with pytest.raises(ConfigError, match="allowlist"):
        NodeConfig(allowlist=("nothex",))
    with pytest.raises(ConfigError, match="multicast"):
        NodeConfig(discovery_groups=("10.0.0.1",))
    assert NodeConfig(mesh_key="11" * 16).mesh_key == "11" * 16
    assert "mesh_key" not in repr(NodeConfig(mesh_key="11" * 16))


@pytest.mark.parametrize("value", ["0.1", "-1", "nan", "inf", "100000"])
def test_sync_interval_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"sync_interval must be 0 or between 0\.5 and 86400"):
        load_config(f"sync_interval = {value}", {})


@pytest.mark.parametrize("value", [0, 0.5, 30, 86400])
def test_sync_interval_in_range_is_accepted(value: float) -> None:
    assert load_config(f"sync_interval = {value}", {}).sync_interval == value
