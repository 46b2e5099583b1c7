"""The macro-F1 decision layer (kit/decision.py) on synthetic probabilities; numpy only, about a second.

    python -m pytest -q tests/test_decision.py
"""
import json

import numpy as np
import pytest

from kit import decision
from kit.common import UserError


def imbalanced(seed=0, n=3000, n_classes=4, rare_share=0.04):
    """Honest-but-overlapping probabilities: the rare class's rows rarely win the argmax."""
    rng = np.random.default_rng(seed)
    shares = np.array([1.0] * (n_classes - 1) + [rare_share * (n_classes - 1) / (1 - rare_share)])
    labels = rng.choice(n_classes, n, p=shares / shares.sum())
    logits = rng.normal(0, 1.0, (n, n_classes)) + np.log(shares / shares.sum())
    logits[np.arange(n), labels] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels, np.arange(n) % 5


def balanced(seed=1, n=3000, n_classes=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(0, 1.0, (n, n_classes))
    logits[np.arange(n), labels] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels, np.arange(n) % 5


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(3)
    labels, preds = rng.integers(0, 6, 200), rng.integers(0, 5, 200)
    assert decision.macro_f1(labels, preds, 7) == pytest.approx(f1_score(labels, preds, average="macro"))


def test_rare_class_gets_predicted_and_cross_fitted_f1_not_worse():
    probs, labels, folds = imbalanced()
    rule = decision.fit(probs, labels, folds, decision.class_prior(labels, 4))
    assert rule.params["tau"] > 0
    assert rule.applied and rule.cross_fitted_macro_f1 >= rule.oof_macro_f1
    assert rule.per_class_f1_after[3] > rule.per_class_f1_before[3]
    assert (rule.predict(probs) == 3).sum() > (probs.argmax(1) == 3).sum()


def test_balanced_calibrated_data_is_left_alone():
    probs, labels, folds = balanced()
    rule = decision.fit(probs, labels, folds, decision.class_prior(labels, 4))
    assert rule.params["tau"] == 0 or not rule.applied
    if not rule.applied:
        np.testing.assert_array_equal(rule.predict(probs), probs.argmax(1))


def test_json_round_trip(tmp_path):
    probs, labels, folds = imbalanced()
    rule = decision.fit(probs, labels, folds, decision.class_prior(labels, 4))
    rule.to_json(tmp_path / "decision.json")
    record = json.loads((tmp_path / "decision.json").read_text())
    assert {"rule", "params", "prior", "n_classes", "oof_macro_f1", "cross_fitted_macro_f1", "applied",
            "per_class_f1_before", "per_class_f1_after"} <= set(record)
    again = decision.from_json(tmp_path / "decision.json", n_classes=4)
    assert again == rule
    np.testing.assert_array_equal(again.predict(probs), rule.predict(probs))


def test_decision_file_for_another_class_count_is_refused(tmp_path):
    probs, labels, folds = imbalanced()
    decision.fit(probs, labels, folds, decision.class_prior(labels, 4)).to_json(tmp_path / "decision.json")
    with pytest.raises(UserError, match=r"decision\.json is for 4 classes, the model predicts 18: refit"):
        decision.from_json(tmp_path / "decision.json", n_classes=18)
    with pytest.raises(UserError, match="not found"):
        decision.from_json(tmp_path / "missing.json", n_classes=4)


def test_prior_age_rule_and_bad_inputs():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 18, 600)
    probs = rng.dirichlet(np.ones(18), 600)
    rule = decision.fit(probs, labels, np.arange(600) % 3, decision.class_prior(labels, 18), rule="prior_age")
    assert set(rule.params) == {"tau", "age_bias"} and set(rule.fold_params) == {0, 1, 2}
    with pytest.raises(UserError, match="unknown decision rule"):
        decision.fit(probs, labels, np.arange(600) % 3, decision.class_prior(labels, 18), rule="weights")
    with pytest.raises(UserError, match="do not line up"):
        decision.fit(probs[:10], labels, np.arange(600) % 3, decision.class_prior(labels, 18))


def test_held_out_report_scores_plain_and_rule(tmp_path):
    import pandas as pd
    probs, labels, folds = imbalanced()
    rule = decision.fit(probs, labels, folds, decision.class_prior(labels, 4))
    ids = [f"{i:04d}.jpg" for i in range(len(labels))]
    pd.DataFrame(probs, columns=[f"p{c}" for c in range(4)]).assign(ImageID=ids).to_csv(tmp_path / "probs.csv")
    pd.DataFrame({"ImageID": ids, "ans": labels}).to_csv(tmp_path / "answers.csv", index=False)
    report = decision.held_out_report(rule, tmp_path / "probs.csv", tmp_path / "answers.csv")
    assert report.startswith(f"held-out ({len(labels)} images): plain macro F1 ")
    with pytest.raises(UserError, match="not found"):
        decision.held_out_report(rule, tmp_path / "nope.csv", tmp_path / "answers.csv")


def test_a_submission_is_scored_with_its_heads_and_a_placeholder_answer_file_is_refused(tmp_path):
    import pandas as pd
    labels = np.arange(36) % 18
    answered = labels.copy()
    answered[:3] = [6, 1, 5]  # 0 -> 6: mask wrong; 1 -> 1 right; 2 -> 5: gender wrong (age kept)
    ids = [f"{i:04d}.jpg" for i in range(36)]
    pd.DataFrame({"ImageID": ids, "ans": answered}).to_csv(tmp_path / "output.csv", index=False)
    pd.DataFrame({"ImageID": ids[::-1], "ans": labels[::-1]}).to_csv(tmp_path / "answers.csv", index=False)
    line = decision.submission_report(tmp_path / "output.csv", tmp_path / "answers.csv", 18)
    from sklearn.metrics import f1_score
    assert f"macro F1 {f1_score(labels, answered, average='macro'):.4f}, accuracy {34 / 36:.4f}" in line
    assert f"mask {f1_score(labels // 6, answered // 6, average='macro'):.3f}" in line and "age 1.000" in line
    pd.DataFrame({"ImageID": ids, "ans": 0}).to_csv(tmp_path / "info.csv", index=False)
    with pytest.raises(UserError, match="placeholder"):
        decision.submission_report(tmp_path / "output.csv", tmp_path / "info.csv", 18)
    probs, oof_labels, folds = imbalanced()
    rule = decision.fit(probs, oof_labels, folds, decision.class_prior(oof_labels, 4))
    with pytest.raises(UserError, match="placeholder"):  # the probabilities' report reads answers alike
        decision.held_out_report(rule, tmp_path / "output.csv", tmp_path / "info.csv")
