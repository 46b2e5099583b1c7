"""Person-consistent answers (kit/people.py) and the fold ensemble's shared frozen trunk (kit/predict.py): groups
never exceed a person's 7 pictures or mix two unmasked pictures, pooling keeps each picture's mask, the fit is
measured out of fold and applied only on a gain, inference uses it as the run says, and a run whose folds share
their frozen trunk is predicted with the trunk run once, to the same probabilities."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
import inference  # noqa: E402
import train  # noqa: E402
from kit import people, predict, speed  # noqa: E402
from kit.labels import head_marginals, make_label  # noqa: E402
from support import one_line_error  # noqa: E402

EVAL = ROOT / "sample" / "eval"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def persons(count, size=7, spread=0.01, seed=0):
    """Unit descriptors: count tight clusters of size pictures each, and their person ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(count, 32))
    points = np.repeat(centres, size, axis=0) + rng.normal(scale=spread, size=(count * size, 32))
    return points / np.linalg.norm(points, axis=1, keepdims=True), np.repeat(np.arange(count), size)


def seven_masks(count):
    return np.tile([0, 0, 0, 0, 0, 1, 2], count)  # mask1..5 worn, incorrect, not worn


def test_groups_are_people_of_at_most_seven_with_one_unmasked_picture():
    embedding, who = persons(4)
    groups = people.group(embedding, seven_masks(4), 0.2)
    assert people.purity(groups, who) == 1.0 and len(set(groups)) == 4
    crowd, _ = persons(1, size=10)  # ten near-identical pictures: still groups of at most 7
    assert pd.Series(people.group(crowd, np.zeros(10, int), 0.2)).value_counts().max() <= 7
    twins, _ = persons(1, size=4)  # alike, but two pictures without a mask: two people
    groups = people.group(twins, np.array([2, 2, 0, 0]), 0.2)
    assert groups[0] != groups[1]


def test_pooling_averages_gender_and_age_in_a_group_and_keeps_each_mask():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(18), 6)
    groups = np.array([0, 0, 0, 1, 1, 2])
    out = people.pooled(probs, groups, (1, 2))
    assert np.allclose(out.sum(1), 1)
    before, after = head_marginals(probs), head_marginals(out)
    assert np.allclose(after[0], before[0])  # the mask answer stays each picture's own
    for head in (1, 2):
        assert np.allclose(after[head][0], after[head][1]) and np.allclose(after[head][3], after[head][4])
        geometric = np.exp(np.log(before[head][:3]).mean(0))
        assert np.allclose(after[head][0], geometric / geometric.sum())
        assert np.allclose(after[head][5], before[head][5])  # a group of one is left as it was


def synthetic_oof(embedding, who, seed=0):
    """OOF rows of people (5 folds of whole people): mask read well, gender and age noisy per picture."""
    rng = np.random.default_rng(seed)
    n_people = who.max() + 1
    gender, age = rng.integers(0, 2, n_people)[who], rng.choice(3, n_people, p=[.5, .35, .15])[who]
    mask = seven_masks(n_people)
    labels = make_label(mask, gender, age)
    logits = rng.normal(0, 1.2, (len(who), 18)) + 2.5 * np.eye(18)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame({"path": [f"p{i}.jpg" for i in range(len(who))], "profile": who.astype(str),
                          "fold": who % 5, "label": labels, "pred": probs.argmax(1)})
    return pd.concat([frame, pd.DataFrame(probs, columns=[f"p{i}" for i in range(18)])], axis=1)


def test_the_fit_is_measured_out_of_fold_and_applied_only_on_a_gain():
    embedding, who = persons(60, spread=0.02)
    fitted = people.fit(synthetic_oof(embedding, who), embedding)
    assert fitted.applied and fitted.purity > 0.95 and fitted.oof_macro_f1_pooled > fitted.oof_macro_f1
    assert set(fitted.fold_choices) == {0, 1, 2, 3, 4} and "applied" in fitted.reason
    pure = fitted.merges["pure_groups"]  # one person's noisy answers pooled: more fixed than broken
    assert pure["pictures"] > 0.9 * len(who) and pure["wrong_to_right"] > pure["right_to_wrong"]
    assert fitted.merges["merged"]["pictures"] < 0.05 * len(who)
    scrambled = np.random.default_rng(1).permutation(embedding)  # descriptors that say nothing of the person
    refused = people.fit(synthetic_oof(embedding, who), scrambled)
    assert refused.purity < 0.6 and (refused.applied == (refused.oof_macro_f1_pooled > refused.oof_macro_f1))


@pytest.fixture(scope="module")
def people_run(tmp_path_factory, tiny_run_dir):
    """The session's tiny run (a mask-layout run of 2 folds: it fitted people.json at its end), copied."""
    run = tmp_path_factory.mktemp("people") / "run"
    shutil.copytree(tiny_run_dir, run)
    return run


