"""Face boxes for every image of a data set, found once with MTCNN, for train.py/inference.py --crop.

    python -m kit.crop_faces --data_dir sample/train --out boxes.csv                 # a training folder
    python -m kit.crop_faces --data_dir sample/eval --out eval_boxes.csv             # a test folder (info.csv)
    python train.py --data_dir sample/train --crop boxes.csv ...
    python inference.py --data_dir sample/eval --crop eval_boxes.csv --model_dir model/exp

Writes path,x0,y0,x1,y1,prob,found: one row per image, the path written as train.py (training folder:
relative to --data_dir) or inference.py (test folder: relative to the info.csv folder) looks it up, the box
in pixels of the upright (EXIF-applied) full-size image. The detector is facenet-pytorch's MTCNN, whose
weights ship inside its wheel (no download); the largest face is kept. An image with no face of at least
--min_prob gets a fallback box (found=0): the middle 60% of the width and the 10%..70% band of the height,
where the face sits in a portrait photo. train.py/inference.py widen every box by --crop_margin.
"""
import argparse
import os
import sys
from functools import partial
from pathlib import Path

from kit.common import KitParser, UserError, atomic_write, in_range, lookup, run_main

FALLBACK_BOX = (0.2, 0.1, 0.8, 0.7)  # x0, y0, x1, y1 as shares of width/height: a portrait's face
COLUMNS = ["path", "x0", "y0", "x1", "y1", "prob", "found"]


def parse_args(argv=None):
    p = KitParser(prog="python -m kit.crop_faces", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="sample/train", help="a training folder or a test folder (info.csv)")
    p.add_argument("--out", default="boxes.csv", help="boxes CSV to write (keep it outside --data_dir)")
    p.add_argument("--kind", default="auto", choices=["auto", "train", "test"],
                   help="auto: test when --data_dir (or its parent) holds info.csv or --submission is given")
    p.add_argument("--submission", default=None, help="test folder's sample-submission CSV (default: info.csv)")
    p.add_argument("--layout", default="auto", help="training layout (as train.py): auto, mask, csv, json, folder")
    p.add_argument("--ann_file", default=None, help="annotation CSV/JSON for csv/json layouts")
    p.add_argument("--path_col", default="path", help="image path column/field (csv, json)")
    p.add_argument("--label_col", default="label", help="label column/field (csv, json)")
    p.add_argument("--min_prob", type=in_range(float, 0, 1), default=0.9,
                   help="faces found with a lower probability fall back")
    p.add_argument("--max_side", type=in_range(int, 1), default=1024,
                   help="larger images are shrunk to this for detection")
    p.add_argument("--batch_size", type=in_range(int, 1), default=32,
                   help="images per MTCNN batch (same-size images batch)")
    p.add_argument("--num_workers", type=in_range(int, 0), default=min(4, os.cpu_count()),
                   help="image decoding processes")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import build_table
from kit.device import pick_device
from kit.images import ImageDataset, find_bad_images
from kit.tables import read_test_table


def is_test_folder(args):
    data_dir = Path(args.data_dir)
    has_info = any((d / "info.csv").is_file() for d in (data_dir, data_dir.parent))
    has_train = any((d / "train.csv").is_file() for d in (data_dir, data_dir.parent))
    return args.submission is not None or (has_info and not has_train)


def train_images(args):
    """(files, paths as train.py looks them up): the table train.py builds from the same folder."""
    table = build_table(args.data_dir, args.layout, folds=2, grouped=False, ann_file=args.ann_file,
                        path_col=args.path_col, label_col=args.label_col)[0]
    return [str(Path(args.data_dir) / p) for p in table["path"]], list(table["path"])


def test_images(args):
    """(files, paths as inference.py looks them up: relative to the submission CSV's folder)."""
    _, files, submission = read_test_table(args.data_dir, args.submission)
    return files, [os.path.relpath(f, submission.parent) for f in files]


IMAGE_SOURCES = {"train": train_images, "test": test_images}


