"""A demo page: upload a photo, see what a trained run predicts.

    python -m kit.app --model_dir model/exp                       # then open http://127.0.0.1:7860
    python -m kit.app --model_dir model/exp --host 0.0.0.0 --port 8080   # reachable from other machines
    python -m kit.app --model_dir model/exp --review              # keep/relabel/drop the run's label-issue suspects

The run's fold ensemble is loaded once at start (kit.predict.load_run); each upload is resized like
inference.py does and answered with the top classes and their probabilities and, for the mask layout,
the three attributes: mask, gender and age group, each the 18 class probabilities summed over the other
two. --review serves kit.review's pages instead (no model loaded: they read the run's oof.csv).
Built on Flask (small, long-maintained; the demo page is plain server-rendered HTML, no JavaScript; the
review page adds a few lines for its keys; nothing is fetched from the internet). Runs trained on face crops (--crop) get the whole photo here.
"""
import argparse
import base64
import io
import socket

from kit.common import KitParser, UserError, in_range, run_main


def parse_args(argv=None):
    p = KitParser(prog="python -m kit.app", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default="model/exp", help="run folder made by train.py")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint per fold")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only; 0.0.0.0: the network")
    p.add_argument("--port", type=in_range(int, 1, 65535), default=7860, help="port to serve on")
    p.add_argument("--top", type=in_range(int, 1), default=5, help="how many classes to list")
    p.add_argument("--review", action="store_true", help="review the run's label-issue suspects (kit.review) "
                   "and write review_drop.csv / review_relabel.csv for train.py")
    p.add_argument("--issues", default=None, help="with --review: a label_issues.csv of this run to review, in its "
                   "order (default: every suspect of the run's oof.csv)")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import numpy as np
import torch
from flask import Flask, render_template_string, request
from PIL import UnidentifiedImageError

from dataset import build_transform
from kit.decision import run_rule
from kit.device import pick_device
from kit.images import center_share, load_image
from kit.labels import HEAD_NAMES, head_marginals, head_value_names
from kit.predict import load_run, predict_probs
from kit.review import create_review_app

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 760px; margin: 2em auto; color: #222; }
 form { padding: 1em; border: 1px solid #ccc; border-radius: 8px; }
 .result { display: flex; gap: 1.5em; margin-top: 1.5em; }
 .result img { width: 220px; height: auto; flex: none; align-self: flex-start; border-radius: 6px; }
 table { border-collapse: collapse; margin-bottom: 1em; }
 td, th { padding: 3px 8px; text-align: left; white-space: nowrap; } td.meter { width: 160px; }
 .bar { background: #4a7bd0; height: 12px; } #answer { font-size: 1.2em; font-weight: bold; } #error { color: #b00; }
</style></head><body>
<h1>{{ title }}</h1>
<p>{{ about }}</p>
<form method="post" enctype="multipart/form-data">
 <input type="file" name="photo" accept="image/*" required> <button type="submit" id="predict">Predict</button>
</form>
{% if error %}<p id="error">{{ error }}</p>{% endif %}
{% if top %}<div class="result"><img src="data:image/jpeg;base64,{{ preview }}" alt="uploaded photo"><div>
 <p id="answer">Prediction: {{ answer[0] }} ({{ "%.1f"|format(answer[1] * 100) }}%)</p>
 <table id="top"><tr><th>class</th><th>probability</th><th></th></tr>
 {% for name, p in top %}<tr><td>{{ name }}</td><td>{{ "%.1f"|format(p * 100) }}%</td>
  <td class="meter"><div class="bar" style="width: {{ "%.1f"|format(p * 100) }}%"></div></td></tr>{% endfor %}</table>
 {% for head, values in attributes %}<table class="attribute" id="{{ head }}"><tr><th colspan="2">{{ head }}</th></tr>
  {% for name, p in values %}<tr><td>{{ name }}</td><td>{{ "%.1f"|format(p * 100) }}%</td></tr>{% endfor %}
 </table>{% endfor %}
</div></div>{% endif %}
</body></html>"""


def predict(models, config, transform, image):
    """Averaged class probabilities of the fold models for one PIL image (inference.py's resize)."""
    batch = transform(image)[None]
    device = next(models[0].parameters()).device
    probs, _ = predict_probs(models, [(batch, None, torch.zeros(1))], config["head"], device, amp="off",
                             channels_last=False)  # one image: full precision costs nothing
    return probs[0]


def attributes(probs, classes):
    """Mask layout: [(head, [(value name, probability)])], each head's marginal of the 18 probabilities."""
    return [(head, [(name, float(p)) for name, p in zip(names, marginal)])
            for head, names, marginal in zip(HEAD_NAMES, head_value_names(classes), head_marginals(probs))]


def preview(image):
    """A small JPEG of the upload, inlined in the page."""
    small = image.copy()
    small.thumbnail((440, 440))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def create_app(models, config, top=5, title="Image classifier demo", rule=None):
    """The Flask app: GET shows the form, POST answers an uploaded photo (with the run's macro-F1 decision rule,
    kit.decision, when one is given: then the answer may be a class other than the most probable one)."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 25 * 1024 * 1024
    transform = build_transform("base", config["input_size"], config["interpolation"], train=False)
    center = center_share(config.get("center_crop"))  # as the run was trained
    classes, mask_layout = config["classes"], config["layout"] == "mask" and len(config["classes"]) == 18
    about = (f"{config['model']}, {len(models)} fold model(s), {len(classes)} classes ({config['layout']} layout)"
             + ("" if rule is None else f", answers by the decision rule {rule.rule} {rule.params}"))

    @app.route("/", methods=["GET", "POST"])
    def page():
        view = {"title": title, "about": about}
        if request.method == "GET":
            return render_template_string(PAGE, **view)
        try:
            image = load_image(io.BytesIO(request.files["photo"].read()), box=center)
        except (UnidentifiedImageError, OSError, KeyError):
            return render_template_string(PAGE, error="That file is not an image; upload a JPEG or PNG photo.",
                                          **view), 400
        probs = predict(models, config, transform, image)
        order = np.argsort(-probs)[:top]
        answer = int(probs.argmax() if rule is None else rule.predict(probs[None])[0])
        return render_template_string(PAGE, top=[(classes[i], float(probs[i])) for i in order],
                                      answer=(classes[answer], float(probs[answer])),
                                      attributes=attributes(probs, classes) if mask_layout else [],
                                      preview=preview(image), **view)
    return app


def check_port(host, port):
    """Bind host:port once before loading anything, so a busy port or unknown host is one line, not a
    traceback from the server after the models loaded."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot serve on {host}:{port} ({err.strerror or err}): pick a free --port "
                        "or another --host") from None


def main(argv=None):
    args = parse_args(argv)
    check_port(args.host, args.port)
    if args.review:
        print(f"reviewing {args.model_dir}'s suspects; open http://{args.host}:{args.port}", flush=True)
        create_review_app(args.model_dir, args.issues).run(host=args.host, port=args.port)
        return
    models, config = load_run(args.model_dir, which=args.checkpoint, device=pick_device())
    print(f"loaded {len(models)} fold model(s) from {args.model_dir}; open http://{args.host}:{args.port}",
          flush=True)
    create_app(models, config, args.top, rule=run_rule(args.model_dir, len(config["classes"]))).run(
        host=args.host, port=args.port)


if __name__ == "__main__":
    run_main(main)
