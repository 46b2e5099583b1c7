"""Every experiment side by side: a sortable leaderboard of the run folders under one folder.

    python -m kit.compare --model_dir model/                       # model/runs.html + model/runs.csv
    python -m kit.compare --model_dir model/ --outputs output/ sub2/ --curves 8

One row per run folder (a sub-folder with config.json): OOF macro F1, the decision layer's cross-fitted
macro F1 and whether it is applied (from decision.json, blank without one), per head (mask layout), the
lowest and highest fold, minutes (config.json to metrics.json), mean training images/s (log.csv), date,
and only the settings (config.json) that differ between the runs. Click a column heading to sort.
The page also overlays the validation macro F1 by epoch (mean over folds) of the --curves best runs
(runs_curves.png) and lists the submissions found under --outputs (output_manifest.json, written by
inference.py next to each output.csv): which runs, folds, checkpoint and TTA made each, and whether
output.csv is still the file the manifest describes (sha256). A kit.sweep trial its pruner stopped is a row
"pruned after N epochs" (settings, no OOF); folders that are not finished runs (no config.json, unreadable JSON,
no metrics.json yet) are listed as skipped, with the reason.
"""
import argparse
import hashlib
import html
import json
from datetime import datetime
from pathlib import Path

from kit.common import KitParser, UserError, atomic_write, in_range, run_main


