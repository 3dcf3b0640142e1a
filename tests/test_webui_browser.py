"""The web UI in a real browser (headless Debian chromium driven over the Chrome DevTools protocol):
open it, train on the tiny model, see progress and a sample image, reload and still see the job,
screenshot every tab, and check that every request the page made went to the app itself.

Skipped when chromium is not installed (`apt-get install -y chromium`; .ci/run installs it).
Screenshots go to $SD_LORA_SCREENSHOT_DIR (the README's are made with docs/screenshots) or a temp dir.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium); .ci/run installs it"),
    pytest.mark.timeout(300),
]
websockets_sync = pytest.importorskip("websockets.sync.client", reason="the websockets package is needed (pip install -e .[dev])")


class Browser:
    """Just enough of the DevTools protocol: commands, JS evaluation, and the events seen meanwhile."""

    def __init__(self, width: int = 1280, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="sd-lora-chromium-")  # a fresh profile: no state, no extensions
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
             "--disable-gpu", "--no-first-run", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={self.profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        end = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > end or self.proc.poll() is not None:
                self.close()
                pytest.fail("chromium did not open its DevTools port within 30 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websockets_sync.connect(page["webSocketDebuggerUrl"], max_size=128 * 1024 * 1024)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 60, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        end = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.time())))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def js(self, expr: str):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expr[:80]!r}: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 60, what: str = ""):
        end = time.time() + timeout
        while time.time() < end:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what or expr}")

    def click_text(self, text: str, selector: str = "button", timeout: float = 15) -> None:
        """Click the visible element with this text (waiting for it: Gradio renders in steps)."""
        self.wait(f"""(() => {{
            const el = [...document.querySelectorAll({json.dumps(selector)})]
                .find(e => e.innerText.trim() === {json.dumps(text)} && e.offsetParent !== null);
            if (!el) return false; el.click(); return true; }})()""", timeout, what=f"a visible {selector} {text!r}")

    def fill(self, label: str, text: str) -> None:
        """Type `text` into the visible input or textarea whose label starts with `label` (as a user would)."""
        self.wait(f"""(() => {{
            const lab = [...document.querySelectorAll('label')].find(l => l.offsetParent !== null
                && l.innerText.trim().startsWith({json.dumps(label)}) && l.querySelector('input, textarea'));
            if (!lab) return false;
            const el = lab.querySelector('input, textarea'); el.focus(); el.select(); return true; }})()""",
                  15, what=f"a field labelled {label!r}")
        self.send("Input.insertText", text=text)
        self.js("document.activeElement.blur()")

    def fill_in(self, selector: str, text: str, enter: bool = False) -> None:
        """Type `text` into the element matching a CSS selector (e.g. a dropdown's search input)."""
        self.wait(f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                  " if (!el) return false; el.focus(); el.select && el.select(); return true; })()", 15, what=selector)
        self.send("Input.insertText", text=text)
        if enter:
            for kind in ("keyDown", "keyUp"):
                self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
        self.js("document.activeElement.blur()")

    def tab(self, name: str) -> None:
        self.click_text(name, "button[role=tab]")
        time.sleep(0.5)

    def screenshot(self, path: Path) -> None:
        """The whole page, not only the window."""
        path.parent.mkdir(parents=True, exist_ok=True)
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000), "scale": 1}
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


TOML = """model = "models/tiny"
output = "loras/browser_lora.safetensors"
steps = 8
seed = 3
sample_every = 4
sample_prompts = ["sks, a red circle"]
sample_steps = 2

[data]
path = "datasets/shapes"
resolution = 64

[network]
rank = 4
alpha = 4.0
preset = "attention"
"""


