"""train.py's recipe through its documented functions: the schedule under --accum_steps, what --resume
applies or refuses, mixup's even batches, a frozen backbone's BatchNorm, and --config values held to the
command line's rules."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
from kit import decision  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402
from kit.common import UserError  # noqa: E402
from model import check_model_name  # noqa: E402
from dataset import HalfCutMix, build_table, rarest_classes, training_labels  # noqa: E402
from kit.predict import load_run  # noqa: E402
from support import one_line_error  # noqa: E402

SAMPLE = ROOT / "sample" / "train"
EVAL = ROOT / "sample" / "eval"
TINY = ["--people", "off", "--data_dir", str(SAMPLE), "--model", "test_resnet", "--no-pretrained", "--resize", "64", "48",
        "--num_workers", "0", "--no-report", "--lr", "5e-3"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def lr_by_epoch(tmp_path, name, *args):
    """The lr at the end of each epoch of fold 0 (4 epochs)."""
    train.main([*TINY, "--epochs", "4", "--fold", "0", "--model_dir", str(tmp_path), "--name", name, *map(str, args)])
    return pd.read_csv(tmp_path / name / "log.csv")["lr"].tolist()


def test_accumulated_batches_follow_the_same_schedule(tmp_path):
    """16 images x 2 accumulated batches step the optimizer as often as 32 x 1, so warm-up and cosine end at
    the same epochs (the schedule once ran accum_steps times too fast)."""
    whole = lr_by_epoch(tmp_path, "b32", "--batch_size", 32)
    accumulated = lr_by_epoch(tmp_path, "b16x2", "--batch_size", 16, "--accum_steps", 2)
    assert whole[0] > 0.003 and whole[-1] < 1e-4  # warmed up by epoch 1, decayed by epoch 4
    for a, b in zip(whole, accumulated):
        assert abs(a - b) <= 0.1 * a, (whole, accumulated)


def test_resume_applies_the_safe_flags_and_refuses_the_others(tmp_path):
    train.main([*TINY, "--epochs", "2", "--folds", "2", "--fold", "0", "--batch_size", "32", "--model_dir",
                str(tmp_path), "--name", "run"])
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="--lr, --model cannot change"):
        train.main(["--resume", str(run_dir), "--lr", "0.1", "--model", "resnet18"])
    train.main(["--resume", str(run_dir), "--fold", "1", "--epochs", "3", "--num_workers", "0"])
    log = pd.read_csv(run_dir / "log.csv")
    assert log.groupby("fold")["epoch"].max().to_dict() == {0: 2, 1: 3}
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2  # the run's own record is kept


def test_mixup_needs_an_even_batch(tmp_path):
    with pytest.raises(UserError, match="even --batch_size, not 31"):
        train.parse_args([*TINY, "--mixup", "0.2", "--batch_size", "31"])
    assert train.parse_args([*TINY, "--mixup", "0.2", "--batch_size", "32"]).batch_size == 32


def one_epoch_states(tmp_path, *flags):
    """(fold, state before, state after) of one training epoch on 48 sample images with these flags."""
    cfg, table, _ = train.run_settings(train.parse_args([*TINY, "--batch_size", "16", *flags]), tmp_path / "run")
    rows = table.head(48)
    loader = train.make_loader(rows, cfg, True)
    fold = train.build_fold(cfg, rows, len(loader), torch.device("cpu"))
    before = {k: v.clone() for k, v in fold.model.state_dict().items()}
    loader.sampler.set_epoch(1, 0)
    train.train_one_epoch(fold, loader, cfg, torch.device("cpu"), 0, show=False)
    return fold, before, fold.model.state_dict()


def test_frozen_backbone_keeps_its_batchnorm_statistics_on_the_image_path(tmp_path):
    """--freeze_backbone without the feature cache trains the head on images; BatchNorm keeps what it loaded."""
    fold, before, after = one_epoch_states(tmp_path, "--freeze_backbone", "--no-feature_cache", "--augmentation",
                                           "strong")
    head = {"backbone." + k for k in fold.model.backbone.get_classifier().state_dict(prefix="fc.")}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in head)  # running stats too
    assert any(not torch.equal(before[k], after[k]) for k in head)


def test_freeze_blocks_keeps_the_stem_and_first_blocks_as_loaded(tmp_path):
    """--freeze_blocks 1: the stem and layer1 (weights and BatchNorm statistics) stay as loaded, later layers and
    the head learn; more groups than the backbone has is one line."""
    _, before, after = one_epoch_states(tmp_path, "--freeze_blocks", "1")
    early = [k for k in before if k.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))]
    late = [k for k in before if k.startswith(("backbone.layer2.", "backbone.layer3.", "backbone.fc."))
            and before[k].is_floating_point()]
    assert early and all(torch.equal(before[k], after[k]) for k in early)  # running stats too
    assert late and all(not torch.equal(before[k], after[k]) for k in late if k.endswith("weight"))
    message = one_line_error(lambda: train.run_settings(train.parse_args([*TINY, "--freeze_blocks", "9"]),
                                                        tmp_path / "run2"))
    assert "--freeze_blocks 9" in message and "at most 3" in message and not (tmp_path / "run2").exists()


@pytest.mark.parametrize("settings, message", [
    ("resize: 64x\n", "resize: '64x' is not what --resize takes"),
    ("epochs: 0\n", "epochs: 0 is not what --epochs takes (0 must be >= 1)"),
    ("amp: fast\n", "amp: 'fast' is not one of auto, bf16, fp16, off"),
    ("ema: 'yes'\n", "ema: 'yes' must be true or false"),
    ("epochs: [1, 2\n", "is not readable YAML/JSON"),
])
def test_config_values_are_checked_like_the_command_line(tmp_path, settings, message):
    path = tmp_path / "bad.yaml"
    path.write_text(settings)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train.parse_args([*TINY, "--config", str(path)])


def test_config_value_of_the_right_type_is_taken(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("resize: 96\nepochs: 3\nema: true\nlr: 1e-3\n")
    args = train.parse_args(["--config", str(path), "--epochs", "5"])
    assert (args.resize, args.epochs, args.ema, args.lr) == ([96], 5, True, 1e-3)


def test_out_of_range_numbers_are_one_line_before_anything_is_read(tmp_path):
    for flag, value in (("--epochs", "0"), ("--folds", "0"), ("--lr", "-1"), ("--batch_size", "0")):
        result = subprocess.run([sys.executable, "train.py", *TINY, flag, value, "--model_dir", str(tmp_path)],
                                cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and flag in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())


# ---- the top teams' tricks ------------------------------------------------------------------------
def test_train_age_bounds_move_training_labels_only(tmp_path):
    """--train_age_bounds 30 58: people of 58-59 train as old; OOF and folds.csv keep the competition's labels."""
    table = build_table(SAMPLE, folds=2)[0]
    shifted = training_labels(table, (30, 58))
    moved = table["age"].isin([58, 59]).to_numpy()
    assert moved.any() and (shifted[moved] == table["label"].to_numpy()[moved] + 1).all()
    assert (shifted[~moved] == table["label"].to_numpy()[~moved]).all()
    train.main([*TINY, "--epochs", "1", "--folds", "2", "--fold", "0", "--batch_size", "32", "--train_age_bounds",
                "30", "58", "--model_dir", str(tmp_path), "--name", "old58"])
    oof, folds = (pd.read_csv(tmp_path / "old58" / name) for name in ("oof.csv", "folds.csv"))
    assert oof["label"].tolist() == folds.set_index("path").loc[oof["path"], "label"].tolist()
    assert json.loads((tmp_path / "old58" / "config.json").read_text())["classes"][2].endswith(">=60")


