"""Image files: decoding (EXIF, draft mode, 16-bit grey), crops, the check for unreadable files, a Dataset.

    image = load_image("a.jpg", draft_size=(120, 160), box=CenterShare(0.625, 0.667))   # RGB PIL image
    boxes = image_boxes(paths, crop="boxes.csv")       # face boxes, one centre share, or None (whole images)
    bad = find_bad_images(files)                       # [(path, reason)], checked on every core
    raise unreadable_error(bad, "replace them or pass --skip_bad_images")

What a picture becomes after decoding (resize, augmentation) is dataset.py's build_transform.
"""
import os
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from kit.common import UserError
from kit.labels import split_label
from kit.tables import read_csv_checked

DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)  # what a bad file raises
NAMED_BAD_IMAGES = 20  # an error line names this many unreadable files, then counts the rest


@dataclass(frozen=True)
class CenterShare:
    """A centred crop keeping these shares of an image's height and width, whatever its size: the baseline's
    CenterCrop(320, 256) of the 512x384 mask photos is CenterShare(0.625, 0.667)."""
    height: float
    width: float

    def box(self, width, height):
        """(x0, y0, x1, y1) in whole pixels of an image of this size."""
        keep_w, keep_h = max(1, round(width * self.width)), max(1, round(height * self.height))
        x0, y0 = (width - keep_w) // 2, (height - keep_h) // 2
        return (x0, y0, x0 + keep_w, y0 + keep_h)


def center_share(center_crop):
    """The CenterShare of a --center_crop value (config.json's "center_crop"), None for whole images (none, 1 1);
    a value that is not two shares in (0, 1] (a hand-edited config.json) is one UserError."""
    if not center_crop:
        return None
    try:
        share = CenterShare(*map(float, center_crop))
    except (TypeError, ValueError):  # not two numbers
        share = None
    if share is None or not (0 < share.height <= 1 and 0 < share.width <= 1):
        raise UserError(f"center_crop {center_crop!r} is not two shares in (0, 1], height then width: write e.g. "
                        "[0.625, 0.667], or [1, 1] for whole images")
    return None if (share.height, share.width) == (1, 1) else share


def image_boxes(paths, crop=None, margin=0.2, center_crop=None):
    """Per-image crop boxes for ImageDataset/load_image: crop_faces' face boxes (a CSV, widened by margin),
    one centred share of every image (center_crop: (height share, width share)), or None for whole images."""
    center = center_share(center_crop)
    if crop and center is not None:
        raise UserError("--crop (face boxes) and --center_crop both crop the images: choose one")
    if crop:
        return read_boxes(crop, paths, margin)
    return None if center is None else [center] * len(paths)


def read_boxes(boxes_csv, paths, margin=0.2):
    """Crop boxes for paths from a CSV (path,x0,y0,x1,y1), widened by margin of their size."""
    boxes = read_csv_checked(boxes_csv, ["path", "x0", "y0", "x1", "y1"], fix="write it with python -m kit.crop_faces",
                             missing_fix="check --crop, or write it with python -m kit.crop_faces").set_index("path")
    missing = [p for p in paths if p not in boxes.index]
    if missing:
        raise UserError(f"{boxes_csv} has no box for {len(missing)} images (first: {missing[0]}); "
                        "re-run python -m kit.crop_faces on this data")
    xyxy = boxes.loc[list(paths), ["x0", "y0", "x1", "y1"]].astype(float).to_numpy()
    pad = np.repeat((xyxy[:, 2:] - xyxy[:, :2]) * margin, 2, axis=0).reshape(-1, 4) * [-1, -1, 1, 1]
    return [tuple(b) for b in (xyxy + pad).clip(min=0)]


def load_image(path, draft_size=None, box=None):
    """RGB PIL image with EXIF orientation applied; JPEGs decode at reduced size when draft_size
    (w, h) is small (several times faster); box (x0, y0, x1, y1, in full-size pixels, or a CenterShare) crops."""
    with Image.open(path) as image:
        full_w, full_h = image.size
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF: shown rotated by 90 degrees
        shown = (full_h, full_w) if turned else (full_w, full_h)
        box = box.box(*shown) if isinstance(box, CenterShare) else box
        if draft_size and image.format == "JPEG":
            region = (box[2] - box[0], box[3] - box[1]) if box is not None else shown  # what must be big enough
            scale = max(draft_size[0] / max(region[0], 1), draft_size[1] / max(region[1], 1))
            image.draft("RGB", (int(full_w * scale) + 1, int(full_h * scale) + 1))
        shrink = image.size[0] / full_w
        image = ImageOps.exif_transpose(image)
        if box is not None:
            image = image.crop(tuple(round(v * shrink) for v in box))
        return to_rgb(image)


def to_rgb(image):
    """RGB of any PIL mode; 16/32-bit grey (16-bit PNGs, TIFFs) scaled 65535 -> 255, where Pillow's convert
    would clip every value above 255 to white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.float64) / 257  # 65535 / 255: the 16-bit range onto 8 bits
        image = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def check_image(path):
    """None if the image decodes completely, else the reason."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (image.size[0] // 8 + 1, image.size[1] // 8 + 1))  # decodes every byte, faster
            image.load()
        return None
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"


def find_bad_images(paths, workers=None):
    """[(path, reason)] for every file that does not decode, checked in parallel."""
    with Pool(workers or os.cpu_count()) as pool:
        reasons = pool.map(check_image, paths, chunksize=64)
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def unreadable_error(bad, fix, what="images"):
    """The one error line for files that do not decode ([(path, reason)]): the first of them named, the fix."""
    named = "; ".join(f"{p} ({r})" for p, r in bad[:NAMED_BAD_IMAGES])
    more = f"; and {len(bad) - NAMED_BAD_IMAGES} more" if len(bad) > NAMED_BAD_IMAGES else ""
    return UserError(f"{len(bad)} unreadable {what}: {named}{more} — {fix}")


def without_unreadable(table, data_dir, bad, skip):
    """(table, bad): unreadable images ((path, reason) from find_bad_images) stop the run, or with skip are
    dropped from the table."""
    if bad and not skip:
        raise unreadable_error(bad, "replace them or pass --skip_bad_images")
    bad_files = {p for p, _ in bad}
    keep = [str(Path(data_dir) / p) not in bad_files for p in table["path"]]
    return table[keep].reset_index(drop=True), bad


class ImageDataset(Dataset):
    """Images as (uint8 CHW tensor, label, row index); labels None -> -1 (test images). heads=True adds
    (mask, gender, age group) for multi-head models on the mask layout; read is load_image or a reader with its
    arguments (path, draft_size, box), such as kit.speed's image cache."""

    def __init__(self, files, labels=None, transform=None, boxes=None, draft_size=None, heads=False,
                 read=load_image):
        self.files, self.transform, self.boxes = list(files), transform, boxes
        self.labels = np.full(len(self.files), -1) if labels is None else np.asarray(labels)
        self.draft_size, self.heads, self.read = draft_size, heads, read

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        box = self.boxes[index] if self.boxes is not None else None
        image = self.transform(self.read(self.files[index], self.draft_size, box))
        label = int(self.labels[index])
        return (image, label, index, torch.tensor(split_label(label))) if self.heads else (image, label, index)
