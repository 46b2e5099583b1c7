"""Speed features, checked for behaviour (no timings): the decoded-image cache gives the very pixels the
uncached path gives and re-reads a changed image; the --freeze_backbone feature path writes a run folder
that inference reproduces; kit/bench.py prints every row and the table timing.
"""
import argparse
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
from kit import bench, predict, speed  # noqa: E402
import train  # noqa: E402
from dataset import build_table, build_transform  # noqa: E402
from kit.images import ImageDataset, image_boxes, load_image  # noqa: E402
from kit.speed import resizes_first  # noqa: E402
import inference  # noqa: E402
from kit.predict import load_run  # noqa: E402
from kit.predict import predict_probs  # noqa: E402
from model import create_model  # noqa: E402
from kit.speed import cached_image  # noqa: E402

SAMPLE = ROOT / "sample" / "train"
SIZE = (3, 40, 32)
TINY = ["--people", "off", "--data_dir", str(SAMPLE), "--model", "test_resnet", "--no-pretrained", "--resize", "64", "48",
        "--batch_size", "32", "--num_workers", "0", "--folds", "2", "--head", "single"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: much faster on a shared CPU


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def resize_of(size):
    """The leading resize of the kit's transforms at (3, H, W): what the image cache stores its pixels through."""
    return build_transform("base", size, "bilinear", train=False).transforms[0]


FLIP, STRONG = (build_transform(name, (3, 64, 48), "bilinear", train=True) for name in ("flip", "strong"))


def sample_files(count=24):
    table, *_ = build_table(SAMPLE, folds=2)
    return [str(SAMPLE / p) for p in table["path"][:count]], table["label"][:count].to_numpy()


def settings(argv, tmp_path, **known):
    """train.py's settings for argv, with what a run adds to them (input size, run folder) filled in."""
    return argparse.Namespace(**{**vars(train.parse_args(TINY + argv)), "input_size": [3, 64, 48],
                                 "interpolation": "bilinear", "run_dir": str(tmp_path / "run"), **known})


def epoch_of(dataset, seed):
    torch.manual_seed(seed)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.mark.parametrize("augmentation", ["base", "flip", "randaugment", "trivialaugment"])
def test_cache_gives_the_same_pixels_cold_and_warm(augmentation, tmp_path):
    files, labels = sample_files()
    transform = build_transform(augmentation, SIZE, "bilinear", train=True)
    assert resizes_first(transform)
    draft = (SIZE[2], SIZE[1])
    plain = ImageDataset(files, labels, transform, draft_size=draft)
    cached = ImageDataset(files, labels, transform, draft_size=draft,
                          read=partial(cached_image, str(tmp_path), resize_of(SIZE)))
    expected = epoch_of(plain, 0)
    assert torch.equal(epoch_of(cached, 0), expected)  # cold: decoded now, written to the cache
    assert len(list(tmp_path.iterdir())) == len(files)
    assert torch.equal(epoch_of(cached, 0), expected)  # warm: read back from the cache
    assert expected.dtype == torch.uint8 and expected.shape == (len(files), *SIZE)


def test_strong_augmentation_crops_before_resizing_so_auto_leaves_the_cache_off():
    assert not resizes_first(build_transform("strong", SIZE, "bilinear", train=True))
    assert resizes_first(build_transform("strong", SIZE, "bilinear", train=False))  # validation is exact


def test_a_changed_image_is_decoded_again(tmp_path):
    source = tmp_path / "photo.jpg"
    Image.new("RGB", (48, 64), (200, 30, 30)).save(source)
    read = partial(cached_image, str(tmp_path / "cache"), resize_of((3, 16, 12)))
    red = read(str(source))
    assert red[0].float().mean() > 150 and torch.equal(read(str(source)), red)
    Image.new("RGB", (48, 64), (20, 30, 220)).save(source)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    blue = read(str(source))
    assert blue[2].float().mean() > 150 and blue[0].float().mean() < 60
    assert len(list((tmp_path / "cache").iterdir())) == 2


def epochs_of(loader, epochs, seed=7):
    """The images of each epoch as train_fold draws them: the epoch's seed set on the seeded sampler."""
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(seed + epoch, epoch)
        out.append(torch.cat([b[0] for b in loader]))
    return out


def test_cache_modes_and_workers_give_the_loader_the_same_batches(tmp_path):
    """Row order and augmentation come from the epoch's seed alone: any cache mode, any --num_workers, and
    persistent workers that ran epoch 0 before give what a fresh loader (as after --resume) gives."""
    table, classes, _, layout = build_table(SAMPLE, folds=2)
    rows = table.head(40)

    def loader(cache, workers, augmentation="flip"):
        cfg = settings(["--cache", cache, "--cache_dir", str(tmp_path / "disk"), "--num_workers", str(workers),
                        "--augmentation", augmentation], tmp_path, classes=classes)
        return train.make_loader(rows, cfg, True)
    batches = {(cache, workers): epochs_of(loader(cache, workers), range(2))  # epoch 1 reads what 0 cached
               for cache, workers in (("none", 0), ("memory", 2), ("disk", 2), ("auto", 0))}
    expected = batches["none", 0]
    assert not torch.equal(expected[0], expected[1])  # each epoch flips other images
    for key, epochs in batches.items():
        assert all(torch.equal(a, b) for a, b in zip(epochs, expected)), key
    assert torch.equal(epochs_of(loader("none", 2), [1])[0], expected[1])  # a resumed epoch, fresh workers
    strong = [epochs_of(loader("none", workers, "strong"), range(2)) for workers in (0, 2)]
    assert all(torch.equal(a, b) for a, b in zip(*strong)) and not torch.equal(*strong[0])
    assert len(list((tmp_path / "disk").iterdir())) == len(rows)


def test_defaults_are_the_fast_path_for_the_device(monkeypatch):
    """No loader workers on a CPU (the model needs the cores; the cache makes reading cheap), up to 8 per
    GPU process with CUDA, the cache on when it gives the same pixels."""
    args = train.parse_args(["--data_dir", str(SAMPLE)])
    assert args.num_workers == -1 and args.cache == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert speed.loader_workers(args) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert speed.loader_workers(args) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 processes share the 32 cores
    assert speed.loader_workers(args) == 3
    assert speed.loader_workers(train.parse_args(["--num_workers", "5"])) == 5


def test_predict_probs_reads_each_image_once_for_every_model_and_view():
    """A fold ensemble with flip TTA decodes each image once: all models and both views run on that batch."""
    files, _ = sample_files(10)
    reads = []
    dataset = ImageDataset(files, None, build_transform("base", SIZE, train=False), draft_size=(32, 40),
                           read=lambda path, draft, box: reads.append(path) or load_image(path, draft, box))
    torch.manual_seed(0)
    models = [create_model("test_resnet", 18, pretrained=False) for _ in range(3)]
    probs, rows = predict_probs(models, torch.utils.data.DataLoader(dataset, 4), "single", torch.device("cpu"),
                                "off", True, tta=True)
    assert sorted(reads) == sorted(files) and rows.tolist() == list(range(10))
    images = torch.stack([dataset[i][0] for i in range(10)])
    with torch.no_grad():
        expected = sum(m.eval()(v).softmax(1) for m in models for v in (images, images.flip(3))) / 6
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)


