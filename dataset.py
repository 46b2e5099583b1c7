"""From raw competition folders to one table: a row per image with its label and its fold.

    python dataset.py --data_dir sample/train --folds 5 --seed 42 --out labels.csv
    python dataset.py --data_dir data/train --verify          # also decode every image, list bad ones

Layouts (detected from what is in --data_dir, or --layout):
  mask    train.csv (id,gender,race,age,path) + images/<path>/{mask1..5,incorrect_mask,normal}.*
  csv     a CSV with an image-path column and a label column (--path_col, --label_col)
  json    a JSON list of records with an image path and a label field (same options)
  folder  one sub-folder per class
This file is the one place for the label formula, class names, age groups and folds.
"""
import argparse
import json
import os
import warnings
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from common import KitParser, UserError, atomic_write, in_range, lookup, run_main

MASK_FILES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
MASK_NAMES = ("wear", "incorrect", "not_worn")
GENDERS = ("male", "female")
AGE_BOUNDS = (30, 60)  # competition rule: <30, 30-59, >=60
MASK_CENTER_CROP = (0.625, 0.667)  # the baseline's 320x256 of the 512x384 mask photos: the face, larger
HEAD_NAMES = ("mask", "gender", "age")
HEAD_SIZES = (3, 2, 3)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MASK_COLUMNS = ("id", "gender", "age", "path")
KIT_VERSION = 1  # of the run-folder format (config.json, checkpoints): bumped when it changes


# ---- labels: the one formula ----------------------------------------------------------------
def age_group(age, bounds=AGE_BOUNDS):
    """0 below bounds[0], 1 up to bounds[1]-1, 2 from bounds[1] (an age equal to a bound goes up)."""
    return np.digitize(age, bounds)


def make_label(mask, gender, age_grp):
    return mask * 6 + gender * 3 + age_grp


def split_label(label):
    """18-class label -> (mask, gender, age group); works on ints, numpy arrays and tensors."""
    return label // 6, (label // 3) % 2, label % 3


def head_marginals(probs):
    """(..., 18) class probabilities -> [(..., 3), (..., 2), (..., 3)]: per head (mask, gender, age), the sum
    over the other two; numpy arrays or tensors."""
    grid = probs.reshape(*probs.shape[:-1], *HEAD_SIZES)
    axes = (-3, -2, -1)
    return [grid.sum(tuple(a for a in axes if a != keep)) for keep in axes]


def joint_from_heads(mask, gender, age):
    """Per-head probabilities (N, 3), (N, 2), (N, 3) -> (N, 18) in label order, as if independent."""
    return (mask[:, :, None, None] * gender[:, None, :, None] * age[:, None, None, :]).flatten(1)


def head_value_names(classes):
    """Mask-layout class names 'mask/gender/age' -> the value names of each head, in head order."""
    heads = split_label(np.arange(len(classes)))
    return [[next(classes[i].split("/")[h] for i in range(len(classes)) if heads[h][i] == value)
             for value in range(size)] for h, size in enumerate(HEAD_SIZES)]


def training_labels(rows, train_age_bounds=None):
    """The labels a model trains on: the table's, or with train_age_bounds the mask layout's labels with other
    age-group edges (e.g. 30 58: people of 58-59 look 60, so the rare old class gets more examples), while
    OOF scores, reports and submissions keep the table's. Rows without an age (pseudo-labels) keep theirs."""
    if not train_age_bounds:
        return rows["label"].to_numpy()
    mask, gender, age = (pd.to_numeric(rows[c], errors="coerce").to_numpy(float) for c in ("mask", "gender", "age"))
    shifted = make_label(mask, gender, age_group(age, train_age_bounds))
    return np.where(np.isnan(age), rows["label"].to_numpy(), np.nan_to_num(shifted)).astype(int)


def mask_class_names(bounds=AGE_BOUNDS):
    ages = (f"<{bounds[0]}", f"{bounds[0]}-{bounds[1] - 1}", f">={bounds[1]}")
    return [f"{m}/{g}/{a}" for m in MASK_NAMES for g in GENDERS for a in ages]


