"""Offline stand-in for the mask-status data, built from real photographs instead of drawn cartoons.

    apt-get install dataset-fashion-mnist        # clothes (or --clothes photo: crops of the photos below)
    python sample/make_photo_people.py --out /tmp/people --train_people 300 --eval_people 100 --size 384 512
    python train.py --data_dir /tmp/people/train --model tf_efficientnet_lite0 --weights lite0.pth ...
    python inference.py --model_dir model/NAME --data_dir /tmp/people/eval   # score with eval/answers.csv

Writes the competition layout (as sample/make_sample.py does, without its archive junk):
OUT/train/train.csv, OUT/train/images/<id>_<gender>_Asian_<age>/{mask1..5,incorrect_mask,normal}.jpg,
OUT/eval/info.csv (ans all 0), OUT/eval/answers.csv (true labels), OUT/eval/images/<sha1>.jpg shuffled;
with --layout folder also OUT/folder/<NN_mask_gender_age>/<person>_<stem>.jpg (the training pictures).

A person is a fixed identity in all 7 pictures: a real face (a blend of two of scikit-image's 100 LFW
crops, possibly mirrored, in a skin tone), a background crop of a real photo, a piece of clothing
(Fashion-MNIST) in a colour, hair texture and colour. The labels are visible but imperfect, as in the
real data:
- mask: 5 different masks for mask1..5 (textures from real images), pulled below the nose or to the
  chin for incorrect_mask (sometimes only just below the nose), none for normal;
- gender: hair length, drawn from overlapping distributions (short-haired women, long-haired men), so
  even a perfect reader of the picture is right only about 96% of the time;
- age: hair greyness and wrinkles follow an "apparent age" = age + per-person noise (5 years), so a
  58-year-old often looks 60 and a 27-year-old 31. Ages 18..60 as in the real data: ~45% under 30,
  ~48% 30-59 (a bump at 50-58), ~7% exactly 60; ~60% women.
Per picture: position, scale, rotation, lighting (gain, tint, side light; one per person with --one_scene),
blur, noise, JPEG quality.

Needs at generation time only: numpy, Pillow, scikit-image (skimage.data: astronaut, coffee, chelsea,
rocket, camera, brick, grass, gravel, immunohistochemistry, hubble_deep_field, lfw_subset), scikit-learn
(load_sample_images: china, flower) and, for --clothes fashion_mnist (default), Debian's
dataset-fashion-mnist files. Deterministic: the same --seed and library versions give the same bytes.
"""
import argparse
import csv
import gzip
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kit.common import UserError, run_main  # noqa: E402

MASK_FILES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
FOLDER_NAMES = [f"{m * 6 + g * 3 + a:02d}_{mn}_{gn}_{an}" for m, mn in enumerate(("wear", "incorrect", "not_worn"))
                for g, gn in enumerate(("male", "female")) for a, an in enumerate(("under30", "30to59", "60plus"))]
PHOTO_NAMES = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]
TEXTURE_NAMES = ["camera", "brick", "grass", "gravel"]
TOPS = [0, 2, 3, 4, 6]  # Fashion-MNIST t-shirt, pullover, dress, coat, shirt
MASK_COLOURS = [(236, 236, 232), (168, 204, 236), (30, 30, 34), (120, 122, 128), (226, 200, 178),
                (236, 176, 190), (40, 52, 96), (70, 110, 80)]
APPARENT_AGE_NOISE = 5.0  # years; makes 58-59 look like 60 and blurs the 30 boundary
HAIR_LENGTH = {"male": 0.12, "female": 0.8}  # means of a normal with sd 0.2: ~4% look like the other gender


# ---- real sources ------------------------------------------------------------------------------
def read_fashion_mnist(folder, per_class=400):
    """Tops (t-shirt, pullover, dress, coat, shirt) from Debian's Fashion-MNIST files, as 28x28 uint8."""
    images_path, labels_path = Path(folder) / "train-images-idx3-ubyte.gz", Path(folder) / "train-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise UserError(f"{images_path} not found: apt-get install dataset-fashion-mnist, "
                        "point --fashion_mnist at its folder, or pass --clothes photo")
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return [images[i] for label in TOPS for i in np.flatnonzero(labels == label)[:per_class]]


