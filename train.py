"""K-fold training with person-grouped folds, out-of-fold scores and one run folder per experiment.

    python train.py --model tf_efficientnet_lite0 --epochs 10 --resize 256 192
    python train.py --config recipes/cpu_quick.yaml --fold 0     # a recipe, one fold; any argument from YAML/JSON
    python train.py --resume model/exp3                          # continue an interrupted run
    torchrun --nproc_per_node 2 train.py ...                     # DistributedDataParallel

The run folder (model_dir/name, numbered if it exists) gets config.json, folds.csv, fold{i}/best.pth
and last.pth, fold{i}/oof.csv, oof.csv, metrics.json, log.csv, report.html and TensorBoard events:
everything inference.py needs. See --help for every argument.

Reading order: settings (build_parser), main() (the whole job), train_fold() (one fold and its epoch loop),
train_one_epoch() (the step). Machinery lives in kit/: speed.py, runs.py (the run folder), distributed.py.
"""
import argparse
import os
import sys

from kit.common import KitParser, UserError, float_list, given_names, in_range, read_settings_file, run_main
from kit.options import add_data_args, add_run_args, check_launch

OPTIMIZERS = {"sgd": lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
              "adam": lambda p, lr, wd: torch.optim.Adam(p, lr=lr, weight_decay=wd),
              "adamw": lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd)}  # p: param_groups()
SCHEDULERS = {"cosine": "cosine", "step": "step", "plateau": "plateau", "none": None}  # ours -> timm's
# what --resume may change: how long and how fast, never what is learned from what
SAFE_ON_RESUME = ("epochs", "patience", "fold", "num_workers", "cache", "cache_dir", "log_interval", "report", "decision", "people",
                  "valid_batch_size")


