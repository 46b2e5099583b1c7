"""train.py + inference.py end to end on the embedded sample: run folder contract, submission,
learning on held-out people, reproducibility, config files, multi head."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample"
TINY = ["--people", "off", "--model", "test_resnet", "--no-pretrained", "--resize", "64", "48", "--batch_size", "32",
        "--num_workers", "0"]


def run(script, *args, check=True):
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-fold run of the tiny model on the sample, long enough to learn, + its submission."""
    out = tmp_path_factory.mktemp("run")
    run("train.py", *TINY, "--epochs", "15", "--folds", "3", "--lr", "5e-3", "--model_dir", out, "--name", "e2e")
    run("inference.py", "--model_dir", out / "e2e", "--output_dir", out / "sub", "--tta", "--num_workers", "0",
        "--decision", "off")  # argmax answers: test_recipe.py checks the decision layer's
    return out / "e2e", out / "sub"


def test_run_folder_contract(trained):
    run_dir, _ = trained
    for name in ("config.json", "folds.csv", "oof.csv", "metrics.json", "log.csv", "confusion.png"):
        assert (run_dir / name).is_file(), name
    for fold in range(3):
        assert (run_dir / f"fold{fold}" / "best.pth").is_file() and (run_dir / f"fold{fold}" / "last.pth").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "test_resnet" and config["layout"] == "mask" and len(config["classes"]) == 18
    assert config["input_size"] == [3, 64, 48] and len(config["mean"]) == 3 and "torch" in config["versions"]
    log = pd.read_csv(run_dir / "log.csv")
    assert len(log) == 3 * 15 and set(log["fold"]) == {0, 1, 2}


