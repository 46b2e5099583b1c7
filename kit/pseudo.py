"""Pseudo-labels of the test images for each fold, from that fold's own teacher model.

    table, notes = with_pseudo_labels(table, notes, classes, "model/teacher", "data/eval", 0.9)

A teacher is a finished run with this run's folds. Its fold-k model never saw fold k's validation people, so its
confident answers on the test images can join fold k's training set without leaking those people into fold k's
OOF: the rows carry teacher_fold = k, and dataset.fold_rows gives them to fold k alone. A whole-run ensemble (an
inference.py probs.csv) averages the other folds' models too, which trained on fold k's people: refused.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from kit.common import UserError
from kit.device import pick_device
from kit.predict import load_run, predict_files
from kit.runs import read_config, read_folds
from kit.tables import PSEUDO_FOLD, read_test_table

WHOLE_RUN = ("a probs.csv averages every fold's model, and four of them trained on each fold's validation people, "
             "whose answers would then leak into that fold's training")


def check_teacher(teacher_dir, table, classes):
    """The teacher's config: a run folder with this run's classes and folds (the same images, each in the same fold)."""
    if not Path(teacher_dir).is_dir():
        raise UserError(f"--pseudo_labels {teacher_dir} is not a run folder: {WHOLE_RUN}; pass the teacher's run "
                        "folder (made by train.py with this run's --folds, --seed and data)")
    config = read_config(teacher_dir, fix="--pseudo_labels takes the teacher's run folder, made by train.py")
    if config["classes"] != list(classes) or config.get("crop"):
        raise UserError(f"--pseudo_labels {teacher_dir} " + ("was trained on face crops" if config.get("crop") else
                        "predicts other classes") + ": pass a teacher run of this task on whole pictures")
    theirs, ours = (folds.set_index("path")["fold"] for folds in (read_folds(teacher_dir), table))
    theirs, ours = theirs[theirs >= 0], ours[ours >= 0]
    differ = ours.index.symmetric_difference(theirs.index).tolist()
    differ = differ or ours.index[ours != theirs.reindex(ours.index)].tolist()
    if differ:
        raise UserError(f"--pseudo_labels {teacher_dir} has other folds than this run (first: {differ[0]}): train the "
                        "teacher with this run's --folds, --seed, --split and data, or this run with the teacher's")
    return config


def with_pseudo_labels(table, notes, classes, teacher_dir, test_dir, threshold):
    """(table + pseudo-labelled test rows, notes): for each fold k, the test images the teacher's fold-k model
    (flip TTA) labels with at least threshold probability, with teacher_fold = k (-1 on the other rows) and
    their confidence."""
    check_teacher(teacher_dir, table, classes)
    _, files, _ = read_test_table(test_dir)
    device, parts = pick_device(), []
    for fold in sorted(int(f) for f in table["fold"].unique() if f >= 0):
        models, config = load_run(teacher_dir, [fold], device=device)
        probs = predict_files(models, config, files, device, tta=True)
        sure = probs.max(1) >= threshold
        parts.append(pd.DataFrame({"path": [str(Path(f).resolve()) for f in np.array(files)[sure]], "profile": "",
                                   "mask": pd.NA, "gender": pd.NA, "age": pd.NA, "label": probs[sure].argmax(1),
                                   "train_label": probs[sure].argmax(1), "fold": PSEUDO_FOLD, "teacher_fold": fold,
                                   "confidence": probs[sure].max(1)}))
    pseudo = pd.concat(parts, ignore_index=True)
    notes = notes + [f"pseudo-labels: {len(pseudo)} (test image, fold) pairs of {test_dir} at p >= {threshold}, each "
                     f"from the fold's own teacher model of {teacher_dir} (listed in pseudo_labels.csv)"]
    learned = table["train_label"] if "train_label" in table else table["label"]
    return pd.concat([table.assign(train_label=learned, teacher_fold=-1), pseudo], ignore_index=True), notes
