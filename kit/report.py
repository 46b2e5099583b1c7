"""Scores and pictures of a finished run, made from its out-of-fold predictions (oof.csv).

    python -m kit.report --model_dir model/exp                          # PNGs + report.html into the run folder
    python -m kit.report --model_dir model/exp --data_dir /data/train   # the images moved since training

Made from the run folder alone (config.json, fold*/oof.csv, log.csv), so it works for any finished run:
  confusion.png              counts of (true, predicted) class
  confusion_normalized.png   each true class's row as % of its images (recall on the diagonal)
  per_class.png              precision, recall and F1 of every class
  heads_confusion.png        mask layout: mask 3x3, gender 2x2, age group 3x3
  learning_curves.png        per fold: training loss, training and validation macro F1 by epoch
  worst_predictions.png      the images with the lowest probability of their given class (highest loss)
  report.html                one self-contained page (pictures embedded) with the key numbers
"""
import argparse
import base64
import html
import math
from pathlib import Path

from kit.common import KitParser, UserError, atomic_write, in_range, run_main


def parse_args(argv=None):
    parser = KitParser(prog="python -m kit.report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="model/exp", help="a run folder made by train.py")
    parser.add_argument("--data_dir", default=None, help="the training images (default: the run's data_dir)")
    parser.add_argument("--worst", type=in_range(int, 0), default=24, help="how many worst predictions to show")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import json

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from kit.decision import from_json
from kit.images import center_share, load_image
from kit.labels import HEAD_NAMES, head_value_names, split_label
from kit.metrics import run_metrics
from kit.runs import collect_oof, read_config, write_run_metrics

REPORT_PNGS = {"confusion.png": "Confusion matrix (counts)",
               "confusion_normalized.png": "Confusion matrix (% of each true class)",
               "per_class.png": "Precision, recall and F1 per class",
               "heads_confusion.png": "Per-head confusion matrices (mask, gender, age)",
               "learning_curves.png": "Learning curves",
               "worst_predictions.png": "Worst predictions"}


# ---- pictures ----------------------------------------------------------------------------------
def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_matrix(ax, matrix, names, title, fmt="d"):
    """A heatmap of a (true x predicted) matrix, empty cells left blank, class names on both axes;
    numbers in the cells up to 30 classes (more would not fit)."""
    font = 5 if len(names) > 30 else 7 if len(names) > 10 else 10
    sns.heatmap(matrix, ax=ax, mask=matrix == 0, annot=len(names) <= 30, fmt=fmt, cmap="Blues", vmin=0, square=True,
                cbar=False, linewidths=0.5, linecolor="#eeeeee", annot_kws={"fontsize": font},
                xticklabels=names, yticklabels=names)
    ax.tick_params(axis="x", labelrotation=90 if len(names) > 4 else 0, labelsize=font + 1)
    ax.tick_params(axis="y", labelrotation=0, labelsize=font + 1)
    for i in range(len(names)):  # outline the diagonal, so a class that is never right still shows
        ax.add_patch(plt.Rectangle((i, i), 1, 1, fill=False, edgecolor="#d62728", linewidth=1))
    ax.set(xlabel="predicted", ylabel="true (given label)", title=title)


def save_confusion_png(labels, preds, classes, path, title="Out-of-fold confusion matrix (counts)",
                       normalize=False):
    """Counts, or with normalize each true class's row in % (empty rows stay 0); returns the counts."""
    counts = confusion_matrix(labels, preds, labels=range(len(classes)))
    shown = np.round(100 * counts / np.maximum(counts.sum(1, keepdims=True), 1)).astype(int) if normalize else counts
    size = max(5, 0.5 * len(classes) + 2.5) if len(classes) <= 30 else 0.2 * len(classes) + 5
    fig, ax = plt.subplots(figsize=(size, size), layout="constrained")
    plot_matrix(ax, shown, list(classes), title)
    save_figure(fig, path)
    return counts


def save_heads_png(labels, preds, classes, path):
    """Mask 3x3, gender 2x2 and age-group 3x3 confusion counts side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 5), layout="constrained")
    for ax, name, names, true, pred in zip(axes, HEAD_NAMES, head_value_names(classes), split_label(labels),
                                          split_label(preds)):
        counts = confusion_matrix(true, pred, labels=range(len(names)))
        plot_matrix(ax, counts, names, f"{name}: accuracy {np.mean(true == pred):.3f}")
    fig.suptitle("Out-of-fold confusion matrix of each head (counts, from the 18-class predictions)")
    save_figure(fig, path)


def per_class_table(labels, preds, classes):
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=range(len(classes)), zero_division=0)
    return pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1,
                         "support": support})


def save_per_class_png(table, path):
    """Horizontal bars (class names stay readable), one colour per metric, support in the name."""
    long = table.assign(name=[f"{c} (n={n})" for c, n in zip(table["class"], table["support"])]).melt(
        id_vars="name", value_vars=["precision", "recall", "f1"], var_name="metric", value_name="score")
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(table) + 1.8), layout="constrained")
    sns.barplot(data=long, y="name", x="score", hue="metric", orient="h", ax=ax)
    ax.set(xlim=(0, 1), xlabel="score (out-of-fold)", ylabel="",
           title=f"Precision, recall and F1 per class (macro F1 {table['f1'].mean():.3f})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), title="metric")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def save_learning_curves_png(log, path):
    """Per fold: training loss; training (dashed) and validation (solid) macro F1 by epoch."""
    log = log.assign(fold=log["fold"].map(lambda f: f"fold {f}"))
    f1 = log.melt(id_vars=["fold", "epoch"], value_vars=["val_f1", "train_f1"], var_name="split",
                  value_name="macro F1").replace({"split": {"val_f1": "validation", "train_f1": "training"}})
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5), layout="constrained")
    sns.lineplot(data=log, x="epoch", y="train_loss", hue="fold", marker="o", ax=left)
    sns.lineplot(data=f1, x="epoch", y="macro F1", hue="fold", style="split", style_order=["validation", "training"],
                 marker="o", ax=right)
    left.set(title="Training loss per fold", ylabel="training loss")
    right.set(title="Macro F1 per fold (solid: validation, dashed: training)", ylim=(0, 1.02))
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: curves reach the top
    save_figure(fig, path)


def save_image_grid(files, captions, path, title, columns=6, seen=None):
    """Thumbnails with a caption each (several lines allowed); used by kit.report and kit.label_issues. seen: a
    run's CenterShare, drawn as a dashed box (what the model saw) on the whole picture (what a person judges)."""
    columns = min(columns, max(len(files), 3))  # a short list gets a narrower figure (3 wide fits the title)
    rows = max(1, math.ceil(len(files) / columns))
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    height = rows * (2.7 + 0.14 * lines) + 0.5
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.6, height), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, file, caption in zip(axes.flat, files, captions):
        image = load_image(file, draft_size=(240, 320))
        image.thumbnail((240, 320))  # about the size shown: a small file, and "nearest" then cannot alias
        ax.imshow(image, interpolation="nearest")
        if seen is not None:
            x0, y0, x1, y1 = seen.box(*image.size)
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow",
                                   linestyle="--", linewidth=1.2))
        ax.set_title(caption, fontsize=7.5)
    fig.suptitle(title, fontsize=12)
    # fixed spacing from the known caption height: a layout engine measures every text, which took most of the time
    caption_share = 0.14 * lines + 0.25
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (0.45 + caption_share) / height, wspace=0.05,
                        hspace=caption_share / (2.7 - 0.25))
    save_figure(fig, path)


