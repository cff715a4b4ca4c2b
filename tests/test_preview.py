"""`streamsynth preview`: the grid shows the stream's own first samples per class, labelled with their prompts."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch

from streamsynth.cli import main
from streamsynth.commands.preview import CELL_HEIGHT, CELL_WIDTH, DPI, _cell_title, preview_grid
from streamsynth.stream import SyntheticStream
from streamsynth.synth import GeneratorConfig, SynthesisConfig

def _stream(caption_store, tiny_model) -> SyntheticStream:
    generator = GeneratorConfig(tiny_model, SynthesisConfig(num_inference_steps=2, guidance_scale=2.0), image_size=32,
                                devices=("cpu",))
    return SyntheticStream(caption_store, generator, prompt="clip", seed=5)


def test_grid_shows_the_streams_own_samples(tmp_path, tiny_model, caption_store):
    classes = ["n03000684", "tench", "2"]  # an id, a name and an index
    stream = _stream(caption_store, tiny_model)
    preview = preview_grid(stream, classes, samples_per_class=2, out=tmp_path / "grid.png")
    png = matplotlib.image.imread(preview.path)
    assert png.shape[1] == round(2 * CELL_WIDTH * DPI)  # two columns
    assert png.shape[0] > 3 * CELL_HEIGHT * DPI  # three rows under a title
    assert len(preview.figure.axes) == 3 * 2

    assert [[spec.label for spec in row] for row in preview.specs] == [[3] * 2, [0] * 2, [2] * 2]
    for row in preview.specs:
        ids = [spec.sample_id for spec in row]
        assert ids == sorted(ids)
        # The first samples of the class in training order: no earlier sample id has this label.
        earlier = [stream.spec(i).label for i in range(ids[-1]) if i not in ids]
        assert row[0].label not in earlier
        assert all(stream.spec(spec.sample_id) == spec for spec in row)

    # Each cell holds exactly the image the stream generates for its sample, titled with its prompt.
    flat = [spec for row in preview.specs for spec in row]
    expected = stream.maker.synthesizer().generate_uint8([s.prompt for s in flat], [s.seed for s in flat], 32)
    for ax, spec, image in zip(preview.figure.axes, flat, expected):
        assert ax.get_title(loc="left") == _cell_title(spec.prompt)
        assert torch.equal(torch.from_numpy(ax.get_images()[0].get_array().data).permute(2, 0, 1), image)


def test_long_prompts_are_wrapped_and_truncated():
    title = _cell_title("a photo of tench, " + "a very long caption " * 20)
    assert title.endswith("...")
    assert max(len(line) for line in title.split("\n")) <= 34
    assert len(title.replace("\n", " ")) <= 110


def test_unknown_class_is_named(tmp_path, tiny_model, caption_store):
    with pytest.raises(ValueError, match="'zebra' is not in caption store"):
        preview_grid(_stream(caption_store, tiny_model), ["zebra"], out=tmp_path / "x.png")


def test_cli_with_the_embedded_default_says_what_the_model_is(tmp_path, capsys):
    code = main(["preview", "--samples", "2", "--num-inference-steps", "1", "--image-size", "32", "--synth-devices",
                 "cpu", "--classes", "0,1", "--out", str(tmp_path)])
    out = tmp_path / "preview.png"
    assert code == 0
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" not in printed and f"wrote {out}" in printed
    assert "TINY text-to-image model" in printed and "not Stable Diffusion" in printed
    png = matplotlib.image.imread(out)
    assert png.shape[1] == round(2 * CELL_WIDTH * DPI)
