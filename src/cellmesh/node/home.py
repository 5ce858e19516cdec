"""The node home directory: where the keystore, config file, control socket and database live.

This is the file-I/O side of `cellmesh.identity.keystore` and `cellmesh.config`, which are pure.
Layout of a home directory (mode 0700)::

    keystore.json   the identity (mode 0600, written atomically)
    config.toml     optional settings (see `cellmesh.config`)
    control.sock    the local control API socket of a running node
    cellmesh.db     node state
    inbox/          received files
    blobs/          content-addressed blocks (`cellmesh blob put`)

Every failure raises `KeystoreError` or `ConfigError` with a one-line message that names the
file involved and, where there is one, the command that fixes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shlex
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cellmesh.config import NodeConfig, render_default_config
from cellmesh.config import load_config as _load_config
from cellmesh.errors import ConfigError, KeystoreError
from cellmesh.identity.keys import Identity
from cellmesh.identity.keystore import (
    DEFAULT_MEMLIMIT,
    DEFAULT_OPSLIMIT,
    MAX_KEYSTORE_BYTES,
    decode_keystore,
    encode_keystore,
)

__all__ = ["DEFAULT_HOME", "HOME_ENV", "PASSPHRASE_ENV", "NodeHome"]

DEFAULT_HOME: Final = "~/.cellmesh"
HOME_ENV: Final = "CELLMESH_HOME"
PASSPHRASE_ENV: Final = "CELLMESH_PASSPHRASE"

KEYSTORE_NAME: Final = "keystore.json"
CONFIG_NAME: Final = "config.toml"
CONTROL_SOCKET_NAME: Final = "control.sock"
DB_NAME: Final = "cellmesh.db"
INBOX_NAME: Final = "inbox"
BLOBS_NAME: Final = "blobs"

_MAX_CONFIG_BYTES: Final = 1024 * 1024
_MAX_PASSPHRASE_BYTES: Final = 64 * 1024


def _expand(text: str, env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    if home and (text == "~" or text.startswith("~/")):
        text = home + text[1:]
    return Path(os.path.expanduser(text)).absolute()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the data itself is already synced
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _who_can(mode: int) -> str:
    if mode & 0o044:
        return "readable"
    if mode & 0o022:
        return "writable"
    return "accessible"


class NodeHome:
    """A node's home directory. Paths are absolute; nothing is touched until a method says so."""

    __slots__ = ("_path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Use `path` (made absolute, not resolved through symlinks) as the home directory."""
        self._path = Path(path).absolute()

    @classmethod
    def resolve(cls, path: str | None, env: Mapping[str, str]) -> NodeHome:
        """Pick the home directory: explicit `path` (--home), else $CELLMESH_HOME, else
        ~/.cellmesh. A leading ``~`` is expanded (using ``HOME`` from `env` when present).
        Empty strings count as unset."""
        text = path or env.get(HOME_ENV) or DEFAULT_HOME
        return cls(_expand(text, env))

    def __repr__(self) -> str:
        return f"NodeHome({str(self._path)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeHome):
            return NotImplemented
        return self._path == other._path

    def __hash__(self) -> int:
        return hash(self._path)

    @property
    def path(self) -> Path:
        """The home directory."""
        return self._path

    @property
    def keystore_path(self) -> Path:
        """``<home>/keystore.json``."""
        return self._path / KEYSTORE_NAME

    @property
    def config_path(self) -> Path:
        """``<home>/config.toml``."""
        return self._path / CONFIG_NAME

    @property
    def control_socket_path(self) -> Path:
        """``<home>/control.sock``."""
        return self._path / CONTROL_SOCKET_NAME

    @property
    def db_path(self) -> Path:
        """``<home>/cellmesh.db``."""
        return self._path / DB_NAME

    @property
    def inbox_path(self) -> Path:
        """``<home>/inbox`` (a directory; not created by `ensure`)."""
        return self._path / INBOX_NAME

    @property
    def blobs_path(self) -> Path:
        """``<home>/blobs``: the `FileChunkStore` of blobs (created when first used)."""
        return self._path / BLOBS_NAME

    def ensure(self) -> None:
        """Create the home directory (mode 0700, parents as needed) if it does not exist.

        An existing directory is left as it is. Raises `KeystoreError` if it cannot be created.
        """
        if self._path.is_dir():
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._path.mkdir(mode=0o700)
            os.chmod(self._path, 0o700)  # the umask may have taken bits away; be exact
        except FileExistsError:
            if not self._path.is_dir():
                raise KeystoreError(f"{self._path} exists and is not a directory") from None
        except OSError as exc:
            raise KeystoreError(f"cannot create {self._path}: {exc.strerror}") from None

    def has_identity(self) -> bool:
        """True if a keystore file exists (it is not read or checked)."""
        return os.path.lexists(self.keystore_path)

    def create_identity(
        self,
        passphrase: bytes | None,
        force: bool,
        *,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> Identity:
        """Generate a new identity, store it in the keystore and return it.

        Refuses to replace an existing keystore unless `force`. With a passphrase the secret is
        encrypted (Argon2id `opslimit`/`memlimit`). Raises `KeystoreError`.
        """
        identity = Identity.generate()
        self.save_identity(identity, passphrase, force=force, opslimit=opslimit, memlimit=memlimit)
        return identity

    def save_identity(
        self,
        identity: Identity,
        passphrase: bytes | None,
        *,
        force: bool = False,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> None:
        """Write `identity` to the keystore atomically (mode 0600; temp file, fsync, rename).

        Refuses to replace an existing keystore unless `force`. Raises `KeystoreError`.
        """
        target = self.keystore_path
        if not force and os.path.lexists(target):
            raise self._exists_error()
        data = encode_keystore(identity, passphrase, opslimit=opslimit, memlimit=memlimit)
        self.ensure()
        tmp = self._path / f".{KEYSTORE_NAME}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise KeystoreError(f"cannot write {target}: {exc.strerror}") from None
        try:
            try:
                os.fchmod(fd, 0o600)
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._install(tmp, target, force)
        except OSError as exc:
            raise KeystoreError(f"cannot write {target}: {exc.strerror}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(self._path)

    def _exists_error(self) -> KeystoreError:
        return KeystoreError(
            f"{self.keystore_path} already exists; use --force to replace it "
            "(the old identity will be lost)"
        )

    def _install(self, tmp: Path, target: Path, force: bool) -> None:
        if force:
            os.replace(tmp, target)
            return
        # A hard link fails atomically if the target appeared meanwhile; fall back to a
        # check-then-rename on filesystems without hard links.
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise self._exists_error() from None
        except OSError:
            if os.path.lexists(target):
                raise self._exists_error() from None
            os.replace(tmp, target)

    def load_identity(self, passphrase: bytes | None) -> Identity:
        """Read and decode the keystore.

        Raises `KeystoreError` if there is no keystore, if it is group/other accessible, if it
        is corrupt (the message is prefixed with the file path) or the passphrase is wrong or
        missing.
        """
        path = self.keystore_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            home = shlex.quote(str(self._path))
            raise KeystoreError(
                f"no identity in {self._path}; run: cellmesh --home {home} id new"
            ) from None
        except OSError as exc:
            raise KeystoreError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeystoreError(f"{path} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeystoreError(
                    f"{path} is {_who_can(mode)} by group or others (mode {mode:04o}); "
                    f"run: chmod 600 {shlex.quote(str(path))}"
                )
            data = _read_up_to(fd, MAX_KEYSTORE_BYTES + 1)
        except OSError as exc:
            raise KeystoreError(f"{path}: cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        try:
            return decode_keystore(data, passphrase)
        except KeystoreError as exc:
            raise KeystoreError(f"{path}: {exc}") from None

    def load_config(
        self, env: Mapping[str, str], overrides: Mapping[str, object] | None = None
    ) -> NodeConfig:
        """Load settings from config.toml (if present), `env` and CLI `overrides`.

        See `cellmesh.config.load_config`; problems in the file are prefixed with its path.
        Raises `ConfigError`.
        """
        path = self.config_path
        text: str | None
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            text = None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        else:
            if len(raw) > _MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: file is larger than {_MAX_CONFIG_BYTES} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"{path}: not valid UTF-8 (bad byte at offset {exc.start})"
                ) from None
        config = _load_config(text, env, overrides, source=str(path))
        # Files named in the config are relative to the home directory, not to wherever the
        # command happens to run.
        policy_file, threat_list = config.policy_file, config.threat_list
        if policy_file and not Path(policy_file).is_absolute():
            policy_file = str(self._path / policy_file)
        if threat_list and not Path(threat_list).is_absolute():
            threat_list = str(self._path / threat_list)
        database = config.database
        if database and not Path(database).is_absolute():
            database = str(self._path / database)
        blob_dir = config.blob_dir
        if blob_dir and not Path(blob_dir).is_absolute():
            blob_dir = str(self._path / blob_dir)
        membership_cert = config.membership_cert
        if membership_cert and not Path(membership_cert).is_absolute():
            membership_cert = str(self._path / membership_cert)
        return dataclasses.replace(
            config,
            policy_file=policy_file,
            threat_list=threat_list,
            database=database,
            blob_dir=blob_dir,
            membership_cert=membership_cert,
        )

    def write_default_config(self) -> bool:
        """Write the commented default config.toml if there is none. Returns True if written."""
        self.ensure()
        try:
            fd = os.open(
                self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except FileExistsError:
            return False
        except OSError as exc:
            raise ConfigError(f"cannot write {self.config_path}: {exc.strerror}") from None
        try:
            _write_all(fd, render_default_config().encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    @staticmethod
    def read_passphrase(passphrase_file: str | None, env: Mapping[str, str]) -> bytes | None:
        """Return the keystore passphrase, or None if none was given.

        From `passphrase_file` if given (its contents, minus one trailing newline), else from
        $CELLMESH_PASSPHRASE (an empty variable counts as unset). Raises `KeystoreError` if the
        file cannot be read or holds an empty passphrase.
        """
        if passphrase_file is not None:
            try:
                with open(passphrase_file, "rb") as f:
                    data = f.read(_MAX_PASSPHRASE_BYTES + 1)
            except OSError as exc:
                raise KeystoreError(
                    f"cannot read passphrase file {passphrase_file}: {exc.strerror}"
                ) from None
            if len(data) > _MAX_PASSPHRASE_BYTES:
                raise KeystoreError(f"passphrase file {passphrase_file} is too large")
            if data.endswith(b"\r\n"):
                data = data[:-2]
            elif data.endswith(b"\n"):
                data = data[:-1]
            if not data:
                raise KeystoreError(f"passphrase file {passphrase_file} is empty")
            return data
        value = env.get(PASSPHRASE_ENV)
        if value:
            return value.encode("utf-8")
        return None
