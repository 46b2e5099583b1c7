"""The mask competition's label grid: 18 classes = mask 3 x gender 2 x age group 3, in that order.

    from kit.labels import make_label, split_label, head_marginals
    label = make_label(mask, gender, age_group)         # mask * 6 + gender * 3 + age_group
    mask, gender, age_group = split_label(label)        # ints, numpy arrays or tensors
    mask_p, gender_p, age_p = head_marginals(probs)     # (N, 18) -> (N, 3), (N, 2), (N, 3)

One definition for dataset.py (labels of the mask layout), model.py (the multi head's 3 + 2 + 3 logits),
loss.py (one criterion per head) and the reports. No imports: model.py and loss.py stay light.
"""
AGE_BOUNDS = (30, 60)  # competition rule: <30, 30-59, >=60
HEAD_NAMES = ("mask", "gender", "age")
HEAD_SIZES = (3, 2, 3)


def make_label(mask, gender, age_grp):
    """The class index of (mask, gender, age group): ints, numpy arrays, pandas columns or tensors."""
    return (mask * HEAD_SIZES[1] + gender) * HEAD_SIZES[2] + age_grp


def split_label(label):
    """18-class label -> (mask, gender, age group); works on ints, numpy arrays and tensors."""
    return label // (HEAD_SIZES[1] * HEAD_SIZES[2]), (label // HEAD_SIZES[2]) % HEAD_SIZES[1], label % HEAD_SIZES[2]


def head_marginals(probs):
    """(..., 18) class probabilities -> [(..., 3), (..., 2), (..., 3)]: per head (mask, gender, age), the sum
    over the other two; numpy arrays or tensors."""
    grid = probs.reshape(*probs.shape[:-1], *HEAD_SIZES)
    axes = (-3, -2, -1)
    return [grid.sum(tuple(a for a in axes if a != keep)) for keep in axes]


def joint_from_heads(mask, gender, age):
    """Per-head probabilities (N, 3), (N, 2), (N, 3) -> (N, 18) in label order, as if independent; numpy arrays or
    tensors."""
    return (mask[:, :, None, None] * gender[:, None, :, None] * age[:, None, None, :]).reshape(mask.shape[0], -1)


def head_value_names(classes):
    """Mask-layout class names 'mask/gender/age' -> the value names of each head, in head order."""
    heads = [split_label(i) for i in range(len(classes))]
    return [[next(classes[i].split("/")[h] for i in range(len(classes)) if heads[i][h] == value)
             for value in range(size)] for h, size in enumerate(HEAD_SIZES)]
