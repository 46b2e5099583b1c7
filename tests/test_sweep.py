"""kit.sweep on the embedded sample with a tiny model: a 3-trial study, its best recipe reproducing its trial, --resume
adding trials, two workers sharing one study, a pruned trial shown as pruned, and bad input refused in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
import train  # noqa: E402
from kit import compare, sweep  # noqa: E402
from support import one_line_error  # noqa: E402

TRAIN = ["--people", "off", "--data_dir", str(ROOT / "sample" / "train"), "--model", "test_resnet", "--no-pretrained", "--resize", "32",
         "--batch_size", "32", "--num_workers", "0", "--folds", "2", "--head", "single", "--decision", "off"]
SPACE = "lr: [0.002, 0.02, log]\nepochs: [1, 2]\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write(path, text):
    path.write_text(text)
    return path


def study_of(folder, name="s"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / name / 'study.db'}")


@pytest.fixture(scope="module")
def three_trials(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    space = write(folder / "space.yaml", SPACE)
    config = write(folder / "base.yaml", "lr: 0.005\nepochs: 1\n")
    argv = ["--space", str(space), "--config", str(config), "--trials", "3", "--model_dir", str(folder), "--name", "s",
            "--pruner", "none", *TRAIN]
    sweep.main(argv)
    return folder, argv


def test_a_sweep_runs_real_trials_and_writes_the_best_recipe(three_trials, tmp_path):
    folder, _ = three_trials
    study = study_of(folder)
    assert len(study.trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    for trial in study.trials:  # each a run folder of its own, marked with its trial
        marker = json.loads((folder / "s" / f"trial_{trial.number:03d}" / sweep.MARKER).read_text())
        assert marker["trial"] == trial.number and marker["params"] == trial.params
    best = study.best_trial
    config = json.loads((folder / "s" / f"trial_{best.number:03d}" / "config.json").read_text())
    assert config["lr"] == pytest.approx(best.params["lr"]) and config["epochs"] == best.params["epochs"]
    for name in ("best.yaml", "sweep.html", "history.png"):
        assert (folder / "s" / name).is_file(), name
    train.main([*TRAIN, "--config", str(folder / "s" / "best.yaml"), "--fold", "0", "--no-report",
                "--model_dir", str(tmp_path), "--name", "again"])  # the recipe file reproduces its trial
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["oof_macro_f1_last_epoch"]
    assert again == pytest.approx(best.value, abs=1e-9)


def test_resume_adds_trials_to_the_same_study(three_trials):
    folder, argv = three_trials
    with pytest.raises(Exception, match="add --resume"):
        sweep.main(argv)
    sweep.main([*argv, "--resume", "--trials", "1"])
    assert len(study_of(folder).trials) == 4
    wider = write(folder / "wider.yaml", SPACE + "weight_decay: [0.001, 0.1, log]\n")  # another question
    assert "space weight_decay" in one_line_error(lambda: sweep.main([*argv, "--resume", "--space", str(wider)]))
    smaller = [*argv, "--resume", "--batch_size", "16"]
    assert "fixed batch_size: 32, not 16" in one_line_error(lambda: sweep.main(smaller))
    assert len(study_of(folder).trials) == 4  # nothing run: trials that do not compare stay out of the study


def test_two_workers_share_one_study_without_losing_or_repeating_a_trial(tmp_path):
    space = write(tmp_path / "space.yaml", SPACE)
    command = [sys.executable, "-m", "kit.sweep", "--space", str(space), "--config", str(write(
        tmp_path / "base.yaml", "epochs: 1\n")), "--trials", "1", "--model_dir", str(tmp_path), "--name", "s",
        "--resume", "--pruner", "none", *TRAIN]
    workers = [subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = study_of(tmp_path).trials
    assert sorted(t.number for t in trials) == [0, 1] and all(t.state.name == "COMPLETE" for t in trials)
    ran = [int(line.split()[1].rstrip(":")) for out in outputs for line in out.splitlines()
           if line.startswith("trial ") and "last-epoch macro F1" in line]
    assert sorted(ran) == [0, 1]  # each trial run once, by one worker


def test_a_pruned_trial_is_shown_as_pruned(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.PRUNERS, "median", lambda: optuna.pruners.ThresholdPruner(lower=2.0))  # prunes all
    space = write(tmp_path / "space.yaml", "epochs: [2, 3]\n")
    with pytest.raises(Exception, match="no trial"):
        sweep.main(["--space", str(space), "--config", str(write(tmp_path / "base.yaml", "lr: 0.005\n")), "--trials",
                    "1", "--model_dir", str(tmp_path), "--name", "p", *TRAIN])
    assert study_of(tmp_path, "p").trials[0].state.name == "PRUNED"
    runs, _, skipped = compare.write_leaderboard(tmp_path / "p", [], curves=0)
    assert list(runs["run"]) == ["trial_000"] and runs.loc[0, "status"].startswith("pruned") and not skipped


@pytest.mark.parametrize("space, args, says", [
    ("lrr: [0.001, 0.01]\n", [], "unknown flag in"),
    ("lr: [0.01, 0.001]\n", [], "low > high"),
    ("epochs: [0, 3]\n", [], "epochs"),
    ("lr: [0.001, 0.01]\n", ["--trials", "0"], "--trials"),
    ("lr: [0.001, 0.01]\n", ["--minutes", "0"], "--minutes"),
    ("lr: [0.001, 0.01]\n", ["--storage", "nosuchdb://x"], "--storage")])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, space, args, says):
    path = write(tmp_path / "space.yaml", space)
    message = one_line_error(lambda: sweep.main(["--space", str(path), "--config", str(write(
        tmp_path / "base.yaml", "lr: 0.005\n")), "--model_dir", str(tmp_path / "m"), "--name", "s", *args, *TRAIN]))
    assert says in message
    assert not (tmp_path / "m").exists()


def test_the_shipped_search_spaces_hold_train_py_settings_only():
    for path in (ROOT / "recipes" / "spaces").glob("*.yaml"):
        space = sweep.read_space(path, train.build_parser())
        assert space and all(not flag.startswith("-") for flag in space), path