def load_sources(clothes, fashion_mnist_dir):
    """Every real picture the generator draws from, loaded once."""
    import skimage.data
    from sklearn.datasets import load_sample_images
    photos = [getattr(skimage.data, name)() for name in PHOTO_NAMES] + list(load_sample_images().images)
    textures = [np.asarray(getattr(skimage.data, name)(), np.float32) / 255 for name in TEXTURE_NAMES]
    faces = skimage.data.lfw_subset()[:100].astype(np.float32)  # the first 100 are faces, the rest not
    tops = read_fashion_mnist(fashion_mnist_dir) if clothes == "fashion_mnist" else None
    return {"photos": photos, "textures": textures, "faces": faces, "tops": tops}


def crop(array, rng, height, width):
    """A random height x width window (the array is upsampled first if smaller)."""
    scale = max(height / array.shape[0], width / array.shape[1], 1.0)
    if scale > 1:
        image = Image.fromarray(array)
        array = np.asarray(image.resize((int(np.ceil(image.width * scale)), int(np.ceil(image.height * scale)))))
    top, left = rng.integers(0, array.shape[0] - height + 1), rng.integers(0, array.shape[1] - width + 1)
    return array[top:top + height, left:left + width]


def texture_patch(sources, rng, height, width):
    """A grey fabric/hair-like texture in [-0.5, 0.5] from one of the real grey images."""
    texture = sources["textures"][rng.integers(len(sources["textures"]))]
    side = int(rng.integers(96, 256))
    window = crop((texture * 255).astype(np.uint8), rng, side, side)
    patch = np.asarray(Image.fromarray(window).resize((width, height), Image.BILINEAR), np.float32) / 255
    return patch - patch.mean()


# ---- a person ---------------------------------------------------------------------------------
def sample_age(rng):
    """Real-like ages: ~45% 18-29 (mostly early twenties), ~48% 30-59 with a bump at 50-58, ~7% exactly 60."""
    draw = rng.random()
    if draw < 0.45:
        return int(np.clip(np.round(rng.normal(22, 3.5)), 18, 29))
    if draw < 0.93:
        return int(rng.integers(30, 50)) if rng.random() < 0.4 else int(np.clip(np.round(rng.normal(54, 3)), 50, 59))
    return 60


def face_texture(sources, rng):
    """A blend of two real LFW faces (the second maybe mirrored), gamma varied: a new identity,
    standardised to mean 0, sd 1 so the skin tone sets the brightness."""
    first, second = rng.choice(len(sources["faces"]), 2, replace=False)
    other = sources["faces"][second][:, ::-1] if rng.random() < .5 else sources["faces"][second]
    weight = rng.uniform(0.55, 0.8)
    face = (weight * sources["faces"][first] + (1 - weight) * other) ** rng.uniform(0.8, 1.25)
    return (face - face.mean()) / (face.std() + 1e-6)


def hair_colour(apparent_age, rng):
    """Dark hair blended towards silver as apparent age rises (continuous over 18..60+)."""
    base = np.array([rng.uniform(20, 45), rng.uniform(15, 32), rng.uniform(10, 25)]) * rng.uniform(0.8, 2.2)
    grey = float(np.clip((apparent_age - 22) / 40, 0, 1)) ** 1.3
    silver = np.full(3, rng.uniform(170, 225))
    return (1 - grey) * base + grey * silver


