"""Hyper-parameter search on Optuna: each trial a real train.py run, one machine or many on one study.

    python -m kit.sweep --config recipes/cpu_quick.yaml --space recipes/spaces/cpu_quick.yaml --minutes 60 \\
        --data_dir /data/train --weights weights/lite0.pth                 # any other train.py argument too
    python -m kit.sweep ... --resume                                      # more trials for the same study
    CUDA_VISIBLE_DEVICES=0 python -m kit.sweep ... --storage postgresql://user:pw@host/db --resume   # a worker per
    CUDA_VISIBLE_DEVICES=1 python -m kit.sweep ... --storage postgresql://user:pw@host/db --resume   # GPU or machine

The space is a YAML file of train.py flags (checked as the command line checks them):
    lr: [0.0005, 0.005, log]        two numbers: a range (ints for ints; "log" for a log scale)
    epochs: [3, 8]
    resize: [[128, 96], [160, 120]] anything else: the choices
    batch_size: {choices: [32, 64]} numeric choices spelled out
Trials sample it with TPE; each trains fold 0 (--all_folds: every fold) into MODEL_DIR/NAME/trial_NNN, a run folder
python -m kit.compare --model_dir MODEL_DIR/NAME lists. A trial's epochs report their validation macro F1 and a
median pruner stops a trial that trails the others at the same epoch (its folder is marked pruned); a trial's
value is its last epoch's OOF macro F1 (no epoch chosen on the fold). The study lives in Optuna's storage: SQLite
in MODEL_DIR/NAME by default, or any database URL Optuna takes, so that workers on several GPUs or machines join
one study (each runs --trials of its own). At the end: MODEL_DIR/NAME/best.yaml (the best trial's settings, a
recipe for train.py --config), sweep.html with the trials and Optuna's plots (history, importances, slices).
"""
import argparse
import os
import sys
from pathlib import Path

from kit.common import KitParser, UserError, in_range, run_main

ROOT = Path(__file__).resolve().parents[1]  # the checkout: train.py
LOCATION = ("data_dir", "weights", "model_dir", "name", "fold", "resume", "config")  # not settings of a recipe
TABLE_RACES = ("already exists", "UNIQUE constraint failed", "duplicate key", "database is locked")  # two makers
MACHINE_ONLY = ("num_workers", "cache", "cache_dir", "log_interval", "report", "valid_batch_size")  # same answers


def parse_args(argv=None):
    """(sweep settings, train.py arguments): what the sweep does not know goes to every trial's train.py."""
    p = KitParser(prog="python -m kit.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                  epilog="Any other argument goes to every trial's train.py (e.g. --data_dir, --weights).",
                  allow_abbrev=False)  # train.py's --model is not the sweep's --model_dir
    p.add_argument("--space", default="recipes/spaces/cpu_quick.yaml", help="YAML of train.py flags to search")
    p.add_argument("--config", default="recipes/cpu_quick.yaml", help="the recipe trials start from (train.py --config)")
    p.add_argument("--trials", type=in_range(int, 1), default=20, help="trials this process runs (each worker its own)")
    p.add_argument("--minutes", type=in_range(float, 0, low_open=True), default=None,
                   help="stop starting trials after this many minutes (this process)")
    p.add_argument("--name", default="sweep", help="the study's name and its folder under --model_dir")
    p.add_argument("--model_dir", default="model", help="where the study's folder is made")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in MODEL_DIR/NAME); a "
                   "database every worker reaches, e.g. postgresql://user:pw@host/db")
    p.add_argument("--resume", action="store_true", help="join the study if it exists (more trials, another worker)")
    p.add_argument("--all_folds", action="store_true", help="each trial trains every fold (default: fold 0)")
    p.add_argument("--pruner", default="median", help="median (stop trials behind the median at an epoch) or none")
    p.add_argument("--seed", type=int, default=42, help="the sampler's seed")
    p.add_argument("--train_py", default=str(ROOT / "train.py"), help="the training script (a copy you edited)")
    return p.parse_known_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer now, before the heavy imports below
    run_main(parse_args)

