"""The notebook series under papermill, with the tests' quick parameters."""
import ast
import itertools
import json
import re
from pathlib import Path

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



def test_controls_fork_the_run_when_a_knob_changes_and_continue_in_place_otherwise(tmp_path):
    """Notebook 02's "run N stages" button, clicked in Python (the browser test clicks it in JupyterLab).
    With the knobs as shown the run goes on in its folder, whose saved config then counts the new stages;
    with λ moved it goes on in <out_dir>-fork1, whose checkpoint names the parent folder and the stage it
    branched at, while the parent keeps its config and stages and resumes as before."""
    from test_bissl import cfg_for, make_problem

    from bissl_kit.bissl import BisslTrainer
    from bissl_kit.checkpoint import load_checkpoint
    from bissl_kit.viz.bilevel import T_DIST, BisslDashboard, controls

    first = tmp_path / "bissl"
    trainer = BisslTrainer(cfg_for(1.0, stages=2), *make_problem(), out_dir=first)  # the toy problem, λ 0.05
    dashboard = BisslDashboard(live=False, layer_names=[name for name, _ in trainer.groups], lower_steps=3,
                               upper_steps=trainer.upper_steps)
    for rec in trainer.run():
        dashboard.update(rec)
    grid, row, out = controls(trainer, dashboard).children
    n, button, status = row.children
    knobs = {w.description: w for w in grid.children}

    button.click()  # no knob moved: two more stages, in place
    assert trainer.out_dir == first and trainer.stage == 4 and not (tmp_path / "bissl-fork1").exists()
    assert json.loads((first / "config.json").read_text())["stages"] == 4
    assert load_checkpoint(first / "checkpoint.pt")["config"]["stages"] == 4

    knobs["λ"].value = 0.5
    button.click()
    fork = tmp_path / "bissl-fork1"
    assert trainer.out_dir == fork and trainer.stage == 6 and out.outputs == ()
    ckpt = load_checkpoint(fork / "checkpoint.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["lam"] == 0.5 and ckpt["config"]["out_dir"] == str(fork)
    assert ckpt["lineage"]["parent"] == {"dir": str(first), "stage": 4, "changed": ["lam: saved 0.05, now 0.5"]}
    assert status.value.startswith("<b>6</b> stages done") and f"forked to {fork} at stage 4 (λ 0.05 → 0.5)" in status.value
    # the parent folder: its stages under the config that produced them
    parent = load_checkpoint(first / "checkpoint.pt")
    assert parent["step"] == 4 and parent["config"]["lam"] == 0.05
    assert json.loads((first / "config.json").read_text())["lam"] == 0.05
    # one dashboard: the fork's stages continue the stage axis, with a line where it branched
    assert list(dashboard.figure.fig.data[T_DIST].x) == [1, 2, 3, 4, 5, 6]
    assert [s.x0 for s in dashboard.figure.fig.layout.shapes] == [4] * 4

    button.click()  # the knobs as they now show: the fork goes on in its own folder
    assert trainer.out_dir == fork and trainer.stage == 8 and not (tmp_path / "bissl-fork2").exists()
    assert not Path(f"{fork}-fork1").exists()

    again = BisslTrainer(cfg_for(1.0, stages=2), *make_problem(), out_dir=first)  # the notebook's parameters
    assert again.resume() and again.stage == 4 and again.cfg.lam == 0.05