def test_cross_run_ensemble_decodes_each_test_image_once(tiny_run_dir, tmp_path, monkeypatch):
    """Runs that read images alike share one decoding pass; every model still counts once in the average."""
    reads = []

    class CountingDataset(ImageDataset):
        def __getitem__(self, item):
            reads.append(item)
            return super().__getitem__(item)
    monkeypatch.setattr(predict, "ImageDataset", CountingDataset)  # what predict_files decodes with
    for name, runs in (("one", [tiny_run_dir]), ("two", [tiny_run_dir, tiny_run_dir])):
        monkeypatch.setattr(sys, "argv", ["inference.py", "--data_dir", str(ROOT / "sample/eval"), "--model_dir",
                                          *map(str, runs), "--output_dir",
                                          str(tmp_path / name), "--num_workers", "0"])
        reads.clear()
        inference.main()
        assert sorted(reads) == list(range(len(pd.read_csv(ROOT / "sample/eval/info.csv"))))
    one, two = (pd.read_csv(tmp_path / name / "probs.csv") for name in ("one", "two"))
    pd.testing.assert_frame_equal(one, two, rtol=0, atol=1e-4)  # bf16 sums in another order
    config = json.loads((tiny_run_dir / "config.json").read_text())
    groups = inference.decoding_groups([(config, ["a"]), (config, ["b"]), ({**config, "input_size": [3, 32, 32]},
                                                                          ["c"])])
    assert [models for _, models in groups] == [["a", "b"], ["c"]]


