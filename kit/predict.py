"""A run's fold models, loaded and checked, and their averaged probabilities over a loader.

    models, config = load_run("model/exp")                    # every finished fold's best.pth
    probs, rows = predict_probs(models, loader, config["head"], device, tta=True)

Used by inference.py, the validation of train.py and the tools (demo page, export, Grad-CAM). The models are
rebuilt by model.py's create_model and read out by its to_probs: a run is predicted with the recipe that made it.
"""
from pathlib import Path

import torch

from kit.checkpoints import check_same_run, load_torch_file
from kit.common import UserError
from kit.device import amp_dtype, autocast, to_device
from kit.runs import read_config
from model import create_model, to_probs


def load_checkpoint(path, device="cpu", check=None):
    """A model saved by train.py and its config (model name, head, classes, input size); check(config), if
    given, runs before the model is built (e.g. that the checkpoint belongs to the run it was found in)."""
    checkpoint = load_torch_file(path, "checkpoint", "train first, or check --model_dir")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise UserError(f"{path} was not saved by train.py (no config); use it with --weights instead")
    config = checkpoint["config"]
    if check is not None:
        check(config)
    model = create_model(config["model"], len(config["classes"]), config["head"], pretrained=False)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise UserError(f"{path} does not match its own config ({' '.join(str(err).split())[:160]})") from None
    return model.to(device).eval(), config


def load_run(run_dir, folds=None, which="best", device="cpu"):
    """The fold models of a run folder and its config; each checkpoint must match the config."""
    config = read_config(run_dir)
    paths = sorted(Path(run_dir).glob(f"fold*/{which}.pth"), key=lambda p: int(p.parent.name[4:]))
    paths = [p for p in paths if folds is None or int(p.parent.name[4:]) in folds]
    if not paths:
        raise UserError(f"{run_dir} has no fold*/{which}.pth" + (f" for folds {folds}" if folds else "")
                        + ": train first or check --folds")
    models = []
    for path in paths:
        models.append(load_checkpoint(path, device, lambda saved: check_same_run(
            saved, config, path, "copy the right checkpoint or train again"))[0])
    return models, config


@torch.no_grad()
def predict_probs(models, loader, head, device, amp="auto", channels_last=True, tta=False):
    """Mean class probabilities of one or several models over a loader (each batch decoded once,
    every model and the flipped view run on it); returns (probs, row indices) as numpy arrays."""
    models = models if isinstance(models, (list, tuple)) else [models]
    for model in models:
        model.eval()
    dtype, probs, rows = amp_dtype(device, amp), [], []
    for images, _, index, *_ in loader:
        images = to_device(images, device, channels_last)
        views = [images, images.flip(3)] if tta else [images]
        with autocast(device, dtype):
            batch = sum(to_probs(m(v), head) for m in models for v in views) / (len(models) * len(views))
        probs.append(batch.float())  # kept on the device: no wait for the host after every batch
        rows.append(index)
    return torch.cat(probs).cpu().numpy(), torch.cat(rows).numpy()
