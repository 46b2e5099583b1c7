"""model.py: head widths and probabilities by hand, real ImageNet weights behave like ImageNet weights,
misfitting weights and checkpoints are reported in one line, optimizer groups and input-size checks."""

import pytest
import timm
import torch
from PIL import Image

from support import one_line_error  # noqa: E402
from dataset import build_transform  # noqa: E402
from kit.images import load_image  # noqa: E402
from kit.predict import load_checkpoint  # noqa: E402
from model import create_model, data_config, param_groups, to_probs  # noqa: E402

DAISY = 985


def images(n=2, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- heads and probabilities ---------------------------------------------------------------------
def test_multi_head_probabilities_are_the_product_of_head_softmaxes_in_label_order():
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 3
    probs = to_probs(logits, head="multi")
    assert probs.shape == (4, 18)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    mask, gender, age = logits[:, :3].softmax(1), logits[:, 3:5].softmax(1), logits[:, 5:].softmax(1)
    for label in range(18):
        m, g, a = label // 6, (label // 3) % 2, label % 3
        torch.testing.assert_close(probs[:, label], mask[:, m] * gender[:, g] * age[:, a])
    sure = torch.tensor([[0.0, 0, 9, 0, 9, 9, 0, 0]])  # not_worn, female, <30
    assert to_probs(sure, "multi").argmax().item() == 2 * 6 + 1 * 3 + 0


def test_single_head_probabilities_are_a_softmax():
    logits = torch.randn(3, 18, dtype=torch.bfloat16)
    probs = to_probs(logits, "single")
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, logits.float().softmax(1))


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
@pytest.mark.parametrize("head, classes, width", [("single", 18, 18), ("multi", 18, 8), ("single", 5, 5)])
def test_output_width(name, head, classes, width):
    model = create_model(name, classes, head=head, pretrained=False).eval()
    batch = images()
    with torch.no_grad():
        out = model(batch)
        assert out.shape == (2, width)
        torch.testing.assert_close(model(batch.float()), out)  # uint8 and float 0..255 are the same input


def test_classifier_normalizes_with_the_backbones_mean_and_std():
    model = create_model("test_resnet", 18, pretrained=False).eval()
    config = data_config(model.backbone)
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    batch = images()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model.backbone((batch / 255 - mean) / std), rtol=1e-4, atol=1e-4)


def test_data_config_takes_resize():
    backbone = create_model("test_resnet", 18, pretrained=False).backbone
    assert data_config(backbone, (64, 48))["input_size"] == (3, 64, 48)
    assert data_config(backbone, 96)["input_size"] == (3, 96, 96)
    assert data_config(backbone)["input_size"] == tuple(backbone.pretrained_cfg["input_size"])


def test_unknown_model_name_lists_close_matches():
    message = one_line_error(lambda: create_model("resnet5O", 18, pretrained=False))
    assert "unknown model 'resnet5O'" in message and "resnet50" in message
    assert "test_resnet" in one_line_error(lambda: create_model("test_resnett", 18, pretrained=False))
    assert "unknown head" in one_line_error(lambda: create_model("test_resnet", 18, head="double", pretrained=False))


def test_pretrained_without_network_is_one_line_suggesting_weights(monkeypatch):
    real_create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this model.\n"
                          "Check your internet connection.")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    message = one_line_error(lambda: create_model("test_resnet", 18, pretrained=True))
    assert "test_resnet" in message and "--weights" in message and "--no-pretrained" in message
    assert create_model("test_resnet", 18, pretrained=False)(images()).shape == (2, 18)


# ---- weights files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_imagenet(lite0_path):
    return create_model("tf_efficientnet_lite0", 1000, pretrained=False, weights=lite0_path).eval()


def features(model, batch):
    """Pooled backbone features (before the classifier) of 0..255 images."""
    backbone = model.backbone
    with torch.no_grad():
        normalized = (batch.float() - model.mean) / model.std
        return backbone.forward_head(backbone.forward_features(normalized), pre_logits=True)


