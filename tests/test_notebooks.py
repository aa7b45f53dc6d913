"""The notebook series under papermill, with the tests' quick parameters."""
import ast
import itertools
import json
import re

import pytest

from bissl_kit.config import ConfigError
from bissl_kit import notebooks
from bissl_kit.notebooks import (FIGURES, NOTEBOOKS, QUICK, REPO, SERIES, NotebookParameters, execute,
                                 kernel_config)
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


@pytest.mark.parametrize("stem", sorted({p.stem for p in [*NOTEBOOKS.glob("*.ipynb"), *NOTEBOOKS.glob("*.py")]}))
def test_each_notebook_and_its_paired_script_agree(stem):
    # notebooks/jupytext.toml pairs NN_name.ipynb with the py:percent script NN_name.py
    import jupytext
    notebook, script = (NOTEBOOKS / f"{stem}{ext}" for ext in (".ipynb", ".py"))
    nb_name, py_name = (str(p.relative_to(REPO)) for p in (notebook, script))
    from_script = f"`.venv/bin/jupytext --update --to ipynb {py_name}`"
    from_notebook = f"`.venv/bin/jupytext --to py:percent {nb_name}`"
    if not script.exists():
        pytest.fail(f"{nb_name} has no paired script {py_name}: write it with {from_notebook}", pytrace=False)
    if not notebook.exists():
        pytest.fail(f"{py_name} has no paired notebook {nb_name}: write it with {from_script}", pytrace=False)
    cells = [[(c.cell_type, c.source, c.metadata.get("tags", [])) for c in jupytext.read(p).cells]
             for p in (notebook, script)]
    for i, (a, b) in enumerate(itertools.zip_longest(*cells)):
        if a != b:
            what = (f"is missing in {nb_name if a is None else py_name}" if None in (a, b) else
                    "differs in " + " and ".join(k for k, x, y in zip(("type", "source", "tags"), a, b) if x != y))
            pytest.fail(f"{nb_name} and {py_name} disagree: cell {i + 1} {what}. Update the file you did not edit: "
                        f"{from_script} (from the script) or {from_notebook} (from the notebook)", pytrace=False)


def parameter_defaults(path):
    """The literal values the ``parameters`` cell of a committed notebook assigns."""
    nb = json.loads(path.read_text())
    (cell,) = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    return {t.id: ast.literal_eval(node.value) for node in ast.parse("".join(cell["source"])).body
            if isinstance(node, ast.Assign) for t in node.targets}


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_draw_their_figures_under_runs_unless_told(path):
    # so that running a notebook in JupyterLab, like `make demo`, leaves the committed figures/ as it is
    assert (NOTEBOOKS / parameter_defaults(path)["figures_dir"]).resolve() == FIGURES
    assert FIGURES.relative_to(REPO).parts[0] == "runs" and "/runs/" in (REPO / ".gitignore").read_text()


