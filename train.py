"""K-fold training with person-grouped folds, out-of-fold scores and one run folder per experiment.

    python train.py --model tf_efficientnet_lite0 --epochs 10 --resize 256 192
    python train.py --config my.yaml --folds 5 --fold 0          # one fold; any argument from a YAML/JSON
    python train.py --resume model/exp3                          # continue an interrupted run
    torchrun --nproc_per_node 2 train.py ...                     # DistributedDataParallel

The run folder (model_dir/name, numbered if it exists) gets config.json, folds.csv, fold{i}/best.pth
and last.pth, fold{i}/oof.csv, oof.csv, metrics.json, log.csv, confusion.png and TensorBoard events:
everything inference.py needs. See --help for every argument.
"""
import argparse
import atexit
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.distributed as dist
from sklearn.metrics import f1_score
from timm.data import Mixup
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, WeightedRandomSampler
from tqdm import tqdm

from dataset import (KIT_VERSION, UserError, add_data_args, atomic_write, build_transform, cached_image,
                     fill_cache, find_bad_images, load_image, lookup, resizes_first,
                     read_boxes, run_main, summarize, table_from_args, ImageDataset, SeededSampler)
from loss import create_criterion
from model import (amp_dtype, autocast, check_model_name, create_model, data_config, load_torch_file, param_groups,
                   predict_probs, to_device, to_probs)
from report import write_report, write_run_metrics

OPTIMIZERS = {"sgd": lambda groups, lr, wd: torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True,
                                                            weight_decay=wd),
              "adam": lambda groups, lr, wd: torch.optim.Adam(groups, lr=lr, weight_decay=wd),
              "adamw": lambda groups, lr, wd: torch.optim.AdamW(groups, lr=lr, weight_decay=wd)}
SCHEDULERS = {"cosine": "cosine", "step": "step", "plateau": "plateau", "none": None}  # ours -> timm's


def parse_args(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML/JSON file of argument defaults (the command line wins)")
    p.add_argument("--data_dir", default=env("SM_CHANNEL_TRAIN", "sample/train"), help="training data folder")
    p.add_argument("--model_dir", default=env("SM_MODEL_DIR", "model"), help="where run folders are made")
    p.add_argument("--name", default="exp", help="run folder name (exp, exp2, ... if taken)")
    p.add_argument("--seed", type=int, default=42, help="fixes folds, init, order and augmentation")
    p.add_argument("--epochs", type=int, default=10, help="epochs per fold")
    p.add_argument("--fold", type=int, default=None, help="train only this fold")
    add_data_args(p)
    p.add_argument("--dataset", dest="layout", help="alias of --layout (the baseline's name)")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="any timm.list_models() name")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="ImageNet weights")
    p.add_argument("--weights", default=None, help="local weight file (offline); implies pretrained")
    p.add_argument("--head", default="single", help="single (C-way) or multi (mask 3 + gender 2 + age 3)")
    p.add_argument("--resize", type=int, nargs="+", default=None, help="input H [W]; default: the model's")
    p.add_argument("--augmentation", default="flip", help="base, flip, strong, randaugment, trivialaugment")
    p.add_argument("--crop", default=None, help="boxes CSV from crop_faces.py: train on the crops")
    p.add_argument("--crop_margin", type=float, default=0.2, help="box widened by this share of its size")
    p.add_argument("--batch_size", type=int, default=64, help="training batch size")
    p.add_argument("--valid_batch_size", type=int, default=128, help="validation batch size")
    p.add_argument("--accum_steps", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--optimizer", default="adamw", help=f"one of: {', '.join(OPTIMIZERS)}")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the head")
    p.add_argument("--backbone_lr_scale", type=float, default=1.0, help="backbone lr = lr * this")
    p.add_argument("--weight_decay", type=float, default=0.01, help="weight decay")
    p.add_argument("--freeze_backbone", action="store_true", help="train the head only")
    p.add_argument("--feature_cache", action=argparse.BooleanOptionalAction, default=True,
                   help="with --freeze_backbone: compute the backbone's features once per image (and its mirror "
                        "for --augmentation flip), then train the head on them; other augmentations, mixup, "
                        "EMA, --compile and torchrun run the full model every epoch")
    p.add_argument("--scheduler", default="cosine", help=f"one of: {', '.join(SCHEDULERS)}")
    p.add_argument("--warmup_epochs", type=int, default=1, help="linear warm-up epochs (cosine, step)")
    p.add_argument("--lr_decay_step", type=int, default=20, help="epochs between lr halvings (step)")
    p.add_argument("--criterion", default="ce", help="ce, label_smoothing, focal, f1, weighted_ce or a+b")
    p.add_argument("--criterion_weights", default=None, help="weights of a+b criteria, e.g. 0.7,0.3")
    p.add_argument("--head_weights", default=None, help="multi head: loss weights of mask,gender,age")
    p.add_argument("--smoothing", type=float, default=0.1, help="label_smoothing amount")
    p.add_argument("--focal_gamma", type=float, default=2.0, help="focal loss gamma")
    p.add_argument("--sampler", default="none", choices=["none", "weighted"], help="weighted: balance classes")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    p.add_argument("--ema", action="store_true", help="evaluate and save an EMA of the weights")
    p.add_argument("--ema_decay", type=float, default=0.998, help="EMA decay per step")
    p.add_argument("--patience", type=int, default=0, help="stop a fold after this many epochs without gain")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="mixed precision")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num_workers", type=int, default=-1, help="data loader processes, kept across epochs "
                   "(-1: none on a CPU, where the model needs every core; up to 8 per GPU)")
    p.add_argument("--cache", default="auto", choices=["auto", "memory", "disk", "none"],
                   help="keep decoded images at input size: memory (RAM, this run only), disk (--cache_dir, "
                        "kept), auto (memory if they fit in a quarter of RAM and give the same pixels)")
    p.add_argument("--cache_dir", default=None, help="folder of --cache disk (default: TMPDIR/kit-image-cache)")
    p.add_argument("--log_interval", type=int, default=20, help="batches between progress-bar updates")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="end with report.py's pictures and report.html (a few seconds)")
    p.add_argument("--skip_bad_images", action="store_true", help="drop unreadable images instead of stopping")
    p.add_argument("--resume", default=None, help="run folder to continue (finished folds are kept)")
    p.add_argument("--fold_per_device", action="store_true", help="one process per GPU, each its own folds")
    args = p.parse_args(argv)
    if args.config:
        p.set_defaults(**read_config(args.config, p))
        args = p.parse_args(argv)
    return args


