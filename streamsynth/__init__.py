"""streamsynth: Caption-in-Prompt synthetic training data for image classifiers, as an endless data stream."""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING


class _RepositoryKernels(importlib.abc.MetaPathFinder):
    """Gives the repository's top-level `kernels/` folder its import name, `streamsynth.kernels`, in a checkout.

    The folder has no `__init__.py` on purpose: a checkout puts its root on `sys.path` (`python train.py`,
    `python -m pytest`), and a regular package there named `kernels` would shadow Hugging Face's `kernels`, which
    transformers imports. Without one, Python skips the folder whenever an installed `kernels` exists (PEP 420).
    A built wheel installs the folder as `streamsynth/kernels` (pyproject.toml maps it there); a checkout or an
    editable install has no such folder, and this finder answers for that one name with a namespace package.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != f"{__name__}.kernels":
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(self.folder)]
        return spec


def _install_repository_kernels() -> None:
    here = Path(__file__).resolve().parent
    folder = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (folder / "dispatch.py").is_file():
        return  # an installed wheel (streamsynth/kernels exists), or a copy without the kernels
    if not any(isinstance(finder, _RepositoryKernels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RepositoryKernels(folder))


_install_repository_kernels()

__version__ = "0.2.0"

# The public API, imported on first use (PEP 562): `import streamsynth.cli` for `--help`, `--version` or a bad
# argument then costs milliseconds instead of the seconds torch and its neighbours take to import.
_PUBLIC = {
    "CaptionStore": ".captions", "CaptionStoreWriter": ".captions", "import_captions": ".captions",
    "StreamLoader": ".stream", "SyntheticStream": ".stream",
    "GeneratorConfig": ".synth", "SynthesisConfig": ".synth", "Synthesizer": ".synth",
    "FastPathOptions": ".synth.fast", "speed_preset": ".synth.speed",
}
__all__ = ["CaptionStore", "CaptionStoreWriter", "FastPathOptions", "GeneratorConfig", "StreamLoader",
           "SynthesisConfig", "SyntheticStream", "Synthesizer", "import_captions", "speed_preset"]

if TYPE_CHECKING:
    from .captions import CaptionStore, CaptionStoreWriter, import_captions
    from .stream import StreamLoader, SyntheticStream
    from .synth import GeneratorConfig, SynthesisConfig, Synthesizer
    from .synth.fast import FastPathOptions
    from .synth.speed import speed_preset


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