def test_demo_writes_figures_under_runs_and_make_figures_into_the_committed_figures(monkeypatch, capsys):
    seen = {}

    def execute(name, parameters, **kw):  # records what papermill would be given
        seen[name] = parameters
        return notebooks.EXECUTED / f"{name}.ipynb"

    monkeypatch.setattr(notebooks, "execute", execute)
    monkeypatch.chdir(REPO)

    def run(*argv):
        seen.clear()
        assert notebooks.main(["run", *argv]) == 0
        return {name: p["figures_dir"] for name, p in seen.items()}, capsys.readouterr().out.splitlines()[-1]

    figures, said = run()  # make demo
    assert figures == dict.fromkeys(SERIES, "../runs/figures") and said.endswith("figures in runs/figures/")
    recipe = re.search(r"^figures:.*\n\t\$\(BIN\)/python -m bissl_kit\.notebooks (.+)$",
                       (REPO / "Makefile").read_text(), re.M).group(1).split()
    figures, said = run(*recipe[1:])  # make figures
    assert recipe[0] == "run" and figures == dict.fromkeys(SERIES, "../figures") and said.endswith("figures in figures/")
    figures, _ = run("--quick", "01_pretrain")
    assert figures == {"01_pretrain": QUICK["01_pretrain"]["figures_dir"]}


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_papermill_sees_every_parameter_the_parameters_cell_assigns(path):
    # papermill parses the cell line by line and skips a line holding a second '=' (a comment's counts),
    # warning "Unable to parse line N": that parameter is then unknown to it
    import papermill
    missed = set(parameter_defaults(path)) - set(papermill.inspect_notebook(str(path)))
    assert not missed, f"papermill cannot parse the lines of {sorted(missed)} in {path.name}: one '=' per line"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Notebook 01 run once with quick parameters; later notebooks start from its checkpoint."""
    tmp = tmp_path_factory.mktemp("nb01")
    out = execute("01_pretrain", quick("01_pretrain", tmp), output_dir=tmp / "nb")
    return tmp, out


def test_01_pretrain_runs_headless_and_writes_checkpoint_and_figures(pretrained):
    tmp_path, out = pretrained
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


def test_kernel_starts_with_an_encrypted_transport_and_no_warning(tmp_path, capfd):
    import nbformat
    import papermill
    import zmq
    if not zmq.has("curve"):
        pytest.skip("libzmq without CurveZMQ: the kernel runs unencrypted (and ipykernel says so)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nbformat.write(nb, tmp_path / "in.ipynb")
    out = papermill.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                     progress_bar=False, config=kernel_config())
    assert out.cells[0].outputs[0]["text"] == "42\n"
    assert "without encryption" not in capfd.readouterr().err  # ipykernel's warning at a plain-TCP start


def test_notebook_parameters_capture_only_new_names():
    ns = {"existing": 1, "PretrainConfig": PretrainConfig}
    params = NotebookParameters(ns)
    ns.update(params=params, lr=0.5, steps=100, live=False, _hidden=3)
    cfg = params.config(PretrainConfig, extras=("live",))
    assert cfg.lr == 0.5 and cfg.steps == 100
    ns["unknown_thing"] = 1
    with pytest.raises(ConfigError, match="notebook parameters: unknown PretrainConfig parameter"):
        params.config(PretrainConfig, extras=("live",))


def test_02_bilevel_runs_headless_and_writes_the_dashboard(pretrained, tmp_path):
    ckpt = str(pretrained[0] / "out_dir" / "checkpoint.pt")
    out = execute("02_bilevel", quick("02_bilevel", tmp_path, pretrain_checkpoint=ckpt), output_dir=tmp_path / "nb")
    nb = json.loads(out.read_text())
    assert "widgets" not in nb["metadata"] and out.stat().st_size < 2_000_000
    assert (tmp_path / "out_dir" / "checkpoint.pt").exists()
    assert (tmp_path / "figures_dir" / "02_bilevel_dashboard.html").exists()
    text = json.dumps(nb)
    assert "val_top1" in text and "headless run: controls are shown only with live=True" in text


def test_02_bilevel_in_paper_mode(pretrained, tmp_path):
    ckpt = str(pretrained[0] / "out_dir" / "checkpoint.pt")
    execute("02_bilevel", quick("02_bilevel", tmp_path, pretrain_checkpoint=ckpt, paper_mode=True),
            output_dir=tmp_path / "nb")
    cfg = json.loads((tmp_path / "out_dir" / "config.json").read_text())
    assert cfg["solver"] == "layerwise" and cfg["hvp"] == "recompute" and cfg["solver_iters"] == 3


def test_dashboard_builds_headless_and_accepts_every_record_kind():
    from bissl_kit.viz.bilevel import BisslDashboard
    d = BisslDashboard(live=False, layer_names=["stem", "layer1.0"], lower_steps=2, upper_steps=1)
    d.update({"kind": "lower", "stage": 1, "step": 1, "pretext_loss": 5.0})
    d.update({"kind": "upper", "stage": 1, "step": 1, "implicit_loss": 2.0, "classic_loss": 2.1,
              "cos_implicit_classic": 0.9, "cos_implicit_pretext": -0.1, "cos_implicit_classic_layers": [0.8, 0.95],
              "solver_residuals": [2.0, 0.2, 0.02], "v_norm": 2.0})
    d.update({"kind": "stage", "stage": 1, "distance": 0.5, "val_top1": 0.7})
    fig = d.figure.fig
    assert list(fig.data[5].z) == [[0.8], [0.95]]          # heat map: layers × upper steps
    assert list(fig.data[-1].y) == [1.0, 0.1, 0.01]        # the latest CG solve, relative residuals
