"""kit/review.py (kit/app.py --review): a real headless Chromium relabels a planted mislabelled image and drops
another with the keyboard, sees its decision again after a reload, and train.py retrains with the written
lists; the Flask test client checks bad input, path traversal and two tabs saving at once."""
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
from kit import app, review  # noqa: E402
from kit.common import run_main  # noqa: E402
from dataset import build_table  # noqa: E402
from kit.runs import KIT_VERSION  # noqa: E402
from test_app import headless_chromium, serving  # noqa: E402

SAMPLE = ROOT / "sample" / "train"
DISAGREED = 8  # images the model gives another class at 0.9: suspects after the planted one


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A copy of the sample whose first person's normal.jpg is a copy of their incorrect_mask.jpg (labelled
    not_worn, shows an incorrect mask), and a run folder whose oof.csv knows the truth: 0.99 for the planted
    image's true class, 0.6-0.98 for everyone else's, plus DISAGREED images the model puts elsewhere.
    Returns (run folder, data folder, planted path, its true class name)."""
    root = tmp_path_factory.mktemp("review")
    data = root / "train"
    shutil.copytree(SAMPLE, data)
    table, classes, _, _ = build_table(data, folds=2)
    person = table["path"].iloc[0].rsplit("/", 1)[0]
    shutil.copy(data / person / "incorrect_mask.jpg", data / person / "normal.jpg")
    planted_path = f"{person}/normal.jpg"
    true = table["label"].to_numpy().copy()
    true[table["path"] == planted_path] = table.loc[table["path"] == f"{person}/incorrect_mask.jpg", "label"].iloc[0]
    rng = np.random.default_rng(0)
    true_prob = np.where(table["path"] == planted_path, 0.99, rng.uniform(0.6, 0.98, len(table)))
    disagree = rng.choice(np.flatnonzero(table["path"] != planted_path), DISAGREED, replace=False)
    true[disagree] = (true[disagree] + 5) % 18
    true_prob[disagree] = 0.9
    probs = np.where(np.eye(18, dtype=bool)[true], true_prob[:, None], (1 - true_prob[:, None]) / 17)
    oof = table[["path", "profile", "fold", "label"]].assign(pred=probs.argmax(1))
    run_dir = root / "run"
    run_dir.mkdir()
    pd.concat([oof, pd.DataFrame(probs, columns=[f"p{i}" for i in range(18)])], axis=1).to_csv(
        run_dir / "oof.csv", index=False)
    config = {"classes": classes, "layout": "mask", "data_dir": str(data), "kit_version": KIT_VERSION}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir, data, planted_path, classes[true[table["path"] == planted_path][0]]


def test_browser_relabel_reload_and_retrain(planted, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    run_dir, data, planted_path, true_name = planted
    browser = headless_chromium(tmp_path, window="1366,768")  # a laptop screen
    shots = Path(tmp_path)
    try:
        with serving(["--model_dir", str(run_dir), "--review"]) as url:
            browser.get(url + "1")
            assert browser.find_element(By.ID, "path").text == planted_path  # the planted image ranks first
            top = browser.find_elements(By.CSS_SELECTOR, "#top tr")[1].text
            assert top.startswith(f"1 {true_name} 99.0%")
            assert len(browser.find_elements(By.CSS_SELECTOR, ".person img")) == 7
            assert browser.find_element(By.ID, "decision").text == "not decided yet"
            browser.save_screenshot(str(shots / "review_suspect.png"))
            browser.find_element(By.TAG_NAME, "body").send_keys("1")  # relabel to the top class
            assert browser.current_url.endswith("/2")
            dropped = browser.find_element(By.ID, "path").text
            browser.find_element(By.TAG_NAME, "body").send_keys("d")
            assert browser.current_url.endswith("/3")
            browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
            assert browser.current_url.endswith("/2")
            browser.get(url + "1")  # reopened: the decision is shown again
            assert browser.find_element(By.ID, "decision").text == f"decided: relabel to {true_name}"
            browser.save_screenshot(str(shots / "review_decided.png"))
            browser.get(url)
            assert "2 decided" in browser.find_element(By.TAG_NAME, "body").text
            browser.save_screenshot(str(shots / "review_index.png"))
    finally:
        browser.quit()
    relabel = pd.read_csv(run_dir / review.RELABEL_LIST)
    assert relabel.values.tolist() == [[planted_path, "label", true_name]]
    assert pd.read_csv(run_dir / review.DROP_LIST)["path"].tolist() == [dropped]
    retrain(run_dir, data, tmp_path, planted_path, true_name, dropped)


def retrain(run_dir, data, tmp_path, planted_path, true_name, dropped):
    """train.py with the page's lists: the planted image is learned with its true label, the dropped one is left out
    of training; both are still scored on their given labels."""
    done = subprocess.run([sys.executable, "train.py", "--data_dir", str(data), "--model", "test_resnet",
                           "--no-pretrained", "--resize", "64", "48", "--epochs", "1", "--folds", "2",
                           "--num_workers", "0", "--no-report", "--people", "off", "--model_dir", str(tmp_path), "--name", "fixed",
                           "--relabel_list", str(run_dir / review.RELABEL_LIST),
                           "--drop_list", str(run_dir / review.DROP_LIST)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    folds = pd.read_csv(tmp_path / "fixed" / "folds.csv")
    classes = json.loads((tmp_path / "fixed" / "config.json").read_text())["classes"]
    assert classes[folds.loc[folds["path"] == planted_path, "train_label"].item()] == true_name
    learned = folds[folds["train_label"] >= 0]
    assert dropped not in set(learned["path"]) and len(learned) == 420 - 1 and len(folds) == 420


def test_bad_input_changes_nothing(planted, tmp_path):
    run_dir, _, planted_path, _ = planted
    client = review.create_review_app(run_dir).test_client()
    assert client.post("/decide", data={"path": planted_path, "decision": "keep"}).status_code == 303
    before = {name: (run_dir / name).read_bytes() for name in (review.DECISIONS, review.DROP_LIST, review.RELABEL_LIST)}
    bad = client.post("/decide", data={"path": planted_path, "decision": "relabel", "value": "hat/male/<30"})
    assert bad.status_code == 400 and "is not a class of this run" in bad.get_data(as_text=True)
    assert client.post("/decide", data={"path": "../config.json", "decision": "drop"}).status_code == 400
    assert before == {name: (run_dir / name).read_bytes() for name in before}
    assert client.get(f"/image/{planted_path}").status_code == 200
    for name in ("../run/config.json", "..%2Frun%2Fconfig.json", "/etc/passwd", "train.csv"):
        assert client.get(f"/image/{name}", follow_redirects=True).status_code == 404, name


def test_run_without_oof_and_foreign_issues_file(planted, tmp_path, monkeypatch, capsys):
    def one_line_error(*app_args):
        monkeypatch.setattr(sys, "argv", ["kit/app.py", "--review", *app_args])
        with pytest.raises(SystemExit) as stop:
            run_main(app.main)
        error = capsys.readouterr().err
        assert stop.value.code == 2 and len(error.splitlines()) == 1, error
        return error
    run_dir = planted[0]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.json", unfinished)
    assert "oof.csv not found" in one_line_error("--model_dir", str(unfinished))
    other = tmp_path / "label_issues.csv"
    pd.DataFrame({"path": ["someone/mask1.jpg"], "given_label": [0], "suggested_label": [1]}).to_csv(other, index=False)
    assert "comes from another run" in one_line_error("--model_dir", str(run_dir), "--issues", str(other))


def test_two_tabs_saving_at_once_keep_every_decision(planted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(planted[0], run_dir, ignore=shutil.ignore_patterns("review_*"))
    tabs = [review.create_review_app(run_dir).test_client() for _ in range(2)]  # two servers on one folder, too
    paths = review.load_suspects(run_dir)[2]["path"].tolist()
    statuses = []

    def decide(client, path):
        statuses.append(client.post("/decide", data={"path": path, "decision": "drop"}).status_code)
    threads = [threading.Thread(target=decide, args=(tabs[i % 2], p)) for i, p in enumerate(paths)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [303] * len(paths) == [303] * (1 + DISAGREED)
    assert sorted(pd.read_csv(run_dir / review.DROP_LIST)["path"]) == sorted(paths)
