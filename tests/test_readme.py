"""The README's runnable Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _runnable_examples() -> list[str]:
    """The Python blocks that need nothing but the embedded default (the others show a user's own paths)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if "embedded_model()" in b]


def test_readme_examples_run(capsys):
    examples = _runnable_examples()
    assert len(examples) == 3
    for example in examples:
        exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "['zero', 'one', 'two']" in out  # the loader example prints class names
    assert "torch.Size([1, 3, 8, 8]) torch.uint8" in out
    assert "15 UNet evaluations for 1 image" in out  # the speed levers' example counts its UNet calls
