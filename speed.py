"""Speed machinery behind train.py's data path: none of it changes what a run learns, only how fast.

    loader = make_data_loader(dataset, sampler, batch_size, cfg, train=True)   # seeded, persistent workers
    read = image_reader(cfg, n_images, exact)          # load_image, or a decoded-image cache reader
    bad = warm_cache(table, cfg, rank)                 # decode every image once (filling the cache), name bad ones

- Decoded-image cache: each image decoded once, resized to the input size and kept as raw uint8 in RAM
  (/dev/shm, removed when the run ends; runs killed before that are cleaned by the next run) or on disk.
- Loader workers: none on a CPU (the model needs every core), up to 8 per GPU process.
- Seeded per-image augmentation: the sampler yields (row, seed), so any --num_workers gives the same batches
  and workers can persist across epochs.
- Frozen-backbone feature cache: with --freeze_backbone the backbone runs once per image and the epochs
  train the head on stored features.
"""
import argparse
import atexit
import hashlib
import os
import shutil
import tempfile
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T

from common import UserError, atomic_write, in_range
from dataset import (DECODE_ERRORS, build_transform, find_bad_images, interpolation_mode, image_boxes, load_image,
                     resize_ops, resizes_first)
from distributed import from_rank0
from model import predict_probs


def add_speed_args(group):
    """The speed settings of train.py (an argparse group): workers, image cache, feature cache."""
    group.add_argument("--num_workers", type=in_range(int, -1), default=-1, help="data loader processes, kept across epochs "
                       "(-1: none on a CPU, where the model needs every core; up to 8 per GPU)")
    group.add_argument("--cache", default="auto", choices=["auto", "memory", "disk", "none"],
                       help="keep decoded images at input size: memory (RAM, this run only), disk (--cache_dir, "
                            "kept), auto (memory if they fit in a quarter of RAM and give the same pixels)")
    group.add_argument("--cache_dir", default=None, help="folder of --cache disk (default: TMPDIR/kit-image-cache)")
    group.add_argument("--feature_cache", action=argparse.BooleanOptionalAction, default=True,
                       help="with --freeze_backbone: compute the backbone's features once per image (and its mirror "
                            "for --augmentation flip), then train the head on them; other augmentations, mixup, "
                            "EMA, --compile and torchrun run the full model every epoch")


