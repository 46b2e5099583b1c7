"""Macro-F1 decision layer: predict argmax(p / prior**tau) instead of argmax(p), fitted on OOF probabilities.

Macro F1 weighs every class alike, so predicting a rare class a little more often than its probability
says pays. Dividing by the training class frequencies to the power tau does that with ONE number
(tau = 0: plain argmax, tau = 1: balanced). `--rule prior_age` adds one more number for the mask layout
(18 classes = 3 mask x 2 gender x 3 age): a bonus for the rare age group (>=60). Free per-class weights
were tried and overfit (they did not transfer from single models' OOF probabilities to fold ensembles).

Honesty: `fit` scores the rule by cross-fitting (for each fold k: fit tau and the prior on the other folds'
OOF rows, predict fold k's rows; pool the predictions). Inference averages fold models, whose probabilities
are smoother than one model's OOF ones; `temperature_check` re-scores the cross-fitted rule on tempered OOF
probabilities (p**(1/T), T 0.5..2). `applied` is set only when the cross-fitted macro F1 beats plain argmax
and that gain survives every temperature; `reason` says which check decided, and by how much.

    python -m kit.decision --oof model/exp/oof.csv --out model/exp/decision.json    # fit, print, save
    # in Python:
    from kit import decision
    rule = decision.fit(probs, labels, folds, decision.class_prior(labels, 18))
    rule.to_json("model/exp/decision.json")
    preds = decision.from_json("model/exp/decision.json", n_classes=18).predict(ensemble_probs)
"""
import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kit.common import KitParser, UserError, atomic_write, run_main

TAU_GRID = tuple(np.round(np.arange(0, 1.51, 0.1), 2))
AGE_BIAS_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
TEMPERATURES = (0.5, 0.7, 1.4, 2.0)
RULES = ("prior", "prior_age")


# ---- scores ------------------------------------------------------------------------------------
def per_class_f1(labels, preds, n_classes):
    """F1 of each class 0..n_classes-1 (0 where a class is neither true nor predicted)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    true_pos = np.bincount(labels[labels == preds], minlength=n_classes)[:n_classes]
    support = np.bincount(labels, minlength=n_classes)[:n_classes] + np.bincount(preds, minlength=n_classes)[:n_classes]
    return np.where(support > 0, 2 * true_pos / np.maximum(support, 1), 0.0)


def macro_f1(labels, preds, n_classes):
    """As sklearn's f1_score(average='macro'): the mean over classes that are true or predicted somewhere."""
    present = np.union1d(np.unique(labels), np.unique(preds))
    return float(per_class_f1(labels, preds, n_classes)[present].mean())


