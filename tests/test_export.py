"""kit/export.py: ONNX (run with onnxruntime) and TorchScript files give PyTorch's probabilities on real sample
images, for one fold and for the fold ensemble; preprocess.json alone is enough to feed them."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
from kit import export  # noqa: E402
from dataset import build_transform  # noqa: E402
from kit.images import load_image  # noqa: E402
from kit.predict import load_run  # noqa: E402
from model import to_probs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is what is tested
SAMPLE_IMAGES = sorted((ROOT / "sample" / "eval" / "images").glob("[!.]*.jpg"))[:8]


def run_export(monkeypatch, *argv):
    """kit/export.py's command line, in this process (a UserError exits 2 with one 'error:' line)."""
    monkeypatch.setattr(sys, "argv", ["kit/export.py", *map(str, argv)])
    export.run_main(export.main)


def kit_probs(run_dir, folds=None):
    """PyTorch probabilities (mean over the folds) on the sample images, preprocessed by the kit."""
    models, config = load_run(run_dir, folds)
    transform = build_transform("base", config["input_size"], config["interpolation"], train=False)
    batch = torch.stack([transform(load_image(f)) for f in SAMPLE_IMAGES]).float()
    with torch.no_grad():
        return torch.stack([to_probs(m(batch), config["head"]) for m in models]).mean(0).numpy(), batch


def preprocess_as_told(info):
    """The images prepared from preprocess.json alone, with Pillow and NumPy (no kit code)."""
    size = (info["input_size"]["width"], info["input_size"]["height"])
    method = getattr(Image.Resampling, info["interpolation"].upper())
    pixels = [np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB").resize(size, method), np.float32)
              for f in SAMPLE_IMAGES]
    return np.stack(pixels).transpose(0, 3, 1, 2)


def test_fold_export_matches_pytorch(tiny_run_dir, tmp_path, monkeypatch):
    import onnxruntime
    run_export(monkeypatch, "--model_dir", tiny_run_dir, "--fold", "1", "--format", "onnx", "torchscript",
               "--out", tmp_path)
    expected, batch = kit_probs(tiny_run_dir, folds=[1])
    onnx_probs = onnxruntime.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"images": batch.numpy()})[0]
    script_probs = torch.jit.load(str(tmp_path / "model.torchscript.pt"))(batch).numpy()  # no graph kept
    assert onnx_probs.shape == script_probs.shape == (len(SAMPLE_IMAGES), 18)
    np.testing.assert_allclose(onnx_probs, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(script_probs, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_probs.sum(1), 1, atol=1e-5)
    info = json.loads((tmp_path / "preprocess.json").read_text())
    assert info["models"].startswith("fold 1 ") and info["files"] == {"onnx": "model.onnx",
                                                                       "torchscript": "model.torchscript.pt"}
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_ensemble_export_fed_by_preprocess_json_alone(tiny_run_dir, tmp_path, monkeypatch):
    import onnxruntime
    run_export(monkeypatch, "--model_dir", tiny_run_dir, "--ensemble", "--out", tmp_path)
    info = json.loads((tmp_path / "preprocess.json").read_text())
    config = json.loads((tiny_run_dir / "config.json").read_text())
    assert info["classes"] == config["classes"] and info["head"] == "single" and info["task_layout"] == "mask"
    assert (info["input_size"]["height"], info["input_size"]["width"]) == (64, 48) and info["channel_order"] == "RGB"
    assert info["value_range"] == [0, 255] and info["layout"] == "NCHW" and "2 folds" in info["models"]
    expected, batch = kit_probs(tiny_run_dir)  # the average of both folds
    images = preprocess_as_told(info)
    np.testing.assert_array_equal(images, batch.numpy())  # the written recipe is the kit's preprocessing
    session = onnxruntime.InferenceSession(str(tmp_path / info["files"]["onnx"]))
    onnx_probs = session.run([info["output_name"]], {info["input_name"]: images})[0]
    np.testing.assert_allclose(onnx_probs, expected, atol=1e-4, rtol=0)
    script = torch.jit.load(str(tmp_path / info["files"]["torchscript"]))
    np.testing.assert_allclose(script(torch.from_numpy(images[:1])).numpy(), expected[:1], atol=1e-4, rtol=0)
    single_fold, _ = kit_probs(tiny_run_dir, folds=[0])
    assert np.abs(single_fold - expected).max() > 1e-3  # the ensemble is not just one fold


def test_bad_input_is_one_line_and_writes_nothing(tiny_run_dir, tmp_path, monkeypatch, capsys):
    cases = [(["--model_dir", tmp_path / "nothing"], "config.json not found"),
             (["--model_dir", tiny_run_dir, "--format", "onnnx"], "unknown --format 'onnnx'; did you mean onnx"),
             (["--model_dir", tiny_run_dir, "--fold", "7"], "no fold*/best.pth for folds [7]")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_export(monkeypatch, *argv, "--out", tmp_path / "out")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err
        assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_multi_head_export_gives_18_probabilities(tmp_path):
    from model import create_model
    model = create_model("test_resnet", 18, head="multi", pretrained=False).eval()
    module = export.ProbabilityModel([model], "multi").eval()
    example, check = torch.rand(2, 3, 64, 48) * 255, torch.rand(3, 3, 64, 48) * 255
    assert export.export_onnx(module, example, check, tmp_path / "multi.onnx") <= 1e-4  # checked with onnxruntime
    probs = module(check).detach()
    assert probs.shape == (3, 18) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
