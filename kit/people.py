"""Person-consistent answers: the test pictures grouped into people without ids, each group's gender and age
pooled, each picture keeping its own mask answer; fitted and measured out of fold, applied where that gains.

    python -m kit.people --model_dir model/exp        # fit people.json on a finished mask-layout run (train.py
                                                       # does it at the end); prints purity and OOF F1 with/without

In the competition a person's 7 pictures come from one sitting: background, clothes, hair and light repeat, and
the test ids are hashed. A descriptor of each whole picture (ImageNet lite0's pooled features, offline weights)
groups them: complete linkage under a distance threshold, at most 7 pictures, at most one predicted "incorrect"
and one "not worn" each. A group's gender and age
probabilities are its pictures' geometric mean; the decision layer is then refitted on the pooled probabilities.

Honest by construction: the OOF pictures are grouped without their profiles, all together (as many strangers as
a test set of that size has); for each fold k, the threshold and the heads to pool (gender + age, gender, age)
are chosen on the other folds' pictures, where people are known, and fold k's are pooled with them.
people.json keeps the grouping's purity against the true people, OOF macro F1 with and without (each with its
cross-fitted decision rule) and the age head's F1; inference.py applies the step by default only when that
out-of-fold gain is positive. Wrong merges are inside that measurement: the grouping is the one inference makes.
"""
import argparse
from pathlib import Path

from kit.common import KitParser, UserError, run_main


def parse_args(argv=None):
    p = KitParser(prog="python -m kit.people", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default="model/exp", help="a finished run folder of the mask layout")
    p.add_argument("--data_dir", default=None, help="its training images, if moved since training")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from dataset import build_transform
from kit import decision
from kit.common import atomic_write
from kit.images import ImageDataset
from kit.labels import head_marginals, joint_from_heads
from kit.metrics import scores
from kit.runs import collect_oof, read_config
from kit.weights import lite0_weights
from model import create_model

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # cosine distances between descriptors
EMBED_SIZE = (3, 128, 96)  # the whole picture, portrait
HEAD_CHOICES = {"gender+age": (1, 2), "gender": (1,), "age": (2,)}
PICTURES_PER_PERSON, NEIGHBOURS = 7, 20
MASK_LIMITS = (5, 1, 1)  # a person's pictures: mask1..5 worn, one incorrect, one not worn


# ---- picture descriptors and groups -----------------------------------------------------------------------
def embed(files, batch_size=64):
    """Unit descriptors of whole pictures: ImageNet tf_efficientnet_lite0's pooled features (offline weights from
    kit.weights; the same network for every run, so a run's OOF and its test set are described alike), centred on
    the set. What a person's pictures share (background, clothes, hair, light) is what ImageNet features see."""
    network = create_model("tf_efficientnet_lite0", 1000, pretrained=False, weights=lite0_weights()).eval()
    network = network.to(memory_format=torch.channels_last)  # 2.1x faster on a CPU (depthwise convolutions)
    transform = build_transform("base", EMBED_SIZE, "bilinear", train=False)
    loader = DataLoader(ImageDataset(files, None, transform, draft_size=EMBED_SIZE[:0:-1]), batch_size)
    backbone, parts = network.backbone, []
    with torch.inference_mode():
        for images, _, _ in loader:
            images = network.normalize(images).contiguous(memory_format=torch.channels_last)
            parts.append(backbone.forward_head(backbone.forward_features(images), pre_logits=True))
    features = torch.cat(parts).double().numpy()
    features -= features.mean(0)
    return features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)


def candidate_pairs(embedding, threshold):
    """(distance, i, j) of each picture and its nearest neighbours under threshold, nearest first."""
    pairs = []
    for start in range(0, len(embedding), 1024):  # blocks: a large test set's distance matrix is never whole
        distance = 1 - embedding[start:start + 1024] @ embedding.T
        nearest = np.argsort(distance, axis=1)[:, :NEIGHBOURS + 1]
        for row, columns in enumerate(nearest):
            i = start + row
            pairs += [(distance[row, j], min(i, j), max(i, j)) for j in columns if j != i and distance[row, j] <= threshold]
    return sorted(set(pairs))


def group(embedding, masks, threshold):
    """Group labels: pictures merged nearest first while every pair in the merged group is within threshold
    (complete linkage), it holds at most 7 pictures and at most MASK_LIMITS of each predicted mask state."""
    members = {i: [i] for i in range(len(embedding))}
    label = np.arange(len(embedding))
    for _, i, j in candidate_pairs(embedding, threshold):
        a, b = label[i], label[j]
        merged = members[a] + members[b] if a != b else None
        if merged is None or len(merged) > PICTURES_PER_PERSON:
            continue
        if (1 - embedding[members[a]] @ embedding[members[b]].T).max() > threshold:
            continue
        if any(np.count_nonzero(masks[merged] == m) > limit for m, limit in enumerate(MASK_LIMITS)):
            continue
        label[members[b]] = a
        members[a] = merged
        del members[b]
    return label