def class_prior(labels, n_classes, smoothing=1.0):
    """Training class frequencies, add-`smoothing` so an absent class does not divide by zero."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes)[:n_classes] + smoothing
    return counts / counts.sum()


# ---- the rule ----------------------------------------------------------------------------------
def class_bonus(prior, params):
    """Log-score added to each class: -tau*log(prior), plus age_bias on the >=60 classes (mask layout)."""
    bonus = -params.get("tau", 0.0) * np.log(prior)
    if params.get("age_bias", 0.0):
        bonus = bonus + params["age_bias"] * (np.arange(len(prior)) % 3 == 2)
    return bonus


def decide(probs, prior, params):
    """Class indices maximising log p + bonus (ties to the lower class, as argmax)."""
    return np.argmax(np.log(np.clip(probs, 1e-12, None)) + class_bonus(prior, params), axis=1)


def param_grid(rule):
    """Candidate parameters, simplest first, so ties go to the smaller tau (and bias)."""
    if rule == "prior":
        return [{"tau": float(t)} for t in TAU_GRID]
    if rule == "prior_age":
        return [{"tau": float(t), "age_bias": float(b)} for b in AGE_BIAS_GRID for t in TAU_GRID]
    raise UserError(f"unknown decision rule '{rule}': use one of {', '.join(RULES)}")


def best_params(probs, labels, prior, grid):
    """The grid entry with the highest macro F1 on these rows; a later entry must beat it strictly."""
    n_classes = probs.shape[1]
    best, best_score = grid[0], -1.0
    for params in grid:
        score = macro_f1(labels, decide(probs, prior, params), n_classes)
        if score > best_score + 1e-12:
            best, best_score = params, score
    return best


def cross_fitted_preds(probs, labels, folds, grid, temperature=1.0):
    """Each fold's rows predicted by parameters and a prior fitted on the other folds alone (the held-out fold's
    labels decide nothing about its own predictions); the predicted rows' probabilities are tempered (p**(1/T))
    to mimic sharper or smoother probabilities than those fitted on."""
    preds, fold_params = np.empty(len(labels), int), {}
    for fold in np.unique(folds):
        held = folds == fold
        prior = class_prior(labels[~held], probs.shape[1])
        params = best_params(probs[~held], labels[~held], prior, grid) if (~held).any() else grid[0]
        preds[held] = decide(np.clip(probs[held], 1e-12, None) ** (1 / temperature), prior, params)
        fold_params[int(fold)] = params
    return preds, fold_params


@dataclass
class DecisionRule:
    """A fitted rule plus the evidence for it; `predict` is plain argmax unless `applied`."""
    rule: str
    params: dict
    prior: list
    n_classes: int
    oof_macro_f1: float = 0.0
    cross_fitted_macro_f1: float = 0.0
    applied: bool = False
    robust: bool = False
    reason: str = ""
    per_class_f1_before: list = field(default_factory=list)
    per_class_f1_after: list = field(default_factory=list)
    fold_params: dict = field(default_factory=dict)
    temperature_check: dict = field(default_factory=dict)

    def predict(self, probs):
        probs = np.asarray(probs, dtype=float)
        if probs.ndim != 2 or probs.shape[1] != self.n_classes:
            raise UserError(f"probabilities of shape {probs.shape} given to a decision rule for {self.n_classes} "
                            "classes: use the decision.json of the run that made them")
        if not self.applied:
            return probs.argmax(1)
        return decide(probs, np.asarray(self.prior), self.params)

    def to_json(self, path):
        text = json.dumps(asdict(self), indent=2, sort_keys=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def from_json(path, n_classes):
    """Read a decision.json; refuse one made for another class count."""
    try:
        record = json.loads(Path(path).read_text())
        rule = DecisionRule(**record)
    except FileNotFoundError:
        raise UserError(f"{path} not found: fit it with python -m kit.decision --oof RUN/oof.csv --out {path}") from None
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"{path} is not a decision file ({str(err)[:80]}): refit it with "
                        f"python -m kit.decision --oof RUN/oof.csv --out {path}") from None
    if rule.n_classes != n_classes or len(rule.prior) != n_classes:
        raise UserError(f"{path} is for {rule.n_classes} classes, the model predicts {n_classes}: refit it on this "
                        f"run's OOF (python -m kit.decision --oof RUN/oof.csv --out {path}) or delete it")
    rule.fold_params = {int(k): v for k, v in rule.fold_params.items()}
    return rule


# ---- fitting -----------------------------------------------------------------------------------
def check_inputs(probs, labels, folds, prior):
    probs, labels, folds = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int), np.asarray(folds)
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) != len(folds) or len(prior) != probs.shape[1]:
        raise UserError(f"decision fit: probabilities {probs.shape}, {len(labels)} labels, {len(folds)} folds and "
                        f"a prior of {len(prior)} classes do not line up: pass one row per OOF image")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise UserError(f"decision fit: labels must be 0..{probs.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    return probs, labels, folds, np.asarray(prior, dtype=float)


def temperature_check(probs, labels, folds, grid, plain):
    """Cross-fitted gain over plain argmax when the predicted probabilities are sharper (T<1) or smoother
    (T>1) than the ones fitted on, as a fold ensemble's averaged probabilities are."""
    gains = {}
    for temperature in TEMPERATURES:
        preds, _ = cross_fitted_preds(probs, labels, folds, grid, temperature)
        gains[str(temperature)] = round(macro_f1(labels, preds, probs.shape[1]) - plain, 6)
    return gains


def fit(oof_probs, labels, folds, prior, rule="prior"):
    """Fit the rule on all OOF rows; score it by cross-fitting; apply it only if that beats plain argmax."""
    probs, labels, folds, prior = check_inputs(oof_probs, labels, folds, prior)
    n_classes, grid = probs.shape[1], param_grid(rule)
    if rule == "prior_age" and n_classes != 18:
        raise UserError(f"--rule prior_age needs the mask layout's 18 classes, not {n_classes}: use --rule prior")
    plain_preds = probs.argmax(1)
    plain = macro_f1(labels, plain_preds, n_classes)
    crossed_preds, fold_params = cross_fitted_preds(probs, labels, folds, grid)
    crossed = macro_f1(labels, crossed_preds, n_classes)
    gains = temperature_check(probs, labels, folds, grid, plain)
    gained = bool(crossed > plain + 1e-9)  # not for a float-rounding "gain"
    robust = gained and min(gains.values()) > 0
    return DecisionRule(rule=rule, params=best_params(probs, labels, prior, grid), prior=prior.tolist(),
                        n_classes=n_classes, oof_macro_f1=plain, cross_fitted_macro_f1=crossed,
                        applied=robust, robust=robust, reason=verdict(crossed - plain, gains, gained),
                        per_class_f1_before=per_class_f1(labels, plain_preds, n_classes).round(6).tolist(),
                        per_class_f1_after=per_class_f1(labels, crossed_preds, n_classes).round(6).tolist(),
                        fold_params=fold_params, temperature_check=gains)


