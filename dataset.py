"""From raw competition folders to one table: a row per image with its label and its fold.

    python dataset.py --data_dir sample/train --folds 5 --seed 42 --out labels.csv
    python dataset.py --data_dir data/train --verify          # also decode every image, list bad ones

Layouts (detected from what is in --data_dir, or --layout):
  mask    train.csv (id,gender,race,age,path) + images/<path>/{mask1..5,incorrect_mask,normal}.*
  csv     a CSV with an image-path column and a label column (--path_col, --label_col)
  json    a JSON list of records with an image path and a label field (same options)
  folder  one sub-folder per class
This file is the one place for the recipe's data decisions: the mask layout's labels (mask*6 + gender*3 +
age group, kit/labels.py's grid) and class names, layouts, folds, corrections and augmentation presets.
Image decoding is kit/images.py's, the test table kit/tables.py's.
"""
import argparse
import json
import os
import warnings
from pathlib import Path

from kit.common import KitParser, UserError, atomic_write, lookup, run_main
from kit.options import add_data_args


def parse_args(argv=None):
    parser = KitParser(prog="python dataset.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("SM_CHANNEL_TRAIN", "sample/train"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="write the table here (CSV)")
    parser.add_argument("--verify", action="store_true", help="decode every image and list unreadable ones")
    add_data_args(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from torchvision.transforms import v2 as T

from kit.images import find_bad_images, unreadable_error
from kit.labels import AGE_BOUNDS, make_label, split_label
from kit.tables import PSEUDO_FOLD, read_csv_checked, resolve_image

MASK_FILES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
MASK_NAMES = ("wear", "incorrect", "not_worn")
GENDERS = ("male", "female")
MASK_CENTER_CROP = (0.625, 0.667)  # the baseline's 320x256 of the 512x384 mask photos: the face, larger
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MASK_COLUMNS = ("id", "gender", "age", "path")


# ---- labels: the one formula ----------------------------------------------------------------
def age_group(age, bounds=AGE_BOUNDS):
    """0 below bounds[0], 1 up to bounds[1]-1, 2 from bounds[1] (an age equal to a bound goes up)."""
    return np.digitize(age, bounds)


def training_labels(rows, train_age_bounds=None):
    """The labels a model trains on: train_label (the given label after --drop_list/--relabel_list; a run folder
    older than those columns: label), with train_age_bounds on other age-group edges (e.g. 30 58: people of 58-59
    look 60, so the rare old class gets more examples) unless a correction set the age group itself. OOF scores,
    reports and submissions keep the given labels. Rows without an age (pseudo-labels) keep theirs."""
    learned = (rows["train_label"] if "train_label" in rows else rows["label"]).to_numpy().astype(int)
    if not train_age_bounds:
        return learned
    age = pd.to_numeric(rows["age"], errors="coerce").to_numpy(float)
    mask, gender, group = split_label(learned)
    kept = group == split_label(rows["label"].to_numpy().astype(int))[2]  # no correction moved the age group
    shifted = make_label(mask, gender, np.where(kept, age_group(np.nan_to_num(age), train_age_bounds), group))
    return np.where(np.isnan(age) | (learned < 0), learned, shifted).astype(int)


def mask_class_names(bounds=AGE_BOUNDS):
    ages = (f"<{bounds[0]}", f"{bounds[0]}-{bounds[1] - 1}", f">={bounds[1]}")
    return [f"{m}/{g}/{a}" for m in MASK_NAMES for g in GENDERS for a in ages]


# ---- layouts ---------------------------------------------------------------------------------
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


def relabelled(table, classes, relabel_list, age_bounds=AGE_BOUNDS):
    """The table with field=value set for the rows each relabel_list row names, row by row. A gender or mask fix
    (mask layout) recomputes the label; a label fix sets it as given."""
    table, mask_layout = table.copy(), table["age"].notna().any()
    names = {"gender": list(GENDERS), "mask": list(MASK_NAMES), "label": list(classes)}
    for row in read_csv_checked(relabel_list, ["field", "value"], fix=CORRECTION_FIX,
                                missing_fix="check --relabel_list").to_dict("records"):
        if row["field"] not in names or (row["field"] != "label" and not mask_layout):
            raise UserError(f"{relabel_list}: field must be {'gender, mask or ' if mask_layout else ''}"
                            f"label, not '{row['field']}'")
        picked = select_rows(table, row, relabel_list)
        table.loc[picked, row["field"]] = correction_value(row, names[row["field"]], relabel_list)
        if row["field"] != "label":
            fixed = table[picked]
            table.loc[picked, "label"] = make_label(fixed["mask"], fixed["gender"], age_group(fixed["age"], age_bounds))
    return table


def apply_corrections(table, classes, drop_list=None, relabel_list=None, age_bounds=AGE_BOUNDS):
    """(table with train_label, notes): the label a model learns after relabel_list's fixes, -1 for the images
    drop_list leaves out of training. The given labels stay what every image is scored against (OOF, reports):
    a run with lists is comparable with one without, and its dropped images are still predicted and scored.
    Without lists the table is returned as it is (train_label is label)."""
    if not (drop_list or relabel_list):
        return table, []
    learned = relabelled(table, classes, relabel_list, age_bounds)["label"] if relabel_list else table["label"]
    learned = learned.to_numpy().copy()
    moved = int((learned != table["label"].to_numpy()).sum())
    if drop_list:
        drops = read_csv_checked(drop_list, fix=CORRECTION_FIX, missing_fix="check --drop_list").to_dict("records")
        learned[np.logical_or.reduce([select_rows(table, r, drop_list) for r in drops] or [False])] = -1
    notes = [f"corrections: {int((learned < 0).sum())} images left out of training, {moved} relabelled for "
             "training; all are scored on their given labels"]
    return table.assign(train_label=learned), notes


def build_table(data_dir, layout="auto", folds=5, seed=42, val_ratio=0.2, grouped=True,
                age_bounds=AGE_BOUNDS, drop_list=None, relabel_list=None, **layout_options):
    """The training table (path, profile, mask, gender, age, label, fold), class names and notes."""
    layout = detect_layout(data_dir) if layout == "auto" else layout
    table, classes, notes = lookup(LAYOUTS, layout, "layout")(data_dir, age_bounds=age_bounds, **layout_options)
    if table.empty:
        raise UserError(f"{data_dir}: no images found for the {layout} layout")
    for col in ("mask", "gender", "age"):
        if col not in table:
            table[col] = pd.NA
    table = table[["path", "profile", "mask", "gender", "age", "label"]]
    table, corrected = apply_corrections(table, classes, drop_list, relabel_list, age_bounds)
    return assign_folds(table, folds, seed, val_ratio, grouped), classes, notes + corrected, layout


def fold_rows(table, fold):
    """(training rows, validation rows) of a fold. Validation: the fold's images, scored on their given labels.
    Training: the other folds' images that no correction left out, and the pseudo-labels of this fold's own
    teacher (never those of a model that saw this fold's people)."""
    other = (table["fold"] != fold) & (table["train_label"] >= 0 if "train_label" in table else True)
    if "teacher_fold" in table:
        other &= (table["fold"] != PSEUDO_FOLD) | (table["teacher_fold"] == fold)
    if not other.any() or not (table["fold"] == fold).any():
        raise UserError(f"fold {fold} has no {'training' if (table['fold'] == fold).any() else 'validation'} "
                        "images: lower --folds or add data")
    return table[other], table[table["fold"] == fold]


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


# ---- command line ------------------------------------------------------------------------------
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


def main(argv=None):
    args = parse_args(argv)
    table, classes, notes, layout = table_from_args(args)
    print(f"layout: {layout}\n{summarize(table, classes, notes)}")
    if args.verify:
        bad = find_bad_images([str(Path(args.data_dir) / p) for p in table["path"]])
        if bad:
            raise unreadable_error(bad, "remove or replace them")
        print(f"verified: all {len(table)} images decode")
    if args.out:
        atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
