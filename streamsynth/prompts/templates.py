"""Prompt strategies: how a (class name, caption) pair becomes the text that conditions Stable Diffusion."""

from __future__ import annotations

from dataclasses import dataclass

# "cip" is the Caption-in-Prompt method; "basic" is its baseline. A caption is one sentence from a captioner,
# so it is appended after the class name, which must stay first to disambiguate the caption's nouns.
BUILTIN_TEMPLATES: dict[str, str] = {
    "cip": "a photo of {name}, {caption}",
    "basic": "a photo of {name}",
}


@dataclass(frozen=True)
class PromptTemplate:
    """A format string over `{name}` and, optionally, `{caption}`."""

    template: str

    def __post_init__(self) -> None:
        if "{name}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} must contain {{name}}")
        try:
            self.template.format(name="x", caption="y")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"prompt template {self.template!r} may only use the fields {{name}} and {{caption}}: {err}"
            ) from None

    @property
    def uses_caption(self) -> bool:
        return "{caption}" in self.template

    def __call__(self, name: str, caption: str = "") -> str:
        return self.template.format(name=name, caption=caption.strip())


def prompt_template(spec: str) -> PromptTemplate:
    """A built-in strategy by name (`cip`, `basic`) or a user template such as `"a sketch of {name}"`."""
    if spec in BUILTIN_TEMPLATES:
        return PromptTemplate(BUILTIN_TEMPLATES[spec])
    if "{" not in spec:
        raise ValueError(f"unknown prompt strategy {spec!r}: use one of {sorted(BUILTIN_TEMPLATES)} or a template with {{name}}")
    return PromptTemplate(spec)