def read_config(path, parser):
    """Argument defaults from a YAML or JSON file; unknown keys are an error."""
    if not Path(path).is_file():
        raise UserError(f"config file {path} not found")
    import yaml  # YAML is a superset of JSON, so one reader serves both
    values = yaml.safe_load(Path(path).read_text()) or {}
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{path}: unknown settings {', '.join(unknown)}; see train.py --help")
    return values


def check_args(args, layout):
    """Arguments that cannot work together fail before anything is written."""
    lookup(OPTIMIZERS, args.optimizer, "optimizer"), lookup(SCHEDULERS, args.scheduler, "scheduler")
    check_model_name(args.model)
    if args.head == "multi" and layout != "mask":
        raise UserError(f"--head multi needs the mask layout (mask/gender/age), not {layout}; use --head single")
    if args.fold is not None and not 0 <= args.fold < args.folds:
        raise UserError(f"--fold {args.fold} is not one of the {args.folds} folds (0..{args.folds - 1})")
    if args.freeze_backbone and args.backbone_lr_scale != 1.0:
        raise UserError("--freeze_backbone and --backbone_lr_scale conflict: the frozen backbone has no lr")
    if args.sampler == "weighted" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("--sampler weighted is not supported with torchrun; use --criterion weighted_ce")
    if args.fold_per_device and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("--fold_per_device starts its own processes: run it with python, not torchrun")
    if args.resize and len(args.resize) > 2:
        raise UserError("--resize takes H or H W")


# ---- setup helpers -------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def increment_path(path):
    """model/exp -> model/exp2, exp3, ... when taken (the baseline's run-folder naming)."""
    path = Path(path)
    if not path.exists():
        return path
    taken = [int(m.group(1) or 1) for d in path.parent.glob(f"{path.name}*")
             if (m := re.fullmatch(re.escape(path.name) + r"(\d*)", d.name))]
    return path.with_name(f"{path.name}{max(taken, default=1) + 1}")