def test_a_run_fits_people_json_at_its_end(people_run):
    record = json.loads((people_run / "people.json").read_text())
    assert 0 <= record["purity"] <= 1 and record["heads"] in people.HEAD_CHOICES
    assert record["applied"] == (record["oof_macro_f1_pooled"] > record["oof_macro_f1"])


def test_inference_answers_from_pooled_probabilities_when_the_run_says_so(people_run, tmp_path):
    argv = ["--data_dir", str(EVAL), "--model_dir", str(people_run), "--num_workers", "0", "--decision", "off"]
    inference.main([*argv, "--people", "off", "--output_dir", str(tmp_path / "off")])
    record = json.loads((people_run / "people.json").read_text())
    (people_run / "people.json").write_text(json.dumps({**record, "applied": True}))
    inference.main([*argv, "--output_dir", str(tmp_path / "auto")])
    manifest = json.loads((tmp_path / "auto" / "output_manifest.json").read_text())
    assert manifest["people"]["threshold"] == record["threshold"]
    plain = pd.read_csv(tmp_path / "off" / "probs.csv")
    pd.testing.assert_frame_equal(plain, pd.read_csv(tmp_path / "auto" / "probs.csv"))  # probs.csv stays plain
    found = people.read_people(people_run)
    info = pd.read_csv(EVAL / "info.csv")
    pooled, _ = found.apply(plain.iloc[:, 1:].to_numpy(), people.embed([str(EVAL / "images" / i)
                                                                          for i in info["ImageID"]]))
    assert (pd.read_csv(tmp_path / "auto" / "output.csv")["ans"] == pooled.argmax(1)).all()


def test_bad_requests_for_people_are_one_line(people_run, tiny_run_dir, tmp_path):
    argv = ["--data_dir", str(EVAL), "--num_workers", "0", "--people", "on", "--output_dir", str(tmp_path / "o")]
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run_dir, bare, ignore=shutil.ignore_patterns("people.json"))
    assert "python -m kit.people" in one_line_error(lambda: inference.main([*argv, "--model_dir", str(bare)]))
    assert "needs one run" in one_line_error(lambda: inference.main([*argv, "--model_dir", str(people_run),
                                                                      str(bare)]))
    one = tmp_path / "one"
    (one / "images").mkdir(parents=True)
    shutil.copy(EVAL / "images" / pd.read_csv(EVAL / "info.csv")["ImageID"][0], one / "images")
    pd.read_csv(EVAL / "info.csv").head(1).to_csv(one / "info.csv", index=False)
    assert "nothing to group" in one_line_error(lambda: inference.main([*argv, "--model_dir", str(people_run),
                                                                         "--data_dir", str(one)]))
    assert not (tmp_path / "o").exists()
    csv_run = tmp_path / "csv_run"
    shutil.copytree(tiny_run_dir, csv_run)
    config = json.loads((csv_run / "config.json").read_text())
    (csv_run / "config.json").write_text(json.dumps({**config, "layout": "folder"}))
    assert "mask layout" in one_line_error(lambda: people.fit_run(csv_run))
    moved = tmp_path / "moved"
    assert "pass --data_dir" in one_line_error(lambda: people.fit_run(people_run, data_dir=moved))
    lonely = tmp_path / "lonely"  # one finished fold: nothing to fit out of fold
    shutil.copytree(people_run, lonely, ignore=shutil.ignore_patterns("fold1"))
    assert "two or more" in one_line_error(lambda: people.fit_run(lonely))
    assert json.loads((people_run / "people.json").read_text()) == json.loads((lonely / "people.json").read_text())


# ---- the shared frozen trunk -----------------------------------------------------------------------------
def test_fold_models_that_share_their_frozen_trunk_run_it_once_to_the_same_answers(tmp_path, monkeypatch):
    import timm
    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "start.pth")  # every fold's start
    train.main(["--data_dir", str(ROOT / "sample" / "train"), "--model", "test_efficientnet", "--weights",
                str(tmp_path / "start.pth"),
                "--resize", "64", "48", "--batch_size", "32", "--num_workers", "0", "--folds", "2", "--epochs", "1",
                "--freeze_blocks", "2", "--no-report", "--decision", "off", "--people", "off", "--model_dir",
                str(tmp_path), "--name", "frozen"])
    models, config = predict.load_run(tmp_path / "frozen")
    assert speed.shared_trunk(models, 2) == 2 and speed.shared_trunk(models, 3) == 0  # block 3 was trained
    files = [str(EVAL / "images" / i) for i in pd.read_csv(EVAL / "info.csv")["ImageID"]]
    whole = predict.predict_files(models, {**config, "freeze_blocks": 0}, files, torch.device("cpu"), tta=True)
    calls = []
    real = predict.frozen_blocks
    monkeypatch.setattr(predict, "frozen_blocks", lambda *a: calls.append(1) or real(*a))
    shared = predict.predict_files(models, config, files, torch.device("cpu"), tta=True, batch_size=64)
    assert np.abs(shared - whole).max() == 0.0
    assert len(calls) == 2 * -(-len(files) // 64)  # once per batch and view, not per model
