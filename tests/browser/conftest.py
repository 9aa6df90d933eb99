"""Headless Chromium for the tests that open ``report.html`` and the live dashboard.

The browser is Debian's ``chromium`` (``make browser`` installs it with
apt-get when the user is root), driven by Playwright for Python with
``executable_path``: Playwright's own browser download is never used. When
either is missing the tests skip and say which and how to install it.

Screenshots are kept as test artifacts in ``test-artifacts/browser/`` (or
``$FEDCARE_TEST_ARTIFACTS/browser/``).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Without the background-networking flags Chromium keeps dialling Google's hosts, which a
# closed hospital network (and this test machine) refuses; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed: pip install 'fedcare[test]' (make test does)")
    path = chromium_path()
    if path is None:
        pytest.skip(
            "Debian's chromium is not installed: run `make browser` as root (apt-get install chromium); "
            "the report and dashboard browser tests need it"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # Playwright evaluates its wait predicates with eval, which the pages' Content-Security-Policy forbids.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    opened = context.new_page()
    try:
        yield opened
    finally:
        context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    base = Path(os.environ.get("FEDCARE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    out = base / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


def distinct_colours(png: bytes) -> int:
    """How many colours a screenshot shows: a blank or broken image shows one or two."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return len(colours) if colours is not None else 1 << 20


def assert_plots_rendered(page: Any, *, at_least: int) -> list[str]:
    """Every ``img.plot`` on the page decoded to a non-empty picture; returns their alt texts."""
    images = page.locator("img.plot")
    visible = [images.nth(i) for i in range(images.count()) if images.nth(i).is_visible()]
    assert len(visible) >= at_least, f"{len(visible)} plots shown, expected at least {at_least}"
    names = []
    for image in visible:
        natural = image.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
        assert natural[0] and natural[1] > 200 and natural[2] > 150, f"plot {image.get_attribute('alt')!r}: {natural}"
        shot = image.screenshot()
        assert distinct_colours(shot) > 20, f"plot {image.get_attribute('alt')!r} renders as a blank picture"
        names.append(image.get_attribute("alt") or "")
    return names
