"""dataset.py: the table is exactly right on every layout, folds keep people together, bad input is one line.

Synthetic trees are written into tmp_path by small helpers; labels are checked against values worked out
by hand (mask*6 + female*3 + age group, ages <30 | 30-59 | >=60), never against dataset.make_label.
"""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
import dataset  # noqa: E402
from kit.common import UserError, run_main  # noqa: E402
from dataset import apply_corrections, build_table, detect_layout  # noqa: E402
from kit.images import ImageDataset, find_bad_images, load_image  # noqa: E402

SAMPLE = ROOT / "sample" / "train"
STEM_MASK = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "


def jpeg_bytes(colour=(200, 120, 40), size=(8, 6), fmt="JPEG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


TINY_JPEG = jpeg_bytes()


def hand_label(stem, gender, age, bounds=(30, 60)):
    return STEM_MASK[stem] * 6 + (gender == "female") * 3 + (age >= bounds[0]) + (age >= bounds[1])


def write_mask_tree(root, people, exts=None, missing=(), extra=(), junk=False):
    """root/train/{train.csv, images/<id>_<gender>_Asian_<age>/<stem><ext>} for people [(id, gender, age)].
    exts {id: ext} (default .jpg); missing {(id, stem)} left out; extra [(id, file name)] added;
    junk adds macOS/Jupyter/hidden files that are not pictures."""
    train, folders = root / "train", []
    for pid, gender, age in people:
        folder = train / "images" / f"{pid}_{gender}_Asian_{age}"
        folder.mkdir(parents=True)
        folders.append(folder.name)
        for stem in STEM_MASK:
            if (pid, stem) not in missing:
                (folder / f"{stem}{(exts or {}).get(pid, '.jpg')}").write_bytes(TINY_JPEG)
        for extra_pid, name in extra:
            if extra_pid == pid:
                (folder / name).write_bytes(TINY_JPEG)
    if junk:
        first = train / "images" / folders[0]
        (first / "._mask1.jpg").write_bytes(APPLEDOUBLE)
        (first / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (first / ".hidden.jpg").write_bytes(TINY_JPEG)
        (first / "Thumbs.db").write_bytes(b"\xd0\xcf")
        (first / ".ipynb_checkpoints").mkdir()
        (first / ".ipynb_checkpoints" / "mask1-checkpoint.jpg").write_bytes(TINY_JPEG)
        (train / "images" / f"._{folders[0]}").write_bytes(APPLEDOUBLE)
    rows = [f"{pid},{gender},Asian,{age},{name}" for (pid, gender, age), name in zip(people, folders)]
    (train / "train.csv").write_text("id,gender,race,age,path\n" + "\n".join(rows) + "\n")
    return train


def expected_rows(people, exts=None, missing=(), prefix="images/", bounds=(30, 60)):
    rows = set()
    for pid, gender, age in people:
        for stem in STEM_MASK:
            if (pid, stem) not in missing:
                path = f"{prefix}{pid}_{gender}_Asian_{age}/{stem}{(exts or {}).get(pid, '.jpg')}"
                rows.add((path, pid, STEM_MASK[stem], int(gender == "female"), age, hand_label(stem, gender, age,
                                                                                                 bounds)))
    return rows


def table_rows(table):
    return set(table[["path", "profile", "mask", "gender", "age", "label"]].itertuples(index=False, name=None))


def people_grid(n_per_cell=4, ages=(20, 45, 70)):
    """n_per_cell people for each gender x age, ids with leading zeros."""
    return [(f"{i:06d}", gender, age) for i, (gender, age) in
            enumerate([(g, a) for g in ("male", "female") for a in ages] * n_per_cell)]


def run_cli(monkeypatch, capsys, *args):
    """dataset.py's command line in this process (same run_main path as `python dataset.py`)."""
    monkeypatch.setattr(sys, "argv", ["dataset.py", *map(str, args)])
    monkeypatch.delenv("SM_CHANNEL_TRAIN", raising=False)
    try:
        run_main(dataset.main)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- mask layout: the table ---------------------------------------------------------------------
EDGE_PEOPLE = [("000010", "male", 29), ("000011", "female", 29), ("000600-1", "male", 30), ("000013", "female", 30),
               ("000014", "male", 59), ("000015", "female", 59), ("000016", "male", 60), ("000017", "female", 60),
               ("000018", "male", 18), ("000019", "female", 75)]
EDGE_EXTS = {"000011": ".jpeg", "000013": ".png", "000014": ".JPG", "000600-1": ".jpeg"}


def test_mask_table_is_exact_with_junk_mixed_extensions_and_edge_ages(tmp_path):
    train = write_mask_tree(tmp_path, EDGE_PEOPLE, exts=EDGE_EXTS, junk=True)
    table, classes, notes, layout = build_table(train, folds=2)
    assert layout == "mask" and notes == []
    assert len(table) == 70 and not table["path"].duplicated().any()
    assert table_rows(table) == expected_rows(EDGE_PEOPLE, EDGE_EXTS)
    assert not table["path"].str.contains(r"/\.|^\.|checkpoint|Thumbs", regex=True).any()
    assert {Path(p).suffix for p in table["path"]} == {".jpg", ".jpeg", ".png", ".JPG"}
    by_path = table.set_index("path")["label"]
    # spelled out: wear/male/<30, wear/female/<30, incorrect/male/30-59, not_worn/female/30-59, ..., >=60
    assert by_path["images/000010_male_Asian_29/mask1.jpg"] == 0
    assert by_path["images/000011_female_Asian_29/mask3.jpeg"] == 3
    assert by_path["images/000600-1_male_Asian_30/incorrect_mask.jpeg"] == 7
    assert by_path["images/000013_female_Asian_30/normal.png"] == 16
    assert by_path["images/000014_male_Asian_59/normal.JPG"] == 13
    assert by_path["images/000016_male_Asian_60/mask5.jpg"] == 2
    assert by_path["images/000017_female_Asian_60/incorrect_mask.jpg"] == 11
    assert classes[0] == "wear/male/<30" and classes[10] == "incorrect/female/30-59" and classes[17].endswith(">=60")


def test_age_bounds_move_the_edges(tmp_path):
    people = [("000001", "male", 29), ("000002", "male", 30), ("000003", "female", 57), ("000004", "female", 58),
              ("000005", "male", 59), ("000006", "female", 60)]
    table, classes, _, _ = build_table(write_mask_tree(tmp_path, people), folds=2, age_bounds=(30, 58))
    assert table_rows(table) == expected_rows(people, bounds=(30, 58))
    groups = table.drop_duplicates("profile").set_index("profile")["label"] % 3
    assert groups.to_dict() == {"000001": 0, "000002": 1, "000003": 1, "000004": 2, "000005": 2, "000006": 2}
    assert classes[:3] == ["wear/male/<30", "wear/male/30-57", "wear/male/>=58"]


def test_ids_stay_strings_with_leading_zeros(tmp_path, monkeypatch, capsys):
    people = [("000600-1", "male", 40), ("000010", "female", 20), ("010", "male", 70), ("1e3", "female", 35)]
    train = write_mask_tree(tmp_path, people)
    table = build_table(train, folds=2)[0]
    assert set(table["profile"]) == {"000600-1", "000010", "010", "1e3"}
    out = tmp_path / "labels.csv"
    assert run_cli(monkeypatch, capsys, "--data_dir", train, "--folds", 2, "--out", out)[0] == 0
    profiles = {line.split(",")[1] for line in out.read_text().splitlines()[1:]}
    assert profiles == {"000600-1", "000010", "010", "1e3"}


def test_missing_extra_and_duplicate_pictures_are_noted_not_dropped(tmp_path):
    people = people_grid(1)
    missing = {("000002", "mask3")}
    extra = [("000004", "mask6.jpg"), ("000005", "mask1.png"), ("000001", "notes.txt")]  # a .txt is no picture
    table, _, notes, _ = build_table(write_mask_tree(tmp_path, people, missing=missing, extra=extra), folds=2)
    assert table_rows(table) == expected_rows(people, missing=missing)  # mask1.jpg wins over mask1.png: sorted
    assert len(notes) == 3
    assert any("000002_male_Asian_70" in n and "mask3" in n and "missing" in n for n in notes)
    assert any("000004_female_Asian_45/mask6.jpg" in n and "unexpected" in n for n in notes)
    assert any("000005_female_Asian_70/mask1.png" in n and "duplicate" in n for n in notes)


def test_person_listed_twice_in_csv_gives_images_once(tmp_path):
    people = people_grid(1)
    train = write_mask_tree(tmp_path, people)
    with open(train / "train.csv", "a") as csv:
        csv.write("000003,female,Asian,20,000003_female_Asian_20\n")
    table, _, notes, _ = build_table(train, folds=2)
    assert table_rows(table) == expected_rows(people)
    assert any("000003_female_Asian_20" in n for n in notes)


def test_data_dir_may_be_train_folder_or_images_folder(tmp_path):
    people = people_grid(1)
    train = write_mask_tree(tmp_path, people, junk=True)
    from_images, _, _, layout = build_table(train / "images", folds=2)
    assert layout == "mask" and detect_layout(train / "images") == "mask"
    assert table_rows(from_images) == expected_rows(people, prefix="")
    assert all((train / "images" / p).is_file() for p in from_images["path"])


def test_sample_train_every_person_seven_images_and_junk_excluded():
    files = [p for p in SAMPLE.joinpath("images").rglob("*") if p.is_file()]
    junk = [p for p in files if any(part.startswith(".") for part in p.relative_to(SAMPLE).parts)]
    assert len(junk) >= 4 and any(p.name.startswith("._") for p in junk)
    assert any(".ipynb_checkpoints" in p.parts for p in junk)
    table, classes, notes, layout = build_table(SAMPLE)
    people = pd.read_csv(SAMPLE / "train.csv", dtype=str)
    assert layout == "mask" and notes == [] and len(classes) == 18
    assert len(table) == len(files) - len(junk) == 7 * len(people)
    assert (table.groupby("profile").size() == 7).all() and set(table["profile"]) == set(people["id"])
    assert not set(table["path"]) & {str(p.relative_to(SAMPLE)) for p in junk}
    assert {Path(p).suffix for p in table["path"]} >= {".jpg", ".jpeg", ".png", ".JPG"}
    for row in table.itertuples():
        _, gender, _, age = Path(row.path).parent.name.split("_")
        assert row.label == hand_label(Path(row.path).stem, gender, int(age))
    assert "000600-1" in set(table["profile"])


# ---- folds ----------------------------------------------------------------------------------------
def test_folds_keep_people_together_are_stratified_and_follow_the_seed(tmp_path):
    people = people_grid(5)  # 30 people, 5 per gender x age cell
    train = write_mask_tree(tmp_path, people)
    table = build_table(train, folds=5, seed=42)[0]
    assert (table.groupby("profile")["fold"].nunique() == 1).all()
    assert sorted(table["fold"].unique()) == [0, 1, 2, 3, 4]
    per_fold_cell = table.drop_duplicates("profile").groupby(["fold", "gender", "age"]).size()
    assert per_fold_cell.max() <= 2  # 5 people per cell over 5 folds: stratified means ~1 each
    assert (table.groupby("fold")["label"].nunique() >= 12).all()
    again = build_table(train, folds=5, seed=42)[0]
    assert table["fold"].tolist() == again["fold"].tolist()
    others = [build_table(train, folds=5, seed=seed)[0]["fold"].tolist() for seed in (1, 7)]
    assert all(other != table["fold"].tolist() for other in others)


def test_sample_folds_are_balanced_per_class():
    table = build_table(SAMPLE, folds=5, seed=0)[0]
    assert (table.groupby("profile")["fold"].nunique() == 1).all()
    people = table.drop_duplicates("profile")
    cell = people["gender"] * 3 + people["label"] % 3
    share = pd.crosstab(people["fold"], cell)
    assert (share.max() - share.min()).max() <= 2


def test_one_fold_is_a_grouped_holdout_of_val_ratio(tmp_path):
    train = write_mask_tree(tmp_path, people_grid(5))
    table = build_table(train, folds=1, val_ratio=0.2)[0]
    assert set(table["fold"]) == {0, -1}
    assert (table.groupby("profile")["fold"].nunique() == 1).all()
    assert table.drop_duplicates("profile")["fold"].eq(0).sum() == 6  # 20% of 30 people
    quarter = build_table(train, folds=1, val_ratio=0.25)[0]
    assert 6 <= quarter.drop_duplicates("profile")["fold"].eq(0).sum() <= 9


def test_random_split_ignores_people(tmp_path):
    table = build_table(write_mask_tree(tmp_path, people_grid(3)), folds=3, grouped=False)[0]
    assert (table.groupby("profile")["fold"].nunique() > 1).any()


# ---- other layouts ---------------------------------------------------------------------------------
def write_flat_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(TINY_JPEG)


GROUPED = [(f"img_{i:03d}.jpg", ["cat", "dog", "owl"][i % 3], f"g{i // 2:02d}") for i in range(36)]


def check_grouped(table, classes, items, prefix):
    assert classes == ["cat", "dog", "owl"]
    assert sorted(table["path"]) == sorted(prefix + name for name, _, _ in items)
    truth = {prefix + name: classes.index(label) for name, label, _ in items}
    assert (table["label"] == table["path"].map(truth)).all()
    assert (table.groupby("profile")["fold"].nunique() == 1).all() and table["profile"].nunique() == 18
    assert sorted(table["fold"].unique()) == [0, 1, 2]


def test_csv_layout_with_groups(tmp_path):
    write_flat_images(tmp_path / "images", [name for name, _, _ in GROUPED] + ["._img_000.jpg"])
    pd.DataFrame(GROUPED, columns=["file", "species", "site"]).to_csv(tmp_path / "annotations.csv", index=False)
    table, classes, _, layout = build_table(tmp_path, folds=3, path_col="file", label_col="species",
                                            group_col="site")
    assert layout == "csv" == detect_layout(tmp_path)
    check_grouped(table, classes, GROUPED, "images/")


def test_csv_layout_named_train_csv_is_not_taken_for_the_mask_layout(tmp_path):
    write_flat_images(tmp_path / "images", [name for name, _, _ in GROUPED])
    rows = [(f"images/{name}", label, group) for name, label, group in GROUPED]
    pd.DataFrame(rows, columns=["path", "label", "group"]).to_csv(tmp_path / "train.csv", index=False)
    table, classes, _, layout = build_table(tmp_path, folds=3, group_col="group")
    assert layout == "csv"
    check_grouped(table, classes, GROUPED, "images/")


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_layout_with_groups(tmp_path, wrapped):
    write_flat_images(tmp_path / "train", [name for name, _, _ in GROUPED])
    records = [{"image": name.removesuffix(".jpg"), "y": label, "site": group} for name, label, group in GROUPED]
    (tmp_path / "labels.json").write_text(json.dumps({"annotations": records} if wrapped else records))
    table, classes, _, layout = build_table(tmp_path, folds=3, path_col="image", label_col="y", group_col="site")
    assert layout == "json" == detect_layout(tmp_path)
    check_grouped(table, classes, GROUPED, "train/")


def test_json_numeric_labels_sort_as_numbers(tmp_path):
    names = [f"{i}.png" for i in range(30)]
    write_flat_images(tmp_path, names)
    (tmp_path / "a.json").write_text(json.dumps([{"path": n, "label": [2, 10, 1][i % 3]} for i, n in
                                                 enumerate(names)]))
    table, classes, _, _ = build_table(tmp_path, folds=3)
    assert classes == ["1", "2", "10"]
    assert table.set_index("path")["label"].to_dict() == {n: [1, 2, 0][i % 3] for i, n in enumerate(names)}


def test_folder_layout(tmp_path):
    expected = {}
    for index, name in enumerate(["bird", "cat", "dog"]):
        write_flat_images(tmp_path / name, [f"{name}{i}.jpg" for i in range(4)] + [f"{name}.PNG"])
        write_flat_images(tmp_path / name / "nested", [f"deep_{name}.jpeg"])
        write_flat_images(tmp_path / name / ".ipynb_checkpoints", [f"{name}0-checkpoint.jpg"])
        (tmp_path / name / f"._{name}0.jpg").write_bytes(APPLEDOUBLE)
        (tmp_path / name / "readme.txt").write_text("not a picture")
        expected.update({f"{name}/{name}{i}.jpg": index for i in range(4)})
        expected.update({f"{name}/{name}.PNG": index, f"{name}/nested/deep_{name}.jpeg": index})
    (tmp_path / ".cache").mkdir()
    table, classes, _, layout = build_table(tmp_path, folds=3)
    assert layout == "folder" == detect_layout(tmp_path) and classes == ["bird", "cat", "dog"]
    assert table.set_index("path")["label"].to_dict() == expected and len(table) == len(expected)
    assert sorted(table["fold"].unique()) == [0, 1, 2] and (table.groupby("fold")["label"].nunique() == 3).all()


# ---- command line -------------------------------------------------------------------------------------
def test_cli_writes_the_table_and_prints_a_summary(tmp_path):
    people = people_grid(2)
    train = write_mask_tree(tmp_path, people, junk=True)
    out = tmp_path / "labels.csv"
    env = {k: v for k, v in os.environ.items() if k != "SM_CHANNEL_TRAIN"}
    done = subprocess.run([sys.executable, "dataset.py", "--data_dir", str(train), "--folds", "3", "--seed", "42",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    written = pd.read_csv(out, dtype={"profile": str})
    assert list(written.columns) == ["path", "profile", "mask", "gender", "age", "label", "fold"]
    assert table_rows(written) == expected_rows(people)
    assert written["fold"].tolist() == build_table(train, folds=3, seed=42)[0]["fold"].tolist()
    assert "layout: mask" in done.stdout and "84 images, 12 people/groups, 18 classes" in done.stdout
    sizes = written["fold"].value_counts().sort_index()
    assert "fold sizes: " + ", ".join(f"{f}: {n}" for f, n in sizes.items()) in done.stdout
    assert sizes.sum() == 84 and set(sizes.index) == {0, 1, 2} and f"wrote {out}" in done.stdout
    assert re.search(r"^ +0 wear/male/<30 +10$", done.stdout, re.M)  # 2 young men x mask1..5
    assert re.search(r"^ +17 not_worn/female/>=60 +2$", done.stdout, re.M)


def test_cli_verify_lists_unreadable_and_truncated_images(tmp_path, monkeypatch, capsys):
    train = write_mask_tree(tmp_path, people_grid(1))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG")
    folder = train / "images" / "000000_male_Asian_20"
    (folder / "mask2.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    (folder / "mask3.jpg").write_text("<html>not an image</html>")
    out = tmp_path / "labels.csv"
    code, _, err = run_cli(monkeypatch, capsys, "--data_dir", train, "--folds", 2, "--verify", "--out", out)
    assert code == 2 and not out.exists()
    assert err.startswith("error: 2 unreadable images") and len(err.strip().splitlines()) == 1
    assert "mask2.jpg (OSError: image file is truncated" in err and "mask3.jpg (UnidentifiedImageError" in err
    assert "mask1.jpg" not in err
    bad = find_bad_images([str(folder / f"mask{i}.jpg") for i in (1, 2, 3)], workers=1)
    assert [Path(p).name for p, _ in bad] == ["mask2.jpg", "mask3.jpg"]


def test_cli_verify_passes_on_good_images(tmp_path, monkeypatch, capsys):
    train = write_mask_tree(tmp_path, people_grid(1))
    code, out, _ = run_cli(monkeypatch, capsys, "--data_dir", train, "--folds", 2, "--verify")
    assert code == 0 and "verified: all 42 images decode" in out


def break_train_csv(train):
    (train / "train.csv").unlink()


def drop_age_column(train):
    pd.read_csv(train / "train.csv", dtype=str).drop(columns="age").to_csv(train / "train.csv", index=False)


def remove_a_folder(train):
    (train / "images" / "000001_male_Asian_45").rename(train / "images" / "renamed")


def bad_gender(train):
    table = pd.read_csv(train / "train.csv", dtype=str)
    table.loc[0, "gender"] = "M"
    table.to_csv(train / "train.csv", index=False)


@pytest.mark.parametrize("spoil, says", [
    (break_train_csv, "train.csv"), (drop_age_column, "no column age"),
    (remove_a_folder, "000001_male_Asian_45 named in"), (bad_gender, "person 000000 has gender 'M'")])
def test_bad_mask_input_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, capsys, spoil, says):
    train = write_mask_tree(tmp_path, people_grid(1))
    spoil(train)
    out = tmp_path / "labels.csv"
    code, stdout, err = run_cli(monkeypatch, capsys, "--data_dir", train, "--out", out, "--folds", 2)
    assert code == 2 and not out.exists() and not list(tmp_path.glob(".labels*"))
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and says in err, err
    assert "Traceback" not in err + stdout


def test_csv_layout_without_label_column_is_one_error_line(tmp_path, monkeypatch, capsys):
    write_flat_images(tmp_path / "images", ["a.jpg", "b.jpg"])
    (tmp_path / "data.csv").write_text("path,klass\na.jpg,x\nb.jpg,y\n")
    out = tmp_path / "labels.csv"
    code, _, err = run_cli(monkeypatch, capsys, "--data_dir", tmp_path, "--out", out)
    assert code == 2 and not out.exists()
    assert err.startswith("error: ") and "no field 'label'" in err and "--label_col" in err
    assert len(err.strip().splitlines()) == 1


def test_csv_layout_naming_missing_images_is_one_error_line(tmp_path):
    write_flat_images(tmp_path / "images", ["a.jpg"])
    (tmp_path / "data.csv").write_text("path,label\na.jpg,x\nlost.jpg,y\n")
    with pytest.raises(UserError, match="1 images not found.*lost.jpg"):
        build_table(tmp_path)


# ---- corrections ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_table():
    table, classes, _, _ = build_table(SAMPLE, folds=2)
    return table, classes


def test_drop_by_path_by_profile_and_by_profile_image(tmp_path, sample_table):
    table, classes = sample_table
    drops = tmp_path / "drop.csv"
    drops.write_text("path,profile,image\n"
                     "images/000002_male_Asian_30/mask1.jpg,,\n,000001,\n,000007,normal\n")
    corrected = apply_corrections(table, classes, drop_list=drops)[0]
    kept = corrected[corrected["train_label"] >= 0]  # left out of training; still scored on the given labels
    assert corrected[["path", "label"]].equals(table[["path", "label"]])
    gone = set(table["path"]) - set(kept["path"])
    assert len(gone) == 1 + 7 + 1
    assert "images/000002_male_Asian_30/mask1.jpg" in gone and "images/000007_male_Asian_39/normal.JPG" in gone
    assert not (kept["profile"] == "000001").any() and (kept["profile"] == "000007").sum() == 6


def test_relabel_gender_mask_and_label(tmp_path, sample_table):
    table, classes = sample_table
    fixes = tmp_path / "relabel.csv"
    fixes.write_text("path,profile,image,field,value\n"
                     ",000001,,gender,male\n"                                   # all 7 of a person
                     ",000002,mask1,mask,incorrect\n"                           # one picture by profile+image
                     "images/000007_male_Asian_39/normal.JPG,,,mask,0\n"          # by path, as an index
                     "images/000091_female_Asian_18/mask1.jpg,,,label,not_worn/female/>=60\n")
    fixed = apply_corrections(table, classes, relabel_list=fixes)[0].set_index("path")["train_label"]
    before = table.set_index("path")["label"]
    assert before["images/000001_female_Asian_45/mask1.jpg"] == 4
    assert fixed["images/000001_female_Asian_45/mask1.jpg"] == 1
    assert fixed["images/000001_female_Asian_45/normal.jpg"] == 13
    assert fixed["images/000002_male_Asian_30/mask1.jpg"] == 7 and fixed["images/000002_male_Asian_30/mask2.jpg"] == 1
    assert fixed["images/000007_male_Asian_39/normal.JPG"] == 1
    assert fixed["images/000091_female_Asian_18/mask1.jpg"] == 17  # a label fix is kept as given
    assert (fixed != before).sum() == 7 + 1 + 1 + 1


def test_relabel_csv_layout_label(tmp_path):
    write_flat_images(tmp_path / "images", [name for name, _, _ in GROUPED])
    pd.DataFrame(GROUPED, columns=["path", "label", "site"]).to_csv(tmp_path / "a.csv", index=False)
    fixes = tmp_path / "fix" / "relabel.csv"
    fixes.parent.mkdir()
    fixes.write_text("path,field,value\nimages/img_000.jpg,label,owl\nimages/img_001.jpg,label,0\n")
    table = build_table(tmp_path, folds=3, group_col="site", ann_file="a.csv", relabel_list=fixes)[0]
    labels = table.set_index("path")["train_label"]
    assert [labels[f"images/img_00{i}.jpg"] for i in range(4)] == [2, 0, 2, 0]
    fixes.write_text("path,field,value\nimages/img_000.jpg,gender,male\n")
    with pytest.raises(UserError, match="field must be label"):
        build_table(tmp_path, folds=3, ann_file="a.csv", relabel_list=fixes)


@pytest.mark.parametrize("kind, text, says", [
    ("drop", "", "not a readable CSV"),
    ("drop", "file\nx.jpg\n", "no path or profile"),
    ("relabel", "profile,value\n000001,male\n", "no column field"),
    ("relabel", "profile,field,value\n000001,age,40\n", "field must be gender, mask or label"),
    ("relabel", "profile,field,value\n000001,gender,robot\n", "gender value 'robot'"),
    ("relabel", "profile,field,value\n000001,gender,2\n", "gender value '2'"),
    ("relabel", "profile,field,value\n000001,label,18\n", "label value '18'")])
def test_bad_correction_files_are_one_line(tmp_path, sample_table, kind, text, says):
    table, classes = sample_table
    path = tmp_path / f"{kind}.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=says) as err:
        apply_corrections(table, classes, **{f"{kind}_list": path})
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---- images ------------------------------------------------------------------------------------------
def exif_rotated_jpeg(path, size=(40, 20), orientation=6):
    """A JPEG whose stored pixels have a red left half, tagged to be shown rotated."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path):
    exif_rotated_jpeg(tmp_path / "rot.jpg")
    image = load_image(tmp_path / "rot.jpg")
    assert image.size == (20, 40) and image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[35, 10, 2] > 200  # orientation 6: stored left half is now on top


@pytest.mark.parametrize("mode, fmt, colour", [("L", "JPEG", 128), ("LA", "PNG", (128, 255)), ("RGBA", "PNG",
                         (10, 200, 30, 255)), ("CMYK", "JPEG", (0, 255, 255, 0)), ("P", "PNG", None),
                         ("1", "PNG", 1), ("I;16", "PNG", 300)])
def test_any_mode_loads_as_rgb(tmp_path, mode, fmt, colour):
    path = tmp_path / f"image.{fmt.lower()}"
    image = Image.new(mode, (12, 10), colour) if colour else Image.new("RGB", (12, 10), (250, 10, 10)).convert("P")
    image.save(path, fmt)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (12, 10)
    red, green, blue = np.asarray(loaded)[5, 5].astype(int)
    if mode in ("P", "CMYK"):
        assert red > 200 and green < 60 and blue < 60
    if mode in ("L", "LA"):
        assert red == green == blue and abs(red - 128) <= 2


@pytest.mark.parametrize("size, draft", [((640, 480), (64, 48)), ((640, 480), (48, 64)), ((300, 1000), (31, 100)),
                                         ((1000, 200), (101, 11))])
def test_draft_decoding_is_at_least_the_requested_size(tmp_path, size, draft):
    Image.new("RGB", size, (90, 160, 30)).save(tmp_path / "big.jpg", quality=90)
    fast = load_image(tmp_path / "big.jpg", draft_size=draft)
    assert fast.size[0] >= draft[0] and fast.size[1] >= draft[1]
    assert fast.size[0] < size[0]  # it did decode smaller
    assert load_image(tmp_path / "big.jpg").size == size


@pytest.mark.parametrize("case", ["exif", "box"])
def test_draft_is_at_least_the_requested_size_after_rotation_or_box(tmp_path, case):
    if case == "exif":
        exif_rotated_jpeg(tmp_path / "x.jpg", size=(800, 200))
        image = load_image(tmp_path / "x.jpg", draft_size=(190, 50))  # full image is 200 x 800 once rotated
        assert image.size[0] >= 190 and image.size[1] >= 50
    else:
        Image.new("RGB", (1600, 1200), "red").save(tmp_path / "x.jpg")
        image = load_image(tmp_path / "x.jpg", draft_size=(100, 160), box=(0, 0, 800, 300))
        assert image.size[0] >= 100 and image.size[1] >= 160


def test_image_dataset_gives_uint8_chw_of_the_transform_size_and_the_label(sample_table):
    table, _ = sample_table
    rows = table.iloc[[0, 9, 30]]
    files = [str(SAMPLE / p) for p in rows["path"]]
    transform = dataset.build_transform("base", (3, 40, 30), train=False)
    data = ImageDataset(files, rows["label"].to_numpy(), transform, draft_size=(30, 40))
    assert len(data) == 3
    for index in range(3):
        image, label, row = data[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 40, 30)
        assert label == rows["label"].iloc[index] and row == index
    heads = ImageDataset(files, rows["label"].to_numpy(), transform, heads=True)[1][3]
    label = rows["label"].iloc[1]
    assert heads.tolist() == [label // 6, label // 3 % 2, label % 3]
    assert image.float().std() > 5  # a picture, not a blank
    assert ImageDataset(files, None, transform)[0][1] == -1


@pytest.mark.parametrize("preset", sorted(dataset.AUGMENTATIONS))
def test_every_augmentation_preset_gives_uint8_of_the_size(preset, sample_table):
    table, _ = sample_table
    image = load_image(SAMPLE / table["path"].iloc[0])
    transform = dataset.build_transform(preset, (3, 64, 48), "bicubic", train=True)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(4)]
    assert all(out.dtype == torch.uint8 and out.shape == (3, 64, 48) for out in outputs)
    assert all(out.float().std() > 5 for out in outputs)
    evaluation = dataset.build_transform(preset, (3, 64, 48), "bicubic", train=False)
    assert torch.equal(evaluation(image), evaluation(image))


def test_unknown_augmentation_lists_the_valid_ones():
    with pytest.raises(UserError) as err:
        dataset.build_transform("flipp", (3, 32, 32))
    message = str(err.value)
    assert "did you mean flip" in message and all(name in message for name in dataset.AUGMENTATIONS)
