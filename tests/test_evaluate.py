"""Evaluation on ImageFolder suites: label mapping, the R/A class masks, V2's numeric folders, top-k, the writers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from streamsynth.classifier.evaluate import evaluate_suites, format_results, suite_classes, write_results

# Five Imagenette classes (ImageNet indices 0, 217, 482, 491, 497), none of them in ImageNet-R's 200.
IMAGENETTE = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079"]
IMAGENETTE_INDEX = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497}
R_CLASSES = ["n01443537", "n01484850"]  # goldfish and great white shark, two of ImageNet-R's 200
NOT_IN_STORE = "n01514859"  # hen


class LookupModel(nn.Module):
    """Logits read from a table by image: image i is a flat image of grey level i, so row i is its logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[(x[:, 0, 0, 0] * 255).round().long()]


PLAIN = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def write_image(folder: Path, image_id: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), image_id, dtype=np.uint8)).save(folder / f"{image_id:03d}.png")


def logits_ranking(order: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose descending order is `order` followed by the remaining classes."""
    row = torch.zeros(num_classes)
    for rank, label in enumerate(order):
        row[label] = 100.0 - rank
    return row


def test_top1_top5_on_a_hand_checked_case(tmp_path):
    class_ids = [*IMAGENETTE, "n03394916", "n03417042", "n03425413"]  # 8 classes
    table = torch.zeros(256, len(class_ids))
    # image 1 (class 0): true class first → top-1 and top-5 hit
    table[1] = logits_ranking([0, 1, 2, 3, 4], 8)
    # image 2 (class 0): true class fourth → top-5 hit only
    table[2] = logits_ranking([5, 6, 7, 0, 1], 8)
    # image 3 (class 1): true class sixth → no hit
    table[3] = logits_ranking([0, 2, 3, 4, 5, 1], 8)
    # image 4 (class 1): true class fifth → top-5 hit only
    table[4] = logits_ranking([7, 6, 5, 4, 1], 8)
    write_image(tmp_path / IMAGENETTE[0], 1)
    write_image(tmp_path / IMAGENETTE[0], 2)
    write_image(tmp_path / IMAGENETTE[1], 3)
    write_image(tmp_path / IMAGENETTE[1], 4)
    write_image(tmp_path / NOT_IN_STORE, 5)  # not a class of the model: skipped, not counted as wrong

    model = LookupModel(table).train()
    [result] = evaluate_suites(model, {"imagenet-val": tmp_path}, class_ids, PLAIN, batch_size=3, workers=0)
    assert model.training  # restored
    assert result.images == 4
    assert result.top1 == pytest.approx(25.0)
    assert result.top5 == pytest.approx(75.0)
    assert (result.top5_k, result.candidate_classes, result.scored_classes) == (5, 8, 2)
    assert result.skipped_folders == [NOT_IN_STORE]


def test_top_k_is_capped_at_the_number_of_classes(tmp_path):
    class_ids = IMAGENETTE[:3]
    table = torch.zeros(256, 3)
    table[1] = logits_ranking([1, 2, 0], 3)  # true class last of three: a top-3 hit
    write_image(tmp_path / IMAGENETTE[0], 1)
    [result] = evaluate_suites(LookupModel(table), {"tiny": tmp_path}, class_ids, PLAIN, workers=0)
    assert (result.top1, result.top5, result.top5_k) == (0.0, 100.0, 3)


def test_subset_mask_restricts_predictions_to_the_200_classes(tmp_path):
    assert len(suite_classes("imagenet-r")) == 200 and len(suite_classes("imagenet-a")) == 200
    assert set(R_CLASSES) <= suite_classes("imagenet-r")
    assert not set(IMAGENETTE) & suite_classes("imagenet-r")
    class_ids = sorted([*IMAGENETTE, *R_CLASSES])
    label = {cid: i for i, cid in enumerate(class_ids)}
    table = torch.zeros(256, len(class_ids))
    # Every image: an Imagenette class (outside the subset) scores highest, the true R class second.
    for image_id, true in [(1, R_CLASSES[0]), (2, R_CLASSES[0]), (3, R_CLASSES[1])]:
        table[image_id] = logits_ranking([label["n01440764"], label[true]], len(class_ids))
        write_image(tmp_path / true, image_id)
    table[4] = logits_ranking([label["n01440764"]], len(class_ids))
    write_image(tmp_path / "n01440764", 4)  # in the store but not in R's 200: not scored on R

    results = evaluate_suites(
        LookupModel(table), {"imagenet-r": tmp_path, "unmasked": tmp_path}, class_ids, PLAIN, workers=0
    )
    masked, unmasked = results
    assert masked.images == 3 and masked.top1 == 100.0
    assert masked.candidate_classes == 2 and masked.top5_k == 2
    assert masked.skipped_folders == ["n01440764"]
    # The same folder without the mask: the non-subset class wins every R image, and the tench image is scored.
    assert unmasked.images == 4 and unmasked.top1 == pytest.approx(25.0)
    assert unmasked.candidate_classes == len(class_ids)


def test_v2_numeric_folders_map_to_imagenet_indices(tmp_path):
    class_ids = IMAGENETTE
    table = torch.zeros(256, len(class_ids))
    image_id = 0
    for label, cid in enumerate(class_ids):
        for _ in range(2):
            image_id += 1
            table[image_id, label] = 1.0  # the model is right about every image
            write_image(tmp_path / str(IMAGENETTE_INDEX[cid]), image_id)
    write_image(tmp_path / "1", 50)  # goldfish, not a class of the model
    [result] = evaluate_suites(LookupModel(table), {"imagenet-v2": tmp_path}, class_ids, PLAIN, workers=0)
    # A wrong index→wnid map, or ImageFolder's string order ("217" < "482" < "491" < "497" but "1" < "217")
    # leaking into the labels, would put some images under the wrong class.
    assert (result.images, result.top1, result.skipped_folders) == (10, 100.0, ["1"])


def test_missing_and_empty_folders_fail_before_any_scoring(tmp_path):
    model = LookupModel(torch.zeros(256, 5))
    write_image(tmp_path / "val" / IMAGENETTE[0], 1)
    with pytest.raises(FileNotFoundError, match="imagenet-sketch folder .*nowhere.* does not exist"):
        evaluate_suites(model, {"imagenet-val": tmp_path / "val", "imagenet-sketch": tmp_path / "nowhere"},
                        IMAGENETTE, PLAIN, workers=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        evaluate_suites(model, {"imagenet-a": tmp_path / "empty"}, IMAGENETTE, PLAIN, workers=0)
    (tmp_path / "hollow" / IMAGENETTE[0]).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="hollow"):
        evaluate_suites(model, {"imagenet-val": tmp_path / "hollow"}, IMAGENETTE, PLAIN, workers=0)


def test_wrong_number_of_outputs_is_named(tmp_path):
    write_image(tmp_path / IMAGENETTE[0], 1)
    with pytest.raises(ValueError, match="7 outputs but 5 class ids"):
        evaluate_suites(LookupModel(torch.zeros(256, 7)), {"x": tmp_path}, IMAGENETTE, PLAIN, workers=0)


def test_results_table_json_and_csv(tmp_path):
    write_image(tmp_path / "data" / IMAGENETTE[0], 1)
    table = torch.zeros(256, 5)
    table[1, 0] = 1.0
    results = evaluate_suites(
        LookupModel(table), {"imagenet-val": tmp_path / "data", "imagenet-a": tmp_path / "data"}, IMAGENETTE,
        PLAIN, workers=0,
    )
    assert results[1].images == 0 and results[1].top1 is None  # no Imagenette class is in ImageNet-A
    text = format_results(results)
    assert "imagenet-val" in text and "100.00" in text and "imagenet-a" in text
    json_path, csv_path = write_results(results, tmp_path / "out" / "eval", metadata={"checkpoint": "x.pt"})
    saved = json.loads(json_path.read_text())
    assert saved["metadata"] == {"checkpoint": "x.pt"}
    assert [r["suite"] for r in saved["results"]] == ["imagenet-val", "imagenet-a"]
    rows = list(csv.DictReader(csv_path.open()))
    assert rows[0]["top1"] == "100.0" and rows[1]["skipped_classes"] == "1"


def test_cli_scores_a_checkpoint(tmp_path, capsys):
    from streamsynth.classifier.models import build_classifier, classifier_checkpoint
    from streamsynth.cli import main

    checkpoint = tmp_path / "model.pt"
    torch.save(classifier_checkpoint(build_classifier("resnet18", 5), "resnet18", IMAGENETTE, image_size=32), checkpoint)
    for image_id in range(3):
        write_image(tmp_path / "val" / IMAGENETTE[image_id], image_id)
        write_image(tmp_path / "v2" / str(IMAGENETTE_INDEX[IMAGENETTE[image_id]]), image_id)
    out = tmp_path / "results"
    code = main(["evaluate", str(checkpoint), "--imagenet-val", str(tmp_path / "val"), "--suite",
                 f"mine={tmp_path / 'v2'}", "--workers", "0", "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "imagenet-val" in printed and "mine" in printed
    assert f"wrote {out / 'eval.json'} and {out / 'eval.csv'}" in printed
    saved = json.loads((out / "eval.json").read_text())
    assert [(r["suite"], r["images"]) for r in saved["results"]] == [("imagenet-val", 3), ("mine", 3)]
    assert main(["evaluate", str(checkpoint), "--workers", "0"]) == 2  # no suite given: a clear error, no traceback


def test_numeric_folders_that_are_the_models_own_class_ids_are_not_imagenet_indices(tmp_path):
    class_ids = ["0", "1", "2"]  # a non-ImageNet dataset with numeric class ids
    table = torch.zeros(256, 3)
    for image_id, folder in [(1, "2"), (2, "0")]:
        table[image_id, int(folder)] = 1.0
        write_image(tmp_path / folder, image_id)
    [result] = evaluate_suites(LookupModel(table), {"custom": tmp_path}, class_ids, PLAIN, workers=0)
    assert (result.images, result.top1, result.skipped_folders) == (2, 100.0, [])


def test_the_subset_suites_are_the_classes_of_imagenet_a_and_r():
    """Not only 200 classes each: the very wnids, checked against timm's other list of them (ImageNet-1K indices) and
    against classes named here, so that one suite's list cannot stand in for the other's."""
    import pkgutil

    from streamsynth.captions.classnames import imagenet_classes

    wnids, names = zip(*imagenet_classes())
    for suite, indices in (("imagenet-a", "imagenet_a_indices.txt"), ("imagenet-r", "imagenet_r_indices.txt")):
        listed = pkgutil.get_data("timm.data", f"_info/{indices}").decode().split()
        assert suite_classes(suite) == {wnids[int(i)] for i in listed}
    a, r = suite_classes("imagenet-a"), suite_classes("imagenet-r")
    assert sorted(a)[:5] == ["n01498041", "n01531178", "n01534433", "n01558993", "n01580077"]
    assert sorted(r)[:5] == ["n01443537", "n01484850", "n01494475", "n01498041", "n01514859"]
    assert {"stingray", "goldfinch", "junco"} <= {names[wnids.index(w)] for w in a}
    assert "goldfish" in {names[wnids.index(w)] for w in r} and "goldfish" not in {names[wnids.index(w)] for w in a}
