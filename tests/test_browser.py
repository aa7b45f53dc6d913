"""The notebooks in a real JupyterLab, in a real browser: what the user sees, not what papermill sees.

A widget that runs headless can still fail to render (plotly 7's FigureWidget needs anywidget; an
extension/version mismatch shows "Error displaying widget"). Each test here starts JupyterLab on
127.0.0.1 with a random token, opens a working copy of a notebook (quick parameters, ``live=True``)
in headless Debian Chromium driven by Playwright, runs it with the "Run All Cells" menu command, and
checks the page's DOM (and, where a widget writes files, the run folders). Screenshots go to ``runs/browser/``
(``$BISSL_SCREENSHOTS``). The server, its kernels and the browser are stopped when the module ends, also after a
failure, and a final check finds no process of ours left.

Needs the Playwright Python package and a system Chromium (``make setup`` installs both; never
``playwright install``). Without them the tests are skipped saying why, except under CI (``$CI``
set), where a missing browser is a failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bissl_kit.viz import bilevel as dashboard
from bissl_kit.checkpoint import load_checkpoint
from bissl_kit.notebooks import NOTEBOOKS, QUICK, REPO, execute

from browser_helpers import VIEWPORT, alive, chromium, descendants, find_chromium, jupyter_lab, kill_all, with_parameters

pytestmark = pytest.mark.slow

# runs/ is ignored: a test run must not rewrite the committed record in figures/browser/ (refresh it
# on purpose with BISSL_SCREENSHOTS=figures/browser)
SCREENSHOTS = REPO / os.environ.get("BISSL_SCREENSHOTS", "runs/browser")
RUN_ALL_TIMEOUT = 150  # s; Run All of 02 (quick) takes ~35 s, of 04 ~60-130 s (UMAP's JIT) on a loaded 2-core machine
BUTTON_TIMEOUT = 90    # s; two more quick stages


def _browser_or_skip() -> str:
    reasons = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reasons.append("the Playwright Python package is not installed (pip install playwright)")
    chromium_path = find_chromium()
    if chromium_path is None:
        reasons.append("no system Chromium (Debian: apt-get install chromium; or set $BISSL_CHROMIUM)")
    if reasons:
        message = "browser tests need a browser: " + "; ".join(reasons) + " — `make setup` installs both"
        if os.environ.get("CI"):
            pytest.fail(message + " (on CI this is an error, not a skip)")
        pytest.skip(message)
    return chromium_path


# ---- fixtures: one server and one browser for the module; every process stopped at the end ----------

@pytest.fixture(scope="module")
def no_leftover_processes():
    """Set up first, torn down last: after the server and browser are gone, nothing we started is left."""
    before = set(descendants(os.getpid()))
    yield
    deadline = time.monotonic() + 10  # processes told to stop may take a moment to go
    while (left := [p for p in descendants(os.getpid()) if p not in before and alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        names = subprocess.run(["ps", "-o", "pid=,args=", "-p", ",".join(map(str, left))],
                               capture_output=True, text=True).stdout
        kill_all(left)
        pytest.fail(f"browser tests left processes running (now killed):\n{names}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def runs(workdir):
    """A tiny pre-training checkpoint at ``runs/pretrain`` (the tests' tiny_pretrain settings), trained in
    a thread while the browser and the server start; ``runs.result()`` waits for it. Notebook 02
    writes its BiSSL run to ``runs/bissl``, where notebook 04 finds it."""
    from bissl_kit.pretrain import PretrainConfig, pretrain
    runs = workdir / "runs"
    cfg = PretrainConfig(steps=6, batch_size=16, warmup_steps=2, width=4, proj_hidden=32, proj_dim=16,
                         knn_every=0, checkpoint_every=6, progress=False, device="cpu",
                         out_dir=str(runs / "pretrain"))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: (pretrain(cfg), runs)[1])
        yield future


@pytest.fixture(scope="module")
def browser(no_leftover_processes):
    path = _browser_or_skip()
    with chromium(path) as b:
        yield b


@pytest.fixture(scope="module")
def lab(no_leftover_processes, browser, workdir):
    (workdir / "nb").mkdir()
    with jupyter_lab(workdir / "nb", workdir / "home") as server:
        yield server


@pytest.fixture
def page(browser, request, workdir):
    """A fresh page at a laptop's size; on failure its last state is saved beside the test's files."""
    failed_before = request.session.testsfailed
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        if request.session.testsfailed > failed_before:
            path = workdir / f"failure-{request.node.name}.png"
            page.screenshot(path=str(path))
            print(f"screenshot of the failure: {path}")
        context.close()


# ---- driving JupyterLab ------------------------------------------------------------------------------

def open_notebook(page, lab, name: str) -> None:
    """Open ``name`` in JupyterLab and wait until its kernel has started and is idle."""
    page.goto(lab.notebook_url(name))
    page.wait_for_selector(".jp-NotebookPanel", timeout=60_000)
    deadline = time.monotonic() + 90
    while True:  # the front end shows "idle" before the kernel exists; ask the server
        sessions = [s for s in lab.api("/api/sessions") if s["path"] == name]
        if sessions and sessions[0]["kernel"]["execution_state"] == "idle":
            break
        assert time.monotonic() < deadline, f"the kernel of {name} did not start within 90 s"
        time.sleep(0.5)
    page.wait_for_function("() => /\\| Idle/.test(document.querySelector('#jp-main-statusbar').textContent)",
                           timeout=60_000)


def run_all_cells(page) -> None:
    """Run > Run All Cells, as a user would."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


# true when the kernel is idle and every code cell ran, or a cell failed (then run-all stops)
_DONE_OR_FAILED = """() => {
  const status = document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status');
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent);
  const failed = [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .some(e => e.textContent.includes('Traceback'));
  return status === 'idle' && !prompts.some(p => p.includes('*')) && (failed || prompts.every(p => /\\[\\d+\\]/.test(p)));
}"""


def wait_until_run(page, timeout_s: float) -> None:
    page.wait_for_function(_DONE_OR_FAILED, timeout=timeout_s * 1000, polling=500)
    assert_no_errors(page)


def assert_no_errors(page) -> None:
    tracebacks = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]',
                              has_text="Traceback")
    assert tracebacks.count() == 0, f"a cell failed:\n{tracebacks.first.inner_text()[-3000:]}"
    broken = page.get_by_text("Error displaying widget")
    assert broken.count() == 0, "a widget did not render: 'Error displaying widget' on the page"


