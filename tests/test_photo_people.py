"""sample/make_photo_people.py on a tiny set (6 + 2 people at 96x128): layout, labels, determinism, identity.

    python -m pytest -q tests/test_photo_people.py      # about 15 s; needs scikit-image and scikit-learn
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dataset import read_mask_layout
from kit.labels import make_label

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_photo_people", ROOT / "sample" / "make_photo_people.py")
make_photo_people = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_photo_people)
CLOTHES = "fashion_mnist" if Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file() else "photo"


def generate(out, *extra):
    make_photo_people.main(["--out", str(out), "--train_people", "6", "--eval_people", "2", "--size", "96", "128",
                            "--seed", "7", "--clothes", CLOTHES, *extra])
    return out


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("people"), "--layout", "folder")


def test_layout_matches_the_competition(people):
    train = pd.read_csv(people / "train" / "train.csv", dtype=str)
    assert list(train.columns) == ["id", "gender", "race", "age", "path"] and len(train) == 6
    for row in train.itertuples():
        assert row.path == f"{row.id}_{row.gender}_Asian_{row.age}" and 18 <= int(row.age) <= 60
        stems = sorted(p.stem for p in (people / "train" / "images" / row.path).iterdir())
        assert stems == sorted(make_photo_people.MASK_FILES)
    info, answers = (pd.read_csv(people / "eval" / name) for name in ("info.csv", "answers.csv"))
    assert list(info.columns) == ["ImageID", "ans"] and (info["ans"] == 0).all() and len(info) == 14
    assert list(info["ImageID"]) == list(answers["ImageID"])
    assert all((people / "eval" / "images" / name).is_file() for name in info["ImageID"])
    with Image.open(people / "eval" / "images" / info["ImageID"][0]) as image:
        assert image.size == (96, 128) and image.format == "JPEG"
    assert sum(1 for _ in (people / "folder").rglob("*.jpg")) == 42


def test_labels_follow_the_kit_formula(people):
    table, _, _ = read_mask_layout(people / "train")
    expected = make_label(table["mask"], table["gender"], np.digitize(table["age"], (30, 60)))
    np.testing.assert_array_equal(table["label"], expected)
    for path, label in zip(table["path"], table["label"]):  # the folder-layout copy sits under its class
        folder_copy = people / "folder" / make_photo_people.FOLDER_NAMES[label] / f"{Path(path).parent.name}_" \
                                                                                 f"{Path(path).stem}.jpg"
        assert folder_copy.is_file()
    answers = pd.read_csv(people / "eval" / "answers.csv")
    assert np.bincount(answers["ans"] // 6, minlength=3).tolist() == [10, 2, 2]  # 5 worn, 1 incorrect, 1 not


def test_same_seed_same_bytes(people, tmp_path):
    again = generate(tmp_path / "again", "--layout", "folder")
    files = sorted(p.relative_to(people) for p in people.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((people / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_pictures_of_one_person_are_more_alike_than_of_two(people):
    """Memorising people must be possible: same-person pictures are closer in small-thumbnail pixels."""
    folders = sorted((people / "train" / "images").iterdir())
    thumbs = [[np.asarray(Image.open(p).resize((12, 16)), np.float32) for p in sorted(f.iterdir())] for f in folders]
    within = np.mean([np.abs(a - b).mean() for person in thumbs for i, a in enumerate(person) for b in person[i + 1:]])
    between = np.mean([np.abs(a - b).mean() for i, first in enumerate(thumbs) for second in thumbs[i + 1:]
                       for a, b in zip(first, second)])
    assert within < 0.7 * between, (within, between)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(make_photo_people.UserError, match="--size"):
        make_photo_people.main(["--out", str(tmp_path), "--size", "8", "8"])
    with pytest.raises(make_photo_people.UserError, match="apt-get install dataset-fashion-mnist"):
        make_photo_people.main(["--out", str(tmp_path), "--fashion_mnist", str(tmp_path / "none")])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