# ---- decoded-image cache ----------------------------------------------------------------------------
def cached_image(cache_dir, size, interpolation, path, draft_size=None, box=None):
    """load_image resized to size (H, W) as a uint8 CHW tensor, decoded once and then read back from a raw
    file in cache_dir. The file is named by the source's path, byte size and mtime (and size, box), so a
    changed image is decoded again; separate files need no locking between workers, ranks and runs."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{tuple(size)}|{interpolation}|{box}"
    file = Path(cache_dir) / f"{hashlib.sha1(key.encode()).hexdigest()}.u8"
    if file.is_file():
        return torch.from_numpy(np.fromfile(file, np.uint8).reshape(3, *size))
    image = T.Compose(resize_ops(tuple(size), interpolation_mode(interpolation)))(load_image(path, draft_size, box))
    pixels = image.as_subclass(torch.Tensor).contiguous()
    atomic_write(file, lambda tmp: pixels.numpy().tofile(tmp))
    return pixels


def image_reader(cfg, n_images, exact):
    """load_image, or cached_image for --cache: memory = files in RAM (/dev/shm) removed when this process
    ends; disk = --cache_dir, kept for later runs; auto = memory when the images fit in a quarter of RAM and
    the augmentation resizes first (exact: the same pixels as without the cache)."""
    size, mode, ram_dir = tuple(cfg.input_size[1:]), cfg.cache, Path("/dev/shm")
    needed = n_images * 3 * size[0] * size[1]
    if not (ram_dir.is_dir() and shutil.disk_usage(ram_dir).free > 2 * needed):
        ram_dir = Path(tempfile.gettempdir())  # a container's small /dev/shm: the page cache holds files too
    if mode == "auto":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        mode = "memory" if exact and 4 * needed < min(ram, shutil.disk_usage(ram_dir).free) else "none"
    if mode == "none":
        return load_image
    if mode == "disk":
        folder = Path(cfg.cache_dir or Path(tempfile.gettempdir()) / "kit-image-cache")
    else:  # one folder per run, shared by its loaders, workers and torchrun ranks
        run_key = hashlib.sha1(str(Path(cfg.run_dir).resolve()).encode()).hexdigest()[:12]
        folder = ram_dir / f"kit-image-cache-{run_key}"
        remove_abandoned_caches(ram_dir)
        folder.mkdir(exist_ok=True)
        (folder / "owner.pid").write_text(str(os.getpid()))
        atexit.register(shutil.rmtree, folder, True)
    return partial(cached_image, str(folder), size, cfg.interpolation)


def remove_abandoned_caches(ram_dir):
    """Memory caches of runs whose process is gone (killed before its exit could remove them): RAM back."""
    for owner in ram_dir.glob("kit-image-cache-*/owner.pid"):
        try:
            os.kill(int(owner.read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(owner.parent, ignore_errors=True)
        except (OSError, ValueError):  # another user's live process, or a file being written
            continue


def fill_cache(read, items, workers=None):
    """Decode (path, draft_size, box) items through read (a cached_image reader) on every core, so the first
    epoch reads a warm cache; returns [(path, reason)] of the images that did not decode."""
    with Pool(workers or os.cpu_count(), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        reasons = pool.starmap(partial(cache_one, read), items, chunksize=32)
    return [(item[0], reason) for item, reason in zip(items, reasons) if reason is not None]


def cache_one(read, path, draft_size, box):
    """None when the image decodes (and is now in the cache), else why not."""
    try:
        read(path, draft_size, box)
        return None
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"


def warm_cache(table, cfg, rank=0):
    """Every image decoded once before fold 0, on all cores (rank 0): with the cache on that pass fills it (the
    first epoch then reads it warm), else it only checks them (dataset.find_bad_images). Returns [(path, reason)]
    of the images that do not decode, on every rank."""
    size = cfg.input_size
    exact = resizes_first(build_transform(cfg.augmentation, size, cfg.interpolation, train=True))
    read, bad = image_reader(cfg, len(table), exact), []
    files = [str(Path(cfg.data_dir) / p) for p in table["path"]]
    if rank == 0 and read is load_image:
        bad = find_bad_images(files)
    elif rank == 0:
        boxes = image_boxes(table["path"], cfg.crop, cfg.crop_margin, cfg.center_crop) or [None] * len(table)
        start = time.perf_counter()
        bad = fill_cache(read, [(f, (size[2], size[1]), box) for f, box in zip(files, boxes)])
        print(f"cache: {len(table)} images decoded at {size[1]}x{size[2]} in {time.perf_counter() - start:.0f} s")
    return from_rank0(bad)


# ---- loaders: seeded per-image augmentation, persistent workers ---------------------------------------
class SeededSampler(Sampler):
    """Any sampler's rows as (row, seed): each drawn image is augmented from its own seed, a function of the
    epoch's seed and its place in the epoch, so the batches do not depend on which worker (or none) decodes
    them, and loader workers can persist across epochs. set_epoch also passes the epoch to a
    DistributedSampler."""

    def __init__(self, sampler):
        self.sampler, self.seed = sampler, 0

    def set_epoch(self, seed, epoch):
        """The epoch's row order and augmentation from its seed (a DistributedSampler's order from epoch)."""
        self.seed = seed % 2**31
        if getattr(self.sampler, "generator", None) is not None:
            self.sampler.generator.manual_seed(seed)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((row, self.seed * 2**32 + place) for place, row in enumerate(self.sampler))

    def __len__(self):
        return len(self.sampler)


class SeededDataset(Dataset):
    """A dataset read at (row, seed) items: the row's augmentation draws from that seed, and the caller's
    random stream (dropout, mixup) is left as it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed costs ~100x more
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