def build_parser():
    env = os.environ.get
    p = KitParser(prog="python train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML/JSON file of argument defaults (the command line wins)")
    data = p.add_argument_group("data")
    data.add_argument("--data_dir", default=env("SM_CHANNEL_TRAIN", "sample/train"), help="training data folder")
    add_data_args(data)
    data.add_argument("--dataset", dest="layout", help="alias of --layout (the baseline's name)")
    data.add_argument("--crop", default=None, help="boxes CSV from python -m kit.crop_faces: train on the crops")
    data.add_argument("--crop_margin", type=in_range(float, 0), default=0.2, help="box widened by this share")
    data.add_argument("--center_crop", type=in_range(float, 0, 1, low_open=True), nargs=2, default=None,
                      metavar=("H", "W"), help="keep the centre H x W share of each image (train, test); default "
                      "0.625 0.667 on the mask layout without --crop (a larger face), else 1 1 (whole images)")
    data.add_argument("--skip_bad_images", action="store_true", help="drop unreadable images instead of stopping")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="tf_efficientnet_lite0", help="any timm.list_models() name")
    model.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="ImageNet weights")
    model.add_argument("--weights", default=None, help="local weight file (offline); implies pretrained")
    model.add_argument("--head", default="auto", choices=["auto", "single", "multi"],
                       help="single (C-way), multi (mask 3 + gender 2 + age 3 logits), auto: multi for the mask "
                            "layout (measured better there), else single")
    model.add_argument("--resize", type=in_range(int, 1), nargs="+", help="input H [W] (default: the model's)")
    model.add_argument("--freeze_backbone", action="store_true", help="train the head only")
    model.add_argument("--freeze_blocks", type=in_range(int, 0), default=0, help="keep the stem and the first N "
                       "block groups pretrained: faster steps (no gradient over the largest maps), less to overfit")
    loss = p.add_argument_group("loss")
    loss.add_argument("--criterion", default="ce", help="ce, label_smoothing, focal, f1, weighted_ce or a+b")
    loss.add_argument("--criterion_weights", type=float_list, default=None, help="weights of a+b criteria: 0.7,0.3")
    loss.add_argument("--head_weights", type=float_list, default=None, help="multi head: weights of mask,gender,age")
    loss.add_argument("--smoothing", type=in_range(float, 0, 1, high_open=True), default=0.1, help="label smoothing")
    loss.add_argument("--focal_gamma", type=in_range(float, 0), default=2.0, help="focal loss gamma")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=in_range(int, 1), default=10, help="epochs per fold")
    opt.add_argument("--batch_size", type=in_range(int, 1), default=64, help="training batch size")
    opt.add_argument("--accum_steps", type=in_range(int, 1), default=1, help="batches per optimizer step")
    opt.add_argument("--optimizer", default="adamw", help=f"one of: {', '.join(OPTIMIZERS)}")
    opt.add_argument("--lr", type=in_range(float, 0, low_open=True), default=1e-3, help="learning rate of the head")
    opt.add_argument("--backbone_lr_scale", type=in_range(float, 0), default=1.0, help="backbone lr = lr * this")
    opt.add_argument("--weight_decay", type=in_range(float, 0), default=0.01, help="weight decay")
    opt.add_argument("--scheduler", default="cosine", help=f"one of: {', '.join(SCHEDULERS)}")
    opt.add_argument("--warmup_epochs", type=in_range(int, 0), default=1, help="linear warm-up epochs (cosine, step)")
    opt.add_argument("--lr_decay_step", type=in_range(int, 1), default=20, help="epochs between lr halvings (step)")
    opt.add_argument("--sampler", default="none", choices=["none", "weighted"], help="weighted: balance classes")
    opt.add_argument("--ema", action="store_true", help="evaluate and save an EMA of the weights")
    opt.add_argument("--ema_decay", type=in_range(float, 0, 1, True, True), default=0.998,
                     help="EMA decay per update, reached after a warm-up (1 - (1 + update) ** -2/3 until then)")
    opt.add_argument("--patience", type=in_range(int, 0), default=0, help="stop a fold after N epochs without gain")
    aug = p.add_argument_group("augmentation")
    aug.add_argument("--augmentation", default="flip", help="base, flip, strong, randaugment, trivialaugment")
    aug.add_argument("--mixup", type=in_range(float, 0), default=0.0, help="mixup alpha (0 = off; even --batch_size)")
    aug.add_argument("--cutmix", type=in_range(float, 0), default=0.0, help="cutmix alpha (0 = off; even --batch_size)")
    aug.add_argument("--half_cutmix", type=in_range(float, 0, 1), default=0.0, help="share of images whose left or "
                     "right half comes from another image (faces stay whole halves)")
    aug.add_argument("--mix_rare", action="store_true", help="--half_cutmix takes the other half from the rarest classes")
    add_run_args(p.add_argument_group("run and system"), SAFE_ON_RESUME)
    return p


