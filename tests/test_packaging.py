"""environment.yml (for conda users) and pyproject.toml (for pip) list the same dependencies; the stages
need none of the presentation libraries."""
import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONDA_TO_PIP = {"pytorch": "torch", "python-kaleido": "kaleido"}


def _name_and_spec(req: str):
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_environment_yml_matches_pyproject():
    """The conda environment is the full kit: the core dependencies and the notebooks extra, from conda-forge
    alone (the pytorch channel stopped receiving builds)."""
    project = _pyproject()
    deps = project["dependencies"] + project["optional-dependencies"]["notebooks"]
    pip = dict(_name_and_spec(d) for d in deps)
    conda = {}
    in_deps = False
    text = (REPO / "environment.yml").read_text()
    for line in text.splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
            continue
        m = re.match(r"^  - ([^\s:]+)\s*$", line) if in_deps else None
        if m:
            name, spec = _name_and_spec(m.group(1))
            if name not in ("python", "pip"):
                conda[CONDA_TO_PIP.get(name, name)] = spec
    assert conda == pip
    assert "- -e ." in text  # the kit itself
    channels = re.search(r"^channels:\n((?:  - .*\n)+)", text, re.M).group(1).split()
    assert [c for c in channels if c != "-"] == ["conda-forge"]


# what a cluster node installs: the stages and the command line, nothing for notebooks or figures
CORE_DEPENDENCIES = {"torch", "torchvision", "numpy", "scipy", "scikit-learn", "tqdm"}


def test_core_install_is_the_stages_only():
    project = _pyproject()
    assert {_name_and_spec(d)[0] for d in project["dependencies"]} == CORE_DEPENDENCIES
    extras = project["optional-dependencies"]
    notebooks = {_name_and_spec(d)[0] for d in extras["notebooks"]}
    assert {"jupyterlab", "plotly", "kaleido", "umap-learn", "papermill", "tensorboard"} <= notebooks
    assert {_name_and_spec(d) for d in extras["ray"]} == {("ray", ">=2.40")}
    assert {_name_and_spec(d) for d in extras["tensorboard"]} == {("tensorboard", ">=2.15")}
    assert project["scripts"]["bissl-kit"] == "bissl_kit.__main__:main"
    # the README's and the Makefile's install is the full kit
    assert ".[notebooks,test]" in (REPO / "Makefile").read_text()


def test_console_script_entry_point_runs_the_cli():
    """``bissl-kit`` is ``python -m bissl_kit``: the entry point's function parses the stages (a bad option is
    the stage's usage error, exit 2, as from ``python -m``)."""
    code = ("import sys; from bissl_kit.__main__ import main; sys.argv = ['bissl-kit', 'pretrain', '--steps', '0']; "
            "sys.exit(main())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "pretrain: error: steps=0" in out.stderr, out.stderr[-2000:]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text() and "make demo" in (REPO / "README.md").read_text()


# ---- computing apart from presentation -------------------------------------------------------------------

# What only the notebooks' figures and widgets need (bissl_kit/viz/): a training run on a cluster node,
# or a CI job of the library alone, must not need them. umap-learn is the computation of notebook 04's
# pictures, imported by bissl_kit.features only inside the function that fits it.
PRESENTATION = ("plotly", "ipywidgets", "anywidget", "kaleido", "umap")
# the rest of the notebooks extra (and the optional backbone library): a core install lacks them, so no stage
# may import them at import time; bissl_kit.notebooks imports papermill inside the function that runs notebooks
NOTEBOOK_ONLY = PRESENTATION + ("jupyterlab", "ipykernel", "IPython", "papermill", "nbformat", "jupytext",
                                "tensorboard", "timm", "ray")
CORE = ("config", "rng", "rundir", "checkpoint", "backbones", "speed", "reproduce", "data", "augment", "models",
        "losses", "pretext", "optim", "evaluate", "stats", "implicit", "pretrain", "pretrain_config", "presets", "files",
        "downstream", "bissl", "finetune", "hpo", "compare", "reports", "features", "distributed", "engine", "experiments",
        "tensorboard", "notebooks", "__main__")


def _core_modules() -> list[str]:
    """Every module of CORE, the submodules of its packages included (bissl_kit.bissl.trainer, ...)."""
    names = []
    for name in CORE:
        package = REPO / "bissl_kit" / name
        names.append(f"bissl_kit.{name}")
        if package.is_dir():
            names += [f"bissl_kit.{name}.{f.stem}" for f in sorted(package.glob("*.py")) if f.stem != "__init__"]
    return names


# Run in a fresh interpreter: a finder at the head of sys.meta_path makes every presentation library fail
# to import, as on a machine where it is not installed.
_WITHOUT_PRESENTATION = """
import importlib, json, sys
BLOCKED = set({blocked!r})
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"No module named {{name!r}} (hidden by tests/test_packaging.py)")
        return None
sys.meta_path.insert(0, NotInstalled())
failed = {{}}
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{{type(e).__name__}}: {{e}}"
print(json.dumps(failed))
"""


def test_importing_the_stages_loads_no_notebook_library():
    """Installed or not, ``import bissl_kit.pretrain`` (and every stage, the CLI) loads none of the notebooks
    extra: a lazy import stays lazy."""
    code = ("import json, sys, importlib\n"
            f"for m in {_core_modules()!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted({{n for n in sys.modules if n.partition('.')[0] in {NOTEBOOK_ONLY!r}}})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_every_core_module_imports_without_the_presentation_libraries():
    modules = _core_modules()
    code = _WITHOUT_PRESENTATION.format(blocked=NOTEBOOK_ONLY, modules=modules)
    # cwd = the repository: '' heads sys.path under -c, so this tree is imported, not an installed copy
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(out.stdout.splitlines()[-1])
    assert failed == {}, f"modules that do not import without {', '.join(NOTEBOOK_ONLY)}: {failed}"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, at module level or inside a function (a lazy import is
    still a dependency of the code that runs it); relative ones with their dots ('.viz.figures', '..viz')."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            dots = "." * node.level
            if node.module:
                out.append((node.lineno, dots + node.module))
            else:  # from . import viz
                out += [(node.lineno, dots + a.name) for a in node.names]
    return out


def test_no_core_module_imports_the_presentation_code():
    """Importing is not enough: a lazy ``import plotly`` inside a stage's function would still fail there.
    The command line alone reaches into bissl_kit.viz, to export the figure a user asked for (--figures-dir)."""
    found = []
    for path in sorted((REPO / "bissl_kit").rglob("*.py")):
        rel = path.relative_to(REPO / "bissl_kit").as_posix()
        if rel.startswith("viz/"):
            continue
        for line, name in _imports(path):
            relative = name.startswith(".")
            library = not relative and name.partition(".")[0] in PRESENTATION
            if library and not (name == "umap" and rel == "features/embedding.py"):
                found.append(f"{rel}:{line}: import {name}")
            viz = name.lstrip(".").startswith("viz") if relative else name.startswith("bissl_kit.viz")
            if viz and rel != "__main__.py":
                found.append(f"{rel}:{line}: import {name}")
    assert found == [], "presentation code in the computing modules (it belongs in bissl_kit/viz/):\n" + "\n".join(found)