def test_pseudo_labels_join_training_never_validation(tiny_run_dir, tmp_path):
    """Confident test predictions of the teacher's fold-k model train fold k; OOF still holds only the training
    images. (A whole-run probs.csv, which this once took, is refused: tests/test_honest.py.)"""
    files = [str(EVAL / "images" / i) for i in pd.read_csv(EVAL / "info.csv")["ImageID"]]
    confidence = np.concatenate([inference.predict_files(*load_run(tiny_run_dir, [k]), files, torch.device("cpu"),
                                                         tta=True).max(1) for k in (0, 1)])
    threshold = float(np.median(confidence))  # a weak tiny model: about half its predictions pass
    expected = int((confidence >= threshold).sum())
    assert 0 < expected < len(confidence)
    train.main([*TINY, "--epochs", "1", "--folds", "2", "--batch_size", "32", "--pseudo_labels", str(tiny_run_dir),
                "--pseudo_dir", str(EVAL), "--pseudo_threshold", repr(threshold), "--model_dir", str(tmp_path),
                "--name", "pseudo"])
    run_dir = tmp_path / "pseudo"
    used, folds = pd.read_csv(run_dir / "pseudo_labels.csv"), pd.read_csv(run_dir / "folds.csv")
    pairs = folds.loc[folds["fold"] == -2, ["path", "teacher_fold"]]
    assert len(used) == expected and set(map(tuple, used[["path", "teacher_fold"]].to_numpy())) == set(
        map(tuple, pairs.to_numpy()))
    assert all(Path(p).parent == EVAL.resolve() / "images" for p in used["path"])
    assert len(pd.read_csv(run_dir / "oof.csv")) == 420 and not set(used["path"]) & set(pd.read_csv(
        run_dir / "oof.csv")["path"])
    with pytest.raises(UserError, match="run folder"):  # not a teacher run: nothing written
        train.main([*TINY, "--pseudo_labels", str(tmp_path / "pseudo" / "oof.csv"), "--pseudo_dir", str(EVAL),
                    "--model_dir", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()


def test_half_cutmix_keeps_each_half_whole_and_mixes_labels_by_area():
    torch.manual_seed(0)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 6).clone()  # image i is all i
    targets = torch.tensor([0, 1, 2, 3])
    mixed, soft = HalfCutMix(1.0, 5)(images, targets)
    for i in range(4):
        left, right = mixed[i, :, :, :3].unique(), mixed[i, :, :, 3:].unique()
        assert len(left) == 1 and len(right) == 1  # each half is one whole image's half
        assert sorted(torch.nonzero(soft[i]).flatten().tolist()) == sorted({int(left), int(right)})
        assert soft[i].sum() == 1 and (soft[i].max() == 1 or torch.allclose(soft[i][soft[i] > 0], torch.tensor(0.5)))
    unmixed, hard = HalfCutMix(0.0, 5)(images, targets)
    assert torch.equal(unmixed, images) and torch.equal(hard.argmax(1), targets)


def test_mix_rare_takes_the_other_half_from_the_rarest_classes():
    labels = np.array([0] * 50 + [1] * 40 + [2] * 3 + [3] * 30 + [4] * 2 + [5] * 20)
    assert rarest_classes(labels, 6) == [4, 2]  # the rarest third of the 6 present classes
    torch.manual_seed(1)
    targets = torch.tensor([0, 1, 2, 3, 5, 0, 1, 3])
    images = targets.float().view(-1, 1, 1, 1).expand(8, 3, 4, 4).clone()
    mixed, soft = HalfCutMix(1.0, 6, rarest_classes(labels, 6))(images, targets)
    assert (soft[:, 2] >= 0.5).all()  # every image got a half of the batch's one rare image (class 2)


# ---- the macro-F1 decision layer in the run folder ----------------------------------------------------
def test_run_end_fits_the_decision_layer_and_reports_it(tmp_path, capsys):
    train.main([*TINY, "--epochs", "3", "--folds", "3", "--batch_size", "32", "--report", "--model_dir",
                str(tmp_path), "--name", "dec"])
    run_dir = tmp_path / "dec"
    rule = decision.from_json(run_dir / "decision.json", 18)
    assert rule.rule == "prior" and set(rule.temperature_check) and len(rule.per_class_f1_after) == 18
    assert rule.oof_macro_f1 == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["oof_macro_f1"])
    assert rule.applied == (rule.cross_fitted_macro_f1 > rule.oof_macro_f1 and rule.robust)
    assert "cross-fitted OOF macro F1" in capsys.readouterr().out
    assert "Decision layer: prior" in (run_dir / "report.html").read_text()


