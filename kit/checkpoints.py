"""Checkpoint files: torch.load with one-line errors, atomic saves, and the check that a file is this run's.

    state = load_torch_file(path, "checkpoint", "train first, or check --model_dir")
    save_checkpoint(path, model, config, {})       # weights + config in one atomic write
    check_same_run(saved_config, config, path, fix)  # same model, head and classes, or one error line

Only torch: model.py reads --weights files through it without the run-folder machinery.
"""
from pathlib import Path

import torch

from kit.common import UserError, atomic_write

IDENTITY = ("model", "head", "classes")  # what a checkpoint must share with its run's config.json


def load_torch_file(path, what, fix, weights_only=True):
    """torch.load onto the CPU with one-line errors that name the file and the fix."""
    if not Path(path).is_file():
        raise UserError(f"{what} {path} not found: {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise UserError(f"{path} is not a {what} ({type(err).__name__}): {fix}") from None


def save_checkpoint(path, model, config, extra):
    """Weights + config (+ resume state) in one atomic write."""
    atomic_write(path, lambda tmp: torch.save({"model": model.state_dict(), "config": config, **extra}, tmp))


def check_same_run(saved, config, path, fix):
    """A checkpoint's config must name the run's model, head and classes: else it comes from another run."""
    for key in IDENTITY:
        if saved.get(key) != config[key]:
            raise UserError(f"{path} has {key}={saved.get(key)!r} but the run's config.json says {config[key]!r}: "
                            f"it comes from another run; {fix}")


def load_last(path, config):
    """A fold's last.pth (weights and resume state) checked against the run's config."""
    state = load_torch_file(path, "checkpoint", "delete it to retrain the fold", weights_only=False)
    if not isinstance(state, dict) or "optimizer" not in state:
        raise UserError(f"{path} holds no resume state: delete it to retrain the fold")
    check_same_run(state.get("config", {}), config, path, "delete it to retrain the fold")
    return state
