"""Export a trained fold, or the fold ensemble, to ONNX and TorchScript for use outside the kit.

    python -m kit.export --model_dir model/exp --ensemble --format onnx torchscript --out export
    python -m kit.export --model_dir model/exp --fold 0 --format onnx --out export_fold0

The exported graph takes N x 3 x H x W RGB images as float32 in 0..255 (uint8 pixels cast to float) at the
run's input size, any batch size, and returns N x C class probabilities: the normalization, the backbone(s),
the softmax (multi head: the product of the mask, gender and age softmaxes) and the fold average are all
inside it. DIR/preprocess.json tells how to prepare an image; with onnxruntime and Pillow alone:

    image = PIL.ImageOps.exif_transpose(PIL.Image.open(f)).convert("RGB").resize((W, H), PIL.Image.BILINEAR)
    x = np.asarray(image, np.float32).transpose(2, 0, 1)[None]
    probs = onnxruntime.InferenceSession("export/model.onnx").run(None, {"images": x})[0]

ONNX goes through torch.onnx's torch.export-based exporter (needs onnxscript), TorchScript through
torch.jit.trace (deprecated by PyTorch but still the format many servers load). Each file is checked
against PyTorch on a batch of a size other than the traced one before it is kept.
"""
import argparse
import json
import warnings
from pathlib import Path

from kit.common import KitParser, UserError, atomic_write, in_range, lookup, run_main


def parse_args(argv=None):
    p = KitParser(prog="python -m kit.export", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default="model/exp", help="run folder made by train.py")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--fold", type=in_range(int, 0), default=None, help="export this fold's model")
    which.add_argument("--ensemble", action="store_true", help="export the average of all folds (the default)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint per fold")
    p.add_argument("--format", nargs="+", default=["onnx", "torchscript"], help="any of: onnx, torchscript")
    p.add_argument("--out", default="export", help="folder for the model files and preprocess.json")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import numpy as np
import torch
from torch import nn

from dataset import build_transform
from kit.decision import run_rule
from kit.images import center_share
from kit.predict import load_run
from model import to_probs

TOLERANCE = 1e-4  # largest probability difference accepted between PyTorch and an exported file


class ProbabilityModel(nn.Module):
    """The mean class probabilities of one or several fold models (0..255 RGB in, N x C out)."""

    def __init__(self, models, head):
        super().__init__()
        self.models, self.head = nn.ModuleList(models), head

    def forward(self, images):
        return torch.stack([to_probs(model(images), self.head) for model in self.models]).mean(0)


def max_difference(expected, got):
    return float(np.abs(np.asarray(expected) - np.asarray(got)).max())


def check_export(name, expected, got):
    """Refuse an exported file whose probabilities differ from PyTorch's (the file is then not kept)."""
    difference = max_difference(expected, got)
    if not difference <= TOLERANCE:
        raise UserError(f"the {name} export differs from PyTorch by {difference:.2g} (> {TOLERANCE}); nothing "
                        "kept: export another fold or report the model name")
    return difference


def export_onnx(module, example, check, path):
    """ONNX with a dynamic batch axis, weights inside the one file; checked with onnxruntime."""
    try:  # imported here: only this format needs them
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as err:
        raise UserError(f"--format onnx needs {err.name}: pip install -r requirements.txt") from None
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(module, (example,), path, dynamo=True, external_data=False, input_names=["images"],
                      output_names=["probs"], dynamic_shapes=({0: batch},), verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return check_export("ONNX", module(check).detach(), session.run(None, {"images": check.numpy()})[0])


def export_torchscript(module, example, check, path):
    """torch.jit.trace of the probability module; loads with torch.jit.load, no kit code needed."""
    with warnings.catch_warnings():  # deprecation and tracer notes: the check below is what counts
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(module, example), str(path))
        loaded = torch.jit.load(str(path))
    return check_export("TorchScript", module(check).detach(), loaded(check).detach())


