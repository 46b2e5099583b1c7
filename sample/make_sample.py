"""Deterministic generator of the embedded sample data set (mask-status competition layout).

Run from anywhere:  python sample/make_sample.py
It deletes and rewrites sample/train/ and sample/eval/; with the same numpy and Pillow versions the
output is byte-identical. Needs only the standard library, numpy and Pillow; takes a few seconds.
"""
import argparse
import colorsys
import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SEED = 20210823
SAMPLE_DIR = Path(__file__).resolve().parent
WIDTH, HEIGHT, SUPERSAMPLE = 96, 128, 2  # drawn at 2x then downsampled, for smooth edges
JPEG_QUALITY = 90
MASK_FILES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
MASK_COLOURS = [(238, 238, 234), (160, 198, 236), (28, 28, 32)]  # white, light blue, black
AGE_RANGES = [(18, 28), (31, 58), (61, 75)]
# Boundary ages (plus 45 for person 000001) in every gender, so an off-by-one age binning shows up.
EDGE_AGES = [[29, 29], [30, 30, 45, 59, 59], [60, 60]]
PEOPLE_PER_TRAIN_CELL, PEOPLE_PER_EVAL_CELL = 10, 3
APPLEDOUBLE_BYTES = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\x00\x00\x00\x09"


def age_group(age):
    return 0 if age < 30 else 1 if age < 60 else 2


def class_label(mask_state, gender, age):
    return mask_state * 6 + (gender == "female") * 3 + age_group(age)


def hair_colour(group, rng):
    """Age is the subtle cue: lightness ranges per group overlap a little, grey hair is desaturated."""
    hue, sat, value = [(rng.uniform(.04, .09), rng.uniform(.45, .75), rng.uniform(.06, .30)),
                       (rng.uniform(.06, .10), rng.uniform(.35, .60), rng.uniform(.27, .50)),
                       (rng.uniform(.06, .12), rng.uniform(.00, .12), rng.uniform(.58, .92))][group]
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, value))


def background(rng):
    """A person-specific backdrop (colour + stripes or blobs) that lets a model memorise identities."""
    size = (WIDTH * SUPERSAMPLE, HEIGHT * SUPERSAMPLE)
    base, accent = (tuple(int(v) for v in rng.integers(40, 230, 3)) for _ in range(2))
    image = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        period, slope = int(rng.integers(14, 40)), rng.uniform(-1.5, 1.5)
        for x in range(-2 * size[1], size[0] + 2 * size[1], period):
            draw.line([(x, 0), (x + slope * size[1], size[1])], fill=accent, width=period // 3)
    else:
        for _ in range(int(rng.integers(4, 9))):
            x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(10, 40)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=accent)
    return image


def make_person(gender, age, rng):
    return {"gender": gender, "age": age, "background": background(rng),
            "skin": tuple(int(v) for v in np.array([225, 185, 150]) * rng.uniform(.65, 1.05)),
            "shirt": tuple(int(v) for v in rng.integers(20, 235, 3)),
            "face_ratio": rng.uniform(.88, 1.08), "hair": hair_colour(age_group(age), rng)}


def draw_body_and_hair(draw, person, cx, cy, a, b, rng):
    """Shoulders, neck, face and hair: short cap for men, long hair down both sides for women."""
    skin, hair = person["skin"], person["hair"]
    draw.ellipse([cx - 1.9 * a, cy + 1.25 * b, cx + 1.9 * a, cy + 3.2 * b], fill=person["shirt"])
    if person["gender"] == "female":
        draw.rounded_rectangle([cx - 1.45 * a, cy - 1.1 * b, cx + 1.45 * a, cy + 1.75 * b], radius=a, fill=hair)
    draw.rectangle([cx - .42 * a, cy + .5 * b, cx + .42 * a, cy + 1.7 * b], fill=skin)
    draw.ellipse([cx - a, cy - b, cx + a, cy + b], fill=skin)
    draw.chord([cx - 1.1 * a, cy - 1.14 * b, cx + 1.1 * a, cy + .1 * b], 180, 360, fill=hair)
    if age_group(person["age"]) == 1:  # a few grey strands following the hairline
        for k in rng.uniform(.45, .95, int(rng.integers(2, 5))):
            top, bottom = cy - .52 * b - .62 * b * k, cy - .52 * b + .62 * b * k
            draw.arc([cx - 1.1 * a * k, top, cx + 1.1 * a * k, bottom], 195, 345, fill=(200, 198, 192), width=2)


