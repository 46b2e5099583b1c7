"""kit/compare.py on three tiny runs of the sample (the session's tiny run + two 1-epoch variants), a broken, a
foreign and an unfinished folder, and a submission whose output_manifest.json inference.py wrote."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
from kit.compare import write_leaderboard  # noqa: E402
from test_app import headless_chromium  # noqa: E402

TINY = ["--data_dir", "sample/train", "--model", "test_resnet", "--no-pretrained", "--resize", "64", "48",
        "--folds", "2", "--batch_size", "32", "--num_workers", "0", "--head", "single", "--decision", "off"]  # as base


def run(*args):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def model_dir(tiny_run_dir, tmp_path_factory):
    """base (the session's 2-epoch run), lr and plain (1 epoch, no report; --lr 5e-3 / --augmentation base),
    broken (corrupt config.json), notes (no config.json), unfinished (no metrics.json)."""
    folder = tmp_path_factory.mktemp("compare") / "model"
    shutil.copytree(tiny_run_dir, folder / "base")
    for name, change in (("lr", ["--lr", "5e-3"]), ("plain", ["--augmentation", "base"])):
        run("train.py", *TINY, "--epochs", "1", "--no-report", *change, "--model_dir", str(folder), "--name", name)
    (folder / "lr" / "decision.json").write_text(json.dumps({"cross_fitted_macro_f1": 0.5, "applied": True}))
    (folder / "broken").mkdir()
    (folder / "broken" / "config.json").write_text("{not json")
    (folder / "notes").mkdir()
    (folder / "unfinished").mkdir()
    shutil.copy(folder / "base" / "config.json", folder / "unfinished")
    return folder


def test_leaderboard_rows_scores_and_differing_settings(model_dir, tmp_path):
    output = tmp_path / "output"
    run("inference.py", "--model_dir", str(model_dir / "base"), "--output_dir", str(output), "--num_workers", "0",
        "--tta")
    manifest = json.loads((output / "output_manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256((output / "output.csv").read_bytes()).hexdigest()
    assert manifest["run_dirs"] == [str((model_dir / "base").resolve())] and manifest["tta"] is True
    runs, submissions, skipped = write_leaderboard(model_dir, [str(output)])
    assert sorted(runs["run"]) == ["base", "lr", "plain"]
    for row in runs.itertuples():
        metrics = json.loads((model_dir / row.run / "metrics.json").read_text())
        assert row.oof_macro_f1 == metrics["oof_macro_f1"]
        assert (row.fold_min, row.fold_max) == (min(f["macro_f1"] for f in metrics["folds"].values()),
                                                      max(f["macro_f1"] for f in metrics["folds"].values()))
        assert row.f1_gender == metrics["heads"]["gender"]["macro_f1"] and row.img_s > 0
    assert runs["oof_macro_f1"].is_monotonic_decreasing
    settings = runs.columns[runs.columns.get_loc("fold_max") + 1:runs.columns.get_loc("folds_done")].tolist()
    assert sorted(settings) == ["augmentation", "epochs", "lr", "report"]
    by_run = runs.set_index("run")
    assert by_run.loc["lr", "decision_f1"] == 0.5 and by_run.loc["lr", "applied"] == True  # noqa: E712
    assert pd.isna(by_run.loc["base", "decision_f1"]) and by_run.loc["lr", "lr"] == 5e-3
    assert by_run.loc["plain", "augmentation"] == "base"
    reasons = dict(skipped)
    assert set(reasons) == {"broken", "notes", "unfinished"}
    assert "not readable JSON" in reasons["broken"] and "not found" in reasons["notes"]
    assert "unfinished" in reasons["unfinished"]
    assert submissions[["runs", "output_unchanged", "tta"]].values.tolist() == [["base", "yes", True]]
    assert pd.read_csv(model_dir / "runs.csv")["run"].tolist() == runs["run"].tolist()
    check_page(model_dir, runs, tmp_path)


def check_page(model_dir, runs, tmp_path):
    """runs.html in headless Chromium: clicks on oof_macro_f1 sort best first, then worst first; nothing is
    fetched online."""
    from selenium.webdriver.common.by import By
    page = (model_dir / "runs.html").read_text()
    assert "http://" not in page and "https://" not in page and 'src="data:image/png;base64,' in page
    browser = headless_chromium(tmp_path, window="1366,768")
    try:
        browser.get((model_dir / "runs.html").as_uri())
        table = browser.find_elements(By.CSS_SELECTOR, "table.sortable")[0]
        heading = [th for th in table.find_elements(By.TAG_NAME, "th") if th.text == "oof macro f1"][0]
        for order in (runs["run"].tolist(), runs["run"].tolist()[::-1]):
            heading.click()
            assert [row.text.split()[0] for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")] == order
        browser.save_screenshot(str(tmp_path / "runs.png"))
    finally:
        browser.quit()