def pooled(probs, groups, heads):
    """18-class probabilities with the heads' marginals replaced by their group's geometric mean; the mask head
    (and any head not pooled) stays the picture's own."""
    parts = []
    for index, part in enumerate(head_marginals(probs)):
        if index in heads:
            logs = pd.DataFrame(np.log(np.clip(part, 1e-9, None))).groupby(np.asarray(groups)).transform("mean")
            part = np.exp(logs.to_numpy())
            part /= part.sum(1, keepdims=True)
        parts.append(part)
    return joint_from_heads(*parts)


def purity(groups, people):
    """The share of pictures whose group's most common person is their own."""
    frame = pd.DataFrame({"group": groups, "person": people})
    return float(frame.groupby("group")["person"].agg(lambda s: s.value_counts().iloc[0]).sum() / len(frame))


# ---- fitting on a run's OOF -------------------------------------------------------------------------------
def tuned_f1(probs, labels):
    """Macro F1 with the decision rule's tau fitted on these rows (what choosing a pooling is judged by)."""
    prior = decision.class_prior(labels, probs.shape[1])
    params = decision.best_params(probs, labels, prior, decision.param_grid("prior"))
    return decision.macro_f1(labels, decision.decide(probs, prior, params), probs.shape[1])


def choose(probs, labels, grouped, rows):
    """The (threshold, heads) whose pooling scores best on the rows (decision rule refitted on them)."""
    best, best_score = None, -1.0
    for threshold in THRESHOLDS:
        for name, heads in HEAD_CHOICES.items():
            score = tuned_f1(pooled(probs, grouped[threshold], heads)[rows], labels[rows])
            if score > best_score + 1e-12:
                best, best_score = (float(threshold), name), score
    return best


@dataclass
class People:
    """people.json: the chosen grouping and pooling, and the out-of-fold evidence for it."""
    threshold: float
    heads: str
    applied: bool
    reason: str
    purity: float
    oof_macro_f1: float
    oof_macro_f1_pooled: float
    age_f1: float  # the age head's macro F1 of the answers scored above (rule or argmax), before and after
    age_f1_pooled: float
    group_size: float
    fold_choices: dict = field(default_factory=dict)
    decision: dict = field(default_factory=dict)
    merges: dict = field(default_factory=dict)  # what wrong merges cost against what pure groups gained

    def apply(self, probs, embedding):
        """(pooled probabilities, group labels) of test pictures (their descriptors: embedding), grouped and
        pooled as the OOF was."""
        groups = group(embedding, head_marginals(probs)[0].argmax(1), self.threshold)
        return pooled(probs, groups, HEAD_CHOICES[self.heads]), groups

    def rule(self):
        """The decision rule fitted on the pooled OOF probabilities (what answers pooled test probabilities)."""
        return decision.DecisionRule(**{**self.decision, "fold_params": {int(k): v for k, v in
                                                                         self.decision["fold_params"].items()}})


def fit(oof, embedding):
    """People fitted and measured out of fold on a run's oof frame and its pictures' descriptors. All the
    OOF pictures are grouped together (no label or person used), so each meets as many strangers as in a test set
    of that size; for each fold k the threshold and heads are chosen on the other folds' pictures and fold k's are
    pooled with them."""
    probs = oof[[c for c in oof.columns if c.startswith("p") and c[1:].isdigit()]].to_numpy(float)
    labels, folds = oof["label"].to_numpy(int), oof["fold"].to_numpy()
    masks = head_marginals(probs)[0].argmax(1)
    grouped = {t: group(embedding, masks, t) for t in THRESHOLDS}
    crossed, choices, groups = probs.copy(), {}, np.zeros(len(oof), int)
    for fold in np.unique(folds):
        held = folds == fold
        threshold, heads = choose(probs, labels, grouped, ~held)
        choices[int(fold)] = [threshold, heads]
        groups[held] = grouped[threshold][held]
        crossed[held] = pooled(probs, grouped[threshold], HEAD_CHOICES[heads])[held]
    return evidence(oof, probs, crossed, groups, choose(probs, labels, grouped, np.ones(len(oof), bool)), choices)