def draw_features(draw, person, cx, cy, a, b):
    """Eyes, nose, mouth, and forehead wrinkles for the 60+ group."""
    shade = tuple(int(c * .72) for c in person["skin"])
    for side in (-1, 1):
        ex, ey = cx + side * .4 * a, cy - .15 * b
        draw.ellipse([ex - 6, ey - 4, ex + 6, ey + 4], fill=(250, 250, 250))
        draw.ellipse([ex - 3, ey - 3, ex + 3, ey + 3], fill=(30, 25, 20))
    draw.polygon([(cx, cy - .05 * b), (cx - .16 * a, cy + .24 * b), (cx + .12 * a, cy + .24 * b)], fill=shade)
    draw.ellipse([cx - .3 * a, cy + .47 * b, cx + .3 * a, cy + .58 * b], fill=(160, 50, 55))
    if age_group(person["age"]) == 2:
        for dy in (-.42, -.33):
            draw.arc([cx - .45 * a, cy + dy * b, cx + .45 * a, cy + (dy + .12) * b], 200, 340, fill=shade, width=2)


def draw_mask(layer, mask_state, cx, cy, a, b, rng):
    """Worn: a band over nose and mouth; incorrect: pulled down under the nose, over mouth and chin."""
    y_top, y_bottom = (cy - .1 * b, cy + 1.02 * b) if mask_state == 0 else (cy + .32 * b, cy + 1.15 * b)
    colour = MASK_COLOURS[int(rng.integers(len(MASK_COLOURS)))]
    ys, xs = np.mgrid[0:layer.height, 0:layer.width]
    on_face = ((xs - cx) / (1.06 * a)) ** 2 + ((ys - cy) / (1.06 * b)) ** 2 <= 1
    band = on_face & (ys >= y_top) & (ys <= y_bottom)
    layer.paste(colour + (255,), (0, 0), Image.fromarray(band.astype(np.uint8) * 255))
    for side in (-1, 1):  # ear straps
        strap = [(cx + side * a, y_top + 4), (cx + side * 1.02 * a, cy - .1 * b)]
        ImageDraw.Draw(layer).line(strap, fill=colour, width=3)


def draw_face_layer(person, mask_state, rng):
    """Transparent layer with the person, jittered in position, scale and angle."""
    layer = Image.new("RGBA", (WIDTH * SUPERSAMPLE, HEIGHT * SUPERSAMPLE), (0, 0, 0, 0))
    jitter, scale = 6 * SUPERSAMPLE, rng.uniform(.9, 1.1)
    cx, cy = layer.width / 2 + rng.uniform(-jitter, jitter), layer.height * .47 + rng.uniform(-jitter, jitter)
    a, b = 42 * scale * person["face_ratio"], 56 * scale  # face half-width and half-height
    draw_body_and_hair(ImageDraw.Draw(layer), person, cx, cy, a, b, rng)
    draw_features(ImageDraw.Draw(layer), person, cx, cy, a, b)
    if mask_state != 2:
        draw_mask(layer, mask_state, cx, cy, a, b, rng)
    return layer.rotate(rng.uniform(-8, 8), resample=Image.BICUBIC, center=(cx, cy))


def render(person, mask_state, rng):
    """One photo: backdrop + face layer, downsampled, with brightness jitter and sensor-like noise."""
    image = person["background"].convert("RGBA")
    image.alpha_composite(draw_face_layer(person, mask_state, rng))
    pixels = np.asarray(image.convert("RGB").resize((WIDTH, HEIGHT), Image.LANCZOS), dtype=np.float32)
    pixels = pixels * rng.uniform(.85, 1.15) + rng.normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save(image, path):
    image.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG", quality=JPEG_QUALITY)