def make_person(gender, age, sources, rng, size):
    """Everything fixed about one person: identity (face, background, clothes, hair) and the cues."""
    width, height = size
    apparent_age = age + rng.normal(0, APPARENT_AGE_NOISE)
    background = crop(sources["photos"][rng.integers(len(sources["photos"]))], rng,
                      int(height * rng.uniform(.45, 1.0)), int(width * rng.uniform(.45, 1.0)))
    return {"gender": gender, "age": age, "face": face_texture(sources, rng),
            "skin": np.array([224, 184, 152]) * rng.uniform(.6, 1.05) + rng.normal(0, 6, 3),
            "face_ratio": rng.uniform(.9, 1.08), "background": Image.fromarray(background).resize((width, height)),
            "hair": hair_colour(apparent_age, rng), "hair_texture": texture_patch(sources, rng, height, width),
            "hair_length": float(np.clip(rng.normal(HAIR_LENGTH[gender], 0.2), 0, 1)),
            "wrinkles": float(np.clip((apparent_age - 28) / 32, 0, 1)),
            "wrinkle_texture": texture_patch(sources, rng, height, width),
            "clothes": clothes_layer(sources, rng, size),
            "masks": [mask_style(sources, rng, size) for _ in range(5)],
            "incorrect_top": rng.uniform(0.28, 0.8)}


