"""Real-browser test: JupyterLab on 127.0.0.1, driven by Python Playwright through Debian's Chromium.

It opens notebook 03, runs all cells, moves the t′ slider with the keyboard and checks that the ψ_t figure redrew
for the new t′; then it saves a screenshot of the sliders and figure. `make screenshot` keeps that picture as
docs/img/03_tradeoff_explorer.png (the README's). Skips only where no Chromium is installed (`.ci/run` installs
it with `apt-get install -y chromium`; never `playwright install`).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

NB = Path(__file__).resolve().parents[1] / "notebooks"
CHROMIUM = os.environ.get("TCMLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# `make screenshot` (TCMLAB_SCREENSHOT set) must not pass without refreshing the picture: it fails instead of skipping.
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("TCMLAB_SCREENSHOT"),
                                reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium (Debian), or set "
                                       f"TCMLAB_CHROMIUM")
TOKEN = "tcmlab-browser-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of notebook 03 (runs go to tmp_path/runs)."""
    shutil.copy(NB / "03_tradeoff_explorer.ipynb", tmp_path)
    port = free_port()
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.root_dir={tmp_path}", f"--IdentityProvider.token={TOKEN}",
]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')  # no news pop-up
    env = {**os.environ, "TCMLAB_NB_OUT": str(tmp_path / "runs"), "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings")}
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "jupyter.log").read_text()[-2000:]
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start in 120 s:\n" + (tmp_path / "jupyter.log").read_text()[-2000:])
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def title_of(page) -> str:
    """The ψ_t figure's title as plotly drew it in the slider's output area."""
    return page.locator(".widget-output .js-plotly-plot .gtitle").first.text_content()


def test_explorer_slider_redraws_the_figure_in_chromium(lab, tmp_path):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        try:
            page.goto(f"{lab}/lab/tree/03_tradeoff_explorer.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            dialog = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
            try:  # a fresh settings folder asks which kernel to start
                dialog.click(timeout=10_000)
            except Exception:
                pass
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            page.wait_for_selector(".widget-output .js-plotly-plot .gtitle", timeout=180_000)
            before = title_of(page)
            assert "t′=1," in before, before

            handle = page.locator(".widget-slider .noUi-handle").first  # the first slider is t′
            handle.focus()
            for _ in range(4):  # 4 steps of 0.05 in log10: t′ = 10^0.2 ≈ 1.58
                handle.press("ArrowRight")
            # each key press redraws once; wait for the last one (t′ = 1.58, as the title prints it: 3 digits)
            page.wait_for_function(
                "() => { const t = document.querySelector('.widget-output .js-plotly-plot .gtitle');"
                " return t && t.textContent.includes('t′=1.58,'); }", timeout=60_000)
            after = title_of(page)
            t_new = float(re.search(r"t′=([\d.]+)", after).group(1))
            assert t_new == pytest.approx(10 ** 0.2, rel=0.01), after
            assert after != before
            readout = page.locator(".widget-slider .widget-readout").first.inner_text()
            assert float(readout) == pytest.approx(t_new, rel=0.02), (readout, after)

            shot = tmp_path / "03_tradeoff_explorer.png"
            box = page.locator(".jp-OutputArea-output .widget-vbox").first
            box.scroll_into_view_if_needed()
            box.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("TCMLAB_SCREENSHOT"):
                Path(os.environ["TCMLAB_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, os.environ["TCMLAB_SCREENSHOT"])
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"browser test failed: screenshot in {tmp_path / 'failure.png'}, server log in "
                  f"{tmp_path / 'jupyter.log'}")
            raise
        finally:
            browser.close()
