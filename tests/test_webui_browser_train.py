"""The Train tab in a real browser (headless chromium, see tests/test_webui_browser.py): its lists follow
the workspace, the New-job form survives a reload, errors stay on the page, Stop/Resume are off with
no job, and a config is saved into configs/ of the workspace.

Screenshots (train-form-reload.png, train-error.png, train-advanced.png) go to $SD_LORA_SCREENSHOT_DIR or a temp dir.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_webui_browser import CHROMIUM, Browser

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium); .ci/run installs it"),
    pytest.mark.timeout(300),
]


# The TOML editor's whole text: CodeMirror renders only the lines in view, so innerText can miss some.
TOML_JS = ("(() => { const c = document.querySelector('#train-toml .cm-content'); const v = c && c.cmView && c.cmView.view;"
           " return c ? (v ? v.state.doc.toString() : c.innerText) : ''; })()")


class Page(Browser):
    """Real mouse clicks and key presses (Gradio's text boxes send their `input` event on key presses,
    not on inserted text), and a page that always has the focus (Gradio's dropdowns open on focus)."""

    def __init__(self):
        super().__init__()
        self.send("Emulation.setFocusEmulationEnabled", enabled=True)

    def js(self, expr: str):
        return super().js(expr.replace("TOML_JS", TOML_JS))  # the editor's text, wherever an expression names it

    def click_at(self, selector_js: str) -> None:
        """Press and release the mouse on the element that the JS expression returns."""
        # the layout still moves while a page loads: press only where the element itself is hit
        box = self.wait(f"(() => {{ const el = {selector_js}; if (!el) return false; el.scrollIntoView({{block: 'center'}});"
                        " const r = el.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;"
                        " return el.contains(document.elementFromPoint(x, y)) && [x, y]; })()", 15, what=selector_js)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, label: str, text: str) -> None:
        """Replace the value of the field labelled `label...` by typing `text` key by key."""
        self.wait(f"""(() => {{
            const lab = [...document.querySelectorAll('label')].find(l => l.offsetParent !== null
                && l.innerText.trim().startsWith({json.dumps(label)}) && l.querySelector('input, textarea'));
            if (!lab) return false;
            const el = lab.querySelector('input, textarea'); el.scrollIntoView({{block: 'center'}}); el.focus(); el.select();
            return true; }})()""", 15, what=f"a field labelled {label!r}")
        self.send("Input.dispatchKeyEvent", type="keyDown", key="Backspace", code="Backspace", windowsVirtualKeyCode=8)
        self.send("Input.dispatchKeyEvent", type="keyUp", key="Backspace", code="Backspace", windowsVirtualKeyCode=8)
        for ch in text:
            self.send("Input.dispatchKeyEvent", type="keyDown", key=ch, text=ch)
            self.send("Input.dispatchKeyEvent", type="keyUp", key=ch)
        self.js("document.activeElement.blur()")
        time.sleep(0.3)

    def open_dropdown(self, dropdown: str) -> list[str]:
        """Open a dropdown (Gradio opens it on focus) and return the choices it shows."""
        self.js(f"(() => {{ const i = document.querySelector('{dropdown} input'); i.blur(); i.scrollIntoView({{block: 'center'}});"
                " i.focus(); })()")
        return self.wait(f"(() => {{ const o = [...document.querySelectorAll('{dropdown} [role=option]')].map(li => li.getAttribute('aria-label'));"
                         " return o.length ? o : false; })()", 15, what=f"the options of {dropdown}")

    def options(self, dropdown: str) -> list[str]:
        """The choices a dropdown offers when opened (then closed again)."""
        found = self.open_dropdown(dropdown)
        self.js("document.activeElement.blur()")
        time.sleep(0.3)
        return found

    def options_become(self, dropdown: str, expected: list[str], timeout: float = 20) -> list[str]:
        """The dropdown's choices once they equal `expected` (a tab's select or load event fills its lists
        a moment later), or the last ones seen after `timeout` seconds."""
        end = time.time() + timeout
        while (found := self.options(dropdown)) != expected and time.time() < end:
            time.sleep(0.5)
        return found

    def choose(self, dropdown: str, option: str) -> None:
        self.open_dropdown(dropdown)
        self.click_at(f"[...document.querySelectorAll('{dropdown} [role=option]')].find(li => li.getAttribute('aria-label') === {json.dumps(option)})")
        time.sleep(0.5)

    def toml(self) -> str:
        return self.js("TOML_JS")

    def message(self) -> dict:
        return self.js("(() => { const m = document.querySelector('#train-message');"
                       " return m ? {kind: m.dataset.kind, text: m.innerText} : {kind: null, text: ''}; })()")


