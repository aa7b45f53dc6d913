"""JupyterLab in a real browser for tests/test_browser.py: a private server, headless Chromium, cleanup.

Everything here starts processes and guarantees to stop them: the server with its kernels (and
whatever the kernels started, e.g. kaleido's Chromium) and the Playwright-driven browser. The
traps this works around are in ``../shared/notes/ecosystem.md``:

* ``jupyter lab`` may fork the real server, and ``jupyter_client`` starts every kernel in a new
  session, so killing the PID we started (or its process group) leaves kernels behind: we ask the
  server to shut down, then kill every descendant we can still see;
* an old workspace can hide the notebook (``?reset`` in the URL, and a private workspaces dir);
* the "Jupyter news" toast covers the bottom-right corner (news off in private settings).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Debian's chromium; Playwright's own browser download (`playwright install`) is never used.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# a laptop screen: the layout the user sees is what the screenshots record
VIEWPORT = {"width": 1366, "height": 900}
SERVER_START_TIMEOUT = 60  # seconds; ~3 s on an idle 2-core machine


def find_chromium() -> str | None:
    """Path of a system Chromium ($BISSL_CHROMIUM first), or None."""
    for path in (os.environ.get("BISSL_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if path and os.access(path, os.X_OK):
            return path
    return None


# ---- processes ----------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """PIDs of all processes below ``pid`` (``ps`` works on Linux and macOS; no psutil needed)."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.split("\n"):
        parts = line.split()
        if len(parts) == 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) is not running
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True


def kill_all(pids, *, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds; returns the PIDs still alive."""
    pids = [p for p in pids if alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if alive(p)]
        if not pids:
            break
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the notebook working copy ------------------------------------------------------------------

def with_parameters(notebook: Path, dest: Path, values: dict) -> Path:
    """Copy ``notebook`` to ``dest`` with its ``parameters`` cell's assignments set to ``values``.

    Names the cell assigns keep their line (and comment) with the new value; the others are appended,
    as papermill would inject them. Outputs stay empty: the browser executes the copy."""
    nb = json.loads(notebook.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{notebook.name} must have one cell tagged 'parameters'"
    lines = "".join(cells[0]["source"]).split("\n")
    todo = dict(values)
    for i, line in enumerate(lines):
        try:
            tree = ast.parse(line)
        except SyntaxError:
            continue
        if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assign) and \
                isinstance(tree.body[0].targets[0], ast.Name) and tree.body[0].targets[0].id in todo:
            name = tree.body[0].targets[0].id
            comment = line[line.index("#"):] if "#" in line[tree.body[0].value.end_col_offset:] else ""
            lines[i] = f"{name} = {todo.pop(name)!r}" + (f"  {comment}" if comment else "")
    lines += [f"{name} = {value!r}" for name, value in todo.items()]
    cells[0]["source"] = "\n".join(lines)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(nb, indent=1))
    return dest


# ---- JupyterLab ---------------------------------------------------------------------------------

@dataclass
class Lab:
    url: str      # http://127.0.0.1:PORT
    token: str
    root: Path    # the server's root directory (notebooks are opened relative to it)
    log: Path

    def notebook_url(self, name: str) -> str:
        # `reset`: start from a clean workspace, so an old layout cannot hide the notebook
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None


@contextlib.contextmanager
def jupyter_lab(root: Path, home: Path):
    """A JupyterLab server on 127.0.0.1 with a random token, serving ``root``; private config,
    settings, workspaces and runtime dirs under ``home``. Stops the server, its kernels and
    everything they started on exit, also when the body failed."""
    token = secrets.token_hex(24)
    port = free_port()
    dirs = {k: home / k for k in ("config", "data", "runtime", "settings", "workspaces")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    # no "Jupyter news" toast over the notebook, no update check
    notification = dirs["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(dirs["config"]), "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
           "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
           "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]), "JUPYTER_PLATFORM_DIRS": "1",
           "PYTHONUNBUFFERED": "1"}
    log = home / "jupyter.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
           "--ServerApp.password=", "--ServerApp.open_browser=False", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--ServerApp.shutdown_no_activity_timeout=600",  # a leaked server still goes away
           "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI machines often run as root
        cmd.append("--allow-root")
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            try:
                lab.api("/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start within {SERVER_START_TIMEOUT} s "
                                       f"(exit code {proc.poll()}); its log:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
        yield lab
    finally:
        stop_lab(lab, proc)


def stop_lab(lab: Lab, proc: subprocess.Popen) -> None:
    """Shut the server down politely (it stops its kernels), then kill whatever is left."""
    tree = descendants(proc.pid)  # kernels run in their own sessions: a process-group kill misses them
    with contextlib.suppress(OSError):
        lab.api("/api/shutdown", method="POST")
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    tree = set(tree) | set(descendants(proc.pid) if proc.poll() is None else [])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    left = kill_all([proc.pid, *tree])
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    if left:
        raise RuntimeError(f"processes of the JupyterLab server survived SIGKILL: {left}")


# ---- the browser --------------------------------------------------------------------------------

@contextlib.contextmanager
def chromium(executable: str):
    """Headless system Chromium driven by Playwright; the browser and Playwright's driver are
    stopped on exit."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    browser = None
    try:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
    finally:
        with contextlib.suppress(Exception):
            if browser is not None:
                browser.close()
        pw.stop()