def write_checked(path, export, module, example, check):
    """Export to a temporary file, check it, then rename it to path; returns the difference from PyTorch."""
    difference = []
    atomic_write(path, lambda tmp: difference.append(export(module, example, check, tmp)))
    return difference[0]


FORMATS = {"onnx": (export_onnx, "model.onnx"), "torchscript": (export_torchscript, "model.torchscript.pt")}


def decision_info(rule):
    """The run's macro-F1 decision rule for users outside the kit (None: answer with argmax of the probs)."""
    if rule is None:
        return None
    return {"rule": rule.rule, "params": rule.params, "prior": rule.prior,
            "answer": "argmax over classes c of log(probs[c]) - tau * log(prior[c]) (+ age_bias on the >=60 classes "
                      "c % 3 == 2 where given); cross-fitted OOF macro F1 "
                      f"{rule.cross_fitted_macro_f1:.4f} vs {rule.oof_macro_f1:.4f} with argmax"}


def preprocess_info(config, models, files, rule=None):
    """What a user outside the kit needs to feed the exported model (written as preprocess.json)."""
    height, width = config["input_size"][-2:]
    resize = build_transform("base", config["input_size"], config["interpolation"], train=False).transforms[0]
    interpolation = resize.interpolation.value
    center = center_share(config.get("center_crop"))
    return {
        "files": files, "input_name": "images", "output_name": "probs",
        "input_size": {"height": height, "width": width}, "layout": "NCHW", "channel_order": "RGB",
        "dtype": "float32", "value_range": [0, 255], "batch": "dynamic",
        "resize": f"stretch the {'whole image' if center is None else 'centre crop below'} to "
                  f"{width}x{height} (aspect not kept), {interpolation}, "
                  f"after EXIF orientation; Pillow: image.resize(({width}, {height}), Image.{interpolation.upper()})",
        "interpolation": interpolation,
        "normalization": "inside the model: do not subtract mean or divide by std yourself",
        "mean": config["mean"], "std": config["std"],
        "output": "class probabilities, N x C, rows sum to 1, column i = classes[i]",
        "classes": config["classes"], "task_layout": config["layout"], "head": config["head"],
        "model": config["model"], "models": models,
        "center_crop": (None if center is None else {
            "height_share": center.height, "width_share": center.width,
            "note": "keep the centre of the image, these shares of its height and width, before resizing"}),
        "face_crop": ({"boxes": config["crop"], "margin": config["crop_margin"],
                       "note": "trained on MTCNN face crops (python -m kit.crop_faces): crop the face box widened by margin "
                               "of its size on each side before resizing"} if config.get("crop") else None),
        "decision": decision_info(rule),
    }


def main(argv=None):
    args = parse_args(argv)
    exporters = {name: lookup(FORMATS, name, "--format") for name in args.format}
    folds = [args.fold] if args.fold is not None else None
    models, config = load_run(args.model_dir, folds, args.checkpoint, "cpu")
    module = ProbabilityModel(models, config["head"]).eval().requires_grad_(False)  # outputs carry no graph
    height, width = config["input_size"][-2:]
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, height, width, generator=generator) * 255
    check = torch.rand(3, 3, height, width, generator=generator) * 255  # another batch size: axis is dynamic
    out, written = Path(args.out), {}
    for name, (export, file_name) in exporters.items():
        difference = write_checked(out / file_name, export, module, example, check)
        written[name] = file_name
        print(f"{name}: {out / file_name}  (max |prob difference| vs PyTorch {difference:.1e})")
    what = f"fold {args.fold}" if folds else f"average of {len(models)} folds"
    info = preprocess_info(config, f"{what} of {config['model']} ({args.checkpoint}.pth)", written,
                           run_rule(args.model_dir, len(config["classes"])))
    atomic_write(out / "preprocess.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    print(f"{len(models)} fold model(s) of {args.model_dir} -> {out}/ (input {height}x{width} RGB 0..255, "
          f"output {len(config['classes'])} probabilities; see preprocess.json)")


if __name__ == "__main__":
    run_main(main)
