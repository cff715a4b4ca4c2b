"""Past one process: `streamsynth caption` and `streamsynth generate` on several ranks (gloo on the CPU), killed and
resumed, against a single process and against the stream.

Ranks are started two ways: by torchrun itself (`python -m torch.distributed.run`, and `caption --devices`, which
runs torchrun's standalone mode), and, where only the result matters, as forked children that find torchrun's
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) and open the same gloo group: they start in milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "faults"))

from faultkit import run_forked_ranks  # noqa: E402
from imagekit import LETTERS, SPRINGER, TENCH, encode, photo, write_tree  # noqa: E402

from streamsynth import GeneratorConfig, SynthesisConfig, SyntheticStream  # noqa: E402
from streamsynth.captions import CaptionStore, import_captions  # noqa: E402
from streamsynth.captions.captioners import load_captioner  # noqa: E402
from streamsynth.captions.captioning import caption_images, parts_folder, rank_batches, report_path  # noqa: E402
from streamsynth.cli import main  # noqa: E402
from streamsynth.imagefiles import decode_image  # noqa: E402
from streamsynth.prompts import prompt_template  # noqa: E402
from streamsynth.seeding import keyed_permutation, keyed_permutation_inverse  # noqa: E402
from streamsynth.shards import index_shard  # noqa: E402
from streamsynth.stream import CachedBatches, CaptionSampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared CPU: one intra-op thread (as every rank has), so that runs compute alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            **extra}


# ----------------------------------------------------------------------------------------------------- captioning


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two classes of small photos (13) and one corrupt file in an ImageFolder tree: 7 batches of 2, the corrupt file
    in rank 1's third batch."""
    files = {f"{cls}/{n:02d}.png": encode(photo((20, 16), seed=n + 50 * c), "PNG")
             for c, cls in enumerate((TENCH, SPRINGER)) for n in range(7 - c)}
    files[f"{SPRINGER}/03-corrupt.jpg"] = b"\xff\xd8\xff not a jpeg" * 20
    return write_tree(tmp_path_factory.mktemp("scale-images"), files)


