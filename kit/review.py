"""Review a run's label-issue suspects in the browser: keep, relabel or drop each, saved as you go.

    python -m kit.app --model_dir model/exp --review                  # then open http://127.0.0.1:7860
    python -m kit.app --model_dir model/exp --review --issues model/exp/label_issues.csv   # that file's order
    python train.py --relabel_list model/exp/review_relabel.csv --drop_list model/exp/review_drop.csv ...

The suspects are kit.label_issues' ranking (find_label_issues on the run's oof.csv), most likely wrong
first. Each page shows the image large, its given label, the model's top classes with their out-of-fold
probabilities, and the person's other pictures (same profile), so a swapped file (a "normal.jpg" that
shows a mask) stands out. Keys: k keep, d drop, 1-9 relabel to the numbered class, j or right arrow
next, h or left arrow back. Every decision is written at once, atomically, into the run folder:
  review_decisions.csv  path, decision (keep/drop/relabel), value: every decision, "keep" included
  review_drop.csv       path of each dropped image: a train.py --drop_list
  review_relabel.csv    path, field=label, value=class name: a train.py --relabel_list
Writes are serialized and the decisions file is read again before each write, so two tabs lose nothing.
Images are served only from the run's data_dir, and only the ones in its oof.csv.
"""
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from flask import Flask, abort, redirect, render_template_string, request, send_from_directory

from kit.common import UserError, atomic_write
from kit.label_issues import find_label_issues, issue_table
from kit.runs import read_config
from kit.tables import read_csv_checked

