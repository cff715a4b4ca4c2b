"""streamsynth: Caption-in-Prompt synthetic training data for image classifiers, as an endless data stream."""

from .captions import CaptionStore, CaptionStoreWriter, import_captions
from .stream import SyntheticStream
from .synth import SynthesisConfig, Synthesizer

__version__ = "0.1.0"
__all__ = ["CaptionStore", "CaptionStoreWriter", "SynthesisConfig", "SyntheticStream", "Synthesizer", "import_captions"]