def _caption_args(images: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["caption", "--images", str(images), "--out", str(out), "--captioner", str(model), "--batch-size", "2",
            "--workers", "0", "--commit-every", "2", "--max-new-tokens", "4", "--no-progress", *extra]


@pytest.fixture(scope="module")
def one_process(images, blip2_model, tmp_path_factory) -> Path:
    """The reference: one process, uninterrupted, batches of 2."""
    out = tmp_path_factory.mktemp("one-process") / "captions.lmdb"
    caption_images(images, out, load_captioner(blip2_model, device="cpu", max_new_tokens=4), batch_size=2,
                   num_workers=0, commit_every=2, progress=False)
    return out


def _records(store: Path) -> tuple[list, dict]:
    """Every caption with its class, index and key, in store order, and the metadata (without its date)."""
    s = CaptionStore(store)
    records = [(s.classes[c.class_index].id, c.index, c.key, c.text) for info in s.classes for c in s.captions(info.index)]
    return records, {k: v for k, v in s.meta.items() if k != "created"}


def test_rank_batches_deal_the_single_process_batches():
    for world in (1, 2, 3):
        batches = [b for r in range(world) for b in rank_batches(13, 2, r, world)]
        assert sorted((b.start, b.stop) for b in batches) == [(s, min(s + 2, 13)) for s in range(0, 13, 2)]


def test_two_ranks_caption_one_store_equal_to_one_process(images, blip2_model, one_process, tmp_path):
    out = tmp_path / "captions.lmdb"
    ranks = run_forked_ranks(lambda rank: main(_caption_args(images, out, blip2_model)), 2)
    assert [r.status for r in ranks] == [0, 0], [r.describe() for r in ranks]
    assert "by 2 ranks" in ranks[0].out and not ranks[1].out  # rank 0 speaks for the job
    expected = _records(one_process)
    assert len(expected[0]) == 13 and all(set(text) <= set(LETTERS + " ") for *_, text in expected[0])
    assert _records(out) == expected  # same captions, same order and indices, same settings recorded
    assert not parts_folder(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "captions.lmdb", "captions.lmdb.report.json"]
    report = json.loads(report_path(out).read_text())
    [corrupt] = report["skipped"]  # reported with the rank that met it and the file, in the report and as it happens
    assert f"rank 1: skipped {SPRINGER}/03-corrupt.jpg of {images}: " in ranks[1].err
    assert "skipped" not in ranks[0].err
    assert corrupt["key"] == f"{SPRINGER}/03-corrupt.jpg" and corrupt["rank"] == 1 and "not an image" in corrupt["reason"]
    assert report["complete"] and report["captions_in_store"] == 13 and report["captioned_this_run"] == 13
    assert [(r["rank"], r["captioned_this_run"], r["error"]) for r in report["ranks"]] == [(0, 8, None), (1, 5, None)]


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_resumes_into_the_same_store(images, blip2_model, one_process, tmp_path):
    """torchrun, rank 1 killed (-9) after its first commit; torchrun stops rank 0. `--devices cpu,cpu` (torchrun's
    standalone mode, started by the command) resumes: every rank captions only what no part holds."""
    out = tmp_path / "captions.lmdb"
    killed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "kill_rank.py"), "--rank", "1", "--commit", "2", "--",
         *_caption_args(images, out, blip2_model, "--device", "cpu")],
        capture_output=True, text=True, env=_env(), timeout=600)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert not out.exists()  # no store until every rank is done: no reader sees a partial one
    committed = {p.name: _committed(p) for p in sorted(parts_folder(out).glob("part-*.lmdb"))}
    assert committed.get("part-00001.lmdb", 0) >= 2 and sum(committed.values()) < 13, committed

    resumed = subprocess.run([sys.executable, "-m", "streamsynth.cli",
                              *_caption_args(images, out, blip2_model, "--devices", "cpu,cpu", "--resume")],
                             capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _records(out) == _records(one_process)
    report = json.loads(report_path(out).read_text())
    # nothing captioned twice, nothing lost
    assert report["already_in_store"] == sum(committed.values())
    assert report["captioned_this_run"] == 13 - sum(committed.values())
    assert not parts_folder(out).exists()


def _committed(part: Path) -> int:
    import lmdb

    if not (part / "data.mdb").exists():
        return 0
    env = lmdb.open(str(part), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return json.loads(txn.get(b"meta"))["num_captions"]
    finally:
        env.close()


# ----------------------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> CaptionStore:
    """Three classes with 5, 3 and 1 captions (9 in all)."""
    folder = tmp_path_factory.mktemp("small-store")
    lines = [{"class": cls, "caption": f"{cls} caption {i}", "key": f"{cls}/{i}.jpg"}
             for cls, n in (("ant", 5), ("bee", 3), ("cat", 1)) for i in range(n)]
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    store = import_captions(folder / "captions.jsonl", folder / "captions.lmdb")
    assert [c.num_captions for c in store.classes] == [5, 3, 1]
    return store


def _generate_args(out: Path, model: Path, store: CaptionStore, *extra: str) -> list[str]:
    return ["generate", "--out", str(out), "--sd-model", str(model), "--captions", str(store.path), "--seed", "3",
            "--num-inference-steps", "2", "--image-size", "16", "--synth-batch-size", "2", "--shard-size", "4",
            "--synth-devices", "cpu", "--no-progress", *extra]


def _shard_samples(folder: Path) -> dict[int, tuple[dict, np.ndarray]]:
    """sample id → (json record, image) of every shard in `folder`; a sample id found twice fails."""
    found = {}
    for shard in sorted(folder.glob("*.tar")):
        index = index_shard(shard, ("png", "json"))
        assert index.problem is None, index.problem
        for sample in index.samples:
            record = json.loads(index.read(sample, "json"))
            assert record["sample_id"] not in found, f"sample {record['sample_id']} twice"
            found[record["sample_id"]] = record, np.asarray(decode_image(index.read(sample, "png")))
    return found


def _online(store: CaptionStore, model: Path, ids, synth_batch_size: int = 2) -> dict[int, tuple[dict, np.ndarray]]:
    """What the stream makes online for these ids: each from the generation group (batch 2) that holds it."""
    generator = GeneratorConfig(model, synthesis=SynthesisConfig(num_inference_steps=2), image_size=16,
                                devices=("cpu",), batch_size=synth_batch_size)
    stream = SyntheticStream(store, generator, seed=3, batch_size=2)
    per_epoch, made = stream.layout.generated_per_epoch, {}
    for epoch, group in sorted({(i // per_epoch, i % per_epoch // 2) for i in ids}):
        made_group = stream.make_group(epoch, group)
        for spec, image in zip(made_group.specs, made_group.images):
            made[spec.sample_id] = ({"prompt": spec.prompt, "caption": spec.caption, "seed": spec.seed,
                                     "label": spec.label}, image.permute(1, 2, 0).numpy())
    return {i: made[i] for i in ids}


@pytest.fixture(scope="module")
def one_rank_set(tmp_path_factory, tiny_model, small_store) -> Path:
    out = tmp_path_factory.mktemp("one-rank") / "set"
    assert main(_generate_args(out, tiny_model, small_store, "--passes", "2")) == 0
    return out


def test_two_ranks_generate_the_set_of_one_rank_and_of_the_stream(one_rank_set, tiny_model, small_store, tmp_path):
    out = tmp_path / "set"
    ranks = run_forked_ranks(lambda rank: main(_generate_args(out, tiny_model, small_store, "--passes", "2")), 2)
    assert [r.status for r in ranks] == [0, 0], [r.describe() for r in ranks]
    assert "wrote 18 images in 5 shards" in ranks[0].out and "rank 1:" in ranks[0].out
    one, two = _shard_samples(one_rank_set), _shard_samples(out)
    assert sorted(two) == list(range(18))  # two passes over 9 captions: no duplicate, no gap
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in one_rank_set.glob("*.tar"))
    for i in range(18):
        assert two[i][0] == one[i][0] and np.array_equal(two[i][1], one[i][1]), i
    # Equal to the stream: the same chunks of the generator (batches of 2 at even ids), so bitwise.
    online = _online(small_store, tiny_model, range(18))
    for i, (record, image) in online.items():
        assert {k: two[i][0][k] for k in record} == record and np.array_equal(two[i][1], image), i
    # Each caption once per pass, and train.py --from-cache reads the set: one pass, every sample once.
    assert sorted(two[i][0]["caption"] for i in range(9)) == sorted(two[i][0]["caption"] for i in range(9, 18))
    batches = CachedBatches(out, lambda image: image, 3)
    assert batches.class_ids == ["ant", "bee", "cat"]
    keys = [key for _ in range(6) for key in next(batches)[2]]
    assert sorted(int(key.split("/")[1]) for key in keys) == list(range(18))
    report = json.loads((out / "generate-report.json").read_text())
    assert [(r["rank"], r["written"], r["images"]) for r in report["ranks"]] == [(0, 3, 10), (1, 2, 8)]


def test_a_killed_generate_resumes_without_duplicates_or_gaps(one_rank_set, tiny_model, small_store, tmp_path):
    """Rank 1 is killed (-9) in the middle of writing its second shard; rank 0 ends in one line; a resume on two
    ranks rewrites no finished shard and ends with the uninterrupted run's set."""
    import webdataset

    out = tmp_path / "set"
    args = _generate_args(out, tiny_model, small_store, "--passes", "2")

    def rank_dies_mid_shard(rank: int) -> int:
        if rank == 1:
            original, calls = webdataset.TarWriter.write, [0]

            def write(self, sample):
                original(self, sample)
                calls[0] += 1
                if calls[0] == 6:  # the second sample of rank 1's second shard
                    os.kill(os.getpid(), 9)

            webdataset.TarWriter.write = write
        return main(args)

    killed = run_forked_ranks(rank_dies_mid_shard, 2)
    assert killed[1].signal == 9 and killed[0].status == 2, killed[0].describe()
    assert "lost contact with the other ranks" in killed[0].err and "--resume" in killed[0].err
    assert "Traceback" not in killed[0].err
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the killed writer's hidden partial shard
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    firsts = sorted(int(name.split("-")[1].split(".")[0]) for name in finished)
    assert 1 <= len(firsts) < 5 and 12 not in firsts  # rank 1's second shard (12..15) was never finished
    assert sorted(_shard_samples(out)) == [i for first in firsts for i in range(first, min(first + 4, 18))]

    rejected = run_forked_ranks(lambda rank: main(args), 2)  # without --resume: refused, nothing touched
    assert [r.status for r in rejected] == [2, 2] and "continue it with --resume" in rejected[0].err
    resumed = run_forked_ranks(lambda rank: main([*args, "--resume"]), 2)
    assert [r.status for r in resumed] == [0, 0], [r.describe() for r in resumed]
    assert f"({len(finished)} of 5 were there already)" in resumed[0].out
    assert {n: (out / n).stat().st_ino for n in finished} == {n: ino for n, (ino, _) in finished.items()}
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == {n: m for n, (_, m) in finished.items()}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the killed writer's temporary is gone
    one, two = _shard_samples(one_rank_set), _shard_samples(out)
    assert sorted(two) == list(range(18))
    assert all(np.array_equal(two[i][1], one[i][1]) and two[i][0] == one[i][0] for i in range(18))
    changed = run_forked_ranks(lambda rank: main([*args, "--resume", "--seed", "4"]), 2)
    assert changed[0].status == 2 and "seed was 3, now 4" in changed[0].err


@pytest.mark.slow
def test_train_py_trains_from_a_generated_set(one_rank_set, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--from-cache", str(one_rank_set), "--steps", "2", "--batch-size",
         "3", "--image-size", "16", "--model", "resnet18", "--workers", "0", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 classes from cache 100%" in result.stdout  # the classes generate recorded
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["class_ids"] == ["ant", "bee", "cat"]


# ------------------------------------------------------------------------------------------ --images-per-class


def test_keyed_permutation_inverse_undoes_it():
    for n in (1, 2, 7, 100, 1025):
        for key in (0, 99):
            assert [keyed_permutation_inverse(keyed_permutation(i, n, key), n, key) for i in range(n)] == list(range(n))


def test_class_sample_ids_are_each_class_first_ids_of_the_stream(small_store):
    sampler = CaptionSampler(small_store, prompt_template("cip"), run_seed=3)
    scanned: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for i in range(9 * 8):  # 8 passes: enough for 8 images of the class with one caption
        scanned[sampler.locate(i)[0]].append(i)
    for label, n in ((0, 5), (1, 3), (2, 1)):
        for count in (1, 4, 5, 8):
            ids = sampler.class_sample_ids(label, count)
            assert ids == scanned[label][:count]
            uses = [sampler.locate(i)[1] for i in ids]  # each caption serves count // n or count // n + 1 images
            assert max(uses.count(c) for c in range(n)) - min(uses.count(c) for c in range(n)) <= 1


def test_images_per_class_as_an_image_folder(tiny_model, small_store, tmp_path):
    out = tmp_path / "folder"
    assert main(_generate_args(out, tiny_model, small_store, "--images-per-class", "4", "--format", "imagefolder",
                               "--synth-batch-size", "3")) == 0
    files = {cls: sorted(p.name for p in (out / cls).iterdir()) for cls in ("ant", "bee", "cat")}
    assert [len(names) for names in files.values()] == [4, 4, 4]
    records = [json.loads(line) for meta in sorted(out.glob("metadata-*.jsonl")) for line in meta.read_text().splitlines()]
    assert len(records) == 12 and len(list(out.glob("metadata-*.jsonl"))) == 3  # 12 images in units of 4
    assert [r["class_id"] for r in records[:6]] == ["ant", "bee", "cat"] * 2  # class-interleaved: balanced units
    sampler = CaptionSampler(small_store, prompt_template("cip"), run_seed=3)
    assert {r["sample_id"] for r in records} == {i for c in range(3) for i in sampler.class_sample_ids(c, 4)}
    assert [r["caption"] for r in records if r["class_id"] == "cat"] == ["cat caption 0"] * 4
    # The stream's images for those ids; the generator batched them otherwise (3 at a time): within float rounding.
    online = _online(small_store, tiny_model, sorted(r["sample_id"] for r in records))
    for record in records:
        image = np.asarray(decode_image((out / record["file"]).read_bytes()))
        expected = online[record["sample_id"]][1]
        assert image.shape == expected.shape == (16, 16, 3)
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1, record
