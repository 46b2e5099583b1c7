"""Speed machinery behind train.py's data path: none of it changes what a run learns, only how fast.

    loader = make_data_loader(dataset, sampler, batch_size, cfg, train=True)   # seeded, persistent workers
    read = image_reader(cfg, n_images, transform)      # load_image, or a decoded-image cache reader
    bad = warm_cache(table, cfg, transform, rank)      # decode every image once (filling the cache), name bad ones
    (net, eval_net), train_loader, val_loader = feature_training(fold, rows, loaders, cfg, device, plain_loader)

- Decoded-image cache: each image decoded once, resized to the input size and kept as raw uint8 in RAM
  (/dev/shm, removed when the run ends; runs killed before that are cleaned by the next run) or on disk.
- Loader workers: none on a CPU (the model needs every core), up to 8 per GPU process.
- Seeded per-image augmentation: the sampler yields (row, seed), so any --num_workers gives the same batches
  and workers can persist across epochs.
- Feature cache: frozen layers run once per image (and its mirror), the epochs train the rest on their stored
  output: the head of a --freeze_backbone probe, or an EfficientNet after its --freeze_blocks block groups
  (same batches, flips and random stream as the images: the same run, faster).
"""
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
from timm.models.efficientnet import EfficientNet
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T

from kit.common import UserError, atomic_write, duration_text
from kit.device import amp_dtype, autocast, to_device
from kit.distributed import from_rank0
from kit.images import DECODE_ERRORS, find_bad_images, image_boxes, load_image


# ---- decoded-image cache ----------------------------------------------------------------------------
def resizes_first(transform):
    """True when a transform (dataset.build_transform's) begins with a plain resize to the input size: then an
    image read from the cache, already at that size, gives the same pixels (the resize passes it unchanged)."""
    return isinstance(transform.transforms[0], T.Resize)


def check_cache(cfg, transform):
    """--cache memory or disk with a transform that does not resize first (strong crops the whole picture) would
    train on other pixels than the images give: one error line, before the run folder exists."""
    if cfg.cache in ("memory", "disk") and not resizes_first(transform):
        raise UserError(f"--cache {cfg.cache} keeps pictures resized to the input size, but --augmentation "
                        f"{cfg.augmentation} crops the whole picture first: use --cache auto (off here) or none")


def cached_image(cache_dir, resize, path, draft_size=None, box=None):
    """load_image through resize (a transform's leading T.Resize) as a uint8 CHW tensor, decoded once and then
    read back from a raw file in cache_dir. The file is named by the source's path, byte size and mtime (and
    size, box), so a changed image is decoded again; separate files need no locking between workers, ranks and
    runs."""
    stat = os.stat(path)
    size = tuple(resize.size)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{size}|{resize.interpolation.value}|{box}"
    file = Path(cache_dir) / f"{hashlib.sha1(key.encode()).hexdigest()}.u8"
    if file.is_file():
        return torch.from_numpy(np.fromfile(file, np.uint8).reshape(3, *size))
    image = T.Compose([resize, T.ToImage()])(load_image(path, draft_size, box))
    pixels = image.as_subclass(torch.Tensor).contiguous()
    atomic_write(file, lambda tmp: pixels.numpy().tofile(tmp))
    return pixels


CPU_RECIPE = ("recipes/cpu_quick.yaml", "9.3 minutes with inference",  # measured 2026-12-03 (recipes/README.md)
              "2,100 pictures, 5 folds, 2 cores of an AMD EPYC (Zen 4)")
LONG_ON_A_CPU = 30 * 60  # seconds: past this a CPU user without a recipe or a size hears of cpu_quick


EARLY_STEPS = 20  # training batches timed for the first estimate


def estimate(cfg, device, epoch_seconds, epochs, measured_on="its first epoch"):
    """The line that tells how long the run's epochs take in all (training and validation); on a CPU, a long run
    that chose neither a recipe nor a size also names the CPU recipe and its measured time."""
    seconds = epoch_seconds * epochs
    line = (f"estimate from {measured_on}: {epochs} epochs (folds x epochs) at {epoch_seconds:.0f} s each, training "
            f"and validation: about {duration_text(seconds)} in all")
    if device.type == "cpu" and seconds > LONG_ON_A_CPU and not (cfg.config or cfg.resize):
        path, minutes, measured = CPU_RECIPE
        line += (f"\nhint: on a CPU, python train.py --config {path} (with --weights for offline ImageNet weights) "
                 f"took {minutes} on {measured}: a smaller input, frozen early layers, 4 epochs")
    return line


