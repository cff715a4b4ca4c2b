"""Membership inference: the attack arithmetic, a memorised model (leaks) and two unseen sets (does not)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from streamsynth.classifier.models import build_classifier, classifier_checkpoint, load_classifier
from streamsynth.cli import main
from streamsynth.classifier.evaluate import LabelledImageFolder, eval_transform
from streamsynth.classifier.privacy import MembershipAudit, audit_membership, threshold_attack

CLASS_IDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079"]
IMAGE_SIZE = 32


def test_threshold_attack_by_hand():
    # thresholds 0.9 and 0.8 both give (TPR, FPR) = (1/2, 0) and (1, 1/2): balanced 3/4; 3 of 4 pairs ordered.
    balanced, threshold, auc = threshold_attack(np.array([0.9, 0.8]), np.array([0.1, 0.85]))
    assert (balanced, threshold, auc) == (0.75, 0.9, 0.75)
    assert threshold_attack(np.array([0.5, 0.5]), np.array([0.5])) == (0.5, np.inf, 0.5)  # ties tell nothing
    assert threshold_attack(np.array([2.0, 3.0]), np.array([0.0, 1.0]))[::2] == (1.0, 1.0)


def test_chance_levels_match_simulated_no_leakage_audits():
    rng = np.random.default_rng(0)
    m, n, trials = 120, 200, 400
    best = np.array([threshold_attack(rng.normal(size=m), rng.normal(size=n))[0] for _ in range(trials)])
    audit = MembershipAudit(m, n, 0.5, 1.0, 0.5, 0.5, 0.5)
    # The asymptotic mean overstates small samples a little; 0.01 is ~4 standard errors of the simulated mean.
    assert best.mean() == pytest.approx(audit.chance_mean, abs=0.01)
    assert 0.01 <= (best > audit.chance_95).mean() <= 0.10


def write_random_folder(root: Path, count: int, rng: np.random.Generator) -> None:
    """Noise images with random labels: nothing to learn, so confidence on them can only come from memorising."""
    for i in range(count):
        folder = root / CLASS_IDS[rng.integers(len(CLASS_IDS))]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A resnet18 checkpoint that fits 64 random member images, and two disjoint sets of 150 unseen ones."""
    root = tmp_path_factory.mktemp("privacy")
    rng = np.random.default_rng(0)
    for name, count in [("members", 64), ("unseen_a", 150), ("unseen_b", 150)]:
        write_random_folder(root / name, count, rng)
    members = LabelledImageFolder(
        root / "members", {cid: i for i, cid in enumerate(CLASS_IDS) if (root / "members" / cid).is_dir()},
        eval_transform(IMAGE_SIZE),
    )
    images = torch.stack([image for image, _ in members])
    labels = torch.tensor(members.targets)
    torch.manual_seed(0)
    model = build_classifier("resnet18", len(CLASS_IDS))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(1, 61):
        model.train()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # The training loss is ~0 within 10 steps; eval mode fits once BatchNorm's running statistics catch up.
        if step % 5 == 0:
            with torch.no_grad():
                fitted = (model.eval()(images).argmax(1) == labels).float().mean()
            if fitted == 1.0:
                break
    assert fitted > 0.95, "the model failed to memorise its members"
    checkpoint = root / "model.pt"
    torch.save(classifier_checkpoint(model, "resnet18", CLASS_IDS, image_size=IMAGE_SIZE), checkpoint)
    return root, checkpoint


@pytest.mark.slow
def test_memorised_members_are_exposed(memorised):
    root, checkpoint = memorised
    model, saved = load_classifier(checkpoint)
    audit = audit_membership(model, root / "members", root / "unseen_a", saved["class_ids"],
                             eval_transform(IMAGE_SIZE), workers=0)
    assert (audit.members, audit.non_members) == (64, 150)
    assert audit.balanced_accuracy > 0.85 and audit.auc > 0.9
    assert audit.balanced_accuracy > audit.chance_95
    assert "LEAKAGE" in audit.report()


def test_two_unseen_sets_are_indistinguishable(memorised):
    root, checkpoint = memorised
    model, saved = load_classifier(checkpoint)
    audit = audit_membership(model, root / "unseen_a", root / "unseen_b", saved["class_ids"],
                             eval_transform(IMAGE_SIZE), workers=0)
    assert abs(audit.balanced_accuracy - 0.5) <= 0.15
    assert abs(audit.auc - 0.5) <= 0.15


def test_cli_prints_how_to_read_it_and_writes_json(memorised, tmp_path, capsys):
    root, checkpoint = memorised
    out = tmp_path / "audit"
    code = main(["audit-privacy", str(checkpoint), "--members", str(root / "members"),
                 "--non-members", str(root / "unseen_a"), "--workers", "0", "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best balanced accuracy" in printed and "50% means" in printed
    assert f"wrote {out / 'audit.json'}" in printed
    result = json.loads((out / "audit.json").read_text())
    assert result["members"] == 64 and result["balanced_accuracy"] > 0.85


def test_checkpoint_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_classifier(tmp_path / "missing.pt")
    torch.save({"model": {}, "arch": "resnet18"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"lacks the checkpoint fields \['num_classes', 'class_ids'\]"):
        load_classifier(tmp_path / "partial.pt")
    torch.save(classifier_checkpoint(build_classifier("resnet18", 3), "resnet18", CLASS_IDS), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit a resnet18 with 5 classes"):
        load_classifier(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unknown classifier architecture 'resnet-18'"):
        build_classifier("resnet-18", 5)