def worst_predictions(oof, classes, count):
    """The count rows with the lowest probability of their given class (= highest cross-entropy)."""
    probs = oof[[f"p{i}" for i in range(len(classes))]].to_numpy()
    rows = np.arange(len(oof))
    true_prob, pred_prob = probs[rows, oof["label"]], probs[rows, oof["pred"]]
    order = np.argsort(true_prob, kind="stable")[:count]
    return oof.iloc[order].assign(true_prob=true_prob[order], pred_prob=pred_prob[order],
                                  loss=-np.log(np.clip(true_prob[order], 1e-12, None)))


def image_caption(path, *lines):
    """Caption lines, then the picture's folder and file name on their own lines (long names cut)."""
    return "\n".join([*lines, Path(path).parent.name[:34], Path(path).name[:34]])


def save_worst_png(worst, classes, data_dir, path, seen=None):
    captions = [image_caption(r.path, f"true: {classes[r.label]} (p={r.true_prob:.2f})",
                              f"pred: {classes[r.pred]} (p={r.pred_prob:.2f})", f"loss {r.loss:.2f}")
                for r in worst.itertuples()]
    save_image_grid([str(Path(data_dir) / p) for p in worst["path"]], captions, path,
                    f"The {len(worst)} out-of-fold predictions with the lowest probability of the true class "
                    "(highest loss)" + ("; dashed: the centre the model saw" if seen is not None else ""), seen=seen)


