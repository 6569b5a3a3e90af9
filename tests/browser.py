"""Headless Chromium (Debian's package) driven by Playwright, for pages and the OHIF viewer.

Playwright's own browser downloads cannot work here; it drives ``/usr/bin/chromium`` instead, with
the flags that keep it from phoning home and give it software WebGL for the viewer's canvas.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
]

# Reads the viewport's WebGL canvas through a 2D copy and counts pixels that are not black.
COUNT_LIT_PIXELS = """
() => {
  const canvases = [...document.querySelectorAll('canvas')].filter(c => c.width > 64 && c.height > 64);
  let best = 0;
  for (const canvas of canvases) {
    const copy = document.createElement('canvas');
    copy.width = canvas.width; copy.height = canvas.height;
    const context = copy.getContext('2d');
    context.drawImage(canvas, 0, 0);
    const pixels = context.getImageData(0, 0, copy.width, copy.height).data;
    let lit = 0;
    for (let i = 0; i < pixels.length; i += 4) {
      if (pixels[i] + pixels[i + 1] + pixels[i + 2] > 30) lit++;
    }
    best = Math.max(best, lit);
  }
  return best;
}
"""


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_for_image(page: Page, timeout: float = 60, minimum: int = 500) -> int:
    """Wait until the viewer shows an image (enough non-black pixels); return how many."""
    deadline = time.monotonic() + timeout
    lit = 0
    while time.monotonic() < deadline:
        lit = page.evaluate(COUNT_LIT_PIXELS)
        if lit >= minimum:
            return lit
        time.sleep(0.5)
    raise AssertionError(f"the viewer showed no image within {timeout:.0f} s ({lit} lit pixels)")
