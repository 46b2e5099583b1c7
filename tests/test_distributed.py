"""Distributed training on CPU: torchrun with 2 gloo processes makes the run folder a single process makes
(same files, same OOF rows) and learns; an unreadable image is dropped on every rank; --fold_per_device
starts one process per (mocked) GPU, on the GPU ids this process was given.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parents[1]
from kit import distributed  # noqa: E402
import train  # noqa: E402
from kit.common import UserError  # noqa: E402

SAMPLE = ROOT / "sample" / "train"
COMMON = ["--people", "off", "--model", "test_resnet", "--no-pretrained", "--resize", "64", "48", "--epochs", "6", "--folds", "2",
          "--lr", "1e-2", "--num_workers", "0", "--skip_bad_images"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: 2 processes on a shared CPU
BROKEN = "images/000002_male_Asian_30/mask3.jpg"


def run(command):
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The sample with one truncated JPEG, trained by one process (batch 32) and by torchrun's two
    (batch 16 each: the same 32 images a step)."""
    out = tmp_path_factory.mktemp("ddp")
    data = out / "data"
    shutil.copytree(SAMPLE, data)
    (data / BROKEN).write_bytes((data / BROKEN).read_bytes()[:300])
    run(["train.py", "--data_dir", data, *COMMON, "--batch_size", "32", "--model_dir", out, "--name", "single"])
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", "--data_dir", data,
         *COMMON, "--batch_size", "16", "--model_dir", out, "--name", "ddp"])
    return out / "single", out / "ddp"


def files_of(run_dir):
    """Relative paths of a run folder (TensorBoard event names carry the host and pid: their folder)."""
    return sorted(str(p.parent.relative_to(run_dir)) + "/events" if p.name.startswith("events.") else
                  str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def test_torchrun_writes_the_same_files_as_one_process(runs):
    single, ddp = runs
    assert files_of(ddp) == files_of(single)
    assert "fold1/best.pth" in files_of(ddp) and "bad_images.csv" in files_of(ddp)
    configs = [json.loads((d / "config.json").read_text()) for d in runs]
    differ = {k for k in configs[0] if configs[0][k] != configs[1].get(k)}
    assert differ <= {"name", "run_dir", "batch_size"}, differ
    log = pd.read_csv(ddp / "log.csv")
    assert list(log.columns) == list(pd.read_csv(single / "log.csv").columns) and len(log) == 2 * 6


def test_torchrun_oof_has_every_image_once_in_the_same_rows(runs):
    single, ddp = [pd.read_csv(d / "oof.csv", dtype={"profile": str}) for d in runs]
    assert list(ddp.columns) == list(single.columns)
    assert ddp[["path", "profile", "fold", "label"]].equals(single[["path", "profile", "fold", "label"]])
    assert len(ddp) == 419 and BROKEN not in set(ddp["path"])  # the broken image left out on both ranks
    probs = ddp[[f"p{i}" for i in range(18)]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert (probs.argmax(1) == ddp["pred"]).all()
    bad = pd.read_csv(runs[1] / "bad_images.csv")
    assert bad["path"].str.endswith(BROKEN).tolist() == [True]


def test_torchrun_learns(runs):
    oof = pd.read_csv(runs[1] / "oof.csv")
    chance = f1_score(oof["label"], np.random.default_rng(0).integers(0, 18, len(oof)), average="macro")
    metrics = json.loads((runs[1] / "metrics.json").read_text())
    assert metrics["oof_macro_f1"] > 1.5 * chance, (metrics["oof_macro_f1"], chance)
    assert metrics["oof_accuracy"] > oof["label"].value_counts(normalize=True).max()  # beats the majority class
    assert metrics["folds_done"] == [0, 1]


def test_fold_per_device_starts_a_process_per_gpu_on_the_given_ids(tmp_path, monkeypatch):
    """Two (mocked) GPUs that this process sees as CUDA_VISIBLE_DEVICES=3,5: one fold process on each, the
    run folder complete; the fold processes themselves run on the CPU here."""
    started, popen = [], subprocess.Popen

    def record(command, env):
        started.append((command[-1], env["CUDA_VISIBLE_DEVICES"]))
        return popen(command, env=env)

    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed.subprocess, "Popen", record)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", ["train.py", "--data_dir", str(SAMPLE), *COMMON, "--epochs", "2",
                                      "--batch_size", "32", "--fold_per_device", "--model_dir", str(tmp_path),
                                      "--name", "waves"])
    train.main()
    assert started == [("0", "3"), ("1", "5")]
    run_dir = tmp_path / "waves"
    log = pd.read_csv(run_dir / "log.csv")
    assert log[["fold", "epoch"]].values.tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert json.loads((run_dir / "metrics.json").read_text())["folds_done"] == [0, 1]
    assert len(pd.read_csv(run_dir / "oof.csv")) == 420


def test_fold_per_device_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="not torchrun"):
        train.parse_args(["--fold_per_device", "--model", "test_resnet"])