# ---- the page ----------------------------------------------------------------------------------
def table_html(frame, float_format="%.4f"):
    return frame.to_html(index=False, border=0, float_format=lambda v: float_format % v, classes="t")


def metrics_html(metrics, config, class_table):
    """The key numbers: overall, per fold, per head (mask layout) and per class."""
    overall = pd.DataFrame([{"OOF macro F1 (best epochs)": metrics["oof_macro_f1"],
                             "OOF macro F1 (last epochs)": metrics.get("oof_macro_f1_last_epoch"),
                             "OOF accuracy": metrics["oof_accuracy"],
                             "images": metrics["oof_images"], "folds done": len(metrics["folds_done"]),
                             "model": config.get("model"), "head": config.get("head"),
                             "input size": "x".join(map(str, config.get("input_size", [])[-2:])),
                             "epochs": config.get("epochs")}])
    folds = pd.DataFrame([{"fold": f, "macro F1 (best epoch)": s["macro_f1"],
                           "macro F1 (last epoch)": s.get("last_epoch_macro_f1"), "accuracy": s["accuracy"]}
                          for f, s in metrics["folds"].items()])
    parts = ["<h2>Key metrics</h2>", "<p>Each fold's best epoch is chosen on that fold, so its OOF leans "
             "optimistic; the last epochs' OOF had no choice made on it: compare runs by it.</p>", table_html(overall), "<h3>Per fold</h3>", table_html(folds)]
    if "heads" in metrics:
        heads = pd.DataFrame([{"head": h, "macro F1": s["macro_f1"], "accuracy": s["accuracy"]}
                              for h, s in metrics["heads"].items()])
        parts += ["<h3>Per head</h3>", table_html(heads)]
    return "\n".join(parts + ["<h3>Per class</h3>", table_html(class_table)])


def decision_html(run_dir, classes):
    """The decision layer's per-class F1 before/after (cross-fitted) from decision.json, if the run has one."""
    path = Path(run_dir) / "decision.json"
    if not path.is_file():
        return ""
    rule = from_json(path, len(classes))
    table = pd.DataFrame({"class": classes, "F1 argmax": rule.per_class_f1_before,
                          "F1 with the rule (cross-fitted)": rule.per_class_f1_after, "prior": rule.prior})
    return (f"<h3>Decision layer: {html.escape(rule.rule)} {html.escape(str(rule.params))}</h3><p>OOF macro F1 "
            f"{rule.oof_macro_f1:.4f} with argmax, {rule.cross_fitted_macro_f1:.4f} with the rule fitted on the other "
            f"folds; {html.escape(rule.reason)} (by inference.py when applied).</p>" + table_html(table))


def people_html(metrics):
    """Person-consistent answers' out-of-fold evidence (metrics.json's people), if the run fitted them."""
    found = metrics.get("people")
    if not found:
        return ""
    return (f"<h3>Person-consistent answers ({html.escape(found['heads'])} pooled)</h3><p>OOF macro F1 "
            f"{found['oof_macro_f1']:.4f} without, {found['oof_macro_f1_pooled']:.4f} with (each with its cross-fitted "
            f"decision rule); grouping purity {found['purity']:.3f}; age head F1 {found['age_f1']:.4f} -> "
            f"{found['age_f1_pooled']:.4f}; {'applied' if found['applied'] else 'not applied'} by inference.py.</p>")