def verdict(gain, gains, gained):
    """Why the rule is applied or not, with the numbers: the check that decided and by how much."""
    worst = min(gains, key=gains.get)
    if not gained:
        return f"not applied: no cross-fitted gain ({gain:+.4f} macro F1 on held-out folds)"
    if gains[worst] <= 0:
        return (f"not applied: cross-fitted gain {gain:+.4f}, but {gains[worst]:+.4f} with the probabilities at "
                f"temperature {worst} (a fold ensemble's are smoother or sharper than the OOF ones it was fitted on)")
    return f"applied: cross-fitted gain {gain:+.4f}, at least {gains[worst]:+.4f} at every temperature"


# ---- the run folder ---------------------------------------------------------------------------
def fit_run(run_dir, rule="prior"):
    """Fit the rule on a finished run's oof.csv and write decision.json. It is applied (by inference.py, the demo
    page and export's metadata) only when the cross-fitted gain is positive AND survives sharper and smoother
    probabilities, as a fold ensemble's averaged ones are (temperature_check); reason says which."""
    probs, labels, folds = read_oof(Path(run_dir) / "oof.csv")
    fitted = fit(probs, labels, folds, class_prior(labels, probs.shape[1]), rule)
    fitted.to_json(Path(run_dir) / "decision.json")
    return fitted


def run_rule(run_dir, n_classes):
    """The run's decision rule when its decision.json applies one, else None (plain argmax)."""
    path = Path(run_dir) / "decision.json"
    if not path.is_file():
        return None
    rule = from_json(path, n_classes)
    return rule if rule.applied else None


# ---- command line ------------------------------------------------------------------------------
def read_oof(path):
    """(probabilities, labels, folds) from a run's oof.csv (path,profile,fold,label,pred,p0..p{C-1})."""
    import pandas as pd
    if not Path(path).is_file():
        raise UserError(f"{path} not found: pass --oof RUN_DIR/oof.csv of a finished run")
    oof = pd.read_csv(path)
    prob_cols = [c for c in oof.columns if c.startswith("p") and c[1:].isdigit()]
    if not prob_cols or not {"label", "fold"} <= set(oof.columns):
        raise UserError(f"{path} has no label, fold and p0..pN columns: pass a run's oof.csv")
    prob_cols.sort(key=lambda c: int(c[1:]))
    return oof[prob_cols].to_numpy(float), oof["label"].to_numpy(int), oof_folds(oof)


def oof_folds(oof, groups=5):
    """The OOF rows' folds; a one-fold OOF (a --fold i run) is split into person-grouped parts instead,
    so cross-fitting still fits and scores on different people."""
    if oof["fold"].nunique() > 1 or "profile" not in oof.columns:
        return oof["fold"].to_numpy()
    codes = pd_codes(oof["profile"].astype(str))
    print(f"one fold in the OOF: cross-fitting over {groups} person-grouped parts of it")
    return codes % groups


def pd_codes(values):
    """0..n-1 per distinct value, in order of first appearance (deterministic)."""
    first_seen = {}
    return values.map(lambda v: first_seen.setdefault(v, len(first_seen))).to_numpy()


def summary(rule):
    before, after = np.array(rule.per_class_f1_before), np.array(rule.per_class_f1_after)
    rarest = np.argsort(rule.prior)[:3]
    lines = [f"rule {rule.rule} {rule.params} (per fold: {list(rule.fold_params.values())})",
             f"plain argmax OOF macro F1 {rule.oof_macro_f1:.4f}, cross-fitted {rule.cross_fitted_macro_f1:.4f} "
             f"(gain {rule.cross_fitted_macro_f1 - rule.oof_macro_f1:+.5f})",
             f"tempered-probability gains {rule.temperature_check} -> {rule.reason}",
             "rarest classes " + ", ".join(f"{c}: F1 {before[c]:.3f} -> {after[c]:.3f}" for c in rarest)]
    return "\n".join(lines)