def parse_args(argv=None):
    """The settings: command line over --config file over defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**read_settings_file(args.config, parser))
        args = parser.parse_args(argv)
    if (args.mixup or args.cutmix) and args.half_cutmix:
        raise UserError("--half_cutmix replaces --mixup/--cutmix: use one of them")
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        raise UserError(f"--mixup/--cutmix pair images: use an even --batch_size, not {args.batch_size}")
    if args.resize and len(args.resize) > 2:
        raise UserError("--resize takes H or H W")
    check_launch(args)
    return args


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score
from timm.data import Mixup
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DistributedSampler, RandomSampler, WeightedRandomSampler
from tqdm import tqdm

from dataset import (MASK_CENTER_CROP, HalfCutMix, build_transform, fold_rows, rarest_classes, summarize,
                     table_from_args, training_labels)
from kit import finish, runs, speed
from kit.common import lookup
from kit.device import amp_dtype, autocast, out_of_memory, to_device
from kit.distributed import finish_distributed, from_rank0, gather_predictions, launch_fold_per_device, setup_distributed
from kit.images import ImageDataset, image_boxes, without_unreadable
from kit.predict import predict_probs
from kit.pseudo import with_pseudo_labels
from loss import check_finite, create_criterion
from model import (check_input_size, create_model, data_config, early_parameters, keep_frozen_statistics,
                   param_groups, to_probs)


def check_args(cfg, table):
    """Settings that cannot work with this data fail before the run folder is made."""
    lookup(OPTIMIZERS, cfg.optimizer, "optimizer"), lookup(SCHEDULERS, cfg.scheduler, "scheduler")
    if cfg.layout != "mask" and (cfg.head == "multi" or cfg.train_age_bounds):
        raise UserError(f"--{'head multi' if cfg.head == 'multi' else 'train_age_bounds'} needs the mask layout "
                        f"(mask/gender/age), not {cfg.layout}; leave it out")
    if cfg.fold is not None and not 0 <= cfg.fold < cfg.folds:
        raise UserError(f"--fold {cfg.fold} is not one of the {cfg.folds} folds (0..{cfg.folds - 1})")
    if cfg.freeze_backbone and (cfg.freeze_blocks or cfg.backbone_lr_scale != 1.0):
        raise UserError("--freeze_backbone freezes every block, so --freeze_blocks and --backbone_lr_scale conflict "
                        "with it: leave them out")
    if cfg.crop and cfg.pseudo_labels:
        raise UserError("--pseudo_labels with --crop is not supported: the boxes file has no test images")
    speed.check_cache(cfg, transform_of(cfg))  # a cache that would change the pictures is refused
    image_boxes(table["path"], cfg.crop, cfg.crop_margin, cfg.center_crop)  # a bad boxes file fails now, not in fold 0
    make_criterion(cfg, len(cfg.classes), table["label"])  # a bad --criterion fails before any image is read


# ---- the run ------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_settings(args, run_dir):
    """(settings, table, notes) of a new run: the table, the backbone's input and every check; nothing written."""
    table, classes, notes, layout = table_from_args(args)
    auto = {"head": "multi" if layout == "mask" else "single"} if args.head == "auto" else {}
    if args.center_crop is None and layout == "mask" and not args.crop:  # both measured better there (README)
        auto["center_crop"] = list(MASK_CENTER_CROP)
    args = argparse.Namespace(**{**vars(args), **auto})
    model = create_model(args.model, len(classes), args.head, pretrained=args.pretrained or bool(args.weights),
                         weights=args.weights)
    model_config = data_config(model.backbone, args.resize)
    check_input_size(model, args.model, model_config["input_size"], data_config(model.backbone)["input_size"])
    early_parameters(model, args.freeze_blocks)  # more blocks than the backbone has fail now
    cfg = argparse.Namespace(**runs.make_config(vars(args), classes, layout, model_config, run_dir))
    check_args(cfg, table)
    if cfg.pseudo_labels:  # each fold's pseudo-labels from the teacher's model of that fold (kit/pseudo.py)
        table, notes = with_pseudo_labels(table, notes, classes, cfg.pseudo_labels, cfg.pseudo_dir,
                                          cfg.pseudo_threshold)
    return cfg, table, notes


