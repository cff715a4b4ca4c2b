"""Prompt strategies: how a (class name, caption) pair becomes the text that conditions Stable Diffusion.

A strategy is one or several format strings over `{name}` and `{caption}`. With several, each sample's seed picks
one, so a prompt stays a pure function of (run seed, sample id) like everything else about a sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..seeding import derive_seed

# Photo-style variations of "a photo of a {name}." in the spirit of CLIP's zero-shot prompt ensembles (our own
# wording). They vary light, distance, framing and image quality but keep "photo", since the classifier is
# evaluated on photographs first.
PHOTO_TEMPLATES: tuple[str, ...] = (
    "a photo of a {name}.",
    "a close-up photo of a {name}.",
    "a photo of a {name}, seen from far away.",
    "a well-lit photo of a {name}.",
    "a dim, low-light photo of a {name}.",
    "a grainy photo of a {name}.",
    "a slightly out-of-focus photo of a {name}.",
    "a black-and-white photo of a {name}.",
    "an overexposed photo of a {name}.",
    "a photo of a {name} in its usual surroundings.",
    "a phone snapshot of a {name}.",
    "a photo of a {name}, partly hidden behind something.",
)

# "cip" is the Caption-in-Prompt method; "basic" is its baseline. A caption is one sentence from a captioner,
# so it is appended after the class name, which must stay first to disambiguate the caption's nouns.
BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "cip": ("a photo of {name}, {caption}",),
    "basic": ("a photo of {name}",),
    "name": ("{name}",),
    "clip": PHOTO_TEMPLATES,
}


def _check_template(template: str) -> None:
    if "{name}" not in template:
        raise ValueError(f"prompt template {template!r} must contain {{name}}")
    try:
        template.format(name="x", caption="y")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"prompt template {template!r} may only use the fields {{name}} and {{caption}}: {err}"
        ) from None


@dataclass(frozen=True)
class PromptTemplate:
    """One format string over `{name}` and, optionally, `{caption}`, or several of which the sample seed picks one.

    `PromptTemplate("a sketch of {name}")` is a single template; `PromptTemplate(("a {name}.", "one {name}."))` a set.
    """

    templates: tuple[str, ...] | str

    def __post_init__(self) -> None:
        templates = (self.templates,) if isinstance(self.templates, str) else tuple(self.templates)
        if not templates:
            raise ValueError("a prompt strategy needs at least one template")
        for template in templates:
            _check_template(template)
        object.__setattr__(self, "templates", templates)

    @property
    def template(self) -> str:
        """The strategy as one string, for logs and checkpoints: the template, or the set joined by ' | '."""
        return " | ".join(self.templates)

    @property
    def uses_caption(self) -> bool:
        return any("{caption}" in t for t in self.templates)

    def choose(self, seed: int) -> str:
        """The template of the sample with this seed.

        The index is hashed from the seed rather than taken from its low bits, so that which template a sample
        gets is unrelated to the noise drawn from the same seed.
        """
        if len(self.templates) == 1:
            return self.templates[0]
        return self.templates[derive_seed(seed, "prompt-template") % len(self.templates)]

    def __call__(self, name: str, caption: str = "", seed: int = 0) -> str:
        return self.choose(seed).format(name=name, caption=caption.strip())


def prompt_template(spec: str) -> PromptTemplate:
    """A built-in strategy by name (see `BUILTIN_TEMPLATES`) or a user template such as `"a sketch of {name}"`."""
    if spec in BUILTIN_TEMPLATES:
        return PromptTemplate(BUILTIN_TEMPLATES[spec])
    if "{" not in spec:
        raise ValueError(
            f"unknown prompt strategy {spec!r}: use one of {sorted(BUILTIN_TEMPLATES)} or a template with {{name}} "
            "(and optionally {caption}), e.g. 'a photo of {name}, {caption}'"
        )
    return PromptTemplate(spec)
