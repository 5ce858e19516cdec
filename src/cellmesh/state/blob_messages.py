"""BLOCK_WANT / BLOCK_PUT / BLOCK_NACK / BLOCK_CANCEL: the block exchange's messages.

Theory of operation: a fetcher asks a peer for blocks (chunks or manifests) by id with
BLOCK_WANT; the peer answers each block with one or more BLOCK_PUT pieces, or with BLOCK_NACK
(it does not have the block, or is busy). A fetcher that no longer needs a block (it came from
another peer first, or the request timed out) sends BLOCK_CANCEL. Every message is one
self-contained record that fits a reliable cellmesh message (at most 60,000 bytes); on a stream,
each is preceded by its length as a u32 (big-endian).

A block can be up to 4 MiB, far more than one message, so BLOCK_PUT carries a *piece*: the block
id, the block's total size, the piece's offset and bytes. The fetcher names the largest BLOCK_PUT
it accepts in `max_put` (its transport's message size), and the server cuts pieces to fit. The
fetcher reassembles a block from the pieces of one request and checks it against its id only when
complete: a piece cannot be checked alone, and pieces are never mixed between peers, so a corrupt
block is always blamed on the peer that sent it.

Layouts (integers big-endian; also in docs/blobs_sync.md)::

    common header:  version u8 (=1) | type u8 | request_id u32
    BLOCK_WANT  1:  header | max_put u32 | count u16 | count x block_id[32]
    BLOCK_PUT   2:  header | block_id[32] | block_size u32 | offset u32 | data (rest of message)
    BLOCK_NACK  3:  header | reason u8 | count u16 | count x block_id[32]
    BLOCK_CANCEL 4: header | count u16 | count x block_id[32]

`count` is 1..64. A BLOCK_PUT has 1 <= len(data), offset + len(data) <= block_size <= 4 MiB; a
fetcher also refuses a piece under 466 bytes (MIN_PUT_SIZE - header) that does not end its block.
Every decoding fault raises a `cellmesh.errors.DecodeError` subclass.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from cellmesh.errors import MalformedError, OversizeError, TruncatedError, VersionError
from cellmesh.state.chunking import CHUNK_ID_LEN, MAX_CHUNK_LIMIT

__all__ = [
    "BLOCK_PROTOCOL_VERSION",
    "MAX_BLOCK_MESSAGE",
    "MAX_BLOCK_SIZE",
    "MAX_IDS_PER_MESSAGE",
    "MIN_PUT_SIZE",
    "PUT_HEADER_LEN",
    "BlockCancel",
    "BlockMessage",
    "BlockMsgType",
    "BlockNack",
    "BlockPut",
    "BlockWant",
    "NackReason",
    "pull_block_message",
    "push_block_message",
]

BLOCK_PROTOCOL_VERSION = 1
MAX_BLOCK_SIZE = MAX_CHUNK_LIMIT
"""The largest block (chunk or manifest): 4 MiB."""
MAX_BLOCK_MESSAGE = 60_000
"""The largest block-exchange message: fits one reliable cellmesh message."""
MIN_PUT_SIZE = 512
"""The smallest `max_put` a fetcher may ask for (at least 466 bytes of data per piece)."""
MAX_IDS_PER_MESSAGE = 64
"""Block ids in one WANT, NACK or CANCEL."""

_HEAD = struct.Struct("!BBI")
_WANT = struct.Struct("!BBIIH")
_PUT = struct.Struct("!BBI32sII")
_NACK = struct.Struct("!BBIBH")
_CANCEL = struct.Struct("!BBIH")
PUT_HEADER_LEN = _PUT.size
"""46 bytes of BLOCK_PUT before the piece's data."""
_U32_MAX = 2**32 - 1


class BlockMsgType(IntEnum):
    """The `type` byte of a block-exchange message."""

    WANT = 1
    PUT = 2
    NACK = 3
    CANCEL = 4


class NackReason(IntEnum):
    """Why a server did not send a block."""

    NOT_FOUND = 1
    """The server does not have it: ask someone else."""
    BUSY = 2
    """The server's queue for this peer is full: ask again later, or elsewhere."""
    REFUSED = 3
    """Policy: this peer may not have it."""


@dataclass(frozen=True, slots=True)
class BlockWant:
    """Ask for blocks; answer with pieces no larger than `max_put` bytes (whole message)."""

    request_id: int
    max_put: int
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class BlockPut:
    """A piece of block `block_id` (of `block_size` bytes) starting at `offset`."""

    request_id: int
    block_id: bytes
    block_size: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class BlockNack:
    """The server will not send these blocks of request `request_id`, for `reason`."""

    request_id: int
    reason: NackReason
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class BlockCancel:
    """The fetcher no longer wants these blocks of request `request_id`."""

    request_id: int
    ids: tuple[bytes, ...]


BlockMessage = BlockWant | BlockPut | BlockNack | BlockCancel


def _check_ids(ids: tuple[bytes, ...]) -> bytes:
    if not 1 <= len(ids) <= MAX_IDS_PER_MESSAGE:
        raise MalformedError(f"a block message names 1 to {MAX_IDS_PER_MESSAGE} ids")
    if any(len(i) != CHUNK_ID_LEN for i in ids):
        raise MalformedError("block ids are 32 bytes")
    return b"".join(ids)