def read_answers(path):
    """A labelled test set's answers (ImageID,ans); a test table whose ans is one placeholder (info.csv) is refused."""
    import pandas as pd
    answers = pd.read_csv(path)
    if {"ImageID", "ans"} - set(answers.columns):
        raise UserError(f"{path} needs the columns ImageID,ans, not {','.join(map(str, answers.columns))}")
    if len(answers) > 1 and answers["ans"].nunique() == 1:
        raise UserError(f"{path} answers {answers['ans'].iloc[0]} for all {len(answers)} images, like info.csv's "
                        "placeholder: pass the true labels (e.g. make_photo_people's eval/answers.csv)")
    return answers


def held_out_report(rule, probs_csv, answers_csv):
    """Plain vs rule macro F1 on a labelled test set: inference.py's probs.csv and an answers file
    (ImageID,ans), e.g. make_photo_people's eval/answers.csv."""
    import pandas as pd
    for path in (probs_csv, answers_csv):
        if not Path(path).is_file():
            raise UserError(f"{path} not found: pass inference.py's probs.csv and the matching answers.csv")
    probs = pd.read_csv(probs_csv).merge(read_answers(answers_csv), on="ImageID", validate="one_to_one")
    if len(probs) == 0:
        raise UserError(f"{probs_csv} and {answers_csv} share no ImageID: pass files of the same test set")
    matrix, labels = probs[[f"p{c}" for c in range(rule.n_classes)]].to_numpy(float), probs["ans"].to_numpy(int)
    applied = dict(asdict(rule), applied=True)  # what the rule would do, even where the fit did not apply it
    plain = macro_f1(labels, matrix.argmax(1), rule.n_classes)
    ruled = macro_f1(labels, DecisionRule(**applied).predict(matrix), rule.n_classes)
    return f"held-out ({len(labels)} images): plain macro F1 {plain:.4f}, with {rule.params} {ruled:.4f}"


def submission_report(submission_csv, answers_csv, n_classes):
    """Macro F1 and accuracy of a submission (inference.py's output.csv: what was answered, with the rule and
    person-consistent answers where the run applied them) on a labelled test set; per head on the mask layout."""
    import pandas as pd
    from kit.labels import split_label
    for path in (submission_csv, answers_csv):
        if not Path(path).is_file():
            raise UserError(f"{path} not found: pass inference.py's output.csv and the matching answers.csv")
    both = pd.read_csv(submission_csv).merge(read_answers(answers_csv), on="ImageID", suffixes=("", "_true"))
    if len(both) == 0 or "ans_true" not in both:
        raise UserError(f"{submission_csv} and {answers_csv} share no ImageID with an ans column: pass an output.csv "
                        "and the answers of the same test set")
    answered, labels = both["ans"].to_numpy(int), both["ans_true"].to_numpy(int)
    line = (f"held-out submission ({len(labels)} images): macro F1 {macro_f1(labels, answered, n_classes):.4f}, "
            f"accuracy {(answered == labels).mean():.4f}")
    if n_classes == 18:
        heads = zip(("mask", "gender", "age"), split_label(answered), split_label(labels), (3, 2, 3))
        line += "".join(f", {name} {macro_f1(true, given, size):.3f}" for name, given, true, size in heads)
    return line


def parse_args(argv=None):
    parser = KitParser(prog="python -m kit.decision", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oof", default="model/sample/oof.csv", help="a run's oof.csv")
    parser.add_argument("--rule", choices=RULES, default="prior", help="prior: one tau; prior_age: tau + >=60 bias")
    parser.add_argument("--out", default="", help="write the fitted rule here (e.g. RUN_DIR/decision.json)")
    parser.add_argument("--probs", default="", help="also score on a labelled test set: inference.py's probs.csv")
    parser.add_argument("--answers", default="", help="its true labels (ImageID,ans), e.g. eval/answers.csv")
    parser.add_argument("--submission", default="", help="also score what was answered: inference.py's output.csv")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if (args.probs or args.submission) and not args.answers:
        raise UserError("--probs and --submission are scored against --answers: pass the test set's answers.csv")
    probs, labels, folds = read_oof(args.oof)
    rule = fit(probs, labels, folds, class_prior(labels, probs.shape[1]), args.rule)
    print(summary(rule))
    if args.probs or (args.answers and not args.submission):  # --answers alone: held_out_report asks for --probs
        print(held_out_report(rule, args.probs, args.answers))
    if args.submission:
        print(submission_report(args.submission, args.answers, rule.n_classes))
    if args.out:
        rule.to_json(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
