"""kit/gradcam.py: pytorch-grad-cam heat maps on a CNN and a ViT, overlays for the worst OOF errors of a tiny
trained run (true/pred names from oof.csv) and for chosen images."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM

ROOT = Path(__file__).resolve().parents[1]
from kit import gradcam  # noqa: E402
from model import create_model  # noqa: E402
from kit.runs import collect_oof  # noqa: E402

SIZE = [3, 64, 48]


def run_gradcam(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["kit/gradcam.py", *map(str, argv)])
    gradcam.run_main(gradcam.main)


@pytest.mark.parametrize("name, head, layer", [("test_resnet", "single", "layer4"),
                                               ("test_vit", "multi", "blocks.5.norm1")])
def test_heat_map_from_the_last_stage(name, head, layer):
    torch.manual_seed(0)
    kwargs = {"img_size": tuple(SIZE[1:])} if "vit" in name else {}
    model = create_model(name, 18, head=head, pretrained=False, **kwargs).eval()
    module, _ = gradcam.target_layer(model.backbone)
    assert module is model.backbone.get_submodule(layer)
    image = (torch.rand(*SIZE) * 255).to(torch.uint8)
    heat, probs = gradcam.explain(model, {"head": head, "input_size": SIZE}, image)
    assert heat.shape == (64, 48) and np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert heat.std() > 0.05  # a map with structure, not a constant
    assert probs.shape == (18,) and abs(probs.sum() - 1) < 1e-5


def test_vit_last_block_output_would_give_an_empty_map():
    """Why norm1: after the last block only the class token reaches the head, so patch gradients are 0."""
    model = create_model("test_vit", 18, pretrained=False, img_size=tuple(SIZE[1:])).eval()
    info = model.backbone.feature_info[-1]
    with GradCAM(model, [model.backbone.blocks[-1]], reshape_transform=gradcam.to_grid(info, SIZE)) as cam:
        heat = cam(torch.rand(1, *SIZE) * 255, [gradcam.class_target(0, "single")])
    assert heat.max() == 0


def test_worst_oof_errors(tiny_run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # config.json names the data folder relative to where train.py ran
    run_gradcam(monkeypatch, "--model_dir", tiny_run_dir, "--worst", 3, "--out", tmp_path)
    index = pd.read_csv(tmp_path / "index.csv")
    oof = collect_oof(tiny_run_dir)
    classes = json.loads((tiny_run_dir / "config.json").read_text())["classes"]
    errors = oof[oof["label"] != oof["pred"]]
    true_prob = errors.apply(lambda r: r[f"p{r['label']}"], axis=1)
    worst = errors.loc[true_prob.nsmallest(3).index]
    assert len(index) == 3 and list(index["fold"]) == list(worst["fold"])
    assert [Path(i).relative_to("sample/train").as_posix() for i in index["image"]] == list(worst["path"])
    assert list(index["true"]) == [classes[label] for label in worst["label"]]
    assert list(index["pred"]) == [classes[pred] for pred in worst["pred"]]  # the fold model agrees with oof.csv
    assert (index["true"] != index["pred"]).all()
    for png in index["png"]:
        with Image.open(tmp_path / png) as picture:
            assert picture.format == "PNG" and picture.size == (700, 460)
            assert np.asarray(picture.convert("L")).std() > 10
    assert not list(tmp_path.glob(".*tmp*"))


def test_chosen_images_and_bad_input(tiny_run_dir, tmp_path, monkeypatch, capsys):
    photo = sorted((ROOT / "sample" / "eval" / "images").glob("[!.]*.jpg"))[0]
    run_gradcam(monkeypatch, "--model_dir", tiny_run_dir, "--images", photo, "--fold", 1, "--out", tmp_path)
    index = pd.read_csv(tmp_path / "index.csv")
    assert list(index["true"]) == ["unknown"] and list(index["fold"]) == [1] and (tmp_path / index["png"][0]).is_file()
    cases = [(["--model_dir", tmp_path / "none", "--images", photo], "config.json not found"),
             (["--model_dir", tiny_run_dir, "--images", tmp_path / "missing.jpg"], "1 of --images not found"),
             (["--model_dir", tiny_run_dir, "--images", photo, "--fold", 5], "for folds [5]")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_gradcam(monkeypatch, *argv, "--out", tmp_path / "out")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
