"""The run folder, written by train.py and read by everything after it (docs/DESIGN.md, "The run folder").

    config = read_config("model/exp")        # config.json, checked for the kit version, one-line errors
    start_run(run_dir, config, table, bad)    # config.json, folds.csv, bad_images.csv of a new run
    save_epoch(...), resume_fold(...)         # a fold's best/last checkpoints; an interrupted fold's state
    finish_fold(run_dir, fold, log)          # log.csv, TensorBoard, fold{i}/oof.csv (marks the fold finished)
    metrics = write_run_metrics(run_dir, classes, layout)   # oof.csv, metrics.json of the finished folds

model_dir/NAME/: config.json, folds.csv, fold{i}/{best,last}.pth, fold{i}/oof.csv (marks the fold finished),
oof.csv, metrics.json, log.csv, tb/ (TensorBoard), report.html and its PNGs, bad_images.csv.
"""
import argparse
import json
import os
import platform
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kit.checkpoints import load_last, save_checkpoint
from kit.common import UserError, atomic_write
from kit.images import center_share
from kit.metrics import run_metrics
from kit.tables import PSEUDO_FOLD

KIT_VERSION = 1  # of the run-folder format (config.json, checkpoints): bumped when it changes


def read_config(run_dir, fix="--model_dir takes a run folder made by train.py"):
    """config.json of a run folder, made by this kit version; one line for a missing, corrupt or foreign file."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} not found: {fix}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is not readable JSON ({type(err).__name__}): the run folder is damaged; "
                        "train it again or restore the file") from None
    if not isinstance(config, dict) or "classes" not in config:
        raise UserError(f"{path} is not a train.py config (no classes): {fix}")
    if config.get("kit_version") != KIT_VERSION:
        raise UserError(f"{run_dir} was made by kit version {config.get('kit_version')}, this is {KIT_VERSION}: "
                        "train it again with this kit")
    try:  # a hand-edited crop fails here, before any script writes anything
        center_share(config.get("center_crop"))
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    return config


def write_json(path, data):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str), encoding="utf-8"))


def library_versions():
    import timm  # imported here: kit.report and the other readers of run folders do without it
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "pandas": pd.__version__, "numpy": np.__version__}


def make_config(settings, classes, layout, model_config, run_dir):
    """Everything a later step needs, so inference never asks again (plain JSON types only, so checkpoints
    load with torch.load(weights_only=True)): the settings, classes, layout and the model's input."""
    return json.loads(json.dumps({**settings, "run_dir": str(run_dir), "classes": classes, "layout": layout,
                                  "input_size": model_config["input_size"], "mean": model_config["mean"],
                                  "std": model_config["std"], "interpolation": model_config["interpolation"],
                                  "kit_version": KIT_VERSION, "versions": library_versions()}, default=str))


def increment_path(path):
    """model/exp -> model/exp2, exp3, ... when taken (the baseline's run-folder naming)."""
    path = Path(path)
    if not path.exists():
        return path
    taken = [int(m.group(1) or 1) for d in path.parent.glob(f"{path.name}*")
             if (m := re.fullmatch(re.escape(path.name) + r"(\d*)", d.name))]
    return path.with_name(f"{path.name}{max(taken, default=1) + 1}")


def start_run(run_dir, config, table, bad):
    """config.json, folds.csv, bad_images.csv and pseudo_labels.csv (test images trained on) of a new run."""
    write_json(Path(run_dir) / "config.json", config)
    atomic_write(Path(run_dir) / "folds.csv", lambda tmp: table.to_csv(tmp, index=False))
    pseudo = table[table["fold"] == PSEUDO_FOLD]
    if len(pseudo):
        pseudo = pseudo[["path", "label"]].assign(name=[config["classes"][i] for i in pseudo["label"]],
                                                  teacher_fold=pseudo["teacher_fold"], confidence=pseudo["confidence"])
        atomic_write(Path(run_dir) / "pseudo_labels.csv", lambda tmp: pseudo.to_csv(tmp, index=False))
    if bad:
        atomic_write(Path(run_dir) / "bad_images.csv",
                     lambda tmp: pd.DataFrame(bad, columns=["path", "reason"]).to_csv(tmp, index=False))


def resume_settings(args, given, safe):
    """(settings, table) of the run folder named by args.resume: its own settings, plus those of the names given
    on the command line that are safe to change; any other given setting that differs is refused."""
    saved = read_config(args.resume, "--resume takes a run folder made by train.py")
    if args.config:
        raise UserError("--resume takes the run's own settings, not a --config file: name the safe flags instead")
    refused = sorted(k for k in given - {"resume", "config", *safe} if saved.get(k) != vars(args)[k])
    if refused:
        raise UserError(f"--resume keeps the run's settings; {', '.join('--' + k for k in refused)} cannot change "
                        f"(only {', '.join('--' + k for k in safe)} can): start a new run instead")
    # a flag newer than the run takes its default (what the run was trained with: new flags default to off)
    settings = {**vars(args), **saved, **{k: vars(args)[k] for k in given & set(safe)}, "resume": str(args.resume),
                "run_dir": str(args.resume)}
    return argparse.Namespace(**settings), read_folds(args.resume)


def read_folds(run_dir):
    """folds.csv: the table a run trained on."""
    return pd.read_csv(Path(run_dir) / "folds.csv", dtype={"profile": str}, keep_default_na=False)


