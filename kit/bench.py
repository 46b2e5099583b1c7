"""Images per second of each part of a k-fold experiment on this machine, all measured in one run.

    python -m kit.bench                                 # 2,100 generated 384x512 photos, resnet18 at 128 px
    python -m kit.bench --resize 224 --num_workers 2    # any train.py argument: model, cache, amp, workers ...
    python -m kit.bench --data_dir data/train --model tf_efficientnet_lite0 --quick
    python -m kit.bench --table                         # table + 5 folds of a 2,700-person mask tree (target < 5 s)
    python -m kit.bench --run --images 18900 --resize 224 --folds 5 --epochs 1   # a whole run: time, peak memory
    python -m kit.bench --startup                       # a run's fixed cost: start -> first step, last epoch -> exit
    python -m kit.bench --startup --code_dir /tmp/old   # the same for another checkout, interleaved (A/B)

Rows, each timed with the kit's own functions:
  data            decode + augment alone: train.py's make_loader, its workers, no model (--cache none)
  data, cache     the same loader reading the decoded-image cache (train.py --cache)
  fwd+bwd         the model alone on synthetic uint8 batches (same batch, amp, channels_last, optimizer)
  train loop      make_loader + train_one_epoch: what train.py runs per epoch (round 1 fills the cache)
  infer TTA       predict_probs with flip TTA, for 1 model and for 5 (a fold ensemble on each decoded batch)
  reference       the boostcamp baseline's loop: PIL full decode, Resize on PIL, ToTensor + Normalize,
                  fp32, NCHW, same model, batch, workers and optimizer
Every row is timed once per round and the rounds interleave, so a busy machine slows all rows alike.
Rates are the median and the best of the warm rounds (round 1 fills the cache and is left out, but for
the cold-cache train loop); ratios are the median of per-round ratios, the ratio of the bests, and the
ratio of CPU ms per image (this process and its workers), which a shared machine disturbs least.
Loaders are made once and reused by every round, as a fold reuses them across epochs (their workers
persist). Generated data is written once under --work_dir and reused.
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kit.common import KitParser, UserError, atomic_write, run_main

ROOT = Path(__file__).resolve().parents[1]  # the checkout: train.py
PHOTO_SIZE = (384, 512)  # width, height of the competition's photos
MASK_STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
BENCH_DEFAULTS = ["--model", "resnet18", "--no-pretrained", "--resize", "128", "--folds", "2"]


def parse_args(argv=None):
    p = KitParser(prog="python -m kit.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                  epilog="Any other argument goes to train.py's parser (defaults here: " + " ".join(BENCH_DEFAULTS) + ").",
                  allow_abbrev=False)  # a train.py flag is never taken for the start of one of these
    p.add_argument("--data_dir", default=None, help="a kit layout to read (default: generated photos)")
    p.add_argument("--images", type=int, default=2100, help="generated photos (7 per person)")
    p.add_argument("--work_dir", default="/tmp/kit-bench", help="where generated data is kept")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the first fills the cache)")
    p.add_argument("--batches", type=int, default=6, help="training batches per row per round")
    p.add_argument("--quick", action="store_true", help="defaults of 2 rounds of 2 batches on 140 photos")
    p.add_argument("--table", action="store_true", help="only time the table + folds of --people people")
    p.add_argument("--run", action="store_true", help="only run train.py whole (any train.py arguments) on "
                   "the data, reporting its wall time and peak memory")
    p.add_argument("--people", type=int, default=2700, help="people in the --table tree (7 files each)")
    p.add_argument("--startup", action="store_true", help="only time a run's fixed cost on the embedded sample: "
                   "process start -> first training step, last epoch -> exit (resnet18, 128 px, 2 epochs, fold 0)")
    p.add_argument("--code_dir", default=None, help="with --startup: also time this checkout's train.py")
    args, train_argv = p.parse_known_args(argv)
    if args.quick:  # new defaults: what the command line names still wins
        p.set_defaults(rounds=2, batches=2, images=140)
        args, train_argv = p.parse_known_args(argv)
    return args, train_argv


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import train
from dataset import build_table
from kit import speed
from kit.device import amp_dtype, autocast, pick_device, to_device
from kit.images import load_image
from kit.predict import predict_probs
from model import create_model


# ---- generated data --------------------------------------------------------------------------------
def write_mask_tree(root, people, write_image):
    """A mask-layout folder (train.csv + images/<person>/<stem>.jpg) made once; train.csv comes last."""
    root = Path(root)
    if (root / "train.csv").is_file():
        return root
    rng, rows = np.random.default_rng(0), []
    for person in range(people):
        gender, age = ("male", "female")[person % 2], int(rng.integers(18, 75))
        folder = f"{person:06d}_{gender}_Asian_{age}"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        for stem in MASK_STEMS:
            write_image(root / "images" / folder / f"{stem}.jpg", rng)
        rows.append((f"{person:06d}", gender, "Asian", age, folder))
    frame = pd.DataFrame(rows, columns=["id", "gender", "race", "age", "path"])
    atomic_write(root / "train.csv", lambda tmp: frame.to_csv(tmp, index=False))
    return root


def photo_writer():
    """Writes photo-like 384x512 JPEGs: random crops of scikit-learn's two sample photos, with noise."""
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]

    def write(path, rng):
        src = photos[int(rng.integers(len(photos)))]
        height = int(src.height * rng.uniform(0.6, 1.0))
        width = height * PHOTO_SIZE[0] // PHOTO_SIZE[1]
        x, y = rng.integers(0, src.width - width + 1), rng.integers(0, src.height - height + 1)
        crop = src.crop((x, y, x + width, y + height)).resize(PHOTO_SIZE, Image.BILINEAR)
        noisy = np.asarray(crop, np.int16) + rng.integers(-6, 7, (PHOTO_SIZE[1], PHOTO_SIZE[0], 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return write


# ---- the rows --------------------------------------------------------------------------------------
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds():
    """CPU time of this process and its children: finished ones, and live ones (persistent loader workers)
    read from /proc, where there is one."""
    total = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for field in ("ru_utime", "ru_stime"))
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def timed(device, images, run):
    """(images/s, CPU ms per image) of run(), the device's queue drained at both ends. CPU time is what
    a busy machine barely changes: it shows what each image costs when the wall clock is shared."""
    synchronize(device)
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    synchronize(device)
    return images / (time.perf_counter() - wall), 1000 * (cpu_seconds() - cpu) / images


def data_rate(loader, device):
    """The loader alone (decode, augment, collate, workers)."""
    return timed(device, len(loader.dataset), lambda: sum(1 for _ in loader))


def fwd_bwd_rate(net, optimizer, criterion, batches, args, device):
    """Forward + backward + optimizer step on batches already in memory."""
    dtype = amp_dtype(device, args.amp)
    net.train()

    def run():
        for images, targets in batches:
            images, targets = to_device(images, device, args.channels_last), targets.to(device)
            with autocast(device, dtype):
                loss = criterion(net(images).float(), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return timed(device, sum(len(b[0]) for b in batches), run)


def infer_rate(models, loader, args, device):
    return timed(device, len(loader.dataset), lambda: predict_probs(models, loader, args.head, device, args.amp,
                                                                    args.channels_last, tta=True))


class BaselineDataset(Dataset):
    """The boostcamp baseline's data path: PIL opens and fully decodes, torchvision v1 transforms."""

    def __init__(self, files, labels, size, mean, std):
        self.files, self.labels = files, labels
        self.transform = transforms.Compose([transforms.Resize(size, Image.BILINEAR), transforms.ToTensor(),
                                             transforms.Normalize(mean=mean, std=std)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.transform(Image.open(self.files[index])), int(self.labels[index])


def reference_rate(model, optimizer, loader, device):
    """The baseline's training step: fp32, NCHW, loss.item() and matches every batch."""
    criterion, model = torch.nn.CrossEntropyLoss(), model.train()

    def run():
        matches = 0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outs = model(inputs)
            loss = criterion(outs, labels)
            loss.backward()
            optimizer.step()
            loss.item()
            matches += (outs.argmax(-1) == labels).sum().item()
    return timed(device, len(loader.dataset), run)


# ---- the bench ---------------------------------------------------------------------------------------
def setup(args, bench, device):
    """(rows, settings, fold objects) built by train.py's own functions for the bench's rows."""
    cfg, table, _ = train.run_settings(args, Path(bench.work_dir) / "run")
    rows = table.sample(min(len(table), bench.batches * cfg.batch_size), random_state=0).reset_index(drop=True)
    fold = train.build_fold(cfg, rows, len(rows) // cfg.batch_size + 1, device)
    fwd_bwd_rate(fold.net, fold.optimizer, fold.criterion, synthetic_batches(cfg, 1), cfg, device)  # warm-up
    return rows, cfg, fold


def synthetic_batches(cfg, count):
    return [(torch.randint(0, 256, (cfg.batch_size, *cfg.input_size), dtype=torch.uint8),
             torch.randint(0, len(cfg.classes), (cfg.batch_size,))) for _ in range(count)]


def make_loaders(rows, cfg):
    """train.py's loaders, made once as a fold makes them (workers persist across rounds as across epochs):
    training, training without the cache, evaluation."""
    return (train.make_loader(rows, cfg, True),
            train.make_loader(rows, argparse.Namespace(**{**vars(cfg), "cache": "none"}), True),
            train.make_loader(rows, cfg, False))


def measure_round(round_index, rows, cfg, fold, loaders, reference, device):
    """{row: (images/s, CPU ms per image)} of every row (train loop first: round 1 times a cold cache)."""
    loader, uncached_loader, eval_loader = loaders
    loader.sampler.set_epoch(cfg.seed + round_index, round_index)
    rates = {"train loop": timed(device, len(rows), lambda: train.train_one_epoch(fold, loader, cfg, device,
                                                                                  round_index, False))}
    rates["fwd+bwd"] = fwd_bwd_rate(fold.net, fold.optimizer, fold.criterion, synthetic_batches(cfg, len(loader)),
                                    cfg, device)
    ref_model, ref_optimizer, ref_loader = reference
    rates["reference"] = reference_rate(ref_model, ref_optimizer, ref_loader, device)
    rates["data"] = data_rate(uncached_loader, device)
    if loader.dataset.dataset.read is not load_image:  # the training loader reads the cache
        rates["data, cache"] = data_rate(loader, device)
    rates["infer TTA x1"] = infer_rate([fold.model], eval_loader, cfg, device)
    rates["infer TTA x5"] = infer_rate([fold.model] * 5, eval_loader, cfg, device)
    return rates


def make_reference(rows, cfg, device):
    files = [str(Path(cfg.data_dir) / p) for p in rows["path"]]
    dataset = BaselineDataset(files, rows["label"].to_numpy(), tuple(cfg.input_size[1:]), cfg.mean, cfg.std)
    loader = DataLoader(dataset, cfg.batch_size, shuffle=True, num_workers=speed.loader_workers(cfg),
                        pin_memory=torch.cuda.is_available())
    model = create_model(cfg.model, len(cfg.classes), "single", pretrained=False).backbone.to(device)  # 18-way
    return model, train.OPTIMIZERS[cfg.optimizer](model.parameters(), cfg.lr, cfg.weight_decay), loader


def report(all_rates, rows, cfg, device, seconds):
    """Rates (median and best of the warm rounds), CPU cost, ratios, peak memory and the machine's load."""
    warm = all_rates[1:] or all_rates
    size = "x".join(map(str, cfg.input_size[1:]))
    print(f"\n{len(rows)} images of {cfg.data_dir} at {size}, {cfg.model}, batch {cfg.batch_size}, "
          f"workers {speed.loader_workers(cfg)}, cache {cfg.cache}, amp {amp_dtype(device, cfg.amp)}, channels_last "
          f"{cfg.channels_last}, device {device}, {torch.get_num_threads()} threads, {len(all_rates)} rounds")
    print(f"{'images/s':<26}{'median':>10}{'best':>10}{'CPU ms/img':>12}")
    for key in all_rates[0]:
        rates = [r[key][0] for r in warm]
        cpu = statistics.median(r[key][1] for r in warm)
        print(f"{key:<26}{statistics.median(rates):>10.1f}{max(rates):>10.1f}{cpu:>12.2f}")
    if cfg.cache != "none" and len(all_rates) > 1:
        print(f"{'train loop, cold cache':<26}{all_rates[0]['train loop'][0]:>10.1f}{'':>10}"
              f"{all_rates[0]['train loop'][1]:>12.2f}")
    for a, b in (("train loop", "fwd+bwd"), ("train loop", "reference")):
        best = max(r[a][0] for r in warm) / max(r[b][0] for r in warm)
        by_cpu = statistics.median(r[b][1] for r in warm) / statistics.median(r[a][1] for r in warm)
        print(f"{a + ' / ' + b:<26}{statistics.median(r[a][0] / r[b][0] for r in warm):>10.2f}{best:>10.2f}"
              f"{by_cpu:>12.2f}")
    own, children = (resource.getrusage(w).ru_maxrss / 1024 for w in (resource.RUSAGE_SELF,
                                                                       resource.RUSAGE_CHILDREN))
    print(f"peak RSS: this process {own:.0f} MiB, largest child process {children:.0f} MiB; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {seconds:.0f} s")


def bench_table(bench):
    """Seconds to build the table and 5 folds of a generated tree (empty image files: nothing decodes)."""
    root = write_mask_tree(Path(bench.work_dir) / f"table_{bench.people}", bench.people,
                           lambda path, rng: path.touch())
    start = time.perf_counter()
    table, classes, notes, layout = build_table(root, folds=5)
    seconds = time.perf_counter() - start
    print(f"table: {len(table)} images, {table['profile'].nunique()} people, {len(classes)} classes, "
          f"5 folds in {seconds:.2f} s (layout {layout}); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def process_tree_memory(root):
    """Bytes of RAM held by a process and its descendants (loader workers, torchrun ranks): the sum of their
    PSS, which counts pages shared after a fork once, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except OSError:  # the process ended meanwhile
            continue
    pids, total = [root], 0
    while pids:
        pid = pids.pop()
        pids += children.get(pid, [])
        try:
            total += sum(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/smaps_rollup")
                         if line.startswith("Pss:"))
        except OSError:
            continue
    return total


def cache_bytes(since):
    """Bytes of the decoded-image cache folders (RAM in /dev/shm) made since a time."""
    total = 0
    for folder in [f for base in ("/dev/shm", tempfile.gettempdir()) for f in Path(base).glob("kit-image-cache-*")]:
        try:
            total += sum(file.stat().st_size for file in folder.iterdir()) if folder.stat().st_mtime >= since else 0
        except OSError:  # the run removed its folder meanwhile
            continue
    return total


def bench_run(bench, train_argv, data_dir):
    """Wall time and peak memory of one whole train.py run, sampled twice a second: the process tree's PSS,
    the cache files in RAM, and their sum."""
    run_dir = Path(bench.work_dir) / "runs" / time.strftime("%Y%m%d-%H%M%S")
    command = [sys.executable, str(ROOT / "train.py"), *BENCH_DEFAULTS, *train_argv, "--data_dir", str(data_dir),
               "--model_dir", str(run_dir.parent), "--name", run_dir.name]
    print(" ".join(command), flush=True)
    start, samples = time.time(), []
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            memory = (process_tree_memory(process.pid), cache_bytes(start))
            samples.append((round(time.time() - start, 1), *memory, sum(memory)))
            time.sleep(0.5)
    frame = pd.DataFrame(samples, columns=["seconds", "processes", "cache", "processes + cache"])
    frame.to_csv(f"{run_dir}.memory.csv", index=False)
    peaks = frame.drop(columns="seconds").max()
    lines = Path(f"{run_dir}.log").read_text().replace("\r", "\n").splitlines()
    print("\n".join(line for line in lines if line.startswith(("OOF", "fold sizes", "error"))))
    ram = speed.physical_ram()
    print(f"exit {process.returncode} in {time.time() - start:.0f} s; peak GiB: " + ", ".join(
        f"{k} {v / 2**30:.2f}" for k, v in peaks.items()) + f"; RAM {ram / 2**30:.0f} GiB; log {run_dir}.log, "
        f"memory over time {run_dir}.memory.csv")


STARTUP_RUN = ["--data_dir", "sample/train", "--model", "resnet18", "--no-pretrained", "--resize", "128",
               "--epochs", "2", "--fold", "0", "--name", "run"]


def timed_run(command, cwd, epochs):
    """(seconds to the first training step, seconds from the last epoch's line to exit, total) of a train.py
    run: its output is read as it comes, the first progress bar marks the first step."""
    start, first_step, last_epoch = time.perf_counter(), None, None
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = b""
    while chunk := os.read(process.stdout.fileno(), 65536):
        seen += chunk
        if first_step is None and b"epoch 1/" in seen:
            first_step = time.perf_counter() - start
        if last_epoch is None and f"epoch={epochs} ".encode() in seen:
            last_epoch = time.perf_counter() - start
    process.wait()
    total = time.perf_counter() - start
    if process.returncode or first_step is None or last_epoch is None:
        raise UserError(f"{' '.join(command)} failed: {seen.decode(errors='replace')[-500:]}")
    return first_step, total - last_epoch, total


def bench_startup(bench, train_argv):
    """A run's fixed cost (imports, table, image check, model, cache fill, report, TensorBoard) beside its
    training time, median of --rounds runs; with --code_dir the other checkout runs in the same rounds."""
    checkouts = {"this": ROOT}
    if bench.code_dir:
        checkouts["code_dir"] = Path(bench.code_dir).resolve()
    times = {name: [] for name in checkouts}
    for round_index in range(bench.rounds):
        for name, code in checkouts.items():
            out = Path(bench.work_dir) / "startup" / f"{name}{round_index}"
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(timed_run([sys.executable, "train.py", *STARTUP_RUN, *train_argv, "--model_dir",
                                          str(out)], code, 2))
    print(f"{'seconds (median of ' + str(bench.rounds) + ')':<24}{'to first step':>15}{'after last epoch':>18}"
          f"{'fixed cost':>12}{'whole run':>11}")
    for name, rows in times.items():
        before, after, total = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"{name + ' (' + str(checkouts[name]) + ')':<24}{before:>15.1f}{after:>18.1f}{before + after:>12.1f}"
              f"{total:>11.1f}")


def main():
    bench, train_argv = parse_args()
    if bench.table:
        return bench_table(bench)
    if bench.startup:
        return bench_startup(bench, train_argv)
    data_dir = bench.data_dir or write_mask_tree(Path(bench.work_dir) / f"photos_{bench.images}",
                                                 -(-bench.images // 7), photo_writer())
    if bench.run:
        return bench_run(bench, train_argv, data_dir)
    args = train.parse_args(BENCH_DEFAULTS + train_argv + ["--data_dir", str(data_dir)])
    device = pick_device()
    train.seed_everything(args.seed)
    start = time.perf_counter()
    rows, cfg, fold = setup(args, bench, device)
    reference = make_reference(rows, cfg, device)
    loaders, all_rates = make_loaders(rows, cfg), []
    for round_index in range(bench.rounds):
        all_rates.append(measure_round(round_index, rows, cfg, fold, loaders, reference, device))
        print(f"round {round_index + 1} (images/s): " + ", ".join(f"{k} {v[0]:.1f}" for k, v in
                                                                  all_rates[-1].items()), flush=True)
    report(all_rates, rows, cfg, device, time.perf_counter() - start)


if __name__ == "__main__":
    run_main(main)