def test_inference_halves_a_batch_the_gpu_cannot_hold(tiny_run_dir, tmp_path, monkeypatch, capsys):
    """Inference starts with large batches; out of GPU memory, it halves them and gives the same answers."""
    real, sizes = predict.predict_probs, []

    def small_gpu(models, loader, *args, **kwargs):
        sizes.append(loader.batch_size)
        if loader.batch_size > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(models, loader, *args, **kwargs)
    argv = ["--data_dir", str(ROOT / "sample/eval"), "--model_dir", str(tiny_run_dir), "--num_workers", "0"]
    for name, patch in (("small", small_gpu), ("large", real)):
        monkeypatch.setattr(predict, "predict_probs", patch)
        monkeypatch.setattr(sys, "argv", ["inference.py", *argv, "--output_dir", str(tmp_path / name)])
        inference.main()
    assert sizes == [256, 128, 64, 32] and "out of GPU memory: --batch_size 32" in capsys.readouterr().out
    assert (tmp_path / "small/output.csv").read_text() == (tmp_path / "large/output.csv").read_text()


def test_image_reader_picks_the_cache_folder(tmp_path):
    cfg = settings(["--cache", "disk", "--cache_dir", str(tmp_path / "kept")], tmp_path)
    reader = speed.image_reader(cfg, 10, FLIP)
    assert reader.func is cached_image and reader.args == (str(tmp_path / "kept"), FLIP.transforms[0])
    assert tuple(reader.args[1].size) == (64, 48) and reader.args[1].interpolation.value == "bilinear"
    cfg.cache = "auto"
    assert speed.image_reader(cfg, 10, STRONG) is load_image  # strong augmentation: exact without
    assert speed.image_reader(cfg, 10**9, FLIP) is load_image  # 9 TB of pixels do not fit
    memory = speed.image_reader(cfg, 10, FLIP).args[0]
    assert "kit-image-cache-" in memory and memory != speed.image_reader(
        argparse.Namespace(**{**vars(cfg), "run_dir": str(tmp_path / "other")}), 10, FLIP).args[0]