def train_profiles(rng):
    """(gender, age) for 10 people per gender x age group; 000001 is a female 45, 000002 a male 30."""
    profiles = []
    for gender in ("male", "female"):
        for group, (low, high) in enumerate(AGE_RANGES):
            extra = PEOPLE_PER_TRAIN_CELL - len(EDGE_AGES[group])
            ages = EDGE_AGES[group] + [int(a) for a in rng.integers(low, high + 1, extra)]
            profiles += [(gender, age) for age in ages]
    order = [profiles[i] for i in rng.permutation(len(profiles))]
    for first in (("male", 30), ("female", 45)):
        order.insert(0, order.pop(order.index(first)))
    return order


def train_ids(rng, count):
    """Sorted 6-digit ids like the real ones, with one odd '000600-1' among them."""
    pool = np.setdiff1d(np.arange(3, 7000), [600])
    numbers = [1, 2] + sorted(int(n) for n in rng.choice(pool, count - 3, replace=False))
    return sorted([f"{n:06d}" for n in numbers] + ["000600-1"])


def person_extensions(rng, count):
    """Mostly .jpg, some .jpeg, two .png and one upper-case .JPG; one extension per person, as in the real data."""
    exts = [str(e) for e in rng.choice([".jpg", ".jpeg"], count, p=[.9, .1])]
    exts[2], exts[11], exts[40] = ".JPG", ".png", ".png"  # PNGs are 5x larger: only two such people
    return exts


def write_train(rng):
    images_dir = SAMPLE_DIR / "train" / "images"
    images_dir.mkdir(parents=True)
    profiles = train_profiles(rng)
    ids, exts = train_ids(rng, len(profiles)), person_extensions(rng, len(profiles))
    rows = []
    for person_id, (gender, age), ext in zip(ids, profiles, exts):
        folder_name = f"{person_id}_{gender}_Asian_{age}"
        folder = images_dir / folder_name
        folder.mkdir()
        person = make_person(gender, age, rng)
        for stem, mask_state in MASK_FILES.items():
            save(render(person, mask_state, rng), folder / f"{stem}{ext}")
        rows.append([person_id, gender, "Asian", age, folder_name])
    add_archive_junk(images_dir, rows, exts)
    write_csv(SAMPLE_DIR / "train" / "train.csv", ["id", "gender", "race", "age", "path"], rows)


def add_archive_junk(images_dir, rows, exts):
    """macOS AppleDouble files and a Jupyter checkpoint copy, as found in the real archives."""
    (images_dir / f"._{rows[1][4]}").write_bytes(APPLEDOUBLE_BYTES)
    for index, stem in ((1, "mask1"), (5, "normal"), (33, "incorrect_mask")):
        (images_dir / rows[index][4] / f"._{stem}{exts[index]}").write_bytes(APPLEDOUBLE_BYTES)
    folder = images_dir / rows[exts.index(".jpg")][4]
    (folder / ".ipynb_checkpoints").mkdir()
    shutil.copyfile(folder / "mask1.jpg", folder / ".ipynb_checkpoints" / "mask1-checkpoint.jpg")


def write_eval(rng):
    """Different people than train; hash-named files in shuffled order; answers kept apart from info.csv."""
    images_dir = SAMPLE_DIR / "eval" / "images"
    images_dir.mkdir(parents=True)
    entries = []
    for number in range(2 * len(AGE_RANGES) * PEOPLE_PER_EVAL_CELL):
        gender = ("male", "female")[number % 2]
        low, high = AGE_RANGES[number // 2 % len(AGE_RANGES)]
        person = make_person(gender, int(rng.integers(low, high + 1)), rng)
        for stem, mask_state in MASK_FILES.items():
            image_id = hashlib.sha1(f"{SEED}/eval/{number}/{stem}".encode()).hexdigest() + ".jpg"
            save(render(person, mask_state, rng), images_dir / image_id)
            entries.append((image_id, class_label(mask_state, gender, person["age"])))
    entries = [entries[i] for i in rng.permutation(len(entries))]
    write_csv(SAMPLE_DIR / "eval" / "info.csv", ["ImageID", "ans"], [[image_id, 0] for image_id, _ in entries])
    write_csv(SAMPLE_DIR / "eval" / "answers.csv", ["ImageID", "ans"], entries)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([header, *rows])


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    rng = np.random.default_rng(SEED)
    for part in ("train", "eval"):
        shutil.rmtree(SAMPLE_DIR / part, ignore_errors=True)
    write_train(rng)
    write_eval(rng)


if __name__ == "__main__":
    main()
