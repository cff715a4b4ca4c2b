"""streamsynth: Caption-in-Prompt synthetic training data for image classifiers, as an endless data stream."""

from .captions import CaptionStore, CaptionStoreWriter, import_captions
from .stream import StreamLoader, SyntheticStream
from .synth import GeneratorConfig, SynthesisConfig, Synthesizer
from .synth.fast import FastPathOptions

__version__ = "0.1.0"
__all__ = ["CaptionStore", "CaptionStoreWriter", "FastPathOptions", "GeneratorConfig", "StreamLoader",
           "SynthesisConfig", "SyntheticStream", "Synthesizer", "import_captions"]
