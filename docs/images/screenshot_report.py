"""Screenshot a run's report.html in headless Chromium (the picture in the README).

    fedcare demo --out runs/demo
    python docs/images/screenshot_report.py runs/demo docs/images/report.png

Needs Playwright for Python and Debian's chromium (``make browser``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


def main(run: str, out: str, height: int = 1500) -> None:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": height}, device_scale_factor=1)
        page.goto((Path(run) / "report.html").resolve().as_uri())
        page.screenshot(path=out, clip={"x": 0, "y": 0, "width": 1100, "height": height})
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
