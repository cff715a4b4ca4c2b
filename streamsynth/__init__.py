"""streamsynth: Caption-in-Prompt synthetic training data for image classifiers, as an endless data stream."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path


class _RepositoryKernels(importlib.abc.MetaPathFinder):
    """Gives the repository's top-level `kernels/` folder its import name, `streamsynth.kernels`, in a checkout.

    The repository keeps the Triton kernels in their own top-level folder; a built wheel installs that folder as
    `streamsynth/kernels` (pyproject.toml maps it there at build time), so no top-level package named `kernels`
    (Hugging Face's package of that name) is ever installed. Run from a checkout, or installed editable, there is
    no `streamsynth/kernels` folder, and this finder answers for that one name.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != f"{__name__}.kernels":
            return None
        return importlib.util.spec_from_file_location(fullname, self.folder / "__init__.py",
                                                      submodule_search_locations=[str(self.folder)])


def _install_repository_kernels() -> None:
    here = Path(__file__).resolve().parent
    folder = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (folder / "__init__.py").is_file():
        return  # an installed wheel (streamsynth/kernels exists), or a copy without the kernels
    if not any(isinstance(finder, _RepositoryKernels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RepositoryKernels(folder))


_install_repository_kernels()

from .captions import CaptionStore, CaptionStoreWriter, import_captions  # noqa: E402
from .stream import StreamLoader, SyntheticStream  # noqa: E402
from .synth import GeneratorConfig, SynthesisConfig, Synthesizer  # noqa: E402
from .synth.fast import FastPathOptions  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CaptionStore", "CaptionStoreWriter", "FastPathOptions", "GeneratorConfig", "StreamLoader",
           "SynthesisConfig", "SyntheticStream", "Synthesizer", "import_captions"]
