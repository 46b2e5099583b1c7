"""Grad-CAM heat maps: where a trained run looks, for chosen images or for its worst out-of-fold errors.

    python -m kit.gradcam --model_dir model/exp --worst 16 --out gradcam          # the 16 worst OOF errors
    python -m kit.gradcam --model_dir model/exp --images a.jpg b.jpg --out gradcam --fold 0

Each image becomes DIR/NN_<name>.png: the photo beside its heat map for the predicted class, titled with
the true and predicted class; DIR/index.csv lists them. An out-of-fold image is explained by the fold
model that never trained on it; other images by --fold. The maps come from the maintained pytorch-grad-cam
package (GradCAM); the target layer is the backbone's last feature stage as timm's feature_info names it
(for a transformer block its norm1: the last place where the patch tokens still reach the class token), and
token outputs are put back on their patch grid. Runs trained on face crops (--crop) are shown on the same
crops for OOF images; --images are shown whole.
"""
import argparse
import re
from pathlib import Path

from kit.common import KitParser, UserError, atomic_write, in_range, run_main


def parse_args(argv=None):
    p = KitParser(prog="python -m kit.gradcam", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default="model/exp", help="run folder made by train.py")
    p.add_argument("--images", nargs="+", default=None, help="explain these image files (default: --worst)")
    p.add_argument("--worst", type=in_range(int, 1), default=16, help="explain this many worst OOF errors (oof.csv)")
    p.add_argument("--fold", type=in_range(int, 0), default=0, help="fold model for --images")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint per fold")
    p.add_argument("--data_dir", default=None, help="training images, if moved since training (for --worst)")
    p.add_argument("--crop", default=None, help="boxes CSV, if moved since training (runs trained with --crop)")
    p.add_argument("--out", default="gradcam", help="folder for the PNGs and index.csv")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image

from dataset import build_transform
from kit.device import pick_device
from kit.images import center_share, check_image, image_boxes, load_image, unreadable_error
from kit.predict import load_run
from kit.report import read_run, worst_predictions
from model import to_probs


# ---- Grad-CAM on a Classifier ----------------------------------------------------------------------
def target_layer(backbone):
    """(module, its feature_info entry): the last feature stage timm reports; in a transformer block
    its norm1, since after the last block only the class token feeds the head (zero patch gradients)."""
    info = backbone.feature_info[-1]
    module = backbone.get_submodule(info["module"])
    return (module.norm1 if isinstance(getattr(module, "norm1", None), torch.nn.Module) else module), info


