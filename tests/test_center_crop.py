"""--center_crop: the centre share of every picture, whatever its size and EXIF orientation, cut alike in
training (OOF) and inference."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import inference
import train
from kit.common import UserError
from kit.images import CenterShare, center_share, image_boxes, load_image

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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
    assert image_boxes(["a.jpg"], center_crop=[1, 1]) is None and center_share([1.0, 1.0]) is None  # whole images
    with pytest.raises(UserError, match="--crop .* and --center_crop both crop the images: choose one"):
        image_boxes(["a.jpg"], crop="boxes.csv", center_crop=[0.5, 0.5])


@pytest.mark.parametrize("path", [[], ["--freeze_backbone"]], ids=["images", "stored_features"])
def test_inference_crops_as_training_did(tmp_path, path):
    """Fold 0's validation pictures as a test set: inference gives the OOF probabilities only if it cuts the
    same centre as training did (with the crop taken out of config.json they change); also on the frozen
    backbone's feature path."""
    train.main(["--data_dir", str(ROOT / "sample" / "train"), "--model", "test_resnet", "--no-pretrained", "--head",
                "single", "--decision", "off", "--resize", "48", "36", "--epochs", "1", "--folds", "2", "--fold", "0",
                "--batch_size", "32", "--num_workers", "0", "--no-report", "--people", "off", "--amp", "off", "--center_crop", "0.5",
                "0.6", "--model_dir", str(tmp_path), "--name", "run", *path])
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

    def predicted(output, *extra):
        inference.main(["--model_dir", str(run_dir), "--data_dir", str(tmp_path / "eval"), "--output_dir",
                        str(tmp_path / output), "--amp", "off", "--num_workers", "0", *extra])
        return pd.read_csv(tmp_path / output / "probs.csv")[columns].to_numpy()

    oof_probs = oof[columns].to_numpy()
    assert np.abs(predicted("cropped") - oof_probs).max() < 1e-4  # the CSVs' rounding
    (run_dir / "config.json").write_text(json.dumps({**config, "center_crop": None}))
    assert np.abs(predicted("whole") - oof_probs).max() > 1e-3
    (run_dir / "config.json").write_text(json.dumps(config))
    boxes = tmp_path / "boxes.csv"  # valid face boxes, yet not what the run was trained on
    pd.DataFrame({"path": [f"images/{n}" for n in names], "x0": 0, "y0": 0, "x1": 20, "y1": 20}).to_csv(boxes)
    with pytest.raises(UserError, match="trained with --center_crop") as refused:
        predicted("refused", "--crop", str(boxes))
    assert "\n" not in str(refused.value) and not (tmp_path / "refused").exists()