def image_html(path, caption):
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<h2>{html.escape(caption)}</h2>\n<img alt="{html.escape(Path(path).name)}" '
            f'src="data:image/png;base64,{data}">')


def write_html(run_dir, metrics, config, class_table, pngs):
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;color:#222}"
             "img{max-width:100%;border:1px solid #ddd}table.t{border-collapse:collapse;margin:.5em 0}"
             "table.t td,table.t th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}"
             "table.t td:first-child,table.t th:first-child{text-align:left}")
    title = f"Run report: {Path(run_dir).name}"
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(str(Path(run_dir).resolve()))}, data "
            f"{html.escape(str(config.get('data_dir')))}, layout {html.escape(str(config.get('layout')))}</p>",
            metrics_html(metrics, config, class_table), decision_html(run_dir, config["classes"]),
            people_html(json.loads((Path(run_dir) / "metrics.json").read_text()))]
    body += [image_html(Path(run_dir) / name, REPORT_PNGS[name]) for name in pngs]
    page = (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    atomic_write(Path(run_dir) / "report.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


# ---- the jobs ----------------------------------------------------------------------------------
def read_run(run_dir, data_dir=None):
    """config.json, the OOF frame and the image folder of a run; one-line errors if missing."""
    config = read_config(run_dir)
    data_dir = Path(data_dir or config["data_dir"])
    if not data_dir.is_dir():
        raise UserError(f"image folder {data_dir} (from {Path(run_dir) / 'config.json'}) not found: pass --data_dir")
    oof = collect_oof(run_dir)
    missing = [p for p in oof["path"] if not (data_dir / p).is_file()]
    if missing:  # checked before any picture is drawn: no half-made report
        raise UserError(f"{len(missing)} of the run's {len(oof)} images are not under {data_dir} (first: "
                        f"{missing[0]}): pass --data_dir the folder the run trained on")
    return config, oof, data_dir


def read_log(run_dir):
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        raise UserError(f"{path} not found: --model_dir takes a run folder made by train.py")
    return pd.read_csv(path)


def write_report(run_dir, data_dir=None, worst=24, pictures=True):
    """Every report picture and report.html into run_dir; returns the metrics shown. pictures=False (train.py
    --no-report): confusion.png alone, in a blink."""
    run_dir = Path(run_dir)
    if not pictures:
        config, oof = read_config(run_dir), collect_oof(run_dir)
        save_confusion_png(oof["label"], oof["pred"], config["classes"], run_dir / "confusion.png")
        return None
    config, oof, data_dir = read_run(run_dir, data_dir)
    log, seen = read_log(run_dir), center_share(config.get("center_crop"))
    classes, labels, preds = config["classes"], oof["label"].to_numpy(), oof["pred"].to_numpy()
    metrics, class_table = run_metrics(oof, classes, config["layout"]), per_class_table(labels, preds, classes)
    save_confusion_png(labels, preds, classes, run_dir / "confusion.png")
    save_confusion_png(labels, preds, classes, run_dir / "confusion_normalized.png", normalize=True,
                       title="Out-of-fold confusion matrix (% of each true class; recall on the diagonal)")
    save_per_class_png(class_table, run_dir / "per_class.png")
    pngs = ["confusion.png", "confusion_normalized.png", "per_class.png"]
    if config["layout"] == "mask":
        save_heads_png(labels, preds, classes, run_dir / "heads_confusion.png")
        pngs.append("heads_confusion.png")
    save_learning_curves_png(log, run_dir / "learning_curves.png")
    save_worst_png(worst_predictions(oof, classes, worst), classes, data_dir, run_dir / "worst_predictions.png",
                   seen)
    write_html(run_dir, metrics, config, class_table, pngs + ["learning_curves.png", "worst_predictions.png"])
    return metrics


def main(argv=None):
    args = parse_args(argv)
    config = read_run(args.model_dir, args.data_dir)[0]
    write_run_metrics(args.model_dir, config["classes"], config["layout"])
    metrics = write_report(args.model_dir, args.data_dir, args.worst)
    print(f"OOF macro F1 {metrics['oof_macro_f1']:.4f} -> {Path(args.model_dir) / 'report.html'}")


if __name__ == "__main__":
    run_main(main)