def early_estimate(cfg, device, training_seconds, epochs):
    """The estimate from an epoch's first steps (training_seconds: all its batches at their pace), validation (a
    forward pass over a fold's share of the images) guessed at a third of a training step per image; train.py
    refines it after the epoch."""
    validation_share = (1 / max(cfg.folds - 1, 1) if cfg.folds > 1 else cfg.val_ratio / (1 - cfg.val_ratio)) / 3
    return estimate(cfg, device, training_seconds * (1 + validation_share), epochs, "its first steps")


def say_during_epoch(line, bar, epoch_text):
    """A line in the middle of an epoch: above a terminal's progress bar; in a file or a pipe on lines of its own,
    the epoch's number written again after it (its figures follow on that line)."""
    if bar.disable:
        print(f"\n{line}\n{epoch_text}", end=" ", flush=True)
    else:
        bar.write(line)


def physical_ram():
    """This machine's RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def image_reader(cfg, n_images, transform):
    """load_image, or cached_image for --cache: memory = files in RAM (/dev/shm) removed when this process
    ends; disk = --cache_dir, kept for later runs; auto = memory when the images fit in a quarter of RAM. Only
    for a transform that resizes first (the same pixels as without the cache): train.py refuses --cache memory or
    disk with any other."""
    size, mode, ram_dir = tuple(cfg.input_size[1:]), cfg.cache, Path("/dev/shm")
    needed = n_images * 3 * size[0] * size[1]
    if not (ram_dir.is_dir() and shutil.disk_usage(ram_dir).free > 2 * needed):
        ram_dir = Path(tempfile.gettempdir())  # a container's small /dev/shm: the page cache holds files too
    if mode == "auto":
        mode = "memory" if 4 * needed < min(physical_ram(), shutil.disk_usage(ram_dir).free) else "none"
    if mode == "none" or not resizes_first(transform):
        return load_image
    if mode == "disk":
        folder = Path(cfg.cache_dir or Path(tempfile.gettempdir()) / "kit-image-cache")
    else:  # one folder per run, shared by its loaders, workers, torchrun ranks and --fold_per_device processes
        run_key = hashlib.sha1(str(Path(cfg.run_dir).resolve()).encode()).hexdigest()[:12]
        folder = ram_dir / f"kit-image-cache-{run_key}"
        remove_abandoned_caches(ram_dir)
        folder.mkdir(exist_ok=True)
        own_memory_cache(folder)
    return partial(cached_image, str(folder), transform.transforms[0])


def own_memory_cache(folder):
    """This process removes the folder when it ends, unless a live process owns it already (the --fold_per_device
    launcher, a torchrun rank): its fold processes and ranks read it and leave it, and the owner removes it last."""
    owner = folder / "owner.pid"
    try:
        pid = int(owner.read_text())
        if pid != os.getpid():
            os.kill(pid, 0)  # raises ProcessLookupError for a dead owner
        return  # this process or another live one owns it
    except (FileNotFoundError, ProcessLookupError, ValueError):  # no owner yet, or a dead one: take it over
        pass
    except OSError:  # another user's live process
        return
    owner.write_text(str(os.getpid()))
    atexit.register(shutil.rmtree, folder, True)


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


def warm_cache(table, cfg, transform, rank=0):
    """Every image decoded once before fold 0, on all cores (rank 0): with the cache on that pass fills it (the
    first epoch then reads it warm), else it only checks them (kit.images.find_bad_images). transform: the
    training transform. Returns [(path, reason)] of the images that do not decode, on every rank."""
    size = cfg.input_size
    read, bad = image_reader(cfg, len(table), transform), []
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
def mixed_seed(*numbers):
    """A seed in 0..2**32-1 for a tuple of numbers (e.g. seed, fold, epoch, rank), hashed so that every tuple
    draws its own stream: torch's CPU generator keeps only a seed's low 32 bits, so seed * 2**32 + place would
    give every epoch the same draws."""
    return int.from_bytes(hashlib.blake2b(repr(numbers).encode(), digest_size=4).digest(), "little")


class SeededSampler(Sampler):
    """Any sampler's rows as (row, seed): each drawn image is augmented from its own seed, mixed from the epoch's
    seed and its place in the epoch, so the batches do not depend on which worker (or none) decodes them, and
    loader workers can persist across epochs. set_epoch also passes the epoch to a DistributedSampler."""

    def __init__(self, sampler):
        self.sampler, self.seed = sampler, 0

    def set_epoch(self, seed, epoch):
        """The epoch's row order and augmentation from its seed (a DistributedSampler's order from epoch)."""
        self.seed = seed
        if getattr(self.sampler, "generator", None) is not None:
            self.sampler.generator.manual_seed(seed)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((row, mixed_seed(self.seed, place)) for place, row in enumerate(self.sampler))

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


# ---- frozen layers run once per image: --freeze_backbone (a linear probe) and --freeze_blocks -------------
FEATURE_MEMO = {}  # (frozen weights, part, views, images) -> {path: stored views}: the folds of a run share it


def uses_feature_cache(cfg, model, world, n_images):
    """The frozen layers' outputs can stand in for the images: nothing but a mirror augments them, nothing mixes
    pixels, one process, and they fit in a quarter of RAM. Frozen layers: the whole backbone (a linear probe, any
    timm model) or, for timm's EfficientNet family, the stem and the first --freeze_blocks block groups."""
    if not (cfg.feature_cache and cfg.augmentation in ("base", "flip") and world == 1
            and not (cfg.mixup or cfg.cutmix or cfg.half_cutmix or cfg.compile)):
        return False
    if cfg.freeze_backbone:
        per_image = model.backbone.num_features
    elif cfg.freeze_blocks and isinstance(model.backbone, EfficientNet):
        with torch.no_grad():  # one blank picture on the model's device gives the output's size
            blank = torch.zeros(1, *cfg.input_size, device=model.mean.device)
            per_image = frozen_blocks(model.eval(), blank, cfg.freeze_blocks).numel()
    else:
        return False
    return 4 * n_images * 2 * per_image * 4 < physical_ram()  # two views of float32