# ---- layouts ---------------------------------------------------------------------------------
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


def is_image_file(entry):
    """Real images only: no hidden files, no AppleDouble '._*' junk, known extensions."""
    return not entry.name.startswith(".") and Path(entry.name).suffix.lower() in IMAGE_EXTS


def mask_layout_paths(data_dir):
    """data_dir may be the train folder (train.csv + images/) or its images folder."""
    data_dir = Path(data_dir)
    if (data_dir / "train.csv").is_file():
        return data_dir / "train.csv", data_dir / "images"
    return data_dir.parent / "train.csv", data_dir


def read_mask_layout(data_dir, age_bounds=AGE_BOUNDS, **_):
    """One row per image of every person in train.csv; odd folders are reported, not dropped."""
    csv_path, image_dir = mask_layout_paths(data_dir)
    people = read_csv_checked(csv_path, MASK_COLUMNS, fix="fix the header (id,gender,race,age,path), "
                              "or pass --layout csv for a CSV of image paths and labels")
    repeated = people["path"].duplicated()
    notes = [f"{csv_path}: {p} listed again, kept once" for p in people.loc[repeated, "path"]]
    rows = []
    for person in people[~repeated].itertuples():
        folder = image_dir / person.path
        if not folder.is_dir():
            raise UserError(f"{folder} named in {csv_path} does not exist: fix the path column or the folder")
        if person.gender not in GENDERS or not person.age.strip().isdigit():
            raise UserError(f"{csv_path}: person {person.id} has gender '{person.gender}', age '{person.age}'; "
                            "expected male/female and a whole number")
        found = {}
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):  # sorted: same pick of duplicates everywhere
            if not entry.is_file() or not is_image_file(entry):
                continue
            stem = Path(entry.name).stem
            if stem not in MASK_FILES or stem in found:
                notes.append(f"{folder.name}/{entry.name}: {'duplicate' if stem in found else 'unexpected'} "
                             "picture, skipped")
                continue
            found[stem] = entry.name
        missing = sorted(set(MASK_FILES) - set(found))
        if missing:
            notes.append(f"{folder.name}: missing {', '.join(missing)}")
        gender, age = GENDERS.index(person.gender), int(person.age)
        for stem, name in sorted(found.items()):
            rows.append((os.path.relpath(folder / name, data_dir), person.id, MASK_FILES[stem], gender, age))
    table = pd.DataFrame(rows, columns=["path", "profile", "mask", "gender", "age"])
    table["label"] = make_label(table["mask"], table["gender"], age_group(table["age"], age_bounds))
    return table, mask_class_names(age_bounds), notes


def resolve_image(root, name):
    """The file for a path or id as written in an annotation, trying images/ and common extensions."""
    for base in (root, root / "images", root / "train", root / "test"):
        for candidate in (base / name, *(base / f"{name}{ext}" for ext in (".jpg", ".png", ".jpeg"))):
            if candidate.is_file():
                return candidate
    return None


def table_from_records(records, root, source, path_col, label_col, group_col):
    """Annotation records -> table with class indices; class names come from the data."""
    for col in (path_col, label_col):
        if col not in records.columns:
            raise UserError(f"{source} has no field '{col}' (fields: {', '.join(map(str, records.columns))}); "
                            "pass --path_col/--label_col")
    files = [resolve_image(root, str(name)) for name in records[path_col]]
    missing = [str(n) for n, f in zip(records[path_col], files) if f is None]
    if missing:
        raise UserError(f"{source}: {len(missing)} images not found under {root} (first: {missing[0]}); "
                        "fix --path_col or the image folder")
    labels = records[label_col].astype(str)
    numeric = labels.str.fullmatch(r"-?\d+").all()
    classes = sorted(labels.unique(), key=int if numeric else str)
    table = pd.DataFrame({"path": [os.path.relpath(f, root) for f in files],
                          "profile": records[group_col].astype(str) if group_col else "",
                          "label": labels.map({c: i for i, c in enumerate(classes)}).to_numpy()})
    return table, classes, []