def test_lite0_weights_see_a_daisy_through_the_kits_own_path(tmp_path, lite0_imagenet):
    from sklearn.datasets import load_sample_image
    Image.fromarray(load_sample_image("flower.jpg")).save(tmp_path / "flower.jpg", quality=95)
    config = data_config(lite0_imagenet.backbone)
    transform = build_transform("base", config["input_size"], config["interpolation"], train=False)
    image = transform(load_image(tmp_path / "flower.jpg"))
    assert image.dtype == torch.uint8 and image.shape == (3, 224, 224)
    with torch.no_grad():
        probs = to_probs(lite0_imagenet(image[None]))
    assert probs.argmax().item() == DAISY and probs[0, DAISY] > 0.1


@pytest.mark.parametrize("architecture, side", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240),
                                                ("tf_efficientnet_lite2", 260)])
def test_offline_weights_see_an_espresso_and_a_cat_through_the_kits_own_path(tmp_path, lite0_imagenet, architecture,
                                                                            side):
    """scikit-image's coffee and chelsea photos: ImageNet's espresso (967) and Egyptian cat (285) for each model."""
    from skimage.data import chelsea, coffee
    from kit.weights import offline_weights
    imagenet = lite0_imagenet if architecture.endswith("0") else create_model(
        architecture, 1000, pretrained=False, weights=offline_weights(architecture, tmp_path)).eval()
    config = data_config(imagenet.backbone)
    transform = build_transform("base", config["input_size"], config["interpolation"], train=False)
    for photo, expected in ((coffee(), 967), (chelsea(), 285)):
        Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
        image = transform(load_image(tmp_path / "photo.jpg"))
        assert image.shape == (3, side, side)
        with torch.no_grad():
            probs = to_probs(imagenet(image[None]))
        assert probs.argmax().item() == expected and probs[0, expected] > 0.5, (architecture, expected)


def test_lite1_weights_given_to_a_lite0_model_are_one_line(tmp_path_factory):
    from kit.weights import offline_weights
    message = one_line_error(lambda: create_model("tf_efficientnet_lite0", 18, pretrained=False, weights=offline_weights(
        "tf_efficientnet_lite1", tmp_path_factory.mktemp("w"))))
    assert "does not fit tf_efficientnet_lite0" in message and "--model" in message


def test_lite0_weights_with_18_classes_keep_the_backbone_and_start_a_new_head(lite0_imagenet, lite0_path):
    pretrained = create_model("tf_efficientnet_lite0", 18, pretrained=False, weights=lite0_path).eval()
    torch.manual_seed(0)
    scratch = create_model("tf_efficientnet_lite0", 18, pretrained=False).eval()
    assert pretrained.backbone.get_classifier().weight.shape == (18, 1280)
    batch = images(2, 64)
    imagenet_features, pretrained_features = features(lite0_imagenet, batch), features(pretrained, batch)
    torch.testing.assert_close(pretrained_features, imagenet_features)
    scratch_features = features(scratch, batch)
    assert (scratch_features - pretrained_features).abs().mean() > 0.5 * pretrained_features.abs().mean()
    stem = "conv_stem.weight"
    torch.testing.assert_close(pretrained.backbone.state_dict()[stem], lite0_imagenet.backbone.state_dict()[stem])


def test_weights_for_another_architecture_name_the_tensors(lite0_path):
    message = one_line_error(lambda: create_model("test_resnet", 18, pretrained=False, weights=lite0_path))
    assert "does not fit" in message and "missing" in message and "unexpected" in message
    assert "missing conv1.0.weight" in message and "unexpected conv_stem.weight" in message and "--model" in message


def test_weights_with_a_changed_shape_name_the_tensor(tmp_path, lite0_path):
    state = torch.load(lite0_path, map_location="cpu", weights_only=True)
    state["conv_stem.weight"] = state["conv_stem.weight"][:16]
    torch.save(state, tmp_path / "cut.pth")
    message = one_line_error(lambda: create_model("tf_efficientnet_lite0", 18, pretrained=False,
                                                  weights=tmp_path / "cut.pth"))
    assert "1 shapes differ" in message and "conv_stem.weight (16, 3, 3, 3) vs (32, 3, 3, 3)" in message


