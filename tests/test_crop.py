"""kit/crop_faces.py: MTCNN puts the box on a real face (scikit-image's astronaut photo), falls back to the
portrait box where it finds none, and its boxes feed train.py and inference.py --crop on the sample."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
from kit import crop_faces  # noqa: E402
from dataset import build_table  # noqa: E402

ASTRONAUT_FACE = (181, 62, 268, 172)  # where MTCNN finds Eileen Collins's face (x0, y0, x1, y1)


def run_crop(monkeypatch, capsys, *argv):
    """kit/crop_faces.py's command line in this process; returns what it printed."""
    monkeypatch.setattr(sys, "argv", ["kit/crop_faces.py", *map(str, argv), "--num_workers", "0"])
    crop_faces.run_main(crop_faces.main)
    return capsys.readouterr().out


def area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


def iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / (area(a) + area(b) - inter)


def test_box_on_a_real_face_and_fallback_on_none(tmp_path, monkeypatch, capsys):
    from skimage.data import astronaut
    images = tmp_path / "eval" / "images"
    images.mkdir(parents=True)
    Image.fromarray(astronaut()).save(images / "astronaut.png")
    Image.new("RGB", (300, 400), (128, 128, 128)).save(images / "blank.png")  # another size: its own batch
    pd.DataFrame({"ImageID": ["astronaut.png", "blank.png"], "ans": 0}).to_csv(images.parent / "info.csv", index=False)
    out = run_crop(monkeypatch, capsys, "--data_dir", images.parent, "--out", tmp_path / "boxes.csv")
    assert "test folder" in out and "1 fallback boxes" in out
    boxes = pd.read_csv(tmp_path / "boxes.csv").set_index("path")
    assert list(boxes.index) == ["images/astronaut.png", "images/blank.png"]  # as inference.py looks them up
    face = boxes.loc["images/astronaut.png"]
    assert face["found"] == 1 and face["prob"] > 0.99
    assert iou(face[["x0", "y0", "x1", "y1"]].to_numpy(), ASTRONAUT_FACE) > 0.7
    blank = boxes.loc["images/blank.png"]
    assert blank["found"] == 0
    np.testing.assert_allclose(blank[["x0", "y0", "x1", "y1"]].to_numpy(float), [60, 40, 240, 280])


def test_sample_boxes_feed_train_and_inference(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = run_crop(monkeypatch, capsys, "--data_dir", "sample/train", "--out", tmp_path / "train_boxes.csv")
    boxes = pd.read_csv(tmp_path / "train_boxes.csv")
    table = build_table("sample/train")[0]
    assert "train folder" in out and sorted(boxes["path"]) == sorted(table["path"])
    fallbacks = int((boxes["found"] == 0).sum())
    assert f"{fallbacks} fallback boxes" in out  # the synthetic cartoon faces are not all found
    assert (boxes.loc[boxes["found"] == 1, "prob"] >= 0.9).all()
    assert (boxes[["x0", "y0"]] >= 0).all().all() and (boxes["x1"] <= 96).all() and (boxes["y1"] <= 128).all()
    assert ((boxes["x1"] > boxes["x0"]) & (boxes["y1"] > boxes["y0"])).all()
    run_crop(monkeypatch, capsys, "--data_dir", "sample/eval", "--out", tmp_path / "eval_boxes.csv")
    assert len(pd.read_csv(tmp_path / "eval_boxes.csv")) == len(pd.read_csv("sample/eval/info.csv"))
    commands = [["train.py", "--model", "test_resnet", "--no-pretrained", "--resize", "64", "48", "--epochs", "1",
                 "--folds", "2", "--fold", "0", "--batch_size", "32", "--num_workers", "0", "--crop",
                 tmp_path / "train_boxes.csv", "--model_dir", tmp_path, "--name", "crop"],
                ["inference.py", "--data_dir", "sample/eval", "--model_dir", tmp_path / "crop", "--crop",
                 tmp_path / "eval_boxes.csv", "--output_dir", tmp_path / "sub", "--num_workers", "0"]]
    for command in commands:
        done = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    submission = pd.read_csv(tmp_path / "sub" / "output.csv")
    assert len(submission) == len(pd.read_csv("sample/eval/info.csv")) and submission["ans"].between(0, 17).all()


def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "nowhere", "is not a folder"), (tmp_path / "empty", "no train.csv")]
    for data_dir, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_crop(monkeypatch, capsys, "--data_dir", data_dir, "--out", tmp_path / "boxes.csv")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "boxes.csv").exists()