# ---- --freeze_backbone on stored features --------------------------------------------------------------
@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, lite0_path):
    """A linear probe of the pretrained backbone (real ImageNet weights, offline: conftest.py's lite0_path):
    8 epochs of the head on stored features."""
    out = tmp_path_factory.mktemp("probe")
    probe = ["--model", "tf_efficientnet_lite0", "--weights", str(lite0_path)]
    result = subprocess.run([sys.executable, "train.py", *TINY, *probe, "--resize", "128", "96", "--epochs", "8",
                             "--freeze_backbone", "--cache", "auto",
                             "--lr", "0.01", "--model_dir", str(out), "--name", "probe"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "probe"


def test_feature_path_writes_the_whole_run_folder_and_leaves_no_memory_cache(probe_run):
    for name in ("config.json", "folds.csv", "oof.csv", "metrics.json", "log.csv", "confusion.png"):
        assert (probe_run / name).is_file(), name
    for fold in range(2):
        assert {p.name for p in (probe_run / f"fold{fold}").iterdir()} == {"best.pth", "last.pth", "oof.csv",
                                                                           "last_epoch_oof.csv"}
    log = pd.read_csv(probe_run / "log.csv")
    assert len(log) == 2 * 8 and log["train_loss"].notna().all()
    config = json.loads((probe_run / "config.json").read_text())
    assert config["feature_cache"] is True and config["cache"] == "auto"
    memory = speed.image_reader(argparse.Namespace(**config), 420, FLIP)  # sample fits
    assert memory.func is cached_image  # the run's folder again, made anew: the run's images were removed
    assert [p.name for p in Path(memory.args[0]).iterdir()] == ["owner.pid"]


def test_run_start_fills_the_cache_and_leaves_bad_images_to_the_loader(tmp_path, monkeypatch):
    """Before fold 0 every image is decoded into the cache on all cores: the first epoch then reads it warm."""
    table = build_table(SAMPLE, folds=2)[0].head(20)
    data_dir = tmp_path / "data"
    for path in table["path"]:
        (data_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / path).write_bytes((SAMPLE / path).read_bytes())
    (data_dir / table["path"][3]).write_bytes(b"")  # unreadable: the fill skips it, the loader would name it
    cfg = settings(["--data_dir", str(data_dir), "--cache", "memory"], tmp_path)
    files = [str(data_dir / p) for p in table["path"] if p != table["path"][3]]
    expected = [cached_image(str(tmp_path / "reference"), resize_of((3, 64, 48)), f, (48, 64)) for f in files]
    speed.warm_cache(table, cfg, FLIP)
    read = speed.image_reader(cfg, len(table), FLIP)
    assert len(list(Path(read.args[0]).glob("*.u8"))) == len(files)

    def no_decoding(*args):
        raise AssertionError("decoded again")
    monkeypatch.setattr(speed, "load_image", no_decoding)  # what cached_image calls on a miss
    assert all(torch.equal(read(f, (48, 64), None), e) for f, e in zip(files, expected))


def test_memory_caches_of_killed_runs_are_removed(tmp_path):
    """A run killed before its exit could remove its memory cache: the next run gives that RAM back."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name, pid in (("killed", gone), ("running", str(os.getpid())), ("unmarked", None)):
        (tmp_path / f"kit-image-cache-{name}").mkdir()
        (tmp_path / f"kit-image-cache-{name}" / "x.u8").write_bytes(b"pixels")
        if pid:
            (tmp_path / f"kit-image-cache-{name}" / "owner.pid").write_text(pid)
    speed.remove_abandoned_caches(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit-image-cache-running", "kit-image-cache-unmarked"]


def test_feature_path_checkpoint_predicts_its_own_oof_and_keeps_the_backbone(probe_run):
    """best.pth holds the whole Classifier: run on the images, it gives the OOF probabilities that
    were computed from stored features; the frozen backbone (BatchNorm too) is the fold's start."""
    models, config = load_run(probe_run, folds=[0])
    oof = pd.read_csv(probe_run / "fold0" / "oof.csv")
    files = [str(SAMPLE / p) for p in oof["path"]]
    size = config["input_size"]
    dataset = ImageDataset(files, None, build_transform("base", size, config["interpolation"], train=False),
                           image_boxes(files, center_crop=config["center_crop"]), draft_size=(size[2], size[1]))
    loader = torch.utils.data.DataLoader(dataset, 64)
    probs, _ = predict_probs(models, loader, "single", torch.device("cpu"), config["amp"], True)
    np.testing.assert_allclose(probs, oof[[f"p{i}" for i in range(18)]].to_numpy(), atol=2e-3)
    last = torch.load(probe_run / "fold0" / "last.pth", weights_only=False)["model"]
    best = torch.load(probe_run / "fold0" / "best.pth", weights_only=False)["model"]
    train.seed_everything(42 + 0)  # the fold's initialisation, as train_fold makes it
    start = create_model(config["model"], 18, pretrained=True, weights=config["weights"],
                               input_size=size)
    head = {"backbone." + k for k in start.backbone.get_classifier().state_dict(prefix=start.backbone.
                                                                                default_cfg["classifier"] + ".")}
    for key, value in start.state_dict().items():
        if key not in head:
            assert torch.equal(best[key], value) and torch.equal(last[key], value), key
    assert head and all(not torch.equal(best[key], start.state_dict()[key]) for key in head if "weight" in key)


def test_feature_path_probe_of_pretrained_weights_learns(probe_run):
    metrics = json.loads((probe_run / "metrics.json").read_text())
    assert metrics["oof_macro_f1"] > 0.25 and metrics["heads"]["mask"]["macro_f1"] > 0.6, metrics["oof_macro_f1"]


def test_feature_path_runs_the_backbone_once_per_image_for_every_fold(monkeypatch, tmp_path):
    """Two folds of one pretrained backbone: each image (and its mirror) goes through it once."""
    calls = []
    real = speed.frozen_outputs
    monkeypatch.setattr(speed, "frozen_outputs", lambda model, loader, *a: calls.append(len(loader.dataset)) or real(
        model, loader, *a))
    monkeypatch.setattr(train, "seed_everything", lambda seed: torch.manual_seed(0))  # same init every fold
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, "--epochs", "1", "--freeze_backbone", "--model_dir",
                                      str(tmp_path), "--name", "memo"])
    speed.FEATURE_MEMO.clear()
    train.main()
    assert calls == [420]  # fold 0 stored all 420 images; fold 1 found them stored
    assert (tmp_path / "memo" / "fold1" / "oof.csv").is_file()
    speed.FEATURE_MEMO.clear()