def clothes_layer(sources, rng, size):
    """An RGBA torso: a coloured Fashion-MNIST top (its silhouette is the alpha) or a photo-textured shirt."""
    width, height = size
    box = (int(width * rng.uniform(.85, 1.1)), int(height * rng.uniform(.42, .5)))
    if sources["tops"] is not None:
        top = sources["tops"][rng.integers(len(sources["tops"]))]
        grey = np.asarray(Image.fromarray(top).resize(box, Image.BICUBIC), np.float32) / 255
        colour = rng.uniform(25, 245, 3)
        rgb = grey[..., None] * colour * 1.25
        alpha = np.clip(grey * 4, 0, 1)
    else:
        rgb = crop(sources["photos"][rng.integers(len(sources["photos"]))], rng, box[1], box[0]).astype(np.float32)
        ys, xs = np.mgrid[0:box[1], 0:box[0]] / np.array([box[1], box[0]])[:, None, None]
        alpha = (np.abs(xs - .5) < .22 + .3 * ys).astype(np.float32)
    rgba = np.dstack([np.clip(rgb, 0, 255), alpha * 255]).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def mask_style(sources, rng, size):
    """One mask's fabric: a solid colour with real texture and pleats, or a crop of a real photo."""
    width, height = size
    if rng.random() < 0.7:
        colour = np.array(MASK_COLOURS[rng.integers(len(MASK_COLOURS))], np.float32) + rng.normal(0, 8, 3)
        shade = 1 + 0.35 * texture_patch(sources, rng, height, width)
        rgb = colour * shade[..., None]
    else:
        photo = crop(sources["photos"][rng.integers(len(sources["photos"]))], rng, height // 3, width // 3)
        rgb = np.asarray(Image.fromarray(photo).resize((width, height)), np.float32)
    pleats = 1 - 0.12 * (np.sin(np.arange(height) / height * rng.uniform(40, 90)) > 0.6)
    return Image.fromarray(np.clip(rgb * pleats[:, None, None], 0, 255).astype(np.uint8))


# ---- drawing -----------------------------------------------------------------------------------
def head_geometry(person, size):
    """Head centre and half-axes on the canvas (before the per-picture camera jitter)."""
    width, height = size
    return width * .5, height * .4, width * .23 * person["face_ratio"], height * .2


def shape(size, draw_shape):
    """An 'L' alpha image with one filled shape drawn by draw_shape(ImageDraw)."""
    alpha = Image.new("L", size, 0)
    draw_shape(ImageDraw.Draw(alpha))
    return alpha


def textured(colour, texture, strength):
    """A full-canvas RGB image of colour modulated by a zero-mean texture."""
    return Image.fromarray(np.clip(colour * (1 + strength * texture[..., None]), 0, 255).astype(np.uint8))


def face_layer(person, size, cx, cy, a, b):
    """The skin-coloured head with the real face inside (feathered), darkened by age wrinkles."""
    width, height = size
    box = (int(2 * .9 * a), int(2 * .95 * b))
    face = np.asarray(Image.fromarray(person["face"]).resize(box, Image.BICUBIC), np.float32)
    shading = np.zeros((height, width), np.float32)
    left, top = int(cx - box[0] / 2), int(cy - box[1] / 2)
    shading[top:top + box[1], left:left + box[0]] = face
    feather = shape(size, lambda d: d.ellipse([cx - .8 * a, cy - .9 * b, cx + .8 * a, cy + .9 * b], fill=255))
    feather = np.asarray(feather.filter(ImageFilter.GaussianBlur(a / 8)), np.float32) / 255
    wrinkles = person["wrinkles"] * (1.4 * person["wrinkle_texture"] - .12 * wrinkle_lines(size, cx, cy, a, b))
    return textured(person["skin"], .25 * shading * feather + wrinkles * feather, 1.0)


def wrinkle_lines(size, cx, cy, a, b):
    """Forehead lines and smile lines as a 0/1 map (drawn strongest on old faces)."""
    lines = shape(size, lambda d: None)
    draw, width = ImageDraw.Draw(lines), max(1, int(a / 30))
    for dy in (-.62, -.52, -.44):
        draw.arc([cx - .5 * a, cy + dy * b, cx + .5 * a, cy + (dy + .2) * b], 200, 340, fill=255, width=width)
    for side in (-1, 1):
        draw.line([(cx + side * .28 * a, cy + .22 * b), (cx + side * .38 * a, cy + .62 * b)], fill=255, width=width)
    return np.asarray(lines, np.float32) / 255


def foreground(person, size):
    """Clothes, neck, hair and face as one RGBA layer (everything but the mask), built once a person."""
    cx, cy, a, b = head_geometry(person, size)
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    clothes = person["clothes"]
    layer.alpha_composite(clothes, (int(cx - clothes.width / 2), int(cy + .8 * b)))
    skin = Image.new("RGB", size, tuple(int(v) for v in np.clip(person["skin"] * .9, 0, 255)))
    layer.paste(skin, (0, 0), shape(size, lambda d: d.rectangle([cx - .4 * a, cy + .5 * b, cx + .4 * a, cy + 1.2 * b],
                                                                   fill=255)))
    hair = textured(person["hair"], person["hair_texture"], 1.2)
    hair_bottom = cy - .3 * b + person["hair_length"] * 2.4 * b  # long hair falls past the chin
    layer.paste(hair, (0, 0), shape(size, lambda d: d.rounded_rectangle(
        [cx - 1.22 * a, cy - 1.08 * b, cx + 1.22 * a, max(hair_bottom, cy - .2 * b)], radius=int(a * .6), fill=255)))
    head = shape(size, lambda d: d.ellipse([cx - a, cy - b, cx + a, cy + b], fill=255))
    layer.paste(face_layer(person, size, cx, cy, a, b), (0, 0), head)
    layer.paste(hair, (0, 0), shape(size, lambda d: d.chord([cx - 1.08 * a, cy - 1.15 * b, cx + 1.08 * a, cy - .2 * b],
                                                          180, 360, fill=255)))
    return layer


def draw_mask(layer, person, mask_index, mask_state, rng):
    """Worn: fabric from under the eyes past the chin; incorrect: its top below the nose or at the chin."""
    cx, cy, a, b = head_geometry(person, layer.size)
    if mask_state == 0:
        top = cy + rng.uniform(-.2, -.04) * b
    else:
        top = cy + float(np.clip(person["incorrect_top"] + rng.normal(0, .05), .18, .85)) * b
    bottom = cy + (1.1 if mask_state == 0 else 1.25) * b
    fabric = person["masks"][mask_index]
    region = np.asarray(shape(layer.size, lambda d: d.ellipse([cx - 1.05 * a, cy - 1.1 * b, cx + 1.05 * a, bottom],
                                                              fill=255)))
    rows = np.arange(layer.size[1])[:, None]
    alpha = Image.fromarray(np.where((rows >= top) & (rows <= bottom), region, 0).astype(np.uint8))
    layer.paste(fabric, (0, 0), alpha.filter(ImageFilter.GaussianBlur(1)))
    strap = tuple(int(v) for v in np.asarray(fabric).reshape(-1, 3).mean(0))
    draw, width = ImageDraw.Draw(layer), max(2, int(a / 25))
    for side in (-1, 1):
        draw.line([(cx + side * .98 * a, top + .12 * b), (cx + side * 1.03 * a, cy - .15 * b)], fill=strap + (255,),
                  width=width)


def camera(image, size, rng, spread):
    """Shift, scale and rotate an image about the head centre, as a hand-held camera would."""
    width, height = size
    angle, scale = np.deg2rad(rng.uniform(-10, 10) * spread), rng.uniform(1 - .1 * spread, 1 + .1 * spread)
    shift = rng.uniform(-.07, .07, 2) * spread * np.array([width, height])
    cx, cy = width * .5, height * .4
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale  # output -> input: inverse rotation and scale
    ox, oy = cx + shift[0], cy + shift[1]
    data = (cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy)
    return image.transform(size, Image.AFFINE, data, resample=Image.BILINEAR)


def render(person, stem, rng, size):
    """One photo of person: mask for stem, camera jitter, lighting, blur, sensor noise."""
    mask_state = MASK_FILES[stem]
    layer = person["foreground"].copy()
    if mask_state != 2:
        mask_index = int(stem[-1]) - 1 if mask_state == 0 else person["incorrect_mask"]
        draw_mask(layer, person, mask_index, mask_state, rng)
    picture = camera(person["background"], size, rng, .3).convert("RGBA")
    picture.alpha_composite(camera(layer, size, rng, 1.0))
    if rng.random() < .3:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(.4, 1.4) * size[0] / 384))
    pixels = np.asarray(picture.convert("RGB"), np.float32)
    light = rng.uniform(-.35, .35), rng.uniform(.7, 1.2), rng.uniform(.92, 1.08, 3)  # side light, gain, tint
    side, gain, tint = person.get("scene", light)  # --one_scene: the person's one sitting
    pixels = pixels * gain * tint * (1 + side * (np.linspace(-.5, .5, size[0])[None, :, None]))
    pixels = pixels + rng.normal(0, rng.uniform(1, 6), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# ---- writing the layout ------------------------------------------------------------------------
def new_person(sources, seed, part, number, size, one_scene=False):
    """Person number of part ('train'/'eval'), from its own random stream: any person can be rebuilt alone.
    one_scene: the person's 7 pictures share one light (side light, gain, tint), as photos of one sitting do."""
    rng = np.random.default_rng([seed, {"train": 1, "eval": 2}[part], number])
    gender = "female" if rng.random() < .6 else "male"
    person = make_person(gender, sample_age(rng), sources, rng, size)
    person["incorrect_mask"] = int(rng.integers(5))
    person["foreground"] = foreground(person, size)
    if one_scene:  # a stream of its own: the other draws, and so the default pictures, stay as they were
        scene = np.random.default_rng([seed, {"train": 1, "eval": 2}[part], number, 5])
        person["scene"] = scene.uniform(-.35, .35), scene.uniform(.7, 1.2), scene.uniform(.92, 1.08, 3)
    return person, rng


def save_jpeg(image, path, rng):
    image.save(path, format="JPEG", quality=int(rng.integers(70, 96)))


def label_of(stem, person):
    age_grp = 0 if person["age"] < 30 else 1 if person["age"] < 60 else 2
    return MASK_FILES[stem] * 6 + (person["gender"] == "female") * 3 + age_grp


def write_train(out, sources, args):
    """train.csv and images/<id>_<gender>_Asian_<age>/<stem>.jpg; with --layout folder also folder/<class>/."""
    ids = sorted(np.random.default_rng([args.seed, 3]).choice(np.arange(1, 7000), args.train_people, replace=False))
    rows = []
    for number, person_id in enumerate(ids):
        person, rng = new_person(sources, args.seed, "train", number, args.size, args.one_scene)
        folder_name = f"{person_id:06d}_{person['gender']}_Asian_{person['age']}"
        (out / "train" / "images" / folder_name).mkdir(parents=True)
        for stem in MASK_FILES:
            path = out / "train" / "images" / folder_name / f"{stem}.jpg"
            save_jpeg(render(person, stem, rng, args.size), path, rng)
            if args.layout == "folder":
                class_dir = out / "folder" / FOLDER_NAMES[label_of(stem, person)]
                class_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, class_dir / f"{folder_name}_{stem}.jpg")
        rows.append([f"{person_id:06d}", person["gender"], "Asian", person["age"], folder_name])
    write_csv(out / "train" / "train.csv", ["id", "gender", "race", "age", "path"], rows)


