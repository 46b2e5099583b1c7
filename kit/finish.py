"""The end of a run: what train.py writes once its folds are done, each step reading the run folder.

    print(finish_run(run_dir, config))   # oof.csv, metrics.json, decision.json, people.json, report.html

Called by train.py (also after --fold_per_device's processes); each step is a tool of its own too
(python -m kit.report, kit.decision, kit.people).
"""
from kit import decision, people, report
from kit.runs import write_run_metrics


def finish_run(run_dir, config):
    """oof.csv, metrics.json, the decision rule (decision.json) and person-consistent answers (people.json) of the
    finished folds, then report.html (--no-report: confusion.png alone); returns the lines that tell the score."""
    metrics = write_run_metrics(run_dir, config["classes"], config["layout"])
    last = metrics.get("oof_macro_f1_last_epoch")
    lines = [f"OOF macro F1 {metrics['oof_macro_f1']:.4f} (each fold's best epoch"
             + (f"; its last epoch: {last:.4f}" if last is not None else "") + f")  accuracy "
             f"{metrics['oof_accuracy']:.4f}  ({metrics['oof_images']} images, folds {metrics['folds_done']})  -> "
             f"{run_dir}"]
    several = len(metrics["folds_done"]) > 1  # one fold: nothing to fit out of fold
    if config.get("decision", "off") != "off" and several:
        rule = decision.fit_run(run_dir, config["decision"])
        lines.append(f"decision layer ({rule.rule} {rule.params}): cross-fitted OOF macro F1 "
                     f"{rule.cross_fitted_macro_f1:.4f} vs plain {rule.oof_macro_f1:.4f} -> {rule.reason}")
    if config.get("people", "off") != "off" and several and config["layout"] == "mask":
        lines.append(people.summary(people.fit_run(run_dir)))
    report.write_report(run_dir, pictures=config.get("report", True))
    return "\n".join(lines)
