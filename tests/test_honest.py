"""Every score the kit prints is one the leaderboard would confirm: corrections and pseudo-labels change what a model
learns, never what it is scored against; a run is predicted the way it was trained (finished folds, EMA weights,
face crops) or refused; seeds, the decision prior, the lr of parameter groups, accumulation and the image cache do
what they say; a refused decision rule says why; the last epoch's OOF stands next to the best epoch's."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
import inference  # noqa: E402
import train  # noqa: E402
from dataset import build_table, mask_class_names, training_labels  # noqa: E402
from kit import decision, runs, speed  # noqa: E402
from kit.common import UserError  # noqa: E402
from kit.predict import load_run  # noqa: E402
from support import one_line_error  # noqa: E402

SAMPLE, EVAL = ROOT / "sample" / "train", ROOT / "sample" / "eval"
TINY = ["--people", "off", "--data_dir", str(SAMPLE), "--model", "test_resnet", "--no-pretrained", "--resize", "32", "--batch_size",
        "32", "--num_workers", "0", "--no-report", "--folds", "2", "--head", "single", "--lr", "5e-3"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_run(tmp_path, name, *args):
    train.main([*TINY, "--model_dir", str(tmp_path), "--name", name, *map(str, args)])
    return tmp_path / name


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """Two folds, three epochs, an EMA of the weights: the teacher and the subject of several tests."""
    return tiny_run(tmp_path_factory.mktemp("ema"), "ema", "--epochs", 3, "--ema", "--ema_decay", 0.9,
                    "--decision", "off")


# ---- 1. corrections ----------------------------------------------------------------------------------------------
def corrections(tmp_path):
    """A drop list of one person's 7 pictures and a relabel list moving one picture to another class."""
    table = build_table(SAMPLE, folds=2)[0]
    person = table["profile"].iloc[0]
    moved = table[table["profile"] != person].iloc[0]
    new_class = mask_class_names()[(moved["label"] + 7) % 18]
    pd.DataFrame({"profile": [person]}).to_csv(tmp_path / "drop.csv", index=False)
    pd.DataFrame({"path": [moved["path"]], "field": ["label"], "value": [new_class]}).to_csv(
        tmp_path / "relabel.csv", index=False)
    return table, person, moved, mask_class_names().index(new_class)


def test_corrections_change_what_is_learned_never_what_is_scored(tmp_path):
    table, person, moved, new_label = corrections(tmp_path)
    fixed = build_table(SAMPLE, folds=2, drop_list=tmp_path / "drop.csv", relabel_list=tmp_path / "relabel.csv")[0]
    assert fixed[["path", "label", "fold"]].equals(table[["path", "label", "fold"]])  # same rows, labels, folds
    at = fixed.set_index("path")
    assert training_labels(at.loc[[moved["path"]]])[0] == new_label
    run = tiny_run(tmp_path, "fixed", "--epochs", 1, "--drop_list", tmp_path / "drop.csv", "--relabel_list",
                   tmp_path / "relabel.csv")
    oof = pd.read_csv(run / "oof.csv", dtype={"profile": str})
    assert len(oof) == len(table) and (oof["profile"] == person).sum() == 7  # dropped pictures still scored
    assert oof.set_index("path").loc[moved["path"], "label"] == moved["label"]  # on their given label
    trained = pd.read_csv(run / "folds.csv", dtype={"profile": str})
    assert (trained.loc[trained["profile"] == person, "train_label"] == -1).all()


def test_a_label_fix_survives_other_training_age_bounds(tmp_path):
    """--train_age_bounds rebuilds the age group from the age; a field=label fix must stay what is learned."""
    table, _, moved, new_label = corrections(tmp_path)
    fixed = build_table(SAMPLE, folds=2, relabel_list=tmp_path / "relabel.csv")[0].set_index("path")
    learned = training_labels(fixed.loc[[moved["path"]]], (30, 58))[0]
    assert learned // 3 == new_label // 3  # mask and gender of the fix
    # the age group: the fix's when it changed it, else the age's under the training bounds
    expected_age = new_label % 3 if new_label % 3 != moved["label"] % 3 else int(np.digitize(moved["age"], (30, 58)))
    assert learned % 3 == expected_age