def test_browser_train_reload_screenshots(tmp_path):
    from test_webui import free_port, make_workspace
    from webui.app import launch, stop

    ws = make_workspace(tmp_path / "ws")
    shots = Path(os.environ.get("SD_LORA_SCREENSHOT_DIR") or tmp_path / "screenshots")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    demo = launch(ws, port=port, block=False, quiet=True)
    browser = Browser()
    try:
        browser.send("Network.enable")
        browser.send("Page.enable")
        browser.send("Page.navigate", url=url)
        browser.wait("document.querySelectorAll('button[role=tab]').length >= 4", what="the tabs")

        # Dataset: the first dataset's thumbnails appear on load
        browser.wait("document.querySelectorAll('img').length >= 4", what="dataset thumbnails")
        browser.screenshot(shots / "dataset.png")

        # Train: replace the TOML, let the form follow it, press Start
        browser.tab("Train")
        browser.wait("!!document.querySelector('#train-toml .cm-content')", what="the TOML editor")
        browser.js("document.querySelector('#train-toml .cm-content').focus()")
        browser.send("Input.dispatchKeyEvent", type="keyDown", modifiers=2, key="a", code="KeyA",
                     windowsVirtualKeyCode=65, commands=["selectAll"])  # Ctrl+A in the editor
        browser.send("Input.dispatchKeyEvent", type="keyUp", modifiers=2, key="a", code="KeyA", windowsVirtualKeyCode=65)
        browser.send("Input.insertText", text=TOML)
        browser.js("document.querySelector('#train-toml .cm-content').blur()")
        browser.wait("[...document.querySelectorAll('input, textarea')].some(i => i.value === 'browser_lora')", 20,
                     what="the form to show the TOML's output name")
        browser.js("document.querySelector('#start').click()")

        # live progress: a running job with steps counting up
        running = browser.wait(
            "(() => { const s = document.querySelector('#job-status');"
            " return s && s.dataset.status === 'running' && +s.dataset.step >= 1 && s.innerText; })()",
            150, what="a running job at step >= 1")
        # the speed in the trainer's own unit (its progress bar prints step/s, or s/step when slower)
        assert "browser_lora" in running and ("step/s" in running or "s/step" in running) and "ETA" in running
        assert browser.js("!document.querySelector('#stop').disabled"), "Stop must be pressable while a job runs"

        # a reload (or a second browser) rebuilds the view from the server: the job is still there
        browser.send("Page.reload")
        browser.wait("document.querySelectorAll('button[role=tab]').length >= 4", what="the tabs after reload")
        browser.tab("Train")
        after = browser.wait(
            "(() => { const s = document.querySelector('#job-status');"
            " return s && ['running', 'done'].includes(s.dataset.status) && s.innerText; })()",
            30, what="the job after the reload")
        assert "browser_lora" in after

        browser.wait("(() => { const s = document.querySelector('#job-status'); return s && s.dataset.status === 'done'; })()",
                     150, what="the job to finish")
        browser.wait("document.querySelectorAll('#samples img').length >= 1", 20, what="a sample image")
        assert "step 8/8" in browser.js("document.querySelector('#job-status').innerText")
        browser.wait("document.querySelector('#stop').disabled", 10, what="Stop disabled once the job is done")
        browser.screenshot(shots / "train.png")

        # Generate with the new LoRA through a prompt tag
        browser.tab("Generate")
        browser.fill("prompt", "sks, a red circle <lora:browser_lora:1>")
        browser.fill("steps", "2")
        browser.fill("width", "64")
        browser.fill("height", "64")
        browser.js("document.querySelector('#generate-btn').click()")
        browser.wait("document.body.innerText.includes('browser_lora x1')", 60, what="the generated image's info")
        assert browser.js("document.querySelectorAll('img').length") >= 1
        browser.screenshot(shots / "generate.png")

        browser.tab("Library")
        browser.wait("document.body.innerText.includes('browser_lora')", 20, what="the trained LoRA in the library")
        browser.fill_in("#library-name input", "browser_lora", enter=True)
        browser.click_text("Inspect")
        browser.wait("document.body.innerText.includes('ss_network_dim')", 20, what="the LoRA's metadata")
        browser.screenshot(shots / "library.png")
    finally:
        browser.close()
        stop(demo)

    # every request the page made went to the app itself (no CDN, fonts, analytics)
    urls = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
    assert len(urls) > 10
    foreign = [u for u in urls if not u.startswith(url) and not u.startswith(("data:", "blob:"))]
    assert not foreign, f"the page contacted other hosts: {sorted(set(foreign))[:10]}"
    for name in ("dataset", "train", "generate", "library"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