def frozen_blocks(model, images, blocks):
    """An EfficientNet's stem and first `blocks` block groups on 0-255 images (timm's forward_features, cut)."""
    backbone = model.backbone
    return backbone.blocks[:blocks](backbone.bn1(backbone.conv_stem(model.normalize(images))))


def trunk_tensors(model, blocks):
    """The weights and statistics of an EfficientNet Classifier's input normalization, stem and first blocks."""
    backbone = model.backbone
    parts = [model.mean, model.std, *backbone.conv_stem.state_dict().values(), *backbone.bn1.state_dict().values()]
    return parts + list(backbone.blocks[:blocks].state_dict().values())


def shared_trunk(models, blocks):
    """blocks when every model is an EfficientNet whose stem and first `blocks` block groups hold the very same
    tensors (a --freeze_blocks run's fold models: pretrained and frozen alike), else 0: then the trunk can run once
    for all of them."""
    if not blocks or not all(isinstance(m.backbone, EfficientNet) for m in models):
        return 0
    first = trunk_tensors(models[0], blocks)
    same = all(all(torch.equal(a, b) for a, b in zip(first, trunk_tensors(m, blocks))) for m in models[1:])
    return blocks if same else 0


class AfterFrozenBlocks(torch.nn.Module):
    """The rest of an EfficientNet Classifier on the stored output of its first `blocks` block groups: the same
    modules and arithmetic as the whole model's forward, so the same logits."""

    def __init__(self, model, blocks):
        super().__init__()
        self.model, self.blocks = model, blocks

    def forward(self, stored):
        backbone = self.model.backbone
        return backbone.forward_head(backbone.bn2(backbone.conv_head(backbone.blocks[self.blocks:](stored))))


class AfterBackbone(torch.nn.Module):
    """A linear probe's head on the stored classifier inputs: the backbone's dropout, then its classifier."""

    def __init__(self, model):
        super().__init__()
        self.classifier, self.drop_rate = model.backbone.get_classifier(), float(getattr(model.backbone, "drop_rate", 0))

    def forward(self, stored):
        features = torch.nn.functional.dropout(stored.flatten(1), self.drop_rate, self.training)
        return self.classifier(features)