def parse_args(argv=None):
    parser = KitParser(prog="python -m kit.compare", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="model", help="the folder holding the run folders (train.py's "
                        "--model_dir)")
    parser.add_argument("--outputs", nargs="*", default=["output"], help="folders searched for "
                        "output_manifest.json (inference.py's --output_dir)")
    parser.add_argument("--curves", type=in_range(int, 0), default=5, help="overlay the learning curves of this "
                        "many best runs (0 = none)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import pandas as pd

from kit.report import image_html, save_figure
from kit.runs import read_config

IDENTITY = {"name", "run_dir", "model_dir", "versions", "kit_version"}  # differ between any two runs: not settings
SORT_SCRIPT = """<script>
// a click on a heading sorts its table by that column (numbers as numbers), a second click reverses
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], rows = Array.from(body.rows), down = th.dataset.down !== "1";
    th.dataset.down = down ? "1" : "0";
    var key = function (row) { var text = row.cells[col].textContent, n = parseFloat(text); return isNaN(n) ? text : n; };
    rows.sort(function (a, b) { var x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * (down ? -1 : 1); });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
</script>"""
STYLE = ("body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
         "td,th{padding:3px 7px;font-size:.92em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}"
         "th{cursor:pointer;background:#f0f0f0;white-space:normal}img{max-width:100%}")


def read_json(path):
    """A JSON file of a run; a missing or corrupt one is a UserError (the run is then skipped)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no {Path(path).name}: unfinished run") from None
    except (ValueError, OSError) as err:
        raise UserError(f"{Path(path).name} is not readable JSON ({type(err).__name__})") from None


def decision_scores(run_dir):
    """(cross-fitted macro F1, applied, why) from decision.json, or blanks without one."""
    path = Path(run_dir) / "decision.json"
    if not path.is_file():
        return None, None, ""
    decision = read_json(path)  # kit.decision's DecisionRule fields
    return decision.get("cross_fitted_macro_f1"), decision.get("applied"), decision.get("reason", "")


def learning_curve(run_dir):
    """(mean training images/s, validation macro F1 by epoch averaged over folds) from log.csv."""
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        return None, pd.Series(dtype=float)
    log = pd.read_csv(path)
    return float(log["img_s"].mean()), log.groupby("epoch")["val_f1"].mean()


def sweep_state(run_dir):
    """A kit.sweep trial's state from its marker ("" for a run no sweep made)."""
    path = Path(run_dir) / "sweep_trial.json"
    return read_json(path).get("state", "") if path.is_file() else ""


def pruned_row(run_dir):
    """A trial the sweep's pruner stopped: its settings and its last reported epoch, no OOF (it never finished)."""
    config = read_config(run_dir, fix="not a run folder of train.py")
    marker = read_json(Path(run_dir) / "sweep_trial.json")
    curve = learning_curve(run_dir)[1]
    return ({"run": Path(run_dir).name, "status": f"pruned after {marker.get('epochs_reported')} epochs",
             "oof_macro_f1": None, "folds_done": 0, "date": datetime.fromtimestamp((Path(run_dir) / "config.json").stat().st_mtime).strftime(
                 "%Y-%m-%d %H:%M")}, config, curve)


def run_row(run_dir):
    """A run's leaderboard cells (scores, time, speed), config and curve; a UserError = skipped."""
    if sweep_state(run_dir) == "pruned":
        return pruned_row(run_dir)
    config = read_config(run_dir, fix="not a run folder of train.py")
    metrics = read_json(Path(run_dir) / "metrics.json")
    started, ended = (Path(run_dir) / "config.json").stat().st_mtime, (Path(run_dir) / "metrics.json").stat().st_mtime
    fold_f1 = [fold["macro_f1"] for fold in metrics.get("folds", {}).values()]
    decision_f1, applied, reason = decision_scores(run_dir)
    img_s, curve = learning_curve(run_dir)
    row = {"run": Path(run_dir).name, "status": "finished", "oof_macro_f1": metrics["oof_macro_f1"],
           "oof_macro_f1_last_epoch": metrics.get("oof_macro_f1_last_epoch"), "decision_f1": decision_f1,
           "applied": "" if applied is None else applied, "decision_reason": reason,
           "accuracy": metrics.get("oof_accuracy")}
    row.update({f"f1_{head}": scores["macro_f1"] for head, scores in metrics.get("heads", {}).items()})
    if "people" in metrics:  # kit/people.py's out-of-fold evidence
        row.update({"people_f1": metrics["people"]["oof_macro_f1_pooled"], "people_applied": metrics["people"]["applied"],
                    "people_purity": metrics["people"]["purity"]})
    row.update({"fold_min": min(fold_f1, default=None), "fold_max": max(fold_f1, default=None),
                "folds_done": len(fold_f1), "minutes": round((ended - started) / 60, 1),
                "img_s": None if img_s is None else round(img_s),
                "date": datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M")})
    return row, config, curve


def differing_settings(configs):
    """The config.json keys whose values are not the same in every run (a missing key counts as a value)."""
    keys = sorted(set().union(*configs) - IDENTITY)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def setting_text(value):
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else value


def collect_runs(model_dir):
    """(leaderboard frame, skipped [(folder, reason)], curves {run: Series}) of model_dir's sub-folders."""
    rows, configs, curves, skipped = [], [], {}, []
    for folder in sorted(p for p in Path(model_dir).iterdir() if p.is_dir()):
        try:
            row, config, curve = run_row(folder)
        except (UserError, KeyError) as err:  # KeyError: a metrics.json without oof_macro_f1
            skipped.append((folder.name, str(err) if isinstance(err, UserError) else f"metrics.json has no {err}"))
            continue
        rows.append(row)
        configs.append(config)
        curves[row["run"]] = curve
    table = pd.DataFrame(rows)
    for key in differing_settings(configs) if configs else []:  # next to the scores they explain
        table.insert(table.columns.get_loc("folds_done"), key, [setting_text(c.get(key)) for c in configs])
    if len(table):
        table = table.sort_values("oof_macro_f1", ascending=False, kind="stable").reset_index(drop=True)
    return table, skipped, curves


# ---- submissions ----------------------------------------------------------------------------------
def submission_row(manifest_path, scores):
    """One submissions row: what made the output, and whether output.csv still has the manifest's sha256."""
    manifest = read_json(manifest_path)
    output = manifest_path.parent / manifest.get("output", "output.csv")
    actual = hashlib.sha256(output.read_bytes()).hexdigest() if output.is_file() else None
    runs = [Path(d).name for d in manifest.get("run_dirs", [])]
    return {"output": str(output), "written": manifest.get("written"), "runs": " + ".join(runs),
            "runs_oof_f1": " + ".join(f"{scores[r]:.4f}" if r in scores else "?" for r in runs),
            "folds": setting_text(manifest.get("folds")), "checkpoint": manifest.get("checkpoint"),
            "tta": manifest.get("tta"), "decision": manifest.get("decision") or "",
            "sha256": str(manifest.get("sha256"))[:12],
            "output_unchanged": "yes" if actual == manifest.get("sha256") else "no: output.csv changed or is gone"}


def collect_submissions(output_dirs, scores):
    """(submissions frame, skipped [(file, reason)]) of the output_manifest.json files under output_dirs."""
    rows, skipped = [], []
    for path in sorted(p for d in output_dirs if Path(d).is_dir() for p in Path(d).rglob("output_manifest.json")):
        try:
            rows.append(submission_row(path, scores))
        except UserError as err:
            skipped.append((str(path), str(err)))
    return pd.DataFrame(rows), skipped


# ---- the page ---------------------------------------------------------------------------------------
def save_curves_png(table, curves, count, path):
    """Validation macro F1 by epoch (mean over folds) of the count best runs, overlaid."""
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    for run in table["run"].head(count):
        if len(curves[run]):
            ax.plot(curves[run].index, curves[run].to_numpy(), marker="o", label=run)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="epoch", ylabel="validation macro F1 (mean over folds)",
           title=f"Learning curves of the {min(count, len(table))} best runs by OOF macro F1")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, path)


def table_html(frame, empty):
    if frame.empty:
        return f"<p>{html.escape(empty)}</p>"
    headings = frame.rename(columns=lambda name: name.replace("_", " "))  # spaces: long headings may wrap
    return headings.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.4g}", classes="sortable")