def single_file(data_dir, pattern, given):
    """The annotation file: --ann_file if given, else the one file matching pattern in data_dir."""
    if given:
        path = Path(given) if Path(given).is_absolute() or Path(given).exists() else Path(data_dir) / given
        if not path.is_file():
            raise UserError(f"{path} not found: check --ann_file")
        return path
    found = sorted(Path(data_dir).glob(pattern))
    if len(found) != 1:
        raise UserError(f"{data_dir}: expected one {pattern} file, found {len(found)}; name it with --ann_file")
    return found[0]


def read_csv_layout(data_dir, ann_file=None, path_col="path", label_col="label", group_col=None, **_):
    csv_path = single_file(data_dir, "*.csv", ann_file)
    records = read_csv_checked(csv_path, [group_col] if group_col else [])
    return table_from_records(records, Path(data_dir), csv_path, path_col, label_col, group_col)


def read_json_layout(data_dir, ann_file=None, path_col="path", label_col="label", group_col=None, **_):
    json_path = single_file(data_dir, "*.json", ann_file)
    try:
        data = json.loads(json_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{json_path} is not valid JSON ({err}); fix the file") from None
    if isinstance(data, dict):  # {"annotations": [...]} and the like: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{json_path} must hold a list of records like "
                        f'{{"{path_col}": "img.jpg", "{label_col}": "cat"}}')
    records = pd.DataFrame(data)
    if group_col and group_col not in records.columns:
        raise UserError(f"{json_path} has no field '{group_col}': fix --group_col")
    return table_from_records(records, Path(data_dir), json_path, path_col, label_col, group_col)


