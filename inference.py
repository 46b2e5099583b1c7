"""Fold-ensemble prediction with test-time augmentation, written as an exact submission file.

    python inference.py --data_dir sample/eval --model_dir model/exp --output_dir output
    python inference.py --model_dir model/exp model/exp2 --tta            # cross-run ensemble, flip TTA
    python inference.py --data_dir test --submission test/sample_submission.csv --model_dir model/exp

Every fold's best.pth (or --folds, --checkpoint last) is run on each decoded batch and the probabilities
averaged (soft voting). OUTPUT/output.csv has info.csv's (or the sample submission's) columns and row
order with the answer filled; OUTPUT/probs.csv holds the averaged probabilities for later blending;
OUTPUT/output_manifest.json names what made them (runs, folds, checkpoint, TTA, time, output.csv's sha256),
so a leaderboard score can be traced back to its runs (python -m kit.compare --outputs OUTPUT lists them).
"""
import argparse
import os

from kit.common import KitParser, UserError, in_range, run_main


def parse_args(argv=None):
    env = os.environ.get
    p = KitParser(prog="python inference.py", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=env("SM_CHANNEL_EVAL", "sample/eval"), help="test folder (info.csv)")
    p.add_argument("--model_dir", nargs="+", default=[env("SM_CHANNEL_MODEL", "model/exp")],
                   help="one or more run folders made by train.py (several = cross-run ensemble)")
    p.add_argument("--output_dir", default=env("SM_OUTPUT_DATA_DIR", "output"), help="where output.csv goes")
    p.add_argument("--submission", default=None, help="sample-submission CSV (default: info.csv)")
    p.add_argument("--folds", type=in_range(int, 0), nargs="+", default=None, help="only these folds (default: all)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint per fold")
    p.add_argument("--tta", action="store_true", help="also predict the horizontally flipped image")
    p.add_argument("--crop", default=None, help="boxes CSV for the test images (python -m kit.crop_faces)")
    p.add_argument("--batch_size", type=in_range(int, 1), default=256,
                   help="images per batch (halved while the GPU runs out of memory)")
    p.add_argument("--num_workers", type=in_range(int, 0), default=min(4, os.cpu_count()), help="data loader processes")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="mixed precision")
    p.add_argument("--decision", default="auto", choices=["auto", "off"], help="auto: answer with the run's "
                   "decision.json rule when its fit applied one (macro F1), off: plain argmax")
    p.add_argument("--people", default="auto", choices=["auto", "on", "off"], help="person-consistent answers "
                   "(kit/people.py): the test pictures grouped into people, each group's gender and age pooled; auto: "
                   "where the run's people.json measured an out-of-fold gain, on: always, off: never")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from kit.common import atomic_write_all
from kit.decision import run_rule
from kit.device import pick_device
from kit.images import center_share, find_bad_images, read_boxes, unreadable_error
from kit.people import embed, read_people
from kit.predict import load_run, predict_files
from kit.runs import finished_folds
from kit.tables import read_csv_checked, read_test_table


def load_ensemble(run_dirs, folds, which, device):
    """[(config, models)] for every run; all runs must predict the same classes."""
    runs = [load_run(d, folds, which, device)[::-1] for d in run_dirs]
    for run_dir, (config, _) in zip(run_dirs[1:], runs[1:]):
        if config["classes"] != runs[0][0]["classes"]:
            raise UserError(f"{run_dir} predicts other classes than {run_dirs[0]}: ensemble runs of one task")
    return runs


def decoding_groups(runs):
    """[(config, models)] with the models of runs that read images alike (size, interpolation, head, memory
    format, centre crop, face boxes) put together, so each group decodes the test images once for all its models."""
    groups = {}
    for config, models in runs:
        key = (tuple(config["input_size"]), config["interpolation"], config["head"], config["channels_last"],
               center_share(config.get("center_crop")), bool(config.get("crop")), config.get("crop_margin"))
        groups.setdefault(key, (config, []))[1].extend(models)
    return list(groups.values())


