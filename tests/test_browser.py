"""The Lab in a real browser: JupyterLab 4 and Voila, driven through Debian's Chromium.

Starts a Jupyter server on 127.0.0.1 (a free port, temporary config/data/settings folders, no
token) serving a temporary copy of notebooks/lab.ipynb (so the stored notebook is never
autosaved over), then with Playwright's Python API:

- JupyterLab: Run All; choose the bundled SmolLM2-135M, NF4 and LoRA r=8; Train; wait until the
  loss plot has points and the trainable-parameter count is shown; Stop; screenshot.
- Voila (``/voila/render/lab.ipynb``, the notebook as an app): the same clicks.

The live figures take two paths (see peftlab.widgets.live): plotly FigureWidgets in JupyterLab,
plotly mime-bundle outputs re-sent into an Output widget in Voila. Each test checks it got the
path it expected, and counts the loss plot's points from plotly.js's own ``_fullData`` (the
mime bundle sends arrays base64-encoded, so ``data[0].y`` is not an array there).

One NF4 SmolLM2 step of 4 x 64 tokens takes a few seconds on 2 CPU cores and only 2 steps are
waited for before Stop; each test shuts its kernel down at the end.

Screenshots go to artifacts/ (gitignored; on a failure also the page's uncaught errors). Skips
when chromium, playwright or jupyterlab is missing, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARTIFACTS = ROOT / "artifacts"
LOSS_PLOT = """() => [...document.querySelectorAll('.js-plotly-plot')]
    .find(p => p.layout && p.layout.title && String(p.layout.title.text).startsWith('Training loss'))"""
LOSS_POINTS = f"""() => {{
    const plot = ({LOSS_PLOT})();
    const trace = plot && plot._fullData && plot._fullData[0];
    return trace && trace.y ? trace.y.length : -1;
}}"""
# True when the loss plot is a plotly output inside an Output widget (not a FigureWidget view)
LOSS_IS_STATIC = f"() => ({LOSS_PLOT})().closest('.widget-output') !== null"
TRAINABLE = 460_800  # SmolLM2-135M, LoRA r=8 on q_proj and v_proj: 30 x 8 x ((576 + 576) + (576 + 192))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(what: str) -> None:
    """Skip on a workstation; fail in CI, where `make test` installs everything it needs."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what}: CI must run the browser tests (make browser-deps installs chromium)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def server():
    if CHROMIUM is None:
        _missing("chromium is not installed (make browser-deps)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "jupyter-lab").exists():
        _missing("jupyterlab is not installed in this environment (pip install -e '.[lab]')")
    tmp = Path(tempfile.mkdtemp(prefix="peftlab-browser-"))
    (tmp / "nb").mkdir()
    # no "get Jupyter news?" prompt over the screenshot
    news = tmp / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))
    shutil.copy(ROOT / "notebooks" / "lab.ipynb", tmp / "nb" / "lab.ipynb")
    port = _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [str(bin_dir / "jupyter-lab"), "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={tmp / 'nb'}", f"--LabApp.user_settings_dir={tmp / 'settings'}",
         f"--LabApp.workspaces_dir={tmp / 'workspaces'}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp / "nb",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("jupyter lab exited: " + (tmp / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not start: " + (tmp / "server.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()  # the server this fixture started, by its handle
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def _control(page, kind: str, description: str):
    """The ipywidgets control of this kind whose description label reads ``description``."""
    index = page.evaluate(
        "([kind, text]) => [...document.querySelectorAll(kind)].findIndex("
        "e => { const l = e.querySelector('label'); return l && l.textContent.trim() === text; })",
        [kind, description])
    assert index >= 0, f"no {kind} labelled {description!r}"
    return page.locator(kind).nth(index)


def _select(page, description: str, starts: str) -> None:
    """Pick the option whose text starts with ``starts`` (labels carry sizes and families)."""
    select = _control(page, ".widget-dropdown", description).locator("select")
    labels = select.evaluate("s => [...s.options].map(o => o.textContent)")  # inner_text is '' for options
    plain = [t.replace("\xa0", " ") for t in labels]  # ipywidgets renders spaces as nbsp
    found = [t for t, p in zip(labels, plain) if p.startswith(starts) or p.endswith(f"· {starts}")]
    assert found, f"no option {starts!r} in the {description!r} list: {labels}"
    label = found[0]
    select.select_option(label=label)


def _shutdown_kernels(url: str) -> None:
    """Shut down every kernel of the test server: free the model's memory for the next test."""
    with urllib.request.urlopen(f"{url}/api/kernels", timeout=10) as answer:
        kernels = json.load(answer)
    for kernel in kernels:
        request = urllib.request.Request(f"{url}/api/kernels/{kernel['id']}", method="DELETE")
        try:
            urllib.request.urlopen(request, timeout=30)
        except OSError:
            pass


def _accept_dialog(page) -> None:
    """Accept an open JupyterLab dialog ("Select Kernel" when the kernel was slow to start)."""
    button = page.locator(".jp-Dialog .jp-mod-accept")
    if button.count():
        button.first.click()


def _wait_for_kernel(page, url: str, timeout_s: float = 180) -> None:
    """Wait until the server holds a session for lab.ipynb whose kernel is idle."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _accept_dialog(page)
        with urllib.request.urlopen(f"{url}/api/sessions", timeout=10) as answer:
            sessions = json.load(answer)
        if any(s["path"].endswith("lab.ipynb") and s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"lab.ipynb's kernel did not start within {timeout_s:.0f} s")


def _drive_lab(page, shot: str, static: bool) -> None:
    """Choose no task, SmolLM2 / NF4 / LoRA r=8, Train, see the loss grow and the count, Stop, screenshot.

    ``static``: whether the live figures should be mime-bundle outputs (Voila), not FigureWidgets.
    """
    page.wait_for_selector(".peftlab-trainable", timeout=150_000)  # the Lab rendered and previewed
    # no task: the Lab opens on the sentiment task, whose base-model measurement (48 greedy answers
    # of the NF4 model) would add minutes per browser; the task flow is tested in test_widgets
    _select(page, "task", "none")
    _select(page, "model", "smollm2-135m")
    _select(page, "method", "lora")
    rank = _control(page, ".widget-inline-hbox", "rank r").locator("input")
    rank.fill("8")
    rank.press("Enter")
    page.locator(".widget-toggle-buttons button:text-is('NF4')").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.peftlab-preview')].some(e => e.textContent.includes('NF4'))",
        timeout=60_000)
    count = page.locator(".peftlab-trainable").first.inner_text()
    assert int(count.replace(",", "")) == TRAINABLE, count

    page.locator("button:has-text('Train')").first.click()
    # the run's message shows the count of the loaded model (logical parameters, NF4 included)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.peftlab-msg')].some(e => e.textContent.includes(' trainable ')"
        " || e.classList.contains('peftlab-error'))", timeout=240_000)
    message = page.locator(".peftlab-msg").first.inner_text()
    assert f"{count} trainable parameters" in message, message
    page.wait_for_function(f"() => ({LOSS_POINTS})() >= 2", timeout=240_000)
    assert page.evaluate(LOSS_IS_STATIC) is static
    page.locator("button:has-text('Stop')").first.click()
    page.wait_for_selector(".peftlab-ok, .peftlab-error", timeout=180_000)
    message = page.locator(".peftlab-msg").first.inner_text()
    assert "Stop" in message or "Completed" in message, message
    assert page.evaluate(LOSS_POINTS) >= 2
    runs = page.locator(".peftlab-runs").first.inner_text()
    assert count in runs and "smollm2-135m NF4" in runs, runs
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)


def _collect_errors(page) -> list[str]:
    """The page's uncaught errors, kept for the failure report."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


def _on_failure(page, shot: str, errors: list[str]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / shot.replace(".png", "-errors.txt")).write_text("\n".join(errors))
    try:
        page.screenshot(path=str(ARTIFACTS / shot.replace(".png", "-failed.png")), full_page=True)
    except Exception:  # noqa: BLE001 (the original failure matters more)
        pass


def test_lab_in_jupyterlab(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = _collect_errors(page)
    try:
        page.goto(f"{server}/lab/tree/lab.ipynb")
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        _wait_for_kernel(page, server)
        # A Run All sent before the page has wired up the kernel is dropped (or asks for a
        # kernel): retry until a cell runs ([*]) or the Lab has rendered. The stored prompts
        # already read [1], [2], ... and the stored outputs hold no widget views.
        for _attempt in range(4):
            _accept_dialog(page)
            page.locator(".lm-MenuBar-itemLabel:text-is('Run')").click()
            page.locator(".lm-Menu-itemLabel:text-is('Run All Cells')").click()
            try:
                page.wait_for_function(
                    "() => document.querySelector('.peftlab-trainable') !== null || "
                    "[...document.querySelectorAll('.jp-InputPrompt')].some(e => e.textContent.includes('[*]'))",
                    timeout=30_000)
                break
            except Exception:  # noqa: BLE001 (not started yet: click Run All again)
                continue
        _drive_lab(page, shot="lab-jupyterlab.png", static=False)
    except BaseException:
        _on_failure(page, "lab-jupyterlab.png", errors)
        raise
    finally:
        page.close()
        _shutdown_kernels(server)


def test_lab_in_voila(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = _collect_errors(page)
    try:
        page.goto(f"{server}/voila/render/lab.ipynb", timeout=240_000)
        _drive_lab(page, shot="lab-voila.png", static=True)
    except BaseException:
        _on_failure(page, "lab-voila.png", errors)
        raise
    finally:
        page.close()
        _shutdown_kernels(server)
