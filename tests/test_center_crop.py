"""--center_crop: the centre share of every picture, the same in training (OOF), inference, the demo page and
Grad-CAM, whatever each picture's size and EXIF orientation."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dataset import CenterShare, image_boxes, load_image

ROOT = Path(__file__).resolve().parents[1]


def quadrant_picture(path, size=(300, 400), exif_turn=False):
    """A picture whose centre half (both ways) is red inside a blue frame; JPEG, optionally stored sideways
    with an EXIF tag that turns it upright."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[...] = (0, 0, 255)
    pixels[height // 4:height * 3 // 4, width // 4:width * 3 // 4] = (255, 0, 0)
    image = Image.fromarray(pixels)
    if exif_turn:  # stored rotated; orientation 6 = turn 90 degrees clockwise to show
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    else:
        image.save(path, quality=95)


def test_center_share_keeps_the_centre_of_any_size(tmp_path):
    assert np.allclose(CenterShare(0.625, 0.667).box(384, 512), (64, 96, 320, 416))  # 256 x 320
    for size, turn in [((300, 400), False), ((600, 450), False), ((300, 400), True)]:
        quadrant_picture(tmp_path / "p.jpg", size, turn)
        for draft in (None, (32, 48)):
            crop = np.asarray(load_image(tmp_path / "p.jpg", draft, CenterShare(0.5, 0.5)), np.int16)
            assert abs(crop.shape[1] / crop.shape[0] - size[0] / size[1]) < 0.05, (size, turn, crop.shape)
            inner = crop[2:-2, 2:-2].reshape(-1, 3).mean(0)  # all red: the blue frame was cut away
            assert inner[0] > 200 and inner[2] < 60, (size, turn, draft, inner)
            if draft is None:
                assert crop.shape[:2] == (size[1] // 2, size[0] // 2)


def test_center_crop_and_face_boxes_are_one_choice():
    assert image_boxes(["a.jpg", "b.jpg"]) is None
    assert image_boxes(["a.jpg"], center_crop=[0.5, 0.6]) == [CenterShare(0.5, 0.6)]
    try:
        image_boxes(["a.jpg"], crop="boxes.csv", center_crop=[0.5, 0.5])
    except Exception as err:  # UserError
        assert "--center_crop" in str(err) and "--crop" in str(err)
    else:
        raise AssertionError("both crops accepted")


def run(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def test_inference_crops_as_training_did(tmp_path):
    """Fold 0's validation pictures as a test set: inference gives the OOF probabilities only if it cuts the
    same centre as training did (with the crop taken out of config.json they change)."""
    done = run(["train.py", "--data_dir", "sample/train", "--model", "test_resnet", "--no-pretrained", "--head",
                "single", "--decision", "off", "--resize", "48", "36", "--epochs", "1", "--folds", "2", "--fold", "0",
                "--batch_size", "32", "--num_workers", "0", "--no-report", "--amp", "off", "--center_crop", "0.5", "0.6",
                "--model_dir", str(tmp_path), "--name", "run"])
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["center_crop"] == [0.5, 0.6]
    oof = pd.read_csv(run_dir / "fold0" / "oof.csv").head(24)
    (tmp_path / "eval" / "images").mkdir(parents=True)
    names = [f"{i:03d}.jpg" for i in range(len(oof))]
    for name, path in zip(names, oof["path"]):
        shutil.copy(ROOT / "sample" / "train" / path, tmp_path / "eval" / "images" / name)
    pd.DataFrame({"ImageID": names, "ans": 0}).to_csv(tmp_path / "eval" / "info.csv", index=False)
    columns = [f"p{i}" for i in range(18)]

    def predicted(output):
        done = run(["inference.py", "--model_dir", str(run_dir), "--data_dir", str(tmp_path / "eval"),
                    "--output_dir", str(tmp_path / output), "--amp", "off", "--num_workers", "0"])
        assert done.returncode == 0, done.stderr[-2000:]
        return pd.read_csv(tmp_path / output / "probs.csv")[columns].to_numpy()

    oof_probs = oof[columns].to_numpy()
    assert np.abs(predicted("cropped") - oof_probs).max() < 1e-4  # the CSVs' rounding
    (run_dir / "config.json").write_text(json.dumps({**config, "center_crop": None}))
    assert np.abs(predicted("whole") - oof_probs).max() > 1e-3
    (run_dir / "config.json").write_text(json.dumps(config))
    boxes = tmp_path / "boxes.csv"  # valid face boxes, yet not what the run was trained on
    pd.DataFrame({"path": [f"images/{n}" for n in names], "x0": 0, "y0": 0, "x1": 20, "y1": 20}).to_csv(boxes)
    refused = run(["inference.py", "--model_dir", str(run_dir), "--data_dir", str(tmp_path / "eval"),
                   "--crop", str(boxes), "--output_dir", str(tmp_path / "y")])
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "--center_crop" in lines[0]
    assert not (tmp_path / "y").exists()
