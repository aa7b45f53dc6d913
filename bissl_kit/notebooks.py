"""The numbered notebook series: strict parameters inside a notebook, and headless execution.

Inside a notebook::

    params = NotebookParameters(globals())   # first code cell: remembers the names defined so far
    # --- cell tagged "parameters": plain assignments, one per config field (+ declared extras)
    cfg = params.config(PretrainConfig, extras=("live",))

papermill injects its parameters as assignments after the ``parameters`` cell and only *warns* about
unknown ones; :meth:`NotebookParameters.config` turns every new name that is not a field (or a
declared extra) into an error, so ``-p lr_typo 0.1`` stops the run instead of training with defaults.

From a shell: ``python -m bissl_kit.notebooks run [--quick] [--figures-dir DIR] [NAME ...]`` executes
the series in order with papermill (working directory ``notebooks/``), writes the executed copies to
``notebooks/executed/`` without widget state, and prints the time of each. Figures go to ``runs/figures/``,
which git ignores, so that ``make demo`` leaves the checkout clean; ``make figures`` passes
``--figures-dir figures`` to rewrite the committed record on purpose.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, param

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
EXECUTED = NOTEBOOKS / "executed"
# Where the series draws its figures unless told otherwise (each notebook's default figures_dir, too):
# under runs/, ignored by git; the committed figures/ is written only on purpose (`make figures`).
FIGURES = REPO / "runs" / "figures"

# The series, in order. QUICK holds the parameters the tests use for each (seconds, not minutes).
SERIES = ("01_pretrain", "02_bilevel", "03_finetune", "04_features_umap", "05_results", "06_ablations")
QUICK: dict[str, dict[str, Any]] = {
    "01_pretrain": {"steps": 6, "batch_size": 32, "warmup_steps": 2, "knn_every": 3, "width": 4,
                    "out_dir": "../runs/quick/pretrain", "figures_dir": "../runs/quick/figures"},
    "02_bilevel": {"stages": 2, "lower_steps": 2, "upper_steps": 2, "lower_batch_size": 16, "upper_batch_size": 16,
                   "head_warmup_epochs": 1, "solver_iters": 3, "pretrain_checkpoint": "../runs/quick/pretrain/checkpoint.pt",
                   "out_dir": "../runs/quick/bissl", "figures_dir": "../runs/quick/figures"},
    "03_finetune": {"backbone_checkpoint": "../runs/quick/bissl/checkpoint.pt", "epochs": 2, "batch_size": 64,
                    "out_dir": "../runs/quick/finetune", "figures_dir": "../runs/quick/figures"},
    "04_features_umap": {"runs_dir": "../runs/quick", "probe_epochs": 10, "max_points": 300,
                         "figures_dir": "../runs/quick/figures"},
    "05_results": {"pretrain_checkpoint": "../runs/quick/pretrain/checkpoint.pt", "bissl_runs": ["../runs/quick/bissl"],
                   "trials": 2, "seeds": 2, "epochs": 1, "batch_size": 64, "probe_epochs": 5,
                   "out_dir": "../runs/quick/compare", "figures_dir": "../runs/quick/figures"},
    "06_ablations": {"pretrain_checkpoint": "../runs/quick/pretrain/checkpoint.pt", "bissl_runs": ["../runs/quick/bissl"],
                     "trials": 1, "seeds": 2, "epochs": 1, "batch_size": 64, "out_dir": "../runs/quick/sweep",
                     "figures_dir": "../runs/quick/figures"},
}


def _folder(name: str, value: str) -> None:
    from .files import check_folder
    check_folder(name, value)


@dataclass(frozen=True)
class NotebookOptions(Config):
    """The notebooks' own parameters (not config fields), validated like config fields: a notebook run
    with ``-r live False`` (the string) or an unusable ``figures_dir`` stops before any training."""

    live: bool = param(True, "live widgets in JupyterLab; False draws static figures once (headless runs)")
    paper_mode: bool = param(False, "notebook 02: the official algorithm (PAPER_MODE) instead of ours")
    figures_dir: str = param("../runs/figures", "where the figures are exported (a folder, made if missing)",
                             check=_folder)
    committed_results: str = param("../results/comparison.json", "notebook 05: the committed comparison shown last")
    committed_figure: str = param("../figures/05_comparison.png", "notebook 05: the committed comparison's figure")
    committed_sweeps: tuple[str, ...] = param(("../results/ablations/lam/sweep.json", "../results/ablations/solver/sweep.json",
                                               "../results/ablations/gamma/sweep.json"),
                                              "notebook 06: the committed ablation's sweeps, shown last")


class NotebookParameters:
    """Remembers the names defined before the parameters cell; builds a config from those after."""

    def __init__(self, namespace: dict):
        self._namespace = namespace
        self._before = set(namespace)

    def values(self) -> dict[str, Any]:
        """Names assigned since construction (the parameters cell and papermill's injected cell)."""
        out = {}
        for name, value in self._namespace.items():
            if name in self._before or name.startswith("_") or value is self:
                continue
            # modules, functions, classes and the configs the notebook builds from the parameters are not parameters
            if isinstance(value, (types.ModuleType, types.FunctionType, type, Config)):
                continue
            out[name] = value
        return out

    def options(self, *names: str) -> NotebookOptions:
        """The notebook-only parameters ``names`` (fields of :class:`NotebookOptions`), validated."""
        unknown = [n for n in names if n not in NotebookOptions.field_names()]
        if unknown:
            raise TypeError(f"not notebook options: {unknown}")
        values = self.values()
        try:
            return NotebookOptions.from_dict({n: values[n] for n in names if n in values})
        except ConfigError as e:
            raise ConfigError(f"notebook parameters: {e}") from None

    def fields(self, *extras: str) -> dict[str, Any]:
        """The parameters that are not the notebook options ``extras``: the config's fields."""
        self.options(*extras)
        return {k: v for k, v in self.values().items() if k not in extras}

    def config(self, cls: type[Config], *, extras: tuple[str, ...] = ()) -> Config:
        """``cls`` built from the parameters, the notebook options ``extras`` validated too; names that are
        neither fields nor ``extras`` are an error."""
        values = self.fields(*extras)
        try:
            return cls.from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"notebook parameters: {e}") from None