def to_grid(info, input_size):
    """reshape_transform for pytorch-grad-cam: activations as N x C x h x w, whatever the layer gives
    (NCHW conv maps, NHWC stages, or N x tokens x C with class/register tokens first)."""
    grid = (input_size[-2] // info["reduction"], input_size[-1] // info["reduction"])

    def reshape(activation):
        if activation.ndim == 3:
            patches = activation[:, -grid[0] * grid[1]:]
            return patches.reshape(len(activation), *grid, -1).permute(0, 3, 1, 2)
        if activation.shape[-1] == info["num_chs"] and activation.shape[1] != info["num_chs"]:
            return activation.permute(0, 3, 1, 2)
        return activation
    return reshape


def class_target(label, head):
    """The score Grad-CAM explains: log-probability of one class (the multi head's 18-class product too)."""
    return lambda output: to_probs(output[None], head)[0, label].log()


def explain(model, config, image):
    """(heat map H x W in 0..1 at the model's input size, class probabilities) for one uint8 CHW image."""
    layer, info = target_layer(model.backbone)
    batch = image[None].float()
    with torch.no_grad():
        probs = to_probs(model(batch), config["head"])[0]
    with GradCAM(model, [layer], reshape_transform=to_grid(info, config["input_size"])) as cam:
        heat = cam(batch, [class_target(int(probs.argmax()), config["head"])])[0]
    return heat, probs.cpu().numpy()


# ---- which images ----------------------------------------------------------------------------------
def worst_errors(args):
    """The --worst OOF errors with the lowest probability of their true class, each with its fold."""
    config, oof, data_dir = read_run(args.model_dir, args.data_dir)
    errors = oof[oof["label"] != oof["pred"]]
    if errors.empty:
        raise UserError(f"{args.model_dir}: no out-of-fold errors to explain; pass --images")
    worst = worst_predictions(errors.reset_index(drop=True), config["classes"], args.worst)
    crop = args.crop or config.get("crop")
    if crop and not Path(crop).is_file():
        raise UserError(f"boxes file {crop} (the run was trained on crops) not found: pass --crop")
    boxes = (image_boxes(list(worst["path"]), crop, config["crop_margin"], config.get("center_crop"))
             or [None] * len(worst))
    return [{"file": str(data_dir / r.path), "name": r.path, "label": int(r.label), "fold": int(r.fold), "box": b}
            for r, b in zip(worst.itertuples(), boxes)]


def chosen_images(args):
    missing = [f for f in args.images if not Path(f).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of --images not found (first: {missing[0]}); check the paths")
    return [{"file": f, "name": Path(f).name, "label": None, "fold": args.fold, "box": None} for f in args.images]


# ---- pictures --------------------------------------------------------------------------------------
def overlay(photo, heat):
    """The heat map stretched back onto the photo (the model saw the photo stretched to its input size)."""
    rgb = np.asarray(photo, dtype=np.float32) / 255
    resized = torch.nn.functional.interpolate(torch.from_numpy(heat)[None, None], size=rgb.shape[:2],
                                              mode="bilinear", align_corners=False)[0, 0].numpy()
    return show_cam_on_image(rgb, resized.clip(0, 1), use_rgb=True)


def save_overlay(path, photo, heat, title):
    fig, axes = plt.subplots(1, 2, figsize=(7, 4.6))
    for ax, picture, caption in zip(axes, (photo, overlay(photo, heat)), ("image", "Grad-CAM")):
        ax.imshow(picture)
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    images = chosen_images(args) if args.images else worst_errors(args)
    unreadable = [(item["file"], reason) for item in images if (reason := check_image(item["file"]))]
    if unreadable:  # all checked before the first overlay: no partial folder
        raise unreadable_error(unreadable, "replace them or leave them out of --images")
    runs = {fold: load_run(args.model_dir, [fold], args.checkpoint, device) for fold in {i["fold"] for i in images}}
    config = next(iter(runs.values()))[1]
    transform = build_transform("base", config["input_size"], config["interpolation"], train=False)
    classes, rows = config["classes"], []
    center = center_share(config.get("center_crop"))  # for --images
    for number, item in enumerate(images):
        photo = load_image(item["file"], box=center if item["box"] is None else item["box"])
        heat, probs = explain(runs[item["fold"]][0][0], config, transform(photo).to(device))
        pred = int(probs.argmax())
        true = classes[item["label"]] if item["label"] is not None else "unknown"
        png = Path(args.out) / f"{number:02d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', item['name'])}.png"
        save_overlay(png, photo, heat, f"{item['name']}\ntrue: {true}   pred: {classes[pred]} "
                                       f"(p={probs[pred]:.2f})   fold {item['fold']}")
        rows.append({"png": png.name, "image": item["file"], "fold": item["fold"], "true": true,
                     "pred": classes[pred], "pred_prob": float(probs[pred]), "heat_mean": float(heat.mean())})
    index = pd.DataFrame(rows)
    atomic_write(Path(args.out) / "index.csv", lambda tmp: index.to_csv(tmp, index=False, float_format="%.4f"))
    print(f"{len(rows)} Grad-CAM overlays -> {args.out}/ (index.csv lists true/pred per picture)")


if __name__ == "__main__":
    run_main(main)
