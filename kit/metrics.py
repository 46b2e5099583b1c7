"""The scores a run is judged by: macro F1 (the competition's metric), accuracy, per class, per fold, per head.

    metrics = run_metrics(oof, classes, layout)   # what metrics.json holds
"""
import numpy as np
from sklearn.metrics import f1_score

from kit.labels import HEAD_NAMES, HEAD_SIZES, split_label


def scores(labels, preds, classes):
    """Macro F1, accuracy and per-class F1 (the competition's metric is macro F1)."""
    per_class = f1_score(labels, preds, average=None, labels=range(len(classes)), zero_division=0)
    return {"macro_f1": float(f1_score(labels, preds, average="macro")),
            "accuracy": float(np.mean(np.asarray(labels) == np.asarray(preds))),
            "per_class_f1": {name: float(v) for name, v in zip(classes, per_class)}}


def run_metrics(oof, classes, layout, last_epoch_oof=None):
    """Overall, per-fold and (mask layout) per-head scores of the OOF predictions (each fold's best epoch, chosen
    on that fold: leaning optimistic), next to the last epochs' (no choice made on the fold) when given."""
    labels, preds = oof["label"].to_numpy(), oof["pred"].to_numpy()
    overall = scores(labels, preds, classes)
    metrics = {"oof_macro_f1": overall["macro_f1"], "oof_accuracy": overall["accuracy"], "oof_images": len(oof),
               "folds_done": sorted(int(f) for f in oof["fold"].unique()),
               "per_class_f1": overall["per_class_f1"],
               "folds": {int(f): {k: v for k, v in scores(g["label"], g["pred"], classes).items()
                                  if k != "per_class_f1"} for f, g in oof.groupby("fold")}}
    if last_epoch_oof is not None:
        metrics["oof_macro_f1_last_epoch"] = scores(last_epoch_oof["label"], last_epoch_oof["pred"], classes)["macro_f1"]
        for fold, part in last_epoch_oof.groupby("fold"):
            metrics["folds"][int(fold)]["last_epoch_macro_f1"] = scores(part["label"], part["pred"], classes)["macro_f1"]
    if layout == "mask":
        metrics["heads"] = {name: scores(t, p, [str(i) for i in range(size)])
                            for name, size, t, p in zip(HEAD_NAMES, HEAD_SIZES, split_label(labels),
                                                        split_label(preds))}
    return metrics
