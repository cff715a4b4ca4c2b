"""The embedded default on real digits: the split, the describer, the caption store, the shipped generator, and
classifiers that learn from its stream (with negative controls that must stay near chance)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from streamsynth import GeneratorConfig, StreamLoader, SynthesisConfig, SyntheticStream
from streamsynth.captions import CaptionStore
from streamsynth.classifier.models import learning_rate
from streamsynth.digits import embedded_captions, embedded_model
from streamsynth.digits.data import (CLASS_IDS, CLASS_NAMES, POSITIONS, SIZES, SLANTS, STROKES, HeldOutDigits,
                                caption_records, describe_digit, digit_augmentation, digit_pixels, digit_targets,
                                ensure_digits_captions, fit_classifier, held_out_indices, held_out_top1, image_key,
                                train_indices)
from streamsynth.synth import has_random_weights, load_pipeline
from streamsynth.transforms import one_thread

# The learning tests: a small classifier (timm's test_resnet at 16 px) trained for EPOCHS passes over the first STEPS
# batches of the stream, scored on the 500 held-out real digits. Measured over stream seeds 0-3: 94-95% (replay 1)
# and 92-96% (replay 4); shuffled labels 7-13%, the random-weights generator 10-11%. Thresholds leave a wide margin
# either way.
IMAGE_SIZE, BATCH, STEPS, EPOCHS, DENOISING_STEPS = 16, 32, 30, 3, 10
LEARNS, CHANCE_BAND = 75.0, 25.0  # % top-1: a learning run must reach LEARNS; a control must stay below CHANCE_BAND


def test_split_is_fixed_disjoint_and_balanced():
    assert (train_indices(), held_out_indices()) == (range(0, 1297), range(1297, 1797))
    targets = digit_targets()
    assert sorted(set(targets[1297:])) == list(range(10))
    assert min(torch.bincount(torch.from_numpy(targets[1297:].copy()))) >= 46
    assert digit_pixels().shape == (1797, 8, 8) and 0 <= digit_pixels().min() and digit_pixels().max() <= 1


def test_describer_names_what_it_measures():
    pattern = re.compile("^({}), ({}), ({}), ({})$".format(
        "|".join(STROKES), "|".join(SLANTS), "|".join(SIZES), "|".join(p for row in POSITIONS for p in row)))
    captions = [describe_digit(p) for p in digit_pixels()[:300]]
    assert all(pattern.match(c) for c in captions)
    assert captions == [describe_digit(p) for p in digit_pixels()[:300]]  # a pure function of the pixels
    assert len(set(captions)) > 50  # per-image information, not a class label in disguise

    bar = torch.zeros(8, 8)  # a thick stroke leaning right, high and to the right of the frame
    for row in range(6):
        bar[row, 6 - row // 2] = bar[row, 5 - row // 2] = 1.0
    assert describe_digit(bar.numpy()) == "thick strokes, slanted right, small, in the upper right"
    faint = torch.zeros(8, 8)
    faint[5:8, 0:6] = 0.3  # faint ink, low and to the left: a flat smudge
    assert describe_digit(faint.numpy()).startswith("thin strokes") and describe_digit(faint.numpy()).endswith(
        "in the lower left")


def test_caption_store_has_one_caption_per_training_digit(tmp_path):
    store = CaptionStore(ensure_digits_captions(tmp_path / "digits.lmdb"))
    assert [(c.id, c.name) for c in store.classes] == list(zip(CLASS_IDS, CLASS_NAMES))
    assert len(store) == 1297 and "describer" in store.meta["captioner"]
    pixels, targets = digit_pixels(), digit_targets()
    test_keys = {image_key(i) for i in held_out_indices()}
    for label in range(10):
        for caption in store.captions(label):
            index = int(caption.key.rsplit("/", 1)[1])
            assert caption.key not in test_keys and index in train_indices()
            assert targets[index] == label and caption.text == describe_digit(pixels[index])
    assert caption_records()[0].key == image_key(0)


def _first_use(folder: Path, barrier, results) -> None:
    barrier.wait()  # every process asks for the store at once
    results.put(len(CaptionStore(ensure_digits_captions(folder))))


def test_concurrent_first_uses_build_one_valid_store(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")  # forked children start at once, with streamsynth imported
    target = tmp_path / "cache" / "digits.lmdb"
    barrier, results = context.Barrier(3), context.Queue()
    processes = [context.Process(target=_first_use, args=(target, barrier, results)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0
    assert sorted(results.get(timeout=10) for _ in processes) == [1297] * 3
    assert [p.name for p in target.parent.iterdir()] == ["digits.lmdb"]  # no partial copy left behind


def test_embedded_default_is_the_trained_digits_model():
    model, captions = embedded_model(), embedded_captions()
    assert (model / "model_index.json").is_file() and not has_random_weights(model)
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    assert size <= 5 * 2**20, f"the shipped model is {size / 2**20:.1f} MB"
    assert [c.name for c in CaptionStore(captions).classes] == list(CLASS_NAMES)


def test_shipped_model_round_trips_through_save_pretrained(tmp_path):
    from streamsynth.synth import Synthesizer

    pipe = load_pipeline(embedded_model())
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert {type(pipe.unet).__name__, type(pipe.vae).__name__, type(pipe.text_encoder).__name__} == {
        "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel"}
    pipe.save_pretrained(tmp_path / "copy")
    again = load_pipeline(tmp_path / "copy")
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    prompts, seeds = ["a photo of three, thick strokes, upright, large, in the center"], [11]
    config = SynthesisConfig(num_inference_steps=5)
    assert torch.equal(Synthesizer(pipe, config).generate_uint8(prompts, seeds, 8),
                       Synthesizer(again, config).generate_uint8(prompts, seeds, 8))


def test_held_out_digits_reach_the_classifier_as_synthetic_ones_do():
    from streamsynth.digits.data import digits_to_uint8
    from streamsynth.classifier.evaluate import eval_transform

    data = HeldOutDigits(IMAGE_SIZE, class_ids=[str(9 - d) for d in range(10)])  # labels follow the class ids
    image, label = data[0]
    first = held_out_indices().start
    assert label == 9 - digit_targets()[first] and len(data) == 500
    expected = eval_transform(IMAGE_SIZE)(digits_to_uint8(digit_pixels()[first:first + 1], IMAGE_SIZE)[0])
    assert torch.equal(image, expected)
    assert image.mean() < -0.5  # normalised: the black background sits far below zero
    with pytest.raises(ValueError, match="do not include the digit classes"):
        HeldOutDigits(IMAGE_SIZE, class_ids=["n01440764"] * 10)


# ----- learning on the stream, and the controls that must not learn --------------------------------------------------

def _stream_batches(model, replay: int, steps: int = STEPS, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `steps` batches of the stream, made by one (single-threaded) loader worker."""
    generator = GeneratorConfig(model, image_size=IMAGE_SIZE, devices=("cpu",), batch_size=BATCH,
                                synthesis=SynthesisConfig(num_inference_steps=DENOISING_STEPS, guidance_scale=1.5))
    stream = SyntheticStream(embedded_captions(), generator, prompt="cip", seed=seed, batch_size=BATCH, replay=replay,
                             transform=digit_augmentation(IMAGE_SIZE))
    batches = list(itertools.islice(StreamLoader(stream, 1), steps))
    assert len(batches) == steps, "the stream's epoch ended early"
    return batches