def test_browser_train_tab_lists_form_errors_buttons(tmp_path):
    from gradio_client import Client, handle_file

    from test_webui import free_port, make_workspace
    from webui.app import launch, stop

    ws = make_workspace(tmp_path / "ws")
    shots = Path(os.environ.get("SD_LORA_SCREENSHOT_DIR") or tmp_path / "screenshots")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    demo = launch(ws, port=port, block=False, quiet=True)
    page = Page()
    try:
        page.send("Page.enable")
        page.send("Page.navigate", url=url)
        page.wait("document.querySelectorAll('button[role=tab]').length >= 4", what="the tabs")
        page.tab("Train")
        page.wait("!!document.querySelector('#train-toml .cm-content')", what="the TOML editor")

        # no job yet: neither Stop nor Resume can do anything, so neither looks pressable
        assert page.wait("document.querySelector('#stop').disabled && document.querySelector('#resume').disabled", 15,
                         what="Stop and Resume disabled")
        # ... and a disabled Stop is not red: it looks like the disabled Resume
        colours = page.js("['#stop', '#resume'].map(s => getComputedStyle(document.querySelector(s)).backgroundColor)")
        assert colours[0] == colours[1], colours

        # a dataset uploaded while the page is open is offered once the tab is opened again
        assert page.options_become("#train-data", ["datasets/shapes"]) == ["datasets/shapes"]  # filled on load
        image = tmp_path / "fresh.png"
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
        Client(url, verbose=False).predict("", "fresh", [handle_file(str(image))], api_name="/upload_images")
        page.tab("Dataset")  # opening the Dataset tab reads its list again too
        assert page.options_become("#dataset-folder", ["datasets/fresh", "datasets/shapes"]) == ["datasets/fresh", "datasets/shapes"]
        page.tab("Train")
        assert page.options_become("#train-data", ["datasets/fresh", "datasets/shapes"]) == ["datasets/fresh", "datasets/shapes"]

        # the form as typed survives a reload (repeats is in the form now)
        page.choose("#train-data", "datasets/fresh")
        page.type_into("steps", "77")
        page.type_into("repeats", "3")
        page.wait("(() => { const t = TOML_JS;"
                  " return t.includes('steps = 77') && t.includes('repeats = 3') && t.includes('path = \"datasets/fresh\"'); })()",
                  20, what="the TOML to follow the form")
        page.send("Page.reload")
        page.wait("document.querySelectorAll('button[role=tab]').length >= 4", what="the tabs after the reload")
        page.tab("Train")
        page.wait("(() => { return TOML_JS.includes('steps = 77'); })()",
                  20, what="the form's TOML after the reload")
        toml = page.toml()
        assert "repeats = 3" in toml and 'path = "datasets/fresh"' in toml
        assert page.js("document.querySelector('#train-data input').value") == "datasets/fresh"
        assert page.js("[...document.querySelectorAll('label')].find(l => l.innerText.trim().startsWith('steps'))"
                       ".querySelector('input, textarea').value") == "77"
        page.screenshot(shots / "train-form-reload.png")

        # an error stays in the box after its toast is gone
        page.type_into("output name", "a/b")
        page.wait("(() => { const m = document.querySelector('#train-message');"
                  " return m && m.dataset.kind === 'error' && m.innerText.includes('not a plain name'); })()",
                  20, what="the error in the message box")
        page.wait("![...document.querySelectorAll('.toast-body, [data-testid=toast-body]')].some(t => t.offsetParent !== null)",
                  30, what="the toast to go away")
        assert "not a plain name" in page.message()["text"]
        page.screenshot(shots / "train-error.png")

        # validation names the config's keys (not CLI flags) in the same box
        page.type_into("output name", "fresh_lora")
        page.type_into("steps", "0")
        page.wait("TOML_JS.split('\\n').includes('steps = 0')", 20, what="steps = 0 in the TOML")
        page.click_text("Validate")
        page.wait("(() => { const m = document.querySelector('#train-message');"
                  " return m && m.dataset.kind === 'error' && /^steps[:/]/m.test(m.innerText); })()", 20, what="the validation problems")
        assert "--" not in page.message()["text"]

        # save the config into configs/ of the workspace; it is offered in the list of saved configs
        page.type_into("steps", "5")
        page.wait("TOML_JS.split('\\n').includes('steps = 5')", 20, what="steps = 5 in the TOML")
        page.type_into("save as", "mine")
        page.click_at("document.querySelector('#save-config')")
        page.wait("document.querySelector('#train-message').innerText.includes('configs/mine.toml')", 20, what="the saved note")
        saved = (ws / "configs" / "mine.toml").read_text()
        assert "steps = 5" in saved and 'path = "../datasets/fresh"' in saved and "repeats = 3" in saved
        assert "configs/mine.toml" in page.options("#config-file")

        # every other key is in the closed "Advanced" section, built from the keys (issue #17)
        page.click_at("document.querySelector('#train-advanced button, #train-advanced .label-wrap')")
        page.type_into("noise_offset", "0.05")
        page.type_into("epochs", "2")
        page.wait("(() => { const t = TOML_JS.split('\\n');"
                  " return t.includes('noise_offset = 0.05') && t.includes('epochs = 2') && !t.some(l => l.startsWith('steps =')); })()",
                  20, what="the advanced fields in the TOML (epochs replacing steps)")
        # a later edit keeps epochs: the steps box has no stale number to send back
        page.type_into("noise_offset", "0.1")
        page.wait("(() => { const t = TOML_JS.split('\\n');"
                  " return t.includes('noise_offset = 0.1') && t.includes('epochs = 2') && !t.some(l => l.startsWith('steps =')); })()",
                  20, what="epochs kept after another edit")
        assert page.js("[...document.querySelectorAll('label')].find(l => l.innerText.trim().startsWith('steps'))"
                       ".querySelector('input, textarea').value") in ("", None)
        # untouched optional numbers stay unset (Gradio's Number box would send 0 for them: lr = 0.0 ...)
        assert not [line for line in page.toml().splitlines()
                    if line in ("lr = 0.0", "cpu_threads = 0", "max_timestep = 0", "ema_decay = 0.0", "clip_skip = 0")]
        page.js("document.querySelector('#adv-noise_offset').scrollIntoView({block: 'center'})")
        page.screenshot(shots / "train-advanced.png")
    finally:
        page.close()
        stop(demo)
    for name in ("train-form-reload", "train-error", "train-advanced"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
