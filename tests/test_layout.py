"""The checkout's shape: the five recipe files at the top, the machinery in kit/, imports one way, every documented
command answers --help (before any heavy import), and a copied, edited train.py still trains and predicts."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"train.py", "inference.py", "dataset.py", "model.py", "loss.py"}
HEAVY = ("torch", "torchvision", "timm", "pandas", "sklearn", "matplotlib", "seaborn", "flask")  # a second or more


def modules():
    """{module name: file} of the recipe files and the kit package."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found.update({f"kit.{p.stem}": p for p in (ROOT / "kit").glob("*.py") if p.stem != "__init__"})
    return found


def imports(path, known):
    """[(imported module, [names] or None for `import x`)] of every import in a file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "kit":  # from kit import speed, runs
                found += [(f"kit.{a.name}", None) for a in node.names if f"kit.{a.name}" in known]
            elif node.module in known:
                found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name in known]
    return found


def contract():
    """{recipe module: names} that kit/__init__.py's docstring says the package may import."""
    text = ast.get_docstring(ast.parse((ROOT / "kit" / "__init__.py").read_text()))
    names = {}
    for module, name in re.findall(r"^\s+(model|dataset)\.(\w+)\(", text, flags=re.M):
        names.setdefault(module, set()).add(name)
    names["train"] = set(re.search(r"^\s+train: (.+)$", text, flags=re.M).group(1).replace(",", " ").split())
    return names


def test_the_top_level_holds_the_recipe_files_only():
    assert {p.name for p in ROOT.glob("*.py")} == RECIPE
    assert (ROOT / "kit" / "__init__.py").is_file() and (ROOT / "docs" / "DESIGN.md").is_file()


def test_imports_run_one_way_without_a_circle():
    known = modules()
    graph = {name: {m for m, _ in imports(path, known)} for name, path in known.items()}
    allowed = contract()
    for name, path in known.items():
        if not name.startswith("kit."):
            continue
        for module, names in imports(path, known):
            if module.startswith("kit."):
                continue
            assert module in allowed, f"{name} imports {module}, which is not in kit/__init__.py's contract"
            used = set(names) if names is not None else {
                node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name) and node.value.id == module}
            assert used <= allowed[module], f"{name} uses {sorted(used - allowed[module])} of {module}"
    state = {}

    def visit(node, trail):  # depth-first: a node met again while on the trail closes a circle
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_model_and_loss_do_not_import_pandas_or_scikit_learn():
    done = subprocess.run([sys.executable, "-c", "import sys, model, loss; "
                           "print([m for m in ('pandas', 'sklearn') if m in sys.modules])"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def documented_commands():
    """Every `python X.py` and `python -m kit.X` written in the README, recipes/, docs/ or a docstring."""
    texts = [p.read_text() for p in (ROOT / "README.md", *ROOT.glob("recipes/*.md"), *ROOT.glob("docs/*.md"))]
    texts += [ast.get_docstring(ast.parse(p.read_text())) or "" for p in (*modules().values(),
                                                                        *ROOT.glob("sample/*.py"))]
    found = set()
    for text in texts:
        found |= set(re.findall(r"python (-m kit\.\w+|[\w./]+\.py)\b", text))
    return sorted(found)


def tool_modules():
    """The kit modules that are commands (they run main under __main__)."""
    return sorted(f"-m kit.{p.stem}" for p in (ROOT / "kit").glob("*.py") if "__main__" in p.read_text())


def test_every_tool_is_documented_in_the_form_it_runs():
    commands = documented_commands()
    assert set(tool_modules()) <= set(commands), sorted(set(tool_modules()) - set(commands))
    assert {"train.py", "inference.py", "dataset.py"} <= set(commands)


@pytest.fixture(scope="module")
def no_heavy_imports(tmp_path_factory):
    """A PYTHONPATH whose torch, timm, pandas, ... raise on import: what runs with it imported none of them."""
    folder = tmp_path_factory.mktemp("heavy")
    for name in HEAVY:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} imported before --help answered')\n")
    return {**os.environ, "PYTHONPATH": str(folder)}


@pytest.mark.parametrize("command", documented_commands())
def test_help_answers_before_any_heavy_import(command, no_heavy_imports, tmp_path):
    argv = command.split()
    runs = [(argv, ROOT)]
    if argv[0].endswith(".py"):  # a script also runs by its path from another folder
        runs.append(([str(ROOT / argv[0])], tmp_path))
    for args, cwd in runs:
        done = subprocess.run([sys.executable, *args, "--help"], cwd=cwd, env=no_heavy_imports, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("usage:"), (args, cwd, done.stderr[-2000:])


def test_a_mistyped_flag_is_one_line_naming_the_closest_flag(no_heavy_imports):
    done = subprocess.run([sys.executable, "train.py", "--modle", "resnet18"], cwd=ROOT, env=no_heavy_imports,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: unrecognized arguments: --modle resnet18; did you mean --model?")
    done = subprocess.run([sys.executable, "-m", "kit.report", "--model_dri", "x"], cwd=ROOT, env=no_heavy_imports,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "did you mean --model_dir?" in done.stderr and "Traceback" not in done.stderr


def test_a_copied_and_edited_train_py_trains_and_predicts(tmp_path):
    """Copy-and-modify: the checkout copied elsewhere, train.py's model and loss changed, run and predicted."""
    copy = tmp_path / "mykit"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "model", "output", "__pycache__"))
    train_py = copy / "train.py"
    text = train_py.read_text()
    for old, new in (('default="tf_efficientnet_lite0"', 'default="test_resnet"'), ('default="ce"', 'default="focal"')):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    train_py.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (["train.py", "--no-pretrained", "--resize", "32", "--epochs", "1", "--folds", "2", "--fold", "0",
                     "--batch_size", "32", "--num_workers", "0", "--no-report", "--decision", "off", "--people", "off"],
                    ["inference.py", "--model_dir", "model/exp", "--num_workers", "0"]):
        done = subprocess.run([sys.executable, *command], cwd=copy, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((copy / "model/exp/config.json").read_text())
    assert (config["model"], config["criterion"]) == ("test_resnet", "focal")
    output, info = pd.read_csv(copy / "output/output.csv"), pd.read_csv(copy / "sample/eval/info.csv")
    assert list(output["ImageID"]) == list(info["ImageID"]) and output["ans"].between(0, 17).all()
