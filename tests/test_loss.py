"""Known-value tests for loss.py: each compares against torch or a by-hand formula."""

import pytest
import torch
import torch.nn.functional as F

from kit.labels import split_label  # noqa: E402
from loss import CRITERIA, class_weights, create_criterion  # noqa: E402

C = 18


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: extra threads only add overhead, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(n=36, classes=C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=gen) * 2, torch.arange(n) % classes


def test_focal_gamma_zero_is_cross_entropy():
    logits, target = batch()
    focal = create_criterion("focal", C, gamma=0.0)
    torch.testing.assert_close(focal(logits, target), F.cross_entropy(logits, target), rtol=1e-6, atol=0)
    soft = torch.softmax(torch.randn(len(target), C), 1)
    torch.testing.assert_close(focal(logits, soft), F.cross_entropy(logits, soft), rtol=1e-6, atol=0)


def test_focal_is_smaller_than_ce_when_confident_and_right():
    target = torch.tensor([0, 1, 2])
    logits = F.one_hot(target, 3) * 3.0  # p(correct) ~ 0.91
    focal = create_criterion("focal", 3, gamma=2.0)(logits, target)
    ce = F.cross_entropy(logits, target)
    assert 0 < focal < ce / 50  # (1 - 0.91) ** 2 ~ 0.008


def test_focal_alpha_by_hand():
    logits, target = batch(6, 3)
    alpha = [0.25, 1.0, 4.0]
    loss = create_criterion("focal", 3, gamma=2.0, alpha=alpha)(logits, target)
    p = logits.softmax(1)[torch.arange(6), target]
    by_hand = (-torch.tensor(alpha)[target] * (1 - p) ** 2 * p.log()).mean()
    torch.testing.assert_close(loss, by_hand)
    assert not torch.isclose(loss, create_criterion("focal", 3, gamma=2.0)(logits, target))
    counts = [10, 5, 1]
    balanced = create_criterion("focal", 3, class_counts=counts, alpha="balanced")
    explicit = create_criterion("focal", 3, alpha=class_weights(counts).tolist())
    torch.testing.assert_close(balanced(logits, target), explicit(logits, target))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gradients_finite_when_saturated(gamma):
    logits = torch.tensor([[40.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    create_criterion("focal", 3, gamma=gamma)(logits, torch.tensor([0, 1])).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() > 0


def test_soft_f1_perfect_and_wrong():
    target = torch.arange(C).repeat(2)
    f1 = create_criterion("f1", C)
    assert abs(f1(F.one_hot(target, C) * 100.0, target).item()) < 1e-4
    wrong = F.one_hot((target + 1) % C, C) * 100.0
    assert f1(wrong, target).item() > 0.9
    # a class missing from the batch does not count against a perfect prediction
    assert abs(f1(F.one_hot(target[:5], C) * 100.0, target[:5]).item()) < 1e-4


def test_label_smoothing_matches_torch():
    logits, target = batch()
    loss = create_criterion("label_smoothing", C, smoothing=0.2)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, label_smoothing=0.2))
    soft = torch.softmax(torch.randn(len(target), C), 1)
    torch.testing.assert_close(loss(logits, soft), F.cross_entropy(logits, soft, label_smoothing=0.2))
    assert create_criterion("label_smoothing", C).label_smoothing == 0.1


def test_weighted_ce_weights_by_hand():
    counts = [90, 9, 1, 0]
    # inverse 1/90, 1/9, 1 over the 3 present classes, mean (1/90 + 1/9 + 1) / 3 = 101/270; absent -> 0
    expected = torch.tensor([3 / 101, 30 / 101, 270 / 101, 0.0])
    torch.testing.assert_close(class_weights(counts), expected)
    logits, target = batch(12, 4)
    target = target % 3  # class 3 has no training images, so it is never a target
    loss = create_criterion("weighted_ce", 4, class_counts=counts)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, weight=expected))
    torch.testing.assert_close(loss(logits, F.one_hot(target, 4).float()), loss(logits, target))


def test_combination_is_weighted_sum_of_parts():
    logits, target = batch()
    ce, f1 = F.cross_entropy(logits, target), create_criterion("f1", C)(logits, target)
    loss = create_criterion("ce+f1", C, weights=[0.7, 0.3])
    torch.testing.assert_close(loss(logits, target), 0.7 * ce + 0.3 * f1)
    torch.testing.assert_close(create_criterion("ce + f1", C)(logits, target), ce + f1)


def test_multi_head_is_sum_of_head_losses():
    logits, target = batch(36, 8)
    target = torch.arange(36) % C
    mask, gender, age = split_label(target)
    heads = logits.split([3, 2, 3], dim=1)
    by_hand = sum(w * F.cross_entropy(x, t) for w, x, t in zip([1.0, 0.5, 2.0], heads, [mask, gender, age]))
    loss = create_criterion("ce", C, head="multi", head_weights=[1.0, 0.5, 2.0])
    torch.testing.assert_close(loss(logits, target), by_hand)
    torch.testing.assert_close(loss(logits, F.one_hot(target, C).float()), by_hand)
    # a 50/50 mixup of labels 0 (wear/male/<30) and 17 (not worn/female/>=60) -> 50/50 in every head
    mixed = (F.one_hot(torch.tensor([0]), C) + F.one_hot(torch.tensor([17]), C)).float() / 2
    soft_heads = [torch.tensor([[0.5, 0.0, 0.5]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.0, 0.5]])]
    by_hand = sum(w * F.cross_entropy(x, t) for w, x, t in zip([1.0, 0.5, 2.0], logits[:1].split([3, 2, 3], 1),
                                                                 soft_heads))
    torch.testing.assert_close(loss(logits[:1], mixed), by_hand)


def test_multi_head_class_weights_come_from_marginal_counts():
    labels = torch.tensor([0] * 50 + [4] * 30 + [17] * 5 + list(range(C)))
    loss = create_criterion("weighted_ce", C, class_counts=torch.bincount(labels, minlength=C), head="multi")
    for part, head_labels, size in zip(loss.criteria, split_label(labels), [3, 2, 3]):
        torch.testing.assert_close(part.weight, class_weights(torch.bincount(head_labels, minlength=size)))
    assert loss.criteria[2].weight[2] > loss.criteria[2].weight[0]  # the rare 60+ group weighs more


@pytest.mark.parametrize("head", ["single", "multi"])
@pytest.mark.parametrize("soft", [False, True], ids=["int", "soft"])
@pytest.mark.parametrize("name", [*CRITERIA, "ce+f1"])
def test_gradients_flow(name, head, soft):
    logits, target = batch(36, 8 if head == "multi" else C)
    logits.requires_grad_(True)
    target = torch.arange(36) % C
    if soft:
        target = 0.6 * F.one_hot(target, C) + 0.4 * F.one_hot(target.flip(0), C)
    counts = torch.bincount(torch.arange(100) % C, minlength=C)
    create_criterion(name, C, class_counts=counts, head=head)(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_unknown_name_lists_valid_names_and_close_match():
    with pytest.raises(ValueError) as err:
        create_criterion("ce+focall", C)
    assert str(err.value) == ("unknown criterion 'focall'; did you mean focal? "
                              "valid: ce, label_smoothing, focal, f1, weighted_ce")


def test_wrong_weight_counts_raise():
    with pytest.raises(ValueError, match="criterion_weights has 3 values"):
        create_criterion("ce+f1", C, weights=[0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="head_weights has 2 values"):
        create_criterion("ce", C, head="multi", head_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="class_counts"):
        create_criterion("weighted_ce", C)
