"""Reliability: a killed run resumes to the very same result, unreadable images are named, a wrong
submission is never written, and every user mistake ends in one 'error: ...' line, a non-zero exit
and no half-written file.

The mistakes run a script's main() in this process through common.run_main, the same code that
`python train.py ...` runs, so the table below does not pay a torch import per case; the kill/resume,
dataset.py --verify and inference bad-image tests run the real scripts in subprocesses.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
from kit import app, common, crop_faces, export, gradcam, label_issues, report  # noqa: E402
import dataset  # noqa: E402
import inference  # noqa: E402
from kit.images import load_image  # noqa: E402
import train  # noqa: E402
from kit.common import UserError, run_main  # noqa: E402
from dataset import mask_class_names  # noqa: E402
from model import create_model  # noqa: E402

SAMPLE = ROOT / "sample"
PEOPLE = 16  # the first 16 people of sample/train: 112 images, 2 folds of 8 people
TINY = ["--people", "off", "--model", "test_resnet", "--no-pretrained", "--resize", "32", "--epochs", "3", "--folds", "2",
        "--batch_size", "8"]
# One thread: several times faster on a shared CPU, and every run of a comparison computes alike.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---- data and runs ------------------------------------------------------------------------------
def copy_people(dest, people=PEOPLE):
    """The first `people` people of sample/train in the mask layout (train.csv + images/)."""
    table = pd.read_csv(SAMPLE / "train" / "train.csv", dtype=str, keep_default_na=False).head(people)
    for folder in table["path"]:
        shutil.copytree(SAMPLE / "train" / "images" / folder, dest / "images" / folder)
    table.to_csv(dest / "train.csv", index=False)
    return dest


def copy_eval(dest, images=16):
    """The first `images` rows of sample/eval/info.csv and their images."""
    info = pd.read_csv(SAMPLE / "eval" / "info.csv", dtype=str).head(images)
    (dest / "images").mkdir(parents=True)
    for name in info["ImageID"]:
        shutil.copy(SAMPLE / "eval" / "images" / name, dest / "images" / name)
    info.to_csv(dest / "info.csv", index=False)
    return dest


def truncate(path):
    """Cut a JPEG in half, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory):
    return copy_people(tmp_path_factory.mktemp("clean") / "train")


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """The small sample with a truncated JPEG and a zero-byte file; returns (data_dir, bad paths)."""
    data_dir = copy_people(tmp_path_factory.mktemp("bad") / "train")
    people = sorted((data_dir / "images").iterdir())
    truncated, empty = people[0] / "mask1.jpg", people[3] / "normal.jpg"
    truncate(truncated)
    empty.write_bytes(b"")
    return data_dir, [truncated, empty]


def train_command(data_dir, model_dir, name, *extra):
    return [sys.executable, "train.py", "--data_dir", str(data_dir), *TINY, "--model_dir", str(model_dir),
            "--name", name, *map(str, extra)]


def run_script(command):
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, bad_data):
    """A run never interrupted, on the data with bad images (skipped), one loader worker."""
    model_dir = tmp_path_factory.mktemp("reference")
    result = run_script(train_command(bad_data[0], model_dir, "ref", "--skip_bad_images", "--num_workers", 1))
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir / "ref"


def cli(monkeypatch, capsys, module, argv):
    """Run module.main() as its command line does; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_main(module.main)
    return stopped.value.code, capsys.readouterr().err


def snapshot(*roots):
    """Every file under roots with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in Path(root).rglob("*")
            if p.is_file()}


# ---- 1. resume, atomic writes --------------------------------------------------------------------
def read_oof(path):
    return pd.read_csv(path, dtype={"profile": str}, keep_default_na=False)


