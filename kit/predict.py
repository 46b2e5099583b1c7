"""A run's fold models, loaded and checked, and their averaged probabilities over a loader or a list of files.

    models, config = load_run("model/exp")                    # every finished fold's best.pth
    probs = predict_files(models, config, files, device, tta=True)       # in file order
    probs, rows = predict_probs(models, loader, config["head"], device, tta=True)

Used by inference.py, the validation of train.py, pseudo-labels and the tools (demo page, export, Grad-CAM). The
models are rebuilt by model.py's create_model and read out by its to_probs, the pictures resized by dataset.py's
evaluation transform and cut as the run's config.json says: a run is predicted the way it was trained.
"""
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dataset import build_transform
from kit.checkpoints import check_same_run, load_torch_file
from kit.common import UserError, duration_text, one_line
from kit.device import amp_dtype, autocast, to_device
from kit.images import ImageDataset, center_share
from kit.runs import finished_folds, read_config
from kit.speed import AfterFrozenBlocks, frozen_blocks, shared_trunk
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
        model.load_state_dict(evaluated_weights(checkpoint))
    except RuntimeError as err:
        raise UserError(f"{path} does not match its own config ({one_line(err, 160)})") from None
    return model.to(device).eval(), config


def evaluated_weights(checkpoint):
    """The weights a checkpoint was validated with: an --ema run's last.pth keeps the raw weights for --resume
    and the EMA's beside them, which are what its epochs were scored (and its best.pth saved) with."""
    ema = checkpoint.get("ema")
    if not ema:
        return checkpoint["model"]
    return {name[len("module."):]: value for name, value in ema.items() if name.startswith("module.")}


def load_run(run_dir, folds=None, which="best", device="cpu"):
    """The models of a run folder's finished folds (of folds, if given) and its config; each checkpoint must
    match the config. An interrupted fold's checkpoints are not a fold model: its OOF never scored them."""
    config = read_config(run_dir)
    absent = [f for f in folds or [] if not (Path(run_dir) / f"fold{f}").is_dir()]
    if absent:
        raise UserError(f"{run_dir} has no fold*/{which}.pth for folds {absent}: train first or check --folds")
    models = []
    for fold in finished_folds(run_dir, folds):
        path = Path(run_dir) / f"fold{fold}" / f"{which}.pth"
        models.append(load_checkpoint(path, device, lambda saved: check_same_run(
            saved, config, path, "copy the right checkpoint or train again"))[0])
    return models, config


ESTIMATE_AFTER = 512  # pictures timed first when a test set is over four times as many: then its length is told


def predict_files(models, config, files, device, boxes=None, tta=False, amp="auto", batch_size=256, num_workers=0):
    """Averaged probabilities of models that read images alike (config.json's input size, interpolation, head,
    centre crop) over files, in their order, each image decoded once; boxes: the face boxes of a run trained on
    them. A large set is timed on its first pictures and its estimated length printed."""
    files, boxes, parts = list(files), boxes and list(boxes), []
    if len(files) > 4 * ESTIMATE_AFTER:
        started, head = time.perf_counter(), slice(0, ESTIMATE_AFTER)
        parts.append(predict_pass(models, config, files[head], device, boxes and boxes[head], tta, amp, batch_size,
                                  num_workers))
        rest = (time.perf_counter() - started) * (len(files) - ESTIMATE_AFTER) / ESTIMATE_AFTER
        print(f"inference: {len(files)} pictures x {len(models)} models{' x 2 views' if tta else ''}: about "
              f"{duration_text(rest)} more", flush=True)
        files, boxes = files[ESTIMATE_AFTER:], boxes and boxes[ESTIMATE_AFTER:]
    parts.append(predict_pass(models, config, files, device, boxes, tta, amp, batch_size, num_workers))
    return np.concatenate(parts)


def predict_pass(models, config, files, device, boxes, tta, amp, batch_size, num_workers):
    """predict_files' pass over files; a batch too large for the GPU is halved and the pass started again."""
    size = config["input_size"]
    transform = build_transform("base", size, config["interpolation"], train=False)
    center = center_share(config.get("center_crop"))
    dataset = ImageDataset(files, None, transform, boxes if center is None else [center] * len(files),
                           draft_size=(size[2], size[1]))
    while True:
        loader = DataLoader(dataset, batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available())
        try:
            probs, rows = predict_probs(models, loader, config["head"], device, amp, config["channels_last"], tta,
                                        config.get("freeze_blocks", 0))
            return probs[np.argsort(rows)]
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise UserError(f"out of GPU memory with one image per batch for {config['model']}: "
                                "predict fewer --folds at a time or on a larger GPU") from None
            batch_size //= 2
            torch.cuda.empty_cache()
            print(f"out of GPU memory: --batch_size {batch_size}")


@torch.no_grad()
def predict_probs(models, loader, head, device, amp="auto", channels_last=True, tta=False, trunk_blocks=0):
    """Mean class probabilities of one or several models over a loader (each batch decoded once, every model and
    the flipped view run on it); returns (probs, row indices) as numpy arrays. Models sharing their first
    trunk_blocks block groups (a --freeze_blocks run's folds) run that trunk once per batch and view."""
    models = models if isinstance(models, (list, tuple)) else [models]
    for model in models:
        model.eval()
    blocks = shared_trunk(models, trunk_blocks)
    rests = [AfterFrozenBlocks(m, blocks) for m in models] if blocks else models
    dtype, probs, rows = amp_dtype(device, amp), [], []
    for images, _, index, *_ in loader:
        images = to_device(images, device, channels_last)
        views = [images, images.flip(3)] if tta else [images]
        with autocast(device, dtype):
            inputs = [frozen_blocks(models[0], v, blocks) for v in views] if blocks else views
            batch = sum(to_probs(rest(v), head) for rest in rests for v in inputs) / (len(models) * len(views))
        probs.append(batch.float())  # kept on the device: no wait for the host after every batch
        rows.append(index)
    return torch.cat(probs).cpu().numpy(), torch.cat(rows).numpy()