def write_page(model_dir, runs, submissions, skipped, curves_png):
    model_dir = Path(model_dir)
    skipped_frame = pd.DataFrame(skipped, columns=["folder or file", "why skipped"])
    body = [f"<h1>Runs in {html.escape(str(model_dir.resolve()))}</h1>",
            "<p>Best OOF macro F1 first; click a heading to sort. Settings: only those that differ.</p>",
            table_html(runs, "No finished runs."), image_html(curves_png, "Learning curves") if curves_png else "",
            "<h2>Submissions</h2>", table_html(submissions, "No output_manifest.json found under --outputs."),
            "<h2>Skipped</h2>", table_html(skipped_frame, "None.")]
    page = (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>Runs: {html.escape(model_dir.name)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + SORT_SCRIPT + "\n</body></html>\n")
    atomic_write(model_dir / "runs.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def write_leaderboard(model_dir, output_dirs=("output",), curves=5):
    """runs.csv, runs_curves.png and runs.html into model_dir; returns (runs, submissions, skipped)."""
    if not Path(model_dir).is_dir():
        raise UserError(f"--model_dir {model_dir} is not a folder: pass the folder that holds the run folders")
    runs, skipped, run_curves = collect_runs(model_dir)
    submissions, bad_manifests = collect_submissions(output_dirs, dict(zip(runs.get("run", []),
                                                                           runs.get("oof_macro_f1", []))))
    atomic_write(Path(model_dir) / "runs.csv", lambda tmp: runs.to_csv(tmp, index=False))
    curves_png = Path(model_dir) / "runs_curves.png" if len(runs) and curves else None
    if curves_png:
        save_curves_png(runs, run_curves, curves, curves_png)
    write_page(model_dir, runs, submissions, skipped + bad_manifests, curves_png)
    return runs, submissions, skipped + bad_manifests


def main(argv=None):
    args = parse_args(argv)
    runs, submissions, skipped = write_leaderboard(args.model_dir, args.outputs, args.curves)
    best = f"; best {runs['run'].iloc[0]} (OOF macro F1 {runs['oof_macro_f1'].iloc[0]:.4f})" if len(runs) else ""
    print(f"{len(runs)} runs, {len(submissions)} submissions, {len(skipped)} skipped{best} -> "
          f"{Path(args.model_dir) / 'runs.html'}, runs.csv")


if __name__ == "__main__":
    run_main(main)