def strip_widget_state(path: Path) -> None:
    """Remove saved widget state (megabytes of plotly.js per FigureWidget) from an executed notebook."""
    nb = json.loads(path.read_text())
    if nb.get("metadata", {}).pop("widgets", None) is not None:
        path.write_text(json.dumps(nb, indent=1))


class _KnownParametersFilter(logging.Filter):
    """papermill warns about every parameter its `parameters` cell does not assign; our notebooks
    accept any config field and reject the rest themselves, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


logging.getLogger("papermill").addFilter(_KnownParametersFilter())


def kernel_config():
    """Configuration of the kernel papermill starts: encrypted transport (CurveZMQ) where pyzmq has it.

    jupyter_client provisions no keys unless asked (``KernelManager.transport_encryption`` defaults to
    "disabled"), and ipykernel then warns at every start "Kernel is running over TCP without encryption".
    "auto" provisions keys when the kernel spec declares support (ipykernel's does) and runs unencrypted
    otherwise; jupyter_client refuses it outright where libzmq has no CurveZMQ, hence the check."""
    import zmq
    from traitlets.config import Config

    return Config(KernelManager={"transport_encryption": "auto"}) if zmq.has("curve") else Config()


def execute(name: str, parameters: dict[str, Any] | None = None, *, output_dir: Path = EXECUTED,
            progress: bool = False) -> Path:
    """Run ``notebooks/<name>.ipynb`` headless (``live=False``) and return the executed copy's path."""
    import papermill

    src = NOTEBOOKS / f"{name}.ipynb"
    if not src.exists():
        raise FileNotFoundError(f"no notebook {str(src)!r}; the series is {', '.join(SERIES)}")
    output_dir.mkdir(parents=True, exist_ok=True)
    out = output_dir / f"{name}.ipynb"
    papermill.execute_notebook(str(src), str(out), parameters={"live": False, **(parameters or {})},
                               cwd=str(NOTEBOOKS), progress_bar=progress, kernel_name="python3",
                               config=kernel_config())
    strip_widget_state(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bissl_kit.notebooks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks of the series in order, headless")
    run.add_argument("names", nargs="*", help=f"notebooks to run (default: all of {', '.join(SERIES)})")
    run.add_argument("--quick", action="store_true", help="the tests' tiny parameters (seconds per notebook)")
    run.add_argument("--figures-dir", type=Path, default=None,
                     help=f"write the figures here (default: {FIGURES.relative_to(REPO)}, with --quick "
                          "runs/quick/figures); `make figures` passes figures, the committed record")
    args = parser.parse_args(argv)
    names = args.names or list(SERIES)
    unknown = [n for n in names if n not in SERIES]
    if unknown:
        parser.error(f"unknown notebook(s) {unknown}; the series is {', '.join(SERIES)}")
    total = time.perf_counter()
    for name in names:
        parameters = dict(QUICK[name]) if args.quick else {}
        figures = args.figures_dir or NOTEBOOKS / parameters.get("figures_dir", FIGURES)
        # relative to notebooks/, where the notebooks run: the executed copies hold no path of this machine
        parameters["figures_dir"] = os.path.relpath(figures, NOTEBOOKS)
        t0 = time.perf_counter()
        print(f"[{name}] running ...", flush=True)
        out = execute(name, parameters, progress=True)
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s -> {out.relative_to(REPO)}", flush=True)
    print(f"series done in {time.perf_counter() - total:.0f} s; figures in {os.path.relpath(figures)}{os.sep}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