def backbone_digest(model):
    """A hash of the backbone's weights and buffers (the head, trained per fold, left out)."""
    head = {id(t) for t in model.backbone.get_classifier().state_dict(keep_vars=True).values()}
    digest = hashlib.sha1()
    for name, tensor in model.backbone.state_dict(keep_vars=True).items():
        if id(tensor) not in head:
            digest.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_part(model, images, cfg, captured):
    """The frozen layers' output: the stem and first --freeze_blocks block groups, or a linear probe's pooled
    features (what its classifier receives, which a forward hook appends to captured)."""
    if not cfg.freeze_backbone:
        return frozen_blocks(model, images, cfg.freeze_blocks)
    model(images)
    if not captured:
        raise UserError(f"{cfg.model} does not call its classifier module; pass --no-feature_cache")
    return captured.pop()[..., None, None]  # (N, F, 1, 1): a shape channels_last batches take


@torch.no_grad()
def frozen_outputs(model, loader, cfg, device, views):
    """The frozen layers' output for each image of loader and, with views=2, its mirror: a list of (views, ...)
    tensors in the dtype they ran in, computed in eval mode (frozen BatchNorm keeps its statistics in training)."""
    captured = []
    hook = model.backbone.get_classifier().register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    model.eval()
    dtype, stored = amp_dtype(device, cfg.amp), []
    try:
        for images, _, _ in loader:
            with autocast(device, dtype):  # each view as a training batch gives it to the model
                outputs = [frozen_part(model, to_device(view, device, cfg.channels_last), cfg, captured)
                           for view in (images, images.flip(3))[:views]]
            stored.extend(torch.stack(outputs, 1).cpu().unbind(0))
    finally:
        hook.remove()
    return stored


class StoredViews(Dataset):
    """Stored outputs read like the ImageDataset they stand for: (the view that image's augmentation gives, label,
    row). Training draws the flip as the image transform does (it runs on a marked blank picture under the same
    seed), so batches, flips and the random stream are the image path's; evaluation takes the image itself."""

    def __init__(self, stored, images, train):
        self.stored, self.labels, self.transform, self.train = stored, images.labels, images.transform, train
        self.marker = torch.zeros(1, *images.transform.transforms[0].size, dtype=torch.uint8)
        self.marker[..., 0] = 255

    def __len__(self):
        return len(self.stored)

    def __getitem__(self, index):
        views = self.stored[index]
        mirrored = self.train and len(views) == 2 and self.transform(self.marker)[0, 0, 0] == 0
        return views[int(mirrored)], int(self.labels[index]), index


def feature_training(t, rows, loaders, cfg, device, plain_loader):
    """((training net, evaluation net), train loader, val loader): the layers after the frozen ones, on stored
    outputs of (train rows, val rows) batched as the image loaders batch them (same sampler: the scheduler and
    --resume see the same epochs). plain_loader(rows) is an unshuffled image loader for the stored outputs."""
    views = 2 if cfg.augmentation == "flip" else 1
    key = (backbone_digest(t.model), cfg.freeze_backbone, cfg.freeze_blocks, views, tuple(cfg.input_size),
           str(Path(cfg.data_dir).resolve()), cfg.crop, cfg.crop_margin, tuple(cfg.center_crop or ()),
           cfg.interpolation, cfg.amp, cfg.channels_last)
    if key not in FEATURE_MEMO:
        FEATURE_MEMO.clear()  # one backbone's outputs at a time
        FEATURE_MEMO[key] = {}
    memo, both = FEATURE_MEMO[key], pd.concat(rows)
    missing = both[~both["path"].isin(memo)]
    if len(missing):
        start = time.perf_counter()
        memo.update(zip(missing["path"], frozen_outputs(t.model, plain_loader(missing), cfg, device, views)))
        print(f"feature cache: the frozen layers' output of {len(missing)} images x {views} views stored in "
              f"{time.perf_counter() - start:.0f} s")
    train_images, val_images = loaders[0].dataset.dataset, loaders[1].dataset  # (the training one is seeded)
    train_set, val_set = (StoredViews([memo[p] for p in r["path"]], images, train) for r, images, train in
                          ((rows[0], train_images, True), (rows[1], val_images, False)))
    rest = (lambda model: AfterBackbone(model)) if cfg.freeze_backbone else (
        lambda model: AfterFrozenBlocks(model, cfg.freeze_blocks))
    # the image loader's own sampler (train_fold seeds it each epoch) and a generator of its own: the global
    # random stream (dropout) is left as the image path leaves it
    train_loader = DataLoader(SeededDataset(train_set), loaders[0].batch_size, sampler=loaders[0].sampler,
                              generator=torch.Generator(), drop_last=loaders[0].drop_last)
    return ((rest(t.model), rest(t.ema.module if t.ema is not None else t.model)), train_loader,
            DataLoader(val_set, loaders[1].batch_size))