# ---- 2. pseudo-labels ----------------------------------------------------------------------------------------------
def test_pseudo_labels_of_fold_k_come_from_the_teacher_that_never_saw_fold_k(tmp_path, ema_run):
    student = tiny_run(tmp_path, "student", "--epochs", 1, "--pseudo_labels", ema_run, "--pseudo_dir", EVAL,
                       "--pseudo_threshold", 0.08)  # a weak tiny teacher: most of its answers
    pseudo = pd.read_csv(student / "pseudo_labels.csv")
    assert set(pseudo["teacher_fold"]) == {0, 1}
    for fold in (0, 1):
        models, config = load_run(ema_run, [fold])
        expected = inference.predict_files(models, config, pseudo.loc[pseudo["teacher_fold"] == fold, "path"].tolist(),
                                           torch.device("cpu"), tta=True)
        assert (expected.argmax(1) == pseudo.loc[pseudo["teacher_fold"] == fold, "label"].to_numpy()).all()
        assert np.allclose(expected.max(1), pseudo.loc[pseudo["teacher_fold"] == fold, "confidence"], atol=1e-5)
    folds = pd.read_csv(student / "folds.csv")
    for fold in (0, 1):  # fold k trains on its own teacher's pseudo-labels only
        rows = train.fold_rows(folds, fold)[0]
        assert set(rows.loc[rows["fold"] == -2, "teacher_fold"]) == {fold}


def test_a_whole_run_ensemble_or_other_folds_are_refused_as_teachers(tmp_path, ema_run):
    probs = tmp_path / "probs.csv"
    pd.DataFrame({"ImageID": ["a.jpg"], **{f"p{i}": [1 / 18] for i in range(18)}}).to_csv(probs, index=False)
    message = one_line_error(lambda: tiny_run(tmp_path, "s", "--pseudo_labels", probs))
    assert "--pseudo_labels" in message and "run folder" in message
    other = one_line_error(lambda: tiny_run(tmp_path, "s", "--seed", 7, "--pseudo_labels", ema_run))
    assert "folds" in other and str(ema_run) in other
    assert not (tmp_path / "s").exists()


# ---- 3, 4. a run is predicted the way it was trained ---------------------------------------------------------------
def test_inference_uses_finished_folds_only(tmp_path, ema_run):
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    (run / "fold1" / "oof.csv").unlink()  # fold 1 interrupted: its best-so-far checkpoint is not a fold model
    models, _ = load_run(run)
    assert len(models) == 1
    assert "fold 1" in one_line_error(lambda: load_run(run, [1])) and "--resume" in one_line_error(
        lambda: load_run(run, [1]))


