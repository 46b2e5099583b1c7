"""eda.ipynb: committed without outputs, and runs top to bottom (every cell) on data named by EDA_DATA_DIR."""
import shutil
from pathlib import Path

import nbformat
import pandas as pd
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "eda.ipynb"
PLOT_CELLS = 8  # one figure each: per class, mask/gender/age, crossings, ages, sizes, grid, person, folds


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_notebook_has_no_outputs():
    code = [cell for cell in read_notebook().cells if cell.cell_type == "code"]
    assert len(code) >= PLOT_CELLS + 1
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_every_code_cell_follows_a_heading_that_says_what_to_look_for():
    cells = read_notebook().cells
    for before, cell in zip(cells, cells[1:]):
        if cell.cell_type == "code":
            assert before.cell_type == "markdown" and before.source.startswith("## "), cell.source[:60]
            assert "What to look for" in before.source, before.source


def test_data_dir_is_one_setting_overridable_by_environment():
    setup = next(cell for cell in read_notebook().cells if cell.cell_type == "code").source
    assert 'DATA_DIR = os.environ.get("EDA_DATA_DIR", "sample/train")' in setup
    assert "dataset.build_table(DATA_DIR)" in setup


def copy_of_sample(folder, people):
    """The first `people` people of the embedded sample, in the same layout."""
    source = ROOT / "sample" / "train"
    rows = pd.read_csv(source / "train.csv", dtype=str).head(people)
    folder.mkdir(parents=True)
    rows.to_csv(folder / "train.csv", index=False)
    for name in rows["path"]:
        shutil.copytree(source / "images" / name, folder / "images" / name)
    return folder


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("EDA_DATA_DIR", str(copy_of_sample(tmp_path / "train", people=30)))
    notebook = read_notebook()
    # execute() raises CellExecutionError, naming the cell, as soon as any cell fails
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "layout: mask" in printed and "210 images, 30 people/groups, 18 classes" in printed
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) == PLOT_CELLS
    assert not [out for out in outputs if out.output_type == "error"]