def new_run(args, rank):
    """(settings, table) of a new run, its folder started with config.json and folds.csv."""
    run_dir = from_rank0(runs.increment_path(Path(args.model_dir) / args.name) if rank == 0 else None)
    cfg, table, notes = run_settings(args, run_dir)
    table, bad = without_unreadable(table, cfg.data_dir, speed.warm_cache(table, cfg, transform_of(cfg), rank),
                                    cfg.skip_bad_images)
    if rank == 0:
        print(f"layout: {cfg.layout}\n{summarize(table, cfg.classes, notes)}\nrun folder: {run_dir}")
        runs.start_run(run_dir, vars(cfg), table, bad)
    return cfg, table


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    seed_everything(args.seed)
    if args.resume:
        cfg, table = runs.resume_settings(args, given_names(build_parser, argv), SAFE_ON_RESUME)
        check_args(cfg, table)
    else:
        cfg, table = new_run(args, rank)
    run_dir = Path(cfg.run_dir)
    folds = [cfg.fold] if cfg.fold is not None else sorted(int(f) for f in table["fold"].unique() if f >= 0)
    if cfg.fold_per_device and torch.cuda.device_count() > 1 and cfg.fold is None:
        launch_fold_per_device(__file__, run_dir, folds, vars(cfg))  # one process per GPU, each its own folds
        folds = []
    todo = [fold for fold in folds if not runs.fold_finished(run_dir, fold)]
    if rank == 0:
        print(f"device: {device}" + "".join(f"\nfold {f}: finished earlier, kept" for f in folds if f not in todo))
    if todo and args.resume:  # a new run's images were decoded (into the cache) by new_run's check
        speed.warm_cache(table, cfg, transform_of(cfg), rank)
    for fold in todo:
        try:  # the first fold's first epoch times the run: an estimate of its whole length is printed
            log = train_fold(fold, table, cfg, device, rank, world, len(todo) if fold == todo[0] else 0)
        except torch.OutOfMemoryError:
            raise out_of_memory(cfg.batch_size, cfg.valid_batch_size, cfg.accum_steps, cfg.model, cfg.input_size) from None
        except KeyboardInterrupt:
            raise UserError(f"interrupted in fold {fold}; continue with: python train.py --resume {run_dir}") from None
        if rank == 0:
            runs.finish_fold(run_dir, fold, log)
    if rank == 0:  # oof.csv, metrics.json, decision.json, people.json, report.html: kit/finish.py
        print(finish.finish_run(run_dir, vars(cfg)))
    finish_distributed(world)


# ---- one fold -------------------------------------------------------------------------------------
def transform_of(cfg, train=True):
    """The run's augmentation preset (dataset.py) for training, or its plain resize for evaluation."""
    return build_transform(cfg.augmentation, cfg.input_size, cfg.interpolation, train=train)


def make_loader(rows, cfg, train, rank=0, world=1):
    """DataLoader over table rows; training shuffles (or class-balances), validation keeps order."""
    files = [str(Path(cfg.data_dir) / p) for p in rows["path"]]
    boxes = image_boxes(rows["path"], cfg.crop, cfg.crop_margin, cfg.center_crop)
    transform = transform_of(cfg, train)
    labels = training_labels(rows, cfg.train_age_bounds) if train else rows["label"].to_numpy()
    dataset = ImageDataset(files, labels, transform, boxes, draft_size=(cfg.input_size[2], cfg.input_size[1]),
                           read=speed.image_reader(cfg, len(rows), transform))
    sampler, batch = None, cfg.batch_size if train else cfg.valid_batch_size
    if train and world > 1:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=cfg.seed)
    elif train and cfg.sampler == "weighted":
        counts = np.bincount(labels, minlength=len(cfg.classes))
        sampler = WeightedRandomSampler(1.0 / counts[labels], len(rows), generator=torch.Generator())
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator())
    elif world > 1:  # each rank scores a strided share; gather_predictions puts them back in order
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    # a last batch of one image breaks BatchNorm in training mode; mixup pairs images, so needs whole batches
    drop_last = train and len(dataset) > batch and ((cfg.mixup or cfg.cutmix) > 0 or len(dataset) % batch == 1)
    return speed.make_data_loader(dataset, sampler, batch, cfg, drop_last)


def make_criterion(cfg, num_classes, labels):
    """The loss named by --criterion with its options; class counts come from the training labels."""
    return create_criterion(cfg.criterion, num_classes, class_counts=np.bincount(labels, minlength=num_classes),
                            weights=cfg.criterion_weights, head=cfg.head, head_weights=cfg.head_weights,
                            smoothing=cfg.smoothing, gamma=cfg.focal_gamma)


@dataclass
class Fold:
    """One fold's training objects, built by build_fold; net is what runs (compiled, DDP or the feature head)."""
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    ema: object
    mixup: object
    updates_per_epoch: int
    files: list


