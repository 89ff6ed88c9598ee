"""Headless Chromium (Debian's `chromium`, driven by Playwright) for the dashboard tests.

Nothing is downloaded: Playwright drives the system browser (`LMD_CHROMIUM` or /usr/bin/chromium),
which the test set-up installs with apt when it is missing (see .ci/run).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]

# Per Plotly figure on the page: its id, how many traces, how many data points they hold in all
# (x/y/values/cells), the longest axis of each trace, and whether Plotly drew it (an SVG of non-zero size).
FIGURES_JS = """
() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => {
  const flat = v => ArrayBuffer.isView(v) ? Array.from(v) : Array.isArray(v) ? v.flatMap(flat) : [v];
  const count = v => (v == null || !(Array.isArray(v) || ArrayBuffer.isView(v))) ? 0 : flat(v)
      .filter(x => x !== null && x !== undefined && !(typeof x === 'number' && isNaN(x))).length;
  // _fullData: the traces as Plotly drew them (typed arrays decoded), not the JSON the page carried.
  const points = (gd._fullData || []).reduce((n, t) => n + count(t.x) + count(t.y) + count(t.values)
      + count(t.dimensions && t.dimensions.map(d => d.values)) + count(t.cells && t.cells.values), 0);
  const svg = gd.querySelector('svg.main-svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  const perTrace = (gd._fullData || []).map(t => Math.max(count(t.x), count(t.y), count(t.values)));
  return {id: gd.id, traces: (gd._fullData || []).length, points: points, trace_points: perTrace,
          width: box.width, height: box.height};
})
"""


def chromium_path() -> str | None:
    return os.environ.get("LMD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class RenderedPage:
    errors: list[str]  # uncaught exceptions and console errors
    figures: dict[str, dict]  # id -> {traces, points, width, height}
    images: list[dict]  # every <img>: alt, naturalWidth
    text: str
    screenshot: Path

    def screenshot_is_blank(self) -> bool:
        from PIL import Image

        pixels = np.asarray(Image.open(self.screenshot).convert("L"), dtype=np.float32)
        return bool(pixels.std() < 5.0 or (pixels < 200).mean() < 0.01)


def render(page_path: Path, screenshot: Path) -> RenderedPage:
    """Open the page from disk (file://, no server, no network), wait for Plotly, screenshot the whole page."""
    from playwright.sync_api import sync_playwright

    binary = chromium_path()
    if binary is None:
        raise RuntimeError("no Chromium found: install Debian's `chromium` (apt-get install -y chromium) "
                           "or set LMD_CHROMIUM to a Chromium binary")
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}")
                    if msg.type == "error" else None)
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length === "
                                   "document.querySelectorAll('[id^=fig-]').length - "
                                   "document.querySelectorAll('[id=fig-pictures]').length", timeout=30_000)
            figures = {f["id"]: f for f in page.evaluate(FIGURES_JS)}
            images = page.evaluate("() => Array.from(document.images).map(i => ({alt: i.alt, "
                                   "naturalWidth: i.naturalWidth, complete: i.complete}))")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return RenderedPage(errors, figures, images, text, screenshot)
