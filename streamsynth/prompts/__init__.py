# Class names are resolved when captions are stored (streamsynth.captions.classnames); re-exported here.
from ..captions.classnames import imagenet_classes, load_name_map, readable_names
from .templates import BUILTIN_TEMPLATES, PHOTO_TEMPLATES, PromptTemplate, prompt_template

__all__ = [
    "BUILTIN_TEMPLATES",
    "PHOTO_TEMPLATES",
    "PromptTemplate",
    "imagenet_classes",
    "load_name_map",
    "prompt_template",
    "readable_names",
]