def evidence(oof, probs, crossed, groups, final, choices):
    """People from the cross-fitted pooled OOF; each side (macro F1 and the age head's F1 of the same answers)
    scored as inference would answer: with its own cross-fitted decision rule where that is applied, else argmax."""
    labels, folds = oof["label"].to_numpy(int), oof["fold"].to_numpy()
    plain_rule, pooled_rule = (decision.fit(p, labels, folds, decision.class_prior(labels, p.shape[1]))
                               for p in (probs, crossed))
    plain_f1, pooled_f1 = (r.cross_fitted_macro_f1 if r.applied else r.oof_macro_f1 for r in (plain_rule, pooled_rule))
    answers = [decision.cross_fitted_preds(p, labels, folds, decision.param_grid(r.rule))[0] if r.applied
               else p.argmax(1) for p, r in ((probs, plain_rule), (crossed, pooled_rule))]
    age = [scores(labels % 3, a % 3, list(range(3)))["macro_f1"] for a in answers]
    gain, share = pooled_f1 - plain_f1, purity(groups, oof["profile"])
    reason = (f"{'applied' if gain > 0 else 'not applied'}: out-of-fold macro F1 {pooled_f1:.4f} with {final[1]} "
              f"pooled vs {plain_f1:.4f} without ({gain:+.4f}); grouping purity {share:.3f}")
    return People(threshold=final[0], heads=final[1], applied=bool(gain > 0), reason=reason, purity=share,
                  oof_macro_f1=plain_f1, oof_macro_f1_pooled=pooled_f1, age_f1=age[0], age_f1_pooled=age[1],
                  group_size=float(pd.Series(groups).value_counts().mean()), fold_choices=choices,
                  decision=asdict(pooled_rule), merges=merge_costs(groups, oof["profile"], labels, answers))


def merge_costs(groups, people, labels, answers):
    """Answers turned right -> wrong and wrong -> right by pooling, for the pictures merged into another person's
    group (its most common person is not theirs) and for those in groups of one person."""
    frame = pd.DataFrame({"group": groups, "person": np.asarray(people)})
    merged = (frame["person"] != frame.groupby("group")["person"].transform(lambda s: s.value_counts().index[0]))
    mixed = frame.groupby("group")["person"].transform("nunique").to_numpy() > 1
    before, after = (a == labels for a in answers)
    return {name: {"pictures": int(rows.sum()), "right_to_wrong": int((before & ~after)[rows].sum()),
                   "wrong_to_right": int((~before & after)[rows].sum())}
            for name, rows in (("merged", merged.to_numpy()), ("pure_groups", ~mixed))}


def fit_run(run_dir, data_dir=None):
    """Fit people.json for a finished mask-layout run (its OOF and training pictures); returns People."""
    config = read_config(run_dir)
    if config["layout"] != "mask" or len(config["classes"]) != 18:
        raise UserError(f"{run_dir} is a {config['layout']} run: person-consistent answers need the mask layout")
    oof = collect_oof(run_dir)
    if oof["fold"].nunique() < 2:
        raise UserError(f"{run_dir} has {oof['fold'].nunique()} finished fold: fitting out of fold needs two or more")
    data_dir = Path(data_dir or config["data_dir"])
    files = [str(data_dir / p) for p in oof["path"]]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise UserError(f"{len(missing)} training pictures of {run_dir} are not under {data_dir} (first: {missing[0]}):"
                        " pass --data_dir the folder the run trained on")
    people = fit(oof, embed(files))
    atomic_write(Path(run_dir) / "people.json", lambda tmp: Path(tmp).write_text(json.dumps(asdict(people), indent=2)))
    metrics_path = Path(run_dir) / "metrics.json"
    if metrics_path.is_file():  # its evidence beside the run's other scores
        metrics = {**json.loads(metrics_path.read_text()), "people": {key: getattr(people, key) for key in (
            "applied", "purity", "oof_macro_f1", "oof_macro_f1_pooled", "age_f1", "age_f1_pooled", "heads")}}
        atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return people


def read_people(run_dir):
    """The run's People, or None when it has no people.json."""
    path = Path(run_dir) / "people.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["fold_choices"] = {int(k): v for k, v in record.get("fold_choices", {}).items()}
        return People(**record)
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is not a people file ({str(err)[:80]}): refit it with python -m kit.people "
                        f"--model_dir {run_dir}") from None


def summary(people):
    return (f"person-consistent answers ({people.heads} pooled in groups under distance {people.threshold}, "
            f"{people.group_size:.1f} pictures a group): {people.reason}; age head F1 {people.age_f1:.4f} -> "
            f"{people.age_f1_pooled:.4f}" + "".join(
                f"; {kind.replace('_', ' ')}: {m['pictures']} pictures, {m['right_to_wrong']} right -> wrong, "
                f"{m['wrong_to_right']} wrong -> right" for kind, m in people.merges.items()))


def main(argv=None):
    args = parse_args(argv)
    print(summary(fit_run(args.model_dir, args.data_dir)) + f" -> {Path(args.model_dir) / 'people.json'}")


if __name__ == "__main__":
    run_main(main)