import html
import json
import re
import signal
import subprocess
import time
import warnings

import optuna
import yaml

import train
from kit.common import atomic_write, checked_setting, lookup
from kit.report import image_html, save_figure

PRUNERS = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
           "none": lambda: optuna.pruners.NopPruner()}
EPOCH_LINE = re.compile(r"fold=(\d+) epoch=(\d+) .*val_f1=([0-9.eE+-]+)")  # in train.py's line per epoch
MARKER = "sweep_trial.json"  # in each trial's run folder: its number, state and value (kit.compare reads it)


# ---- the search space ------------------------------------------------------------------------------
def read_space(path, parser):
    """{flag: spec} from the YAML file, every flag one of train.py's and every value one it takes."""
    try:
        space = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"search space {path} not found: check --space") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not readable YAML ({' '.join(str(err).split())[:100]}): fix the file") from None
    if not isinstance(space, dict) or not space:
        raise UserError(f"{path} must map train.py flags to ranges or choices, e.g. lr: [0.0005, 0.005, log]")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", *LOCATION)}
    for flag, spec in space.items():
        lookup(actions, flag, f"flag in {path}")
        for value in candidates(flag, spec, path):  # each value as train.py would take it from --config
            checked_setting(path, actions[flag], value)
    return space


def dimension(flag, spec, path):
    """('range', low, high, log) or ('choices', [values]) of one entry of the space."""
    if isinstance(spec, dict):
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise UserError(f"{path}: {flag}: write {{choices: [a, b]}} or a list")
        return "choices", spec["choices"]
    if not isinstance(spec, list) or not spec:
        raise UserError(f"{path}: {flag}: {spec!r} is neither a range [low, high] nor a list of choices")
    numbers = [v for v in spec[:2] if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) == 2 and (len(spec) == 2 or spec[2:] == ["log"]):
        low, high = numbers
        if low > high:
            raise UserError(f"{path}: {flag}: range [{low}, {high}] has low > high: write [{high}, {low}]")
        if spec[2:] == ["log"] and low <= 0:
            raise UserError(f"{path}: {flag}: a log range needs low > 0, not {low}")
        return "range", low, high, spec[2:] == ["log"]
    return "choices", spec


def candidates(flag, spec, path):
    """The values of a dimension worth checking: a range's ends, every choice."""
    kind, *rest = dimension(flag, spec, path)
    return rest[:2] if kind == "range" else rest[0]


def suggest(trial, flag, spec):
    kind, *rest = dimension(flag, spec, "")
    if kind == "choices":
        choices = [json.dumps(v) for v in rest[0]]  # lists are no Optuna choices; their JSON is
        return json.loads(trial.suggest_categorical(flag, choices))
    low, high, log = rest
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(flag, low, high, log=log)
    return trial.suggest_float(flag, float(low), float(high), log=log)


def as_flags(settings, parser):
    """train.py command-line words for {flag: value}, through each flag's kind (on/off, several values)."""
    actions, words = {a.dest: a for a in parser._actions}, []
    for flag, value in settings.items():
        action = actions[flag]
        if action.nargs == 0:  # store_true or --x/--no-x
            option = action.option_strings[0] if value else next((o for o in action.option_strings
                                                                   if o.startswith("--no-")), None)
            words += [option] if option else []
        else:
            words += [action.option_strings[0], *map(str, value if isinstance(value, list) else [value])]
    return words


