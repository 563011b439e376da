"""The walkthrough notebook, executed top to bottom on a tiny trained project, so that it cannot rot."""

import base64
import subprocess
import sys

import nbformat
from nbclient import NotebookClient

from pipeline.compare import runs_table

from .helpers import ROOT, cli_env
from .test_plots import png_size

NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_walkthrough_runs_top_to_bottom_on_the_trained_models(trained_project, monkeypatch):
    root, tracker = trained_project
    registered = subprocess.run(
        [sys.executable, "-m", "pipeline", "register", "--example", "shakespeare"],
        cwd=root,
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert registered.returncode == 0, registered.stderr
    monkeypatch.setenv("PIPELINE_PROJECT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel runs in notebooks/, as when a person opens the notebook there.
    client = NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "COR -> COR" in text and "prompt 'CORN', read as ' CORN'" in text and "\nR -> '" in text
    assert "prompt 'ROMEO:'" in text and "sample 1" in text
    assert "'ROMEO:' -> " in text and "'JULIET:' -> " in text  # the champion, loaded by MLflow
    images = [base64.b64decode(o.data["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # loss curve, toy heatmap, toy attention, Shakespeare attention
    assert all(min(png_size(image)) >= 200 for image in images)
    table = next(o.data["text/html"] for o in outputs if "text/html" in o.get("data", {}))
    run_ids = runs_table(tracker).run_id
    assert len(run_ids) == 2 and all(run_id in table for run_id in run_ids) and "val_loss" in table
