"""Print the versions this environment resolved for the packages that matter most, and every installed package
whose version differs from the list the suite last passed with (the file given), so that a red CI run says at once
which release changed under it."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

KEY_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "kernels", "accelerate", "huggingface-hub",
                "timm", "lightning", "torchdata", "webdataset", "lmdb", "numpy", "triton")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(tested_file: str) -> None:
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    print("resolved: " + ", ".join(f"{p} {installed.get(canonical(p), '(not installed)')}" for p in KEY_PACKAGES))
    tested = {}
    for line in Path(tested_file).read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            tested[canonical(name)] = version.strip()
    changed = [f"{name} {tested[name]} -> {installed[name]}" for name in sorted(tested)
               if name in installed and installed[name] != tested[name]]
    new = sorted(set(installed) - set(tested) - {"streamsynth", "pip", "setuptools", "wheel"})
    print(f"against {tested_file}: " + ("; ".join(changed) if changed else "no version changed")
          + (f"; not in it: {', '.join(new)}" if new else ""))


if __name__ == "__main__":
    main(sys.argv[1])