def check_crops(runs, crop, files):
    """A run trained on face boxes is predicted on the test images' boxes (a --crop file with a box for each of
    files); --crop is for such runs only."""
    if crop:
        read_boxes(crop, files)
    cropped = [config for config, _ in runs if config.get("crop")]
    if cropped and not crop:
        raise UserError(f"{cropped[0]['run_dir']} was trained on face crops ({cropped[0]['crop']}): pass --crop with "
                        "the test images' boxes (python -m kit.crop_faces --data_dir TEST --out boxes.csv)")
    if crop and not cropped:
        trained_on = "--center_crop" if center_share(runs[0][0].get("center_crop")) else "whole pictures"
        raise UserError(f"{runs[0][0]['run_dir']} was trained with {trained_on}, not on face boxes: leave out --crop")


def run_boxes(config, crop, files):
    """The face boxes of the test files for a run trained on them (config.json's crop), else None."""
    return read_boxes(crop, files, config.get("crop_margin", 0.2)) if config.get("crop") else None


def check_submission(frame, expected, probs, classes, layout, source):
    """Refuse a submission whose rows, ids or order differ from the expected file's (info.csv or the
    sample submission), with a NaN/inf probability, or with an answer that is not a class of the run."""
    ids, expected_ids = frame.iloc[:, 0].astype(str).tolist(), expected.iloc[:, 0].astype(str).tolist()
    if len(ids) != len(expected_ids):
        raise UserError(f"{len(ids)} predicted rows but {source} has {len(expected_ids)}; nothing written")
    if ids != expected_ids:
        row = next(i for i, (a, b) in enumerate(zip(ids, expected_ids)) if a != b)
        raise UserError(f"predicted ids are not in {source}'s order (row {row}: {ids[row]} vs {expected_ids[row]}); "
                        "nothing written")
    if not np.isfinite(probs).all():
        raise UserError(f"{int((~np.isfinite(probs)).sum())} predicted probabilities are NaN/inf (first in row "
                        f"{int(np.flatnonzero(~np.isfinite(probs).all(1))[0])}); nothing written")
    answers = frame.iloc[:, 1]
    wrong = ~answers.isin(range(len(classes)) if layout == "mask" else classes)
    if wrong.any():
        raise UserError(f"{int(wrong.sum())} answers are not one of the run's {len(classes)} classes "
                        f"(first: {answers[wrong].iloc[0]}); nothing written")


def write_outputs(output_dir, template, config, probs, submission=None, answers=None, manifest=None):
    """output.csv (template with answers: class index for the mask layout, else class name; argmax unless
    answers are given), probs.csv and output_manifest.json (what made them, with output.csv's sha256), all
    renamed together or none; the submission file (info.csv or the sample submission) is read again, so rows
    that lost its order on the way are never written."""
    id_col, answer_col = template.columns[:2]
    classes = config["classes"]
    if probs.shape != (len(template), len(classes)):
        raise UserError(f"probabilities have shape {probs.shape}, expected {(len(template), len(classes))}; "
                        "nothing written")
    answers = probs.argmax(1) if answers is None else answers
    frame = template.copy()
    frame[answer_col] = answers if config["layout"] == "mask" else [classes[a] for a in answers]
    expected = read_csv_checked(submission, missing_fix="check --submission") if submission else template
    check_submission(frame, expected, probs, classes, config["layout"], submission or "the template")
    prob_frame = pd.concat([template[[id_col]], pd.DataFrame(probs, columns=[f"p{i}" for i in range(len(classes))])],
                           axis=1)
    output_text = frame.to_csv(index=False)
    files = {Path(output_dir) / "probs.csv": lambda tmp: prob_frame.to_csv(tmp, index=False, float_format="%.6f"),
             Path(output_dir) / "output.csv": lambda tmp: Path(tmp).write_text(output_text)}
    if manifest is not None:  # its sha256 tells later whether output.csv changed since
        record = {**manifest, "output": "output.csv", "sha256": hashlib.sha256(output_text.encode()).hexdigest(),
                  "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        files[Path(output_dir) / "output_manifest.json"] = lambda tmp: Path(tmp).write_text(json.dumps(record,
                                                                                                        indent=2))
    atomic_write_all(files)  # renamed together: never an output.csv beside files of another prediction
    return frame


