"""The example notebooks run top to bottom without errors (with FUSION_NOTEBOOK_SMOKE=1: tiny sizes).

They run on the shipped default model when `fusion/default_model/` exists, otherwise on an untrained
stand-in model built here and passed through FUSION_NOTEBOOK_MODEL. The kernel is `python3`, from a
kernelspec that runs this test's own Python (`sys.executable`), so the notebooks see this checkout.
"""
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

from fusion.data.shapes_world import scene_layout

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = ["image_pipelines.ipynb", "video_qa.ipynb", "finetune_custom_data.ipynb"]
CELL_TIMEOUT = 300


@pytest.fixture(scope="module")
def generator(load_example):
    return load_example("make_notebooks.py")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, generator, load_example):
    """Environment of the notebook kernels: smoke settings, a model, a work folder, this Python's kernel."""
    import pipelines

    work = tmp_path_factory.mktemp("notebooks")
    env = {"FUSION_NOTEBOOK_SMOKE": "1", "FUSION_NOTEBOOK_WORKDIR": str(work), "OMP_NUM_THREADS": "1",
           "JUPYTER_PATH": os.pathsep.join(filter(None, [generator.python_kernel_dir(),
                                                         os.environ.get("JUPYTER_PATH")])),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if Path(str(pipelines.default_model_location())).is_dir():
        env["FUSION_NOTEBOOK_MODEL"] = ""  # the shipped default model
    else:
        settings = load_example("notebook_settings.py")
        env["FUSION_NOTEBOOK_MODEL"] = str(settings.build_stand_in_model(work / "stand-in"))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel process inherits the environment
    yield work
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_the_kernel_is_this_python(kernel_env):
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable


def run_notebook(name: str):
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    return notebook


def outputs_text(notebook) -> str:
    return "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def images_shown(notebook) -> int:
    return sum("image/png" in out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def test_image_pipelines_notebook_runs(kernel_env):
    notebook = run_notebook("image_pipelines.ipynb")
    text = outputs_text(notebook)
    assert "SMOKE settings" in text
    assert "same answers and scores with batch_size=1: True" in text
    manifest = json.loads((EXAMPLES / "media" / "media.json").read_text())
    for item in manifest["images"]:
        assert item["file"] in text and item["caption"] in text
    assert images_shown(notebook) >= 3


def test_video_qa_notebook_runs(kernel_env):
    notebook = run_notebook("video_qa.ipynb")
    text = outputs_text(notebook)
    assert "time stamps: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]" in text  # uniform, 8 of 8 frames at 4 fps
    assert "time stamps: [0.0, 0.5, 1.0, 1.5]" in text  # fps=2
    assert "Which way does the red circle move?" in text
    assert images_shown(notebook) >= 3


def test_finetune_notebook_runs_and_reports_before_and_after(kernel_env):
    notebook = run_notebook("finetune_custom_data.ipynb")
    summary = json.loads((kernel_env / "finetune_custom_data" / "summary.json").read_text())
    assert summary["smoke"] is True
    for when in ("before", "after"):
        assert 0 <= summary[when]["vqa_accuracy"] <= 1
        assert summary[when]["questions"] > 0
        assert set(summary[when]["by_type"]) <= {"color", "shape", "count", "position", "existence", "relation"}
    # before and after are measured on the test images whose layout no training image shows
    data = kernel_env / "finetune_custom_data" / "data"
    train, held_out = ([json.loads(line) for line in (data / name).read_text().splitlines()]
                       for name in ("train.jsonl", "test_unseen.jsonl"))
    assert 0 < summary["before"]["questions"] <= sum(s["task"] == "vqa" for s in held_out)  # (smoke: a limit)
    assert not {scene_layout(s["meta"]["objects"]) for s in held_out} & {scene_layout(s["meta"]["objects"]) for s in train}
    assert (kernel_env / "finetune_custom_data" / "run" / "final" / "model.safetensors").is_file()
    metrics = (kernel_env / "finetune_custom_data" / "run" / "metrics.jsonl").read_text().splitlines()
    stages = {json.loads(line).get("stage") for line in metrics}
    assert {"cotrain", "unfreeze"} <= stages
    assert images_shown(notebook) >= 4  # samples, accuracy bars, curves, heatmaps


def test_committed_notebooks_are_the_generators_cells(generator):
    for name in NOTEBOOKS:
        committed = nbformat.read(EXAMPLES / name, as_version=4)
        built = generator.build(name)
        assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], \
            (f"{name} differs from examples/make_notebooks.py; run `python examples/make_notebooks.py --execute` "
             f"(it writes the notebooks and runs them: they are committed with their outputs)")
        nbformat.validate(committed)


def test_committed_notebooks_carry_a_real_run_with_a_measured_gain():
    # The .ipynb files are committed with the outputs of `make_notebooks.py --execute` at normal settings.
    for name in NOTEBOOKS:
        text = outputs_text(nbformat.read(EXAMPLES / name, as_version=4))
        assert "normal settings" in text and "SMOKE" not in text, f"{name}: committed without a normal-settings run"
    text = outputs_text(nbformat.read(EXAMPLES / "finetune_custom_data.ipynb", as_version=4))
    rows = {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(r"^(VQA accuracy|shape)\s+([\d.]+)\s+([\d.]+)$",
                                                                     text, flags=re.MULTILINE)}
    assert set(rows) == {"VQA accuracy", "shape"}, "the before/after table is missing from the committed outputs"
    for row, (before, after) in rows.items():
        assert after > before + 0.05, f"{row}: {before} before fine-tuning, {after} after: no measured gain"