# In-page recorder: the trace lengths of every plotly graph each time it is drawn (plotly_afterplot) and
# every 100 ms, with the kernel's status at that moment. Recorded in the page, so no update is missed
# between two round trips of the test.
_RECORDER = """() => {
  if (window.__plots) return;
  const rec = window.__plots = {samples: []};
  const status = () => document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status');
  const sample = (why) => document.querySelectorAll('.js-plotly-plot').forEach((gd, plot) => {
    if (!gd.data) return;
    if (!gd.__recorded && gd.on) { gd.__recorded = true; gd.on('plotly_afterplot', () => sample('afterplot')); }
    const n = gd.data.map(t => (t.x || []).length);
    const last = rec.samples.findLast(s => s.plot === plot);
    const s = {t: performance.now(), plot, why, status: status(), n};
    if (!last || last.status !== s.status || last.n.join() !== n.join()) rec.samples.push(s);
  });
  rec.timer = setInterval(() => sample('poll'), 100);
}"""


def recorded(page) -> list[dict]:
    return page.evaluate("() => window.__plots.samples")


def wait_for_points(page, expected: dict[int, int], timeout_s: float = 20) -> None:
    """Wait until the first plotly graph's traces hold ``expected`` points (trace index → count); the
    last messages of a cell may still be drawn after the kernel went idle."""
    js = ("(expected) => { const gd = document.querySelector('.js-plotly-plot');"
          " return !!gd && !!gd.data && Object.entries(expected).every(([i, n]) => (gd.data[i]?.x || []).length === n); }")
    try:
        page.wait_for_function(js, arg={str(k): v for k, v in expected.items()}, timeout=timeout_s * 1000, polling=200)
    except Exception:
        seen = page.evaluate("() => document.querySelector('.js-plotly-plot')?.data?.map(t => (t.x || []).length)")
        hint = (" — the widget was drawn from an empty figure (see bissl_kit.viz.figures.figure_widget_class)"
                if seen == [] else " — updates sent by the kernel did not reach the plot")
        raise AssertionError(f"the plot holds {seen} points per trace; expected {expected} (trace index: points)"
                             + hint) from None


