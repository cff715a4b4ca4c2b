"""The caption store and its importers: what goes in comes back out, and bad input never leaves a store behind."""

from __future__ import annotations

import json

import pytest

from streamsynth.captions import (
    CaptionImportError,
    CaptionStore,
    CaptionStoreError,
    CaptionStoreWriter,
    import_captions,
)
from streamsynth.cli import main as cli


def _write_text_folder(root, classes: dict[str, list[str]]):
    root.mkdir()
    for cid, lines in classes.items():
        (root / f"{cid}.txt").write_text("\n".join(lines) + "\n")
    return root


def _no_store_left(parent) -> bool:
    return [p.name for p in parent.iterdir() if "lmdb" in p.name] == []


CLASSES = {
    "n01440764": ["a fish on the grass", "a man holding a fish"],
    "n02102040": ["a dog in a field"],
    "my_custom_class": ["something, with a comma", "another one", "a third"],
}


def test_text_folder_round_trip(tmp_path):
    store = import_captions(_write_text_folder(tmp_path / "txt", CLASSES), tmp_path / "c.lmdb")
    assert [c.id for c in store.classes] == sorted(CLASSES)
    by_id = store.class_by_id()
    assert by_id["n01440764"].name == "tench"  # ImageNet-1K's readable name
    assert by_id["my_custom_class"].name == "my custom class"  # fallback: the id, read as words
    for cid, lines in CLASSES.items():
        info = by_id[cid]
        assert info.num_captions == len(lines)
        assert [c.text for c in store.captions(info.index)] == lines
        assert store.caption(info.index, 0).key == f"{cid}/{cid}.txt:1"
    assert len(store) == sum(map(len, CLASSES.values()))
    assert store.meta["complete"] and store.meta["schema_version"] == 1


def test_jsonl_and_csv_round_trip(tmp_path):
    rows = [{"class": cid, "caption": text, "key": f"{cid}/img{i}.jpg"}
            for cid, lines in CLASSES.items() for i, text in enumerate(lines)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("# a comment line\n" + "\n".join(json.dumps(r) for r in rows) + "\n\n")
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("key,class,caption\n" + "".join(f'{r["key"]},{r["class"]},"{r["caption"]}"\n' for r in rows))
    for source, out in ((jsonl, "j.lmdb"), (csv_path, "c.lmdb")):
        store = import_captions(source, tmp_path / out)
        read = {(store.classes[c.class_index].id, c.text, c.key)
                for info in store.classes for c in store.captions(info.index)}
        assert read == {(r["class"], r["caption"], r["key"]) for r in rows}


def test_a_complete_store_keeps_no_file_that_could_block_a_later_store(tmp_path):
    """py-lmdb 3 refuses to open an environment whose files share an inode with those of one open in the process,
    and keys a lock-free reader by the lock file present when it opened. A complete store kept its lock file: once
    that store was deleted, the next store's lock file could get the freed inode and be refused (seen once in CI).
    Inode reuse is simulated with hard links: every file of a complete store but the data file its reader holds."""
    import os

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"class": "n01", "caption": "a cat", "key": "n01/a.jpg"}) + "\n")
    store = import_captions(jsonl, tmp_path / "a.lmdb")
    assert [c.text for c in store.captions(0)] == ["a cat"]  # a reader is open on it now, for the whole process
    assert not (store.path / "lock.mdb").exists()
    others = [f for f in sorted(store.path.iterdir()) if f.name != "data.mdb"]
    for n, file in enumerate(others):
        new = tmp_path / f"new{n}.lmdb"
        new.mkdir()
        os.link(file, new / "lock.mdb")
        with CaptionStoreWriter(new, [("n01", "cat")], "test") as writer:
            writer.add(0, "a cat", "n01/b.jpg")
    assert others  # the writer's lock, at least: the loop ran


def test_user_name_map(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"my_custom_class": "custom thing"}))
    assert cli(["captions", "import", str(_write_text_folder(tmp_path / "txt", CLASSES)),
                "--out", str(tmp_path / "c.lmdb"), "--names", str(names)]) == 0
    assert CaptionStore(tmp_path / "c.lmdb").class_by_id()["my_custom_class"].name == "custom thing"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CaptionImportError, match="does not exist"):
        import_captions(tmp_path / "nowhere", tmp_path / "c.lmdb")
    assert _no_store_left(tmp_path)


def test_empty_class_file_names_the_file(tmp_path):
    folder = _write_text_folder(tmp_path / "txt", CLASSES)
    (folder / "n09999999.txt").write_text("\n  \n")
    with pytest.raises(CaptionImportError, match=r"n09999999\.txt.*no captions"):
        import_captions(folder, tmp_path / "c.lmdb")
    assert _no_store_left(tmp_path)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"class": "a", "caption": "x"}\n{"class": "a", "caption": \n')
    with pytest.raises(CaptionImportError, match=r"c\.jsonl:2: malformed JSON"):
        import_captions(jsonl, tmp_path / "c.lmdb")
    jsonl.write_text('{"class": "a", "caption": "x"}\n{"klass": "a", "caption": "y"}\n')
    with pytest.raises(CaptionImportError, match=r"c\.jsonl:2: missing or empty field 'class'"):
        import_captions(jsonl, tmp_path / "c.lmdb")
    assert _no_store_left(tmp_path)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert cli(["captions", "import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.lmdb")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_existing_store_is_never_overwritten(tmp_path, caption_store):
    with pytest.raises(FileExistsError, match="never overwrites"):
        import_captions(_write_text_folder(tmp_path / "txt", CLASSES), caption_store.path)
    assert len(CaptionStore(caption_store.path)) == 60


def test_interrupted_writer_leaves_an_incomplete_store_that_resumes(tmp_path):
    path = tmp_path / "c.lmdb"
    classes = [("a", "apple"), ("b", "bear")]
    with pytest.raises(KeyboardInterrupt):
        with CaptionStoreWriter(path, classes, "test", commit_every=2) as writer:
            writer.add(0, "first", "a/1.jpg")
            writer.add(1, "second", "b/1.jpg")
            writer.add(1, "third", "b/2.jpg")
            raise KeyboardInterrupt
    with pytest.raises(CaptionStoreError, match="incomplete.*--resume"):
        CaptionStore(path)
    with pytest.raises(FileExistsError, match="--resume"):
        CaptionStoreWriter(path, classes, "test")
    with CaptionStoreWriter(path, classes, "test", resume=True) as writer:
        assert writer.has_source("b/2.jpg") and not writer.has_source("a/2.jpg")
        writer.add(1, "third again", "b/2.jpg")  # already there: ignored
        writer.add(0, "fourth", "a/2.jpg")
    store = CaptionStore(path)
    assert [c.num_captions for c in store.classes] == [2, 2]
    assert [c.text for c in store.captions(1)] == ["second", "third"]
    with pytest.raises(IndexError, match="has no caption 5"):
        store.caption(0, 5)


def test_stats_command(caption_store, capsys):
    assert cli(["captions", "stats", str(caption_store.path), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "60 captions, 10 classes" in out and "tench" in out and "a man holding a large fish" in out


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(CaptionStoreError, match="does not exist.*captions import"):
        CaptionStore(tmp_path / "nope.lmdb")


def test_a_folder_that_is_not_a_store_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(CaptionStoreError, match="not a readable LMDB caption store"):
        CaptionStore(tmp_path / "images")