def setup_distributed():
    """(rank, world size, device) from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local)
    torch.backends.cudnn.benchmark = cuda  # one input size all run: cuDNN times its algorithms once
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    return (dist.get_rank() if world > 1 else 0), world, device


def library_versions():
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "pandas": pd.__version__, "numpy": np.__version__}


def write_json(path, data):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str)))


def make_config(args, classes, layout, model_config, run_dir):
    """Everything a later step needs, so inference never asks again (plain JSON types only, so
    checkpoints load with torch.load(weights_only=True))."""
    return json.loads(json.dumps({**vars(args), "run_dir": str(run_dir), "classes": classes, "layout": layout,
            "input_size": model_config["input_size"], "mean": model_config["mean"], "std": model_config["std"],
            "interpolation": model_config["interpolation"], "kit_version": KIT_VERSION,
            "versions": library_versions()}, default=str))


def find_unreadable(table, args, rank):
    """Unreadable images stop the run, or are dropped and listed with --skip_bad_images."""
    bad = [find_bad_images([str(Path(args.data_dir) / p) for p in table["path"]]) if rank == 0 else []]
    if dist.is_initialized():  # every torchrun rank drops the same images (or stops)
        dist.broadcast_object_list(bad)
    bad = bad[0]
    if bad and not args.skip_bad_images:
        raise UserError(f"{len(bad)} unreadable images: " + "; ".join(f"{p} ({r})" for p, r in bad)
                        + " — replace them or pass --skip_bad_images")
    bad_paths = {os.path.relpath(p, args.data_dir) for p, _ in bad}
    return table[~table["path"].isin(bad_paths)].reset_index(drop=True), bad


# ---- data ------------------------------------------------------------------------------------------
def make_loader(table, args, config, train, rank=0, world=1):
    """DataLoader over table rows; training shuffles (or class-balances), validation keeps order."""
    files = [str(Path(args.data_dir) / p) for p in table["path"]]
    boxes = read_boxes(args.crop, table["path"], args.crop_margin) if args.crop else None
    size = config["input_size"]
    transform = build_transform(args.augmentation, size, config["interpolation"], train=train)
    dataset = ImageDataset(files, table["label"].to_numpy(), transform, boxes, draft_size=(size[2], size[1]),
                           read=image_reader(args, config, len(table), resizes_first(transform)))
    generator, sampler = torch.Generator(), None
    if train and world > 1:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed)
    elif train and args.sampler == "weighted":
        counts = np.bincount(table["label"], minlength=len(config["classes"]))
        sampler = WeightedRandomSampler(1.0 / counts[table["label"]], len(table), generator=generator)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    elif world > 1:  # each rank scores a strided share; gather_predictions puts them back in order
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    batch = args.batch_size if train else args.valid_batch_size
    workers = loader_workers(args)
    # the loader draws a seed from its own generator per new iterator (each epoch without persistent workers):
    # a separate one keeps the row order and the global stream (dropout, mixup) the same for any --num_workers
    return DataLoader(dataset, batch, sampler=sampler and SeededSampler(sampler), generator=torch.Generator(),
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                      # a last batch of one image breaks BatchNorm in training mode
                      drop_last=train and len(dataset) > batch and ((args.mixup or args.cutmix) > 0
                                                                    or len(dataset) % batch == 1))


def warm_cache(table, args, config, rank, world):
    """With the cache on, rank 0 decodes every image into it on all cores before fold 0 trains."""
    size = config["input_size"]
    exact = resizes_first(build_transform(args.augmentation, size, config["interpolation"], train=True))
    read = image_reader(args, config, len(table), exact)
    if rank == 0 and read is not load_image:
        boxes = read_boxes(args.crop, table["path"], args.crop_margin) if args.crop else [None] * len(table)
        start = time.perf_counter()
        fill_cache(read, [(str(Path(args.data_dir) / p), (size[2], size[1]), box)
                          for p, box in zip(table["path"], boxes)])
        print(f"cache: {len(table)} images decoded at {size[1]}x{size[2]} in {time.perf_counter() - start:.0f} s")
    if world > 1:
        dist.barrier()


def loader_workers(args):
    """--num_workers, or by default none on a CPU (decoding in workers takes cores from the model; the cache
    makes reading cheap) and up to 8 per GPU process with a GPU."""
    if args.num_workers >= 0:
        return args.num_workers
    per_process = os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(8, max(1, per_process - 1)) if torch.cuda.is_available() else 0


def image_reader(args, config, n_images, exact):
    """load_image, or cached_image for --cache: memory = files in RAM (/dev/shm) removed when this process
    ends; disk = --cache_dir, kept for later runs; auto = memory when the images fit in a quarter of RAM and
    the augmentation resizes first (exact: the same pixels as without the cache)."""
    size, mode, ram_dir = tuple(config["input_size"][1:]), args.cache, Path("/dev/shm")
    needed = n_images * 3 * size[0] * size[1]
    if not (ram_dir.is_dir() and shutil.disk_usage(ram_dir).free > 2 * needed):
        ram_dir = Path(tempfile.gettempdir())  # a container's small /dev/shm: the page cache holds files too
    if mode == "auto":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        mode = "memory" if exact and 4 * needed < min(ram, shutil.disk_usage(ram_dir).free) else "none"
    if mode == "none":
        return load_image
    if mode == "disk":
        folder = Path(args.cache_dir or Path(tempfile.gettempdir()) / "kit-image-cache")
    else:  # one folder per run, shared by its loaders, workers and torchrun ranks
        run_key = hashlib.sha1(str(Path(config["run_dir"]).resolve()).encode()).hexdigest()[:12]
        folder = ram_dir / f"kit-image-cache-{run_key}"
        remove_abandoned_caches(ram_dir)
        folder.mkdir(exist_ok=True)
        (folder / "owner.pid").write_text(str(os.getpid()))
        atexit.register(shutil.rmtree, folder, True)
    return partial(cached_image, str(folder), size, config["interpolation"])


def remove_abandoned_caches(ram_dir):
    """Memory caches of runs whose process is gone (killed before its exit could remove them): RAM back."""
    for owner in ram_dir.glob("kit-image-cache-*/owner.pid"):
        try:
            os.kill(int(owner.read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(owner.parent, ignore_errors=True)
        except (OSError, ValueError):  # another user's live process, or a file being written
            continue


# ---- one fold ---------------------------------------------------------------------------------------
def build_training(args, config, train_rows, device, world, steps_per_epoch):
    """Model, optimizer, scheduler, criterion, EMA and mixup for one fold."""
    model = create_model(args.model, len(config["classes"]), args.head, pretrained=args.pretrained or bool(
        args.weights), weights=args.weights, input_size=config["input_size"]).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = param_groups(model, args.lr, args.backbone_lr_scale, args.freeze_backbone)
    optimizer = OPTIMIZERS[args.optimizer](groups, args.lr, args.weight_decay)
    scheduler = SCHEDULERS[args.scheduler] and create_scheduler_v2(
        optimizer, SCHEDULERS[args.scheduler], num_epochs=args.epochs, decay_epochs=args.lr_decay_step,
        decay_rate=0.5, warmup_epochs=min(args.warmup_epochs, args.epochs - 1), warmup_lr=args.lr / 100,
        min_lr=args.lr / 100, step_on_epochs=args.scheduler == "plateau", updates_per_epoch=steps_per_epoch)[0]
    criterion = make_criterion(args, len(config["classes"]), train_rows["label"])
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema else None
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, num_classes=len(config["classes"]),
                  label_smoothing=0.0) if (args.mixup or args.cutmix) else None
    net = torch.compile(model) if args.compile else model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.index is not None
                                                        else None)
    return model, net, optimizer, scheduler, criterion.to(device), ema, mixup


def parse_floats(text):
    try:
        return [float(v) for v in str(text).split(",")] if text else None
    except ValueError:
        raise UserError(f"'{text}' is not a comma-separated list of numbers like 0.7,0.3 "
                        "(--criterion_weights, --head_weights)") from None


def make_criterion(args, num_classes, labels):
    """The loss named by --criterion with its options; class counts come from the training labels."""
    return create_criterion(args.criterion, num_classes, class_counts=np.bincount(labels, minlength=num_classes),
                            weights=parse_floats(args.criterion_weights), head=args.head,
                            head_weights=parse_floats(args.head_weights), smoothing=args.smoothing,
                            gamma=args.focal_gamma)


def train_one_epoch(net, loader, optimizer, scheduler, criterion, ema, mixup, scaler, args, device, epoch,
                    files, show):
    """One pass over the training loader; returns (mean loss, macro F1, images/s). Losses and predictions stay
    on the device until a progress update, so a GPU is not made to wait for the host after every step."""
    net.train()
    dtype = amp_dtype(device, args.amp)
    total_loss, seen, preds, labels, start = torch.zeros((), device=device), 0, [], [], time.perf_counter()
    steps, recent = len(loader), []
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not show,
               mininterval=1.0, dynamic_ncols=True)
    for step, (images, targets, index) in enumerate(bar):
        images, targets = to_device(images, device, args.channels_last), targets.to(device, non_blocking=True)
        hard_targets = targets
        if mixup is not None and len(images) % 2 == 0:
            images, targets = mixup(images.float(), targets)
        with autocast(device, dtype):
            logits = net(images)
            loss = criterion(logits.float(), targets)
        scaler.scale(loss / args.accum_steps).backward()
        if (step + 1) % args.accum_steps == 0 or step + 1 == steps:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(net.module if hasattr(net, "module") else net)
            if scheduler is not None:
                scheduler.step_update(epoch * steps + step + 1)
        total_loss += loss.detach() * len(images)
        seen += len(images)
        preds.append(to_probs(logits.detach(), args.head).argmax(1))
        labels.append(hard_targets)
        recent.append((step, loss.detach(), index))
        if step % args.log_interval == 0 or step + 1 == steps:
            check_finite(recent, files, epoch)
            rate = seen / (time.perf_counter() - start)
            f1 = f1_score(torch.cat(labels).cpu(), torch.cat(preds).cpu(), average="macro")
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", f1=f"{f1:.3f}", img_s=f"{rate:.0f}")
    f1 = float(f1_score(torch.cat(labels).cpu(), torch.cat(preds).cpu(), average="macro"))
    return total_loss.item() / max(seen, 1), f1, seen / (time.perf_counter() - start)


def check_finite(recent, files, epoch):
    """Stop at the first NaN/inf loss since the last check, naming its step and images; empties recent."""
    bad = torch.nonzero(~torch.isfinite(torch.stack([loss for _, loss, _ in recent]))).flatten().tolist()
    if bad:
        step, loss, index = recent[bad[0]]
        raise UserError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}; batch starts with "
                        f"{[files[i] for i in index[:3].tolist()]}: lower --lr or use --amp bf16/off")
    recent.clear()


def gather_predictions(probs, index, world):
    """All ranks' (index, probs) in index order (each rank evaluated a strided share)."""
    if world == 1:
        return probs
    shards = [None] * world
    dist.all_gather_object(shards, (index, probs))
    index = np.concatenate([s[0] for s in shards])
    return np.concatenate([s[1] for s in shards])[np.argsort(index)]