# ---- the feature cache of --freeze_blocks, and what both paths must keep -----------------------------------
@pytest.mark.parametrize("flags", [["--model", "test_efficientnet", "--freeze_blocks", "2", "--ema", "--head", "multi"],
                                   ["--freeze_backbone", "--train_age_bounds", "30", "58"]],
                         ids=["freeze_blocks", "probe_train_age_bounds"])
def test_feature_cache_trains_exactly_as_the_images_do(flags, tmp_path, monkeypatch, capsys):
    """The frozen layers' stored outputs give the very run the images give: each image's flip drawn from its own
    seed, the training labels (--train_age_bounds: the sample has people of 58 and 59), the same random stream
    (dropout): oof.csv byte-identical and every checkpoint tensor equal, with the frozen layers run once a fold."""
    for cache in ("--feature_cache", "--no-feature_cache"):
        speed.FEATURE_MEMO.clear()
        monkeypatch.setattr(sys, "argv", ["train.py", *TINY, *flags, "--epochs", "2", "--no-report", cache,
                                          "--model_dir", str(tmp_path), "--name", cache.strip("-")])
        train.main()
    speed.FEATURE_MEMO.clear()
    assert capsys.readouterr().out.count("feature cache: the frozen layers' output of") == 2  # --no-pretrained:
    cached, images = tmp_path / "feature_cache", tmp_path / "no-feature_cache"  # each fold's own init, so twice
    assert (cached / "oof.csv").read_bytes() == (images / "oof.csv").read_bytes()
    for fold in range(2):
        a, b = (torch.load(run / f"fold{fold}" / "best.pth", weights_only=False)["model"] for run in (cached, images))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(cached / "oof.csv")["pred"].nunique() > 1


def test_feature_cache_only_where_stored_outputs_are_what_the_model_would_see(tmp_path):
    efficientnet = create_model("test_efficientnet", 18, pretrained=False)
    resnet = create_model("test_resnet", 18, pretrained=False)
    uses = lambda *argv, model=efficientnet, world=1, images=420: speed.uses_feature_cache(
        settings(list(argv), tmp_path), model, world, images)
    assert uses("--freeze_blocks", "2") and uses("--freeze_backbone", model=resnet)
    assert uses("--freeze_blocks", "2", "--augmentation", "base", "--ema")
    assert not uses() and not uses("--freeze_blocks", "2", model=resnet)  # the cut is EfficientNet's only
    for argv in (["--augmentation", "trivialaugment"], ["--half_cutmix", "0.5"], ["--mixup", "0.2"], ["--cutmix", "1"],
                 ["--compile"], ["--no-feature_cache"]):
        assert not uses("--freeze_blocks", "2", *argv) and not uses("--freeze_backbone", *argv), argv
    assert not uses("--freeze_blocks", "2", world=2)
    assert not uses("--freeze_blocks", "2", images=10**8)  # 10^8 x 2 views x 24x16x12 floats: over a quarter of RAM


# ---- kit/bench.py (run in this process: a subprocess would spend most of its time importing torch) -----------
def test_bench_table_mode_builds_the_tree_and_times_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kit/bench.py", "--table", "--people", "30", "--work_dir", str(tmp_path)])
    bench.main()
    assert "table: 210 images, 30 people, 18 classes, 5 folds in" in capsys.readouterr().out
    assert len(list((tmp_path / "table_30" / "images").iterdir())) == 30


def test_bench_quick_prints_every_row_and_the_ratios(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kit/bench.py", "--quick", "--batches", "1", "--images", "14", "--work_dir",
                                      str(tmp_path), "--model", "test_resnet", "--resize", "32", "--batch_size",
                                      "8", "--num_workers", "0", "--cache", "memory"])
    bench.main()
    out = capsys.readouterr().out
    rows = {line[:26].strip(): line[26:].split() for line in out.splitlines()}
    for row in ("train loop", "fwd+bwd", "reference", "data", "data, cache", "infer TTA x1", "infer TTA x5",
                "train loop, cold cache", "train loop / fwd+bwd", "train loop / reference"):
        assert float(rows[row][0]) > 0, row
    assert "8 images of" in out and "2 rounds" in out and "peak RSS: this process" in out
    photos = sorted((tmp_path / "photos_14" / "images").rglob("*.jpg"))
    assert len(photos) == 14 and Image.open(photos[0]).size == (384, 512)
