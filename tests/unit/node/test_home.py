"""Tests for cellmesh.node.home."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import nacl.pwhash.argon2id as argon2id
import pytest

from cellmesh.config import NodeConfig
from cellmesh.errors import ConfigError, KeystoreError
from cellmesh.identity.keys import Identity
from cellmesh.node.home import NodeHome

FAST = {"opslimit": argon2id.OPSLIMIT_INTERACTIVE, "memlimit": argon2id.MEMLIMIT_INTERACTIVE}


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    return NodeHome(tmp_path / "home")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- resolve and paths -----------------------------------------------------------------------


def test_resolve_priority(tmp_path: Path) -> None:
    env = {"CELLMESH_HOME": str(tmp_path / "env"), "HOME": str(tmp_path / "user")}
    assert NodeHome.resolve(str(tmp_path / "flag"), env).path == tmp_path / "flag"
    assert NodeHome.resolve(None, env).path == tmp_path / "env"
    assert NodeHome.resolve(None, {"HOME": str(tmp_path / "user")}).path == (
        tmp_path / "user" / ".cellmesh"
    )
    assert NodeHome.resolve("", {"CELLMESH_HOME": "", "HOME": str(tmp_path)}).path == (
        tmp_path / ".cellmesh"
    )


def test_resolve_expands_tilde(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert NodeHome.resolve("~/nodes/a", env).path == tmp_path / "nodes" / "a"
    assert NodeHome.resolve(None, {**env, "CELLMESH_HOME": "~/b"}).path == tmp_path / "b"


def test_resolve_makes_relative_paths_absolute() -> None:
    home = NodeHome.resolve("relative/dir", {})
    assert home.path.is_absolute()
    assert home.path == Path.cwd() / "relative" / "dir"


def test_paths(home: NodeHome) -> None:
    assert home.keystore_path == home.path / "keystore.json"
    assert home.config_path == home.path / "config.toml"
    assert home.control_socket_path == home.path / "control.sock"
    assert home.db_path == home.path / "cellmesh.db"
    assert home.inbox_path == home.path / "inbox"
    assert str(home.path) in repr(home)
    assert home == NodeHome(home.path)


def test_ensure_creates_private_dir(home: NodeHome) -> None:
    assert not home.path.exists()
    home.ensure()
    assert home.path.is_dir()
    assert _mode(home.path) == 0o700
    home.ensure()  # idempotent


def test_ensure_refuses_a_file(home: NodeHome) -> None:
    home.path.write_text("x")
    with pytest.raises(KeystoreError, match="is not a directory"):
        home.ensure()


# --- identity --------------------------------------------------------------------------------


def test_create_and_load_plain(home: NodeHome) -> None:
    assert not home.has_identity()
    ident = home.create_identity(None, force=False)
    assert home.has_identity()
    assert _mode(home.path) == 0o700
    assert _mode(home.keystore_path) == 0o600
    assert home.load_identity(None) == ident
    assert sorted(p.name for p in home.path.iterdir()) == ["keystore.json"]  # no temp files


def test_create_and_load_encrypted(home: NodeHome) -> None:
    ident = home.create_identity(b"pw", force=False, **FAST)
    assert home.load_identity(b"pw") == ident
    with pytest.raises(KeystoreError) as info:
        home.load_identity(None)
    assert str(info.value) == (
        f"{home.keystore_path}: keystore is encrypted; "
        "pass --passphrase-file or set CELLMESH_PASSPHRASE"
    )
    with pytest.raises(KeystoreError, match=r"keystore\.json: wrong passphrase"):
        home.load_identity(b"wrong")


def test_create_refuses_overwrite(home: NodeHome) -> None:
    first = home.create_identity(None, force=False)
    before = home.keystore_path.read_bytes()
    with pytest.raises(KeystoreError) as info:
        home.create_identity(None, force=False)
    assert str(info.value) == (
        f"{home.keystore_path} already exists; use --force to replace it "
        "(the old identity will be lost)"
    )
    assert home.keystore_path.read_bytes() == before
    assert home.load_identity(None) == first
    assert sorted(p.name for p in home.path.iterdir()) == ["keystore.json"]


def test_create_force_replaces(home: NodeHome) -> None:
    first = home.create_identity(None, force=False)
    second = home.create_identity(None, force=True)
    assert first != second
    assert home.load_identity(None) == second
    assert _mode(home.keystore_path) == 0o600
    assert sorted(p.name for p in home.path.iterdir()) == ["keystore.json"]


def test_save_identity(home: NodeHome) -> None:
    ident = Identity.generate()
    home.save_identity(ident, None)
    assert home.load_identity(None) == ident


@pytest.mark.parametrize(("mode", "word"), [(0o644, "readable"), (0o620, "writable")])
def test_load_refuses_open_permissions(home: NodeHome, mode: int, word: str) -> None:
    home.create_identity(None, force=False)
    os.chmod(home.keystore_path, mode)
    with pytest.raises(KeystoreError) as info:
        home.load_identity(None)
    assert str(info.value) == (
        f"{home.keystore_path} is {word} by group or others (mode {mode:04o}); "
        f"run: chmod 600 {home.keystore_path}"
    )


def test_load_missing_identity(home: NodeHome) -> None:
    with pytest.raises(KeystoreError) as info:
        home.load_identity(None)
    assert str(info.value) == f"no identity in {home.path}; run: cellmesh --home {home.path} id new"


def test_missing_identity_message_quotes_odd_paths(tmp_path: Path) -> None:
    home = NodeHome(tmp_path / "my node")
    with pytest.raises(KeystoreError) as info:
        home.load_identity(None)
    assert f"run: cellmesh --home '{home.path}' id new" in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "keystore is not valid JSON"),
        (b"[]", "keystore must be a JSON object, got array"),
        (b'{"format": "other"}', "keystore is missing field"),
    ],
)
def test_load_corrupt_keystore(home: NodeHome, content: bytes, message: str) -> None:
    home.ensure()
    fd = os.open(home.keystore_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(KeystoreError) as info:
        home.load_identity(None)
    text = str(info.value)
    assert text.startswith(f"{home.keystore_path}: {message}")
    assert "\n" not in text


def test_load_tampered_keystore(home: NodeHome) -> None:
    home.create_identity(None, force=False)
    other = Identity.generate()
    text = home.keystore_path.read_text()
    ident = home.load_identity(None)
    text = text.replace(ident.public_key.hex(), other.public_key.hex())
    text = text.replace(ident.cell_id.hex(), other.cell_id.hex())
    home.keystore_path.write_text(text)
    with pytest.raises(KeystoreError, match="public_key does not match its secret"):
        home.load_identity(None)


def test_load_keystore_that_is_a_directory(home: NodeHome) -> None:
    home.keystore_path.mkdir(parents=True)
    with pytest.raises(KeystoreError, match=r"keystore\.json"):
        home.load_identity(None)


# --- config ----------------------------------------------------------------------------------


def test_load_config_without_file(home: NodeHome) -> None:
    # The database path is resolved against the home, like every file the config names.
    db, blobs = str(home.db_path), str(home.blobs_path)
    assert home.load_config({}) == NodeConfig(database=db, blob_dir=blobs)
    assert home.load_config({"CELLMESH_NAME": "env"}, {"max_sessions": 5}) == NodeConfig(
        name="env", max_sessions=5, database=db, blob_dir=blobs
    )


def test_blob_dir_is_relative_to_the_home(home: NodeHome, tmp_path: Path) -> None:
    assert home.load_config({}, {"blob_dir": "store"}).blob_dir == str(home.path / "store")
    assert home.load_config({}, {"blob_dir": str(tmp_path)}).blob_dir == str(tmp_path)
    assert home.load_config({}, {"blob_dir": ""}).blob_dir == ""


def test_database_path_is_relative_to_the_home(home: NodeHome, tmp_path: Path) -> None:
    assert home.load_config({}, {"database": "state/x.db"}).database == str(
        home.path / "state" / "x.db"
    )
    absolute = str(tmp_path / "elsewhere.db")
    assert home.load_config({}, {"database": absolute}).database == absolute
    assert home.load_config({"CELLMESH_DATABASE": ""}).database == ""  # state layer off


def test_load_config_from_file(home: NodeHome) -> None:
    home.ensure()
    home.config_path.write_text('name = "file"\nhandshake_retries = 2\n')
    cfg = home.load_config({"CELLMESH_HANDSHAKE_RETRIES": "3"})
    assert cfg.name == "file"
    assert cfg.handshake_retries == 3


@pytest.mark.parametrize(
    ("content", "suffix"),
    [
        ("name = \n", ":1:8: Invalid value"),
        ("nmae = 'x'\n", ": unknown key 'nmae' (did you mean 'name'?)"),
        ("name = 3\n", ": name must be a string, got an integer"),
        ("max_sessions = 0\n", ": max_sessions must be at least 1, got 0"),
    ],
)
def test_config_errors_carry_path(home: NodeHome, content: str, suffix: str) -> None:
    home.ensure()
    home.config_path.write_text(content)
    with pytest.raises(ConfigError) as info:
        home.load_config({})
    assert str(info.value) == f"{home.config_path}{suffix}"


def test_config_not_utf8(home: NodeHome) -> None:
    home.ensure()
    home.config_path.write_bytes(b"name = '\xff'\n")
    with pytest.raises(ConfigError) as info:
        home.load_config({})
    assert str(info.value).startswith(f"{home.config_path}: not valid UTF-8")


def test_config_unreadable(home: NodeHome) -> None:
    home.config_path.mkdir(parents=True)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{home.config_path}: cannot read")):
        home.load_config({})


def test_write_default_config(home: NodeHome) -> None:
    assert home.write_default_config()
    assert home.load_config({}) == NodeConfig(
        database=str(home.db_path), blob_dir=str(home.blobs_path)
    )
    assert not home.write_default_config()


# --- passphrase ------------------------------------------------------------------------------


def test_read_passphrase_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_bytes(b"s3cret\n\n")
    assert NodeHome.read_passphrase(str(path), {"CELLMESH_PASSPHRASE": "env"}) == b"s3cret\n"
    path.write_bytes(b"s3cret\r\n")
    assert NodeHome.read_passphrase(str(path), {}) == b"s3cret"
    path.write_bytes(b"  spaced  ")
    assert NodeHome.read_passphrase(str(path), {}) == b"  spaced  "


def test_read_passphrase_from_env() -> None:
    assert NodeHome.read_passphrase(None, {"CELLMESH_PASSPHRASE": "pässword"}) == (
        "pässword".encode()
    )
    assert NodeHome.read_passphrase(None, {"CELLMESH_PASSPHRASE": ""}) is None
    assert NodeHome.read_passphrase(None, {}) is None


def test_read_passphrase_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(KeystoreError, match=re.escape(f"cannot read passphrase file {missing}")):
        NodeHome.read_passphrase(str(missing), {})
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    with pytest.raises(KeystoreError, match=re.escape(f"passphrase file {empty} is empty")):
        NodeHome.read_passphrase(str(empty), {})


def test_passphrase_file_round_trip(home: NodeHome, tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("hunter2\n")
    passphrase = NodeHome.read_passphrase(str(pw_file), {})
    ident = home.create_identity(passphrase, force=False, **FAST)
    assert home.load_identity(b"hunter2") == ident