def save_checkpoint(path, model, config, extra):
    """Weights + config (+ resume state) in one atomic write."""
    atomic_write(path, lambda tmp: torch.save({"model": model.state_dict(), "config": config, **extra}, tmp))


def resume_state(path, model, optimizer, scheduler, scaler, ema, config):
    """Load last.pth into the training objects; returns (next epoch, best f1, stale epochs, log rows)."""
    state = load_torch_file(path, "checkpoint", "delete it to retrain the fold", weights_only=False)
    for key in ("model", "head", "classes"):
        if state.get("config", {}).get(key) != config[key]:
            raise UserError(f"{path} has {key}={state.get('config', {}).get(key)!r} but the run's config.json says "
                            f"{config[key]!r}: it comes from another run; delete it to retrain the fold")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return state["epoch"] + 1, state["best_f1"], state["stale"], state["log"]


# ---- --freeze_backbone: epochs of the head on features computed once -----------------------------------
FEATURE_MEMO = {}  # (backbone digest, views, images) -> {path: classifier input}: the folds of a run share it


def uses_feature_cache(args, world):
    """The frozen backbone's features can stand in for the images: nothing but a mirror augments them."""
    return (args.freeze_backbone and args.feature_cache and args.augmentation in ("base", "flip") and world == 1
            and not (args.mixup or args.cutmix or args.ema or args.compile))