# ---- the study -------------------------------------------------------------------------------------------
def storage_of(url):
    """Optuna's storage at url; workers that start together may race to make its tables: the loser tries again. A
    dead worker's trial (no heartbeat for 3 minutes) is failed and run again once, with its parameters."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: since 2.8
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=60, grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(1))
        except Exception as err:  # SQLAlchemy raises many kinds for a URL it cannot open
            if attempt == 4 or not any(race in str(err) for race in TABLE_RACES):
                raise UserError(f"cannot open the study storage {url} ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:120]}): fix --storage") from None
            time.sleep(1 + attempt)


def open_study(args, sweep_dir):
    """The Optuna study: created, or joined with --resume; a storage it cannot open is one error line and the
    sweep's folder is not made."""
    if args.storage:
        storage = storage_of(args.storage)
    else:  # SQLite in the sweep's folder: nothing to start
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = storage_of(f"sqlite:///{(sweep_dir / 'study.db').resolve()}")
    exists = args.name in optuna.study.get_all_study_names(storage)
    if exists and not args.resume:
        raise UserError(f"study '{args.name}' exists in {args.storage or sweep_dir / 'study.db'}: add --resume to "
                        "continue it, or pick another --name")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(storage=storage, study_name=args.name, direction="maximize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=args.seed),
                               pruner=lookup(PRUNERS, args.pruner, "--pruner")())


def check_same_study(study, space, fixed):
    """A study holds one question: a --resume (or another worker) with another space or other fixed train.py
    settings would mix trials that do not compare, so it is refused; where data and runs live may differ."""
    asked = json.loads(json.dumps({"space": space, "fixed": {k: v for k, v in sorted(fixed.items())
                                                             if k not in (*LOCATION, *MACHINE_ONLY)}}))
    started = study.user_attrs.get("question")
    if started is None:
        study.set_user_attr("question", asked)
        return
    for part in ("space", "fixed"):
        differ = sorted(k for k in set(asked[part]) | set(started[part]) if asked[part].get(k) != started[part].get(k))
        if differ:
            raise UserError(f"study '{study.study_name}' was started with {part} {differ[0]}: "
                            f"{started[part].get(differ[0])!r}, not {asked[part].get(differ[0])!r}: give the same "
                            "--space, --config and train.py arguments, or start a new --name")


def run_trial(trial, argv, run_dir):
    """Run train.py with argv, reporting each epoch's validation F1; stop it (SIGINT: it ends tidily) once the
    pruner says so. Returns (exit status or None when pruned, epochs reported); its output goes to run_dir.log."""
    step = 0
    with open(f"{run_dir}.log", "w") as log:
        process = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:
            log.write(line)
            match = EPOCH_LINE.search(line)
            if match:
                trial.report(float(match.group(3)), step)
                print(f"trial {trial.number} fold {match.group(1)} epoch {match.group(2)}: val F1 {match.group(3)}",
                      flush=True)
                step += 1
                if trial.should_prune():
                    process.send_signal(signal.SIGINT)
                    process.wait()
                    return None, step
        return process.wait(), step


def mark(run_dir, trial, state, epochs, value=None):
    """The trial's marker in its run folder: study, number, state (complete or pruned), value, params."""
    atomic_write(Path(run_dir) / MARKER, lambda tmp: Path(tmp).write_text(json.dumps(
        {"study": trial.study.study_name, "trial": trial.number, "state": state, "value": value,
         "params": trial.params, "epochs_reported": epochs}, indent=2)))


def objective(args, train_argv, space, parser, sweep_dir):
    def run(trial):
        settings = {flag: suggest(trial, flag, spec) for flag, spec in space.items()}
        name = f"trial_{trial.number:03d}"
        argv = [args.train_py, "--config", args.config, *train_argv, *as_flags(settings, parser), "--model_dir",
                str(sweep_dir), "--name", name, "--no-report", *([] if args.all_folds else ["--fold", "0"])]
        started = time.perf_counter()
        status, epochs = run_trial(trial, argv, sweep_dir / name)
        if status is None:
            mark(sweep_dir / name, trial, "pruned", epochs)
            print(f"trial {trial.number} pruned after {time.perf_counter() - started:.0f} s", flush=True)
            raise optuna.TrialPruned()
        metrics_path = sweep_dir / name / "metrics.json"
        if status or not metrics_path.is_file():
            last = (sweep_dir / f"{name}.log").read_text().strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"trial {trial.number} failed: {last[0]} (whole output: {sweep_dir / name}.log)")
        metrics = json.loads(metrics_path.read_text())
        value = metrics.get("oof_macro_f1_last_epoch", metrics["oof_macro_f1"])
        mark(sweep_dir / name, trial, "complete", epochs, value)
        print(f"trial {trial.number}: last-epoch macro F1 {value:.4f} in {time.perf_counter() - started:.0f} s "
              f"{settings}", flush=True)
        return value
    return run


