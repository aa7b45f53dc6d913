"""environment.yml (for conda users) and pyproject.toml (for pip) list the same dependencies."""
import re
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
