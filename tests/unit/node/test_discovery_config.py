"""From config to discovery: beacon capabilities, beacon tags, mesh authorities and membership
certificates, as `discovery_settings_from` builds them from a home's config.toml.

The admission test drives real `DiscoveryCore`s built from those settings over an ideal simulated
link (embedded nodes on loopback cannot multicast), so what it shows is what a running node does
with the same config: certificate holders are admitted, everyone else is refused.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from cellmesh.cli.main import cli
from cellmesh.config import (
    MAX_BEACON_TAG_BYTES,
    MAX_BEACON_TAG_KEY,
    MAX_BEACON_TAG_VALUE,
    MAX_BEACON_TAGS,
    NodeConfig,
    load_config,
    parse_beacon_tags,
)
from cellmesh.discovery import DEFAULT_GROUP_V6, DiscoveryCore, DiscoverySettings
from cellmesh.discovery.beacon import (
    MAX_TAG_BYTES,
    MAX_TAG_KEY,
    MAX_TAG_VALUE,
    MAX_TAGS,
    encode_tags,
)
from cellmesh.discovery.mesh import MembershipCert, issue_membership_cert, push_cert
from cellmesh.errors import ConfigError
from cellmesh.identity.cellid import format_cell_id
from cellmesh.identity.keys import Identity
from cellmesh.node.home import NodeHome
from cellmesh.node.membership import decode_cert_file, encode_cert_file
from cellmesh.node.node import discovery_settings_from

WALL0 = 1_800_000_000.0
FAR_MS = int((WALL0 + 365 * 86400) * 1000)
Addr = tuple[str, int]


def ident(i: int) -> Identity:
    return Identity.from_secret(bytes([i, 7]) * 32)


def write_cert(path: Path, cert: MembershipCert) -> None:
    path.write_text(encode_cert_file(cert))


# --- capabilities and tags ---------------------------------------------------------------------


def test_default_node_announces_that_it_relays_and_may_be_anchor() -> None:
    caps = discovery_settings_from(NodeConfig()).caps
    assert (caps.relay, caps.storage, caps.anchor_eligible, caps.bandwidth_class) == (
        True,
        False,
        True,
        0,
    )


@pytest.mark.parametrize(
    ("relay", "routing"), [(False, True), (True, False), (False, False)], ids=str
)
def test_a_node_that_cannot_relay_says_so(relay: bool, routing: bool) -> None:
    assert not discovery_settings_from(NodeConfig(relay=relay, routing=routing)).caps.relay


def test_storage_bandwidth_and_tags_come_from_config() -> None:
    cfg = load_config(
        'announce_storage = true\nbandwidth_class = 9\nbeacon_tags = ["rack=r12", "site="]\n'
        "anchor = false\n",
        {},
    )
    s = discovery_settings_from(cfg)
    assert (s.caps.storage, s.caps.bandwidth_class, s.caps.anchor_eligible) == (True, 9, False)
    assert s.tags == (("rack", "r12"), ("site", ""))


def test_beacon_tags_stay_apart_from_channel_capabilities() -> None:
    cfg = NodeConfig(capabilities=("gpu=a100", "storage"), beacon_tags=("gpu=a100",))
    s = discovery_settings_from(cfg)
    assert s.tags == (("gpu", "a100"),)
    assert not s.caps.storage  # a channel-layer "storage" advert does not set the beacon bit
    assert cfg.capabilities == ("gpu=a100", "storage")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("bandwidth_class = 16", "bandwidth_class must be between 0 and 15, got 16"),
        ("bandwidth_class = -1", "bandwidth_class must be between 0 and 15"),
        ('beacon_tags = ["rack"]', "entry 'rack' must be KEY=VALUE"),
        ('beacon_tags = ["=x"]', "entry '=x': the key must be 1 to 16 bytes"),
        ('beacon_tags = ["a-very-long-tag-key=1"]', "the key must be 1 to 16 bytes"),
        (f'beacon_tags = ["a={"v" * 65}"]', "the value is over 64 bytes"),
        ('beacon_tags = ["a=1", "a=2"]', "entry 'a=2' repeats the key 'a'"),
        ('beacon_tags = ["a=\\u001b[31m"]', "contains a control character"),
        ("beacon_tags = [" + ", ".join(f'"k{i}=v"' for i in range(9)) + "]", "9 tags, at most 8"),
        (
            "beacon_tags = [" + ", ".join(f'"k{i}={"v" * 60}"' for i in range(5)) + "]",
            "brings the tags to 310 bytes, the limit is 256",
        ),
        ("ego = 101", "ego must be between 0 and 100, got 101"),
        ('mesh_authorities = ["abcd"]', "mesh_authorities entry 'abcd' is not a 64-hex-character"),
        (f'mesh_authorities = ["{"g" * 64}"]', "is not a 64-hex-character Ed25519 public key"),
        ('membership_cert = "  "', "membership_cert must be a file name"),
    ],
)
def test_bad_discovery_settings_are_config_errors(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^config.toml: .*" + re.escape(message)):
        load_config(toml, {})


def test_config_tag_limits_are_the_codecs() -> None:
    # config.py restates them (the transport layer must not import discovery): keep them equal.
    assert (MAX_BEACON_TAGS, MAX_BEACON_TAG_KEY, MAX_BEACON_TAG_VALUE, MAX_BEACON_TAG_BYTES) == (
        MAX_TAGS,
        MAX_TAG_KEY,
        MAX_TAG_VALUE,
        MAX_TAG_BYTES,
    )
    # The largest tag set config accepts is one the codec encodes.
    biggest = tuple(f"k{i}{'x' * 14}={'v' * 16}" for i in range(MAX_TAGS))
    assert len(parse_beacon_tags(biggest)) == MAX_TAGS
    encode_tags(parse_beacon_tags(biggest))
    with pytest.raises(ValueError, match="the limit is 256"):
        parse_beacon_tags((*biggest[:-1], biggest[-1] + "v"))


def test_flags_and_env_set_the_new_fields(tmp_path: Path) -> None:
    key = ident(1).public_key.hex()
    env = {"CELLMESH_BEACON_TAGS": "rack=r1,row=4", "CELLMESH_MESH_AUTHORITIES": key}
    cfg = load_config(None, env, {"bandwidth_class": "3", "announce_storage": True})
    assert cfg.beacon_tags == ("rack=r1", "row=4")
    assert cfg.mesh_authorities == (key,)
    assert (cfg.bandwidth_class, cfg.announce_storage) == (3, True)
    assert discovery_settings_from(cfg).authority_keys == frozenset({ident(1).public_key})


# --- membership certificates -------------------------------------------------------------------


def test_membership_cert_is_read_relative_to_the_home(tmp_path: Path) -> None:
    home = NodeHome(tmp_path / "h")
    home.ensure()
    authority, me = ident(1), ident(2)
    cert = issue_membership_cert(authority, me.cell_id, "rig", FAR_MS)
    write_cert(home.path / "me.cert", cert)
    home.config_path.write_text(
        f'mesh_name = "rig"\nmembership_cert = "me.cert"\n'
        f'mesh_authorities = ["{authority.public_key.hex()}"]\n'
    )
    cfg = home.load_config({})
    assert cfg.membership_cert == str(home.path / "me.cert")
    s = discovery_settings_from(cfg, me.cell_id, wall=WALL0)
    assert s.membership_cert == cert
    assert s.authority_keys == frozenset({authority.public_key})


def _cert_error(tmp_path: Path, content: str | bytes | None, **kw: object) -> str:
    path = tmp_path / "x.cert"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    args: dict[str, object] = {"mesh_name": "rig", "membership_cert": str(path)}
    args.update(kw)
    cfg = NodeConfig(**args)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        discovery_settings_from(cfg, ident(2).cell_id, wall=WALL0)
    return str(info.value)


def test_membership_cert_errors_say_what_is_wrong(tmp_path: Path) -> None:
    good = issue_membership_cert(ident(1), ident(2).cell_id, "rig", FAR_MS)
    assert "cannot read: No such file or directory" in _cert_error(tmp_path, None)
    assert "no certificate in the file" in _cert_error(tmp_path, "# only a comment\n")
    assert "expected one line of hex" in _cert_error(tmp_path, "not hex at all\n")
    assert "not text" in _cert_error(tmp_path, b"\xff\xfe")
    assert "not a valid certificate: membership certificate truncated" in _cert_error(
        tmp_path, push_cert(good).hex()[:100]
    )
    assert "bytes of junk after the certificate" in _cert_error(
        tmp_path, push_cert(good).hex() + "00"
    )
    other = issue_membership_cert(ident(1), ident(3).cell_id, "rig", FAR_MS)
    msg = _cert_error(tmp_path, encode_cert_file(other))
    assert f"issued for {format_cell_id(ident(3).cell_id)}, not for this node" in msg
    wrong_mesh = issue_membership_cert(ident(1), ident(2).cell_id, "lab", FAR_MS)
    assert "issued for mesh 'lab', but mesh_name is 'rig'" in _cert_error(
        tmp_path, encode_cert_file(wrong_mesh)
    )
    expired = issue_membership_cert(ident(1), ident(2).cell_id, "rig", int(WALL0 * 1000) - 1)
    assert "expired at 2027-01-15T07:59:59Z" in _cert_error(tmp_path, encode_cert_file(expired))
    forged = MembershipCert(
        good.cell_id, good.mesh_name, FAR_MS + 1, good.authority_key, good.signature
    )
    assert "certificate signature did not verify" in _cert_error(tmp_path, encode_cert_file(forged))


def test_cli_issues_and_shows_a_certificate(tmp_path: Path) -> None:
    runner = CliRunner()
    auth_home = tmp_path / "auth"
    r = runner.invoke(cli, ["--home", str(auth_home), "id", "new"])
    assert r.exit_code == 0, r.output
    auth = NodeHome(auth_home).load_identity(None)
    (auth_home / "config.toml").write_text('mesh_name = "rig"\n')
    member = ident(2)
    out = tmp_path / "m.cert"
    # By public key: the certificate names the key's CellID.
    r = runner.invoke(
        cli,
        ["--home", str(auth_home), "mesh", "cert", "issue", "--subject",
         member.public_key.hex(), "--out", str(out), "--valid-for", "30d"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    cert = decode_cert_file(out.read_text(), str(out))
    assert (cert.cell_id, cert.mesh_name, cert.authority_key) == (
        member.cell_id,
        "rig",
        auth.public_key,
    )
    # The file is what the member's node accepts as its membership_cert.
    cfg = NodeConfig(mesh_name="rig", membership_cert=str(out))
    assert discovery_settings_from(cfg, member.cell_id).membership_cert == cert
    # An existing file is not overwritten by accident.
    args = ["--home", str(auth_home), "mesh", "cert", "issue", "--out", str(out)]
    r = runner.invoke(cli, [*args, "--subject", format_cell_id(member.cell_id)])
    assert r.exit_code == 1
    assert "exists (use --force" in r.output
    r = runner.invoke(cli, ["mesh", "cert", "show", "--json", str(out)])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["subject"] == format_cell_id(member.cell_id)
    assert shown["mesh_name"] == "rig"
    assert shown["authority_key"] == auth.public_key.hex()
    assert shown["expired"] is False
    r = runner.invoke(cli, ["mesh", "cert", "show", str(tmp_path / "missing")])
    assert r.exit_code == 1
    assert "cannot read" in r.output
    r = runner.invoke(cli, ["--home", str(auth_home), "mesh", "cert", "issue", "--subject", "zz"])
    assert r.exit_code == 1
    assert "not a CellID (32 hex) or public key (64 hex)" in r.output


def test_node_refuses_to_start_with_a_certificate_for_another_node(tmp_path: Path) -> None:
    runner = CliRunner()
    home = tmp_path / "n"
    assert runner.invoke(cli, ["--home", str(home), "id", "new"]).exit_code == 0
    cert = issue_membership_cert(ident(1), ident(9).cell_id, "cellmesh", FAR_MS)
    write_cert(home / "n.cert", cert)
    r = runner.invoke(
        cli, ["--home", str(home), "node", "--listen", "[::]:0", "--membership-cert", "n.cert"]
    )
    assert r.exit_code == 1
    assert f"membership_cert {home / 'n.cert'}: issued for {format_cell_id(ident(9).cell_id)}" in (
        r.output
    )


# --- admission through settings built from config ----------------------------------------------


class Lan:
    """An ideal link for `DiscoveryCore`s: multicast reaches every other core, in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.cores: dict[Addr, DiscoveryCore] = {}

    def wall(self) -> float:
        return WALL0 + self.now

    def add(self, i: int, identity: Identity, settings: DiscoverySettings) -> DiscoveryCore:
        addr = (f"198.18.0.{i}", 19541)
        core = DiscoveryCore(identity, settings, self.now, self.wall, random.Random(i))
        self.cores[addr] = core
        core.start(self.now)
        return core

    def _flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for src, core in list(self.cores.items()):
                for data, dst in core.datagrams_to_send():
                    moved = True
                    multicast = dst[0] == DEFAULT_GROUP_V6
                    for a, other in self.cores.items():
                        if a != src and (multicast or a == dst):
                            other.receive_datagram(data, src, self.now)
                while core.next_event() is not None:
                    pass

    def run(self, until: float) -> None:
        self._flush()
        timer: Callable[[DiscoveryCore], float] = lambda c: c.get_timer() or float("inf")  # noqa: E731
        while (core := min(self.cores.values(), key=timer)).get_timer() is not None:
            t = timer(core)
            if t > until:
                break
            self.now = max(self.now, t)
            core.handle_timer(self.now)
            self._flush()