def loader_workers(cfg):
    """--num_workers, or by default none on a CPU (decoding in workers takes cores from the model; the cache
    makes reading cheap) and up to 8 per GPU process with a GPU."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    per_process = os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(8, max(1, per_process - 1)) if torch.cuda.is_available() else 0


def make_data_loader(dataset, sampler, batch_size, cfg, drop_last=False):
    """A DataLoader with the kit's speed settings; a training sampler is seeded per image (SeededSampler)."""
    workers = loader_workers(cfg)
    if sampler is not None:
        dataset, sampler = SeededDataset(dataset), SeededSampler(sampler)
    # the loader draws a seed from its own generator per new iterator (each epoch without persistent workers):
    # a separate one keeps the row order and the global stream (dropout, mixup) the same for any --num_workers
    return DataLoader(dataset, batch_size, sampler=sampler, generator=torch.Generator(), num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=drop_last)


# ---- --freeze_backbone: epochs of the head on features computed once -----------------------------------
FEATURE_MEMO = {}  # (backbone digest, views, images) -> {path: classifier input}: the folds of a run share it


def uses_feature_cache(cfg, world):
    """The frozen backbone's features can stand in for the images: nothing but a mirror augments them."""
    return (cfg.freeze_backbone and cfg.feature_cache and cfg.augmentation in ("base", "flip") and world == 1
            and not (cfg.mixup or cfg.cutmix or cfg.ema or cfg.compile))


def backbone_digest(model):
    """A hash of the backbone's weights and buffers (the head, trained per fold, left out)."""
    head = {id(t) for t in model.backbone.get_classifier().state_dict(keep_vars=True).values()}
    digest = hashlib.sha1()
    for name, tensor in model.backbone.state_dict(keep_vars=True).items():
        if id(tensor) not in head:
            digest.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def classifier_inputs(model, loader, cfg, device, views):
    """(what the classifier receives for each image of loader (and its mirror), flat as (N, views * F, 1, 1),
    a shape channels_last batches take; the classifier's input shape), computed in eval mode: a true linear
    probe (BatchNorm stays as loaded)."""
    captured = []
    hook = model.backbone.get_classifier().register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].float().cpu()))
    try:
        predict_probs(model, loader, cfg.head, device, cfg.amp, cfg.channels_last, tta=views == 2)
    finally:
        hook.remove()
    if not captured:
        raise UserError(f"{cfg.model} does not call its classifier module; pass --no-feature_cache")
    stored = torch.stack([torch.cat(captured[view::views]) for view in range(views)], 1)
    return stored.reshape(len(loader.dataset), -1, 1, 1), captured[0].shape[1:]


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


def feature_training(model, rows, loaders, cfg, device, plain_loader):
    """(head net, train loader, val loader) over stored features for the image loaders (train, val) of rows
    (train rows, val rows), batched in the image loader's order (same steps and generator, so the scheduler
    and --resume see the same epochs). plain_loader(rows) is an unshuffled image loader for the features."""
    views = 2 if cfg.augmentation == "flip" else 1
    key = (backbone_digest(model), views, tuple(cfg.input_size), str(Path(cfg.data_dir).resolve()), cfg.crop,
           cfg.crop_margin, tuple(cfg.center_crop or ()))
    if key not in FEATURE_MEMO:
        FEATURE_MEMO.clear()  # one backbone's features at a time
        FEATURE_MEMO[key] = {"features": {}, "shape": None}
    memo, both = FEATURE_MEMO[key], pd.concat(rows)
    missing = both[~both["path"].isin(memo["features"])]
    if len(missing):
        features, memo["shape"] = classifier_inputs(model, plain_loader(missing), cfg, device, views)
        memo["features"].update(zip(missing["path"], features))
    sets = [torch.utils.data.TensorDataset(torch.stack([memo["features"][p] for p in r["path"]]),
                                           torch.tensor(r["label"].to_numpy()), torch.arange(len(r)))
            for r in rows]
    train_loader = loaders[0]
    return (FeatureHead(model.backbone.get_classifier(), memo["shape"], views,
                        float(getattr(model.backbone, "drop_rate", 0.0))),
            DataLoader(sets[0], batch_sampler=BatchSampler(train_loader.sampler.sampler, train_loader.batch_size,
                                                           train_loader.drop_last)),
            DataLoader(sets[1], cfg.valid_batch_size))
