"""Headless Chromium (Debian's package) driven by Playwright, for pages and the OHIF viewer.

Playwright's own browser downloads cannot work here; it drives ``/usr/bin/chromium`` instead, with
the flags that keep it from phoning home and give it software WebGL for the viewer's canvas.

For a portal with SSL on (``conftest.TLSStack``) the browser reaches it by its name, resolved to
127.0.0.1, and trusts the site's certificate by its public key, as if a certificate authority had
signed it: a real https origin with a valid certificate, so Secure and ``__Host-`` cookies, HSTS
and fetch metadata behave as they do for a hospital's users.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from playwright.sync_api import Browser, Page, sync_playwright

if TYPE_CHECKING:
    from conftest import SiteCertificate, Stack

CHROMIUM = "/usr/bin/chromium"
# What the pages looked like, for a person to look at after a run: PACS_TEST_OUTPUT, else data/.
TEST_OUTPUT = Path(
    os.environ.get("PACS_TEST_OUTPUT") or Path(__file__).parent.parent / "data" / "test-output"
)
# A desktop screen and a phone (an iPhone 12 to 15's CSS pixels).
DESKTOP = {"width": 1400, "height": 1000}
PHONE = {"width": 390, "height": 844}
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
def chromium(stack: Stack | None = None, trust: Iterable[SiteCertificate] = ()) -> Iterator[Browser]:
    """A headless Chromium. Given a portal with SSL on, or certificates to ``trust``, it trusts
    those certificates and finds the site's name (``pacs.test``) on this machine."""
    from conftest import SITE_NAME

    flags = list(FLAGS)
    trusted = [*trust, *([stack.certificate] if getattr(stack, "certificate", None) else [])]
    if trusted:
        pins = ",".join(certificate.spki_pin for certificate in trusted)
        flags += [
            f"--ignore-certificate-errors-spki-list={pins}",
            f"--host-resolver-rules=MAP {SITE_NAME} 127.0.0.1",
        ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(page: Page, stack: Stack, username: str, password: str, base: str | None = None) -> None:
    """Sign in through the portal's form, typing as a person does; wait for the page after it."""
    page.goto(f"{base or stack.browser_url}/login")
    page.fill("#username", username)
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert f"Signed in as {username}" in page.inner_text("header"), page.inner_text("main")[:500]


def submit(page: Page, button: str = "main button[type=submit]") -> None:
    """Click a form's button and wait for the page that answers it."""
    with page.expect_navigation():
        page.click(button)


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


def screenshot(page: Page, name: str, full_page: bool = True) -> Path:
    """Save what the page shows as ``screenshots/NAME-WIDTHxHEIGHT.png`` in the test output."""
    size = page.viewport_size or {"width": 0, "height": 0}
    path = TEST_OUTPUT / "screenshots" / f"{name}-{size['width']}x{size['height']}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    return path