def _home_config(tmp_path: Path, name: str, toml: str) -> NodeConfig:
    home = NodeHome(tmp_path / name)
    home.ensure()
    home.config_path.write_text(toml)
    return home.load_config({})


def test_certificate_holders_are_admitted_and_others_are_not(tmp_path: Path) -> None:
    authority, rogue = ident(1), ident(66)
    holder, outsider, forger = ident(2), ident(3), ident(4)
    trust = f'mesh_name = "rig"\nmesh_authorities = ["{authority.public_key.hex()}"]\n'
    configs: dict[str, tuple[Identity, NodeConfig]] = {}
    for name, who, signer in (
        ("authority", authority, authority),  # the authority certifies itself like any member
        ("holder", holder, authority),
        ("outsider", outsider, None),
        ("forger", forger, rogue),  # a certificate from an authority nobody trusts
    ):
        toml = trust
        if signer is not None:
            (tmp_path / name).mkdir()
            cert = issue_membership_cert(signer, who.cell_id, "rig", FAR_MS)
            write_cert(tmp_path / name / "member.cert", cert)
            toml += 'membership_cert = "member.cert"\n'
        configs[name] = (who, _home_config(tmp_path, name, toml))
    lan = Lan()
    cores = {
        name: lan.add(i, who, discovery_settings_from(cfg, who.cell_id, wall=WALL0))
        for i, (name, (who, cfg)) in enumerate(configs.items(), 1)
    }
    lan.run(30.0)

    def known(name: str) -> set[bytes]:
        return {p.cell_id for p in cores[name].peers()}

    assert known("authority") == {holder.cell_id}
    assert known("holder") == {authority.cell_id}
    # The refused nodes still admit the certified ones: admission is each node's own decision.
    assert known("outsider") == {authority.cell_id, holder.cell_id}
    drops = cores["authority"].statistics().drops
    assert drops["no_cert"] >= 1  # the outsider
    assert drops["cert_authority"] >= 1  # the forger


def test_without_authorities_a_certificate_is_carried_but_not_required(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    a, b = ident(1), ident(2)
    write_cert(tmp_path / "a" / "c", issue_membership_cert(a, a.cell_id, "cellmesh", FAR_MS))
    cfg_a = _home_config(tmp_path, "a", 'membership_cert = "c"\n')
    lan = Lan()
    core_a = lan.add(1, a, discovery_settings_from(cfg_a, a.cell_id, wall=WALL0))
    core_b = lan.add(2, b, discovery_settings_from(NodeConfig(), b.cell_id, wall=WALL0))
    lan.run(10.0)
    assert [p.cell_id for p in core_a.peers()] == [b.cell_id]
    (peer,) = core_b.peers()
    assert peer.cell_id == a.cell_id
    assert peer.cert is not None