def _top1(batches) -> float:
    """Top-1 on the held-out real digits of a classifier trained for EPOCHS passes over `batches`."""
    with one_thread():
        model = fit_classifier(itertools.chain.from_iterable([batches] * EPOCHS), EPOCHS * len(batches), seed=0)
        return held_out_top1(model, IMAGE_SIZE, "cpu", CLASS_IDS)


@pytest.fixture(scope="module")
def fresh_batches():
    """STEPS batches of the shipped model's stream, every image new (replay 1)."""
    return _stream_batches(embedded_model(), replay=1)


@pytest.mark.slow
def test_classifier_on_the_stream_recognises_held_out_real_digits(fresh_batches):
    top1 = _top1(fresh_batches)
    assert top1 >= LEARNS, f"top-1 {top1:.1f}% on held-out real digits"


def test_classifier_on_the_replayed_stream_recognises_held_out_real_digits():
    top1 = _top1(_stream_batches(embedded_model(), replay=4))
    assert top1 >= LEARNS, f"top-1 {top1:.1f}% on held-out real digits"


def test_control_permuted_labels_learn_nothing(fresh_batches):
    generator = torch.Generator().manual_seed(0)
    permuted = [(images, labels[torch.randperm(len(labels), generator=generator)]) for images, labels in fresh_batches]
    top1 = _top1(permuted)
    assert top1 < CHANCE_BAND, f"top-1 {top1:.1f}% with labels shuffled across images"


