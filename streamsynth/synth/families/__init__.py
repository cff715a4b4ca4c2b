"""The families of text-to-image models streamsynth samples, one module each, keyed by the pipeline class a
checkpoint's model_index.json names.

Every module of this package but `base` defines `FAMILY`, a `Family` (see `base`); the registry below finds them by
walking the package, so a new family is one new module here (with its test and its row in docs/families.md): loading,
the sampling loop, the fast path, the stream, resume, replay and the cache take it as it is.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Conditioning, Family, TextEncoder

__all__ = ["FAMILIES", "Conditioning", "Family", "TextEncoder", "family_by_key", "family_of",
           "family_of_pipeline", "supported_families"]


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
        if module == "base":
            continue
        family = importlib.import_module(f"{__name__}.{module}").FAMILY
        for class_name in family.pipeline_classes:
            found[class_name] = family
    return found


# The diffusers pipeline class name (model_index.json's `_class_name`) → its family.
FAMILIES: dict[str, Family] = _discover()


def family_of(pipeline_class: str) -> Family | None:
    """The family of a diffusers pipeline class (by name), or None when streamsynth does not sample it."""
    return FAMILIES.get(pipeline_class)


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline; any other pipeline is refused in one line that names the supported ones."""
    family = family_of(type(pipe).__name__)
    if family is None:
        raise ValueError(f"streamsynth does not sample a {type(pipe).__name__}: give a pipeline of a supported "
                         f"family: {supported_families()}")
    return family


def family_by_key(key: str) -> Family:
    """The family with the short id `key` ("sd", "sdxl", ...), for tools that build models of a family."""
    keys = {f.key: f for f in FAMILIES.values()}
    if key not in keys:
        raise ValueError(f"unknown model family {key!r}: use one of {sorted(keys)}")
    return keys[key]


def supported_families() -> str:
    """The families and their pipeline classes in one line, for errors that refuse another."""
    families = {id(f): f for f in FAMILIES.values()}.values()
    return "; ".join(f"{f.name} ({', '.join(f.pipeline_classes)})" for f in families)
