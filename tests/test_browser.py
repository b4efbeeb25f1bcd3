"""The Lab in a real browser: JupyterLab 4 and Voila, driven through Debian's Chromium.

Starts a Jupyter server on 127.0.0.1 (a free port, temporary config/data/settings folders, no
token) serving a temporary copy of notebooks/lab.ipynb (so the stored notebook is never
autosaved over), then with Playwright's Python API:

- JupyterLab: Run All; choose the bundled SmolLM2-135M, NF4 and LoRA r=8; Train; wait until the
  loss plot has points and the trainable-parameter count is shown; Stop; screenshot.
- Voila (``/voila/render/lab.ipynb``): the same clicks with the 2-layer tiny-llama.

Why two models: the issue's path (bundled model + NF4) is what a learner runs, so JupyterLab
runs it; one NF4 SmolLM2 step of 4 x 64 tokens takes a few seconds on 2 CPU cores, and only 2
steps are waited for before Stop. Voila's check is about rendering and widget round trips, so it
uses tiny-llama and the whole file stays within ~3 minutes.

Screenshots go to artifacts/ (gitignored). Skips when chromium or playwright is missing.
"""

from __future__ import annotations

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
LOSS_POINTS = """() => {
    const plot = [...document.querySelectorAll('.js-plotly-plot')]
        .find(p => p.layout && p.layout.title && String(p.layout.title.text).startsWith('Training loss'));
    return plot && plot.data[0].y ? plot.data[0].y.length : -1;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make browser-deps)")
    pytest.importorskip("playwright.sync_api")
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "jupyter-lab").exists():
        pytest.skip("jupyterlab is not installed in this environment")
    tmp = Path(tempfile.mkdtemp(prefix="peftlab-browser-"))
    (tmp / "nb").mkdir()
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


def _drive_lab(page, model: str, nf4: bool, shot: str) -> None:
    """Choose model / NF4 / LoRA r=8, Train, see the loss grow and the count, Stop, screenshot."""
    page.wait_for_selector(".peftlab-trainable", timeout=150_000)  # the Lab rendered and previewed
    _select(page, "model", model)
    _select(page, "method", "lora")
    rank = _control(page, ".widget-inline-hbox", "rank r").locator("input")
    rank.fill("8")
    rank.press("Enter")
    if nf4:
        page.locator(".widget-toggle-buttons button:text-is('NF4')").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.peftlab-preview')].some(e => e.textContent.includes('%s'))"
        % ("NF4" if nf4 else model), timeout=60_000)
    count = page.locator(".peftlab-trainable").first.inner_text()
    assert int(count.replace(",", "")) > 0

    page.locator("button:has-text('Train')").first.click()
    page.wait_for_function(f"() => ({LOSS_POINTS})() >= 2", timeout=150_000)
    page.locator("button:has-text('Stop')").first.click()
    page.wait_for_selector(".peftlab-ok, .peftlab-error", timeout=120_000)
    message = page.locator(".peftlab-msg").first.inner_text()
    assert "Stop" in message or "Completed" in message, message
    assert page.evaluate(LOSS_POINTS) >= 2
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)


def _on_failure(page, shot: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.screenshot(path=str(ARTIFACTS / shot.replace(".png", "-failed.png")), full_page=True)
    except Exception:  # noqa: BLE001 (the original failure matters more)
        pass


def test_lab_in_jupyterlab(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{server}/lab/tree/lab.ipynb")
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        # The indicator can read idle before the kernel session is wired up, and a Run All sent
        # then is dropped: retry until a prompt shows [*] or a number.
        for _attempt in range(4):
            page.locator(".lm-MenuBar-itemLabel:text-is('Run')").click()
            page.locator(".lm-Menu-itemLabel:text-is('Run All Cells')").click()
            try:
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.jp-InputPrompt')]"
                    ".some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))", timeout=20_000)
                break
            except Exception:  # noqa: BLE001 (not started yet: click Run All again)
                continue
        _drive_lab(page, "smollm2-135m", nf4=True, shot="lab-jupyterlab.png")
    except BaseException:
        _on_failure(page, "lab-jupyterlab.png")
        raise
    finally:
        page.close()


@pytest.mark.xfail(reason="Voila renders the Lab and runs Train/Stop, but FigureWidget updates sent from "
                          "the training thread do not reach Voila's page yet (HTML and progress do)",
                   strict=False)
def test_lab_in_voila(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{server}/voila/render/lab.ipynb", timeout=240_000)
        _drive_lab(page, "tiny-llama", nf4=False, shot="lab-voila.png")
    except BaseException:
        _on_failure(page, "lab-voila.png")
        raise
    finally:
        page.close()