# ---- checkpoints ----------------------------------------------------------------------------------
def save_epoch(fold_dir, t, eval_model, fold_cfg, progress, scored):
    """last.pth (weights + resume state) and last_epoch_oof.csv every epoch; best.pth and best_oof.csv when
    validation improved (stale 0). scored: (validation rows, their probabilities) of this epoch."""
    epoch, best_f1, stale, log = progress
    if stale == 0:
        save_checkpoint(fold_dir / "best.pth", eval_model, {**fold_cfg, "epoch": epoch + 1, "val_f1": log[-1]["val_f1"]},
                        {})
        write_oof(fold_dir / "best_oof.csv", *scored)
    write_oof(fold_dir / "last_epoch_oof.csv", *scored)  # the OOF no epoch was chosen on: no selection optimism
    save_checkpoint(fold_dir / "last.pth", t.model, fold_cfg, {
        "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict() if t.scheduler else None,
        "scaler": t.scaler.state_dict(), "ema": t.ema.state_dict() if t.ema else None, "epoch": epoch,
        "best_f1": best_f1, "stale": stale, "log": log})


def resume_fold(path, t, config, rank):
    """(next epoch, best F1, stale epochs, log rows): from last.pth when the fold was interrupted, loaded into
    the fold's objects. A new --epochs keeps the fresh schedule (timm's lr is a function of the step)."""
    if not path.is_file():
        return 0, -1.0, 0, []
    state = load_last(path, config)
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    if t.scheduler is not None and state["config"].get("epochs") == config["epochs"]:
        t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None:
        t.ema.load_state_dict(state["ema"])
    if rank == 0:
        print(f"fold {state['config'].get('fold')}: resuming at epoch {state['epoch'] + 2}")
    return state["epoch"] + 1, state["best_f1"], state["stale"], state["log"]


# ---- per-fold outputs -----------------------------------------------------------------------------
def fold_finished(run_dir, fold):
    return (Path(run_dir) / f"fold{fold}" / "oof.csv").is_file()


def finished_folds(run_dir, folds=None):
    """The finished folds of a run (those of folds, if given); a fold named but unfinished is one error line."""
    found = sorted(int(p.parent.name[4:]) for p in Path(run_dir).glob("fold*/oof.csv") if p.parent.name[4:].isdigit())
    unfinished = [f for f in folds or [] if f not in found]
    if unfinished:
        raise UserError(f"fold {unfinished[0]} of {run_dir} did not finish (no fold{unfinished[0]}/oof.csv): "
                        f"continue it with python train.py --resume {run_dir}, or leave it out of --folds")
    if not found:
        raise UserError(f"{run_dir} has no finished fold (fold*/oof.csv): train first, or --resume it")
    return [f for f in found if folds is None or f in folds]


def finish_fold(run_dir, fold, log):
    """log.csv and TensorBoard rows of the fold, then its best OOF becomes fold{i}/oof.csv: the fold is done."""
    write_log(run_dir, log)
    fold_dir = Path(run_dir) / f"fold{fold}"
    os.replace(fold_dir / "best_oof.csv", fold_dir / "oof.csv")


def write_oof(path, rows, probs):
    """path, profile, fold, label, pred, p0..p{C-1} for each validation image."""
    oof = rows[["path", "profile", "fold", "label"]].assign(pred=probs.argmax(1))
    oof = pd.concat([oof.reset_index(drop=True), pd.DataFrame(probs, columns=[f"p{i}" for i in range(
        probs.shape[1])])], axis=1)
    atomic_write(path, lambda tmp: oof.to_csv(tmp, index=False, float_format="%.6g"))  # %g keeps tiny probabilities apart


def write_log(run_dir, fold_log):
    """log.csv holds one row per epoch per fold; a fold's rows are replaced when it is retrained."""
    path = Path(run_dir) / "log.csv"
    log = pd.DataFrame(fold_log)
    if path.is_file():
        old = pd.read_csv(path)
        log = pd.concat([old[old["fold"] != fold_log[0]["fold"]], log]).sort_values(["fold", "epoch"])
    atomic_write(path, lambda tmp: log.to_csv(tmp, index=False))
    tensorboard_log(run_dir, fold_log)


def tensorboard_log(run_dir, fold_log):
    from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import
    with SummaryWriter(Path(run_dir) / "tb" / f"fold{fold_log[0]['fold']}") as writer:
        for row in fold_log:
            for key in ("train_loss", "train_f1", "val_f1", "val_acc", "lr", "img_s"):
                writer.add_scalar(key, row[key], row["epoch"])


def collect_oof(run_dir, name="oof.csv"):
    """fold{i}/oof.csv of every finished fold -> one frame, in fold order; name="last_epoch_oof.csv": their last
    epochs' predictions instead (None for a run older than that file)."""
    finished = sorted(Path(run_dir).glob("fold*/oof.csv"))
    if not finished:
        raise UserError(f"{run_dir} has no finished fold (fold*/oof.csv): train first")
    paths = [p.with_name(name) for p in finished]
    if not all(p.is_file() for p in paths):
        return None
    return pd.concat([pd.read_csv(p, dtype={"profile": str}, keep_default_na=False) for p in paths],
                     ignore_index=True)


def write_run_metrics(run_dir, classes, layout):
    """oof.csv and metrics.json of a run's finished folds; returns the metrics."""
    run_dir = Path(run_dir)
    oof = collect_oof(run_dir)
    atomic_write(run_dir / "oof.csv", lambda tmp: oof.to_csv(tmp, index=False, float_format="%.6g"))
    last = collect_oof(run_dir, "last_epoch_oof.csv")  # of the same folds: another process may finish one meanwhile
    last = None if last is None else last[last["fold"].isin(oof["fold"].unique())]
    metrics = run_metrics(oof, classes, layout, last)
    earlier = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    metrics.update({k: v for k, v in earlier.items() if k == "people"})  # kit/people.py's, refitted at a run's end
    atomic_write(run_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return metrics