def backbone_digest(model):
    """A hash of the backbone's weights and buffers (the head, trained per fold, left out)."""
    head = {id(t) for t in model.backbone.get_classifier().state_dict(keep_vars=True).values()}
    digest = hashlib.sha1()
    for name, tensor in model.backbone.state_dict(keep_vars=True).items():
        if id(tensor) not in head:
            digest.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def classifier_inputs(model, rows, args, config, device, views):
    """{path: what the classifier receives for the image (and its mirror), flat as (views * F, 1, 1), a shape
    channels_last batches take}, computed in eval mode: a true linear probe (BatchNorm stays as loaded)."""
    captured = []
    hook = model.backbone.get_classifier().register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].float().cpu()))
    try:
        predict_probs(model, make_loader(rows, args, config, False), args.head, device, args.amp,
                      args.channels_last, tta=views == 2)
    finally:
        hook.remove()
    if not captured:
        raise UserError(f"{args.model} does not call its classifier module; pass --no-feature_cache")
    stored = torch.stack([torch.cat(captured[view::views]) for view in range(views)], 1)
    return dict(zip(rows["path"], stored.reshape(len(rows), -1, 1, 1))), captured[0].shape[1:]


class FeatureHead(torch.nn.Module):
    """The classifier alone on stored inputs (N, views * F, 1, 1): training takes the image or its mirror at
    random for each row (torch's seeded generator) and applies the backbone's dropout, as its head would;
    evaluation takes the image itself."""

    def __init__(self, classifier, shape, views, drop_rate):
        super().__init__()
        self.classifier, self.shape, self.views, self.drop_rate = classifier, tuple(shape), views, drop_rate

    def forward(self, stored):
        stored, rows = stored.reshape(len(stored), self.views, -1), torch.arange(len(stored), device=stored.device)
        pick = torch.randint(self.views, (len(stored),), device=stored.device) if self.training else rows * 0
        features = torch.nn.functional.dropout(stored[rows, pick], self.drop_rate, self.training)
        return self.classifier(features.reshape(len(stored), *self.shape))


