"""docs/state.md: the example runs as documented, and the figures it states match the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from cellmesh.state.events import MAX_EVENT_LEN, MAX_HORIZON, MAX_PAYLOAD, MIN_EVENT_LEN
from cellmesh.state.log import DEFAULT_MAX_PENDING, MAX_PROBLEMS

DOC = Path(__file__).resolve().parents[3] / "docs" / "state.md"


def example() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("### Example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no python block under '### Example'"
    return match.group(1)


def test_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example(), encoding="utf-8")
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "{'lang': 'en', 'theme': 'light'}"
    assert lines[1] == "0"
    assert len(lines) == 3


def test_documented_limits_match_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert f"at least {MIN_EVENT_LEN} and at most\n{MAX_EVENT_LEN:,} bytes" in text
    assert f"0..{MAX_PAYLOAD:,}" in text
    assert f"(0..{MAX_HORIZON})" in text
    assert f"default {DEFAULT_MAX_PENDING:,}" in text
    assert f"(at most {MAX_PROBLEMS:,})" in text
