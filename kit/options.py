"""Argument groups that train.py shares with other commands, built from the standard library alone: a command
answers --help and a mistyped flag before it imports torch.

    add_data_args(parser)     # --layout ... --relabel_list: what dataset.py's table is built from
    add_run_args(group, safe)  # --model_dir, --name, --seed, ... --resume: where and how a run runs, not what it learns
    add_speed_args(group)     # --num_workers, --cache, --cache_dir, --feature_cache: kit.speed's settings
    check_launch(args)        # settings that torchrun cannot run
"""
import argparse
import os

from kit.common import UserError, in_range
from kit.labels import AGE_BOUNDS


def add_data_args(parser):
    """The data settings of train.py and dataset.py: layout options, labels, folds, corrections, pseudo-labels."""
    parser.add_argument("--layout", default="auto", help="auto (detected from --data_dir) or one of dataset.py's LAYOUTS: mask, csv, json, folder")
    parser.add_argument("--ann_file", default=None, help="annotation CSV/JSON for csv/json layouts")
    parser.add_argument("--path_col", default="path", help="image path column/field (csv, json)")
    parser.add_argument("--label_col", default="label", help="label column/field (csv, json)")
    parser.add_argument("--group_col", default=None, help="group column kept in one fold (csv, json)")
    parser.add_argument("--age_bounds", type=in_range(int, 1), nargs=2, default=list(AGE_BOUNDS),
                        help="age group edges of the labels (the competition's rule)")
    parser.add_argument("--train_age_bounds", type=in_range(int, 1), nargs=2, default=None,
                        help="mask layout: train on other age-group edges (e.g. 30 58); OOF, reports and the "
                             "submission stay on --age_bounds")
    parser.add_argument("--folds", type=in_range(int, 1), default=5, help="K folds; 1 = one grouped holdout")
    parser.add_argument("--val_ratio", type=in_range(float, 0, 1, True, True), default=0.2, help="holdout share when --folds 1")
    parser.add_argument("--split", default="group", choices=["group", "random"],
                        help="group keeps each person in one fold; random leaks (for comparison only)")
    parser.add_argument("--pseudo_labels", default=None, help="a teacher run folder with this run's folds: the test "
                        "images its fold-k model labels with at least --pseudo_threshold join fold k's training set "
                        "(never validation; never a model that saw fold k's people)")
    parser.add_argument("--pseudo_dir", default=os.environ.get("SM_CHANNEL_EVAL", "sample/eval"),
                        help="the test folder (info.csv) whose images --pseudo_labels labels")
    parser.add_argument("--pseudo_threshold", type=in_range(float, 0, 1, low_open=True), default=0.9,
                        help="least predicted probability of a pseudo-label")
    parser.add_argument("--drop_list", default=None, help="CSV of images to leave out (path or profile)")
    parser.add_argument("--relabel_list", default=None, help="CSV of corrections (path|profile[,image],field,value)")


def add_run_args(group, safe_on_resume):
    """train.py's run and system settings (an argparse group): the run folder, seed, fold, precision, speed, the
    end of the run, --resume (which only safe_on_resume may accompany) and --fold_per_device."""
    env = os.environ.get
    group.add_argument("--model_dir", default=env("SM_MODEL_DIR", "model"), help="where run folders are made")
    group.add_argument("--name", default="exp", help="run folder name (exp, exp2, ... if taken)")
    group.add_argument("--seed", type=int, default=42, help="fixes folds, init, order and augmentation")
    group.add_argument("--fold", type=in_range(int, 0), default=None, help="train only this fold")
    group.add_argument("--valid_batch_size", type=in_range(int, 1), default=128, help="validation batch size")
    group.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="mixed precision")
    group.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_speed_args(group)
    group.add_argument("--log_interval", type=in_range(int, 1), default=20, help="batches between progress updates")
    group.add_argument("--decision", default="prior", choices=["prior", "prior_age", "off"], help="macro-F1 decision "
                       "layer fitted on OOF (kit/decision.py), applied by inference.py where cross-fitting shows a gain")
    group.add_argument("--people", default="auto", choices=["auto", "off"], help="mask layout: fit person-consistent "
                       "answers on OOF at the end (kit/people.py), applied by inference.py where they gain out of fold")
    group.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                       help="end with kit.report's pictures and report.html (a few seconds)")
    group.add_argument("--resume", default=None, help="run folder to continue (finished folds are kept; "
                       f"{', '.join('--' + k for k in safe_on_resume)} may be given with it)")
    group.add_argument("--fold_per_device", action="store_true", help="one process per GPU, each its own folds")


def add_speed_args(group):
    """The speed settings of train.py (an argparse group): workers, image cache, feature cache."""
    group.add_argument("--num_workers", type=in_range(int, -1), default=-1, help="data loader processes, kept across epochs "
                       "(-1: none on a CPU, where the model needs every core; up to 8 per GPU)")
    group.add_argument("--cache", default="auto", choices=["auto", "memory", "disk", "none"],
                       help="keep decoded images at input size: memory (RAM, this run only), disk (--cache_dir, "
                            "kept), auto (memory if they fit in a quarter of RAM and give the same pixels)")
    group.add_argument("--cache_dir", default=None, help="folder of --cache disk (default: TMPDIR/kit-image-cache)")
    group.add_argument("--feature_cache", action=argparse.BooleanOptionalAction, default=True,
                       help="run the frozen layers once per image (and its mirror for --augmentation flip) and train "
                            "the rest on their stored output, with the same batches and results: --freeze_backbone "
                            "(any model), --freeze_blocks (EfficientNet family); other augmentations, mixup/cutmix, "
                            "--compile, torchrun, or outputs over a quarter of RAM run the whole model every epoch")


def check_launch(args):
    """Settings that do not work under torchrun fail before anything starts."""
    if args.sampler == "weighted" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("--sampler weighted is not supported with torchrun; use --criterion weighted_ce")
    if args.fold_per_device and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("--fold_per_device starts its own processes: run it with python, not torchrun")