def build_fold(cfg, train_rows, batches_per_epoch, device, world=1):
    """Model, optimizer, scheduler (stepped per optimizer update), loss, EMA and mixup of one fold."""
    model = create_model(cfg.model, len(cfg.classes), cfg.head, pretrained=cfg.pretrained or bool(cfg.weights),
                         weights=cfg.weights).to(device)
    model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
    groups = param_groups(model, cfg.lr, cfg.backbone_lr_scale, cfg.freeze_backbone, cfg.freeze_blocks)
    optimizer = OPTIMIZERS[cfg.optimizer](groups, cfg.lr, cfg.weight_decay)
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.accum_steps)
    scheduler = SCHEDULERS[cfg.scheduler] and create_scheduler_v2(
        optimizer, SCHEDULERS[cfg.scheduler], num_epochs=cfg.epochs, decay_epochs=cfg.lr_decay_step, decay_rate=0.5,
        warmup_epochs=min(cfg.warmup_epochs, cfg.epochs - 1), warmup_lr=cfg.lr / 100, min_lr=cfg.lr / 100,
        step_on_epochs=cfg.scheduler == "plateau", updates_per_epoch=updates_per_epoch)[0]
    labels = training_labels(train_rows, cfg.train_age_bounds)
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, num_classes=len(cfg.classes),
                  label_smoothing=0.0) if (cfg.mixup or cfg.cutmix) else None
    if cfg.half_cutmix:
        rare = rarest_classes(labels, len(cfg.classes)) if cfg.mix_rare else []
        mixup = HalfCutMix(cfg.half_cutmix, len(cfg.classes), rare)
    net = torch.compile(model) if cfg.compile else model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=None if device.index is None else [device.index])
    return Fold(model, net, optimizer, scheduler,
                torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg.amp) == torch.float16),
                make_criterion(cfg, len(cfg.classes), labels).to(device),
                # warm-up: the average follows the model early on, else a few hundred updates stay near the init
                ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None, mixup,
                updates_per_epoch, [str(Path(cfg.data_dir) / p) for p in train_rows["path"]])


def train_fold(fold, table, cfg, device, rank=0, world=1, folds_to_time=0):
    """Train one fold: saves best/last checkpoints and fold{i}/best_oof.csv; returns the fold's log rows. With
    folds_to_time, its first epoch's time gives the estimate of that many folds' epochs."""
    fold_dir = Path(cfg.run_dir) / f"fold{fold}"
    train_rows, val_rows = fold_rows(table, fold)  # corrections and pseudo-labels change training rows only
    seed_everything(cfg.seed + fold)  # a fold's start does not depend on the folds before it
    train_loader, val_loader = (make_loader(r, cfg, t, rank, world) for r, t in ((train_rows, True), (val_rows, False)))
    t = build_fold(cfg, train_rows, len(train_loader), device, world)
    epoch_sampler, eval_net = train_loader.sampler, None
    if speed.uses_feature_cache(cfg, t.model, world, len(table)):  # frozen layers run once per image, not per epoch
        (t.net, eval_net), train_loader, val_loader = speed.feature_training(
            t, (train_rows, val_rows), (train_loader, val_loader), cfg, device, lambda rows: make_loader(rows, cfg, False))
    start, best_f1, stale, log = runs.resume_fold(fold_dir / "last.pth", t, vars(cfg), rank)
    to_estimate, started = folds_to_time * cfg.epochs - start if folds_to_time else 0, time.perf_counter()
    for epoch in range(start, cfg.epochs):
        epoch_seed = speed.mixed_seed(cfg.seed, fold, epoch, rank)  # torchrun ranks augment differently
        seed_everything(epoch_seed)  # each epoch a function of (seed, fold, epoch)
        epoch_sampler.set_epoch(epoch_seed, epoch)
        loss, train_f1, rate = train_one_epoch(t, train_loader, cfg, device, epoch, rank == 0,
                                               to_estimate if epoch == start else 0)
        eval_model = t.ema.module if t.ema is not None else t.model
        probs, index = predict_probs(eval_net or eval_model, val_loader, cfg.head, device, cfg.amp, cfg.channels_last)
        probs = gather_predictions(probs, index, world)
        val_f1 = float(f1_score(val_rows["label"], probs.argmax(1), average="macro"))
        if t.scheduler is not None:
            t.scheduler.step(epoch + 1, val_f1)
        log.append({"fold": fold, "epoch": epoch + 1, "train_loss": loss, "train_f1": train_f1, "val_f1": val_f1,
                    "val_acc": float((probs.argmax(1) == val_rows["label"].to_numpy()).mean()),
                    "lr": t.optimizer.param_groups[0]["lr"], "img_s": rate * world})  # DDP ranks step together
        improved = val_f1 > best_f1
        best_f1, stale = (val_f1, 0) if improved else (best_f1, stale + 1)
        if rank == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in log[-1].items())
                  + (" *" if improved else ""))
            runs.save_epoch(fold_dir, t, eval_model, {**vars(cfg), "fold": fold}, (epoch, best_f1, stale, log),
                            (val_rows, probs))
            if to_estimate and epoch == start:  # training and validation both timed: the estimate refined
                print(speed.estimate(cfg, device, time.perf_counter() - started, to_estimate))
        if cfg.patience and stale >= cfg.patience:
            break
    return log


