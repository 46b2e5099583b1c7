"""Any timm backbone behind one small wrapper that normalizes its own input.

    from model import create_model, to_probs
    model = create_model("tf_efficientnet_lite0", num_classes=18, head="multi", weights="lite0.pth")
    probs = to_probs(model(images_uint8), head="multi")    # (N, 18) in both head layouts

Images go in as RGB in 0..255 (uint8 or float), so train, inference, export and the demo page share
one preprocessing: resize (size from `data_config`) and nothing else.
"""
import difflib

import timm
import torch
from timm.models import group_parameters
from torch import nn

from kit.checkpoints import load_torch_file
from kit.common import UserError, lookup, one_line
from kit.labels import HEAD_SIZES, joint_from_heads

HEADS = {"single": lambda num_classes: num_classes,    # one softmax over all classes
         "multi": lambda num_classes: sum(HEAD_SIZES)}  # mask 3 | gender 2 | age 3 logits


class Classifier(nn.Module):
    """A timm backbone that takes 0-255 RGB images and applies its own mean/std."""

    def __init__(self, backbone, mean, std):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def normalize(self, images):
        return (images.float() - self.mean) / self.std

    def forward(self, images):
        return self.backbone(self.normalize(images))


def to_probs(logits, head="single"):
    """Logits -> class probabilities; multi-head: product of the three softmaxes, in label order."""
    if head == "single":
        return logits.float().softmax(1)
    return joint_from_heads(*(part.float().softmax(1) for part in logits.split(HEAD_SIZES, dim=1)))


def check_model_name(name):
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise UserError(f"unknown model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else "")
                        + " (see timm.list_models())")


def read_state_dict(path):
    """A plain timm state dict, or the backbone of a checkpoint saved by train.py."""
    state = load_torch_file(path, "PyTorch weights file", "check --weights")
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    strip = ("module.", "backbone.")
    return {k[len(p):] if (p := next((p for p in strip if k.startswith(p)), "")) else k: v
            for k, v in state.items() if k not in ("mean", "std")}


def load_weights(backbone, path):
    """Load a local weight file; a classifier of another size is dropped, any other misfit is an error."""
    state, own = read_state_dict(path), backbone.state_dict()
    classifier = backbone.pretrained_cfg.get("classifier", "")
    classifier = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    is_head = lambda key: any(key.startswith(c + ".") for c in classifier)
    state = {k: v for k, v in state.items() if not (is_head(k) and k in own and v.shape != own[k].shape)}
    misfit = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not is_head(k)]
    unexpected = [k for k in state if k not in own]
    if misfit or missing or unexpected:
        examples = "; ".join(f"{kind} {names[0]}" for kind, names in
                             (("shape", misfit), ("missing", missing), ("unexpected", unexpected)) if names)
        raise UserError(f"{path} does not fit {backbone.pretrained_cfg.get('architecture')}: "
                        f"{len(misfit)} shapes differ, {len(missing)} missing, {len(unexpected)} unexpected "
                        f"tensors (first: {examples}); pass weights made for this --model")
    backbone.load_state_dict(state, strict=False)


def create_backbone(name, outputs, pretrained, weights, **kwargs):
    """timm.create_model with one-line errors for unknown names and failed downloads."""
    check_model_name(name)
    if weights or not pretrained:
        backbone = timm.create_model(name, pretrained=False, num_classes=outputs, **kwargs)
        if weights:
            load_weights(backbone, weights)
        return backbone
    try:
        return timm.create_model(name, pretrained=True, num_classes=outputs, **kwargs)
    except Exception as err:  # hub errors come as many types (OSError, HTTP errors, RuntimeError)
        raise UserError(f"could not get pretrained weights for {name} ({type(err).__name__}: {one_line(err, 120)}); "
                        "pass --weights PATH for a local file or --no-pretrained") from None


def create_model(name, num_classes, head="single", pretrained=True, weights=None, input_size=None, **kwargs):
    """A Classifier over timm's `name` with `head` outputs; input_size (3, H, W) is checked to fit."""
    outputs = lookup(HEADS, head, "head")(num_classes)
    backbone = create_backbone(name, outputs, pretrained, weights, **kwargs)
    config = data_config(backbone)
    model = Classifier(backbone, config["mean"], config["std"])
    if input_size is not None:
        check_input_size(model, name, input_size, config["input_size"])
    return model


def check_input_size(model, name, input_size, default_size):
    """One forward pass at input_size, so a size the backbone cannot take fails now, in one line."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    except (RuntimeError, AssertionError, ValueError) as err:
        raise UserError(f"--resize {input_size[1]} {input_size[2]} does not fit {name} "
                        f"({one_line(err, 100)}); try its default {default_size[1]} {default_size[2]}"
                        ) from None
    model.train()


def data_config(backbone, resize=None):
    """Input size, mean/std and interpolation from the backbone's pretrained config (timm)."""
    config = timm.data.resolve_data_config(model=backbone)
    if resize:
        height, width = (resize[0], resize[-1]) if isinstance(resize, (list, tuple)) else (resize, resize)
        config["input_size"] = (3, height, width)
    return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items()}


def head_parameters(model):
    """The classifier's parameters (the part trained at the full learning rate)."""
    return list(model.backbone.get_classifier().parameters())


def early_parameters(model, blocks):
    """The parameters of the backbone's stem and its first `blocks` block groups (timm's coarse group_matcher:
    EfficientNet's blocks.0, blocks.1, ...; ResNet's layer1, ...), the layers that see the largest feature maps."""
    backbone = model.backbone
    groups = list(group_parameters(backbone, backbone.group_matcher(coarse=True)).values())
    if blocks > len(groups) - 3:  # stem ... blocks ... head: the last block group stays trainable
        raise UserError(f"--freeze_blocks {blocks}: this backbone has {len(groups) - 2} block groups, so at most "
                        f"{max(len(groups) - 3, 0)} can be frozen (or --freeze_backbone for a linear probe)")
    early = {name for names in groups[:blocks + 1] for name in names}
    return [p for name, p in backbone.named_parameters() if name in early]


def param_groups(model, lr, backbone_lr_scale=1.0, freeze_backbone=False, freeze_blocks=0):
    """Optimizer groups: the head at lr, the backbone at lr * backbone_lr_scale at every step (timm's schedulers
    multiply a group's scheduled lr by its lr_scale, so warm-up and decay keep the ratio); frozen (no gradient):
    the whole backbone, or with freeze_blocks=N > 0 its stem and first N block groups."""
    head_ids = {id(p) for p in head_parameters(model)}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    frozen = backbone if freeze_backbone else early_parameters(model, freeze_blocks) if freeze_blocks else []
    frozen = {id(p) for p in frozen}
    for p in backbone:
        p.requires_grad_(id(p) not in frozen)
    groups = [{"params": head_parameters(model), "lr": lr}]
    trained = [p for p in backbone if id(p) not in frozen]
    if trained:
        groups.append({"params": trained, "lr": lr * backbone_lr_scale, "initial_lr": lr,
                       "lr_scale": backbone_lr_scale})
    return groups


def keep_frozen_statistics(model):
    """BatchNorm layers whose weights are frozen keep their running statistics as loaded (eval mode), so a
    frozen layer computes exactly what it did in pre-training; call after model.train()."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None \
                and not module.weight.requires_grad:
            module.eval()
