"""`streamsynth caption`: real images → caption store, with tiny random BLIP-2, BLIP and ViT-GPT2 captioners.

Every model is saved with `save_pretrained` and loaded back with `from_pretrained`. The random models may only emit
lower-case letters (see `imagekit.letters_only`), so a caption is never empty and never contains the prompt by accident.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from streamsynth import SyntheticStream
from streamsynth.captions import CaptionStore, CaptionStoreError, CaptionStoreWriter
from streamsynth.captions.architectures import byte_level_tokenizer
from streamsynth.captions.captioners import load_captioner
from streamsynth.captions.captioning import _interrupt_after_block, caption_images, report_path, worker_shares
from streamsynth.imagefiles import decode_image
from streamsynth.cli import main

from imagekit import CHAINSAW, LETTERS, SPRINGER, TENCH, encode, letters_only, photo, write_tree

REPO = Path(__file__).resolve().parents[1]


# One intra-op thread: the models are tiny, and on a shared, busy CPU OpenMP's spinning threads make them up to 100x
# slower. The stopped-and-resumed subprocess gets the same setting through OMP_NUM_THREADS.
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- tiny captioners, saved and loaded like real ones


def _blip_model(folder: Path) -> Path:
    from transformers import (
        BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
    )

    torch.manual_seed(0)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, *(f"##{c}" for c in LETTERS)]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = BlipConfig(
        vision_config={**small, "image_size": 32, "patch_size": 8},
        text_config={**small, "vocab_size": len(tokens), "encoder_hidden_size": 32, "bos_token_id": 2,
                     "sep_token_id": 3, "eos_token_id": 3, "pad_token_id": 0},
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config)
    letters_only(model.text_decoder, list(range(5, 5 + len(LETTERS))))  # not "##x": it cannot start a caption
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


def _vit_gpt2_model(folder: Path) -> Path:
    from transformers import GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    encoder = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)
    decoder = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=64,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1, is_decoder=True, add_cross_attention=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 1, 2
    model = VisionEncoderDecoderModel(config)
    letters_only(model, tokenizer.convert_tokens_to_ids(list(LETTERS)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- image collections made by the tests


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels and whose data is empty: 'very large' without the bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _good_and_bad_images() -> tuple[dict[str, bytes], dict[str, str]]:
    """(relative path → file bytes, bad relative path → expected words of its reason) for an ImageFolder tree."""
    transparent = Image.new("P", (40, 30), 0)
    transparent.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    transparent.info["transparency"] = 0
    gray16 = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
    jpeg = encode(photo(seed=1), "JPEG")
    good = {
        f"{TENCH}/rgb.jpg": jpeg,
        f"{TENCH}/rgb.png": encode(photo(seed=2), "PNG"),
        f"{TENCH}/gray.jpg": encode(photo(seed=3).convert("L"), "JPEG"),
        f"{TENCH}/cmyk.jpg": encode(photo(seed=4).convert("CMYK"), "JPEG"),
        f"{TENCH}/gray16.png": encode(gray16, "PNG"),
        f"{TENCH}/palette.png": encode(photo(seed=5).convert("P"), "PNG"),
        f"{TENCH}/sub/transparent.png": encode(transparent, "PNG"),
        f"{TENCH}/rgba.png": encode(photo(seed=6).convert("RGBA"), "PNG"),
        f"{SPRINGER}/large.jpg": encode(photo((3000, 2000), seed=7), "JPEG", quality=50),
        f"{SPRINGER}/photo.JPEG": encode(photo(seed=8), "JPEG"),
    }
    bad = {
        f"{SPRINGER}/zero.jpg": (b"", "empty file"),
        f"{SPRINGER}/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        f"{SPRINGER}/corrupt.png": (os.urandom(2000), "not an image"),
        f"{SPRINGER}/huge.png": (_png_header_only(30000, 30000), "too large"),
        f"{CHAINSAW}/zero.jpeg": (b"", "empty file"),
        f"{CHAINSAW}/corrupt.jpg": (b"JFIF? no" * 100, "not an image"),
    }
    files = dict(good) | {path: data for path, (data, _) in bad.items()}
    files[f"{SPRINGER}/notes.txt"] = b"not an image extension: ignored, as torchvision's ImageFolder does"
    return files, {path: words for path, (_, words) in bad.items()}


def _pairs(store: CaptionStore) -> list[tuple[str, str]]:
    return [(c.key, c.text) for info in store.classes for c in store.captions(info.index)]


# ---------------------------------------------------------------- the command end to end


def test_caption_folder_of_good_and_bad_images(tmp_path, blip2_model, tiny_model):
    files, bad = _good_and_bad_images()
    root = write_tree(tmp_path / "images", files)
    out = tmp_path / "captions.lmdb"
    rc = main(["caption", "--images", str(root), "--out", str(out), "--captioner", str(blip2_model), "--device", "cpu",
               "--batch-size", "3", "--workers", "2", "--no-progress"])
    assert rc == 0

    store = CaptionStore(out)
    assert [(c.id, c.name, c.num_captions) for c in store.classes] == [
        (TENCH, "tench", 8), (SPRINGER, "English springer", 2), (CHAINSAW, "chain saw", 0),
    ]
    pairs = _pairs(store)
    good = sorted(p for p in files if p not in bad and not p.endswith(".txt"))
    assert sorted(key for key, _ in pairs) == good
    assert all(text and set(text) <= set(LETTERS + " ") for _, text in pairs)
    assert store.meta["captioner"] == str(blip2_model)
    assert store.meta["extra"]["captioning"]["max_new_tokens"] == 16

    report = json.loads(report_path(out).read_text())
    assert report["complete"] and report["captions_in_store"] == len(good)
    assert {s["key"] for s in report["skipped"]} == set(bad)
    for entry in report["skipped"]:
        assert bad[entry["key"]] in entry["reason"], entry
    assert [(e["id"], e["images_found"], e["reason"]) for e in report["empty_classes"]] == [
        (CHAINSAW, 2, "all 2 images unreadable")
    ]

    stream = SyntheticStream(store, tiny_model)
    captions = dict(pairs)
    for sample_id in range(len(store)):
        spec = stream.spec(sample_id)
        name = store.classes[spec.label].name
        assert spec.prompt == f"a photo of {name}, {spec.caption}"
        assert spec.caption in captions.values()

    # Privacy: the store holds text, never pixels.
    lmdb_bytes = b"".join(p.read_bytes() for p in out.iterdir())
    assert b"\xff\xd8\xff" not in lmdb_bytes and b"\x89PNG" not in lmdb_bytes
    checked = 0
    for relative in good:
        data = files[relative]
        # A 32-byte run of compressed pixel data varied enough that it cannot occur in the store by chance (the
        # flat, two-colour palette image has none).
        start = next((i for i in range(len(data) // 2, 0, -1) if len(set(data[i : i + 32])) >= 20), None)
        if start is not None:
            assert data[start : start + 32] not in lmdb_bytes, relative
            checked += 1
    assert checked >= len(good) - 1


@pytest.mark.parametrize("build", [_blip_model, _vit_gpt2_model], ids=["blip", "vit-gpt2"])
def test_blip_and_vision_encoder_decoder_captioners(tmp_path, build):
    model = build(tmp_path / "model")
    files = {f"{TENCH}/{n}.jpg": encode(photo(seed=n), "JPEG") for n in range(3)}
    files |= {f"{SPRINGER}/{n}.png": encode(photo(seed=10 + n), "PNG") for n in range(2)}
    root = write_tree(tmp_path / "images", files)
    captioner = load_captioner(model, device="cpu")
    caption_images(root, tmp_path / "captions.lmdb", captioner, batch_size=2, num_workers=0, progress=False)
    pairs = _pairs(CaptionStore(tmp_path / "captions.lmdb"))
    assert sorted(key for key, _ in pairs) == sorted(files)
    assert all(text and set(text) <= set(LETTERS + " ") for _, text in pairs)


def test_blip2_prompt_is_stripped_from_captions(tmp_path, blip2_model):
    root = write_tree(tmp_path / "images", {f"{TENCH}/{n}.png": encode(photo(seed=n), "PNG") for n in range(3)})
    captioner = load_captioner(blip2_model, device="cpu", prompt="a photo of", max_new_tokens=5)
    report = caption_images(root, tmp_path / "captions.lmdb", captioner, num_workers=0, progress=False)
    assert report.captions_in_store == 3
    for _, text in _pairs(CaptionStore(tmp_path / "captions.lmdb")):
        assert len(text) == 5 and set(text) <= set(LETTERS)  # five letter tokens, no prompt words


@pytest.mark.parametrize("kv_cache", ["static", "graphed"])
def test_static_and_graphed_kv_caches_give_the_same_captions(blip2_model, kv_cache):
    dynamic = load_captioner(blip2_model, device="cpu", max_new_tokens=6, kv_cache="dynamic")
    other = load_captioner(blip2_model, device="cpu", max_new_tokens=6, kv_cache=kv_cache)
    pixels = torch.stack([dynamic.preprocessor(photo(seed=n)) for n in range(3)])
    captions = dynamic.caption(pixels)
    assert other.caption(pixels) == captions and all(len(c) == 6 for c in captions)
    assert other.caption(pixels[:2]) == captions[:2]  # a second batch shape: its own cache


def test_graphed_decoding_ends_captions_at_eos_as_generate_does(blip2_model):
    """Captions that end early get padding, and decoding stops once all have ended: token for token `generate`'s.
    The default KV cache is graphed decoding on CUDA only where it applies."""
    from streamsynth.captions.captioners import default_kv_cache
    from streamsynth.captions.graphed import GraphedGreedyDecoder

    captioner = load_captioner(blip2_model, device="cpu", max_new_tokens=8)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert captioner.kv_cache == "dynamic" and default_kv_cache(captioner.model, cpu) == "dynamic"
    assert default_kv_cache(captioner.model, cuda) == "graphed"
    pixels = torch.stack([captioner.preprocessor(photo(seed=n)) for n in range(4)])
    prompt = captioner._prefix.expand(len(pixels), -1)

    def generate():
        return captioner.model.generate(pixel_values=pixels, input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                        max_new_tokens=8, do_sample=False, num_beams=1)

    free = generate()[:, prompt.shape[1]:]
    config = captioner.model.language_model.generation_config
    config.eos_token_id, config.pad_token_id = int(free[0, 2]), 1  # the first caption ends at its third token
    reference = generate()
    graphed = GraphedGreedyDecoder(captioner.model).generate(pixels, prompt, 8)
    assert torch.equal(graphed, reference) and (graphed == 1).any()  # padded after the end, as generate pads
    config.repetition_penalty = 1.3  # a logits processor the loop does not apply: refused, in one line
    with pytest.raises(ValueError, match="sets repetition_penalty.*use --kv-cache dynamic or static"):
        GraphedGreedyDecoder(captioner.model)
    assert default_kv_cache(captioner.model, cuda) == "dynamic"


def test_tf32_is_recorded_in_the_settings_and_scoped_to_captioning(blip2_model):
    from streamsynth.captions.captioners import fp32_matmul_precision

    # Absent at the default, so that stores made before the option existed resume as they were.
    assert "fp32_matmul" not in load_captioner(blip2_model, device="cpu").settings
    assert load_captioner(blip2_model, device="cpu", fp32_matmul="tf32").settings["fp32_matmul"] == "tf32"
    with pytest.raises(ValueError, match=r"'tf16'.*\['ieee', 'tf32'\]"):
        load_captioner(blip2_model, device="cpu", fp32_matmul="tf16")
    matmul = torch.backends.cuda.matmul
    assert not matmul.allow_tf32
    with fp32_matmul_precision("tf32", torch.device("cpu")):
        assert not matmul.allow_tf32  # a CUDA format: nothing changes elsewhere
    with fp32_matmul_precision("tf32", torch.device("cuda")):
        assert matmul.allow_tf32
    assert not matmul.allow_tf32


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    from transformers import ResNetConfig

    ResNetConfig().save_pretrained(tmp_path / "resnet")
    with pytest.raises(ValueError, match="blip-2, blip, vision-encoder-decoder"):
        load_captioner(tmp_path / "resnet", device="cpu")


# ---------------------------------------------------------------- interruption and resume


def _committed_captions(store: Path) -> int:
    if not (store / "data.mdb").exists():
        return 0
    env = lmdb.open(str(store), readonly=True, lock=True)
    try:
        with env.begin() as txn:
            raw = txn.get(b"meta")
        return json.loads(raw)["num_captions"] if raw else 0
    finally:
        env.close()


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    files = {f"{cls}/{n:03d}.png": encode(photo((16, 16), seed=n), "PNG")
             for n in range(12) for cls in (TENCH, SPRINGER)}
    files[f"{SPRINGER}/broken.jpg"] = b""
    return write_tree(tmp_path_factory.mktemp("many"), files)


@pytest.fixture(scope="module")
def uninterrupted(many_images, blip2_model, tmp_path_factory) -> list[tuple[str, str]]:
    out = tmp_path_factory.mktemp("reference") / "captions.lmdb"
    caption_images(many_images, out, load_captioner(blip2_model, device="cpu", max_new_tokens=4), batch_size=1,
                   num_workers=0, progress=False)
    return sorted(_pairs(CaptionStore(out)))


def _caption_args(images: Path, out: Path, model: Path) -> list[str]:
    # Batches of one: a caption is then a function of its image alone, whatever the batch composition on resume.
    return ["caption", "--images", str(images), "--out", str(out), "--captioner", str(model), "--device", "cpu",
            "--batch-size", "1", "--workers", "0", "--commit-every", "2", "--max-new-tokens", "4", "--no-progress"]


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_resume_after_the_process_is_stopped(tmp_path, many_images, blip2_model, uninterrupted, how):
    out = tmp_path / "captions.lmdb"
    sig = signal.SIGKILL if how == "kill -9" else signal.SIGINT
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamsynth.cli", *_caption_args(many_images, out, blip2_model)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        # Python turns SIGINT into KeyboardInterrupt only if the parent did not leave it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 90
        while _committed_captions(out) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the captioning subprocess made no commit in 90 s"
            time.sleep(0.02)
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), output
    with pytest.raises(CaptionStoreError, match="incomplete"):
        CaptionStore(out)  # stopped mid-way, not after the end
    done = _committed_captions(out)
    assert 2 <= done < len(uninterrupted)

    assert main([*_caption_args(many_images, out, blip2_model), "--resume"]) == 0
    resumed = _pairs(CaptionStore(out))
    assert len(resumed) == len(set(resumed)) == len(uninterrupted)
    assert sorted(resumed) == uninterrupted
    report = json.loads(report_path(out).read_text())
    assert report["already_in_store"] == done
    assert [s["key"] for s in report["skipped"]] == [f"{SPRINGER}/broken.jpg"]


def test_resume_after_an_exception(tmp_path, many_images, blip2_model, uninterrupted):
    captioner = load_captioner(blip2_model, device="cpu", max_new_tokens=4)
    real_caption, calls = captioner.caption, []

    def failing_caption(pixels):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_caption(pixels)

    captioner.caption = failing_caption
    out = tmp_path / "captions.lmdb"
    with pytest.raises(RuntimeError, match="simulated"):
        caption_images(many_images, out, captioner, batch_size=1, num_workers=0, commit_every=4, progress=False)
    assert _committed_captions(out) == 6  # everything captioned before the error, not just the last full commit
    assert not json.loads(report_path(out).read_text())["complete"]

    captioner.caption = real_caption
    caption_images(many_images, out, captioner, batch_size=1, num_workers=0, resume=True, progress=False)
    resumed = _pairs(CaptionStore(out))
    assert len(resumed) == len(set(resumed)) and sorted(resumed) == uninterrupted


def test_default_batch_size_follows_the_device_memory(monkeypatch):
    from types import SimpleNamespace

    from streamsynth.captions.captioning import default_batch_size

    def card(gib):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=gib * 2**30))

    card(141)
    assert default_batch_size("cuda") == 512 and default_batch_size("cpu") == 8
    card(40)
    assert default_batch_size("cuda:1") == 256


def test_worker_shares_cut_each_batch_evenly():
    shares, counts = worker_shares([list(range(8)), [8, 9]], batch_size=8, num_workers=3)
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]] and counts == [3, 1]
    assert worker_shares([[0, 1, 2]], batch_size=3, num_workers=0) == ([[0, 1, 2]], [1])


def test_workers_share_each_batch_and_the_captioner_sees_the_same_batches(tmp_path, many_images, blip2_model,
                                                                          uninterrupted):
    """Decoded by three workers in shares, each batch reaches the model whole and in order: the same batches and
    captions as decoding in the main process."""
    runs = {}
    for workers in (0, 3):
        captioner = load_captioner(blip2_model, device="cpu", max_new_tokens=4)
        sizes, caption = [], captioner.caption
        captioner.caption = lambda pixels: sizes.append(len(pixels)) or caption(pixels)
        out = tmp_path / f"workers-{workers}.lmdb"
        report = caption_images(many_images, out, captioner, batch_size=8, num_workers=workers, progress=False)
        runs[workers] = sizes, sorted(_pairs(CaptionStore(out))), [s["key"] for s in report.skipped]
        assert 0 <= report.input_wait_s <= report.elapsed_s
    assert runs[3] == runs[0] and runs[0][0] == [8, 8, 8] and runs[0][2] == [f"{SPRINGER}/broken.jpg"]
    assert runs[0][1] == uninterrupted  # batches of one, as the reference was made, give the same captions


def test_ctrl_c_waits_for_the_write_in_progress():
    steps = []
    # Python's own Ctrl-C handler, whatever the test run inherited: a process started in the background by a
    # non-interactive shell ignores SIGINT, and the guard rightly leaves an ignored Ctrl-C ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _interrupt_after_block():
                signal.raise_signal(signal.SIGINT)  # in this thread, now
                steps.append("caption written")
                steps.append("source written")
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert steps == ["caption written", "source written"]


def test_resume_refuses_other_captioning_settings(tmp_path):
    classes = [(TENCH, "tench")]
    writer = CaptionStoreWriter(tmp_path / "s.lmdb", classes, "model-a", extra={"max_new_tokens": 16})
    writer.add(0, "a fish", "a.jpg")
    writer.commit()
    writer.close()
    with pytest.raises(ValueError, match="same model and settings"):
        CaptionStoreWriter(tmp_path / "s.lmdb", classes, "model-b", resume=True, extra={"max_new_tokens": 16})
    with pytest.raises(ValueError, match="same model and settings"):
        CaptionStoreWriter(tmp_path / "s.lmdb", classes, "model-a", resume=True, extra={"max_new_tokens": 30})
    resumed = CaptionStoreWriter(tmp_path / "s.lmdb", classes, "model-a", resume=True, extra={"max_new_tokens": 16})
    assert resumed.has_source("a.jpg") and resumed.counts == [1]
    resumed.close()


# ---------------------------------------------------------------- WebDataset shards


def test_webdataset_shards(tmp_path, blip2_model):
    import webdataset as wds

    (tmp_path / "shards").mkdir()
    expected = {}
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"train-{shard:06d}.tar")) as sink:
            for n in range(4):
                key = f"s{shard}{n}"
                sink.write({"__key__": key, "jpg": encode(photo(seed=n + 10 * shard), "JPEG"), "cls": n % 3})
                expected[f"train-{shard:06d}.tar/{key}"] = str(n % 3)
            sink.write({"__key__": "corrupt", "jpg": b"\xff\xd8\xff garbage", "cls": 0})
            sink.write({"__key__": "nolabel", "png": encode(photo(seed=99), "PNG")})
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "tench", "1": "English springer", "2": "chain saw"}))
    shards = tmp_path / "shards"
    for n, images in enumerate([shards, f"{shards}/train-{{000000..000001}}.tar", shards / "train-000001.tar"]):
        out = tmp_path / f"captions{n}.lmdb"
        assert main(["caption", "--images", str(images), "--out", str(out), "--captioner", str(blip2_model),
                     "--names", str(names), "--device", "cpu", "--workers", "1", "--no-progress"]) == 0
        store = CaptionStore(out)
        wanted = {k: v for k, v in expected.items() if n < 2 or k.startswith("train-000001")}
        assert [(c.id, c.name) for c in store.classes] == [("0", "tench"), ("1", "English springer"), ("2", "chain saw")]
        assert {c.key: store.classes[c.class_index].id for info in store.classes for c in store.captions(info.index)} == wanted
        skipped = {s["key"]: s["reason"] for s in json.loads(report_path(out).read_text())["skipped"]}
        shard_names = ["train-000000.tar", "train-000001.tar"] if n < 2 else ["train-000001.tar"]
        assert set(skipped) == {f"{s}/{k}" for s in shard_names for k in ("corrupt", "nolabel")}
        assert all("no class field 'cls'" in r for k, r in skipped.items() if k.endswith("nolabel"))


# ---------------------------------------------------------------- decoding and the benchmark


def test_decode_scales_16_bit_and_flattens_transparency():
    gray16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(decode_image(encode(gray16, "PNG")))[0, :, 0].tolist() == [0, 128, 255]
    clear = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    assert np.asarray(decode_image(encode(clear, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_large_jpeg_is_decoded_at_reduced_scale():
    image = decode_image(encode(photo((2400, 1600)), "JPEG"), min_size=224)
    assert image.mode == "RGB" and 224 <= min(image.size) < 800


def test_sample_jpegs_do_not_depend_on_the_number_of_writers(tmp_path):
    from streamsynth.benchmarks.caption_bench import write_sample_jpegs

    one, two = write_sample_jpegs(tmp_path / "one", 6, workers=1), write_sample_jpegs(tmp_path / "two", 6, workers=2)
    files = sorted(p.relative_to(one) for p in one.rglob("*.jpg"))
    assert len(files) == 6 and files == sorted(p.relative_to(two) for p in two.rglob("*.jpg"))
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def test_caption_bench_tiny_writes_json(tmp_path):
    from streamsynth.kernels.dispatch import disabled

    # The decoding kernel switched off, so "triton" runs SDPA: under Triton's interpreter it takes a third of a second
    # a step (tests/test_kernels.py runs it in a captioner); this checks the runs, not the kernel.
    with disabled("decode_attention"):
        assert main(["caption-bench", "--captioner-arch", "tiny", "--num-images", "10", "--batch-size", "4,8",
                     "--kv-cache", "dynamic,graphed", "--fp32-matmul", "ieee,tf32", "--decode-attention", "sdpa,triton",
                     "--workers", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = tmp_path / "caption-bench.json"
    result = json.loads(out.read_text())
    assert result["random_weights"] and result["num_images"] == 10 and result["dtype"] == "float32"
    assert result["baseline"]["batch_size"] == 65 and result["baseline"]["images_per_s"] > 0
    runs = result["streamsynth_runs"]
    assert [(r["decode_attention"], r["fp32_matmul"], r["kv_cache"], r["batch_size"]) for r in runs] == [
        (a, m, k, b) for a in ("sdpa", "triton") for m in ("ieee", "tf32") for k in ("dynamic", "graphed")
        for b in (4, 8)]
    assert {r["decode_attention_ran"] for r in runs} == {"sdpa"}  # the JSON says the kernel did not run
    # Neither batch size nor KV cache (nor the graphed loop) changes a caption; on the CPU TF32 does not exist.
    assert all(r["same_captions_as_first"] == 1.0 for r in runs)
    assert all(r["captioned"] == 10 and r["images_per_s"] > 0 and 0 <= r["input_wait_s"] < r["seconds"] for r in runs)
    assert result["streamsynth"] == max(runs, key=lambda r: r["images_per_s"])
    assert {"device_name", "peak_host_memory_bytes", "environment"} <= set(result)
    stages = result["stages"]
    assert (stages["batch_size"], stages["kv_cache"]) == (result["streamsynth"]["batch_size"],
                                                          result["streamsynth"]["kv_cache"])
    assert all(stages[f"{stage}_s"] > 0 for stage in ("vision", "qformer", "language_decode", "caption"))
    assert stages["vision_s"] + stages["qformer_s"] < stages["caption_s"] and "qformer_tf32_s" not in stages
    busiest = stages["busiest_ops"]  # a profiled caption call: its operators, busiest first
    assert 0 < busiest["device_busy_s"] and 0 < busiest["wall_s"] and 0 < len(busiest["ops"]) <= 15
    assert [op["seconds"] for op in busiest["ops"]] == sorted((op["seconds"] for op in busiest["ops"]), reverse=True)
    assert any("linear" in op["name"] or "mm" in op["name"] for op in busiest["ops"]) and busiest["ops"][0]["calls"] > 0
    attention = stages["decode_attention_ms"]  # on the CPU two backends take the call; CUDA's two refuse it
    assert attention["math"] > 0 and attention["flash"] > 0 and attention["cudnn"] is attention["efficient"] is None
    assert "triton" not in attention  # timed only where the kernel runs
    assert all("peak resident set" in r["peak_memory_kind"] for r in [result["baseline"], *runs])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
