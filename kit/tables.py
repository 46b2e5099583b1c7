"""CSV tables that are not the training table: one-line errors for any CSV, the test table.

    frame = read_csv_checked("boxes.csv", ["path", "x0"], fix="write it with python -m kit.crop_faces")
    template, files, submission = read_test_table("data/eval")      # info.csv (or a sample submission) to fill

The training table itself (layouts, labels, folds) is dataset.py's; pseudo-labelled test rows are kit.pseudo's.
"""
from pathlib import Path

import pandas as pd

from kit.common import UserError

PSEUDO_FOLD = -2  # pseudo-labelled test images: in every fold's training set, never validated


def read_csv_checked(path, columns=(), fix="fix the header or pass the right --path_col/--label_col",
                     missing_fix="point --data_dir at the folder that holds it", **kwargs):
    """pandas.read_csv with one-line errors for a missing, empty or unparsable file or missing columns;
    fix is the advice given for missing columns, missing_fix for a missing file (the flag that named it)."""
    if not Path(path).is_file():
        raise UserError(f"{path} not found: {missing_fix}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a readable CSV ({str(err).strip().splitlines()[0][:100]}); "
                        "fix or replace the file") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path} has no column {', '.join(missing)} (columns: {', '.join(table.columns)}); {fix}")
    return table


def resolve_image(root, name):
    """The file for a path or id as written in an annotation, trying images/ and common extensions."""
    for base in (root, root / "images", root / "train", root / "test"):
        for candidate in (base / name, *(base / f"{name}{ext}" for ext in (".jpg", ".png", ".jpeg"))):
            if candidate.is_file():
                return candidate
    return None

def read_test_table(data_dir, submission=None):
    """Test images and the submission frame to fill: the mask layout's info.csv (ImageID,ans) or a
    sample-submission CSV whose first column names the image and second is the answer."""
    data_dir = Path(data_dir)
    if submission is None:
        candidates = [data_dir / "info.csv", data_dir.parent / "info.csv"] + sorted(data_dir.glob("*.csv"))
        submission = next((c for c in candidates if c.is_file()), None)
        if submission is None:
            raise UserError(f"{data_dir}: no info.csv or sample-submission CSV; pass --submission")
    submission = Path(submission)
    frame = read_csv_checked(submission, missing_fix="check --submission")
    if frame.shape[1] < 2:
        raise UserError(f"{submission} needs an id column and an answer column (like ImageID,ans)")
    id_col = frame.columns[0]
    repeated = frame[id_col][frame[id_col].duplicated()]
    if len(repeated):
        raise UserError(f"{submission}: {id_col} {repeated.iloc[0]} is listed more than once "
                        f"({len(repeated)} repeated ids); each test image must have one row: fix the file")
    root = data_dir if submission.parent == data_dir else submission.parent
    files = [resolve_image(root, name) for name in frame[id_col]]
    missing = [n for n, f in zip(frame[id_col], files) if f is None]
    if missing:
        raise UserError(f"{submission} names {len(missing)} images not found under {root} "
                        f"(first: {missing[0]}); fix the file or --data_dir")
    return frame, [str(f) for f in files], Path(submission)
