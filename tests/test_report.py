"""kit/report.py on a finished tiny run of the embedded sample (trained once per test session)."""
import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parents[1]
from kit.common import run_main  # noqa: E402
from dataset import GENDERS, MASK_NAMES, mask_class_names  # noqa: E402
from kit.images import CenterShare  # noqa: E402
from kit.labels import head_value_names  # noqa: E402
from kit.report import (REPORT_PNGS, main, per_class_table, save_confusion_png, save_image_grid, worst_predictions, write_report)  # noqa: E402
from kit.runs import collect_oof  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tiny_run_dir):
    """The session's tiny run of the sample (conftest.py), and its report."""
    return tiny_run_dir, write_report(tiny_run_dir)


def test_every_picture_and_the_page_are_written(tiny_run):
    run_dir, _ = tiny_run
    for name in REPORT_PNGS:
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and min(image.size) > 300, name
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert not list(run_dir.glob(".*.tmp*"))  # atomic writes leave nothing behind


def test_confusion_totals_equal_the_oof_images(tiny_run, tmp_path):
    run_dir, metrics = tiny_run
    config, oof = json.loads((run_dir / "config.json").read_text()), collect_oof(run_dir)
    counts = save_confusion_png(oof["label"], oof["pred"], config["classes"], tmp_path / "c.png", normalize=True)
    assert counts.sum() == len(oof) == metrics["oof_images"] == 420  # every sample image is validated once
    assert (counts.sum(1) == np.bincount(oof["label"], minlength=18)).all()
    assert (counts.sum(0) == np.bincount(oof["pred"], minlength=18)).all()


def test_per_class_scores_match_sklearn_and_the_page(tiny_run):
    run_dir, metrics = tiny_run
    classes, oof = json.loads((run_dir / "config.json").read_text())["classes"], collect_oof(run_dir)
    table = per_class_table(oof["label"], oof["pred"], classes)
    expected = f1_score(oof["label"], oof["pred"], average=None, labels=range(18), zero_division=0)
    np.testing.assert_allclose(table["f1"], expected)
    np.testing.assert_allclose(list(metrics["per_class_f1"].values()), expected)
    assert table["support"].sum() == len(oof)
    page = (run_dir / "report.html").read_text()
    assert all(f"<td>{name}</td>" in page.replace("&gt;", ">").replace("&lt;", "<") for name in classes)
    assert f"{metrics['oof_macro_f1']:.4f}" in page


def test_page_embeds_every_picture_and_links_nothing(tiny_run):
    run_dir, _ = tiny_run
    page = (run_dir / "report.html").read_text()
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert embedded == [(run_dir / name).read_bytes() for name in REPORT_PNGS]
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_worst_predictions_have_the_lowest_probability_of_the_true_class(tiny_run):
    run_dir, _ = tiny_run
    oof = collect_oof(run_dir)
    true_prob = oof.apply(lambda row: row[f"p{row['label']}"], axis=1).to_numpy()
    worst = worst_predictions(oof, mask_class_names(), 5)
    np.testing.assert_allclose(np.sort(worst["true_prob"]), np.sort(true_prob)[:5])
    np.testing.assert_allclose(worst["loss"], -np.log(worst["true_prob"]))


def test_grid_marks_the_centre_a_centre_crop_run_saw(tmp_path):
    """Grids (worst predictions, label issues) show the whole picture, with a centre-crop run's share dashed."""
    Image.new("RGB", (384, 512), (90, 90, 90)).save(tmp_path / "grey.jpg")

    def yellow_box(seen):
        save_image_grid([str(tmp_path / "grey.jpg")], ["x"], tmp_path / "grid.png", "t", seen=seen)
        pixels = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
        rows, cols = np.nonzero((pixels[..., 0] > 180) & (pixels[..., 1] > 180) & (pixels[..., 2] < 100))
        grey_rows, grey_cols = np.nonzero((np.abs(pixels - 90) < 8).all(-1))
        return rows, cols, grey_rows, grey_cols

    assert len(yellow_box(None)[0]) == 0
    rows, cols, grey_rows, grey_cols = yellow_box(CenterShare(0.5, 0.5))
    height, width = np.ptp(grey_rows), np.ptp(grey_cols)  # the thumbnail's extent on the page
    assert abs(np.ptp(rows) / height - 0.5) < 0.05 and abs(np.ptp(cols) / width - 0.5) < 0.05
    assert abs(rows.mean() - np.mean(grey_rows)) < 0.05 * height and abs(cols.mean() - np.mean(grey_cols)) < 0.05 * width


def test_learning_curves_read_every_fold_and_epoch(tiny_run):
    log = pd.read_csv(tiny_run[0] / "log.csv")
    assert sorted(zip(log["fold"], log["epoch"])) == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_head_names_come_from_the_class_names():
    assert head_value_names(mask_class_names()) == [list(MASK_NAMES), list(GENDERS), ["<30", "30-59", ">=60"]]
    assert head_value_names(mask_class_names((20, 40)))[2] == ["<20", "20-39", ">=40"]


def test_missing_run_folder_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kit/report.py", "--model_dir", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as stop:
        run_main(main)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.startswith("error:") and len(error.splitlines()) == 1
