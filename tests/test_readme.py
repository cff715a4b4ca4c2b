"""The README's runnable Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_loader_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "embedded_captions()" in b)
    exec(compile(example, "README.md", "exec"), {})
    assert "tench" in capsys.readouterr().out
