"""Scores and pictures of a finished run, made from its out-of-fold predictions (oof.csv).

    python report.py --model_dir model/exp
"""
import argparse
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score

from dataset import HEAD_NAMES, UserError, atomic_write, run_main, split_label


def scores(labels, preds, classes):
    """Macro F1, accuracy and per-class F1 (the competition's metric is macro F1)."""
    per_class = f1_score(labels, preds, average=None, labels=range(len(classes)), zero_division=0)
    return {"macro_f1": float(f1_score(labels, preds, average="macro")),
            "accuracy": float(np.mean(np.asarray(labels) == np.asarray(preds))),
            "per_class_f1": {name: float(v) for name, v in zip(classes, per_class)}}


def collect_oof(run_dir):
    """fold{i}/oof.csv of every finished fold -> one frame, in fold order."""
    parts = [pd.read_csv(p, dtype={"profile": str}, keep_default_na=False)
             for p in sorted(Path(run_dir).glob("fold*/oof.csv"))]
    if not parts:
        raise UserError(f"{run_dir} has no finished fold (fold*/oof.csv): train first")
    return pd.concat(parts, ignore_index=True)


def run_metrics(oof, classes, layout):
    """Overall, per-fold and (mask layout) per-head scores of the OOF predictions."""
    labels, preds = oof["label"].to_numpy(), oof["pred"].to_numpy()
    overall = scores(labels, preds, classes)
    metrics = {"oof_macro_f1": overall["macro_f1"], "oof_accuracy": overall["accuracy"], "oof_images": len(oof),
               "folds_done": sorted(int(f) for f in oof["fold"].unique()),
               "per_class_f1": overall["per_class_f1"],
               "folds": {int(f): {k: v for k, v in scores(g["label"], g["pred"], classes).items()
                                  if k != "per_class_f1"} for f, g in oof.groupby("fold")}}
    if layout == "mask":
        metrics["heads"] = {name: {k: v for k, v in scores(t, p, [str(i) for i in range(size)]).items()}
                            for name, size, t, p in zip(HEAD_NAMES, (3, 2, 3), split_label(labels),
                                                        split_label(preds))}
    return metrics


def save_confusion_png(labels, preds, classes, path, title="Out-of-fold confusion matrix (counts)"):
    counts = confusion_matrix(labels, preds, labels=range(len(classes)))
    size = max(5, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(j, i, n, ha="center", va="center", fontsize=7,
                    color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return counts


def write_run_metrics(run_dir, classes, layout):
    """oof.csv, metrics.json and confusion.png of a run from its finished folds."""
    run_dir = Path(run_dir)
    oof = collect_oof(run_dir)
    atomic_write(run_dir / "oof.csv", lambda tmp: oof.to_csv(tmp, index=False, float_format="%.6f"))
    metrics = run_metrics(oof, classes, layout)
    atomic_write(run_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    save_confusion_png(oof["label"], oof["pred"], classes, run_dir / "confusion.png")
    return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="model/exp", help="a run folder made by train.py")
    args = parser.parse_args()
    config_path = Path(args.model_dir) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} not found: --model_dir takes a run folder made by train.py")
    config = json.loads(config_path.read_text())
    metrics = write_run_metrics(args.model_dir, config["classes"], config["layout"])
    print(f"OOF macro F1 {metrics['oof_macro_f1']:.4f} -> {args.model_dir}")


if __name__ == "__main__":
    run_main(main)