def test_oof_covers_every_image_once_with_its_fold(trained):
    run_dir, _ = trained
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"profile": str})
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"profile": str})
    assert sorted(oof["path"]) == sorted(folds["path"])
    merged = oof.merge(folds, on="path", suffixes=("", "_table"))
    assert (merged["fold"] == merged["fold_table"]).all() and (merged["label"] == merged["label_table"]).all()
    probs = oof[[f"p{i}" for i in range(18)]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert (probs.argmax(1) == oof["pred"]).all()
    assert folds.groupby("profile")["fold"].nunique().max() == 1  # no person in two folds
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["oof_macro_f1"] == pytest.approx(f1_score(oof["label"], oof["pred"], average="macro"))
    assert set(metrics["heads"]) == {"mask", "gender", "age"} and len(metrics["folds"]) == 3


def test_submission_matches_info_and_beats_chance_on_held_out_people(trained):
    run_dir, sub = trained
    info = pd.read_csv(SAMPLE / "eval/info.csv")
    output = pd.read_csv(sub / "output.csv")
    assert list(output.columns) == list(info.columns) and output["ImageID"].tolist() == info["ImageID"].tolist()
    assert output["ans"].between(0, 17).all() and output["ans"].dtype.kind == "i"
    probs = pd.read_csv(sub / "probs.csv")
    assert probs["ImageID"].tolist() == info["ImageID"].tolist()
    assert (probs[[f"p{i}" for i in range(18)]].to_numpy().argmax(1) == output["ans"]).all()
    truth = pd.read_csv(SAMPLE / "eval/answers.csv")
    held_out_f1 = f1_score(truth["ans"], output["ans"], average="macro")
    chance_f1 = f1_score(truth["ans"], np.random.default_rng(0).integers(0, 18, len(truth)), average="macro")
    assert held_out_f1 > max(0.3, 4 * chance_f1), held_out_f1
    oof_f1 = json.loads((run_dir / "metrics.json").read_text())["oof_macro_f1"]
    assert abs(oof_f1 - held_out_f1) < 0.2, (oof_f1, held_out_f1)  # grouped OOF tracks unseen people


def test_same_seed_gives_same_oof(tmp_path):
    for name in ("a", "b"):
        run("train.py", *TINY, "--epochs", "2", "--folds", "3", "--fold", "0", "--model_dir", tmp_path, "--name", name)
    first = pd.read_csv(tmp_path / "a/oof.csv")
    second = pd.read_csv(tmp_path / "b/oof.csv")
    pd.testing.assert_frame_equal(first, second)


def test_config_file_sets_arguments_and_command_line_wins(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 1\nfolds: 4\ncriterion: focal\naugmentation: strong\nname: fromfile\n")
    run("train.py", *TINY, "--config", config, "--fold", "1", "--criterion", "ce+f1", "--model_dir", tmp_path)
    saved = json.loads((tmp_path / "fromfile/config.json").read_text())
    assert saved["folds"] == 4 and saved["epochs"] == 1 and saved["augmentation"] == "strong"
    assert saved["criterion"] == "ce+f1"
    assert (tmp_path / "fromfile/fold1/best.pth").is_file() and not (tmp_path / "fromfile/fold0").exists()


def test_multi_head_run_gives_18_class_probabilities(tmp_path):
    run("train.py", *TINY, "--head", "multi", "--epochs", "1", "--folds", "2", "--fold", "0", "--ema",
        "--mixup", "0.2", "--model_dir", tmp_path, "--name", "multi")
    oof = pd.read_csv(tmp_path / "multi/oof.csv")
    np.testing.assert_allclose(oof[[f"p{i}" for i in range(18)]].sum(1), 1, atol=1e-4)
    run("inference.py", "--model_dir", tmp_path / "multi", "--output_dir", tmp_path / "out", "--num_workers", "0")
    assert len(pd.read_csv(tmp_path / "out/output.csv")) == len(pd.read_csv(SAMPLE / "eval/info.csv"))


def test_run_folders_are_numbered_not_overwritten(tmp_path):
    for _ in range(2):
        run("train.py", *TINY, "--epochs", "1", "--folds", "2", "--fold", "0", "--model_dir", tmp_path, "--name", "exp")
    assert (tmp_path / "exp/config.json").is_file() and (tmp_path / "exp2/config.json").is_file()


def write_digits(root, count, as_folders):
    """sklearn's real 8x8 digit scans as 32x32 PNGs: class folders, or images/ + a test template."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = []
    for i in range(count):
        name = names[digits.target[i]]
        rel = Path(name if as_folders else "images") / f"d{i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).clip(0, 255).astype("uint8")).resize((32, 32)).save(root / rel)
        rows.append((rel.name, name))
    return rows


def test_folder_layout_trains_and_predicts_class_names_into_a_sample_submission(tmp_path):
    write_digits(tmp_path / "train", 400, as_folders=True)
    test_rows = write_digits(tmp_path / "test", 500, as_folders=False)[400:]
    pd.DataFrame({"id": [r[0] for r in test_rows], "label": "?"}).to_csv(tmp_path / "test/sample_submission.csv",
                                                                       index=False)
    run("train.py", "--model", "test_resnet", "--no-pretrained", "--resize", "32", "--batch_size", "32",
        "--num_workers", "0", "--epochs", "8", "--lr", "3e-3", "--folds", "2", "--augmentation", "base",
        "--data_dir", tmp_path / "train",
        "--model_dir", tmp_path, "--name", "digits")
    config = json.loads((tmp_path / "digits/config.json").read_text())
    assert config["layout"] == "folder" and config["classes"][0] == "eight"  # sorted folder names
    run("inference.py", "--data_dir", tmp_path / "test", "--model_dir", tmp_path / "digits", "--output_dir",
        tmp_path / "out", "--num_workers", "0")
    output = pd.read_csv(tmp_path / "out/output.csv")
    assert output["id"].tolist() == [r[0] for r in test_rows]
    accuracy = (output["label"] == [r[1] for r in test_rows]).mean()
    assert accuracy > 0.6, accuracy  # chance is 0.1 (digits must not be flipped: --augmentation base)


def test_a_run_into_a_file_tells_its_length_after_its_first_steps(tmp_path):
    """Written to a pipe: no carriage returns; the estimate of the whole run after 20 steps, refined after the
    first epoch, and one line per epoch that starts with the epoch's number and ends with its figures."""
    out = run("train.py", *TINY, "--batch_size", "4", "--epochs", "2", "--folds", "2", "--fold", "0", "--no-report",
              "--model_dir", tmp_path, "--name", "timed").stdout
    assert "\r" not in out
    lines = out.splitlines()
    early = next(i for i, line in enumerate(lines) if line.startswith("estimate from its first steps: 2 epochs"))
    first = next(i for i, line in enumerate(lines) if "fold=0 epoch=1 " in line)
    refined = next(i for i, line in enumerate(lines) if line.startswith("estimate from its first epoch: 2 epochs"))
    assert early < first < refined and lines[first].startswith("epoch 1/2 fold=0 epoch=1 ")
    assert next(line for line in lines if "fold=0 epoch=2 " in line).startswith("epoch 2/2 fold=0 epoch=2 ")


def test_a_long_cpu_run_without_a_recipe_hears_of_cpu_quick():
    import argparse
    import torch
    from kit import speed
    cfg = argparse.Namespace(config=None, resize=None, folds=5, val_ratio=0.2)
    long_line = speed.early_estimate(cfg, torch.device("cpu"), 180.0, 50)  # 3 min of batches x 50 epochs
    assert "at 195 s each" in long_line and "about 2.7 hours" in long_line  # validation: 1/4 of the rest at 1/3
    assert "--config recipes/cpu_quick.yaml" in long_line.splitlines()[1]
    assert "hint" not in speed.estimate(argparse.Namespace(**{**vars(cfg), "config": "my.yaml"}),
                                        torch.device("cpu"), 200.0, 50)
    assert "hint" not in speed.estimate(cfg, torch.device("cuda"), 200.0, 50)  # said only where it is a CPU
    assert "hint" not in speed.estimate(cfg, torch.device("cpu"), 20.0, 50)  # 17 minutes: not long
