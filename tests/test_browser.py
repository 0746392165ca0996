"""The student's way in, in a real browser: `./course lab` serves the chapters, headless Chromium
opens chapter 03 in the course kernel, runs its first code cells through the page and reads their
output from it, then opens a lab terminal, where the course's `minillm grade` works.

Chromium and its driver come from the distribution's packages (.ci/run installs `chromium` and
`chromium-driver`); Selenium drives them through an explicit driver path, so nothing is ever
downloaded. Without Chromium the test is skipped, except in CI (MINILLM_CI=1), where that is a
failure. Screenshots go to out/browser/ for a person to look at."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from minillm.notebooks import KERNEL_DISPLAY_NAME
from minillm.parallel.launch import free_port

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = REPO / "out" / "browser"
CHAPTER = "chapters/03_attention.ipynb"
TOKEN = "minillm-browser-test"
# Lab settings for the test only: no autosave (the chapter on disk stays as committed), a terminal
# that also writes its rows as text for screen readers (so the page can be read), no update checks.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/terminal-extension/plugin": {"screenReaderMode": True},
    "@jupyterlab/apputils-extension/notification": {"checkForUpdates": False, "fetchNews": "false"},
}

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    if os.environ.get("MINILLM_CI"):
        pytest.fail(
            "CI needs Chromium and its driver: apt-get install chromium chromium-driver",
            pytrace=False,
        )
    pytest.skip(
        "no Chromium here (apt-get install chromium chromium-driver)", allow_module_level=True
    )

from selenium import webdriver  # noqa: E402 - only where Chromium exists
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# True once the open notebook's kernel has started and is idle (through the lab's own objects).
KERNEL_IS_IDLE = """
for (const widget of window.jupyterapp.shell.widgets('main')) {
  const session = widget.sessionContext && widget.sessionContext.session;
  if (session && session.kernel) return session.kernel.status === 'idle';
}
return false;
"""


def _wait_for_server(url: str, lab: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lab.poll() is not None:
            pytest.fail(f"./course lab exited with {lab.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    """`./course lab` on a loopback port with a token, its Jupyter state in a temporary folder."""
    settings = tmp_path / "lab-settings"
    for plugin, values in LAB_SETTINGS.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port = free_port()
    env = {
        **os.environ,
        "MINILLM_VENV": sys.prefix,
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    log = tmp_path / "lab.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                "bash",
                str(REPO / "course"),
                "lab",
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={TOKEN}",
                "--LabApp.expose_app_in_browser=True",
            ],
            cwd=tmp_path,  # ./course works from anywhere
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={TOKEN}", process, log, timeout_s=120)
        yield base, log, started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the lab, its kernels and its terminals
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _cell_output(driver, index: int) -> str:
    return driver.execute_script(
        "const cells = document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell');"
        "const out = cells[arguments[0]] && cells[arguments[0]].querySelector('.jp-OutputArea');"
        "return out ? out.innerText : '';",
        index,
    )


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


def _save_and_check_git_status(driver) -> None:
    """Save the chapter that was just run: `git status` stays clean (the clean filter and the
    lab's post-save hook, which runs once the file is written). The file is put back after."""
    if _git("status", "--porcelain", "--", CHAPTER):
        print(f"{CHAPTER} has changes of yours: not saving it from the browser")
        return
    path = REPO / CHAPTER
    original = path.read_bytes()
    saved_at = path.stat().st_mtime_ns
    try:
        ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
        WebDriverWait(driver, 30).until(lambda d: path.stat().st_mtime_ns != saved_at)
        assert path.read_bytes() != original  # JupyterLab did write the file
        WebDriverWait(driver, 60, poll_frequency=0.5).until(
            lambda d: _git("status", "--porcelain", "--", CHAPTER) == ""
        )
    finally:
        _wait_for_git_index()
        path.write_bytes(original)
        _wait_for_git_index()
        _git("add", "--", CHAPTER)  # the same content as staged: only git's stat record changes
    assert _git("status", "--porcelain", "--", CHAPTER) == ""


def _wait_for_git_index(timeout_s: float = 60) -> None:
    """Until no git command (the lab's post-save hook, or another of yours) holds the index."""
    lock = REPO / ".git" / "index.lock"
    deadline = time.monotonic() + timeout_s
    while lock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _terminal_text(driver) -> str:
    return driver.execute_script(
        "const rows = document.querySelectorAll('.jp-Terminal .xterm-accessibility-tree');"
        "return rows.length ? rows[rows.length - 1].innerText : '';"
    )


@pytest.mark.slow
def test_chapter_03_and_a_terminal_in_jupyterlab(lab, browser, capsys):
    base, log, started = lab
    start = time.perf_counter()
    wait = WebDriverWait(browser, 90, poll_frequency=0.25)
    try:
        browser.get(f"{base}/lab/tree/{CHAPTER}?token={TOKEN}")
        # The chapter opens in the course kernel, which goes idle once started.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell"))
        kernel = wait.until(
            lambda d: d.execute_script(
                "const k = document.querySelector('.jp-NotebookPanel .jp-KernelName');"
                "return k && k.innerText.trim() !== 'No Kernel' && k.innerText.trim();"
            )
        )
        assert kernel == KERNEL_DISPLAY_NAME
        wait.until(lambda d: d.execute_script(KERNEL_IS_IDLE))
        _shot(browser, "1-chapter-03-open")

        # Run cells 1 (setup), 2 (imports), 3 (prose) and 4 (attention by hand) from the keyboard.
        prompt = browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell")[1]
        prompt.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()
        keys = ActionChains(browser)
        for _ in range(4):
            keys.key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).pause(0.3)
        keys.perform()
        wait.until(lambda d: "step by step = paper" in _cell_output(d, 4))
        assert re.fullmatch(r"torch \S+ on (cpu|cuda|mps)", _cell_output(browser, 2).strip())
        committed = json.loads((REPO / CHAPTER).read_text(encoding="utf-8"))["cells"][4]
        expected = "".join("".join(o["text"]) for o in committed["outputs"])
        assert _cell_output(browser, 4).split() == expected.split()  # what the chapter shows
        assert _cell_output(browser, 1).strip() == ""  # the setup cell: nothing to do locally
        _shot(browser, "2-chapter-03-cells-run")
        _save_and_check_git_status(browser)

        # A terminal in the lab: the course's minillm first on PATH, and grading works there.
        browser.execute_script("window.jupyterapp.commands.execute('terminal:create-new')")
        wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Terminal .xterm-helper-textarea")
        )
        wait.until(lambda d: "$" in _terminal_text(d) or "#" in _terminal_text(d))
        typing = browser.find_elements(By.CSS_SELECTOR, ".jp-Terminal .xterm-helper-textarea")[-1]
        typing.send_keys("command -v minillm; minillm grade ch03 --impl solutions\n")
        wait.until(lambda d: re.search(r"^total\b", _terminal_text(d), re.MULTILINE))
        _shot(browser, "3-terminal-grade")
        screen = _terminal_text(browser)
        assert f"{Path(sys.prefix).resolve()}/bin/minillm" in screen or (
            f"{sys.prefix}/bin/minillm" in screen
        ), screen
        row = next(line for line in screen.splitlines() if line.startswith("ch03"))
        fractions = re.findall(r"(\d+)/(\d+)", row)
        assert fractions and all(got == full for got, full in fractions), row  # full points
    except Exception:
        _shot(browser, "failure")
        print(f"screenshots in {SCREENSHOTS}; lab log:\n{log.read_text()[-3000:]}")
        raise
    finally:
        now = time.perf_counter()
        with capsys.disabled():  # CI's log shows it without -s
            print(
                f"\nbrowser test: {now - started:.1f} s in all, {now - start:.1f} s of "
                f"it in the browser; screenshots in {SCREENSHOTS}"
            )