def test_checkpoint_last_of_an_ema_run_is_the_ema(ema_run):
    state = torch.load(ema_run / "fold0" / "last.pth", weights_only=False)
    ema = {k[len("module."):]: v for k, v in state["ema"].items()}
    model = load_run(ema_run, [0], which="last")[0][0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name
    assert any(not torch.equal(state["model"][k], ema[k]) for k in ema if ema[k].is_floating_point())


# ---- 5. face crops -------------------------------------------------------------------------------------------------
def boxes_csv(path, paths):
    pd.DataFrame({"path": paths, "x0": 20, "y0": 10, "x1": 76, "y1": 80}).to_csv(path, index=False)
    return path


def test_a_crop_run_is_refused_without_crop_and_only_crop_runs_get_the_boxes(tmp_path, ema_run):
    table = build_table(SAMPLE, folds=2)[0]
    crop_run = tiny_run(tmp_path, "crop", "--epochs", 1, "--crop", boxes_csv(tmp_path / "b.csv", table["path"]),
                        "--decision", "off")
    argv = ["--data_dir", str(EVAL), "--num_workers", "0", "--decision", "off"]
    message = one_line_error(lambda: inference.main([*argv, "--model_dir", str(crop_run), "--output_dir",
                                                     str(tmp_path / "none")]))
    assert "--crop" in message and not (tmp_path / "none").exists()
    info = pd.read_csv(EVAL / "info.csv")
    test_boxes = boxes_csv(tmp_path / "t.csv", [f"images/{i}" for i in info["ImageID"]])
    outputs = {}
    for name, dirs, crop in (("crop", [crop_run], True), ("whole", [ema_run], False), ("both", [crop_run, ema_run], True)):
        inference.main([*argv, "--model_dir", *map(str, dirs), "--output_dir", str(tmp_path / name),
                        *(["--crop", str(test_boxes)] if crop else [])])
        outputs[name] = pd.read_csv(tmp_path / name / "probs.csv").iloc[:, 1:].to_numpy()
    assert np.allclose(outputs["both"], (2 * outputs["crop"] + 2 * outputs["whole"]) / 4, atol=2e-6)


# ---- 6. seeds ------------------------------------------------------------------------------------------------------
def draws(epoch_seed, places=32):
    sampler = speed.SeededSampler(torch.utils.data.SequentialSampler(range(places)))
    sampler.set_epoch(epoch_seed, 0)
    out = []
    for _, seed in sampler:
        torch.default_generator.manual_seed(seed)  # what SeededDataset does for each image
        out.append(torch.rand(1).item())
    return out


def test_every_epoch_seed_draws_its_own_augmentation():
    sequences = [draws(s) for s in (42000, 42001, 7003, 123456789)]
    assert all(a != b for i, a in enumerate(sequences) for b in sequences[i + 1:])
    assert draws(42000) == sequences[0]  # and the same seed draws the same again
    assert len(set(sequences[0])) == len(sequences[0])  # every place its own draw


# ---- 7, 12. the decision layer ------------------------------------------------------------------------------------
def test_cross_fitting_takes_the_prior_from_the_other_folds_only():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, 600, p=[.55, .25, .15, .05])
    folds = np.repeat(np.arange(3), 200)
    labels[folds == 0] = np.where(rng.random(200) < .3, 3, labels[folds == 0])  # fold 0 holds most of the rare class
    probs = rng.dirichlet(np.ones(4), 600) * .5 + np.eye(4)[labels] * .5 * (rng.random((600, 1)) < .6)
    probs /= probs.sum(1, keepdims=True)
    rule = decision.fit(probs, labels, folds, decision.class_prior(labels, 4))
    expected = np.empty(600, int)
    grid = decision.param_grid("prior")
    for fold in range(3):
        held = folds == fold
        prior = decision.class_prior(labels[~held], 4)
        params = decision.best_params(probs[~held], labels[~held], prior, grid)
        expected[held] = decision.decide(probs[held], prior, params)
    assert rule.cross_fitted_macro_f1 == pytest.approx(decision.macro_f1(labels, expected, 4))