def read_folder_layout(data_dir, **_):
    """One sub-folder per class; images anywhere below it."""
    data_dir = Path(data_dir)
    classes = sorted(d.name for d in data_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:  # a lone images/ folder is a mask layout without its train.csv, not one class
        raise UserError(f"{data_dir}: the folder layout needs one sub-folder per class, found {classes or 'none'}; "
                        "for the mask layout put train.csv beside images/")
    rows = []
    for index, name in enumerate(classes):
        for folder, dirs, files in os.walk(data_dir / name):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rows += [(os.path.relpath(Path(folder) / f, data_dir), index) for f in sorted(files)
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTS]
    if not rows:
        raise UserError(f"{data_dir}: no images found in class sub-folders")
    table = pd.DataFrame(rows, columns=["path", "label"])
    table.insert(1, "profile", "")
    return table, classes, []


LAYOUTS = {"mask": read_mask_layout, "csv": read_csv_layout, "json": read_json_layout,
           "folder": read_folder_layout}


def is_mask_csv(path):
    """A train.csv of the mask layout: it has a gender or age column (a path,label train.csv is the csv layout)."""
    try:
        return bool({"gender", "age"} & set(pd.read_csv(path, nrows=0).columns))
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return False


def detect_layout(data_dir):
    """Pick the layout from what is in data_dir."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir} is not a folder: pass --data_dir (or set SM_CHANNEL_TRAIN)")
    if is_mask_csv(mask_layout_paths(data_dir)[0]):
        return "mask"
    if any(data_dir.glob("*.json")):
        return "json"
    if any(data_dir.glob("*.csv")):
        return "csv"
    if any(d.is_dir() and not d.name.startswith(".") for d in data_dir.iterdir()):
        return "folder"
    raise UserError(f"{data_dir}: no train.csv, *.json, *.csv or class folders found; pass --layout")


# ---- folds -----------------------------------------------------------------------------------
def assign_folds(table, folds=5, seed=42, val_ratio=0.2, grouped=True):
    """Stratified K folds that never split a person (or group); folds=1 is one grouped holdout
    of val_ratio (fold 0; the rest get -1, train only). grouped=False splits images at random,
    which leaks people across folds (kept only to measure that leak)."""
    has_groups = grouped and (table["profile"] != "").any()
    groups = table["profile"] if has_groups else np.arange(len(table))
    splits = folds if folds > 1 else max(2, round(1 / val_ratio))
    n_groups = len(np.unique(groups))
    if splits > n_groups:
        raise UserError(f"{splits} folds but only {n_groups} {'people/groups' if has_groups else 'images'}: "
                        "lower --folds")
    splitter = (StratifiedGroupKFold if has_groups else StratifiedKFold)(splits, shuffle=True, random_state=seed)
    fold = np.full(len(table), -1)
    with warnings.catch_warnings():  # rare classes with fewer members than folds are expected
        warnings.simplefilter("ignore", UserWarning)
        splits = list(splitter.split(table, table["label"], groups))
    for index, (_, val_rows) in enumerate(splits):
        if index < folds:
            fold[val_rows] = index
    return table.assign(fold=fold)


# ---- corrections: drop or relabel listed images ------------------------------------------------
CORRECTION_FIX = "give each row a path, or a profile (+ image stem), column; relabel rows also field,value"


def select_rows(table, row, source):
    """Rows that a correction row names: by path, or by profile (+ optional image stem)."""
    if row.get("path"):
        return table["path"] == row["path"]
    if not row.get("profile"):
        raise UserError(f"{source}: a row names no path or profile ({row}); {CORRECTION_FIX}")
    picked = table["profile"] == row["profile"]
    if row.get("image"):
        picked &= table["path"].map(lambda p: Path(p).stem) == row["image"]
    return picked


def correction_value(row, names, source):
    """A relabel value as an index: one of names, or a number below len(names)."""
    value = row["value"]
    if value in names:
        return names.index(value)
    if not value.isdigit() or int(value) >= len(names):
        raise UserError(f"{source}: {row['field']} value '{value}' is not one of {', '.join(names)} "
                        f"(or 0..{len(names) - 1}); fix the file")
    return int(value)


def apply_corrections(table, classes, drop_list=None, relabel_list=None, age_bounds=AGE_BOUNDS):
    """Drop rows named in drop_list; set field=value for rows named in relabel_list, row by row.
    A gender or mask fix (mask layout) recomputes the label; a label fix sets it as given."""
    table = table.copy()
    if drop_list:
        drops = read_csv_checked(drop_list, fix=CORRECTION_FIX, missing_fix="check --drop_list").to_dict("records")
        keep = ~np.logical_or.reduce([select_rows(table, r, drop_list) for r in drops] or [False])
        table = table[keep].reset_index(drop=True)
    if relabel_list:
        names = {"gender": list(GENDERS), "mask": list(MASK_NAMES), "label": list(classes)}
        for row in read_csv_checked(relabel_list, ["field", "value"], fix=CORRECTION_FIX,
                                    missing_fix="check --relabel_list").to_dict("records"):
            if row["field"] not in names or (row["field"] != "label" and "age" not in table):
                raise UserError(f"{relabel_list}: field must be {'gender, mask or ' if 'age' in table else ''}"
                                f"label, not '{row['field']}'")
            picked = select_rows(table, row, relabel_list)
            table.loc[picked, row["field"]] = correction_value(row, names[row["field"]], relabel_list)
            if row["field"] != "label":
                fixed = table[picked]
                table.loc[picked, "label"] = make_label(fixed["mask"], fixed["gender"],
                                                        age_group(fixed["age"], age_bounds))
    return table


def build_table(data_dir, layout="auto", folds=5, seed=42, val_ratio=0.2, grouped=True,
                age_bounds=AGE_BOUNDS, drop_list=None, relabel_list=None, **layout_options):
    """The training table (path, profile, mask, gender, age, label, fold), class names and notes."""
    layout = detect_layout(data_dir) if layout == "auto" else layout
    table, classes, notes = lookup(LAYOUTS, layout, "layout")(data_dir, age_bounds=age_bounds, **layout_options)
    if table.empty:
        raise UserError(f"{data_dir}: no images found for the {layout} layout")
    table = apply_corrections(table, classes, drop_list, relabel_list, age_bounds)
    for col in ("mask", "gender", "age"):
        if col not in table:
            table[col] = pd.NA
    table = table[["path", "profile", "mask", "gender", "age", "label"]]
    return assign_folds(table, folds, seed, val_ratio, grouped), classes, notes, layout


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


PSEUDO_FOLD = -2  # pseudo-labelled test images: in every fold's training set, never validated


def with_pseudo_labels(table, notes, classes, probs_csv, test_dir, threshold):
    """(table, notes) with the confidently predicted test images of probs_csv (read_pseudo_labels) added."""
    pseudo = read_pseudo_labels(probs_csv, test_dir, classes, threshold)
    notes = notes + [f"pseudo-labels: {len(pseudo)} test images of {test_dir} join every fold's training set "
                     f"(predicted with p >= {threshold}; listed in pseudo_labels.csv)"]
    return pd.concat([table, pseudo[table.columns]], ignore_index=True), notes


def read_pseudo_labels(probs_csv, test_dir, classes, threshold):
    """Test images whose predicted class (inference.py's probs.csv: id, p0..p{C-1}) is at least threshold
    probable, as table rows (absolute path, label = that class, fold PSEUDO_FOLD) with their confidence."""
    probs = read_csv_checked(probs_csv, [f"p{i}" for i in range(len(classes))],
                             fix=f"pass a probs.csv written by inference.py for these {len(classes)} classes")
    frame, files, _ = read_test_table(test_dir)
    ids, expected = probs.iloc[:, 0].tolist(), frame.iloc[:, 0].astype(str).tolist()
    if sorted(ids) != sorted(expected) or len(probs.columns) != len(classes) + 1:
        differ = sorted(set(ids) ^ set(expected))[:1] or ["its columns"]
        raise UserError(f"{probs_csv} does not match the test images of {test_dir} ({len(ids)} rows vs "
                        f"{len(expected)}, first difference: {differ[0]}): pass the probs.csv predicted for "
                        "--pseudo_dir, with this run's classes")
    values = probs.set_index(probs.columns[0]).loc[expected].to_numpy(float)
    confident = values.max(1) >= threshold
    return pd.DataFrame({"path": [str(Path(f).resolve()) for f in np.array(files)[confident]], "profile": "",
                         "mask": pd.NA, "gender": pd.NA, "age": pd.NA, "label": values[confident].argmax(1),
                         "fold": PSEUDO_FOLD, "confidence": values[confident].max(1)})


# ---- images ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CenterShare:
    """A centred crop keeping these shares of an image's height and width, whatever its size: the baseline's
    CenterCrop(320, 256) of the 512x384 mask photos is CenterShare(0.625, 0.667)."""
    height: float
    width: float

    def box(self, width, height):
        """(x0, y0, x1, y1) in whole pixels of an image of this size."""
        keep_w, keep_h = max(1, round(width * self.width)), max(1, round(height * self.height))
        x0, y0 = (width - keep_w) // 2, (height - keep_h) // 2
        return (x0, y0, x0 + keep_w, y0 + keep_h)


def center_share(center_crop):
    """The CenterShare of a --center_crop value (config.json's "center_crop"), None for whole images (none, 1 1);
    a value that is not two shares in (0, 1] (a hand-edited config.json) is one UserError."""
    if not center_crop:
        return None
    try:
        share = CenterShare(*map(float, center_crop))
    except (TypeError, ValueError):  # not two numbers
        share = None
    if share is None or not (0 < share.height <= 1 and 0 < share.width <= 1):
        raise UserError(f"center_crop {center_crop!r} is not two shares in (0, 1], height then width: write e.g. "
                        "[0.625, 0.667], or [1, 1] for whole images")
    return None if (share.height, share.width) == (1, 1) else share


def image_boxes(paths, crop=None, margin=0.2, center_crop=None):
    """Per-image crop boxes for ImageDataset/load_image: crop_faces.py's face boxes (a CSV, widened by margin),
    one centred share of every image (center_crop: (height share, width share)), or None for whole images."""
    center = center_share(center_crop)
    if crop and center is not None:
        raise UserError("--crop (face boxes) and --center_crop both crop the images: choose one")
    if crop:
        return read_boxes(crop, paths, margin)
    return None if center is None else [center] * len(paths)


def load_image(path, draft_size=None, box=None):
    """RGB PIL image with EXIF orientation applied; JPEGs decode at reduced size when draft_size
    (w, h) is small (several times faster); box (x0, y0, x1, y1, in full-size pixels, or a CenterShare) crops."""
    with Image.open(path) as image:
        full_w, full_h = image.size
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF: shown rotated by 90 degrees
        shown = (full_h, full_w) if turned else (full_w, full_h)
        box = box.box(*shown) if isinstance(box, CenterShare) else box
        if draft_size and image.format == "JPEG":
            region = (box[2] - box[0], box[3] - box[1]) if box is not None else shown  # what must be big enough
            scale = max(draft_size[0] / max(region[0], 1), draft_size[1] / max(region[1], 1))
            image.draft("RGB", (int(full_w * scale) + 1, int(full_h * scale) + 1))
        shrink = image.size[0] / full_w
        image = ImageOps.exif_transpose(image)
        if box is not None:
            image = image.crop(tuple(round(v * shrink) for v in box))
        return to_rgb(image)


def to_rgb(image):
    """RGB of any PIL mode; 16/32-bit grey (16-bit PNGs, TIFFs) scaled 65535 -> 255, where Pillow's convert
    would clip every value above 255 to white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.float64) / 257  # 65535 / 255: the 16-bit range onto 8 bits
        image = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)  # what a bad file raises


def check_image(path):
    """None if the image decodes completely, else the reason."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (image.size[0] // 8 + 1, image.size[1] // 8 + 1))  # decodes every byte, faster
            image.load()
        return None
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"


def without_unreadable(table, data_dir, bad, skip):
    """(table, bad): unreadable images ((path, reason) from find_bad_images) stop the run, or with skip are
    dropped from the table."""
    if bad and not skip:
        raise UserError(f"{len(bad)} unreadable images: " + "; ".join(f"{p} ({r})" for p, r in bad)
                        + " — replace them or pass --skip_bad_images")
    bad_files = {p for p, _ in bad}
    keep = [str(Path(data_dir) / p) not in bad_files for p in table["path"]]
    return table[keep].reset_index(drop=True), bad


def find_bad_images(paths, workers=None):
    """[(path, reason)] for every file that does not decode, checked in parallel."""
    with Pool(workers or os.cpu_count()) as pool:
        reasons = pool.map(check_image, paths, chunksize=64)
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def read_boxes(boxes_csv, paths, margin=0.2):
    """Crop boxes for paths from a CSV (path,x0,y0,x1,y1), widened by margin of their size."""
    boxes = read_csv_checked(boxes_csv, ["path", "x0", "y0", "x1", "y1"], fix="write it with crop_faces.py",
                             missing_fix="check --crop, or write it with crop_faces.py").set_index("path")
    missing = [p for p in paths if p not in boxes.index]
    if missing:
        raise UserError(f"{boxes_csv} has no box for {len(missing)} images (first: {missing[0]}); "
                        "re-run crop_faces.py on this data")
    xyxy = boxes.loc[list(paths), ["x0", "y0", "x1", "y1"]].astype(float).to_numpy()
    pad = np.repeat((xyxy[:, 2:] - xyxy[:, :2]) * margin, 2, axis=0).reshape(-1, 4) * [-1, -1, 1, 1]
    return [tuple(b) for b in (xyxy + pad).clip(min=0)]


# ---- augmentation presets: uint8 tensors out; the model normalizes ------------------------------
def resize_ops(size, interpolation):
    return [T.Resize(size, interpolation=interpolation, antialias=True), T.ToImage()]


AUGMENTATIONS = {
    "base": lambda size, interp: resize_ops(size, interp),
    "flip": lambda size, interp: resize_ops(size, interp) + [T.RandomHorizontalFlip()],
    "strong": lambda size, interp: [
        T.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8 * size[1] / size[0], 1.25 * size[1] / size[0]),
                            interpolation=interp, antialias=True),
        T.ToImage(), T.RandomHorizontalFlip(), T.RandomAffine(degrees=10),
        T.ColorJitter(0.3, 0.3, 0.3, 0.05), T.RandomErasing(p=0.25, value=0)],
    "randaugment": lambda size, interp: resize_ops(size, interp) + [T.RandomHorizontalFlip(), T.RandAugment()],
    "trivialaugment": lambda size, interp: resize_ops(size, interp) + [T.RandomHorizontalFlip(),
                                                                       T.TrivialAugmentWide()],
}


class HalfCutMix:
    """Vertical CutMix that keeps each half of a face whole (a top boostcamp team's trick): with probability
    prob an image's left or right half is replaced by that half of another image of the batch, and its target
    becomes half of each label. With rare classes given (--mix_rare), the other image is drawn from the batch's
    images of those classes when it has any, so the rarest classes appear in more training images."""

    def __init__(self, prob, num_classes, rare_classes=()):
        self.prob, self.num_classes, self.rare = prob, num_classes, torch.as_tensor(list(rare_classes), dtype=torch.long)

    def __call__(self, images, targets):
        n, width = len(images), images.shape[-1]
        partner = torch.randperm(n, device=images.device)
        rare_rows = torch.nonzero(torch.isin(targets, self.rare.to(targets.device))).flatten()
        if len(rare_rows):
            partner = rare_rows[torch.randint(len(rare_rows), (n,), device=images.device)]
        mixed = torch.rand(n, device=images.device) < self.prob
        right = torch.rand(n, device=images.device) < 0.5  # which half comes from the partner
        columns = torch.arange(width, device=images.device) >= width // 2
        take = mixed[:, None] & (columns[None] == right[:, None])  # (N, W): columns taken from the partner
        images = torch.where(take[:, None, None, :], images[partner], images)
        onehot = torch.nn.functional.one_hot(targets, self.num_classes).float()
        share = take.float().mean(1, keepdim=True)  # 0.5 for a mixed image (by area), else 0
        return images, (1 - share) * onehot + share * onehot[partner]


def rarest_classes(labels, num_classes, share=1 / 3):
    """The classes with the fewest training images (the rarest third of those present)."""
    counts = np.bincount(labels, minlength=num_classes)
    present = np.flatnonzero(counts)
    return present[np.argsort(counts[present], kind="stable")[:max(1, round(len(present) * share))]].tolist()


def interpolation_mode(name):
    return T.InterpolationMode(name if name in ("bilinear", "bicubic", "nearest") else "bilinear")


def build_transform(augmentation, input_size, interpolation="bilinear", train=True):
    """The preset's ops for training, plain resize for evaluation; PIL in, uint8 CHW tensor out.
    A uint8 tensor already at input_size (a cached image) passes the resize unchanged."""
    size, interp = tuple(input_size[-2:]), interpolation_mode(interpolation)
    ops = lookup(AUGMENTATIONS, augmentation, "augmentation")(size, interp) if train else resize_ops(size, interp)
    return T.Compose(ops + [T.ToDtype(torch.uint8)])


def resizes_first(transform):
    """True when a transform begins with the plain resize, so a cached image gives the same pixels."""
    return isinstance(transform.transforms[0], T.Resize)


class ImageDataset(Dataset):
    """Images of a table as (uint8 CHW tensor, label, row index); labels None -> -1 (test images).
    heads=True adds (mask, gender, age group) for multi-head models on the mask layout; read is
    load_image or a reader with its arguments (path, draft_size, box), such as speed.py's image cache."""

    def __init__(self, files, labels=None, transform=None, boxes=None, draft_size=None, heads=False,
                 read=load_image):
        self.files, self.transform, self.boxes = list(files), transform, boxes
        self.labels = np.full(len(self.files), -1) if labels is None else np.asarray(labels)
        self.draft_size, self.heads, self.read = draft_size, heads, read

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        box = self.boxes[index] if self.boxes is not None else None
        image = self.transform(self.read(self.files[index], self.draft_size, box))
        label = int(self.labels[index])
        return (image, label, index, torch.tensor(split_label(label))) if self.heads else (image, label, index)


# ---- command line ------------------------------------------------------------------------------
def add_data_args(parser):
    """Data arguments shared by dataset.py and train.py."""
    parser.add_argument("--layout", default="auto", help=f"auto or one of: {', '.join(LAYOUTS)}")
    parser.add_argument("--ann_file", default=None, help="annotation CSV/JSON for csv/json layouts")
    parser.add_argument("--path_col", default="path", help="image path column/field (csv, json)")
    parser.add_argument("--label_col", default="label", help="label column/field (csv, json)")
    parser.add_argument("--group_col", default=None, help="group column kept in one fold (csv, json)")
    parser.add_argument("--age_bounds", type=in_range(int, 1), nargs=2, default=list(AGE_BOUNDS),
                        help="age group edges of the labels (the competition's rule)")
    parser.add_argument("--train_age_bounds", type=in_range(int, 1), nargs=2, default=None,
                        help="mask layout: train on other age-group edges (e.g. 30 58); OOF, reports and the "
                             "submission stay on --age_bounds")
    parser.add_argument("--folds", type=in_range(int, 1), default=5, help="K folds; 1 = one grouped holdout")
    parser.add_argument("--val_ratio", type=in_range(float, 0, 1, True, True), default=0.2, help="holdout share when --folds 1")
    parser.add_argument("--split", default="group", choices=["group", "random"],
                        help="group keeps each person in one fold; random leaks (for comparison only)")
    parser.add_argument("--pseudo_labels", default=None, help="probs.csv from inference.py: test images predicted "
                        "with at least --pseudo_threshold join every fold's training set (never validation)")
    parser.add_argument("--pseudo_dir", default=os.environ.get("SM_CHANNEL_EVAL", "sample/eval"),
                        help="the test folder (info.csv) that --pseudo_labels was predicted for")
    parser.add_argument("--pseudo_threshold", type=in_range(float, 0, 1, low_open=True), default=0.9,
                        help="least predicted probability of a pseudo-label")
    parser.add_argument("--drop_list", default=None, help="CSV of images to leave out (path or profile)")
    parser.add_argument("--relabel_list", default=None, help="CSV of corrections (path|profile[,image],field,value)")


def table_from_args(args):
    return build_table(args.data_dir, args.layout, args.folds, args.seed, args.val_ratio, args.split == "group",
                       tuple(args.age_bounds), args.drop_list, args.relabel_list, ann_file=args.ann_file,
                       path_col=args.path_col, label_col=args.label_col, group_col=args.group_col)


def summarize(table, classes, notes):
    people = table["profile"].replace("", pd.NA).nunique()
    lines = [f"{len(table)} images, {people} people/groups, {len(classes)} classes"]
    counts = table["label"].value_counts().reindex(range(len(classes)), fill_value=0)
    lines += [f"  {i:>3} {name:<28} {n}" for i, (name, n) in enumerate(zip(classes, counts))]
    lines.append("fold sizes: " + ", ".join(f"{f}: {n}" for f, n in table["fold"].value_counts().sort_index().items()))
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main():
    parser = KitParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("SM_CHANNEL_TRAIN", "sample/train"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="write the table here (CSV)")
    parser.add_argument("--verify", action="store_true", help="decode every image and list unreadable ones")
    add_data_args(parser)
    args = parser.parse_args()
    table, classes, notes, layout = table_from_args(args)
    print(f"layout: {layout}\n{summarize(table, classes, notes)}")
    if args.verify:
        bad = find_bad_images([str(Path(args.data_dir) / p) for p in table["path"]])
        if bad:
            raise UserError(f"{len(bad)} unreadable images: " + "; ".join(f"{p} ({r})" for p, r in bad)
                            + " — remove or replace them")
        print(f"verified: all {len(table)} images decode")
    if args.out:
        atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
