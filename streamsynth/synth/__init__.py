"""Text-to-image generation: loading with diffusers, the one sampling loop, the model families (`families`),
post-processing."""

from .config import GeneratorConfig, SynthesisConfig
from .loading import ModelLoadError, load_pipeline
from .postprocess import resize_to_uint8
from .sampler import Synthesizer
from .tiny import (
    RANDOM_WEIGHTS_NOTICE,
    ensure_tiny_pipeline,
    has_random_weights,
    is_tiny_model,
    save_tiny_pipeline,
)

__all__ = [
    "RANDOM_WEIGHTS_NOTICE",
    "GeneratorConfig",
    "ModelLoadError",
    "SynthesisConfig",
    "Synthesizer",
    "ensure_tiny_pipeline",
    "has_random_weights",
    "is_tiny_model",
    "load_pipeline",
    "resize_to_uint8",
    "save_tiny_pipeline",
]
