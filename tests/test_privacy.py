"""Membership inference: the attack arithmetic, a memorised model (leaks) and two unseen sets (does not); LiRA and
RMIA with shadow models, on a classifier overfitted to its members (leaks) and with members and non-members exchanged
at random (does not); the generator's memorisation check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from streamsynth.classifier.attacks import auc_chance_95, chance_tpr, evaluate_attack
from streamsynth.classifier.checkpoints import CheckpointError
from streamsynth.classifier.evaluate import LabelledImageFolder, eval_transform
from streamsynth.classifier.memorisation import memorisation_check
from streamsynth.classifier.models import build_classifier, classifier_checkpoint, load_classifier
from streamsynth.classifier.privacy import MembershipAudit, audit_membership, membership_attacks, threshold_attack
from streamsynth.classifier.recipe import TrainingRecipe, recipe_from_checkpoint, train_classifier
from streamsynth.classifier.shadows import shadow_memberships, train_shadow_models, true_class_signals
from streamsynth.cli import main

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


# ----- LiRA and RMIA: the figures, the shadow models, the acceptance pair -----------------------------------------


def test_tpr_at_low_fpr_by_hand():
    non_members = np.arange(1000) / 1000  # 0.000 .. 0.999
    scores = np.concatenate([[2.0, 1.5, 0.9995, 0.5], non_members])
    is_member = np.arange(len(scores)) < 4
    result = evaluate_attack("by hand", scores, is_member)
    strict, one_percent = result.points
    # One false positive (0.999) is 0.1% of 1,000: the three members above it are found, the fourth is not.
    assert (strict.label(), strict.resolved, strict.false_positives, strict.tpr) == ("FPR <= 0.1%", True, 1, 0.75)
    assert (one_percent.false_positives, one_percent.tpr) == (10, 0.75)
    assert result.auc == pytest.approx((3 * 1000 + 500.5) / 4000)  # 0.5 ties with one non-member: half a pair
    assert strict.chance_mean == pytest.approx(2 / 1001)
    # 500 non-members (0.000 .. 0.499) cannot resolve 0.1%: the point says what it is instead.
    coarse = evaluate_attack("coarse", scores[:504], is_member[:504]).points[0]
    assert (coarse.label(), coarse.resolved, coarse.fpr_bound, coarse.false_positives) == ("FPR <= 1/500", False,
                                                                                           0.002, 1)
    assert coarse.tpr == 1.0


def test_tpr_chance_levels_match_simulated_no_signal_audits():
    rng = np.random.default_rng(0)
    m, n, trials = 100, 400, 300
    points = [evaluate_attack("noise", rng.normal(size=m + n), np.arange(m + n) < m).points[0] for _ in range(trials)]
    tprs = np.array([p.tpr for p in points])
    # The mean of 300 beta-binomial TPRs has a standard error of about 0.001 here.
    assert tprs.mean() == pytest.approx(points[0].chance_mean, abs=0.004)
    assert (tprs > points[0].chance_95).mean() <= 0.06


def test_each_image_is_in_half_of_the_shadow_models():
    audited = np.arange(40) >= 10
    online = shadow_memberships(40, 6, audited, online=True, seed=0)
    assert (online.sum(axis=0) == 3).all()
    offline = shadow_memberships(40, 4, audited, online=False, seed=0)
    assert (offline[:, audited] == 0).all() and (offline[:, ~audited].sum(axis=0) == 2).all()
    assert not (shadow_memberships(40, 6, audited, True, seed=1) == online).all()
    for count, mode in [(2, True), (5, True), (3, False)]:
        with pytest.raises(ValueError, match="give an even number"):
            shadow_memberships(40, count, audited, mode, seed=0)


NOISE_SIZE = 8


@pytest.fixture(scope="module")
def overfitted():
    """Noise images with random labels, nothing to learn: a classifier trained on 60 of them (the members) can only
    be confident on them by memorising them. Also 100 population images and 1,000 non-members, all with their
    signals under the classifier."""
    generator = torch.Generator().manual_seed(0)
    population, members, non_members = 100, 60, 1000
    count = population + members + non_members
    images = torch.randn(count, 3, NOISE_SIZE, NOISE_SIZE, generator=generator)
    labels = torch.randint(0, len(CLASS_IDS), (count,), generator=generator)
    recipe = TrainingRecipe("test_resnet", len(CLASS_IDS), NOISE_SIZE, steps=60, batch_size=32, peak_lr=0.1,
                            label_smoothing=0.0)

    def batches_of(indices: np.ndarray, seed: int):
        shuffle = torch.Generator().manual_seed(seed)
        indices = torch.as_tensor(indices)
        while True:
            order = indices[torch.randperm(len(indices), generator=shuffle)]
            for start in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
                yield images[order[start:start + recipe.batch_size]], labels[order[start:start + recipe.batch_size]]

    target = train_classifier(recipe, batches_of(np.arange(population, population + members), 1), seed=1)
    return dict(images=images, labels=labels, recipe=recipe, batches_of=batches_of, population=population,
                members=members, signals=true_class_signals(target, images, labels))


@pytest.fixture(scope="module", params=["offline", "online"])
def shadow_audit(request, overfitted):
    """The pool and four shadow models' signals on it. Offline: all 1,000 non-members (0.1% FPR is resolved);
    online, where the shadow models train on the audited images too: 200 of them, to keep the test short."""
    online = request.param == "online"
    pool = np.arange(overfitted["population"] + overfitted["members"] + (200 if online else 1000))
    audited = pool >= overfitted["population"]
    is_member = pool[audited] < overfitted["population"] + overfitted["members"]
    memberships = shadow_memberships(len(pool), 4, audited, online, seed=0)
    images, labels = overfitted["images"][pool], overfitted["labels"][pool]
    shadows = train_shadow_models(overfitted["recipe"], memberships, overfitted["batches_of"],
                                  lambda model: true_class_signals(model, images, labels))
    log_p, logit = (signal[pool] for signal in overfitted["signals"])
    return dict(online=online, audited=audited, is_member=is_member,
                run=lambda truth: membership_attacks(log_p, logit, shadows.log_confidence, shadows.logit_confidence,
                                                     memberships, audited, truth, online))


def test_the_audit_finds_members_of_an_overfitted_classifier(shadow_audit):
    attacks = shadow_audit["run"](shadow_audit["is_member"])
    assert [a.attack.split(" ")[0] for a in attacks] == ["confidence", "LiRA", "RMIA"]
    for attack in attacks:
        lowest = attack.points[0]
        assert lowest.resolved != shadow_audit["online"]  # offline: 1,000 non-members resolve 0.1%
        # Far above the FPR, and beyond what 999 in 1,000 audits of a score without membership signal reach.
        no_signal = chance_tpr(shadow_audit["is_member"].sum(), (~shadow_audit["is_member"]).sum(), 1, 0.999)
        assert lowest.tpr >= 10 * lowest.fpr_bound and lowest.tpr > no_signal, (attack.attack, lowest)
        assert attack.auc > 0.9


def test_members_and_non_members_exchanged_at_random_show_no_leakage(shadow_audit):
    truth = np.random.default_rng(0).permutation(shadow_audit["is_member"])
    members, non_members = int(truth.sum()), int((~truth).sum())
    spread = (auc_chance_95(members, non_members) - 0.5) / 1.645
    for attack in shadow_audit["run"](truth):
        for point in attack.points:
            assert point.tpr <= chance_tpr(members, non_members, point.false_positives, 0.999), (attack.attack, point)
        assert abs(attack.auc - 0.5) <= 4 * spread, attack.attack


def test_the_recipe_comes_from_the_checkpoint_and_the_flags():
    recorded = {"arch": "test_resnet", "num_classes": 10, "image_size": 16, "data": [{}, {}],
                "args": {"steps": 300, "batch_size": 32, "accum_steps": 2, "lr": 0.2, "warmup_steps": 6,
                         "weight_decay": 1e-4, "label_smoothing": 0.0, "lr_schedule": "step"}}
    recipe = recipe_from_checkpoint(recorded)
    # Two ranks x 2 micro-batches x 32: one optimizer step of 128 images; train.py's lr is for batch 256.
    assert (recipe.batch_size, recipe.peak_lr, recipe.steps, recipe.warmup) == (128, 0.1, 300, 6)
    assert (recipe.weight_decay, recipe.label_smoothing, recipe.lr_schedule) == (1e-4, 0.0, "step")
    shorter = recipe_from_checkpoint(recorded, steps=100, batch_size=64, lr=0.4)
    assert (shorter.steps, shorter.batch_size, shorter.peak_lr, shorter.warmup) == (100, 64, 0.1, 2)
    with pytest.raises(CheckpointError, match="m.pt does not record its training steps, batch size, lr .* give "
                       "--shadow-steps"):
        recipe_from_checkpoint({"arch": "test_resnet", "num_classes": 10}, "m.pt")


@pytest.fixture(scope="module")
def small_audit_folders(tmp_path_factory):
    """A test_resnet checkpoint with train.py's recorded arguments, and three small ImageFolders of 8x8 noise (one
    corrupt population image among them)."""
    root = tmp_path_factory.mktemp("reference-audit")
    rng = np.random.default_rng(1)
    for name, count in [("population", 40), ("members", 24), ("non_members", 24)]:
        for i in range(count):
            folder = root / name / CLASS_IDS[i % len(CLASS_IDS)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (root / "population" / CLASS_IDS[0] / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    torch.save(classifier_checkpoint(build_classifier("test_resnet", len(CLASS_IDS)), "test_resnet", CLASS_IDS,
                                     image_size=8, args={"steps": 10, "batch_size": 8, "lr": 0.1}), checkpoint)
    return root, checkpoint


def test_cli_runs_lira_and_rmia_and_states_the_cost(small_audit_folders, tmp_path, capsys):
    root, checkpoint = small_audit_folders
    out = tmp_path / "audit"
    code = main(["audit-privacy", str(checkpoint), "--members", str(root / "members"), "--non-members",
                 str(root / "non_members"), "--population", str(root / "population"), "--shadow-models", "2",
                 "--shadow-mode", "offline", "--workers", "0", "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best balanced accuracy" in printed  # the paper's figures stay
    assert "each shadow model: test_resnet at 8 px, 10 steps of batch 8, peak lr 0.003125" in printed
    assert "cost: 2 models trained and scored in" in printed
    assert "TPR at FPR <= 1/24" in printed and "0.1% FPR is below what 24 non-members resolve" in printed
    assert "1 unreadable images were left out" in printed
    reference = json.loads((out / "audit.json").read_text())["reference_attacks"]
    assert (reference["shadow_models"], reference["online"], reference["population"]) == (2, False, 40)
    assert [a["attack"] for a in reference["attacks"]] == ["confidence threshold", "LiRA (offline)", "RMIA (offline)"]
    for attack in reference["attacks"]:
        assert attack["roc_fpr"][0] == 0 and attack["roc_fpr"][-1] == 1 and 0 <= attack["auc"] <= 1
        assert [p["fpr_target"] for p in attack["points"]] == [0.001, 0.01]
    assert reference["seconds"] > 0


def test_shadow_flags_without_a_population_are_one_line(small_audit_folders, capsys):
    root, checkpoint = small_audit_folders
    assert main(["audit-privacy", str(checkpoint), "--members", str(root / "members"), "--non-members",
                 str(root / "non_members"), "--shadow-models", "4", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--shadow-models set the shadow models of LiRA and RMIA, which need --population DIR" in err


def test_without_scikit_learn_the_audit_is_one_line_naming_the_extra(small_audit_folders, monkeypatch, capsys):
    root, checkpoint = small_audit_folders
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    assert main(["audit-privacy", str(checkpoint), "--members", str(root / "members"), "--non-members",
                 str(root / "non_members"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "streamsynth[audit]"' in err and "Traceback" not in err


def test_the_memorisation_check_finds_copies_and_passes_fresh_images():
    rng = np.random.default_rng(0)
    training, held_out, fresh = (torch.from_numpy(rng.random((n, 64))) for n in (400, 300, 300))
    copies = training[:30] + torch.from_numpy(rng.normal(scale=0.01, size=(30, 64)))
    copying = memorisation_check(torch.cat([copies, fresh[30:]]), held_out, training, "test vectors")
    assert copying.near_copies >= 30 and copying.near_copy_fraction > copying.chance_95
    assert {pair["training"] for pair in copying.closest} <= set(range(30))
    assert "NEAR COPIES" in copying.report()
    honest = memorisation_check(fresh, held_out, training, "test vectors")
    assert honest.near_copy_fraction <= honest.chance_95 and abs(honest.closer_auc - 0.5) < 0.1
    assert honest.training_quantiles["1%"] > 0  # each training vector's nearest other one, not itself
    assert "no sign of copying" in honest.report()


def test_the_digits_memorisation_check_sees_the_training_digits_as_copies():
    from streamsynth.digits.data import digit_pixels, digits_to_uint8, train_indices
    from streamsynth.digits.memorisation import digits_memorisation_check

    part = train_indices()
    training = digits_to_uint8(digit_pixels()[part.start:part.start + 50], 8)
    check = digits_memorisation_check(training)
    assert check.near_copies == 50 and check.synthetic_quantiles["50%"] == 0.0
    assert (check.training, check.held_out) == (1297, 500) and "pixels" in check.feature_space
