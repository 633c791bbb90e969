"""report.html in a real browser: headless Chromium (Debian's `chromium`), driven through the
Chrome DevTools Protocol over its WebSocket with `websocket-client`, the messages written here.

The page must load without a console error or an uncaught exception, show the run's numbers in
its summary, change the explorer's coloured tokens when a mode button is clicked, and paint a
screenshot that is not blank."""

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab of a headless Chromium, spoken to over CDP."""

    def __init__(self, chromium: str, profile: Path):
        import websocket

        self.process = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        port = self._port()
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _port(self) -> int:
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.process.stderr.readline()
            if match := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                return int(match.group(1))
        raise RuntimeError("Chromium did not open its DevTools port")

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(json.loads(self.socket.recv()))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def errors(self) -> list[str]:
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(str(params.get("args")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found

    def close(self) -> None:
        self.socket.close()
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def report(sharpening_task, tmp_path_factory):
    """A one-iteration loop of the warm sharpening policy (its completions have calculation and
    answer spans, so the modes weigh them differently) and its analysis."""
    policy, task = sharpening_task
    root = tmp_path_factory.mktemp("browser")
    cfiw = str(Path(sys.executable).parent / "cfiw")
    settings = ["loop.questions=8", "rollout.group_size=4", "loop.eval_limit=8", "loop.probe_questions=4"]
    settings += ["loop.probe_samples=2", f"data.dataset={json.dumps(str(task))}", "rollout.max_new_tokens=24"]
    command = [cfiw, "loop", "--preset", "tiny", "--run", str(root / "run"), "--model", str(policy)]
    command += ["--iterations", "1"] + [word for s in settings for word in ("--set", s)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([cfiw, "analyze", str(root / "run"), "--out", str(root / "report")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "report"


@pytest.fixture
def page(tmp_path):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    opened = Page(CHROMIUM, tmp_path / "profile")
    yield opened
    opened.close()


COLOURS = "[...document.querySelectorAll('#x-tokens span.tok')].map((s) => s.style.background)"


def test_the_report_works_in_a_real_browser(report, page):
    page.call("Page.navigate", url=(report / "report.html").as_uri())
    page.wait_for("Page.loadEventFired")
    assert page.errors() == []

    # the summary leads and holds the run's numbers
    summary = page.evaluate("document.querySelector('#summary').innerText")
    run = json.loads((report / "probe_runs.json").read_text())[0]
    assert f"probe reward {run['first_reward']:.3f} -> {run['final_reward']:.3f}" in summary
    assert page.evaluate("document.body.innerText.indexOf('Summary') < document.body.innerText.indexOf('Plots')")

    # the explorer: keep the rollouts where the modes disagree most, then switch modes
    page.evaluate("document.getElementById('x-disagree').click()")
    modes = page.evaluate("[...document.querySelectorAll('#x-modes button')].map((b) => b.dataset.mode)")
    assert modes[:3] == ["cfiw", "uniform", "inverted"]
    cfiw = page.evaluate(COLOURS)
    assert cfiw and len(set(cfiw)) > 1  # cfiw colours this completion's tokens unevenly
    page.evaluate("document.querySelector('#x-modes button[data-mode=\"uniform\"]').click()")
    uniform = page.evaluate(COLOURS)
    assert len(uniform) == len(cfiw) and set(uniform) == {"rgb(255, 255, 255)"}  # every weight 1: white
    page.evaluate("document.querySelector('#x-modes button[data-mode=\"inverted\"]').click()")
    inverted = page.evaluate(COLOURS)
    assert inverted != cfiw and inverted != uniform
    hover = page.evaluate("document.querySelector('#x-tokens span.start').title")
    assert re.search(r"weight \d\.\d{3} \| \w+ span", hover)
    assert page.errors() == []

    # a screenshot that is not blank
    from PIL import Image

    shot = page.call("Page.captureScreenshot", format="png")["data"]
    with Image.open(io.BytesIO(base64.b64decode(shot))) as image:
        low, high = image.convert("L").getextrema()
        assert image.size[0] >= 800 and high - low > 100