def test_missing_or_broken_weight_files_are_one_line(tmp_path):
    assert "not found" in one_line_error(lambda: create_model("test_resnet", 18, weights=tmp_path / "none.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    message = one_line_error(lambda: create_model("test_resnet", 18, weights=tmp_path / "text.pth"))
    assert "not a PyTorch weights file" in message and "text.pth" in message


# ---- train.py checkpoints ------------------------------------------------------------------------
def save_checkpoint(path, model, classes, head="single", name="test_resnet"):
    """What train.py writes: {"model": state_dict, "config": {...}}."""
    config = {"model": name, "classes": [f"c{i}" for i in range(classes)], "head": head, "input_size": [3, 32, 32]}
    torch.save({"model": model.state_dict(), "config": config}, path)


@pytest.mark.parametrize("head, classes, width", [("single", 5, 5), ("multi", 18, 8)])
def test_load_checkpoint_rebuilds_the_model_from_its_config(tmp_path, head, classes, width):
    torch.manual_seed(0)
    trained = create_model("test_resnet", classes, head, pretrained=False).eval()
    save_checkpoint(tmp_path / "best.pth", trained, classes, head)
    loaded, config = load_checkpoint(tmp_path / "best.pth")
    assert config["head"] == head and not loaded.training
    batch = images()
    with torch.no_grad():
        assert loaded(batch).shape == (2, width)
        torch.testing.assert_close(loaded(batch), trained(batch))


def test_checkpoint_for_other_classes_as_weights_keeps_the_backbone(tmp_path):
    torch.manual_seed(0)
    five = create_model("test_resnet", 5, pretrained=False)
    save_checkpoint(tmp_path / "five.pth", five, 5)
    eighteen = create_model("test_resnet", 18, pretrained=False, weights=tmp_path / "five.pth")
    own, theirs = eighteen.backbone.state_dict(), five.backbone.state_dict()
    assert own["fc.weight"].shape == (18, own["fc.weight"].shape[1])
    assert all(torch.equal(own[k], theirs[k]) for k in own if not k.startswith("fc."))


def test_checkpoint_that_disagrees_with_its_config_is_reported(tmp_path):
    save_checkpoint(tmp_path / "odd.pth", create_model("test_resnet", 5, pretrained=False), classes=18)
    message = one_line_error(lambda: load_checkpoint(tmp_path / "odd.pth"))
    assert "odd.pth" in message and "does not match its own config" in message and "backbone.fc.weight" in message
    torch.save(create_model("test_resnet", 5, pretrained=False).state_dict(), tmp_path / "plain.pth")
    assert "--weights" in one_line_error(lambda: load_checkpoint(tmp_path / "plain.pth"))
    assert "not found" in one_line_error(lambda: load_checkpoint(tmp_path / "nothing.pth"))


# ---- optimizer groups and input size ---------------------------------------------------------------
@pytest.mark.parametrize("head", ["single", "multi"])
def test_freeze_backbone_leaves_only_the_head_trainable(head):
    model = create_model("test_efficientnet", 18, head, pretrained=False)
    groups = param_groups(model, lr=0.1, freeze_backbone=True)
    head_params = list(model.backbone.get_classifier().parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in head_params}
    assert {id(p) for p in trainable} == {id(p) for p in head_params}
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(groups)
    model(images(4)).logsumexp(1).mean().backward()
    optimizer.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {k for k, p in model.named_parameters() if any(p is h for h in head_params)}


def test_backbone_lr_scale_gives_two_groups():
    model = create_model("test_resnet", 18, pretrained=False)
    param_groups(model, lr=0.1, freeze_backbone=True)
    groups = param_groups(model, lr=1e-3, backbone_lr_scale=0.1)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4])
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in model.parameters()}
    assert ids[0] == {id(p) for p in model.backbone.fc.parameters()}
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again


def test_input_size_too_small_for_the_backbone_is_one_line():
    message = one_line_error(lambda: create_model("test_vit", 18, pretrained=False, input_size=(3, 8, 8)))
    assert "--resize 8 8 does not fit test_vit" in message and "try its default" in message
    fits = create_model("test_vit", 18, pretrained=False, input_size=(3, 32, 32))
    assert fits.training and fits(images(2, 32)).shape == (2, 18)

