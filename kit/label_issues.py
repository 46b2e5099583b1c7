"""Images whose given label is probably wrong, found from a run's out-of-fold probabilities.

    python -m kit.label_issues --model_dir model/exp --top 50
    python train.py --drop_list model/exp/label_issues.csv ...             # retrain without them, or
    python train.py --relabel_list model/exp/relabel_suggestions.csv ...   # with the suggested labels

Confident learning (Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating Uncertainty in
Dataset Labels"): class j's threshold is the mean out-of-fold probability of j over the images labelled
j (its self-confidence). An image is a candidate when, among the classes whose probability reaches their
threshold, the most probable one is not its given label; that class is the suggestion. Candidates are
ranked by self-confidence (probability of the given label) or by margin (that minus the best other
class's probability), lowest first. A few lines of numpy: cleanlab implements this (and more) but its
releases are AGPL-licensed. The list is only as good as the model: a weak model's own mistakes rank too.

Into the run folder, each file written atomically (look at the pictures before dropping anything):
  label_issues.csv         the top candidates: rank, path, profile, fold, given and suggested label
                           (index and name), changes (mask layout: which of mask/gender/age differ),
                           self_confidence, margin, score; its path column makes it a --drop_list as it
                           is (delete the rows you want to keep)
  relabel_suggestions.csv  the same images as path, field=label, value=suggested class: a --relabel_list
  label_issues.png         the top candidates (at most 60) with their given and suggested class
"""
import argparse
from pathlib import Path

from kit.common import KitParser, atomic_write, in_range, lookup, run_main

MAX_SHOWN = 60  # a bigger grid is too small to read
RANKINGS = {  # lower = more likely mislabelled
    "self_confidence": lambda given_prob, best_other: given_prob,
    "margin": lambda given_prob, best_other: given_prob - best_other}


def parse_args(argv=None):
    parser = KitParser(prog="python -m kit.label_issues", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="model/exp", help="a run folder made by train.py")
    parser.add_argument("--top", type=in_range(int, 0), default=50, help="how many candidates to write (0 = all)")
    parser.add_argument("--rank_by", default="self_confidence", help=f"one of: {', '.join(RANKINGS)}")
    parser.add_argument("--data_dir", default=None, help="the training images (default: the run's data_dir)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import numpy as np
import pandas as pd

from kit.images import center_share
from kit.labels import HEAD_NAMES, split_label
from kit.report import image_caption, read_run, save_image_grid


def class_thresholds(probs, labels):
    """Per class: the mean probability of that class over the images labelled with it (inf if none)."""
    counts = np.bincount(labels, minlength=probs.shape[1])
    sums = np.bincount(labels, weights=probs[np.arange(len(labels)), labels], minlength=probs.shape[1])
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


def find_label_issues(probs, labels, rank_by="self_confidence"):
    """All candidates, most likely wrong first: row, suggested, self_confidence, margin, score."""
    labels, rows = np.asarray(labels), np.arange(len(labels))
    above = probs >= class_thresholds(probs, labels)
    suggested = np.where(above, probs, -1.0).argmax(1)
    given_prob = probs[rows, labels]
    best_other = np.where(np.eye(probs.shape[1], dtype=bool)[labels], -np.inf, probs).max(1)
    score = lookup(RANKINGS, rank_by, "ranking")(given_prob, best_other)
    issues = pd.DataFrame({"row": rows, "suggested": suggested, "self_confidence": given_prob,
                           "margin": given_prob - best_other, "score": score})
    candidate = above.any(1) & (suggested != labels)
    return issues[candidate].sort_values(["score", "margin", "row"]).reset_index(drop=True)  # margin breaks ties


def differing_heads(given, suggested):
    """Mask layout: which parts of the label the suggestion changes, e.g. 'gender' or 'mask+age'."""
    changed = [np.asarray(g) != np.asarray(s) for g, s in zip(split_label(given), split_label(suggested))]
    return ["+".join(name for name, c in zip(HEAD_NAMES, flags) if c) for flags in zip(*changed)]


def issue_table(oof, issues, classes, layout):
    """The candidates as written to label_issues.csv, with class names next to indices."""
    picked = oof.iloc[issues["row"]].reset_index(drop=True)
    table = pd.DataFrame({"rank": np.arange(1, len(issues) + 1), "path": picked["path"],
                          "profile": picked["profile"], "fold": picked["fold"],
                          "given_label": picked["label"], "given_name": [classes[i] for i in picked["label"]],
                          "suggested_label": issues["suggested"],
                          "suggested_name": [classes[i] for i in issues["suggested"]]})
    if layout == "mask":
        table["changes"] = differing_heads(table["given_label"], table["suggested_label"])
    return table.assign(**issues[["self_confidence", "margin", "score"]])


def write_outputs(table, run_dir, data_dir, rank_by, seen=None):
    run_dir = Path(run_dir)
    atomic_write(run_dir / "label_issues.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    relabel = pd.DataFrame({"path": table["path"], "field": "label", "value": table["suggested_name"]})
    atomic_write(run_dir / "relabel_suggestions.csv", lambda tmp: relabel.to_csv(tmp, index=False))
    shown = table.head(MAX_SHOWN)
    captions = [image_caption(r.path, f"#{r.rank} given: {r.given_name}", f"suggested: {r.suggested_name}",
                              f"p(given) {r.self_confidence:.2g}, margin {r.margin:.2f}") for r in shown.itertuples()]
    title = (f"Top {len(shown)} of {len(table)} likely label errors (confident learning, ranked by {rank_by})"
             if len(table) else "No likely label errors found")
    save_image_grid([str(Path(data_dir) / p) for p in shown["path"]], captions, run_dir / "label_issues.png", title,
                    seen=seen)


def write_label_issues(run_dir, top=50, rank_by="self_confidence", data_dir=None):
    """Find the candidates of a finished run and write its top ones; returns (candidates, written, oof)."""
    lookup(RANKINGS, rank_by, "--rank_by")  # checked before anything is read
    config, oof, data_dir = read_run(run_dir, data_dir)
    classes, seen = config["classes"], center_share(config.get("center_crop"))
    probs = oof[[f"p{i}" for i in range(len(classes))]].to_numpy(float)
    issues = find_label_issues(probs, oof["label"].to_numpy(), rank_by)
    table = issue_table(oof, issues.head(top or len(issues)), classes, config["layout"])
    write_outputs(table, run_dir, data_dir, rank_by, seen)
    return issues, table, oof


def main(argv=None):
    args = parse_args(argv)
    issues, table, oof = write_label_issues(args.model_dir, args.top, args.rank_by, args.data_dir)
    accuracy = (oof["label"] == oof["pred"]).mean()
    print(f"{len(issues)} of {len(oof)} images ({len(issues) / len(oof):.1%}) look mislabelled (OOF accuracy "
          f"{accuracy:.3f}: a weak model's own mistakes look like label errors too); top {len(table)} -> "
          f"{Path(args.model_dir) / 'label_issues.csv'}, relabel_suggestions.csv, label_issues.png")


if __name__ == "__main__":
    run_main(main)