def test_inference_answers_with_an_applied_rule_and_records_it(tiny_run_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    prior = np.full(18, 1 / 18)
    prior[:6] = 0.15  # "worn" classes common: the rule moves answers away from them
    rule = decision.DecisionRule("prior", {"tau": 1.5}, (prior / prior.sum()).tolist(), 18, applied=True, robust=True)
    rule.to_json(run_dir / "decision.json")
    answers = {}
    for mode in ("auto", "off"):
        inference.main(["--data_dir", str(EVAL), "--model_dir", str(run_dir), "--output_dir", str(tmp_path / mode),
                        "--num_workers", "0", "--decision", mode])
        answers[mode] = pd.read_csv(tmp_path / mode / "output.csv")["ans"].to_numpy()
    probs = pd.read_csv(tmp_path / "auto" / "probs.csv").filter(like="p").to_numpy()
    assert (answers["off"] == probs.argmax(1)).all()
    assert (answers["auto"] == rule.predict(probs)).mean() > 0.98 and (answers["auto"] != answers["off"]).any()
    recorded = json.loads((tmp_path / "auto" / "output_manifest.json").read_text())["decision"]
    assert recorded["params"] == {"tau": 1.5} and json.loads(
        (tmp_path / "off" / "output_manifest.json").read_text())["decision"] is None
    decision.DecisionRule("prior", {"tau": 1.0}, [0.2] * 5, 5, applied=True).to_json(run_dir / "decision.json")
    with pytest.raises(UserError, match="decision.json is for 5 classes"):
        inference.main(["--data_dir", str(EVAL), "--model_dir", str(run_dir), "--output_dir", str(tmp_path / "x"),
                        "--num_workers", "0"])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_are_valid_settings(recipe):
    """Every recipe parses with train.py's own checks and names a timm model; its run folder is its name."""
    args = train.parse_args(["--config", str(recipe)])
    check_model_name(args.model)
    assert args.name == recipe.stem and args.head == "multi" and args.decision != "off"
