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


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pip = dict(_name_and_spec(d) for d in deps)
    conda = {}
    in_deps = False
    for line in (REPO / "environment.yml").read_text().splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
            continue
        m = re.match(r"^  - ([^\s:]+)\s*$", line) if in_deps else None
        if m:
            name, spec = _name_and_spec(m.group(1))
            if name not in ("python", "pip"):
                conda[CONDA_TO_PIP.get(name, name)] = spec
    assert conda == pip
    assert "- -e ." in (REPO / "environment.yml").read_text()  # the kit itself


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text() and "make demo" in (REPO / "README.md").read_text()


# ---- computing apart from presentation -------------------------------------------------------------------

# What only the notebooks' figures and widgets need (bissl_kit/viz/): a training run on a cluster node,
# or a CI job of the library alone, must not need them. umap-learn is the computation of notebook 04's
# pictures, imported by bissl_kit.features only inside the function that fits it.
PRESENTATION = ("plotly", "ipywidgets", "anywidget", "kaleido", "umap")
CORE = ("config", "rng", "rundir", "checkpoint", "backbones", "data", "augment", "models", "losses", "pretext",
        "optim", "evaluate", "stats", "implicit", "pretrain", "bissl", "finetune", "hpo", "compare", "reports",
        "features", "distributed", "notebooks", "__main__")


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


def test_every_core_module_imports_without_the_presentation_libraries():
    modules = _core_modules()
    code = _WITHOUT_PRESENTATION.format(blocked=PRESENTATION, modules=modules)
    # cwd = the repository: '' heads sys.path under -c, so this tree is imported, not an installed copy
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(out.stdout.splitlines()[-1])
    assert failed == {}, f"modules that do not import without {', '.join(PRESENTATION)}: {failed}"


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