def test_control_random_weights_generator_teaches_nothing(tiny_model):
    top1 = _top1(_stream_batches(tiny_model, replay=4))
    assert top1 < CHANCE_BAND, f"top-1 {top1:.1f}% from a random-weights generator"


def test_training_script_is_seeded_and_saves_a_loadable_pipeline(tmp_path):
    from streamsynth.digits.model import is_digits_model, model_card
    from streamsynth.digits.train_generator import GeneratorSettings, train_generator

    settings = GeneratorSettings(seed=3, vae_steps=2, vae_batch_size=8, unet_steps=2, unet_batch_size=8, log_every=1)
    first = train_generator(tmp_path / "a", settings)
    second = train_generator(tmp_path / "b", settings)
    assert is_digits_model(first) and model_card(first)["unet"]["curve"][-1]["step"] == 2
    pipe = load_pipeline(first)
    weights = {name: getattr(pipe, name).state_dict() for name in ("unet", "vae", "text_encoder")}
    again = load_pipeline(second)
    for name, state in weights.items():
        assert all(torch.equal(value, getattr(again, name).state_dict()[key]) for key, value in state.items())
    assert pipe.tokenizer("a photo of seven, thick strokes").input_ids == again.tokenizer(
        "a photo of seven, thick strokes").input_ids
    # a token per word or comma, between the start and end tokens
    assert len(pipe.tokenizer("a photo of seven, thick strokes, slanted right").input_ids) == 12


def test_train_learning_rate_warms_up_then_decays():
    from streamsynth import train

    for extra, warmup in [([], 2), (["--warmup-steps", "10"], 10)]:  # by default, warmup is 2% of the steps
        args = train.parse_args(["--online-synthesis", "--steps", "100", *extra])
        rates = [learning_rate(step, args.steps, 1.0, args.warmup_steps, args.lr_schedule) for step in range(100)]
        assert rates[0] == pytest.approx(1 / warmup) and rates[warmup - 1] == pytest.approx(1.0)  # a linear warmup
        assert max(rates) == pytest.approx(1.0)  # ... to the peak, where it ends
        assert all(b <= a for a, b in zip(rates[warmup:], rates[warmup + 1:])) and rates[-1] < 0.01  # then decay


def test_the_generator_trains_on_each_digits_own_prompts():
    """The training prompts, written out: image i's Caption-in-Prompt prompt names its digit and its own caption."""
    from streamsynth.digits.train_generator import training_prompts

    cip, basic = training_prompts()
    assert len(cip) == len(basic) == 1297
    assert cip[:3] == ["a photo of zero, thin strokes, slanted right, small, in the center",
                       "a photo of one, thick strokes, upright, average size, in the center",
                       "a photo of two, thick strokes, slanted right, large, at the bottom"]
    assert basic[:3] == ["a photo of zero", "a photo of one", "a photo of two"]


def test_the_generators_prompt_mix_is_10_10_80():
    """Empty prompt below the first share of the draw, basic prompt below the two shares, else the image's own CiP
    prompt; at the defaults 10%, 10% and 80% of the images."""
    from streamsynth.digits.train_generator import GeneratorSettings, prompt_mix

    ids = {"cip": torch.arange(100, 110)[:, None], "basic": torch.arange(200, 210)[:, None],
           "empty": torch.tensor([7])}
    index = torch.tensor([3, 3, 3, 3, 5])
    u = torch.tensor([0.0, 0.0999, 0.1, 0.1999, 0.2])
    assert prompt_mix(ids, index, u, GeneratorSettings()).flatten().tolist() == [7, 7, 203, 203, 105]
    draws = prompt_mix(ids, torch.zeros(20000, dtype=torch.long), torch.rand(20000, generator=torch.Generator()
                                                                                 .manual_seed(0)), GeneratorSettings())
    shares = [(draws == token).float().mean().item() for token in (7, 200, 100)]
    assert all(abs(got - want) < 0.01 for got, want in zip(shares, (0.1, 0.1, 0.8))), shares
    no_empty = GeneratorSettings(empty_prompt_share=0.0, basic_prompt_share=0.5)
    assert prompt_mix(ids, index, u, no_empty).flatten().tolist() == [203, 203, 203, 203, 205]