def feature_training(model, train_rows, val_rows, train_loader, args, config, device):
    """(head net, train loader, val loader) over stored features, batched in the image loader's order (same
    steps and generator, so the scheduler and --resume see the same epochs)."""
    views, rows = 2 if args.augmentation == "flip" else 1, pd.concat([train_rows, val_rows])
    key = (backbone_digest(model), views, tuple(config["input_size"]), str(Path(args.data_dir).resolve()),
           args.crop, args.crop_margin)
    if key not in FEATURE_MEMO:
        FEATURE_MEMO.clear()  # one backbone's features at a time
        FEATURE_MEMO[key] = {"features": {}, "shape": None}
    memo = FEATURE_MEMO[key]
    missing = rows[~rows["path"].isin(memo["features"])]
    if len(missing):
        features, memo["shape"] = classifier_inputs(model, missing, args, config, device, views)
        memo["features"].update(features)
    sets = [torch.utils.data.TensorDataset(torch.stack([memo["features"][p] for p in r["path"]]),
                                           torch.tensor(r["label"].to_numpy()), torch.arange(len(r)))
            for r in (train_rows, val_rows)]
    return (FeatureHead(model.backbone.get_classifier(), memo["shape"], views,
                        float(getattr(model.backbone, "drop_rate", 0.0))),
            DataLoader(sets[0], batch_sampler=BatchSampler(train_loader.sampler.sampler, train_loader.batch_size,
                                                           train_loader.drop_last)),
            DataLoader(sets[1], args.valid_batch_size))


def train_fold(fold, table, args, config, run_dir, device, rank, world):
    """Train one fold; saves best/last checkpoints and fold{i}/oof.csv; returns the fold's log rows."""
    fold_dir = run_dir / f"fold{fold}"
    train_rows, val_rows = table[(table["fold"] != fold)], table[table["fold"] == fold]
    if val_rows.empty or train_rows.empty:
        raise UserError(f"fold {fold} has no {'validation' if val_rows.empty else 'training'} images: "
                        "lower --folds or add data")
    seed_everything(args.seed + fold)  # a fold's start does not depend on the folds before it
    train_loader = make_loader(train_rows, args, config, True, rank, world)
    val_loader = make_loader(val_rows, args, config, False, rank, world)
    model, net, optimizer, scheduler, criterion, ema, mixup = build_training(
        args, config, train_rows, device, world, math.ceil(len(train_loader) / args.accum_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, args.amp) == torch.float16)
    head_only, epoch_sampler = uses_feature_cache(args, world), train_loader.sampler
    if head_only:  # linear probe: the backbone runs once per image, the epochs train the head alone
        net, train_loader, val_loader = feature_training(model, train_rows, val_rows, train_loader, args, config,
                                                         device)
    fold_config = {**config, "fold": fold}
    start, best_f1, stale, log = 0, -1.0, 0, []
    if (fold_dir / "last.pth").is_file():
        start, best_f1, stale, log = resume_state(fold_dir / "last.pth", model, optimizer, scheduler, scaler, ema,
                                                  config)
        if rank == 0:
            print(f"fold {fold}: resuming at epoch {start + 1}")
    files = [str(Path(args.data_dir) / p) for p in train_rows["path"]]
    for epoch in range(start, args.epochs):
        epoch_seed = args.seed * 1000 + fold * 100 + epoch + 7919 * rank  # torchrun ranks augment differently
        seed_everything(epoch_seed)  # each epoch a function of (seed, fold, epoch)
        epoch_sampler.set_epoch(epoch_seed, epoch)
        loss, train_f1, rate = train_one_epoch(net, train_loader, optimizer, scheduler, criterion, ema, mixup,
                                               scaler, args, device, epoch, files, rank == 0)
        eval_model = ema.module if ema is not None else model
        probs, index = predict_probs(net if head_only else eval_model, val_loader, args.head, device, args.amp,
                                     args.channels_last)
        probs = gather_predictions(probs, index, world)
        val_f1 = float(f1_score(val_rows["label"], probs.argmax(1), average="macro"))
        if scheduler is not None:
            scheduler.step(epoch + 1, val_f1)
        log.append({"fold": fold, "epoch": epoch + 1, "train_loss": loss, "train_f1": train_f1, "val_f1": val_f1,
                    "val_acc": float((probs.argmax(1) == val_rows["label"].to_numpy()).mean()),
                    "lr": optimizer.param_groups[0]["lr"], "img_s": rate * world})  # DDP ranks step together
        improved = val_f1 > best_f1
        best_f1, stale = (val_f1, 0) if improved else (best_f1, stale + 1)
        if rank == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in log[-1].items())
                  + (" *" if improved else ""))
            if improved:
                save_checkpoint(fold_dir / "best.pth", eval_model, {**fold_config, "epoch": epoch + 1,
                                                                    "val_f1": val_f1}, {})
                write_oof(fold_dir / "best_oof.csv", val_rows, probs)
            save_checkpoint(fold_dir / "last.pth", model, fold_config, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else None, "epoch": epoch,
                "best_f1": best_f1, "stale": stale, "log": log})
        if args.patience and stale >= args.patience:
            break
    if rank == 0:
        write_log(run_dir, log)
        os.replace(fold_dir / "best_oof.csv", fold_dir / "oof.csv")  # marks the fold finished
    return log