def write_eval(out, sources, args):
    """Other people; sha1-named pictures in shuffled order; answers kept apart from info.csv."""
    (out / "eval" / "images").mkdir(parents=True)
    entries = []
    for number in range(args.eval_people):
        person, rng = new_person(sources, args.seed, "eval", number, args.size, args.one_scene)
        for stem in MASK_FILES:
            image_id = hashlib.sha1(f"{args.seed}/eval/{number}/{stem}".encode()).hexdigest() + ".jpg"
            save_jpeg(render(person, stem, rng, args.size), out / "eval" / "images" / image_id, rng)
            entries.append((image_id, label_of(stem, person)))
    order = np.random.default_rng([args.seed, 4]).permutation(len(entries))
    entries = [entries[i] for i in order]
    write_csv(out / "eval" / "info.csv", ["ImageID", "ans"], [[image_id, 0] for image_id, _ in entries])
    write_csv(out / "eval" / "answers.csv", ["ImageID", "ans"], entries)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([header, *rows])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/photo_people", help="output folder (its train/, eval/, folder/ are "
                        "replaced)")
    parser.add_argument("--train_people", type=int, default=300, help="people in train/ (7 pictures each)")
    parser.add_argument("--eval_people", type=int, default=100, help="other people in eval/")
    parser.add_argument("--size", type=int, nargs=2, default=[384, 512], metavar=("W", "H"), help="picture size")
    parser.add_argument("--seed", type=int, default=0, help="everything follows from it")
    parser.add_argument("--clothes", choices=["fashion_mnist", "photo"], default="fashion_mnist",
                        help="fashion_mnist: Debian's dataset-fashion-mnist tops; photo: shirts cut from the photos")
    parser.add_argument("--fashion_mnist", default="/usr/share/datasets/fashion-mnist", help="its folder")
    parser.add_argument("--one_scene", action="store_true", help="a person's 7 pictures share one light (side "
                        "light, gain, tint), as photos taken in one sitting do; default: each picture its own")
    parser.add_argument("--layout", choices=["mask", "folder"], default="mask",
                        help="folder: also write OUT/folder/<class>/ copies of the training pictures")
    args = parser.parse_args(argv)
    if args.train_people < 1 or args.eval_people < 0 or args.train_people > 6999:
        raise UserError("--train_people must be 1..6999 and --eval_people 0 or more")
    if min(args.size) < 32:
        raise UserError(f"--size {args.size[0]} {args.size[1]} is too small: use at least 32 32")
    args.size = tuple(args.size)
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    sources = load_sources(args.clothes, args.fashion_mnist)
    for part in ("train", "eval", "folder"):
        shutil.rmtree(out / part, ignore_errors=True)
    write_train(out, sources, args)
    write_eval(out, sources, args)
    print(f"wrote {args.train_people} + {args.eval_people} people ({7 * (args.train_people + args.eval_people)} "
          f"pictures) under {out}")


if __name__ == "__main__":
    run_main(main)