def train_one_epoch(t, loader, cfg, device, epoch, show=True, estimate_epochs=0):
    """One pass over the training loader; returns (mean loss, macro F1, images/s). Losses and predictions stay on
    the device until a progress update (a GPU need not wait for the host); estimate_epochs: print their estimate."""
    t.net.train()
    keep_frozen_statistics(t.model)  # --freeze_backbone is then a true linear probe
    dtype, steps = amp_dtype(device, cfg.amp), len(loader)
    total_loss, seen, preds, labels, recent = torch.zeros((), device=device), 0, [], [], []
    epoch_text = f"epoch {epoch + 1}/{cfg.epochs}"
    bar = tqdm(loader, desc=epoch_text, leave=False, mininterval=1.0, dynamic_ncols=True,
               disable=not show or not sys.stderr.isatty())
    if show and bar.disable:  # a file or a pipe: the epoch's number now, its figures on the same line when done
        print(epoch_text, end=" ", flush=True)
    start = time.perf_counter()
    for step, (images, targets, index) in enumerate(bar):
        images, targets = to_device(images, device, cfg.channels_last), targets.to(device, non_blocking=True)
        hard_targets = targets
        if t.mixup is not None and len(images) % 2 == 0:  # only a data set smaller than one batch can be odd
            images, targets = t.mixup(images.float(), targets)
        with autocast(device, dtype):
            logits = t.net(images)
            loss = t.criterion(logits.float(), targets)
        group = min(cfg.accum_steps, steps - step // cfg.accum_steps * cfg.accum_steps)  # the last may be short
        t.scaler.scale(loss / group).backward()  # a step's gradient: the mean over its group's batches
        if (step + 1) % cfg.accum_steps == 0 or step + 1 == steps:  # one optimizer update per accum_steps batches
            update = epoch * t.updates_per_epoch + step // cfg.accum_steps + 1
            t.scaler.step(t.optimizer)
            t.scaler.update()
            t.optimizer.zero_grad(set_to_none=True)
            if t.ema is not None:
                t.ema.update(t.model, step=update)
            if t.scheduler is not None:
                t.scheduler.step_update(update)
        total_loss += loss.detach() * len(images)
        seen += len(images)
        preds.append(to_probs(logits.detach(), cfg.head).argmax(1))
        labels.append(hard_targets)
        recent.append((step, loss.detach(), index))
        if show and estimate_epochs and step + 1 == speed.EARLY_STEPS < steps:  # the run's length, early
            speed.say_during_epoch(speed.early_estimate(cfg, device, (time.perf_counter() - start) * steps / (step + 1),
                                                        estimate_epochs), bar, epoch_text)
        if step % cfg.log_interval == 0 or step + 1 == steps:
            check_finite(recent, t.files, epoch)
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    f1 = float(f1_score(torch.cat(labels).cpu(), torch.cat(preds).cpu(), average="macro"))
    return total_loss.item() / max(seen, 1), f1, seen / (time.perf_counter() - start)


if __name__ == "__main__":
    run_main(main)