def test_killed_run_resumes_to_the_same_result(tmp_path, bad_data, reference_run):
    command = train_command(bad_data[0], tmp_path, "killed", "--skip_bad_images", "--num_workers", 1)
    run_dir, deadline = tmp_path / "killed", time.monotonic() + 240
    def into_next_epoch():  # fold 0 done, fold 1 has saved epoch 1 and its progress bar shows epoch 2
        text = (tmp_path / "killed.log").read_text()
        return (run_dir / "fold1" / "last.pth").exists() and "epoch 2/3" in text[text.rfind("epoch 1/3"):]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            while not into_next_epoch():
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.01)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert not (run_dir / "fold1" / "oof.csv").exists(), "the kill came too late: fold 1 had finished"
    saved_epoch = torch.load(run_dir / "fold1" / "last.pth", weights_only=False)["epoch"]
    assert f"epoch {saved_epoch + 2}/3" in (tmp_path / "killed.log").read_text()  # killed inside the next epoch
    fold0 = snapshot(run_dir / "fold0")

    resumed = run_script([sys.executable, "train.py", "--resume", str(run_dir)])

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "fold 0: finished earlier, kept" in resumed.stdout
    assert f"fold 1: resuming at epoch {saved_epoch + 2}" in resumed.stdout
    assert {p: v for p, v in snapshot(run_dir / "fold0").items() if p.name != "oof.csv"} == \
        {p: v for p, v in fold0.items() if p.name != "oof.csv"}  # fold 0 was not retrained
    for name in ("fold0/oof.csv", "fold1/oof.csv", "oof.csv"):
        got, want = read_oof(run_dir / name), read_oof(reference_run / name)
        assert got["pred"].tolist() == want["pred"].tolist(), name
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-6)
    log_columns = ["fold", "epoch", "train_loss", "train_f1", "val_f1", "val_acc", "lr"]  # img_s is timing
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "log.csv")[log_columns],
                                  pd.read_csv(reference_run / "log.csv")[log_columns], rtol=0, atol=1e-6)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "output.csv"
    target.write_text("good\n")

    def crash(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(target, crash)
    assert target.read_text() == "good\n" and [p.name for p in tmp_path.iterdir()] == ["output.csv"]


# ---- 2. bad images ------------------------------------------------------------------------------
def test_verify_names_every_unreadable_image(bad_data):
    data_dir, bad = bad_data
    result = run_script([sys.executable, "dataset.py", "--data_dir", str(data_dir), "--verify"])
    assert result.returncode == 2
    assert result.stderr.startswith("error: 2 unreadable images") and "Traceback" not in result.stderr
    assert all(str(path) in result.stderr for path in bad)
    assert "truncated" in result.stderr and "cannot identify image file" in result.stderr


def test_training_stops_before_it_starts_naming_every_bad_image(tmp_path, bad_data, monkeypatch, capsys):
    data_dir, bad = bad_data
    code, err = cli(monkeypatch, capsys, train, ["--data_dir", data_dir, *TINY, "--num_workers", 0,
                                                 "--model_dir", tmp_path, "--name", "x"])
    assert code == 2 and err.startswith("error: 2 unreadable images") and err.count("\n") == 1
    assert all(str(path) in err for path in bad) and "--skip_bad_images" in err
    assert not any(tmp_path.iterdir())


def test_skip_bad_images_trains_without_them_and_lists_them(reference_run, bad_data):
    data_dir, bad = bad_data
    listed = pd.read_csv(reference_run / "bad_images.csv")
    assert sorted(listed["path"]) == sorted(map(str, bad))
    assert listed["reason"].str.contains("truncated").any()
    bad_rows = {os.path.relpath(p, data_dir) for p in bad}
    for table in (pd.read_csv(reference_run / "folds.csv"), read_oof(reference_run / "oof.csv")):
        assert len(table) == PEOPLE * 7 - 2 and not bad_rows & set(table["path"])


def test_inference_never_skips_a_bad_test_image(tmp_path, reference_run):
    eval_dir = copy_eval(tmp_path / "eval")
    broken = sorted((eval_dir / "images").iterdir())[5]
    truncate(broken)
    result = run_script([sys.executable, "inference.py", "--data_dir", str(eval_dir), "--model_dir",
                         str(reference_run), "--output_dir", str(tmp_path / "out"), "--num_workers", "0"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: 1 unreadable test images") and str(broken) in result.stderr
    assert not (tmp_path / "out").exists()


# ---- 3. submission guard ------------------------------------------------------------------------
def mask_probs(rows, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(18), rows).astype(np.float32)


def test_a_wrong_submission_is_never_written_and_a_good_one_is_kept(tmp_path):
    info_path = copy_eval(tmp_path / "eval") / "info.csv"
    template = pd.read_csv(info_path, dtype=str, keep_default_na=False)
    config, out = {"classes": mask_class_names(), "layout": "mask"}, tmp_path / "out"
    good = inference.write_outputs(out, template, config, mask_probs(len(template)), info_path)
    assert good["ans"].tolist() == mask_probs(len(template)).argmax(1).tolist()
    kept = snapshot(out)
    nan_probs = mask_probs(len(template))
    nan_probs[3, 7] = np.nan
    wrong = {"shuffled ids": (template.sample(frac=1, random_state=0), mask_probs(len(template)), "ids"),
             "a row lost": (template.iloc[:-1], mask_probs(len(template) - 1), "rows"),
             "NaN probability": (template, nan_probs, "NaN"),
             "probabilities for fewer rows": (template, mask_probs(len(template) - 2), "shape")}
    for case, (frame, probs, expected) in wrong.items():
        with pytest.raises(UserError, match=expected):
            inference.write_outputs(out, frame, config, probs, info_path)
        assert snapshot(out) == kept, case
    with pytest.raises(UserError, match="18 classes"):  # answers must be classes of the run
        inference.check_submission(good.assign(ans=18), template, mask_probs(len(template)), config["classes"],
                                   "mask", info_path)


def test_inference_refuses_a_reordered_template(tmp_path, reference_run, monkeypatch, capsys):
    """If the rows handed to the model ever come in another order than info.csv, nothing is written."""
    eval_dir = copy_eval(tmp_path / "eval")
    read = inference.read_test_table

    def reordered(data_dir, submission=None):
        frame, files, path = read(data_dir, submission)
        order = np.random.default_rng(0).permutation(len(frame))
        return frame.iloc[order].reset_index(drop=True), [files[i] for i in order], path

    monkeypatch.setattr(inference, "read_test_table", reordered)
    code, err = cli(monkeypatch, capsys, inference, ["--data_dir", eval_dir, "--model_dir", reference_run,
                                                     "--output_dir", tmp_path / "out", "--num_workers", 0])
    assert code == 2 and err.startswith("error:") and "info.csv" in err
    assert not (tmp_path / "out").exists()


# ---- 4. training guard --------------------------------------------------------------------------
class NanLoss(torch.nn.Module):
    def forward(self, logits, target):
        return logits.sum() * float("nan")


def test_nan_loss_stops_the_fold_naming_step_and_images(tmp_path, clean_data, monkeypatch, capsys):
    monkeypatch.setattr(train, "create_criterion", lambda *args, **kwargs: NanLoss())
    code, err = cli(monkeypatch, capsys, train, ["--data_dir", clean_data, *TINY, "--num_workers", 0,
                                                 "--model_dir", tmp_path, "--name", "x"])
    message = err.strip().splitlines()[-1]
    print(message)
    assert code == 2 and message.startswith("error: loss is nan at epoch 1 step 0")
    assert str(clean_data / "images") in message and "--lr" in message and "--amp" in message
    assert not list(tmp_path.glob("x/fold*/*.pth"))


def test_nan_loss_between_progress_updates_names_its_own_step(tmp_path, clean_data, monkeypatch, capsys):
    """Losses are checked at progress updates (no host sync per step), still naming the first bad step."""
    calls = []

    class LaterNan(torch.nn.Module):
        def forward(self, logits, target):
            calls.append(1)
            return torch.nn.functional.cross_entropy(logits, target) * (float("nan") if len(calls) == 3 else 1)
    monkeypatch.setattr(train, "create_criterion", lambda *args, **kwargs: LaterNan())
    code, err = cli(monkeypatch, capsys, train, ["--data_dir", clean_data, *TINY, "--num_workers", 0, "--head",
                                                 "single", "--log_interval", 50, "--model_dir", tmp_path, "--name", "x"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: loss is nan at epoch 1 step 2;")


def test_out_of_memory_names_the_batch_size_and_suggests_accumulation(tmp_path, clean_data, monkeypatch,
                                                                      capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_one_epoch", out_of_memory)
    code, err = cli(monkeypatch, capsys, train, ["--data_dir", clean_data, *TINY, "--num_workers", 0,
                                                 "--model_dir", tmp_path, "--name", "x"])
    message = err.strip().splitlines()[-1]
    print(message)
    assert code == 2 and message.startswith("error: out of memory") and "Traceback" not in err
    assert "--batch_size 8" in message and "--batch_size 4 --accum_steps 2" in message


# ---- 5. the bad-input table ---------------------------------------------------------------------
def edit_csv(path, change):
    change(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def data(w, edit=None):
    """A fresh copy of the clean data, changed by edit(data_dir)."""
    data_dir = shutil.copytree(w.clean, w.tmp / "data")
    if edit:
        edit(data_dir)
    return data_dir


def csv_layout(w, columns=("path", "label")):
    """The clean data as the csv layout: labels.csv with the given columns, no train.csv."""
    data_dir = data(w)
    table = dataset.build_table(w.clean, folds=2)[0]
    (data_dir / "train.csv").unlink()
    table[list(columns)].to_csv(data_dir / "labels.csv", index=False)
    return data_dir


def training(data_dir, w, *extra):
    return ["--data_dir", data_dir, *TINY, "--num_workers", 0, "--model_dir", w.tmp / "models", "--name", "x",
            *extra]


def misfit_weights(w):
    """test_resnet weights with the stem convolution of another width."""
    state = timm.create_model("test_resnet").state_dict()
    state["conv1.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, w.tmp / "misfit.pth")
    return w.tmp / "misfit.pth"


def config_file(w, settings):
    (w.tmp / "config.yaml").write_text(json.dumps(settings))
    return w.tmp / "config.yaml"


def run_copy(w, edit):
    """A copy of the reference run, changed by edit(run_dir)."""
    run_dir = shutil.copytree(w.run, w.tmp / "run")
    edit(run_dir)
    return run_dir


def set_kit_version(version):
    def edit(run_dir):
        config = json.loads((run_dir / "config.json").read_text())
        (run_dir / "config.json").write_text(json.dumps({**config, "kit_version": version}))
    return edit


def foreign_checkpoint(name, model_name="test_resnet", num_classes=18, unfinish=False):
    """Put a checkpoint of another model or class count at name, as if copied from another run;
    unfinish also removes that fold's oof.csv so --resume goes back to it."""
    def edit(run_dir):
        config = json.loads((run_dir / "config.json").read_text())
        classes = [f"class{i}" for i in range(num_classes)] if num_classes != 18 else config["classes"]
        model = create_model(model_name, num_classes, pretrained=False)
        resume_state = {"optimizer": {}} if unfinish else {}  # a last.pth carries one; only its origin is wrong
        torch.save({"model": model.state_dict(), "config": {**config, "model": model_name, "classes": classes},
                    **resume_state}, run_dir / name)
        if unfinish:
            (run_dir / name).with_name("oof.csv").unlink()
    return edit


def predicting(run_dir, w, eval_dir=None):
    return ["--data_dir", eval_dir or w.eval, "--model_dir", run_dir, "--output_dir", w.tmp / "out",
            "--num_workers", 0]


def missing_image_row(eval_dir):
    edit_csv(eval_dir / "info.csv", lambda t: pd.concat([t, pd.DataFrame({"ImageID": ["gone.jpg"], "ans": ["0"]})]))


BAD_INPUTS = {  # case: (script, its arguments made from the workspace w, expected part of the one-line error)
    "missing train.csv": (train, lambda w: training(data(w, lambda d: (d / "train.csv").unlink()), w),
                          "train.csv"),
    "missing column": (train, lambda w: training(data(w, lambda d: edit_csv(d / "train.csv", lambda t: t.drop(
        columns="age"))), w), "has no column age"),
    "folder named in the CSV missing": (train, lambda w: training(data(w, lambda d: shutil.rmtree(
        next((d / "images").iterdir()))), w), "does not exist"),
    "csv layout without the label column": (train, lambda w: training(csv_layout(w, ("path", "profile")), w),
                                            "no field 'label'"),
    "unknown model name": (train, lambda w: training(w.clean, w, "--model", "test_resnt"),
                           "did you mean test_resnet"),
    "unknown criterion": (train, lambda w: training(w.clean, w, "--criterion", "focall"),
                          "unknown criterion 'focall'"),
    "weights whose shapes do not fit": (train, lambda w: training(w.clean, w, "--weights", misfit_weights(w)),
                                        "1 shapes differ"),
    "resize too small for the backbone": (train, lambda w: training(w.clean, w, "--model", "test_convnext",
                                                                    "--resize", 8), "does not fit test_convnext"),
    "empty fold (more folds than people)": (train, lambda w: training(w.clean, w, "--folds", 40),
                                            "40 folds but only 16"),
    "--fold out of range": (train, lambda w: training(w.clean, w, "--fold", 2), "--fold 2 is not one of the 2"),
    "--head multi on a non-mask layout": (train, lambda w: training(csv_layout(w), w, "--head", "multi"),
                                          "--head multi needs the mask layout"),
    "--freeze_backbone with --backbone_lr_scale": (train, lambda w: training(
        w.clean, w, "--freeze_backbone", "--backbone_lr_scale", 0.1), "conflict"),
    "--freeze_blocks beyond the backbone": (train, lambda w: training(w.clean, w, "--freeze_blocks", 4),
                                            "--freeze_blocks 4: this backbone has 4 block groups"),
    "--center_crop share over 1": (train, lambda w: training(w.clean, w, "--center_crop", 0.5, 1.5),
                                   "--center_crop"),
    "--center_crop with --crop": (train, lambda w: training(w.clean, w, "--center_crop", 0.5, 0.5, "--crop",
                                                            w.tmp / "boxes.csv"), "choose one"),
    "unknown config key": (train, lambda w: training(w.clean, w, "--config", config_file(
        w, {"epochs": 1, "learnig_rate": 0.1})), "unknown settings learnig_rate"),
    "--resume of a folder that is no run": (train, lambda w: ["--resume", w.tmp], "--resume takes a run folder"),
    "wrong kit version": (train, lambda w: ["--resume", run_copy(w, set_kit_version(0))], "kit version 0"),
    "resume onto a checkpoint of another class count": (train, lambda w: ["--resume", run_copy(
        w, foreign_checkpoint("fold1/last.pth", num_classes=5, unfinish=True))], "has classes=['class0'"),
    "resume onto a checkpoint of another model": (train, lambda w: ["--resume", run_copy(
        w, foreign_checkpoint("fold1/last.pth", "test_efficientnet", unfinish=True))], "test_efficientnet"),
    "checkpoint of another class count": (inference, lambda w: predicting(run_copy(
        w, foreign_checkpoint("fold0/best.pth", num_classes=5)), w), "has classes="),
    "checkpoint of another model": (inference, lambda w: predicting(run_copy(
        w, foreign_checkpoint("fold0/best.pth", "test_efficientnet")), w), "has model='test_efficientnet'"),
    "inference on a run of another kit version": (inference, lambda w: predicting(run_copy(w, set_kit_version(0)), w),
                                                  "kit version 0"),
    "info.csv naming a missing image": (inference, lambda w: predicting(w.run, w, w.edit_eval(missing_image_row)),
                                        "gone.jpg"),
}


# ---- 5b. the matrix: every script, each kind of bad input ---------------------------------------------
def a_file(w, name="taken"):
    """A plain file where a folder is expected."""
    (w.tmp / name).write_text("not a folder\n")
    return w.tmp / name


def a_folder(w, name="outdir"):
    """A folder where a file is expected."""
    (w.tmp / name).mkdir()
    return w.tmp / name


def read_only_folder(w):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = a_folder(w, "read_only")
    folder.chmod(0o555)
    return folder


def corrupt_config(run_dir):
    (run_dir / "config.json").write_text('{"classes": ["a", "b"], "model": ')  # cut off, as by a full disk


def hand_edited_center_crop(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "center_crop": [0.5]}))  # one share, not H W


def unfinished(run_dir):
    for oof in run_dir.glob("fold*/oof.csv"):
        oof.unlink()


def duplicated_id(eval_dir):
    edit_csv(eval_dir / "info.csv", lambda t: pd.concat([t, t.iloc[[3]]]))


def broken_copy(w, source):
    """A truncated copy of source, as an interrupted download leaves it."""
    shutil.copy(source, w.tmp / "broken.jpg")
    truncate(w.tmp / "broken.jpg")
    return w.tmp / "broken.jpg"


def eval_images(w, count=2):
    return sorted((w.eval / "images").iterdir())[:count]


def without_facenet(w):
    w.patch.setitem(sys.modules, "facenet_pytorch", None)  # import then raises ImportError, as when not installed
    return w.eval


def busy_port(w):
    """A port another program is listening on (closed when the case ends)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    w.held.append(server)
    return server.getsockname()[1]


def free_port(w):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serving(run_dir, w, *extra):
    return ["--model_dir", run_dir, "--port", free_port(w), *extra]


def config_text(w, text):
    (w.tmp / "config.yaml").write_text(text)
    return w.tmp / "config.yaml"


BAD_INPUTS.update({
    # train.py: numbers, config files, listed files, output folder, damaged run folder
    "train --epochs 0": (train, lambda w: training(w.clean, w, "--epochs", 0), "--epochs: 0 must be >= 1"),
    "train --epochs -3": (train, lambda w: training(w.clean, w, "--epochs", -3), "--epochs: -3 must be >= 1"),
    "train --folds 0": (train, lambda w: training(w.clean, w, "--folds", 0), "--folds: 0 must be >= 1"),
    "train --config with a YAML syntax error": (train, lambda w: training(w.clean, w, "--config", config_text(
        w, "epochs: [1, 2\nlr: 0.1\n")), "config.yaml is not readable YAML"),
    "train --config value of the wrong type": (train, lambda w: training(w.clean, w, "--config", config_text(
        w, "epochs: ten\n")), "epochs: 'ten' is not what --epochs takes"),
    "train --config file missing": (train, lambda w: training(w.clean, w, "--config", w.tmp / "nope.yaml"),
                                    "nope.yaml not found: check --config"),
    "train --drop_list missing": (train, lambda w: training(w.clean, w, "--drop_list", w.tmp / "drops.csv"),
                                  "drops.csv not found: check --drop_list"),
    "train --relabel_list missing": (train, lambda w: training(w.clean, w, "--relabel_list", w.tmp / "fix.csv"),
                                     "fix.csv not found: check --relabel_list"),
    "train --crop missing": (train, lambda w: training(w.clean, w, "--crop", w.tmp / "boxes.csv"),
                             "boxes.csv not found: check --crop"),
    "train --model_dir is a file": (train, lambda w: training(w.clean, w, "--model_dir", a_file(w)),
                                    "cannot write"),
    "train --resume with a corrupt config.json": (train, lambda w: ["--resume", run_copy(w, corrupt_config)],
                                                  "config.json is not readable JSON"),
    # inference.py
    "inference on a corrupt config.json": (inference, lambda w: predicting(run_copy(w, corrupt_config), w),
                                           "config.json is not readable JSON"),
    "inference on a config.json with a bad center_crop": (inference, lambda w: predicting(
        run_copy(w, hand_edited_center_crop), w), "config.json: center_crop [0.5] is not two shares in (0, 1]"),
    "report on a config.json with a bad center_crop": (report, lambda w: ["--model_dir", run_copy(
        w, hand_edited_center_crop)], "config.json: center_crop [0.5] is not two shares in (0, 1]"),
    "label_issues on a config.json with a bad center_crop": (label_issues, lambda w: ["--model_dir", run_copy(
        w, hand_edited_center_crop)], "config.json: center_crop [0.5] is not two shares in (0, 1]"),
    "inference: info.csv with a duplicated id": (inference, lambda w: predicting(
        w.run, w, w.edit_eval(duplicated_id)), "is listed more than once"),
    "inference --submission missing": (inference, lambda w: [*predicting(w.run, w), "--submission",
                                                             w.tmp / "sample_submission.csv"],
                                       "sample_submission.csv not found: check --submission"),
    "inference --crop missing": (inference, lambda w: [*predicting(w.run, w), "--crop", w.tmp / "boxes.csv"],
                                 "boxes.csv not found: check --crop"),
    "inference --output_dir is a file": (inference, lambda w: [*predicting(w.run, w), "--output_dir", a_file(w)],
                                         "cannot write"),
    "inference --output_dir read-only": (inference, lambda w: [*predicting(w.run, w), "--output_dir",
                                                               read_only_folder(w)], "cannot write"),
    "inference --batch_size 0": (inference, lambda w: [*predicting(w.run, w), "--batch_size", 0],
                                 "--batch_size: 0 must be >= 1"),
    "inference --folds 7 (no such fold)": (inference, lambda w: [*predicting(w.run, w), "--folds", 7],
                                           "no fold*/best.pth for folds [7]"),
    # dataset.py
    "dataset --out names a folder": (dataset, lambda w: ["--data_dir", w.clean, "--out", a_folder(w)],
                                     "cannot write"),
    "dataset --folds 0": (dataset, lambda w: ["--data_dir", w.clean, "--folds", 0], "--folds: 0 must be >= 1"),
    "dataset --data_dir missing": (dataset, lambda w: ["--data_dir", w.tmp / "nowhere"], "nowhere is not a folder"),
    # kit/report.py
    "report on a corrupt config.json": (report, lambda w: ["--model_dir", run_copy(w, corrupt_config)],
                                        "config.json is not readable JSON"),
    "report --data_dir without the images": (report, lambda w: ["--model_dir", run_copy(w, lambda d: None),
                                                                "--data_dir", a_folder(w, "empty")],
                                             "are not under"),
    "report --model_dir that is no run": (report, lambda w: ["--model_dir", w.tmp], "config.json not found"),
    "report --worst -1": (report, lambda w: ["--model_dir", w.run, "--worst", -1], "--worst: -1 must be >= 0"),
    # kit/export.py
    "export --format tflite": (export, lambda w: ["--model_dir", w.run, "--format", "tflite", "--out",
                                                  w.tmp / "export"], "unknown --format 'tflite'"),
    "export --fold 5 (no such fold)": (export, lambda w: ["--model_dir", w.run, "--fold", 5, "--out",
                                                          w.tmp / "export"], "no fold*/best.pth for folds [5]"),
    "export --out is a file": (export, lambda w: ["--model_dir", w.run, "--format", "torchscript", "--out",
                                                  a_file(w)], "cannot write"),
    "export on a corrupt config.json": (export, lambda w: ["--model_dir", run_copy(w, corrupt_config), "--out",
                                                           w.tmp / "export"], "config.json is not readable JSON"),
    # kit/label_issues.py
    "label_issues --rank_by loss": (label_issues, lambda w: ["--model_dir", w.run, "--rank_by", "loss"],
                                    "unknown --rank_by 'loss'"),
    "label_issues --data_dir without the images": (label_issues, lambda w: [
        "--model_dir", run_copy(w, lambda d: None), "--data_dir", a_folder(w, "empty")], "are not under"),
    "label_issues on a run with no finished fold": (label_issues, lambda w: ["--model_dir", run_copy(w, unfinished)],
                                                    "no finished fold"),
    "label_issues --top -1": (label_issues, lambda w: ["--model_dir", w.run, "--top", -1], "--top: -1 must be >= 0"),
    # kit/gradcam.py
    "gradcam --device gpu0": (gradcam, lambda w: ["--model_dir", w.run, "--images", *eval_images(w), "--out",
                                                  w.tmp / "cam", "--device", "gpu0"], "--device gpu0 is not a device"),
    "gradcam: one unreadable image among --images": (gradcam, lambda w: [
        "--model_dir", w.run, "--images", *eval_images(w), broken_copy(w, eval_images(w)[0]), "--out",
        w.tmp / "cam", "--device", "cpu"], "broken.jpg"),
    "gradcam: a missing --images file": (gradcam, lambda w: ["--model_dir", w.run, "--images", w.tmp / "gone.jpg",
                                                             "--out", w.tmp / "cam"], "gone.jpg"),
    "gradcam --fold 3 (no such fold)": (gradcam, lambda w: ["--model_dir", w.run, "--images", *eval_images(w),
                                                            "--fold", 3, "--out", w.tmp / "cam"],
                                        "no fold*/best.pth for folds [3]"),
    "gradcam on a corrupt config.json": (gradcam, lambda w: ["--model_dir", run_copy(w, corrupt_config), "--out",
                                                             w.tmp / "cam"], "config.json is not readable JSON"),
    # kit/crop_faces.py
    "crop_faces --device gpu0": (crop_faces, lambda w: ["--data_dir", w.eval, "--out", w.tmp / "boxes.csv",
                                                        "--device", "gpu0"], "--device gpu0 is not a device"),
    "crop_faces without facenet-pytorch": (crop_faces, lambda w: ["--data_dir", without_facenet(w), "--out",
                                                                  w.tmp / "boxes.csv"],
                                           "pip install --no-deps facenet-pytorch==2.6.0"),
    "crop_faces --submission missing": (crop_faces, lambda w: ["--data_dir", w.eval, "--submission",
                                                               w.tmp / "sub.csv", "--out", w.tmp / "boxes.csv"],
                                        "sub.csv not found: check --submission"),
    "crop_faces --min_prob 2": (crop_faces, lambda w: ["--data_dir", w.eval, "--min_prob", 2, "--out",
                                                       w.tmp / "boxes.csv"], "--min_prob: 2 must be >= 0 and <= 1"),
    "crop_faces: info.csv with a duplicated id": (crop_faces, lambda w: [
        "--data_dir", w.edit_eval(duplicated_id), "--out", w.tmp / "boxes.csv"], "is listed more than once"),
    # kit/app.py
    "app --port 70000": (app, lambda w: ["--model_dir", w.run, "--port", 70000],
                         "--port: 70000 must be >= 1 and <= 65535"),
    "app on a busy port": (app, lambda w: ["--model_dir", w.run, "--port", busy_port(w)], "cannot serve on"),
    "app --top 0": (app, lambda w: serving(w.run, w, "--top", 0), "--top: 0 must be >= 1"),
    "app on a corrupt config.json": (app, lambda w: serving(run_copy(w, corrupt_config), w),
                                     "config.json is not readable JSON"),
    "app --model_dir that is no run": (app, lambda w: serving(w.tmp, w), "config.json not found"),
})


class Workspace:
    """Paths the table's argument makers build on; each case gets its own tmp folder."""

    def __init__(self, tmp, clean, run, patch):
        self.tmp, self.clean, self.run, self.patch, self.held = tmp, clean, run, patch, []
        self.eval = copy_eval(tmp / "eval")

    def edit_eval(self, edit):
        edit(self.eval)
        return self.eval


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_with_no_output(case, tmp_path, clean_data, reference_run, monkeypatch, capsys):
    module, make_args, expected = BAD_INPUTS[case]
    w = Workspace(tmp_path, clean_data, reference_run, monkeypatch)
    argv = make_args(w)
    before = snapshot(tmp_path, reference_run)
    try:
        code, err = cli(monkeypatch, capsys, module, argv)
    finally:
        for held in w.held:
            held.close()
    print(f"{module.__name__}.py | {case}: {err.strip()}")  # the report quotes these lines (pytest -s)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err
    assert snapshot(tmp_path, reference_run) == before, "a file was written or changed"


def test_train_cli_error_is_one_line_on_stderr(tmp_path, clean_data):
    """The real command line: nothing (no warning, no progress bar) comes before the error line."""
    result = run_script(train_command(clean_data, tmp_path, "x", "--fold", 5))
    assert result.returncode == 2 and result.stderr == "error: --fold 5 is not one of the 2 folds (0..1)\n"
    assert not any(tmp_path.iterdir())


def test_unknown_command_line_argument_is_refused(clean_data, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, train, ["--data_dir", clean_data, "--learnig_rate", "0.1"])
    assert code == 2 and "unrecognized arguments: --learnig_rate" in err and "Traceback" not in err


def test_outputs_of_one_step_are_renamed_together_or_not_at_all(tmp_path):
    """probs.csv and output.csv: a failure while writing the second leaves the old pair, not a mismatched one."""
    for name in ("probs.csv", "output.csv"):
        (tmp_path / name).write_text("old\n")

    def full_disk(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="output.csv.*No space left"):
        common.atomic_write_all({tmp_path / "probs.csv": lambda tmp: Path(tmp).write_text("new\n"),
                                 tmp_path / "output.csv": full_disk})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output.csv", "probs.csv"]
    assert {p.read_text() for p in tmp_path.iterdir()} == {"old\n"}


# ---- 6. valid but awkward inputs work ------------------------------------------------------------
AWKWARD = "사진 폴더"  # a folder name with a space and Korean letters


def sixteen_bit_png(photo, dest):
    """The photo's grey levels as a 16-bit PNG (mode I;16): 8-bit value v stored as v * 257."""
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(dest.with_suffix(".png"))
    return dest.with_suffix(".png")


def palette_png(photo, dest):
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(dest.with_suffix(".png"))
    return dest.with_suffix(".png")


def cmyk_jpeg(photo, dest):
    photo.convert("CMYK").save(dest, quality=95)
    return dest


def grey_jpeg(photo, dest):
    photo.convert("L").save(dest, quality=95)
    return dest


def exif_rotated_jpeg(photo, dest):
    """Stored turned a quarter left, with EXIF orientation 6 (turn right to show), as phones save photos."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.transpose(Image.Transpose.ROTATE_90).save(dest, quality=95, exif=exif)
    return dest


# kind: (writer, what load_image must show: the photo as RGB or its grey, mean |difference| allowed)
AWKWARD_IMAGES = {"16-bit PNG": (sixteen_bit_png, "grey", 0.5), "palette PNG": (palette_png, "rgb", 12),
                  "CMYK JPEG": (cmyk_jpeg, "rgb", 12), "grayscale JPEG": (grey_jpeg, "grey", 6),
                  "EXIF-rotated JPEG": (exif_rotated_jpeg, "rgb", 8)}


def make_awkward(kind, source, dest):
    """Replace source by dest written as kind; returns (new file, mean |difference| from what it shows)."""
    writer, shown, _ = AWKWARD_IMAGES[kind]
    with Image.open(source) as photo:
        photo = photo.convert("RGB")
    written = writer(photo, dest)
    if written != source:
        source.unlink()
    want = photo.convert("L").convert("RGB") if shown == "grey" else photo
    got = load_image(written)
    assert got.size == want.size, kind
    return written, float(np.abs(np.asarray(got, dtype=float) - np.asarray(want, dtype=float)).mean())


def predict_ok(monkeypatch, run_dir, eval_dir, out, *extra):
    monkeypatch.setattr(sys, "argv", ["inference.py", "--data_dir", str(eval_dir), "--model_dir", str(run_dir),
                                      "--output_dir", str(out), "--num_workers", "0", *map(str, extra)])
    inference.main()
    return pd.read_csv(out / "output.csv", dtype=str, keep_default_na=False)


@pytest.mark.parametrize("kind", AWKWARD_IMAGES)
def test_awkward_test_image_in_a_korean_folder_is_predicted(kind, tmp_path, reference_run, monkeypatch):
    eval_dir = copy_eval(tmp_path / AWKWARD / "평가 데이터", images=8)
    first = eval_dir / "images" / pd.read_csv(eval_dir / "info.csv")["ImageID"][0]
    written, difference = make_awkward(kind, first, first)
    edit_csv(eval_dir / "info.csv", lambda t: t.replace({"ImageID": {first.name: written.name}}))
    output = predict_ok(monkeypatch, reference_run, eval_dir, tmp_path / AWKWARD / "결과")
    print(f"works | {kind} in '{eval_dir.relative_to(tmp_path)}': decoded {difference:.2f} grey levels "
          f"from the original, {len(output)} predictions")
    assert difference <= AWKWARD_IMAGES[kind][2], kind
    info = pd.read_csv(eval_dir / "info.csv", dtype=str, keep_default_na=False)
    assert output["ImageID"].tolist() == info["ImageID"].tolist() and output["ans"].str.isdigit().all()


def test_training_on_awkward_images_in_a_korean_folder_then_a_sample_submission(tmp_path, clean_data,
                                                                                monkeypatch):
    """Every awkward kind among one person's photos, in a folder with spaces and Korean letters; then
    inference.py --submission with a sample-submission CSV whose ids have no extension."""
    data_dir = copy_people(tmp_path / AWKWARD / "학습 데이터", people=4)
    person = sorted((data_dir / "images").iterdir())[0]
    for kind, stem in zip(AWKWARD_IMAGES, ("mask1", "mask2", "mask3", "mask4", "mask5")):
        make_awkward(kind, person / f"{stem}.jpg", person / f"{stem}.jpg")
    models = tmp_path / AWKWARD / "모델"
    train.main(map(str, ["--data_dir", data_dir, *TINY, "--epochs", 1, "--num_workers", 0, "--model_dir", models,
                         "--name", "run 1"]))
    oof = read_oof(models / "run 1" / "oof.csv")
    assert len(oof) == 28 and oof["path"].str.endswith(".png").sum() == 2
    eval_dir = copy_eval(tmp_path / AWKWARD / "평가 데이터", images=8)
    ids = [Path(name).stem for name in pd.read_csv(eval_dir / "info.csv")["ImageID"]]
    (eval_dir / "info.csv").unlink()
    pd.DataFrame({"id": ids, "answer": ""}).to_csv(eval_dir / "sample_submission.csv", index=False)
    output = predict_ok(monkeypatch, models / "run 1", eval_dir, tmp_path / AWKWARD / "결과", "--submission",
                        eval_dir / "sample_submission.csv")
    print(f"works | training in '{data_dir.relative_to(tmp_path)}' on {', '.join(AWKWARD_IMAGES)}; "
          f"--submission sample_submission.csv: {len(output)} rows, columns {list(output.columns)}")
    assert list(output.columns) == ["id", "answer"] and output["id"].tolist() == ids
    assert output["answer"].str.isdigit().all()