# ---- what the sweep leaves -------------------------------------------------------------------------------
def best_recipe(study, sweep_dir, args):
    """best.yaml: the best trial's train.py settings (its config.json, less where the data and run live)."""
    best = study.best_trial
    config = json.loads((sweep_dir / f"trial_{best.number:03d}" / "config.json").read_text())
    keys = [a.dest for a in train.build_parser()._actions if a.dest not in ("help", *LOCATION)]
    recipe = {key: config[key] for key in keys if key in config}
    text = (f"# the best trial ({best.number}) of sweep '{study.study_name}': last-epoch OOF macro F1 {best.value:.4f} "
            f"({'all folds' if args.all_folds else 'fold 0'})\n# python train.py --config {sweep_dir / 'best.yaml'} "
            "--data_dir DATA [--weights W]\n" + yaml.safe_dump({**recipe, "name": f"{study.study_name}_best"},
                                                              sort_keys=False))
    atomic_write(sweep_dir / "best.yaml", lambda tmp: Path(tmp).write_text(text))
    return sweep_dir / "best.yaml"


def plots(study, sweep_dir):
    """Optuna's history, importances and slices as PNGs (those the finished trials allow)."""
    from optuna.visualization import matplotlib as plot
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    wanted = {"history.png": plot.plot_optimization_history, "slices.png": plot.plot_slice}
    if len(finished) >= 2 and len(study.best_trial.params) >= 2:
        wanted["importances.png"] = plot.plot_param_importances
    made = []
    for name, draw in wanted.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            axes = draw(study)
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 4))
        if not hasattr(axes, "flat"):  # one plot: its long flag names kept inside (slices place their own colour bar)
            figure.tight_layout()
        save_figure(figure, sweep_dir / name)
        made.append(name)
    return made


def write_page(study, sweep_dir, pngs):
    frame = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params"))
    body = [f"<h1>Sweep {html.escape(study.study_name)}</h1>",
            f"<p>Best trial {study.best_trial.number}: last-epoch macro F1 {study.best_value:.4f}; its settings: "
            "best.yaml (train.py --config).</p>", frame.to_html(index=False, border=0, float_format="%.4f"),
            *(image_html(sweep_dir / png, png[:-4]) for png in pngs)]
    page = ('<!doctype html>\n<html><head><meta charset="utf-8"><title>Sweep</title></head><body style="font-family:'
            'sans-serif;margin:2em">\n' + "\n".join(body) + "\n</body></html>\n")
    atomic_write(sweep_dir / "sweep.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def main(argv=None):
    args, train_argv = parse_args(argv)
    parser = train.build_parser()
    clash = [w for w in train_argv if w.lstrip("-").split("=")[0] in ("fold", "resume")]
    if clash:
        raise UserError(f"{clash[0]} is the sweep's to set: trials train fold 0, or every fold with --all_folds")
    fixed = train.parse_args(["--config", args.config, *train_argv])  # every trial's fixed arguments checked now
    space = read_space(args.space, parser)
    sweep_dir = Path(args.model_dir) / args.name
    study = open_study(args, sweep_dir)
    check_same_study(study, space, {**vars(fixed), "all_folds": args.all_folds})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective(args, train_argv, space, parser, sweep_dir), n_trials=args.trials,
                   timeout=args.minutes * 60 if args.minutes else None)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise UserError(f"no trial of '{args.name}' finished (see {sweep_dir}/trial_*.log): fix the cause and --resume")
    recipe = best_recipe(study, sweep_dir, args)
    write_page(study, sweep_dir, plots(study, sweep_dir))
    print(f"{len(study.trials)} trials in study '{args.name}'; best {study.best_trial.number} (last-epoch macro F1 "
          f"{study.best_value:.4f}) -> {recipe}, {sweep_dir / 'sweep.html'}")


if __name__ == "__main__":
    run_main(main)