def write_oof(path, rows, probs):
    """path, profile, fold, label, pred, p0..p{C-1} for each validation image."""
    oof = rows[["path", "profile", "fold", "label"]].assign(pred=probs.argmax(1))
    oof = pd.concat([oof.reset_index(drop=True), pd.DataFrame(probs, columns=[f"p{i}" for i in range(
        probs.shape[1])])], axis=1)
    atomic_write(path, lambda tmp: oof.to_csv(tmp, index=False, float_format="%.6g"))  # %g keeps tiny probabilities apart


def write_log(run_dir, fold_log):
    """log.csv holds one row per epoch per fold; a fold's rows are replaced when it is retrained."""
    path = run_dir / "log.csv"
    log = pd.DataFrame(fold_log)
    if path.is_file():
        old = pd.read_csv(path)
        log = pd.concat([old[old["fold"] != fold_log[0]["fold"]], log]).sort_values(["fold", "epoch"])
    atomic_write(path, lambda tmp: log.to_csv(tmp, index=False))
    tensorboard_log(run_dir, fold_log)


def tensorboard_log(run_dir, fold_log):
    from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import
    with SummaryWriter(run_dir / "tb" / f"fold{fold_log[0]['fold']}") as writer:
        for row in fold_log:
            for key in ("train_loss", "train_f1", "val_f1", "val_acc", "lr", "img_s"):
                writer.add_scalar(key, row[key], row["epoch"])


# ---- the run --------------------------------------------------------------------------------------
def resumed_args(args):
    """The saved arguments of the run folder named by --resume (a new --fold may be given)."""
    config_path = Path(args.resume) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} not found: --resume takes a run folder made by train.py")
    saved = json.loads(config_path.read_text())
    if saved.get("kit_version") != KIT_VERSION:
        raise UserError(f"{args.resume} was made by kit version {saved.get('kit_version')}, this is "
                        f"{KIT_VERSION}: start a new run")
    resumed = argparse.Namespace(**{**vars(args), **{k: saved[k] for k in vars(args) if k in saved}})
    resumed.resume, resumed.fold = str(config_path.parent), args.fold if args.fold is not None else saved["fold"]
    return resumed, saved