def detection_input(image, max_side):
    """PIL image -> (H x W x 3 uint8 tensor, at most max_side long; its scale; full (w, h))."""
    full_size = image.size
    scale = min(1.0, max_side / max(full_size))
    if scale < 1.0:
        image = image.resize((round(full_size[0] * scale), round(full_size[1] * scale)), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()), scale, full_size


def detector_class():
    """facenet-pytorch's MTCNN class, or one line with the install command (an optional install)."""
    try:
        from facenet_pytorch import MTCNN  # imported here: slow to import, and an optional install
    except ImportError:
        raise UserError("python -m kit.crop_faces needs facenet-pytorch: pip install --no-deps facenet-pytorch==2.6.0") from None
    return MTCNN


def load_detector(device):
    """facenet-pytorch's MTCNN (P/R/O-Net weights from its wheel); largest face first."""
    return detector_class()(select_largest=True, device=device)


def detect_batch(mtcnn, items):
    """[(box in full-size pixels, prob) or None] for [(image, scale, full size)]; same-size images
    go through MTCNN together (it only batches equal sizes)."""
    results = [None] * len(items)
    by_shape = {}
    for index, (image, _, _) in enumerate(items):
        by_shape.setdefault(tuple(image.shape), []).append(index)
    for indices in by_shape.values():
        boxes, probs = mtcnn.detect(torch.stack([items[i][0] for i in indices]))
        for i, image_boxes, image_probs in zip(indices, boxes, probs):
            if image_boxes is not None:
                results[i] = (image_boxes[0] / items[i][1], float(image_probs[0]))
    return results


def box_row(path, detection, full_size, min_prob):
    """One CSV row: the face box, or the portrait fallback box (found=0) below min_prob."""
    if detection is not None and detection[1] >= min_prob:
        x0, y0, x1, y1 = np.clip(detection[0], 0, [*full_size, *full_size])
        return [path, x0, y0, x1, y1, detection[1], 1]
    width, height = full_size
    box = np.multiply(FALLBACK_BOX, [width, height, width, height])
    return [path, *box, 0.0 if detection is None else detection[1], 0]


def find_boxes(files, paths, args, device):
    """A boxes frame for all files, decoded in parallel and detected in batches."""
    dataset = ImageDataset(files, transform=partial(detection_input, max_side=args.max_side))
    loader = DataLoader(dataset, args.batch_size, num_workers=args.num_workers, collate_fn=list)
    mtcnn, rows = load_detector(device), []
    for batch in tqdm(loader, desc="faces", unit="batch", mininterval=2.0, disable=not sys.stderr.isatty()):
        items = [item[0] for item in batch]
        for (_, _, index), detection, (_, _, full_size) in zip(batch, detect_batch(mtcnn, items), items):
            rows.append(box_row(paths[index], detection, full_size, args.min_prob))
    return pd.DataFrame(rows, columns=COLUMNS)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    detector_class()  # a missing install fails before any image is read
    kind = args.kind if args.kind != "auto" else ("test" if is_test_folder(args) else "train")
    files, paths = lookup(IMAGE_SOURCES, kind, "kind")(args)
    bad = {f for f, _ in find_bad_images(files)}
    if bad:  # train.py --skip_bad_images drops them too; inference.py refuses them
        print(f"note: {len(bad)} unreadable images get no box (first: {sorted(bad)[0]})")
        paths = [p for f, p in zip(files, paths) if f not in bad]
        files = [f for f in files if f not in bad]
    if not files:
        raise UserError(f"{args.data_dir}: no readable images; point --data_dir at a training or test folder")
    print(f"{kind} folder {args.data_dir}: {len(files)} images, MTCNN on {device}")
    boxes = find_boxes(files, paths, args, device)
    atomic_write(args.out, lambda tmp: boxes.to_csv(tmp, index=False, float_format="%.3f"))
    fallbacks = boxes.loc[boxes["found"] == 0, "path"]
    print(f"faces found in {len(boxes) - len(fallbacks)} of {len(boxes)} images; {len(fallbacks)} fallback boxes"
          + (f" (first: {fallbacks.iloc[0]})" if len(fallbacks) else "") + f" -> {args.out}")


if __name__ == "__main__":
    run_main(main)