DECISIONS, DROP_LIST, RELABEL_LIST = "review_decisions.csv", "review_drop.csv", "review_relabel.csv"
TOP_SHOWN = 9  # the keys 1-9
WRITE_LOCKS = defaultdict(threading.Lock)  # one per run folder, shared by every app of this process

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review {{ rank }}/{{ total }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1em 2em; color: #222; }
 .main { display: flex; gap: 2em; align-items: flex-start; }
 .main { flex-wrap: wrap; }
 .main > img { height: min(440px, 70vh); max-width: 40vw; object-fit: contain; border: 1px solid #ccc; border-radius: 6px; }
 table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; white-space: nowrap; }
 tr.given td { background: #fde2e2; } form { display: inline; margin: 0; }
 button { margin: 2px 0; font-size: 0.95em; } .decision { font-size: 1.15em; font-weight: bold; color: #05703a; }
 .person { display: flex; gap: 6px; flex-wrap: wrap; max-width: 345px; } h3 { margin: 0 0 0.5em; }
 .person figure { margin: 0; width: 110px; font-size: 0.72em; text-align: center; overflow-wrap: break-word; }
 .person img { height: 100px; border: 1px solid #ccc; } .person .this img { border: 3px solid #d62728; }
 #error { color: #b00; font-weight: bold; } kbd { border: 1px solid #999; border-radius: 3px; padding: 0 3px; }
</style></head><body>
<p><a href="{{ url_prefix }}/">all suspects</a> &middot; suspect <b>{{ rank }}</b> of {{ total }}
 &middot; <a id="prev" href="{{ url_prefix }}/{{ rank - 1 if rank > 1 else 1 }}">&larr; back (h)</a>
 &middot; <a id="next" href="{{ url_prefix }}/{{ rank + 1 if rank < total else total }}">next (j) &rarr;</a></p>
{% if error %}<p id="error">{{ error }}</p>{% endif %}
<div class="main"><img id="photo" src="{{ image_url }}{{ path }}" alt="{{ path }}"><div>
 <p><code id="path">{{ path }}</code> (person {{ profile }})</p>
 <p>Given label: <b id="given">{{ given }}</b> (probability {{ "%.1f"|format(given_prob * 100) }}%)</p>
 <p class="decision" id="decision">{{ decision_text }}</p>
 <table id="top"><tr><th>key</th><th>class</th><th title="out-of-fold probability">OOF prob.</th></tr>
 {% for name, p in top %}<tr class="{{ 'given' if name == given else '' }}"><td><kbd>{{ loop.index }}</kbd></td>
  <td>{{ name }}</td><td>{{ "%.1f"|format(p * 100) }}%</td>
  <td>{{ decide_form("relabel", name, "relabel", "top" ~ loop.index) if name != given }}</td></tr>{% endfor %}</table>
 <p>{{ decide_form("keep", "", "keep (k)", "keep") }} {{ decide_form("drop", "", "drop (d)", "drop") }}</p>
 <form method="post" action="{{ url_prefix }}/decide"><input type="hidden" name="path" value="{{ path }}">
  <input type="hidden" name="decision" value="relabel"><select name="value" id="relabel_to">
  {% for name in classes %}<option{{ " selected" if name == given }}>{{ name }}</option>{% endfor %}</select>
  <button type="submit" id="relabel">relabel to the chosen class</button></form>
</div>
<div><h3>This person's pictures</h3>
<div class="person">{% for other, label in person %}<figure class="{{ 'this' if other == path else '' }}">
 <img src="{{ image_url }}{{ other }}" alt="{{ other }}"><figcaption>{{ other.split('/')[-1] }}<br>{{ label }}</figcaption>
</figure>{% endfor %}</div></div></div>
<script>
// keys, unless the class menu has focus (its own keys choose a class)
document.addEventListener("keydown", function (e) {
  if (e.target.tagName === "SELECT" || e.ctrlKey || e.altKey || e.metaKey) return;
  var ids = {k: "keep", d: "drop", j: "next", h: "prev", ArrowRight: "next", ArrowLeft: "prev"};
  var id = /^[1-9]$/.test(e.key) ? "top" + e.key : ids[e.key];
  var target = id && document.getElementById(id);
  if (target) { e.preventDefault(); target.click(); }
});
</script>
</body></html>"""

DECIDE_FORM = """{% macro decide_form(decision, value, text, id) %}<form method="post" action="{{ url_prefix }}/decide">
<input type="hidden" name="path" value="{{ path }}"><input type="hidden" name="decision" value="{{ decision }}">
<input type="hidden" name="value" value="{{ value }}"><button type="submit" id="{{ id }}">{{ text }}</button></form>
{% endmacro %}"""

INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Label-issue review</title>
<style>body { font-family: system-ui, sans-serif; margin: 1em 2em; } td, th { padding: 2px 10px; text-align: left; }
table { border-collapse: collapse; } td { white-space: nowrap; } tr:nth-child(even) { background: #f4f4f4; }</style></head><body>
<h1>Label-issue suspects of {{ run }}</h1>
<p>{{ total }} suspects, {{ decided }} decided. Decisions go to {{ files }}. Open the first:
 <a id="start" href="{{ url_prefix }}/1">suspect 1</a></p>
<table id="suspects"><tr><th>#</th><th>path</th><th>given</th><th>suggested</th><th>p(given)</th><th>decision</th></tr>
{% for r in rows %}<tr><td><a href="{{ url_prefix }}/{{ r.rank }}">{{ r.rank }}</a></td><td>{{ r.path }}</td>
<td>{{ r.given_name }}</td><td>{{ r.suggested_name }}</td><td>{{ "%.3f"|format(r.self_confidence) }}</td>
<td>{{ r.decision }}</td></tr>{% endfor %}</table></body></html>"""


# ---- what is reviewed ---------------------------------------------------------------------------
def read_oof(run_dir):
    path = Path(run_dir) / "oof.csv"
    if not path.is_file():
        raise UserError(f"{path} not found: the review ranks a finished run's out-of-fold predictions; "
                        "let train.py finish the run (or run python -m kit.report --model_dir on it)")
    return pd.read_csv(path, dtype={"profile": str}, keep_default_na=False)


def issues_from_file(issues_file, oof, classes):
    """A label_issues.csv (any order, rows deleted): its rows, checked to come from this run's oof.csv."""
    table = read_csv_checked(issues_file, ["path", "given_label", "suggested_label"],
                             fix="pass a label_issues.csv written by python -m kit.label_issues")
    labels = table[["given_label", "suggested_label"]]
    if not labels.map(lambda v: v.isdigit() and int(v) < len(classes)).all(axis=None):
        raise UserError(f"{issues_file}: given_label and suggested_label must be class numbers 0..{len(classes) - 1}; "
                        "pass a label_issues.csv written by python -m kit.label_issues for this run")
    table = table.assign(given_label=labels["given_label"].astype(int),
                         suggested_label=labels["suggested_label"].astype(int))
    given = oof.set_index("path")["label"]
    foreign = table[~table["path"].isin(given.index)]
    if foreign.empty:
        foreign = table[table["given_label"].to_numpy() != given.reindex(table["path"]).to_numpy()]
    if len(foreign):
        raise UserError(f"{issues_file}: {len(foreign)} rows (first {foreign['path'].iloc[0]}) are not in this run's "
                        "oof.csv with that given label: it comes from another run; pass that run's --model_dir")
    probs = oof.set_index("path").loc[table["path"], [f"p{i}" for i in range(len(classes))]].to_numpy(float)
    return table.assign(rank=np.arange(1, len(table) + 1), given_name=[classes[i] for i in table["given_label"]],
                        suggested_name=[classes[i] for i in table["suggested_label"]],
                        self_confidence=probs[np.arange(len(table)), table["given_label"]])


def load_suspects(run_dir, issues_file=None):
    """(config, oof, suspects): the run's OOF rows and its suspects, most likely mislabelled first."""
    config = read_config(run_dir)
    oof = read_oof(run_dir)
    classes = config["classes"]
    if issues_file:
        return config, oof, issues_from_file(issues_file, oof, classes)
    probs = oof[[f"p{i}" for i in range(len(classes))]].to_numpy(float)
    issues = find_label_issues(probs, oof["label"].to_numpy())
    return config, oof, issue_table(oof, issues, classes, config["layout"])


# ---- decisions on disk --------------------------------------------------------------------------
def read_decisions(run_dir):
    path = Path(run_dir) / DECISIONS
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return {row.path: (row.decision, row.value) for row in table.itertuples()}


def write_decisions(run_dir, decisions):
    """The decisions file and the two lists train.py reads, each replaced whole."""
    run_dir = Path(run_dir)
    table = pd.DataFrame([(p, d, v) for p, (d, v) in sorted(decisions.items())],
                         columns=["path", "decision", "value"])
    drop = table.loc[table["decision"] == "drop", ["path"]]
    relabel = table[table["decision"] == "relabel"].assign(field="label")[["path", "field", "value"]]
    for name, frame in ((DROP_LIST, drop), (RELABEL_LIST, relabel), (DECISIONS, table)):  # decisions last: the record
        atomic_write(run_dir / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False))


def decision_text(decision):
    if decision is None:
        return "not decided yet"
    return f"decided: relabel to {decision[1]}" if decision[0] == "relabel" else f"decided: {decision[0]}"


# ---- the pages ------------------------------------------------------------------------------------
def suspect_view(rank, suspects, oof, classes, decisions):
    """What one suspect's page shows."""
    row = suspects.iloc[rank - 1]
    oof_row = oof.loc[oof["path"] == row["path"]].iloc[0]
    probs = oof_row[[f"p{i}" for i in range(len(classes))]].to_numpy(float)
    order = np.argsort(-probs, kind="stable")[:TOP_SHOWN]
    person = oof[oof["profile"] == oof_row["profile"]].sort_values("path")
    return {"rank": rank, "total": len(suspects), "path": row["path"], "profile": oof_row["profile"],
            "given": classes[int(oof_row["label"])], "given_prob": probs[int(oof_row["label"])],
            "top": [(classes[i], float(probs[i])) for i in order],
            "classes": classes, "decision_text": decision_text(decisions.get(row["path"])),
            "person": [(p, classes[int(label)]) for p, label in zip(person["path"], person["label"])]}


def checked_decision(form, suspects, classes):
    """(path, decision, value) of a posted form, or a UserError naming what is wrong."""
    path, decision, value = form.get("path", ""), form.get("decision", ""), form.get("value", "")
    if path not in set(suspects["path"]):
        raise UserError(f"'{path}' is not one of this run's suspects: reload the page")
    if decision not in ("keep", "drop", "relabel"):
        raise UserError(f"decision '{decision}' must be keep, drop or relabel")
    if decision == "relabel" and value not in classes:
        raise UserError(f"'{value}' is not a class of this run; choose one of the {len(classes)} in the menu")
    return path, decision, value if decision == "relabel" else ""


def add_review_routes(app, run_dir, issues_file=None, url_prefix=""):
    """The review pages on a Flask app: the index, one page per suspect, /decide, and the images."""
    config, oof, suspects = load_suspects(run_dir, issues_file)
    classes, data_dir = config["classes"], Path(config["data_dir"]).resolve()
    if suspects.empty:
        raise UserError(f"{run_dir}: no suspects to review (no image's label looks wrong to the model)")
    served, lock = set(oof["path"]), WRITE_LOCKS[Path(run_dir).resolve()]
    paths, prefix = list(suspects["path"]), {"url_prefix": url_prefix, "image_url": f"{url_prefix}/image/"}

    def page(rank, error=None, status=200):
        view = suspect_view(rank, suspects, oof, classes, read_decisions(run_dir))
        return render_template_string(DECIDE_FORM + PAGE, error=error, **view, **prefix), status

    @app.route(f"{url_prefix}/")
    def index():
        decisions = read_decisions(run_dir)
        rows = suspects.assign(decision=[decision_text(decisions.get(p)) for p in paths])
        return render_template_string(INDEX, run=run_dir, total=len(rows), decided=sum(p in decisions for p in paths),
                                      rows=rows.itertuples(), files=f"{DECISIONS}, {DROP_LIST}, {RELABEL_LIST}",
                                      **prefix)

    @app.route(f"{url_prefix}/<int:rank>")
    def suspect(rank):
        return page(min(max(rank, 1), len(suspects)))

    @app.route(f"{url_prefix}/decide", methods=["POST"])
    def decide():
        rank = paths.index(request.form["path"]) + 1 if request.form.get("path") in paths else 1
        try:
            path, decision, value = checked_decision(request.form, suspects, classes)
        except UserError as err:
            return page(rank, error=str(err), status=400)
        with lock:  # re-read under the lock: another tab's decision since this page loaded is kept
            decisions = read_decisions(run_dir)
            decisions[path] = (decision, value)
            write_decisions(run_dir, decisions)
        return redirect(f"{url_prefix}/{min(rank + 1, len(suspects))}", code=303)

    @app.route(f"{url_prefix}/image/<path:name>")
    def image(name):
        if name not in served:  # only the run's own images: no path leads outside data_dir
            abort(404)
        return send_from_directory(data_dir, name)
    return app


def create_review_app(run_dir, issues_file=None):
    """A Flask app serving only the review of run_dir's suspects."""
    return add_review_routes(Flask(__name__), run_dir, issues_file)
