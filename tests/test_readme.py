"""The runnable Python examples of README.md and docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _runnable_examples(path: Path) -> list[str]:
    """The Python blocks that need nothing but the embedded default (the others show a user's own paths)."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    return [b for b in blocks if "embedded_model()" in b]


def test_readme_and_docs_examples_run(capsys):
    examples = {path.name: _runnable_examples(path) for path in (ROOT / "README.md", ROOT / "docs" / "loader.md",
                                                                 ROOT / "docs" / "performance.md")}
    assert [len(found) for found in examples.values()] == [1, 1, 1]
    for found in examples.values():
        exec(compile(found[0], "example", "exec"), {})
    out = capsys.readouterr().out
    assert "['zero', 'one', 'two'] 1" in out  # the README's loader example: class names, one batch delivered
    assert "torch.Size([1, 3, 8, 8]) torch.uint8" in out  # docs/loader.md: the sampling loop on its own
    assert "15 UNet evaluations for 1 image" in out  # docs/performance.md: the speed levers count their UNet calls