def person_consistent(args, probs, files):
    """(probabilities to answer from, the run's People or None): the test pictures grouped into people and each
    group's gender and age pooled, as the run's people.json says (--people auto: where it gained out of fold)."""
    found = read_people(args.model_dir[0]) if args.people != "off" and len(args.model_dir) == 1 else None
    if args.people == "on":
        if len(args.model_dir) > 1:
            raise UserError("--people on needs one run: each run's people.json was fitted on its own OOF")
        if found is None:
            raise UserError(f"{args.model_dir[0]} has no people.json (a mask-layout run fits it at its end): fit it "
                            f"with python -m kit.people --model_dir {args.model_dir[0]}, or leave out --people on")
        if len(files) < 2:
            raise UserError(f"--people on: {len(files)} test picture, nothing to group: leave out --people on")
    if found is None or len(files) < 2 or (args.people == "auto" and not found.applied):
        return probs, None
    pooled, groups = found.apply(probs, embed(files))
    print(f"person-consistent answers: {len(files)} pictures in {len(set(groups))} groups ({found.heads} pooled); "
          f"{found.reason}")
    return pooled, found


def decision_rule(args, n_classes, people=None):
    """The macro-F1 decision rule to answer with: the one fitted on pooled OOF probabilities when people pooled
    them, else the run's decision.json rule (when its fit applied one) for a single-run ensemble; a cross-run
    ensemble averages runs whose rules were each fitted on their own OOF, so it takes none."""
    if people is not None:
        rule = people.rule()
        return rule if args.decision != "off" and rule.applied else None
    if args.decision == "off" or len(args.model_dir) > 1:
        if args.decision != "off":
            print("decision layer: not applied to a cross-run ensemble (each rule was fitted on its own run's OOF)")
        return None
    return run_rule(args.model_dir[0], n_classes)


def manifest(args, n_models, rule, people):
    """What made a submission: run folders, the folds used, checkpoint, TTA, crop boxes, test folder, decision
    rule, person-consistent answers."""
    return {"run_dirs": [str(Path(d).resolve()) for d in args.model_dir],
            "folds": {str(Path(d).resolve()): finished_folds(d, args.folds) for d in args.model_dir},
            "models": n_models, "checkpoint": args.checkpoint, "tta": args.tta, "crop": args.crop,
            "data_dir": str(args.data_dir), "decision": None if rule is None else {
                "file": str(Path(args.model_dir[0]).resolve() / "decision.json"), "rule": rule.rule,
                "params": rule.params},
            "people": None if people is None else {"file": str(Path(args.model_dir[0]).resolve() / "people.json"),
                                                   "threshold": people.threshold, "heads": people.heads}}


def main(argv=None):
    args = parse_args(argv)
    device = pick_device()
    runs = load_ensemble(args.model_dir, args.folds, args.checkpoint, device)
    template, files, submission_path = read_test_table(args.data_dir, args.submission)
    bad = find_bad_images(files)
    if bad:  # never skipped: a submission must have every row
        raise unreadable_error(bad, "replace them; nothing written", what="test images")
    relative = [os.path.relpath(f, submission_path.parent) for f in files]
    check_crops(runs, args.crop, relative)
    n_models = sum(len(models) for _, models in runs)
    probs = sum(predict_files(models, config, files, device, run_boxes(config, args.crop, relative), args.tta,
                              args.amp, args.batch_size, args.num_workers) * len(models)
                for config, models in decoding_groups(runs)) / n_models
    answered, people = person_consistent(args, probs, files)  # probs.csv keeps the plain probabilities
    rule = decision_rule(args, probs.shape[1], people)
    frame = write_outputs(args.output_dir, template, runs[0][0], probs, submission_path,
                          answered.argmax(1) if rule is None else rule.predict(answered),
                          manifest(args, n_models, rule, people))
    counts = frame.iloc[:, 1].value_counts().sort_index()
    print(f"{len(frame)} predictions from {n_models} models{' with flip TTA' if args.tta else ''}"
          f"{'' if rule is None else f', decision layer {rule.rule} {rule.params}'} -> "
          f"{Path(args.output_dir) / 'output.csv'}\nanswer counts: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_main(main)