def prepare_run(args, rank, world):
    """Table, classes, layout and run folder; --resume reuses a folder, its settings and its folds."""
    if args.resume:
        args, saved = resumed_args(args)
        table = pd.read_csv(Path(args.resume) / "folds.csv", dtype={"profile": str}, keep_default_na=False)
        return args, table, saved["classes"], [], saved["layout"], [], Path(args.resume)
    table, classes, notes, layout = table_from_args(args)
    check_args(args, layout)
    make_criterion(args, len(classes), table["label"])  # a bad --criterion fails before any image is read
    table, bad = find_unreadable(table, args, rank)
    run_dir = [increment_path(Path(args.model_dir) / args.name) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(run_dir)
    return args, table, classes, notes, layout, bad, Path(run_dir[0])


def model_settings(args, classes):
    """Input size, mean/std and interpolation of the chosen backbone (timm's pretrained config); the model
    is then built as training builds it, so bad --weights or --resize fail before the run folder is made."""
    probe = create_model(args.model, len(classes), args.head, pretrained=False)
    settings = data_config(probe.backbone, args.resize)
    create_model(args.model, len(classes), args.head, pretrained=args.pretrained or bool(args.weights),
                 weights=args.weights, input_size=settings["input_size"])
    return settings


def out_of_memory(args, config):
    """The one-line advice for CUDA out of memory."""
    height, width = config["input_size"][1:]
    return UserError(f"out of memory with --batch_size {args.batch_size} (--valid_batch_size "
                     f"{args.valid_batch_size}) for {args.model} at {height}x{width}: "
                     f"start a new run with --batch_size {max(1, args.batch_size // 2)} --accum_steps "
                     f"{args.accum_steps * 2} (the same images per optimizer step), or a smaller --resize")


def main():
    args = parse_args()
    rank, world, device = setup_distributed()
    seed_everything(args.seed)
    args, table, classes, notes, layout, bad, run_dir = prepare_run(args, rank, world)
    config = make_config(args, classes, layout, model_settings(args, classes), run_dir)
    if rank == 0 and not args.resume:
        print(f"layout: {layout}\n{summarize(table, classes, notes)}\nrun folder: {run_dir}  device: {device}")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config)
        atomic_write(run_dir / "folds.csv", lambda tmp: table.to_csv(tmp, index=False))
        if bad:
            atomic_write(run_dir / "bad_images.csv", lambda tmp: pd.DataFrame(bad, columns=["path", "reason"]
                                                                              ).to_csv(tmp, index=False))
    folds = [args.fold] if args.fold is not None else sorted(int(f) for f in table["fold"].unique() if f >= 0)
    if args.fold_per_device and torch.cuda.device_count() > 1 and args.fold is None:
        return launch_fold_per_device(run_dir, folds, config)
    if any(not (run_dir / f"fold{fold}" / "oof.csv").is_file() for fold in folds):
        warm_cache(table, args, config, rank, world)
    for fold in folds:
        if (run_dir / f"fold{fold}" / "oof.csv").is_file():
            if rank == 0:
                print(f"fold {fold}: finished earlier, kept")
            continue
        try:
            train_fold(fold, table, args, config, run_dir, device, rank, world)
        except torch.OutOfMemoryError:
            raise out_of_memory(args, config) from None
        except KeyboardInterrupt:
            raise UserError(f"interrupted in fold {fold}; continue with: python train.py --resume {run_dir}") from None
    if rank == 0:
        metrics = write_run_metrics(run_dir, classes, layout)
        if args.report:
            write_report(run_dir)
        print(f"OOF macro F1 {metrics['oof_macro_f1']:.4f}  accuracy {metrics['oof_accuracy']:.4f}  "
              f"({metrics['oof_images']} images, folds {metrics['folds_done']})  -> {run_dir}")
    if world > 1:
        dist.destroy_process_group()


def launch_fold_per_device(run_dir, folds, config):
    """One process per GPU, in waves, each training one fold into the same run folder."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # ids as this process sees them (e.g. "2,3")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    for first in range(0, len(folds), len(gpus)):
        procs = [subprocess.Popen([sys.executable, __file__, "--resume", str(run_dir), "--fold", str(f)],
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
                 for gpu, f in zip(gpus, folds[first:first + len(gpus)])]
        if any([p.wait() for p in procs]):  # a list: wait for every process before stopping
            raise UserError(f"a fold process failed (its output is above); continue with --resume {run_dir}")
    # the fold processes each rewrote log.csv (and may have raced); every last.pth holds its fold's log whole
    logs = [torch.load(run_dir / f"fold{f}" / "last.pth", weights_only=False)["log"] for f in folds]
    atomic_write(run_dir / "log.csv", lambda tmp: pd.DataFrame(sum(logs, [])).to_csv(tmp, index=False))
    metrics = write_run_metrics(run_dir, config["classes"], config["layout"])
    if config.get("report", True):
        write_report(run_dir)
    print(f"OOF macro F1 {metrics['oof_macro_f1']:.4f}  accuracy {metrics['oof_accuracy']:.4f} -> {run_dir}")


if __name__ == "__main__":
    run_main(main)
