"""Progress bars suit where they are shown: a widget in a Jupyter kernel, a redrawn line on a
terminal, and in a log one update every few seconds rather than ten a second."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

from minillm.utils import LOG_PROGRESS_INTERVAL_S

# 40 steps over about 1.2 s: tqdm's default (an update every 0.1 s) redraws about 12 times.
LOOP = textwrap.dedent(
    """
    import time
    from minillm.utils import progress_bar
    for _ in progress_bar(range(40), desc="steps"):
        time.sleep(0.03)
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MINILLM_PROGRESS"}
    return {**env, **extra}


def _updates(stderr: str) -> list[str]:
    return [part for part in stderr.replace("\n", "\r").split("\r") if "steps:" in part]


def test_a_log_gets_the_first_and_last_update_only():
    assert LOG_PROGRESS_INTERVAL_S >= 2
    done = subprocess.run(
        [sys.executable, "-c", LOOP], capture_output=True, text=True, env=_env(), check=True
    )
    updates = _updates(done.stderr)
    assert len(updates) == 2, updates
    assert "0/40" in updates[0] and "40/40" in updates[-1]


def test_a_terminal_gets_a_redrawn_line():
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24x100
    process = subprocess.Popen(
        [sys.executable, "-c", LOOP], stdin=terminal, stdout=terminal, stderr=terminal, env=_env()
    )
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert process.wait(timeout=30) == 0
    os.close(controller)
    updates = _updates(seen.decode("utf-8", "replace"))
    assert len(updates) >= 5, updates  # redrawn as it goes
    assert "40/40" in updates[-1]


def test_minillm_progress_chooses_the_mode():
    done = subprocess.run(
        [sys.executable, "-c", LOOP],
        capture_output=True,
        text=True,
        env=_env(MINILLM_PROGRESS="terminal"),
        check=True,
    )
    assert len(_updates(done.stderr)) >= 5


@pytest.mark.slow
def test_a_jupyter_kernel_gets_a_widget_and_no_iprogress_warning():
    from jupyter_client.manager import start_new_kernel

    code = textwrap.dedent(
        """
        from minillm.utils import progress_bar
        bar = progress_bar(range(3), desc="steps")
        print(type(bar).__module__)
        bar.close()
        """
    )
    for env, expected in ((_env(), "tqdm.notebook"), (_env(MINILLM_PROGRESS="log"), "tqdm.std")):
        manager, client = start_new_kernel(kernel_name="python3", env=env)
        try:
            seen = {"stdout": "", "stderr": "", "mimes": set()}

            def collect(message, seen=seen):
                content = message["content"]
                if message["msg_type"] == "stream":
                    seen[content["name"]] += content["text"]
                elif message["msg_type"] in ("display_data", "update_display_data"):
                    seen["mimes"] |= set(content["data"])

            reply = client.execute_interactive(code, timeout=60, output_hook=collect)
            assert reply["content"]["status"] == "ok"
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)
        assert seen["stdout"].strip() == expected
        assert "IProgress" not in seen["stderr"]
        widget = "application/vnd.jupyter.widget-view+json" in seen["mimes"]
        assert widget == (expected == "tqdm.notebook")
