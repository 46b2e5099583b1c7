"""kit/label_issues.py finds flipped labels from out-of-fold probabilities; its CSVs and
lists/mask_relabel.csv feed back through dataset.apply_corrections (train.py --drop_list/--relabel_list)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
from kit.common import run_main  # noqa: E402
from dataset import MASK_FILES, age_group, build_table, mask_class_names, relabelled  # noqa: E402
from kit.labels import make_label  # noqa: E402
from kit.runs import KIT_VERSION  # noqa: E402
from kit.label_issues import class_thresholds, find_label_issues, main, write_label_issues  # noqa: E402

SAMPLE = ROOT / "sample" / "train"


def softmax(logits):
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def noisy_labels(true_labels, share, classes, rng):
    """Given labels with `share` of them flipped to a random other class; returns (given, flipped rows)."""
    flipped = rng.choice(len(true_labels), round(share * len(true_labels)), replace=False)
    given = true_labels.copy()
    given[flipped] = (true_labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
    return given, flipped


def test_flipped_labels_dominate_the_top_of_the_ranking():
    rng = np.random.default_rng(0)
    true_labels = rng.integers(0, 18, 3000)
    probs = softmax(12 * np.eye(18)[true_labels] + 3.5 * rng.standard_normal((3000, 18)))
    assert 0.88 < (probs.argmax(1) == true_labels).mean() < 0.95  # a model right ~90% of the time
    given, flipped = noisy_labels(true_labels, 0.03, 18, rng)
    for rank_by in ("self_confidence", "margin"):
        top = find_label_issues(probs, given, rank_by).head(len(flipped))
        precision = np.isin(top["row"], flipped).mean()
        assert precision >= 0.7, (rank_by, precision)  # picking at random would give 0.03
        found = top[np.isin(top["row"], flipped)]
        assert (found["suggested"].to_numpy() == true_labels[found["row"]]).mean() > 0.9


def test_thresholds_are_each_class_mean_self_confidence():
    probs = np.array([[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.2, 0.8, 0.0]])
    np.testing.assert_allclose(class_thresholds(probs, np.array([0, 0, 1])), [0.8, 0.8, np.inf])


def test_a_candidate_needs_another_class_above_its_threshold():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7], [0.45, 0.55]])
    # thresholds 0.6875 (class 0) and 0.8 (class 1): rows 2, 4 and 5 are unsure, but no class reaches its
    # threshold there, so nothing is a candidate
    assert find_label_issues(probs, np.array([0, 0, 0, 1, 1, 0])).empty
    # row 3 labelled 0: thresholds become 0.57 and 0.7, and its 0.9 for class 1 clears 0.7
    issues = find_label_issues(probs, np.array([0, 0, 0, 0, 1, 0]))
    assert issues["row"].tolist() == [3] and issues["suggested"].tolist() == [1]


def test_ranking_by_self_confidence_and_by_margin():
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.2, 0.5, 0.3], [0.05, 0.05, 0.9], [0.2, 0.3, 0.5],
                      [0.1, 0.15, 0.75], [0.12, 0.08, 0.8], [0.02, 0.9, 0.08]])
    labels = np.array([0, 1, 1, 2, 2, 0, 0, 0])  # thresholds 0.285, 0.7, 0.7; rows 5-7 look like 2, 2, 1
    by_confidence = find_label_issues(probs, labels, "self_confidence")
    assert by_confidence["row"].tolist() == [7, 5, 6] and by_confidence["suggested"].tolist() == [1, 2, 2]
    by_margin = find_label_issues(probs, labels, "margin")
    assert by_margin["row"].tolist() == [7, 6, 5]
    np.testing.assert_allclose(by_margin["margin"], [-0.88, -0.68, -0.65])


# ---- the script on a run folder -------------------------------------------------------------------
@pytest.fixture
def noisy_run(tmp_path):
    """A run folder whose OOF probabilities know the sample's true labels (0.6-0.98 for the true class,
    0.99 on the 8 images whose given label is flipped, as if the annotators got them wrong);
    returns (run folder, flipped paths, true labels)."""
    table, classes, _, _ = build_table(SAMPLE, folds=3)
    rng = np.random.default_rng(1)
    true_labels = table["label"].to_numpy()
    given, flipped = noisy_labels(true_labels, 8 / len(table), 18, rng)
    true_prob = rng.uniform(0.6, 0.98, len(table))
    true_prob[flipped] = 0.99
    probs = np.where(np.eye(18, dtype=bool)[true_labels], true_prob[:, None], (1 - true_prob[:, None]) / 17)
    oof = table[["path", "profile", "fold"]].assign(label=given, pred=probs.argmax(1))
    oof = pd.concat([oof, pd.DataFrame(probs, columns=[f"p{i}" for i in range(18)])], axis=1)
    run_dir = tmp_path / "run"
    for fold, rows in oof.groupby("fold"):
        (run_dir / f"fold{fold}").mkdir(parents=True)
        rows.to_csv(run_dir / f"fold{fold}" / "oof.csv", index=False)
    config = {"classes": classes, "layout": "mask", "data_dir": str(SAMPLE), "kit_version": KIT_VERSION}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir, set(table["path"].iloc[flipped]), dict(zip(table["path"], true_labels))


def test_script_writes_the_flipped_images_first(noisy_run):
    run_dir, flipped, true_labels = noisy_run
    done = subprocess.run([sys.executable, "-m", "kit.label_issues", "--model_dir", str(run_dir), "--top", "8"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("8 of 420 images (1.9%) look mislabelled")
    issues = pd.read_csv(run_dir / "label_issues.csv", dtype={"profile": str})
    assert set(issues["path"]) == flipped and issues["rank"].tolist() == list(range(1, 9))
    assert (issues["suggested_label"] == issues["path"].map(true_labels)).all()
    classes = mask_class_names()
    assert (issues["given_name"] == [classes[i] for i in issues["given_label"]]).all()
    assert (issues["suggested_name"] == [classes[i] for i in issues["suggested_label"]]).all()
    assert issues["score"].is_monotonic_increasing
    with Image.open(run_dir / "label_issues.png") as image:
        assert image.format == "PNG"
    relabel = pd.read_csv(run_dir / "relabel_suggestions.csv")
    assert relabel.columns.tolist() == ["path", "field", "value"] and (relabel["field"] == "label").all()


def test_label_issues_csv_is_a_drop_list(noisy_run):
    run_dir, flipped, _ = noisy_run
    write_label_issues(run_dir, top=8)
    table = build_table(SAMPLE, drop_list=run_dir / "label_issues.csv")[0]
    kept = table[table["train_label"] >= 0]  # what a model learns from; every image is still scored
    assert len(kept) == 420 - 8 and not set(kept["path"]) & flipped


def test_relabel_suggestions_undo_flipped_labels(noisy_run, tmp_path):
    run_dir, flipped, true_labels = noisy_run
    write_label_issues(run_dir, top=8)
    suggestions = pd.read_csv(run_dir / "relabel_suggestions.csv")
    classes = mask_class_names()
    noise = suggestions.assign(value=[classes[(true_labels[p] + 1) % 18] for p in suggestions["path"]])
    noise.to_csv(tmp_path / "noise.csv", index=False)  # the data as the annotators got it wrong
    noisy = build_table(SAMPLE, relabel_list=tmp_path / "noise.csv")[0]
    assert set(noisy.loc[noisy["train_label"] != noisy["path"].map(true_labels), "path"]) == flipped
    pd.concat([noise, suggestions]).to_csv(tmp_path / "fixed.csv", index=False)  # later rows win
    fixed = build_table(SAMPLE, relabel_list=tmp_path / "fixed.csv")[0]
    assert (fixed["train_label"] == fixed["path"].map(true_labels)).all()


def test_unknown_ranking_is_one_line_error(noisy_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kit/label_issues.py", "--model_dir", str(noisy_run[0]), "--rank_by", "margins"])
    with pytest.raises(SystemExit) as stop:
        run_main(main)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "did you mean margin" in error and len(error.splitlines()) == 1
    assert not (noisy_run[0] / "label_issues.csv").exists()


# ---- lists/mask_relabel.csv --------------------------------------------------------------------------
MASK_RELABEL_PEOPLE = {"006359": "female", "006360": "female", "006361": "female", "006362": "female",
                       "006363": "female", "006364": "female", "001498-1": "male", "004432": "male",
                       "000020": "male", "004418": "female", "005227": "male", "000001": "female"}


def mask_layout_folder(folder):
    """A tiny mask-layout train folder holding the people that lists/mask_relabel.csv names (+ one other)."""
    rows = []
    for index, (person, gender) in enumerate(MASK_RELABEL_PEOPLE.items()):
        name = f"{person}_{gender}_Asian_{20 + 7 * index}"
        rows.append({"id": person, "gender": gender, "race": "Asian", "age": 20 + 7 * index, "path": name})
        (folder / "images" / name).mkdir(parents=True)
        for stem in MASK_FILES:
            Image.new("RGB", (8, 8)).save(folder / "images" / name / f"{stem}.jpg")
    pd.DataFrame(rows).to_csv(folder / "train.csv", index=False)
    return folder


def test_mask_relabel_list_flips_exactly_the_documented_rows(tmp_path):
    folder = mask_layout_folder(tmp_path / "train")
    before = build_table(folder, folds=2)[0].set_index("path")
    fixed = build_table(folder, folds=2, relabel_list=ROOT / "lists" / "mask_relabel.csv")[0]
    assert fixed["label"].equals(build_table(folder, folds=2)[0]["label"])  # scored on the given labels
    after = relabelled(fixed, mask_class_names(), ROOT / "lists" / "mask_relabel.csv").set_index("path")
    assert (after["label"] == fixed.set_index("path")["train_label"]).all()  # what a model learns
    profile, stem = after["profile"], after.index.map(lambda path: Path(path).stem)
    to_male = profile.isin(["006359", "006360", "006361", "006362", "006363", "006364"])
    to_female = profile.isin(["001498-1", "004432"])
    swapped = profile.isin(["000020", "004418", "005227"]) & stem.isin(["incorrect_mask", "normal"])
    changed = (after[["mask", "gender", "label"]] != before[["mask", "gender", "label"]]).any(axis=1)
    assert (changed == (to_male | to_female | swapped)).all() and changed.sum() == 8 * 7 + 3 * 2
    assert (after.loc[to_male, "gender"] == 0).all() and (after.loc[to_female, "gender"] == 1).all()
    assert (after.loc[swapped & (stem == "incorrect_mask"), "mask"] == 2).all()  # not_worn
    assert (after.loc[swapped & (stem == "normal"), "mask"] == 1).all()  # incorrect
    expected = make_label(after["mask"], after["gender"], age_group(after["age"]))
    assert (after["label"] == expected).all() and (after.loc[changed, "label"] != before.loc[changed, "label"]).all()
