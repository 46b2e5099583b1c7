"""Losses, and create_criterion(): the one place train.py gets its criterion from.

Every loss takes logits (N, C) with int targets (N,) or probability targets (N, C) from mixup/cutmix;
multi-head models give N x 8 logits [mask 3 | gender 2 | age 3], scored against the 18-class target.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.common import UserError, lookup
from kit.labels import HEAD_NAMES, HEAD_SIZES, head_marginals, split_label


def as_probs(target, num_classes, dtype):
    """Int targets (N,) -> one-hot (N, C); probability targets pass through."""
    return target.to(dtype) if target.dim() == 2 else F.one_hot(target, num_classes).to(dtype)


def class_weights(class_counts):
    """Inverse class frequency, mean 1 over the classes the training fold has; 0 for the others:
    a class with no training images is never a target (mixup only mixes training labels), so its
    weight is never used, and 0 rather than inf keeps nan out of the loss."""
    if class_counts is None or not (torch.as_tensor(class_counts) > 0).any():
        raise UserError("class weights need class_counts with at least one image")
    counts = torch.as_tensor(class_counts, dtype=torch.float32)
    inverse = torch.where(counts > 0, counts.reciprocal(), 0.0)
    return inverse / inverse[counts > 0].mean()


class WeightedCrossEntropy(nn.Module):
    """Cross entropy weighted by inverse class frequency in the training fold."""

    def __init__(self, class_counts=None, **_):
        super().__init__()
        self.register_buffer("weight", class_weights(class_counts))

    def forward(self, logits, target):
        probs = as_probs(target, logits.shape[1], logits.dtype)
        per_sample = -(probs * self.weight * logits.log_softmax(1)).sum(1)
        # Divide by the targets' total weight, as torch does for int targets, so that a batch of int
        # targets and its one-hot version agree (torch divides probability targets by N instead).
        return per_sample.sum() / (probs @ self.weight).sum()


class FocalLoss(nn.Module):
    """Focal loss: each class's CE term scaled by alpha_c * (1 - p_c) ** gamma."""

    def __init__(self, num_classes, gamma=2.0, alpha=None, class_counts=None, **_):
        super().__init__()
        if isinstance(alpha, str) and alpha == "balanced":  # the same weights as weighted_ce
            alpha = class_weights(class_counts)
        alpha = torch.as_tensor(1.0 if alpha is None else alpha, dtype=torch.float32)
        if alpha.numel() not in (1, num_classes):
            raise UserError(f"focal alpha needs {num_classes} weights or 'balanced', not {alpha.numel()}")
        self.gamma = gamma
        self.register_buffer("alpha", alpha)

    def forward(self, logits, target):
        log_p = logits.log_softmax(1)
        # The floor keeps a saturated p = 1 from giving inf gradients (0 ** (gamma - 1)) when gamma < 1.
        scale = self.alpha * (1 - log_p.exp()).clamp(min=1e-6).pow(self.gamma)
        return -(as_probs(target, logits.shape[1], logits.dtype) * scale * log_p).sum(1).mean()


class SoftF1Loss(nn.Module):
    """1 - macro F1 of softmax probabilities, over the classes present in the batch's targets."""

    def __init__(self, eps=1e-7, **_):
        super().__init__()
        self.eps = eps

    def forward(self, logits, target):
        probs, target = logits.softmax(1), as_probs(target, logits.shape[1], logits.dtype)
        f1 = 2 * (probs * target).sum(0) / (probs.sum(0) + target.sum(0) + self.eps)  # 2tp / (2tp + fp + fn)
        # An absent class has no F1 to learn, and predicting it already costs a present class an fn.
        return 1 - f1[target.sum(0) > 0].mean()


class WeightedSum(nn.Module):
    """Sum of criteria times their weights, e.g. 0.7 * ce + 0.3 * f1."""

    def __init__(self, criteria, weights):
        super().__init__()
        self.criteria, self.weights = nn.ModuleList(criteria), weights

    def forward(self, logits, target):
        return sum(w * criterion(logits, target) for w, criterion in zip(self.weights, self.criteria))


class MultiHeadLoss(WeightedSum):
    """Weighted sum of one criterion per head of [mask | gender | age] logits, from 18-class targets."""

    def forward(self, logits, target):
        targets = split_label(target) if target.dim() == 1 else head_marginals(target)
        heads = logits.split(HEAD_SIZES, dim=1)
        return sum(w * c(x, t) for w, c, x, t in zip(self.weights, self.criteria, heads, targets))


# name -> constructor, called with num_classes, class_counts and the options; each takes what it needs.
# torch's CrossEntropyLoss already takes int and probability targets, and smooths both.
CRITERIA = {
    "ce": lambda **_: nn.CrossEntropyLoss(),
    "label_smoothing": lambda smoothing=0.1, **_: nn.CrossEntropyLoss(label_smoothing=smoothing),
    "focal": FocalLoss,
    "f1": SoftF1Loss,
    "weighted_ce": WeightedCrossEntropy,
}


def checked_weights(weights, parts, what):
    if weights is not None and len(weights) != len(parts):
        raise UserError(f"{what} has {len(weights)} values {list(weights)} for {len(parts)} parts: {parts}")
    return [1.0] * len(parts) if weights is None else [float(w) for w in weights]


def create_criterion(name, num_classes, class_counts=None, weights=None, head="single", head_weights=None,
                     **options):
    """Criterion `name` ("ce", "focal", "ce+f1", ...) for a "single" or "multi" `head` model.

    weights: one per '+' part (default equal); head_weights: mask, gender, age (default 1, 1, 1);
    class_counts: the training fold's images per class; options: smoothing, gamma, alpha.
    """
    if head == "multi":
        if num_classes != math.prod(HEAD_SIZES):
            raise UserError(f"multi head needs the {math.prod(HEAD_SIZES)} mask classes, not {num_classes}")
        counts = [None] * len(HEAD_SIZES) if class_counts is None else head_marginals(torch.as_tensor(class_counts))
        heads = [create_criterion(name, size, c, weights, **options) for size, c in zip(HEAD_SIZES, counts)]
        return MultiHeadLoss(heads, checked_weights(head_weights, list(HEAD_NAMES), "head_weights"))
    if head != "single":
        raise UserError(f"unknown head '{head}'; valid: single, multi")
    names = [part.strip() for part in name.split("+")]
    parts = [lookup(CRITERIA, n, "criterion")(num_classes=num_classes, class_counts=class_counts, **options) for n in names]
    if len(parts) == 1 and weights is None:
        return parts[0]
    return WeightedSum(parts, checked_weights(weights, names, "criterion_weights"))


def check_finite(recent, files, epoch):
    """Stop at the first NaN/inf loss since the last check, naming its step and images; empties recent."""
    bad = torch.nonzero(~torch.isfinite(torch.stack([loss for _, loss, _ in recent]))).flatten().tolist()
    if bad:
        step, loss, index = recent[bad[0]]
        raise UserError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}; batch starts with "
                        f"{[files[i] for i in index[:3].tolist()]}: lower --lr or use --amp bf16/off")
    recent.clear()
