"""The notebook series under papermill, with the tests' quick parameters."""
import json
from pathlib import Path

import pytest

from bissl_kit.config import ConfigError
from bissl_kit.notebooks import NOTEBOOKS, QUICK, SERIES, NotebookParameters, execute
from bissl_kit.pretrain import PretrainConfig

pytestmark = pytest.mark.slow


def quick(name, tmp_path, **extra):
    params = dict(QUICK[name])
    for key in ("out_dir", "figures_dir"):
        params[key] = str(tmp_path / key)
    return {**params, **extra}


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_are_clean_and_parametrised(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert "widgets" not in nb["metadata"]
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1
    assert path.stem in SERIES


def test_01_pretrain_runs_headless_and_writes_checkpoint_and_figures(tmp_path):
    out = execute("01_pretrain", quick("01_pretrain", tmp_path), output_dir=tmp_path / "nb")
    nb = json.loads(out.read_text())
    assert "widgets" not in nb["metadata"]
    assert out.stat().st_size < 2_000_000  # no plotly.js bundle or widget state inside
    assert (tmp_path / "out_dir" / "checkpoint.pt").exists()
    figures = {p.name for p in (tmp_path / "figures_dir").iterdir()}
    assert {"01_pretrain_curves.html", "01_pretrain_knn.html"} <= figures
    text = json.dumps(nb)
    assert "random init (step 0)" in text and "weighted k-NN" in text


def test_unknown_papermill_parameter_stops_the_notebook(tmp_path):
    import papermill
    with pytest.raises(papermill.PapermillExecutionError, match="unknown PretrainConfig parameter.*'lrr'"):
        execute("01_pretrain", quick("01_pretrain", tmp_path, lrr=0.1), output_dir=tmp_path / "nb")
    assert not (tmp_path / "out_dir").exists()  # nothing was trained or written


def test_notebook_parameters_capture_only_new_names():
    ns = {"existing": 1, "PretrainConfig": PretrainConfig}
    params = NotebookParameters(ns)
    ns.update(params=params, lr=0.5, steps=100, live=False, _hidden=3)
    cfg = params.config(PretrainConfig, extras=("live",))
    assert cfg.lr == 0.5 and cfg.steps == 100
    ns["unknown_thing"] = 1
    with pytest.raises(ConfigError, match="notebook parameters: unknown PretrainConfig parameter"):
        params.config(PretrainConfig, extras=("live",))
