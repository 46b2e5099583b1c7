"""More than one process: torchrun's DistributedDataParallel, and --fold_per_device (one process per GPU).

    rank, world, device = setup_distributed()       # torchrun's environment, or one process
    probs = gather_predictions(probs, index, world)  # every rank's strided share of validation, in order
    launch_fold_per_device(train_py, run_dir, folds, config)   # waves of `train.py --resume RUN --fold i`, one per GPU
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from kit.checkpoints import load_last
from kit.common import UserError, atomic_write


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


def from_rank0(value):
    """Rank 0's value on every rank (the run folder, the unreadable images), or value in one process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box)
    return box[0]


def gather_predictions(probs, index, world):
    """All ranks' (index, probs) in index order (each rank evaluated a strided share)."""
    if world == 1:
        return probs
    shards = [None] * world
    dist.all_gather_object(shards, (index, probs))
    index = np.concatenate([s[0] for s in shards])
    return np.concatenate([s[1] for s in shards])[np.argsort(index)]


def finish_distributed(world):
    if world > 1:
        dist.destroy_process_group()


def launch_fold_per_device(train_py, run_dir, folds, config):
    """One process per GPU, in waves, each running the training script train_py (the caller's own file, so a
    copied and renamed train.py launches itself) on one fold of the same run folder."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # ids as this process sees them (e.g. "2,3")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    for first in range(0, len(folds), len(gpus)):
        procs = [subprocess.Popen([sys.executable, str(train_py), "--resume", str(run_dir), "--fold", str(f)],
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
                 for gpu, f in zip(gpus, folds[first:first + len(gpus)])]
        if any([p.wait() for p in procs]):  # a list: wait for every process before stopping
            raise UserError(f"a fold process failed (its output is above); continue with --resume {run_dir}")
    # the fold processes each rewrote log.csv (and may have raced); every last.pth holds its fold's log whole
    logs = [load_last(Path(run_dir) / f"fold{f}" / "last.pth", config)["log"] for f in folds]
    atomic_write(Path(run_dir) / "log.csv", lambda tmp: pd.DataFrame(sum(logs, [])).to_csv(tmp, index=False))