def rare_class_data(seed=1):
    """Probabilities that underrate the rare classes: the prior rule gains out of fold."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, 900, p=[.8, .15, .05])
    logits = rng.normal(0, 1, (900, 3)) + 2.0 * np.eye(3)[labels] + np.log([.8, .15, .05])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels, np.arange(900) % 3


def test_a_refused_rule_names_the_check_and_the_margin(monkeypatch):
    probs, labels, folds = rare_class_data()
    prior = decision.class_prior(labels, 3)
    rule = decision.fit(probs, labels, folds, prior)
    gain = rule.cross_fitted_macro_f1 - rule.oof_macro_f1
    assert rule.applied and gain > 0 and f"{gain:+.4f}" in rule.reason  # applied: the gain it rests on
    monkeypatch.setattr(decision, "temperature_check", lambda *a: {"0.5": 0.01, "2.0": -0.0123})
    refused = decision.fit(probs, labels, folds, prior)
    assert not refused.applied and "temperature 2.0" in refused.reason and "-0.0123" in refused.reason
    perfect = decision.fit(np.eye(3)[labels] * .9 + .1 / 3, labels, folds, prior)
    assert not perfect.applied and "+0.0000" in perfect.reason and "cross-fitted" in perfect.reason


# ---- 8, 9. the optimizer ------------------------------------------------------------------------------------------
def schedule(tmp_path, scale):
    cfg, table, _ = train.run_settings(train.parse_args([*TINY, "--backbone_lr_scale", str(scale), "--epochs", "4"]),
                                       tmp_path / "run")
    fold = train.build_fold(cfg, table, 10, torch.device("cpu"))
    rates = [[g["lr"] for g in fold.optimizer.param_groups]]
    for update in range(1, 41):
        fold.scheduler.step_update(update)
        rates.append([g["lr"] for g in fold.optimizer.param_groups])
    return np.array(rates)


@pytest.mark.parametrize("scale", [0.0, 0.001, 0.5])
def test_the_backbone_lr_is_the_heads_times_its_scale_at_every_update(tmp_path, scale):
    rates = schedule(tmp_path, scale)
    assert np.allclose(rates[:, 1], rates[:, 0] * scale, rtol=1e-9, atol=0)
    assert rates[-1, 0] < rates[10, 0]  # warmed up, then decayed


def test_a_short_last_accumulation_group_is_a_mean_not_a_fraction():
    """3 batches with --accum_steps 2: the last optimizer step holds one batch; its gradient is that batch's mean
    loss gradient, as a whole group's is its batches' mean."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(12, 3)

        def forward(self, images):
            return self.linear(images.float().flatten(1) / 255)
    torch.manual_seed(0)
    net = Net()
    batches = [(torch.randint(0, 255, (4, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 3, (4,)), torch.arange(4))
               for _ in range(3)]
    seen = []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([p.grad.clone() for p in net.parameters()])
            return super().step(closure)
    fold = SimpleNamespace(net=net, model=net, mixup=None, criterion=torch.nn.CrossEntropyLoss(), ema=None,
                           scheduler=None, optimizer=Recorder(net.parameters(), lr=0.1), updates_per_epoch=2,
                           scaler=torch.amp.GradScaler("cpu", enabled=False), files=[])
    cfg = SimpleNamespace(amp="off", channels_last=False, accum_steps=2, epochs=1, head="single", log_interval=100)
    before = [p.detach().clone() for p in net.parameters()]
    train.train_one_epoch(fold, batches, cfg, torch.device("cpu"), 0, show=False)
    assert len(seen) == 2
    probe = Net()  # the weights the last step saw: after the first step
    with torch.no_grad():
        for p, b, g in zip(probe.parameters(), before, seen[0]):
            p.copy_(b - 0.1 * g)
    torch.nn.CrossEntropyLoss()(probe(batches[2][0]), batches[2][1]).backward()
    for got, p in zip(seen[1], probe.parameters()):
        assert torch.allclose(got, p.grad, atol=1e-6)


# ---- 10, 11. the image cache ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_a_cache_that_would_change_the_pictures_is_refused(tmp_path, cache):
    message = one_line_error(lambda: tiny_run(tmp_path, "strong", "--augmentation", "strong", "--cache", cache))
    assert f"--cache {cache}" in message and "strong" in message and not (tmp_path / "strong").exists()


def test_a_fold_process_leaves_the_launchers_memory_cache_alone(tmp_path):
    cfg = SimpleNamespace(input_size=[3, 32, 32], cache="memory", cache_dir=None, run_dir=str(tmp_path / "run"))
    transform = train.build_transform("flip", (3, 32, 32), "bilinear")
    folder = Path(speed.image_reader(cfg, 10, transform).args[0])
    child = ("import sys, types; sys.path.insert(0, '.'); from kit import speed; from dataset import build_transform; "
             f"cfg = types.SimpleNamespace(input_size=[3, 32, 32], cache='memory', cache_dir=None, run_dir={cfg.run_dir!r});"
             "speed.image_reader(cfg, 10, build_transform('flip', (3, 32, 32), 'bilinear'))")
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert folder.is_dir() and (folder / "owner.pid").read_text() == str(os.getpid())


# ---- 13. best-epoch optimism ---------------------------------------------------------------------------------------
def test_the_last_epochs_oof_stands_next_to_the_best_epochs(ema_run, tmp_path):
    metrics = json.loads((ema_run / "metrics.json").read_text())
    log = pd.read_csv(ema_run / "log.csv")
    last = log[log["epoch"] == log.groupby("fold")["epoch"].transform("max")]
    assert [metrics["folds"][str(f)]["last_epoch_macro_f1"] for f in (0, 1)] == pytest.approx(last["val_f1"].tolist())
    assert [metrics["folds"][str(f)]["macro_f1"] for f in (0, 1)] == pytest.approx(
        log.groupby("fold")["val_f1"].max().tolist())
    assert "oof_macro_f1_last_epoch" in metrics and metrics["oof_macro_f1_last_epoch"] <= 1
    from kit.compare import write_leaderboard
    model_dir = tmp_path / "model"
    shutil.copytree(ema_run, model_dir / "ema")
    rule = decision.fit_run(model_dir / "ema")
    table = write_leaderboard(model_dir, [], curves=0)[0]
    assert table.loc[0, "oof_macro_f1_last_epoch"] == pytest.approx(metrics["oof_macro_f1_last_epoch"])
    assert table.loc[0, "decision_reason"] == rule.reason
