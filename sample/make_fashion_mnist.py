"""Write a slice of Fashion-MNIST (real photos of clothes, 10 classes) as a folder-per-class data set.

    apt-get install dataset-fashion-mnist          # Debian ships the files offline
    python sample/make_fashion_mnist.py --out /tmp/fmnist --per_class 100 --size 64
    python train.py --data_dir /tmp/fmnist/train --model tf_efficientnet_lite0 --weights lite0.pth ...

Used to show transfer learning (pretrained vs scratch) on real images without a network.
"""
import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(path, header):
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default="/usr/share/datasets/fashion-mnist", help="Debian's files")
    parser.add_argument("--out", default="/tmp/fmnist", help="writes OUT/train/<class>/*.png and OUT/test/...")
    parser.add_argument("--per_class", type=int, default=100, help="training images per class")
    parser.add_argument("--test_per_class", type=int, default=50, help="test images per class")
    parser.add_argument("--size", type=int, default=64, help="side of the written RGB images")
    args = parser.parse_args()
    for split, src, count in (("train", "train", args.per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(Path(args.src) / f"{src}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = read_idx(Path(args.src) / f"{src}-labels-idx1-ubyte.gz", 8)
        for label, name in enumerate(CLASSES):
            folder = Path(args.out) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == label)[:count]:
                image = Image.fromarray(images[i]).convert("RGB").resize((args.size, args.size), Image.BICUBIC)
                image.save(folder / f"{i:05d}.png")
    print(f"wrote {args.per_class} + {args.test_per_class} images per class under {args.out}")


if __name__ == "__main__":
    main()
