"""docs/wire.md, section 11: the worked PULSE example is exactly what the code produces, and the
byte tables name the offsets the codec uses."""

from __future__ import annotations

import re
from pathlib import Path

from cellmesh.anchor.keys import PULSE_MAC_CONTEXT, derive_subkey
from cellmesh.anchor.messages import (
    GRANT_LEN,
    MAGIC,
    PULSE_LEN,
    PULSE_MAC_OFFSET,
    REQUEST_LEN,
    Pulse,
    decode_message,
    make_pulse,
)
from cellmesh.identity.keys import Identity

WIRE_MD = Path(__file__).resolve().parents[3] / "docs" / "wire.md"


def _section_11() -> str:
    text = WIRE_MD.read_text()
    return text[text.index("## 11. Anchor messages") :]


def test_the_worked_pulse_in_wire_md() -> None:
    section = _section_11()
    example = section[section.index("Output (132 bytes):") :]
    block = example.split("```")[1]
    expected = bytes.fromhex("".join(line[6:] for line in block.strip().splitlines()))
    alice = Identity.from_secret(bytes(range(64)))
    pulse = make_pulse(
        alice, 1_800_000_000_000, 3, 4, 0x1234, derive_subkey(bytes([0x42]) * 32, PULSE_MAC_CONTEXT)
    )
    assert pulse == expected
    msg = decode_message(pulse)
    assert isinstance(msg, Pulse)
    assert (msg.sender, msg.term, msg.epoch, msg.seq) == (alice.cell_id, 3, 4, 0x1234)


def test_the_sizes_and_offsets_in_wire_md_are_the_codecs() -> None:
    section = _section_11()
    assert MAGIC == 0xCA
    assert f"PULSE (type 1, {PULSE_LEN} bytes)" in section
    assert f"EPOCH (type 2, {GRANT_LEN} bytes)" in section
    assert f"REQ_EPOCH (type 3, {REQUEST_LEN} bytes)" in section
    assert re.search(rf"\| {PULSE_MAC_OFFSET} \| 16 \| mac \|", section)