def _check_u32(name: str, v: int) -> None:
    if not 0 <= v <= _U32_MAX:
        raise MalformedError(f"{name} must fit in 32 bits")


def push_block_message(m: BlockMessage) -> bytes:
    """Encode one block-exchange message (raises a `DecodeError` subclass for a message that
    would not decode: the encoder and decoder accept exactly the same set)."""
    _check_u32("request_id", m.request_id)
    v = BLOCK_PROTOCOL_VERSION
    if isinstance(m, BlockWant):
        if not MIN_PUT_SIZE <= m.max_put <= MAX_BLOCK_MESSAGE:
            raise MalformedError(f"max_put must be in [{MIN_PUT_SIZE}, {MAX_BLOCK_MESSAGE}]")
        body = _check_ids(m.ids)
        return _WANT.pack(v, BlockMsgType.WANT, m.request_id, m.max_put, len(m.ids)) + body
    if isinstance(m, BlockPut):
        if len(m.block_id) != CHUNK_ID_LEN:
            raise MalformedError("block ids are 32 bytes")
        _check_put_geometry(m.block_size, m.offset, len(m.data))
        if PUT_HEADER_LEN + len(m.data) > MAX_BLOCK_MESSAGE:
            raise OversizeError(f"BLOCK_PUT larger than {MAX_BLOCK_MESSAGE} bytes")
        head = _PUT.pack(v, BlockMsgType.PUT, m.request_id, m.block_id, m.block_size, m.offset)
        return head + m.data
    if isinstance(m, BlockNack):
        body = _check_ids(m.ids)
        return _NACK.pack(v, BlockMsgType.NACK, m.request_id, int(m.reason), len(m.ids)) + body
    body = _check_ids(m.ids)
    return _CANCEL.pack(v, BlockMsgType.CANCEL, m.request_id, len(m.ids)) + body


def _check_put_geometry(block_size: int, offset: int, n: int) -> None:
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise MalformedError(f"block size {block_size} outside [1, {MAX_BLOCK_SIZE}]")
    if n < 1:
        raise MalformedError("a BLOCK_PUT piece carries at least one byte")
    if offset < 0 or offset + n > block_size:
        raise MalformedError("BLOCK_PUT piece lies outside its block")


def _pull_ids(data: bytes | memoryview, off: int, count: int) -> tuple[bytes, ...]:
    if not 1 <= count <= MAX_IDS_PER_MESSAGE:
        raise MalformedError(f"a block message names 1 to {MAX_IDS_PER_MESSAGE} ids")
    end = off + count * CHUNK_ID_LEN
    if len(data) < end:
        raise TruncatedError("block id list cut short")
    if len(data) > end:
        raise MalformedError("junk after the block id list")
    return tuple(bytes(data[i : i + CHUNK_ID_LEN]) for i in range(off, end, CHUNK_ID_LEN))


def pull_block_message(data: bytes | memoryview) -> BlockMessage:
    """Decode one block-exchange message; any fault raises a `DecodeError` subclass."""
    n = len(data)
    if n > MAX_BLOCK_MESSAGE:
        raise OversizeError(f"block message of {n} bytes exceeds {MAX_BLOCK_MESSAGE}")
    if n < 1:
        raise TruncatedError("empty block message")
    if data[0] != BLOCK_PROTOCOL_VERSION:
        raise VersionError(f"block protocol version {data[0]}")
    if n < _HEAD.size:
        raise TruncatedError("block message header cut short")
    _v, t, request_id = _HEAD.unpack_from(data, 0)
    if t == BlockMsgType.WANT:
        if n < _WANT.size:
            raise TruncatedError("BLOCK_WANT header cut short")
        _v, _t, _r, max_put, count = _WANT.unpack_from(data, 0)
        if not MIN_PUT_SIZE <= max_put <= MAX_BLOCK_MESSAGE:
            raise MalformedError(f"max_put {max_put} outside [{MIN_PUT_SIZE}, {MAX_BLOCK_MESSAGE}]")
        return BlockWant(request_id, max_put, _pull_ids(data, _WANT.size, count))
    if t == BlockMsgType.PUT:
        if n < _PUT.size:
            raise TruncatedError("BLOCK_PUT header cut short")
        _v, _t, _r, block_id, block_size, offset = _PUT.unpack_from(data, 0)
        _check_put_geometry(block_size, offset, n - _PUT.size)
        return BlockPut(request_id, block_id, block_size, offset, bytes(data[_PUT.size :]))
    if t == BlockMsgType.NACK:
        if n < _NACK.size:
            raise TruncatedError("BLOCK_NACK header cut short")
        _v, _t, _r, reason, count = _NACK.unpack_from(data, 0)
        try:
            why = NackReason(reason)
        except ValueError as exc:
            raise MalformedError(f"unknown BLOCK_NACK reason {reason}") from exc
        return BlockNack(request_id, why, _pull_ids(data, _NACK.size, count))
    if t == BlockMsgType.CANCEL:
        if n < _CANCEL.size:
            raise TruncatedError("BLOCK_CANCEL header cut short")
        _v, _t, _r, count = _CANCEL.unpack_from(data, 0)
        return BlockCancel(request_id, _pull_ids(data, _CANCEL.size, count))
    raise MalformedError(f"unknown block message type {t}")
