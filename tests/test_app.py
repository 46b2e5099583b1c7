"""kit/app.py: a real headless Chromium uploads a sample photo to the demo page served on localhost and reads
the model's top class off the page; the Flask test client checks the attributes and a bad upload."""
import contextlib
import html
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
from kit import app  # noqa: E402
from dataset import build_transform  # noqa: E402
from kit.images import center_share, load_image  # noqa: E402
from kit.predict import load_run  # noqa: E402
from model import to_probs  # noqa: E402

SAMPLE_IMAGES = sorted((ROOT / "sample" / "eval" / "images").glob("[!.]*.jpg"))
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def direct_probs(run_dir, files, crop=True):
    """The fold ensemble's probabilities computed here with the models, not through the page, on the centre
    the run was trained on (the mask layout's default) or, crop=False, on the whole pictures."""
    models, config = load_run(run_dir)
    transform = build_transform("base", config["input_size"], config["interpolation"], train=False)
    box = center_share(config["center_crop"]) if crop else None
    batch = torch.stack([transform(load_image(f, box=box)) for f in files])
    with torch.no_grad():
        return torch.stack([to_probs(m(batch), config["head"]) for m in models]).mean(0).numpy(), config


def top_percents(probs, top=5):
    """The page's top rows as it prints them."""
    return [f"{p * 100:.1f}" for p in np.sort(probs)[::-1][:top]]


def browser_or_skip():
    """(chromium, chromedriver, selenium's webdriver) or a skip; KIT_REQUIRE_BROWSER=1 (CI) fails instead."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    if chromium and driver and webdriver:
        return chromium, driver, webdriver
    reason = "needs Debian's chromium and chromium-driver and pip's selenium (apt-get install chromium chromium-driver)"
    if os.environ.get("KIT_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(app_args):
    """python -m kit.app APP_ARGS on a free localhost port, in its own process: yields its URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "kit.app", *app_args, "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"kit/app.py did not come up: {process.stdout.read()[-2000:]}")
            time.sleep(0.5)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def headless_chromium(tmp_path, window="900,1000"):
    """selenium's Chrome driving Debian's headless chromium (or a skip where it is missing)."""
    chromium, chromedriver, webdriver = browser_or_skip()
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS + [f"--window-size={window}", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(chromedriver))


@pytest.fixture(scope="module")
def server(tiny_run_dir):
    """kit/app.py serving the tiny run."""
    with serving(["--model_dir", str(tiny_run_dir)]) as url:
        yield url


def test_browser_upload_shows_the_models_top_class(server, tiny_run_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    probs, config = direct_probs(tiny_run_dir, SAMPLE_IMAGES)
    top_two = np.sort(probs, 1)[:, -2:]
    photo = SAMPLE_IMAGES[int(np.argmax(top_two[:, 1] - top_two[:, 0]))]  # the clearest answer: no near-tie
    expected = config["classes"][int(probs[SAMPLE_IMAGES.index(photo)].argmax())]
    browser = headless_chromium(tmp_path)
    try:
        browser.get(server)
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(photo))
        browser.find_element(By.ID, "predict").click()
        answer = WebDriverWait(browser, 60).until(expected_conditions.presence_of_element_located((By.ID, "answer")))
        assert answer.text.startswith(f"Prediction: {expected} (")
        rows = browser.find_elements(By.CSS_SELECTOR, "#top tr")
        assert len(rows) == 1 + 5 and rows[1].text.startswith(expected)
        assert [t.text.split("\n")[0] for t in browser.find_elements(By.CSS_SELECTOR, "table.attribute")] == [
            "mask", "gender", "age"]
        assert browser.save_screenshot(str(tmp_path / "app.png"))
    finally:
        browser.quit()
    with Image.open(tmp_path / "app.png") as shot:
        assert shot.size[0] >= 800 and np.asarray(shot.convert("L")).std() > 10


def test_attributes_and_bad_upload(tiny_run_dir):
    models, config = load_run(tiny_run_dir)
    client = app.create_app(models, config).test_client()
    probs, _ = direct_probs(tiny_run_dir, SAMPLE_IMAGES[:1])
    heads = dict(app.attributes(probs[0], config["classes"]))
    grid = probs[0].reshape(3, 2, 3)  # mask x gender x age group
    assert [name for name, _ in heads["gender"]] == ["male", "female"]
    np.testing.assert_allclose([p for _, p in heads["gender"]], grid.sum((0, 2)), rtol=1e-6)
    np.testing.assert_allclose([p for _, p in heads["age"]], grid.sum((0, 1)), rtol=1e-6)
    assert [name for name, _ in heads["mask"]] == ["wear", "incorrect", "not_worn"]
    page = client.post("/", data={"photo": (io.BytesIO(SAMPLE_IMAGES[0].read_bytes()), "a.jpg")})
    top_class = html.escape(config["classes"][int(probs[0].argmax())])  # names like wear/male/<30
    assert page.status_code == 200 and f'id="answer">Prediction: {top_class} (' in page.get_data(as_text=True)
    shown = re.findall(r"<td>([0-9.]+)%</td>\s*<td class=\"meter\">", page.get_data(as_text=True))
    assert config["center_crop"] and shown == top_percents(probs[0])  # the page cuts the run's centre, as inference
    assert shown != top_percents(direct_probs(tiny_run_dir, SAMPLE_IMAGES[:1], crop=False)[0][0])  # which matters
    bad = client.post("/", data={"photo": (io.BytesIO(b"not an image"), "notes.txt")})
    assert bad.status_code == 400 and "not an image" in bad.get_data(as_text=True)