def screenshot(page, locator, name: str) -> Path:
    """The element at a laptop's width (the viewport made tall enough to hold it), saved for the record."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    locator.scroll_into_view_if_needed()
    box = locator.bounding_box()
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], int(box["height"]) + 200)})
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(path), animations="disabled")
    page.set_viewport_size(VIEWPORT)
    return path


# ---- notebook 02: the live dashboard and the "run N stages" button ------------------------------------

def test_02_bilevel_dashboard_updates_live_and_a_moved_knob_forks_the_run(runs, lab, page, workdir):
    quick = QUICK["02_bilevel"]
    runs = runs.result()
    params = {**quick, "pretrain_checkpoint": str(runs / "pretrain" / "checkpoint.pt"),
              "out_dir": str(runs / "bissl"), "figures_dir": str(lab.root / "figures"), "live": True}
    with_parameters(NOTEBOOKS / "02_bilevel.ipynb", lab.root / "02_bilevel.ipynb", params)
    stages, lower = quick["stages"], quick["lower_steps"]

    open_notebook(page, lab, "02_bilevel.ipynb")
    page.evaluate(_RECORDER)
    run_all_cells(page)
    wait_until_run(page, RUN_ALL_TIMEOUT)

    # the controls rendered: every knob, the button, the status line
    button = page.locator("button.jupyter-button", has_text="run 2 stages")
    assert button.is_visible() and button.is_enabled()
    for label in ("λ", "δ", "γ", "K (solver its)", "N_L", "N_U", "lower lr", "upper lr", "stages"):
        assert page.locator(".widget-label", has_text=label).first.is_visible(), f"control {label!r} missing"
    status = page.locator(".widget-html", has_text="stages done")
    assert re.match(rf"\s*{stages} stages done", status.inner_text()), status.inner_text()

    # the live plot rendered and received updates while the cell ran, not only at the end
    plot = page.locator(".js-plotly-plot").first
    assert plot.is_visible()
    wait_for_points(page, {dashboard.T_PRETEXT: stages * lower, dashboard.T_DIST: stages + 1})  # + stage 0
    while_busy = {s["n"][dashboard.T_PRETEXT] for s in recorded(page) if s["status"] == "busy"}
    assert any(0 < k < stages * lower for k in while_busy), \
        f"the plot was drawn only at the end: pretext-loss points seen while the kernel was busy: {sorted(while_busy)}"
    screenshot(page, page.locator(".jp-Cell", has=plot), "02_bilevel_dashboard.png")

    # λ typed into its slider's readout, as a user would, then "run 2 stages": two more stages, in a fork
    original, fork = runs / "bissl", runs / "bissl-fork1"
    lam = json.loads((original / "config.json").read_text())["lam"]
    readout = page.locator(".widget-slider", has=page.get_by_text("λ", exact=True)).locator(".widget-readout")
    readout.fill("0.01")
    readout.press("Enter")
    assert float(readout.inner_text()) == 0.01  # the slider took it (shown as ".3g": 0.0100)
    button.click()
    page.wait_for_function("(done) => [...document.querySelectorAll('.widget-html')]"
                           ".some(e => e.innerText.trim().startsWith(done))", arg=f"{stages + 2} stages done",
                           timeout=BUTTON_TIMEOUT * 1000, polling=500)
    page.wait_for_function(_DONE_OR_FAILED, timeout=30_000)
    assert_no_errors(page)
    assert button.is_enabled()
    # the dashboard keeps growing: the fork's stages continue the plot
    wait_for_points(page, {dashboard.T_PRETEXT: (stages + 2) * lower, dashboard.T_DIST: stages + 3})
    for refusal in ("stopped:", "not run:"):
        assert page.locator(".jp-OutputArea-output", has_text=refusal).count() == 0, refusal
    # the status line says where the run now lives
    assert f"forked to {fork} at stage {stages} (λ {lam:g} → 0.01)" in status.inner_text(), status.inner_text()
    screenshot(page, page.locator(".jp-Cell", has=button), "02_bilevel_controls.png")

    # on disk: the fork's checkpoint names its parent and the stage it branched at ...
    forked = load_checkpoint(fork / "checkpoint.pt")
    assert forked["lineage"]["parent"] == {"dir": str(original), "stage": stages, "changed": [f"lam: saved {lam!r}, now 0.01"]}
    assert forked["step"] == stages + 2 and forked["config"]["lam"] == 0.01
    assert json.loads((fork / "config.json").read_text())["out_dir"] == str(fork)
    # ... and the original folder still holds its stages under the config that produced them
    def assert_original_untouched():
        ckpt = load_checkpoint(original / "checkpoint.pt")
        saved = json.loads((original / "config.json").read_text())
        assert ckpt["step"] == stages and ckpt["config"]["lam"] == saved["lam"] == lam and saved["stages"] == stages
    assert_original_untouched()
    # notebook 02 run again with its parameters resumes the original run (before forks it stopped with
    # "holds a BiSSL run with another config")
    execute("02_bilevel", {**params, "live": False}, output_dir=workdir / "02_again")
    assert_original_untouched()


# ---- notebook 04: the stage switch of the feature explorer ---------------------------------------------

_EXPLORER_PLOT = "() => document.querySelector('.widget-vbox:has(> .bissl-stage-switch) .js-plotly-plot')"


def explorer_state(page) -> dict:
    return page.evaluate(f"""() => {{
      const gd = ({_EXPLORER_PLOT})();
      if (!gd || !gd.data || !gd.layout) return null;
      return {{title: gd.layout.title?.text ?? '', x: gd.data.flatMap(t => Array.from(t.x || []).slice(0, 3)),
               colours: gd.data.map(t => t.marker?.color ?? null),
               points: gd.data.reduce((n, t) => n + (t.visible === false ? 0 : (t.x || []).length), 0)}};
    }}""")


def test_04_feature_explorer_stage_switch_redraws_the_plot_in_place(runs, lab, page):
    from bissl_kit.viz.features import StageExplorer
    runs = runs.result()
    with_parameters(NOTEBOOKS / "04_features_umap.ipynb", lab.root / "04_features_umap.ipynb",
                    {**QUICK["04_features_umap"], "runs_dir": str(runs), "figures_dir": str(lab.root / "figures"),
                     "live": True})
    open_notebook(page, lab, "04_features_umap.ipynb")
    run_all_cells(page)
    wait_until_run(page, RUN_ALL_TIMEOUT)

    # the explorer rendered: the stage switch (one button per stage found), the colour switch, the plot
    switch = page.locator(f".{StageExplorer.STAGE_CLASS}")
    assert switch.is_visible()
    assert switch.locator(".widget-label").inner_text().strip() == "Stage"
    buttons = switch.locator("button")
    labels = [b.strip() for b in buttons.all_inner_texts()]
    assert len(labels) >= 2 and "pre-trained" in " ".join(labels).lower(), labels
    assert page.locator(f".{StageExplorer.COLOUR_CLASS}").is_visible()
    page.wait_for_function(f"() => !!({_EXPLORER_PLOT})()?.data")
    before = explorer_state(page)
    assert before["points"] > 0 and before["title"], (
        f"the explorer's plot is empty ({before}): drawn from an empty figure, the FigureWidget race that "
        "bissl_kit.viz.figures.figure_widget_class avoids")
    # the class colours are the static panels' (viz.features.class_colour), not plotly's default palette
    from bissl_kit.viz.features import PALETTE
    assert before["colours"][:3] == list(PALETTE[:3]), before["colours"]

    # every other stage: the same plot (no new output) takes that stage's title and coordinates
    explorer_cell = page.locator(".jp-Cell", has=switch)
    outputs = explorer_cell.locator(".jp-OutputArea-output").count()
    active = switch.locator("button.mod-active").inner_text().strip()
    for label in [l for l in labels if l != active]:
        switch.locator("button", has_text=label).first.click()
        try:
            page.wait_for_function(f"(label) => ({_EXPLORER_PLOT})()?.layout?.title?.text?.includes(label)",
                                   arg=label, timeout=30_000)
        except Exception:
            raise AssertionError(f"the stage switch shows {label!r} but after 30 s the plot still reads "
                                 f"{explorer_state(page)['title']!r}: the kernel's update did not reach the plot") from None
        after = explorer_state(page)
        assert after["x"] != before["x"], f"switching to {label!r} changed the title but not the points"
        assert after["points"] == before["points"]  # the same images, placed by another backbone
        assert switch.locator("button.mod-active").inner_text().strip() == label
        before = after
    assert explorer_cell.locator(".jp-OutputArea-output").count() == outputs
    assert_no_errors(page)
    screenshot(page, explorer_cell.locator(".jp-OutputArea-output").last, "04_feature_explorer.png")
    panels = page.locator(".jp-Cell", has=page.locator(".js-plotly-plot")).first
    screenshot(page, panels.locator(".jp-OutputArea"), "04_features_umap_panels.png")
